"""Shared fixtures: a learnable CIFAR-format folder, a trained run, and a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# 200 real CIFAR-10 photos (PNG, a folder per class) beside the checkout; tests that need them skip without
REAL_SAMPLE = Path(os.environ.get("CIFAR10_REAL_SAMPLE", ROOT.parent / "shared" / "cifar10-real-sample"))

from common.data import synthetic_cifar, write_cifar_folder  # noqa: E402

# Small enough for 2 CPU cores, large enough that a model must learn the classes.
SMALL = ["--img-size", "32", "--batch-size", "64", "--num-workers", "0", "--val-size", "400",
         "--train-subset", "1600", "--seed", "0"]


def make_cifar_dir(root: Path, n_train: int = 2000, n_test: int = 500) -> Path:
    train_x, train_y = synthetic_cifar(n_train, seed=11)
    test_x, test_y = synthetic_cifar(n_test, seed=12)
    write_cifar_folder(root, train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy())
    return root


@pytest.fixture(scope="session")
def real_sample() -> Path:
    """The real CIFAR-10 photos, or a skip saying where they were looked for."""
    if not REAL_SAMPLE.is_dir():
        pytest.skip(f"real CIFAR-10 sample not found at {REAL_SAMPLE} (set CIFAR10_REAL_SAMPLE)")
    return REAL_SAMPLE


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """A CIFAR-10-format folder (data_batch_1..5, test_batch) of learnable synthetic images."""
    return make_cifar_dir(tmp_path_factory.mktemp("cifar"))


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run a repository script as a user would; returns the finished process (text output)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


@pytest.fixture(scope="session")
def trained_resnet(cifar_dir, tmp_path_factory) -> Path:
    """A ResNet-18 run trained for 2 epochs on the learnable folder (shared by several tests)."""
    out = tmp_path_factory.mktemp("runs") / "resnet_scratch"
    from train_resnet_cifar import main

    assert main(["--no-pretrained", "--epochs", "2", "--data-dir", str(cifar_dir), "--output-dir", str(out),
                 *SMALL]) == 0
    return out


def assert_same_run(a: Path, b: Path, epochs: int) -> None:
    """Two run folders hold the same rows (to 1e-6) for epochs 1..`epochs` and the same last.pt weights."""
    import pandas as pd
    import torch

    same = ["lr", "train_loss", "train_acc", "val_loss", "val_acc"]
    ma, mb = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
    assert ma["epoch"].tolist() == mb["epoch"].tolist() == list(range(1, epochs + 1))
    pd.testing.assert_frame_equal(ma[same], mb[same], atol=1e-6, rtol=0)
    wa = torch.load(a / "last.pt", weights_only=True)["model"]
    wb = torch.load(b / "last.pt", weights_only=True)["model"]
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6), k
