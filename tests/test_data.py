"""CIFAR-10 reading, validation, download fallbacks, splits and the reference augmentation."""
from __future__ import annotations

import io
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common import data
from common.errors import UserError
from conftest import SMALL, make_cifar_dir, run_cli


def test_folder_round_trip(tmp_path):
    x, y = data.synthetic_cifar(300, seed=3)
    data.write_cifar_folder(tmp_path, x.numpy(), y.numpy(), x[:50].numpy(), y[:50].numpy())
    train_x, train_y, test_x, test_y = data.read_cifar_folder(tmp_path)
    assert train_x.dtype == torch.uint8 and train_x.shape == (300, 3, 32, 32)
    assert torch.equal(train_x, x) and torch.equal(train_y, y)
    assert torch.equal(test_x, x[:50]) and torch.equal(test_y, y[:50])


def _damage(folder: Path, how: str) -> str:
    """Break one batch file the way a bad download or a wrong file would; returns the file's name."""
    target = folder / data.FOLDER / "data_batch_3"
    if how == "missing":
        target.unlink()
    elif how == "truncated":
        target.write_bytes(target.read_bytes()[:1000])
    elif how == "shape":
        target.write_bytes(pickle.dumps({b"data": np.zeros((10, 100), np.uint8), b"labels": [0] * 10}))
    elif how == "label":
        target.write_bytes(pickle.dumps({b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 9 + [10]}))
    elif how == "foreign":  # a pickle that would run code when loaded
        target.write_bytes(pickle.dumps({b"data": io.BytesIO(b"x")}))
    return target.name


@pytest.mark.parametrize("how,words", [("missing", "missing"), ("truncated", "unreadable"),
                                       ("shape", "expected (N, 3072)"), ("label", "outside 0..9"),
                                       ("foreign", "unreadable")])
def test_damaged_folder_gives_one_clear_error(tmp_path, how, words):
    make_cifar_dir(tmp_path, 200, 50)
    name = _damage(tmp_path, how)
    with pytest.raises(UserError) as e:
        data.read_cifar_folder(tmp_path)
    msg = str(e.value)
    assert name in msg and words in msg and "re-download" in msg


def test_cli_reports_damaged_folder_without_traceback(tmp_path):
    make_cifar_dir(tmp_path, 200, 50)
    _damage(tmp_path, "label")
    r = run_cli("train_resnet_cifar.py", "--no-pretrained", "--data-dir", str(tmp_path),
                "--output-dir", str(tmp_path / "run"), *SMALL)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "data_batch_3" in r.stderr and "outside 0..9" in r.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def test_no_data_and_no_download_names_the_folder_fast(tmp_path):
    start = time.monotonic()
    r = run_cli("train_resnet_cifar.py", "--no-pretrained", "--no-download", "--data-dir", str(tmp_path / "d"),
                "--output-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(tmp_path / "d" / data.FOLDER) in r.stderr and "--no-download" in r.stderr
    assert time.monotonic() - start < 60


def test_no_network_fails_fast_with_placement_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "host_reachable", lambda url, timeout=4.0: False)
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        data.ensure_cifar(tmp_path, download=True, quiet=True)
    assert time.monotonic() - start < 5
    msg = str(e.value)
    assert "official server: unreachable" in msg and "Hugging Face copy: unreachable" in msg
    assert str(tmp_path / data.FOLDER / "data_batch_1") in msg


def test_official_download_path_extracts_the_archive(tmp_path, monkeypatch):
    """The real download code, fed a file:// URL of an archive in the official layout."""
    src = make_cifar_dir(tmp_path / "src", 100, 20)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / data.FOLDER, arcname=data.FOLDER)
    dest = tmp_path / "dest"
    data._download_official(dest, url=archive.as_uri(), md5=data._md5(archive))
    assert data.cifar_present(dest) and not (dest / "cifar-10-python.tar.gz").exists()
    assert torch.equal(data.read_cifar_folder(dest)[0], data.read_cifar_folder(src)[0])


def test_failed_official_download_falls_back_then_explains(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(data, "host_reachable", lambda url, timeout=4.0: True)
    monkeypatch.setattr(data, "CIFAR_URL", (tmp_path / "nope.tar.gz").as_uri())

    def fake_hf(folder):
        calls.append(folder)
        raise OSError("hub unreachable")

    monkeypatch.setattr(data, "_download_huggingface", fake_hf)
    # the loop holds the functions, so rebuild it through ensure_cifar's module globals
    with pytest.raises(UserError) as e:
        data.ensure_cifar(tmp_path / "d", download=True, quiet=True)
    assert "official server:" in str(e.value) and "Hugging Face copy: hub unreachable" in str(e.value)
    assert calls, "the Hugging Face fallback was not tried"


def test_hugging_face_rows_convert_to_cifar_arrays(real_sample):
    import pandas as pd

    files = sorted(real_sample.glob("*/*.png"))[:12]
    rows = pd.DataFrame({"img": [{"bytes": f.read_bytes()} for f in files],
                         "label": [data.CIFAR_CLASSES.index(f.parent.name) for f in files]})
    x, y = data._parquet_to_arrays(rows)
    assert x.shape == (12, 3, 32, 32) and x.dtype == np.uint8
    assert list(y) == list(rows["label"])
    from PIL import Image

    assert np.array_equal(x[0].transpose(1, 2, 0), np.asarray(Image.open(files[0]).convert("RGB")))


def test_stratified_split_is_proportional_disjoint_and_seeded():
    labels = torch.arange(5000) % 10
    train, val = data.stratified_split(labels, 500, seed=0)
    assert len(val) == 500 and len(train) == 4500
    assert not set(train.tolist()) & set(val.tolist())
    assert torch.bincount(labels[val], minlength=10).tolist() == [50] * 10
    assert torch.equal(val, data.stratified_split(labels, 500, seed=0)[1])
    assert not torch.equal(val, data.stratified_split(labels, 500, seed=1)[1])


def test_val_size_zero_uses_the_test_set(cifar_dir):
    s = data.load_splits(str(cifar_dir), False, False, val_size=0, train_subset=0, seed=0)
    assert s.val_is_test and torch.equal(s.val_x, s.test_x) and len(s.train_x) == 2000
    s = data.load_splits(str(cifar_dir), False, False, val_size=200, train_subset=1000, seed=0)
    assert not s.val_is_test and len(s.val_x) == 200 and len(s.train_x) == 1000


def test_epoch_order_depends_on_epoch_only_and_shards_evenly():
    a, b = data.epoch_order(1000, 0, 3), data.epoch_order(1000, 0, 3)
    assert torch.equal(a, b) and not torch.equal(a, data.epoch_order(1000, 0, 4))
    shards = [data.epoch_order(1001, 0, 3, rank, 2) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 500
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


def _real_images(folder: Path) -> torch.Tensor:
    from PIL import Image

    files = sorted(folder.glob("*/*.png"))
    assert len(files) == 200, f"expected the 200 real CIFAR-10 images in {folder}"
    return torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1)
                        for f in files])


def test_randaugment_survives_thousands_of_real_images(real_sample):
    """timm's rand-m9-mstd0.5-inc1 on Pillow 13 raised on ~1 call in 500; ours must never raise."""
    torch.manual_seed(0)
    transform = data.cpu_train_transform(32, 0.25, randaug_ops=2, randaug_magnitude=9)
    images = _real_images(real_sample)
    for i in range(5000):
        out = transform(images[i % len(images)])
        assert out.shape == (3, 32, 32) and torch.isfinite(out).all()
