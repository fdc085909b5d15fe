"""Training batches, epoch by epoch: the sample order (a function of seed and epoch alone) and the
two pipelines that augment it, DataLoader workers on the CPU or batched ops on the device. Both can
start in the middle of an epoch and then produce exactly the batches an uninterrupted run would have
seen."""
from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from ..transfer import to_device
from .augment import Recipe, cpu_train_transform
from .device_ops import make_device_augment


# The seeds below mix (seed, epoch, position or chunk, rank) with large prime multipliers: every
# combination a run can reach (epochs < 100,003, positions < 10,000,019) maps to its own generator
# seed, so seed s at epoch e+1 never replays seed s+1 at epoch e.


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's sample order: a function of (seed, epoch) alone, so a resumed run sees the same
    batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of one sample: its place in the epoch, not the worker or rank that
    draws it."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + position) % (2**63 - 1)


class TrainStream:
    """This rank's share of each epoch: `steps` batches of `local_batch` from the global order,
    positions rank, rank + world, ... With drop_last (the default) a last partial batch is dropped
    (BatchNorm dislikes tiny batches); without it, the last batch is the remainder (one process
    only: ranks must take equal steps)."""

    name = ""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device, rank: int = 0,
                 world: int = 1, drop_last: bool = True, multiple_of: int = 1):
        self.n, self.seed, self.device, self.rank, self.world = n, seed, device, rank, world
        self.local_batch = batch_size // world
        self.drop_last = drop_last
        steps = (n // world) // self.local_batch if drop_last else -(-n // self.local_batch)
        # whole accumulation groups only: the images of an epoch are those of batch x accumulation
        # steps
        self.steps = max(multiple_of, steps // multiple_of * multiple_of)

    def __len__(self) -> int:
        return self.steps

    def positions(self, start_step: int = 0) -> torch.Tensor:
        """Positions in the epoch order of this rank's samples from `start_step` on."""
        mine = torch.arange(self.rank, self.n, self.world)[: self.steps * self.local_batch]
        return mine[start_step * self.local_batch:]


class _Positions(Sampler):
    """Yields (image index, augmentation seed) for the epoch's positions (set by the stream per
    epoch)."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int]] = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class _SeededImages(Dataset):
    """uint8 images + labels; each item is augmented under its own seed, so a worker's history does
    not matter."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        # --num-workers 0: leave the training loop's RNGs as they were
        in_main = get_worker_info() is None
        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if in_main else None
        try:
            random.seed(seed)                 # timm's RandAugment, crop and erasing draw from
                                              # random / numpy,
            np.random.seed(seed % 2**32)      # torchvision's from torch's CPU generator
                                              # (torch.manual_seed
            # would also queue a CUDA seeding, 2 ms a call)
            torch.default_generator.manual_seed(seed)
            return self.transform(self.images[index]), self.labels[index]
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


def ignore_interrupts(worker_id: int = 0) -> None:
    """A DataLoader worker leaves Ctrl+C and SIGTERM to the training process: the terminal sends
    SIGINT to the whole process group, and a worker that took it would print the stop line again
    (the trainer's handler, inherited) or die in the middle of a batch."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class CpuTrainStream(TrainStream):
    """Batches from DataLoader workers: timm's / torchvision's per-image transforms, pinned memory.
    The same batches for any --num-workers, and from any resume point."""

    name = "cpu"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe, img_size: int,
                 batch_size: int, seed: int, num_workers: int, device: torch.device, rank: int = 0,
                 world: int = 1, drop_last: bool = True, multiple_of: int = 1):
        super().__init__(len(images), batch_size, seed, device, rank, world, drop_last, multiple_of)
        self.sampler = _Positions()
        self.loader = DataLoader(
            _SeededImages(images, labels, cpu_train_transform(recipe, img_size)),
            batch_size=self.local_batch, sampler=self.sampler, drop_last=drop_last,
            num_workers=num_workers, pin_memory=device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if num_workers > 0 else None,
            worker_init_fn=ignore_interrupts if num_workers > 0 else None)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of `epoch` from step `start_step` on, already on the device."""
        order = epoch_order(self.n, self.seed, epoch)
        pos = self.positions(start_step)
        self.sampler.items = [(int(order[p]), sample_seed(self.seed, epoch, int(p))) for p in pos]
        # the loader draws a base seed for its workers; from its own generator, not the global RNG
        # that a mid-epoch resume restores (our per-sample seeds make the base seed irrelevant
        # otherwise)
        self.loader.generator = torch.Generator().manual_seed(epoch)
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class DeviceTrainStream(TrainStream):
    """Batches gathered and augmented on the device; the whole split stays resident as uint8 (150
    MB).

    Random choices for a chunk of batches are drawn on the CPU from a generator seeded by (seed,
    epoch, chunk, rank), so a run resumed mid-epoch augments exactly as an uninterrupted one. Chunks
    amortise the per-op launches of small images; at large sizes a chunk is one batch (the ops are
    big enough alone)."""

    name = "device"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe, img_size: int,
                 batch_size: int, seed: int, device: torch.device, rank: int = 0, world: int = 1,
                 drop_last: bool = True, multiple_of: int = 1, chunk_batches: int = 0):
        super().__init__(len(images), batch_size, seed, device, rank, world, drop_last, multiple_of)
        self.images = images.to(device, non_blocking=True).contiguous()
        self.labels = labels.to(device, non_blocking=True)
        self.augment = make_device_augment(recipe, img_size)
        self.chunk = chunk_batches or default_chunk(recipe, img_size)
        self.gen = torch.Generator()

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(self.n, self.seed, epoch)
        mine = to_device(order[self.positions(0)], self.device)
        b, steps = self.local_batch, len(self)
        for chunk in range(start_step // self.chunk, (steps + self.chunk - 1) // self.chunk):
            first, last = chunk * self.chunk, min(steps, (chunk + 1) * self.chunk)
            self.gen.manual_seed(((self.seed * 1_000_003 + epoch) * 7919 + chunk) * 31 + self.rank)
            idx = mine[first * b:last * b]
            x = None  # the previous chunk goes before the next is made
            x = self.augment.apply(self.images[idx], self.augment.sample(len(idx), self.gen))
            labels = self.labels[idx]
            for step in range(max(first, start_step), last):
                j = (step - first) * b
                batch = self.augment.finish(x[j:j + b])
                # the chunk's last batch is a copy: the trainer holds it while the next chunk is
                # made, and a view would keep the whole previous chunk alive
                yield (batch.clone() if step == last - 1 and batch._base is not None
                       else batch), labels[j:j + b]


def default_chunk(recipe: Recipe, img_size: int) -> int:
    """Batches augmented at once by the device pipeline where memory allows: enough to amortise the
    per-op launches, 4 at 224 px (the light recipe works at 32 px: 8)."""
    work = img_size if recipe.family == "timm" else 32
    return max(1, min(8, (4 * 224 * 224) // (work * work)))


def make_train_stream(pipeline: str, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe,
                      img_size: int, batch_size: int, seed: int, num_workers: int,
                      device: torch.device, rank: int = 0, world: int = 1, drop_last: bool = True,
                      multiple_of: int = 1, chunk_batches: int = 0) -> TrainStream:
    """The training batch source: 'cpu' (DataLoader workers) or 'device' (batched ops where the
    model is). `batch_size` is the global micro-batch; `multiple_of` the accumulation steps."""
    if pipeline == "device":
        return DeviceTrainStream(images, labels, recipe, img_size, batch_size, seed, device, rank,
                                 world, drop_last, multiple_of, chunk_batches)
    return CpuTrainStream(images, labels, recipe, img_size, batch_size, seed, num_workers, device,
                          rank, world, drop_last, multiple_of)
