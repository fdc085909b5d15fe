"""CIFAR-10 as image files: a folder holding train/<class>/*.png|jpg and test/<class>/*, or a
.tar.gz, .tgz, .tar or .zip of such a folder. Lists, checks and decodes them (in parallel) into
uint8 arrays.

No torch here: worker processes import this module alone. Archives are read in memory, never
unpacked, so a member that would escape the folder (../, an absolute path, a link) is refused before
anything is read."""
from __future__ import annotations

import io
import logging
import os
import sys
import tarfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import numpy as np

from ..errors import UserError
from ..faults import failpoint

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")
NUM_CLASSES = len(CIFAR_CLASSES)  # the one place: synthetic data and the official batches have ten
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
SPLITS = ("train", "test")
SKIP_HINT = "fix or delete it, or pass --skip-bad-images to train without such files"
log = logging.getLogger(__name__)


@dataclass
class ImageEntry:
    """One image of the source: where it is shown to the user, its split and class, its bytes or
    file."""

    # path as the user sees it: folder/train/cat/0001.png or archive.zip:train/cat/0001.png
    name: str
    split: str
    cls: str
    data: bytes | None = None
    path: str | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as f:
            return f.read()


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_kind(path: Path) -> str:
    return "zip" if path.name.lower().endswith(".zip") else "tar"


def is_image_folder(path: Path) -> bool:
    """A folder with train/ or test/ (or one folder inside that has them): read as an image folder,
    whose checks then name whatever is missing."""
    if image_root(path) is not None:
        return True
    return path.is_dir() and any((path / s).is_dir() for s in SPLITS)


def image_root(path: Path) -> Path | None:
    if not path.is_dir():
        return None
    if all((path / s).is_dir() for s in SPLITS):
        return path
    inner = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(inner) == 1 and all((inner[0] / s).is_dir() for s in SPLITS):
        return inner[0]
    return None


# ----------------------------------------------------------------------------- listing

def list_folder(root: Path) -> list[ImageEntry]:
    """Every image under root/{train,test}/<class>/, sorted; a UserError when the layout is
    wrong."""
    base = image_root(root)
    if base is None:
        missing = [s for s in SPLITS if not (root / s).is_dir()]
        raise UserError(f"{root} has no {' or '.join(s + '/' for s in missing)} folder: an "
                        "image-folder copy of CIFAR-10 holds train/<class>/*.png and "
                        "test/<class>/*.png (JPEG works too)")
    entries = []
    for split in SPLITS:
        for cls_dir in sorted(p for p in (base / split).iterdir()
                              if p.is_dir() and not p.name.startswith(".")):
            for f in sorted(cls_dir.iterdir()):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    entries.append(ImageEntry(str(f), split, cls_dir.name, path=str(f)))
    return entries


def _safe_member(archive: Path, name: str, is_file: bool, is_link: bool) -> PurePosixPath | None:
    """The member's path inside the archive, or a UserError when it could escape the folder."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":") or is_link:
        raise UserError(f"{archive} holds a member that escapes its folder ({name!r}: "
                        f"{'a link' if is_link else 'an absolute path or ..'}); refusing to read "
                        "this archive")
    return p if is_file else None


def _iter_archive(archive: Path) -> Iterator[tuple[PurePosixPath, bytes]]:
    try:
        if archive_kind(archive) == "zip":
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    mode = (info.external_attr >> 16) & 0o170000
                    p = _safe_member(archive, info.filename, not info.is_dir(), mode == 0o120000)
                    if p is not None and p.suffix.lower() in IMAGE_SUFFIXES:
                        yield p, z.read(info)
        else:
            with tarfile.open(archive, "r:*") as tar:
                for m in tar:
                    p = _safe_member(archive, m.name, m.isfile(), m.issym() or m.islnk())
                    if p is not None and p.suffix.lower() in IMAGE_SUFFIXES:
                        yield p, tar.extractfile(m).read()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise UserError(f"{archive} is not a readable archive ({type(e).__name__}: {e}); "
                        f"download it again") from None


def list_archive(archive: Path) -> list[ImageEntry]:
    """Every image of a .tar(.gz)/.zip of an image folder, read into memory (a single top folder is
    fine)."""
    members = list(_iter_archive(archive))
    if not members:
        raise UserError(f"{archive} holds no .png/.jpg images; expected train/<class>/*.png and "
                        "test/<class>/*.png")
    tops = {p.parts[0] for p, _ in members}
    strip = 1 if len(tops) == 1 and next(iter(tops)) not in SPLITS else 0
    entries = []
    for p, data in members:
        parts = p.parts[strip:]
        if len(parts) == 3 and parts[0] in SPLITS:
            entries.append(ImageEntry(f"{archive}:{p}", parts[0], parts[1], data=data))
    if not entries or {e.split for e in entries} != set(SPLITS):
        found = sorted({p.parts[strip] for p, _ in members if len(p.parts) > strip})
        raise UserError(f"{archive} does not hold train/<class>/ and test/<class>/ image folders "
                        f"(top-level entries: {', '.join(found[:6])}); repack it in that layout")
    entries.sort(key=lambda e: (SPLITS.index(e.split), e.cls, e.name))
    return entries


def class_order(names: set[str]) -> tuple[str, ...]:
    """CIFAR-10's official label order when the folders are its ten classes (any case), else
    sorted."""
    lowered = {n.lower(): n for n in names}
    if set(lowered) == set(CIFAR_CLASSES) and len(lowered) == len(names):
        return tuple(lowered[c] for c in CIFAR_CLASSES)
    return tuple(sorted(names))


def check_classes(source: str, entries: list[ImageEntry]) -> tuple[str, ...]:
    """Class names shared by both splits, in label order; a UserError naming what differs."""
    per_split = {s: {e.cls for e in entries if e.split == s} for s in SPLITS}
    for s in SPLITS:
        if not per_split[s]:
            raise UserError(f"{source}: {s}/ holds no class folders with .png/.jpg images")
    if per_split["train"] != per_split["test"]:
        only_train = sorted(per_split["train"] - per_split["test"])
        only_test = sorted(per_split["test"] - per_split["train"])
        raise UserError(f"{source}: class folders differ between train/ and test/ (only in train: "
                        f"{', '.join(only_train) or '-'}; only in test: "
                        f"{', '.join(only_test) or '-'}); give both splits the same class folders")
    if len(per_split["train"]) < 2:
        raise UserError(f"{source}: found a single class folder "
                        f"({next(iter(per_split['train']))}); a classifier needs at least two")
    return class_order(per_split["train"])


# ----------------------------------------------------------------------------- decoding

def decode_one(data: bytes) -> tuple[np.ndarray | None, str]:
    """(32x32x3 uint8, '') or (None, why): a corrupt file, or the size it has instead of 32x32."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size != (32, 32):
                return None, f"size {im.size[0]}x{im.size[1]}"
            return np.asarray(im.convert("RGB")), ""
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return None, f"unreadable ({type(e).__name__}: {e})"


def _decode_chunk(items: list[tuple[str, bytes | None,
                                    str | None]]) -> list[tuple[np.ndarray | None, str]]:
    out = []
    for name, data, path in items:
        if data is None:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                out.append((None, f"unreadable ({e.strerror or e})"))
                continue
        out.append(decode_one(data))
    return out


def _die_with_parent() -> None:
    """A decode worker ends when the process that started it is killed (Linux): no orphans holding
    its pipes; a Ctrl+C at the terminal is the main process's to handle, not each worker's."""
    import signal

    from ..files import die_with_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)


def decode_entries(entries: list[ImageEntry], workers: int,
                   progress: Callable[[int], None] | None = None,
                   chunk: int = 1000) -> list[tuple[np.ndarray | None, str]]:
    """Decode every entry, in `workers` processes when there are many (results in entry order)."""
    items = [(e.name, e.data, e.path) for e in entries]
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    results: list[tuple[np.ndarray | None, str]] = []
    if workers <= 1 or len(items) < 2 * chunk:
        parts = map(_decode_chunk, chunks)
    else:
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent)
        parts = pool.map(_decode_chunk, chunks)
    try:
        for i, (c, part) in enumerate(zip(chunks, parts)):
            results += part
            if progress:
                progress(len(c))
            if i == len(chunks) // 2:
                failpoint("decode")
    finally:
        if workers > 1 and len(items) >= 2 * chunk:
            pool.shutdown(cancel_futures=True)
    return results


def decode_source(source: str, entries: list[ImageEntry], skip_bad: bool, workers: int | None = None
                  ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[str, ...], list[str]]:
    """{split: (uint8 (N,3,32,32), int64 labels)}, the class names in label order, and the skipped
    files."""
    classes = check_classes(source, entries)
    label = {c: i for i, c in enumerate(classes)}
    workers = workers or os.cpu_count() or 1
    from ..progress import Progress

    start = time.monotonic()
    log.info(f"decoding {len(entries)} images of {source} with {workers} processes (once: later "
             "runs read the cache)")
    bar = Progress(len(entries), "decoding", unit="image", every_s=10,
                   enabled=log.isEnabledFor(logging.INFO))
    decoded = decode_entries(entries, workers, bar.advance)
    bar.close()
    log.info(f"decoded {len(entries)} images in {time.monotonic() - start:.1f} s")
    bad = [(e.name, why) for e, (img, why) in zip(entries, decoded) if img is None]
    wrong_size = [b for b in bad if b[1].startswith("size")]
    if wrong_size and not skip_bad:
        name, why = wrong_size[0]
        raise UserError(f"{name} is {why[5:]}, not 32x32 (the first of {len(wrong_size)} such "
                        "images); CIFAR-10 images are 32x32: point --data-dir at an unresized "
                        "copy")
    if bad and not skip_bad:
        name, why = bad[0]
        raise UserError(f"{name} is {why} (the first of {len(bad)} bad images); {SKIP_HINT}")
    arrays = {}
    for split in SPLITS:
        keep = [(img, label[e.cls]) for e, (img, _) in zip(entries, decoded)
                if e.split == split and img is not None]
        if not keep:
            raise UserError(f"{source}: no readable images in {split}/")
        x = np.stack([k[0] for k in keep]).transpose(0, 3, 1, 2).copy()
        arrays[split] = (x, np.array([k[1] for k in keep], dtype=np.int64))
    return arrays, classes, [f"{n} ({why})" for n, why in bad]
