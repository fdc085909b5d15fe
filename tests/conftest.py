"""Shared fixtures: the 200 real CIFAR-10 photos (in tests/data), the full CIFAR-10 archive when it
is beside the checkout, a learnable CIFAR-format folder, one trained run, and a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n 2 on 2 cores: one thread per worker, and for the runs it starts, or the two
    # workers' threads fight over the cores
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
PHOTOS = ROOT / "tests" / "data" / "cifar10-real-sample"
ARCHIVE = Path(os.environ.get("CIFAR10_ARCHIVE",
                              ROOT.parent / "shared" / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"))

from common.data.folders import CIFAR_CLASSES  # noqa: E402
from common.data.sources import synthetic_images, write_batches  # noqa: E402

# Small enough for 2 CPU cores, large enough that a model must learn the classes; on the device
# pipeline (batched augmentation, the GPU's default, here on the CPU), which trains several times
# faster on a CPU than the per-image cpu pipeline (that one has its own tests, and the real-data one)
SMALL = ["--img-size", "32", "--batch-size", "64", "--num-workers", "0", "--val-size", "400",
         "--train-subset", "1600", "--seed", "0", "--data-pipeline", "device"]


def real_photos() -> tuple[torch.Tensor, torch.Tensor]:
    """The 200 real CIFAR-10 photos as uint8 (200, 3, 32, 32) and their labels."""
    from PIL import Image

    files = sorted(PHOTOS.glob("*/*.png"))
    assert len(files) == 200, f"expected the 200 real CIFAR-10 photos in {PHOTOS}"
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy())
                     .permute(2, 0, 1) for f in files])
    y = torch.tensor([CIFAR_CLASSES.index(f.parent.name) for f in files])
    return x, y


def make_cifar_dir(root: Path, n_train: int = 2000, n_test: int = 500) -> Path:
    train_x, train_y = synthetic_images(n_train, seed=11)
    test_x, test_y = synthetic_images(n_test, seed=12)
    write_batches(root, train_x, train_y, test_x, test_y)
    return root


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """A cifar-10-batches-py folder of learnable (not trivially separable) synthetic images."""
    return make_cifar_dir(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def archive() -> Path:
    """The full real CIFAR-10 archive, or a skip that says where it was looked for."""
    if not ARCHIVE.is_file():
        pytest.skip(f"the CIFAR-10 archive is not at {ARCHIVE} (it lies in ../shared on the "
                    "development and CI machines; set CIFAR10_ARCHIVE to use another copy)")
    return ARCHIVE


@pytest.fixture(scope="session")
def archive_cache(archive, tmp_path_factory) -> str:
    """A decode cache of the real archive shared by the tests of one session, and by the workers of
    `pytest -n 2` (decoding takes ~20 s): the first to come decodes it, under a lock, the others
    read it."""
    from filelock import FileLock

    from common.data.sources import open_source

    # every worker of one session has its own base folder under a shared parent
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / "archive_cache"
    with FileLock(str(shared / "archive_cache.lock")):
        folder.mkdir(exist_ok=True)
        open_source(archive, cache_dir=str(folder))
    return str(folder)


def run_cli(*args: str, timeout: float = 600, env: dict | None = None,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run a repository script as a user would, as the leader of its own process group (as a
    terminal starts it: a signal to "the group" reaches it and its workers, never pytest); returns
    the finished process (text output)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env, start_new_session=True)


def train(script: str, *argv: str) -> int:
    """A train script's main(), in this process (no start-up cost)."""
    module = __import__(script.removesuffix(".py"))
    return module.main(list(argv))


@pytest.fixture(scope="session")
def trained_resnet(cifar_dir, tmp_path_factory) -> Path:
    """A 2-epoch run of timm's small test_resnet (a ResNet with BatchNorm and an fc head) through
    the ResNet script on the learnable folder, shared by several tests; ResNet-18 itself trains in
    the real-data test."""
    out = tmp_path_factory.mktemp("runs") / "resnet_scratch"
    assert train("train_resnet_cifar", "--model", "test_resnet", "--no-pretrained", "--epochs", "2",
                 "--data-dir", str(cifar_dir), "--output-dir", str(out), "--aug", "light",
                 *SMALL) == 0
    return out


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    """The process failed with exit 2 and printed one `error:` line containing every word, no
    traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    _one_error_line(r.stderr, words)


def _one_error_line(stderr: str, words) -> None:
    """No traceback; exactly one `error:` line, the last one (progress lines may come before it)."""
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-2000:]
    for w in words:
        assert w in errors[0], (w, errors[0])


def one_line_error_in_process(main, argv: list[str], capsys, *words: str) -> None:
    """main(argv) exits 2 after one `error:` line containing every word (the in-process twin of
    one_line_error)."""
    capsys.readouterr()  # what earlier calls printed
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    _one_error_line(capsys.readouterr().err, words)


def assert_same_run(a: Path, b: Path, epochs: int) -> None:
    """Two run folders hold the same rows (to 1e-6) for epochs 1..`epochs` and the same last.pt
    weights."""
    import pandas as pd

    same = ["lr", "train_loss", "train_acc", "val_loss", "val_acc"]
    ma, mb = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
    assert ma["epoch"].tolist() == mb["epoch"].tolist() == list(range(1, epochs + 1))
    pd.testing.assert_frame_equal(ma[same], mb[same], atol=1e-6, rtol=0)
    wa = torch.load(a / "last.pt", weights_only=True)["model"]
    wb = torch.load(b / "last.pt", weights_only=True)["model"]
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6), k


def fake_record(arch: str = "resnet18", pretrained: bool = True, tag: str | None = None,
                epochs: int = 6, seed: int = 0, synthetic: bool = False, img_size: int = 224,
                frozen: bool = False, n_test: int = 400, train_images: int = 45000, **config):
    """A run record as the trainer writes it, for analysis tests that need run folders with known
    answers."""
    from common.config import TrainConfig
    from common.data.augment import resolve_recipe
    from common.record import (DataInfo, Environment, ModelInfo, RunInfo, RunRecord, SplitInfo,
                               WeightsInfo)
    from common.specs import REGISTRY

    spec = REGISTRY[arch]
    tag = tag or spec.default_tag
    weights = (WeightsInfo("ImageNet", library="timm", arch=arch, tag=tag, sha256="w" * 64,
                           imagenet_top1=(spec.weights_for("timm", tag).imagenet_top1
                                          if spec.weights_for("timm", tag) else None))
               if pretrained else WeightsInfo("random init", library="timm", arch=arch))
    subset = 0 if train_images == 45000 else train_images
    cfg = TrainConfig(model=f"{arch}.{tag}" if pretrained else arch, pretrained=pretrained,
                      freeze_backbone=frozen, img_size=img_size, epochs=epochs, seed=seed,
                      dummy=synthetic, train_subset=subset, **config)
    classes = [f"class {i}" for i in range(10)] if synthetic else list(CIFAR_CLASSES)
    data = DataInfo(
        "synthetic" if synthetic else "tar", None if synthetic else "cifar10-jpeg.tar.gz",
        "synthetic (--dummy, not CIFAR-10)" if synthetic else "CIFAR-10",
        ("s" if synthetic else "c") * 64, {"train": 50000, "test": n_test}, classes, 0, [],
        SplitInfo(5000, "stratified", 0, subset, 0, train_images, 5000, n_test, False,
                  f"{train_images:064d}"), "synthetic" if synthetic else "lossy copy (JPEG)")
    env = Environment("3.11", "2.11", "0.26", "1.0.31", "12.8", "Linux", "cuda:0", "NVIDIA H100", 8,
                      "abcdef123", False, "train.py", "2026-01-01T00:00:00")
    return RunRecord(cfg, ModelInfo(arch, spec.display, arch, "timm", 1, 1, 10, True), weights,
                     resolve_recipe("reference"), data,
                     RunInfo("bf16", "fp32", "device", 1, 351,
                             "resize 256 (bicubic) + centre crop 224"), env)


def write_summary(folder: Path, acc: float, n_test: int, epochs: int) -> None:
    import dataclasses
    import json

    from common.record import Summary

    s = Summary(test_acc=acc, test_loss=1.0, test_acc_final=acc, test_loss_final=1.0,
                test_images=n_test, tested="best.pt", best_epoch=epochs, best_val_acc=0.8,
                final_val_acc=0.8, epochs_run=epochs, epochs_planned=epochs, train_time_s=60.0
                * epochs, params=1, flops_per_image=1, peak_gpu_mem_gb=1.0, val_is_test=False)
    (folder / "summary.json").write_text(json.dumps(dataclasses.asdict(s)))


@pytest.fixture(autouse=True)
def leaves_no_global_state():
    """Each test leaves the process as it found it: signal handlers, the fault-injection variable,
    torch's thread count, RNG-free defaults and the working folder. A test that leaks state into
    later ones fails itself, instead of making a later test fail at random."""
    import signal

    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
              os.environ.get("CIFAR_FAILPOINT"), torch.get_num_threads(), torch.get_default_dtype(),
              os.getcwd(), torch.is_grad_enabled())
    yield
    after = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
             os.environ.get("CIFAR_FAILPOINT"), torch.get_num_threads(), torch.get_default_dtype(),
             os.getcwd(), torch.is_grad_enabled())
    names = ("SIGINT handler", "SIGTERM handler", "CIFAR_FAILPOINT", "torch threads",
             "default dtype", "cwd", "grad mode")
    leaked = [f"{n}: {a!r} -> {b!r}" for n, a, b in zip(names, before, after) if a != b]
    assert not leaked, f"the test left global state changed: {leaked}"
