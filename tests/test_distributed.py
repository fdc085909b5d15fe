"""torchrun with 2 CPU processes (gloo): shards and reduced metrics, rank 0 alone writes, an
interrupted run resumes to the same numbers, and a failure on one rank ends every rank with one
clear line. Interrupts come from CIFAR_FAILPOINT at a fixed step, not from a timed signal. Slow
(minutes): `python -m pytest -m slow`."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch

from common.checkpoint import load_checkpoint
from conftest import assert_same_run, run_cli

pytestmark = pytest.mark.slow

# 50 steps an epoch, so a stop lands mid-epoch (ranks agree on it every 25 steps)
DDP = ["--model", "test_resnet", "--no-pretrained", "--epochs", "2", "--device", "cpu",
       "--img-size", "32", "--batch-size", "32", "--num-workers", "0", "--val-size", "400",
       "--train-subset", "1600", "--seed", "0"]
ENV = {"OMP_NUM_THREADS": "1"}
PORTS = iter(range(29533, 29600))


def torchrun(*argv: str) -> list[str]:
    return ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={next(PORTS)}",
            "train_resnet_cifar.py", *DDP, *argv]


def our_traceback(stderr: str) -> bool:
    """torchrun prints its own ChildFailedError traceback; ours would name a file of this
    repository."""
    return bool(re.search(r'File ".*(common/|train_resnet_cifar\.py)', stderr))


@pytest.fixture(scope="module")
def ddp_straight(cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "straight"
    r = run_cli(*torchrun("--data-dir", str(cifar_dir), "--output-dir", str(out), "--data-pipeline",
                          "device"), env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_torchrun_two_processes_gloo(ddp_straight):
    out, r = ddp_straight
    m = pd.read_csv(out / "metrics.csv")
    assert m["epoch"].tolist() == [1, 2] and m["val_acc"].iloc[-1] > 0.2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["run"]["world_size"] == 2 and cfg["run"]["steps_per_epoch"] == 1600 // 32
    assert json.loads((out / "summary.json").read_text())["test_images"] == 500
    assert r.stderr.count("test acc of best.pt") == 1, "rank 0 alone speaks"


def test_torchrun_interrupted_twice_resumes_to_the_same_run(cifar_dir, tmp_path, ddp_straight):
    """Stopped after epoch 1; then a SIGINT on every rank at the run's step 60 (epoch 2, step 10),
    which the ranks agree on at step 25; then --resume: the same rows and weights as the
    uninterrupted run."""
    straight, _ = ddp_straight
    out = tmp_path / "run"
    flags = ["--data-dir", str(cifar_dir), "--output-dir", str(out), "--data-pipeline", "device"]
    r = run_cli(*torchrun(*flags, "--stop-after-epoch", "1"), env=ENV)
    assert r.returncode == 0 and "stopped after epoch 1" in r.stderr, r.stderr[-3000:]
    assert "continue with: torchrun --nproc_per_node=2 train_resnet_cifar.py" in r.stderr
    r = run_cli(*torchrun(*flags, "--resume"), env={**ENV, "CIFAR_FAILPOINT": "step:60@int"})
    assert ("stopped in epoch 2 at step 25/50" in r.stderr
            and not our_traceback(r.stderr)), r.stderr[-3000:]
    assert r.stderr.count("SIGINT: finishing this step") == 1
    ck = load_checkpoint(out / "last.pt")
    assert (ck["epoch"], ck["step"]) == (1, 25) and ck["partial"]["count"] == 25 * 32
    r = run_cli(*torchrun(*flags, "--resume"), env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(straight, out, epochs=2)


@pytest.mark.parametrize("case", ["download_fails_on_rank_0", "loss_is_nan"])
def test_torchrun_failure_ends_every_rank_with_one_line(cifar_dir, tmp_path, case):
    out = tmp_path / "run"
    if case == "download_fails_on_rank_0":
        extra = ["--data-dir", str(tmp_path / "no_cifar_here")]
    else:
        import timm

        state = timm.create_model("test_resnet", num_classes=10).state_dict()
        state["conv1.0.weight"][0, 0, 0, 0] = float("inf")
        torch.save(state, tmp_path / "bad.pth")
        extra = ["--data-dir", str(cifar_dir), "--weights", str(tmp_path / "bad.pth")]
    r = run_cli(*torchrun("--output-dir", str(out), *extra), env=ENV, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1, r.stderr[-3000:]
    assert ("could not download CIFAR-10" if case == "download_fails_on_rank_0"
            else "NaN/Inf") in errors[0]
    assert not our_traceback(r.stderr), r.stderr[-3000:]
    assert not (out / "last.pt").exists()
