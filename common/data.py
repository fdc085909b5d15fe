"""CIFAR-10: download, a validating reader of the `cifar-10-batches-py` format, splits, synthetic data,
and the CPU (DataLoader) training pipeline. Importing this module does nothing."""
from __future__ import annotations

import hashlib
import io
import pickle
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .downloads import DownloadError, download_url, host_reachable
from .errors import UserError

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = len(CIFAR_CLASSES)
# One normalisation for all four runs: the ImageNet statistics both pretrained models expect.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  # = torchvision.datasets.CIFAR10.url
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"                          # = CIFAR10.tgz_md5
HF_REPO = "uoft-cs/cifar10"
HF_FILES = {"train": "plain_text/train-00000-of-00001.parquet", "test": "plain_text/test-00000-of-00001.parquet"}


@dataclass
class Splits:
    """uint8 images (N, 3, 32, 32) and int64 labels of train / val / test."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    val_is_test: bool = False


# ----------------------------------------------------------------------------- reading

class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what numpy arrays need, so a foreign file cannot run code."""

    _allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("builtins", "list"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"disallowed object {module}.{name}")
        return super().find_class(module, name)


def _fix_hint(folder: Path) -> str:
    return f"delete {folder} and run again to re-download (or use --dummy to test without data)"


def read_batch_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR batch file into uint8 images (N, 3, 32, 32) and int64 labels, validating both."""
    hint = _fix_hint(path.parent)
    if not path.is_file():
        raise UserError(f"CIFAR-10 file {path} is missing: {hint}")
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # truncated, not a pickle, foreign objects: all the same fix
        raise UserError(f"CIFAR-10 file {path} is unreadable ({type(e).__name__}: {e}): {hint}") from None
    if not isinstance(entry, dict):
        raise UserError(f"CIFAR-10 file {path} does not hold a batch dict: {hint}")
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels", entry.get(b"fine_labels")))
    if data is None or labels is None:
        raise UserError(f"CIFAR-10 file {path} lacks 'data' or 'labels': {hint}")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise UserError(f"CIFAR-10 file {path} has data of shape {data.shape} {data.dtype}, "
                        f"expected (N, 3072) uint8: {hint}")
    if labels.shape != (data.shape[0],):
        raise UserError(f"CIFAR-10 file {path} has {labels.size} labels for {data.shape[0]} images: {hint}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise UserError(f"CIFAR-10 file {path} has a label outside 0..9 "
                        f"(min {labels.min()}, max {labels.max()}): {hint}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar_folder(data_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read `<data_dir>/cifar-10-batches-py` (any number of images per batch): train x, y, test x, y."""
    folder = Path(data_dir) / FOLDER
    parts = [read_batch_file(folder / name) for name in TRAIN_FILES]
    test_x, test_y = read_batch_file(folder / TEST_FILE)
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    return (torch.from_numpy(train_x), torch.from_numpy(train_y),
            torch.from_numpy(test_x), torch.from_numpy(test_y))


def write_cifar_folder(data_dir: str | Path, train_x: np.ndarray, train_y: np.ndarray,
                       test_x: np.ndarray, test_y: np.ndarray) -> Path:
    """Write arrays (N, 3, 32, 32) uint8 as a `cifar-10-batches-py` folder, the official layout."""
    folder = Path(data_dir) / FOLDER
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


# ----------------------------------------------------------------------------- download

def cifar_present(data_dir: str | Path) -> bool:
    folder = Path(data_dir) / FOLDER
    return all((folder / n).is_file() for n in (*TRAIN_FILES, TEST_FILE))


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_official(data_dir: Path, url: str | None = None, md5: str | None = None) -> None:
    url, md5 = url or CIFAR_URL, md5 or CIFAR_MD5
    archive = download_url(url, data_dir / "cifar-10-python.tar.gz")
    if md5 and _md5(archive) != md5:
        archive.unlink()
        raise DownloadError(f"{url}: checksum mismatch (incomplete download)")
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(data_dir, filter="data")
    archive.unlink()


def _parquet_to_arrays(frame) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the Hugging Face copy ({'img': {'bytes': png}, 'label': int}) -> uint8 (N,3,32,32), labels."""
    from PIL import Image

    images = [np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB")) for cell in frame["img"]]
    return np.stack(images).transpose(0, 3, 1, 2).copy(), frame["label"].to_numpy(dtype=np.int64)


def _download_huggingface(data_dir: Path) -> None:
    import pandas as pd
    from huggingface_hub import hf_hub_download

    arrays = {}
    for split, filename in HF_FILES.items():
        path = hf_hub_download(HF_REPO, filename, repo_type="dataset")
        try:
            arrays[split] = _parquet_to_arrays(pd.read_parquet(path))
        except ImportError as e:  # pandas reads parquet through pyarrow
            raise DownloadError(f"reading the Hugging Face copy needs pyarrow ({e}); pip install pyarrow") from e
    write_cifar_folder(data_dir, *arrays["train"], *arrays["test"])


def ensure_cifar(data_dir: str | Path, download: bool, quiet: bool = False) -> Path:
    """Make sure `<data_dir>/cifar-10-batches-py` exists: download it (official server, then the
    Hugging Face copy) or raise a UserError naming the folder, within seconds when offline."""
    data_dir = Path(data_dir)
    folder = data_dir / FOLDER
    if cifar_present(data_dir):
        return folder
    by_hand = (f"download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and unpack it so that "
               f"{folder}/data_batch_1 exists (or pass --data-dir to where it is)")
    if not download:
        raise UserError(f"CIFAR-10 not found in {folder} and --no-download is set: {by_hand}")
    say = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    errors = []
    for name, fetch, probe in (("official server", _download_official, CIFAR_URL),
                               ("Hugging Face copy", _download_huggingface, "https://huggingface.co")):
        if not host_reachable(probe):
            errors.append(f"{name}: unreachable")
            continue
        say(f"downloading CIFAR-10 ({name}) into {data_dir} ...")
        try:
            fetch(data_dir)
        except Exception as e:  # any failure moves on to the next source; all are reported below
            errors.append(f"{name}: {e}")
            continue
        if cifar_present(data_dir):
            return folder
    raise UserError(f"could not download CIFAR-10 ({'; '.join(errors)}); {by_hand}")


# ----------------------------------------------------------------------------- splits

def synthetic_cifar(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable CIFAR-shaped data: each class has its own colour and stripe orientation/frequency,
    plus noise. A model must read the pixels to beat chance, so misaligned labels are caught."""
    classes = torch.Generator().manual_seed(20_240_610)  # what each class looks like: the same for every seed
    palette = torch.rand(NUM_CLASSES, 3, 1, 1, generator=classes) * 0.6 + 0.2
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    labels = labels[torch.randperm(n, generator=g)]
    angle = torch.arange(NUM_CLASSES) * (torch.pi / NUM_CLASSES)
    freq = 0.35 + 0.25 * (torch.arange(NUM_CLASSES) % 3)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    phase = torch.rand(n, 1, 1, generator=g) * 6.28
    a, f = angle[labels].view(-1, 1, 1), freq[labels].view(-1, 1, 1)
    stripes = torch.sin(f * (xx * torch.cos(a) + yy * torch.sin(a)) + phase)  # (n, 32, 32)
    img = palette[labels] + 0.18 * stripes.unsqueeze(1) + 0.08 * torch.randn(n, 3, 32, 32, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels.long()


def stratified_split(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): `val_size` images held out in proportion to each class, fixed by `seed`."""
    g = torch.Generator().manual_seed(seed + 7919)
    classes, counts = labels.unique(return_counts=True)
    quota = torch.floor(counts.double() * val_size / len(labels)).long()
    for i in torch.argsort(counts, descending=True)[: val_size - int(quota.sum())]:
        quota[i] += 1  # largest classes absorb the rounding remainder
    val_parts = []
    for c, q in zip(classes, quota):
        idx = torch.nonzero(labels == c).flatten()
        val_parts.append(idx[torch.randperm(len(idx), generator=g)[: int(q)]])
    val = torch.cat(val_parts).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[val] = False
    return torch.nonzero(mask).flatten(), val


def load_splits(data_dir: str, download: bool, dummy: bool, val_size: int, train_subset: int,
                seed: int, quiet: bool = False, test_subset: int = 0) -> Splits:
    """Train / val / test tensors as the config asks: val held out of train (stratified) unless
    val_size is 0, then the training images optionally cut to `train_subset`."""
    if dummy:  # CIFAR-10's sizes, so a --dummy epoch takes as long as a real one
        parts = [synthetic_cifar(10_000, seed=1 + i) for i in range(5)]
        train_x, train_y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        test_x, test_y = synthetic_cifar(10_000, seed=9)
    else:
        ensure_cifar(data_dir, download, quiet=quiet)
        train_x, train_y, test_x, test_y = read_cifar_folder(data_dir)
    if val_size >= len(train_x):
        raise UserError(f"--val-size {val_size} leaves no training images (the training set has {len(train_x)})")
    if val_size > 0:
        train_idx, val_idx = stratified_split(train_y, val_size, seed)
        val_x, val_y = train_x[val_idx], train_y[val_idx]
        train_x, train_y = train_x[train_idx], train_y[train_idx]
    if test_subset:
        test_x, test_y = test_x[:test_subset], test_y[:test_subset]
    if val_size == 0:
        val_x, val_y = test_x, test_y
    if train_subset:
        keep = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed + 104729))[:train_subset]
        train_x, train_y = train_x[keep.sort().values], train_y[keep.sort().values]
    return Splits(train_x, train_y, val_x, val_y, test_x, test_y, val_is_test=val_size == 0)


# ----------------------------------------------------------------------------- batching

def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's sample order for `epoch`: a function of (seed, epoch) alone, so a resumed run
    sees the same batches. Each rank gets an equal-length shard."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    per_rank = n // world
    return order[rank::world][:per_rank]


def batches_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Training steps per epoch (a last partial batch is dropped: BatchNorm dislikes tiny batches)."""
    return max(1, (n // world) // (batch_size // world))


def normalize_batch(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> normalised with the shared mean/std."""
    mean = torch.tensor(MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def eval_batch(x_uint8: torch.Tensor, img_size: int) -> torch.Tensor:
    """The eval transform, batched: upsample to img_size (bilinear, as torchvision's Resize) and normalise."""
    x = normalize_batch(x_uint8.float().div_(255))  # commutes with bilinear resizing; cheaper at 32x32
    if x.shape[-1] != img_size:
        x = torch.nn.functional.interpolate(x, size=(img_size, img_size), mode="bilinear",
                                            align_corners=False, antialias=x.shape[-1] > img_size)
    return x


def cpu_train_transform(img_size: int, crop_scale_min: float, randaug_ops: int, randaug_magnitude: int):
    """The reference train transform on one uint8 image: RandAugment at 32x32 (cheap), then
    RandomResizedCrop straight to img_size (the single upsample), flip, normalise."""
    from torchvision.transforms import v2

    steps = []
    if randaug_ops:
        steps.append(v2.RandAugment(num_ops=randaug_ops, magnitude=randaug_magnitude))
    steps += [v2.RandomResizedCrop(img_size, scale=(crop_scale_min, 1.0), antialias=True),
              v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(steps)


class AugmentedImages(Dataset):
    """uint8 image tensor + labels with a per-image transform (the DataLoader-worker path)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


class OrderSampler(Sampler[int]):
    """Yields a given index order; set per epoch (and per resume point) by the training loop."""

    def __init__(self) -> None:
        self.order = torch.empty(0, dtype=torch.long)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order.tolist())

    def __len__(self) -> int:
        return len(self.order)


def _seed_worker(worker_id: int) -> None:
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class TrainStream:
    """What both training pipelines share: this rank's share of the batch and the steps per epoch.
    Their randomness is a function of (seed, epoch), so they carry no RNG state of their own."""

    name = ""

    def __init__(self, n: int, cfg, device: torch.device, rank: int, world: int):
        self.n, self.seed, self.rank, self.world = n, cfg.seed, rank, world
        self.local_batch = cfg.batch_size // world
        self.device = device

    def __len__(self) -> int:
        return batches_per_epoch(self.n, self.local_batch * self.world, self.world)


class CpuTrainStream(TrainStream):
    """Training batches from DataLoader workers: per-image torchvision transforms, pinned memory."""

    name = "cpu"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg, device: torch.device,
                 rank: int = 0, world: int = 1):
        super().__init__(len(images), cfg, device, rank, world)
        self.sampler = OrderSampler()
        workers = cfg.num_workers
        transform = cpu_train_transform(cfg.img_size, cfg.crop_scale_min, cfg.randaug_ops, cfg.randaug_magnitude)
        self.loader = DataLoader(
            AugmentedImages(images, labels, transform), batch_size=self.local_batch, sampler=self.sampler,
            drop_last=True, num_workers=workers, pin_memory=device.type == "cuda",
            # workers restart each epoch, seeded per epoch (below): a resumed run augments identically
            persistent_workers=False, worker_init_fn=_seed_worker,
            prefetch_factor=4 if workers > 0 else None)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of `epoch` from step `start_step` on, already on the device."""
        order = epoch_order(self.n, self.seed, epoch, self.rank, self.world)
        self.sampler.order = order[start_step * self.local_batch: len(self) * self.local_batch]
        # the workers' base seed comes from this generator, not the global RNG that a resume restores
        self.loader.generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 31 + self.rank)
        for x, y in self.loader:
            yield (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))


def make_train_stream(splits: Splits, cfg, device: torch.device, rank: int = 0, world: int = 1):
    """The training batch source the config asks for: DataLoader workers (cpu) or on-device (gpu)."""
    pipeline = cfg.data_pipeline
    if pipeline == "auto":
        pipeline = "gpu" if device.type == "cuda" else "cpu"
    if pipeline == "gpu":
        from .gpu_data import GpuTrainStream

        return GpuTrainStream(splits.train_x, splits.train_y, cfg, device, rank, world)
    return CpuTrainStream(splits.train_x, splits.train_y, cfg, device, rank, world)
