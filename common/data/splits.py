"""From a source to the three sets a run uses: train, validation (held out of train,
class-stratified, fixed by --split-seed alone so that runs with different --seed share it) and test.
Indices into the source are kept, so a test can prove that no image is in two sets."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .sources import DataSource

# One --split-seed draws three independent things; each gets its own offset (distinct primes), so
# that the validation split, the training subset and the test subset are not the same permutation in
# disguise.
VAL_OFFSET, SUBSET_OFFSET, TEST_OFFSET = 7919, 104729, 31337


@dataclass
class Splits:
    """uint8 images (N, 3, 32, 32) and int64 labels of train / val / test, with their source
    indices."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_idx: np.ndarray          # indices into the source's training images
    val_idx: np.ndarray            # into the source's training images (or its test images when
                                   # val_is_test)
    test_idx: np.ndarray           # into the source's test images
    val_is_test: bool
    settings: dict[str, Any]

    def provenance(self) -> dict[str, Any]:
        """The settings, the sizes, and a hash of which images each set holds: runs that share a
        split share it."""
        digest = hashlib.sha256()
        for idx in (self.train_idx, self.val_idx, self.test_idx):
            digest.update(np.ascontiguousarray(idx, dtype=np.int64).tobytes() + b"|")
        return {**self.settings, "train": int(len(self.train_x)), "val": int(len(self.val_x)),
                "test": int(len(self.test_x)), "val_is_test": self.val_is_test,
                "indices_sha256": digest.hexdigest()}


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): `val_size` images held out in proportion to each class, fixed by
    `seed`."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts * val_size / len(labels)).astype(np.int64)
    for i in np.argsort(-counts, kind="stable")[: val_size - int(quota.sum())]:
        quota[i] += 1  # the largest classes absorb the rounding remainder
    val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:q]
                          for c, q in zip(classes, quota)])
    val = np.sort(val)
    mask = np.ones(len(labels), dtype=bool)
    mask[val] = False
    return np.flatnonzero(mask), val


def random_split(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) as the experiment's code drew them: torch.randperm(n) under
    manual_seed(seed), the first `val_size` for validation (its seed was 42)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def nested_stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """All indices in an order whose every prefix is class-stratified (each class within one image
    of its share): each class is shuffled, and its k-th image stands at fraction (k + 0.5) / n_class
    of the order. So a smaller --train-subset is always inside a larger one (the data-size sweep
    relies on it)."""
    rng = np.random.default_rng(seed)
    keys, order = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        keys.append((np.arange(len(idx)) + 0.5) / len(idx))
        order.append(idx)
    keys, order = np.concatenate(keys), np.concatenate(order)
    return order[np.argsort(keys, kind="stable")]


def make_splits(source: DataSource, val_size: int, split_seed: int, train_subset: int = 0,
                test_subset: int = 0, val_split: str = "stratified") -> Splits:
    """Hold `val_size` training images out (0: validate on the test set), then optionally keep a
    nested, class-stratified `train_subset` of the rest and a class-stratified `test_subset` of the
    test set."""
    n_train = len(source.train_x)
    if val_size >= n_train:
        raise UserError(f"--val-size {val_size} leaves no training images (the training set has "
                        f"{n_train})")
    if val_size > 0 and val_split == "random":
        train_idx, val_idx = random_split(n_train, val_size, split_seed)
    elif val_size > 0:
        train_idx, val_idx = stratified_split(source.train_y, val_size, split_seed + VAL_OFFSET)
    else:
        train_idx, val_idx = np.arange(n_train), np.empty(0, dtype=np.int64)
    if train_subset:
        if train_subset > len(train_idx):
            raise UserError(f"--train-subset {train_subset} is more than the {len(train_idx)} "
                            "training images")
        order = nested_stratified_order(source.train_y[train_idx], split_seed + SUBSET_OFFSET)
        train_idx = train_idx[np.sort(order[:train_subset])]
    test_idx = np.arange(len(source.test_x))
    # stratified: folders list the test images class by class
    if test_subset and test_subset < len(test_idx):
        test_idx = stratified_split(source.test_y, test_subset, split_seed + TEST_OFFSET)[1]
    if val_size == 0:
        val_idx = test_idx
    val_images = source.test_x if val_size == 0 else source.train_x
    val_labels = source.test_y if val_size == 0 else source.train_y

    def take(x: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x[idx]))

    settings = {"val_size": val_size, "val_split": val_split, "split_seed": split_seed,
                "train_subset": train_subset, "test_subset": test_subset}
    return Splits(take(source.train_x, train_idx), take(source.train_y, train_idx),
                  take(val_images, val_idx), take(val_labels, val_idx),
                  take(source.test_x, test_idx), take(source.test_y, test_idx),
                  train_idx, val_idx, test_idx, val_is_test=val_size == 0, settings=settings)
