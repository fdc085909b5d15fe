"""Files written so that a crash, a kill or a full disk never leaves a half-written one (temp file,
fsync, os.replace), and the small helpers around them that several modules need: can this process
write a folder, is a process still alive, which temp files did a dead writer leave."""
from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import WriteError
from .faults import failpoint


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    # the umask can only be read by setting it; set it back at once (once per process, before any
    # thread writes)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path` through a temp file in the same folder, fsync, then os.replace.
    Refuses up front when the disk cannot hold it; any failure leaves the previous file intact and
    no temp file, and is a WriteError naming the file, the space needed and the space free (the
    caller adds what to do)."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        if free < len(payload) + (1 << 20):
            raise OSError(28, "No space left on device")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            half = len(payload) // 2
            f.write(payload[:half])
            failpoint(f"write:{path.name}")
            f.write(payload[half:])
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes 0600; results are shared like any file
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as e:
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        space = f"; it needs {_mb(len(payload))}, {_mb(free)} free" if e.errno == 28 else ""
        raise WriteError(f"cannot write {path} ({e.strerror or e}{space}); the previous "
                         f"{path.name}, if any, is intact") from None
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)


def write_json(path: str | Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def writable(folder: Path) -> bool:
    """Can and may this process write here (creating the folder if needed)? A folder with no write
    permission bits is read-only by intent, even for root. The probe is named by pid: torchrun ranks
    probe at once."""
    folder = Path(folder)
    if folder.is_dir() and not folder.stat().st_mode & 0o222:
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """Is process `pid` of this machine still running? (On Windows os.kill would terminate it: ask
    instead.)"""
    if sys.platform == "win32":
        import ctypes

        # PROCESS_QUERY_LIMITED_INFORMATION
        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    try:  # Linux: a killed process not yet reaped by its parent (a zombie) runs no more
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_temp(folder: Path, pattern: str, owner_pid=None) -> list[str]:
    """Delete the temp files matching `pattern` in `folder` that no live process is writing.
    `owner_pid` maps a file name to the pid that writes it (None: the caller holds the folder's
    lock, so every match is stale)."""
    removed = []
    for tmp in Path(folder).glob(pattern):
        pid = owner_pid(tmp.name) if owner_pid else None
        if owner_pid is None or (pid is not None and not pid_alive(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed


def die_with_parent(sig: int) -> None:
    """Have this process receive `sig` when the process that started it dies, even by SIGKILL
    (Linux's PR_SET_PDEATHSIG); nothing elsewhere. Call it in the child: a preexec_fn, or the start
    of a worker."""
    import sys

    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
    except OSError:
        pass
