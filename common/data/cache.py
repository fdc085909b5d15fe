"""The decode cache of image-folder and archive sources: uint8 arrays in one .npz beside the data
(or under --cache-dir), named by a fingerprint of the source, written atomically so a killed decode
is never read."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from ..downloads import file_digest
from ..errors import UserError
from ..faults import failpoint
from ..files import remove_stale_temp, writable

log = logging.getLogger(__name__)

FORMAT = 1  # bump when decoding changes what the arrays hold: old caches are then ignored
USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifar-vit-vs-cnn"


def source_fingerprint(path: Path) -> str:
    """A file: the SHA-256 of its bytes. A folder: a hash of every image's relative path, size and
    mtime (reading 60,000 files would cost seconds; any edit, addition or deletion changes it)."""
    h = hashlib.sha256(f"format {FORMAT}\n".encode())
    if path.is_file():
        h.update(file_digest(path).encode())
        return h.hexdigest()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            rel = os.path.relpath(os.path.join(root, name), path)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_file(source: Path, fingerprint: str, cache_dir: str | None, skip_bad: bool) -> Path:
    """Where the decoded arrays of `source` live: beside it, or in cache_dir; falls back to the
    user's cache folder (with a message) when the data's folder is read-only and no --cache-dir was
    given."""
    name = f"{source.name}.decoded-{fingerprint[:16]}{'-skipbad' if skip_bad else ''}.npz"
    if cache_dir:
        folder = Path(cache_dir)
        if not writable(folder):
            raise UserError(f"--cache-dir {folder} is not writable; choose a folder you can write "
                            "to")
        return folder / name
    # beside the path given (a symlink's folder, not its target's)
    folder = source.absolute().parent
    if (folder / name).is_file() or writable(folder):
        return folder / name
    if (USER_CACHE / name).is_file() or writable(USER_CACHE):
        return USER_CACHE / name
    raise UserError(f"cannot write the decode cache of {source} beside it or in {USER_CACHE}; "
                    f"pass --cache-dir DIR (a writable folder)")


def load_cache(path: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    """The arrays and metadata of a complete cache file, or None (absent, or unusable: it is decoded
    again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
    except Exception as e:  # truncated zip, bad header, missing array: all mean "decode again"
        log.warning(f"ignoring the unreadable cache {path} ({type(e).__name__}); decoding again")
        return None
    if (meta.get("format") != FORMAT
            or len(arrays["train_x"]) != meta.get("counts", {}).get("train")):
        return None
    return arrays, meta


def save_cache(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write the cache through a temp file named by this process, then rename: readers never see
    half a file."""
    remove_stale_temp(path.parent, "*.decoded-*.npz.tmp-*", owner_pid=_writer_pid)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps({**meta, "format": FORMAT})), **arrays)
            f.flush()
            failpoint("write:cache")
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.warning(f"could not write the decode cache {path} ({e.strerror or e}); the next run "
                    "decodes again (pass --cache-dir to put it elsewhere)")


def _writer_pid(name: str) -> int | None:
    """A cache temp file is named by the pid of the process writing it: <cache>.tmp-<pid>."""
    pid = name.rsplit("-", 1)[-1]
    return int(pid) if pid.isdigit() else None
