"""Splits: train, validation and test never share an image (by index and by content) for every
source, train + validation is the original training set, and the split depends on --split-seed
alone."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from common.data import sources
from common.data.splits import make_splits, stratified_split
from common.errors import UserError
from test_sources import image_folder, tar_of


def _hashes(x) -> list[str]:
    return [hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest() for img in x.numpy()]


@pytest.fixture(scope="module")
def all_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    folder = image_folder(root / "folder")
    real = sources.open_source(folder)
    return {"synthetic": sources.synthetic_source(3000, 600), "image-folder": real,
            "tar": sources.open_source(tar_of(folder, root / "c.tar.gz")),
            "cifar-batches": sources.open_source(sources.write_batches(
                root / "b", real.train_x, real.train_y, real.test_x, real.test_y).parent)}


@pytest.mark.parametrize("kind", ["synthetic", "image-folder", "tar", "cifar-batches"])
@pytest.mark.parametrize("subsets", [(0, 0), (60, 20)])
def test_train_val_test_share_no_image_and_train_plus_val_is_the_training_set(
        all_sources, kind, subsets):
    src = all_sources[kind]
    val = 30 if len(src.train_x) < 1000 else 300
    s = make_splits(src, val, split_seed=3, train_subset=subsets[0], test_subset=subsets[1])
    train, valid = set(s.train_idx.tolist()), set(s.val_idx.tolist())
    assert not train & valid, "an image is in train and validation"
    if not subsets[0]:
        assert train | valid == set(range(len(src.train_x))), ("train + validation is not the "
                                                               "training set")
    assert len(s.val_x) == val and len(s.test_x) == (subsets[1] or len(src.test_x))
    # by content as well: the tensors really are those images, and no pixel-identical image crosses
    # sets
    assert np.array_equal(s.train_x.numpy(), src.train_x[s.train_idx])
    assert np.array_equal(s.val_x.numpy(), src.train_x[s.val_idx])
    assert np.array_equal(s.test_x.numpy(), src.test_x[s.test_idx])
    h_train, h_val, h_test = set(_hashes(s.train_x)), set(_hashes(s.val_x)), set(_hashes(s.test_x))
    assert not (h_train & h_val) and not (h_train & h_test) and not (h_val & h_test)
    assert np.array_equal(s.train_y.numpy(), src.train_y[s.train_idx])


def test_the_split_depends_on_split_seed_alone():
    labels = np.arange(5000) % 10
    train, val = stratified_split(labels, 500, seed=0)
    assert len(val) == 500 and len(train) == 4500
    assert np.bincount(labels[val]).tolist() == [50] * 10
    assert np.array_equal(val, stratified_split(labels, 500, seed=0)[1])
    assert not np.array_equal(val, stratified_split(labels, 500, seed=1)[1])


def test_runs_with_different_seeds_share_the_validation_set(tmp_path):
    """--seed is not an argument of the split: two configs differing only in --seed split alike."""
    from common.config import TrainConfig

    src = sources.synthetic_source(2000, 300)
    a, b = TrainConfig(seed=0, val_size=200), TrainConfig(seed=7, val_size=200)
    sa = make_splits(src, a.val_size, a.split_seed, a.train_subset, a.test_subset)
    sb = make_splits(src, b.val_size, b.split_seed, b.train_subset, b.test_subset)
    assert np.array_equal(sa.val_idx, sb.val_idx) and np.array_equal(sa.train_idx, sb.train_idx)
    sc = make_splits(src, 200, split_seed=1)
    assert not np.array_equal(sa.val_idx, sc.val_idx)


def test_test_subset_is_class_stratified():
    """Image folders list test images class by class: a first-N subset would hold one or two
    classes."""
    src = sources.synthetic_source(1000, 1000)
    order = np.argsort(src.test_y, kind="stable")
    src.test_x, src.test_y = src.test_x[order], src.test_y[order]
    s = make_splits(src, 100, 0, test_subset=200)
    assert np.bincount(s.test_y.numpy(), minlength=10).tolist() == [20] * 10


def test_val_size_zero_validates_on_the_test_images(all_sources):
    src = all_sources["image-folder"]
    s = make_splits(src, 0, 0)
    assert (s.val_is_test and np.array_equal(s.val_x.numpy(), src.test_x)
            and np.array_equal(s.val_y.numpy(), src.test_y))
    assert len(s.train_x) == len(src.train_x)


def test_impossible_sizes_are_clear_errors(all_sources):
    src = all_sources["image-folder"]
    with pytest.raises(UserError, match="--val-size 150 leaves no training images"):
        make_splits(src, 150, 0)
    with pytest.raises(UserError, match="--train-subset 500 is more than"):
        make_splits(src, 30, 0, train_subset=500)


def test_the_random_split_is_the_experiments_randperm():
    """--val-split random --split-seed 42: validation = the first 5,000 of torch.randperm(50000)
    under manual_seed(42), as the experiment's code drew it."""
    import torch

    src = sources.synthetic_source(50_000, 100)
    s = make_splits(src, 5000, 42, val_split="random")
    perm = torch.randperm(50_000, generator=torch.Generator().manual_seed(42)).numpy()
    assert (np.array_equal(s.val_idx, np.sort(perm[:5000]))
            and np.array_equal(s.train_idx, np.sort(perm[5000:])))
    assert not np.array_equal(s.val_idx,
                              make_splits(src, 5000, 42).val_idx), "stratified is another split"


def test_training_subsets_are_nested_and_class_stratified():
    """The data-size sweep's subsets: a smaller one lies inside a larger one, each class within one
    image of its share, the same for every --seed and another for another --split-seed."""
    src = sources.synthetic_source(6000, 100)
    sizes = (100, 555, 2000, 5000)
    subsets = [set(make_splits(src, 500, 3, train_subset=n).train_idx.tolist()) for n in sizes]
    assert all(a < b for a, b in zip(subsets, subsets[1:])), "nested"
    val = set(make_splits(src, 500, 3).val_idx.tolist())
    for n, sub in zip(sizes, subsets):
        assert len(sub) == n and not sub & val
        counts = np.bincount(src.train_y[sorted(sub)], minlength=10)
        share = np.bincount(src.train_y[sorted(set(range(6000)) - val)], minlength=10) / 5500
        assert np.all(np.abs(counts - n * share) <= 1.0), (n, counts)
    assert subsets[1] != set(make_splits(src, 500, 4, train_subset=555).train_idx.tolist())
