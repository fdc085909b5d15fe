"""Where the images come from. Each source turns into uint8 arrays (N, 3, 32, 32) + int64 labels for
the train and test splits, and says what it was (provenance): the official `cifar-10-batches-py`
pickles (read through an allow-list, downloaded when missing), an image folder or archive (decoded
once into a cache), or synthetic data (`--dummy`). Nothing here knows about splits, augmentation or
models."""
from __future__ import annotations

import hashlib
import io
import logging
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..downloads import DownloadError, download_url, file_digest, host_reachable
from ..errors import UserError
from . import cache, folders
from .folders import CIFAR_CLASSES, NUM_CLASSES

log = logging.getLogger(__name__)
BATCHES = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
# = torchvision.datasets.CIFAR10.url
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"                          # = CIFAR10.tgz_md5
# the official pickles, not an image archive: unpacked, not decoded
OFFICIAL_ARCHIVE = "cifar-10-python.tar.gz"
HF_REPO = "uoft-cs/cifar10"
HF_FILES = {"train": "plain_text/train-00000-of-00001.parquet",
            "test": "plain_text/test-00000-of-00001.parquet"}
SYNTHETIC = "synthetic"


@dataclass
class DataSource:
    """The train and test images of one source, as uint8 arrays, and what they are."""

    kind: str                      # cifar-batches | image-folder | tar | zip | synthetic
    path: str | None
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...] = CIFAR_CLASSES
    skipped: list[str] = field(default_factory=list)
    sha256: str = ""
    # how faithful the pixels are to the official release: official | lossless copy (PNG) |
    # lossy copy (JPEG) | synthetic
    fidelity: str = ""

    def __post_init__(self) -> None:
        if not self.fidelity:
            self.fidelity = {"cifar-batches": "official", SYNTHETIC: "synthetic"}.get(self.kind,
                                                                                       "")
        if not self.sha256:
            self.sha256 = content_hash(self.train_x, self.train_y, self.test_x, self.test_y,
                                       self.classes)

    @property
    def is_cifar10(self) -> bool:
        """Real CIFAR-10 photos (any format), not synthetic stand-ins."""
        return self.kind != SYNTHETIC

    def provenance(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "name": "CIFAR-10" if self.is_cifar10 else
                "synthetic (--dummy, not CIFAR-10)", "sha256": self.sha256,
                "counts": {"train": int(len(self.train_x)), "test": int(len(self.test_x))},
                "classes": list(self.classes), "skipped_images": len(self.skipped),
                "skipped_examples": self.skipped[:5], "fidelity": self.fidelity}


def content_hash(*parts) -> str:
    """SHA-256 of the decoded arrays and class names: the same images give the same hash in any
    format."""
    h = hashlib.sha256()
    for p in parts:
        h.update(np.ascontiguousarray(p).tobytes() if isinstance(p, np.ndarray)
                 else repr(p).encode())
    return h.hexdigest()


def describe_kind(data_dir: str | Path) -> str:
    """What --data-dir points at: cifar-batches, image-folder, tar, zip, or missing."""
    path = Path(data_dir)
    if folders.is_archive(path):
        return folders.archive_kind(path)
    if batches_folder(path) is not None:
        return "cifar-batches"
    if folders.is_image_folder(path):
        return "image-folder"
    return "missing"


DEFAULT_DATA_DIR = Path("data")  # --data-dir's default, ./data: the one folder downloaded into
# unasked
ACCEPTS = (f"{BATCHES}/ (or the official {OFFICIAL_ARCHIVE}), train/<class>/ and test/<class>/ "
           "image folders, or a .tar.gz, .tgz, .tar or .zip of those")


def open_source(data_dir: str | Path, *, dummy: bool = False, download: bool | None = None,
                cache_dir: str | None = None, skip_bad_images: bool = False) -> DataSource:
    """The source --data-dir names (or synthetic data for --dummy). `download`: True fetches the
    official copy into a folder without CIFAR-10, False never, None (the default) only into the
    default ./data: another path that does not exist is a typo, not a place to download to.
    UserErrors name the file or folder and the fix."""
    if dummy:
        return synthetic_source()
    path = Path(data_dir)
    if download is None:
        download = path == DEFAULT_DATA_DIR
    if not path.exists() and path.name.lower().endswith(folders.ARCHIVE_SUFFIXES):
        raise UserError(f"--data-dir {path}: no such file (a name ending in {path.suffix} is read "
                        "as an archive, not a folder to download into); give the archive's path, "
                        "or a folder")
    if not path.exists() and not download:
        raise UserError(f"--data-dir {path}: no such file or folder; give the folder or archive "
                        f"that holds CIFAR-10, or add --download to fetch it into {path}")
    archive = lone_archive(path)
    if archive is not None:
        log.info(f"--data-dir {path} holds one CIFAR-10 archive, {archive.name}: reading it")
        path = archive
    kind = describe_kind(path)
    if kind in ("tar", "zip", "image-folder"):
        return read_image_source(path, kind, cache_dir, skip_bad_images)
    if kind == "missing":
        if path.is_file():
            raise UserError(f"--data-dir {path} is a file but not a .tar.gz, .tgz, .tar or .zip "
                            "archive")
        if path.is_dir() and not download and not (path / OFFICIAL_ARCHIVE).is_file():
            raise UserError(f"--data-dir {path} holds no CIFAR-10; it takes {ACCEPTS}; or add "
                            f"--download to fetch the official copy into {path}")
        ensure_batches(path, download)
    folder = batches_folder(path)
    train_x, train_y, test_x, test_y = read_batches(folder)
    return DataSource("cifar-batches", str(folder), train_x, train_y, test_x, test_y)


def lone_archive(folder: Path) -> Path | None:
    """The one .tar.gz/.tgz/.tar/.zip in a folder that holds no CIFAR-10 otherwise; a UserError when
    several compete (which one is meant is not for us to guess)."""
    if not folder.is_dir() or batches_folder(folder) is not None or folders.is_image_folder(folder):
        return None
    found = sorted(p for p in folder.iterdir()
                   if folders.is_archive(p) and p.name != OFFICIAL_ARCHIVE)
    if len(found) > 1:
        raise UserError(f"--data-dir {folder} holds {len(found)} archives "
                        f"({', '.join(p.name for p in found[:4])}); pass the one to read")
    return found[0] if found else None


# ----------------------------------------------------------------------- image folders and archives

def read_image_source(path: Path, kind: str, cache_dir: str | None, skip_bad: bool) -> DataSource:
    """Decode a folder or archive of images once; later runs read the cached arrays (well under 2
    s)."""
    fingerprint = cache.source_fingerprint(path)
    cached_at = cache.cache_file(path, fingerprint, cache_dir, skip_bad)
    hit = cache.load_cache(cached_at)
    if hit is not None:
        arrays, meta = hit
        fidelity = meta.get("fidelity") or image_fidelity(
            folders.list_archive(path) if kind in ("tar", "zip") else folders.list_folder(path))
        return DataSource(kind, str(path), arrays["train_x"], arrays["train_y"], arrays["test_x"],
                          arrays["test_y"], tuple(meta["classes"]), meta.get("skipped", []),
                          meta["sha256"], fidelity)
    entries = folders.list_archive(path) if kind in ("tar", "zip") else folders.list_folder(path)
    if not entries:
        raise UserError(f"{path} holds no .png/.jpg images under train/<class>/ and test/<class>/")
    fidelity = image_fidelity(entries)
    arrays, classes, skipped = folders.decode_source(str(path), entries, skip_bad)
    if skipped:
        log.warning(f"skipped {len(skipped)} bad images (--skip-bad-images), e.g. {skipped[0]}")
    source = DataSource(kind, str(path), *arrays["train"], *arrays["test"], classes=classes,
                        skipped=skipped, fidelity=fidelity)
    cache.save_cache(cached_at, {"train_x": source.train_x, "train_y": source.train_y,
                                 "test_x": source.test_x, "test_y": source.test_y},
                     {"classes": list(classes), "skipped": skipped, "sha256": source.sha256,
                      "counts": {"train": len(source.train_x), "test": len(source.test_x)},
                      "source": str(path), "fidelity": fidelity})
    return source


def image_fidelity(entries) -> str:
    """How close an image copy is to the official pixels: JPEG re-encodings lose a few grey levels
    per pixel (the lossy copy this repository's tests use: 3 to 8 on average)."""
    suffixes = {Path(e.name.split(":")[-1]).suffix.lower() for e in entries}
    if suffixes & {".jpg", ".jpeg"}:
        return "lossy copy (JPEG)"
    return "lossless copy (PNG)" if suffixes <= {".png"} else "copy (" + ", ".join(
        sorted(suffixes)) + ")"


# ----------------------------------------------------------------------------- official batches

class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what numpy arrays need, so a foreign file cannot run
    code."""

    _allowed = {("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
                ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("builtins", "list"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"disallowed object {module}.{name}")
        return super().find_class(module, name)


def batches_folder(path: Path) -> Path | None:
    """`path/cifar-10-batches-py`, or `path` itself when it is that folder; None when neither holds
    batches."""
    for folder in (path / BATCHES, path):
        if (folder / "data_batch_1").is_file() or (folder / TEST_FILE).is_file():
            return folder
    return None


def _fix_hint(folder: Path) -> str:
    return f"delete {folder} and run again to re-download (or use --dummy to test without data)"


def read_batch_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file as uint8 images (N, 3, 32, 32) and int64 labels, validated."""
    hint = _fix_hint(path.parent)
    if not path.is_file():
        raise UserError(f"CIFAR-10 file {path} is missing: {hint}")
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # truncated, not a pickle, foreign objects: all the same fix
        raise UserError(f"CIFAR-10 file {path} is unreadable ({type(e).__name__}: {e}): "
                        f"{hint}") from None
    if not isinstance(entry, dict):
        raise UserError(f"CIFAR-10 file {path} does not hold a batch dict: {hint}")
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels", entry.get(b"fine_labels")))
    if data is None or labels is None:
        raise UserError(f"CIFAR-10 file {path} lacks 'data' or 'labels': {hint}")
    data, labels = np.asarray(data), np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise UserError(f"CIFAR-10 file {path} has data of shape {data.shape} {data.dtype}, "
                        f"expected (N, 3072) uint8: {hint}")
    if labels.shape != (data.shape[0],):
        raise UserError(f"CIFAR-10 file {path} has {labels.size} labels for {data.shape[0]} "
                        f"images: {hint}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise UserError(f"CIFAR-10 file {path} has a label outside 0..9 "
                        f"(min {labels.min()}, max {labels.max()}): {hint}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_batches(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A `cifar-10-batches-py` folder (any number of images per batch): train x, y, test x, y."""
    parts = [read_batch_file(folder / name) for name in TRAIN_FILES]
    test_x, test_y = read_batch_file(folder / TEST_FILE)
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), test_x,
            test_y)


def write_batches(data_dir: str | Path, train_x: np.ndarray, train_y: np.ndarray,
                  test_x: np.ndarray, test_y: np.ndarray) -> Path:
    """Write arrays (N, 3, 32, 32) uint8 as a `cifar-10-batches-py` folder, the official layout."""
    folder = Path(data_dir) / BATCHES
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, x: np.ndarray, y: np.ndarray) -> None:
        entry = {b"batch_label": name.encode(), b"labels": [int(v) for v in y],
                 b"data": np.ascontiguousarray(x, dtype=np.uint8).reshape(len(x), -1),
                 b"filenames": [f"{i}.png".encode() for i in range(len(x))]}
        tmp = folder / (name + ".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        tmp.replace(folder / name)

    for name, idx in zip(TRAIN_FILES, np.array_split(np.arange(len(train_x)), len(TRAIN_FILES))):
        dump(name, train_x[idx], train_y[idx])
    dump(TEST_FILE, test_x, test_y)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR_CLASSES]}, f, protocol=2)
    return folder


def download_official(data_dir: Path, url: str | None = None, md5: str | None = None) -> None:
    url, md5 = url or CIFAR_URL, md5 or CIFAR_MD5
    archive = download_url(url, data_dir / OFFICIAL_ARCHIVE)
    if md5 and file_digest(archive, "md5") != md5:
        archive.unlink()
        raise DownloadError(f"{url}: checksum mismatch (incomplete download)")
    unpack_official(archive, data_dir)
    archive.unlink()


def unpack_official(archive: Path, data_dir: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(data_dir, filter="data")


def parquet_to_arrays(frame) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the Hugging Face copy ({'img': {'bytes': png}, 'label': int}) -> uint8 (N,3,32,32),
    labels."""
    from PIL import Image

    images = [np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB"))
              for cell in frame["img"]]
    return np.stack(images).transpose(0, 3, 1, 2).copy(), frame["label"].to_numpy(dtype=np.int64)


def download_huggingface(data_dir: Path) -> None:
    import pandas as pd
    from huggingface_hub import hf_hub_download

    arrays = {}
    for split, filename in HF_FILES.items():
        path = hf_hub_download(HF_REPO, filename, repo_type="dataset")
        try:
            arrays[split] = parquet_to_arrays(pd.read_parquet(path))
        except ImportError as e:  # pandas reads parquet through pyarrow
            raise DownloadError(f"reading the Hugging Face copy needs pyarrow ({e}); pip "
                                "install pyarrow") from e
    write_batches(data_dir, *arrays["train"], *arrays["test"])


def ensure_batches(data_dir: Path, download: bool) -> Path:
    """Make sure `<data_dir>/cifar-10-batches-py` exists: download it (official server, then the
    Hugging Face copy) or raise a UserError naming the folder, within seconds when offline."""
    folder = data_dir / BATCHES
    if batches_folder(data_dir) is not None:
        return folder
    by_hand = (f"download {CIFAR_URL} and unpack it so that {folder}/data_batch_1 exists, or pass "
               "--data-dir an image folder (train/<class>/*.png, test/<class>/*.png) or an "
               "archive of one")
    official = data_dir / OFFICIAL_ARCHIVE
    if official.is_file():  # downloaded by hand into the folder
        if file_digest(official, "md5") != CIFAR_MD5:
            raise UserError(f"{official} is not the official CIFAR-10 archive (its MD5 differs: an "
                            "incomplete download?); delete it to download it again")
        log.info(f"unpacking {official} into {data_dir}")
        unpack_official(official, data_dir)
        return folder
    if not download:
        raise UserError(f"CIFAR-10 not found in {data_dir} and --no-download is set: {by_hand}")
    errors = []
    for name, fetch, probe in (("official server", download_official, CIFAR_URL),
                               ("Hugging Face copy", download_huggingface,
                                "https://huggingface.co")):
        if not host_reachable(probe):
            errors.append(f"{name}: unreachable")
            continue
        log.info(f"downloading CIFAR-10 ({name}) into {data_dir} ...")
        try:
            fetch(data_dir)
        except Exception as e:  # any failure moves on to the next source; all are reported below
            errors.append(f"{name}: {e}")
            continue
        if batches_folder(data_dir) is not None:
            return folder
    raise UserError(f"could not download CIFAR-10 ({'; '.join(errors)}); {by_hand}")


# ----------------------------------------------------------------------------- synthetic

def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable but not trivial CIFAR-shaped images: a colour shared by two classes, stripes of a
    class's own orientation and frequency, and noise, so a model must read the pixels to beat chance
    (misaligned labels are caught) and short runs do not saturate (best-epoch logic gets tested).
    Built from uint8 pieces (8 stripe phases per class, a bank of 2,048 noise patterns): 60,000
    images in well under a second."""
    look = np.random.default_rng(20_240_610)  # what each class looks like: the same for every seed
    # classes share colours in pairs (0-1, 2-3, ...): colour alone gets 50%, the stripes tell the
    # pair apart
    palette = np.repeat(look.random((NUM_CLASSES // 2, 1, 3, 1, 1)) * 0.5 + 0.25, 2, axis=0)
    angle = (np.arange(NUM_CLASSES) * (np.pi / NUM_CLASSES)).reshape(-1, 1, 1, 1, 1)
    freq = (0.35 + 0.25 * (np.arange(NUM_CLASSES) % 3)).reshape(-1, 1, 1, 1, 1)
    phase = (np.arange(8) * (2 * np.pi / 8)).reshape(1, -1, 1, 1, 1)
    yy, xx = np.meshgrid(np.arange(32.0), np.arange(32.0), indexing="ij")
    # (10, 8, 1, 32, 32)
    stripes = np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    # (10, 8, 3, 32, 32)
    base = np.clip((palette + 0.15 * stripes) * 255, 20, 215).round().astype(np.uint8)
    bank = np.clip(look.normal(20, 12, (2048, 3, 32, 32)), 0, 40).round().astype(np.uint8)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % NUM_CLASSES)
    images = base[labels, rng.integers(0, 8, n)]
    images += bank[rng.integers(0, len(bank), n)]  # <= 255: base tops at 215, noise at 40
    images -= 20                                   # >= 0: base starts at 20
    # a 4-pixel stamp of (seed, index) in the top-left red channel: no two images are
    # pixel-identical, so a test can find leaks between sets by content
    images[:, 0, 0, :4] = np.stack([np.full(n, seed % 256), np.arange(n) >> 16 & 255,
                                    np.arange(n) >> 8 & 255, np.arange(n) & 255],
                                   1).astype(np.uint8)
    return images, labels.astype(np.int64)


def synthetic_source(n_train: int = 50_000, n_test: int = 10_000) -> DataSource:
    """CIFAR-10's sizes, so a --dummy epoch takes as long as a real one. Never called CIFAR-10."""
    train_x, train_y = synthetic_images(n_train, seed=1)
    test_x, test_y = synthetic_images(n_test, seed=9)
    return DataSource(SYNTHETIC, None, train_x, train_y, test_x, test_y,
                      classes=tuple(f"class {i}" for i in range(NUM_CLASSES)))

