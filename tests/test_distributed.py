"""torchrun with 2 CPU processes (gloo): shards and reduced metrics, rank 0 alone writes, an interrupted run
resumes to the same numbers, and a failure on one rank ends every rank with one clear line."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from common.checkpoint import load_checkpoint
from common.engine import GracefulStop
from conftest import ROOT, assert_same_run, run_cli

# 50 steps an epoch, so a stop lands mid-epoch (ranks agree on it every 25 steps)
DDP = ["--no-pretrained", "--epochs", "2", "--device", "cpu", "--img-size", "32", "--batch-size", "32",
       "--num-workers", "0", "--val-size", "400", "--train-subset", "1600", "--seed", "0"]
ENV = {"OMP_NUM_THREADS": "1"}
PORTS = iter(range(29533, 29600))


def torchrun(*argv: str) -> list[str]:
    return ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={next(PORTS)}",
            "train_resnet_cifar.py", *DDP, *argv]


def our_traceback(stderr: str) -> bool:
    """torchrun prints its own ChildFailedError traceback; ours would name a file of this repository."""
    return bool(re.search(r'File ".*(common/|train_resnet_cifar\.py)', stderr))


@pytest.fixture(scope="module")
def ddp_straight(cifar_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("ddp") / "straight"
    r = run_cli(*torchrun("--data-dir", str(cifar_dir), "--output-dir", str(out), "--data-pipeline", "gpu"),
                env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_torchrun_two_processes_gloo(ddp_straight):
    """Shards, reduced metrics, rank 0 alone writes and prints."""
    out, r = ddp_straight
    m = pd.read_csv(out / "metrics.csv")
    assert m["epoch"].tolist() == [1, 2] and m["val_acc"].iloc[-1] > 0.4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["extra"]["world_size"] == 2 and cfg["extra"]["steps_per_epoch"] == 1600 // 32
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_images"] == 500  # both ranks' shards summed
    assert r.stdout.count("test acc of best.pt") == 1


def test_torchrun_interrupted_twice_resumes_to_the_same_run(cifar_dir, tmp_path, ddp_straight):
    """Stopped after epoch 1, then Ctrl+C in the middle of epoch 2 (the terminal and the launcher both
    signal each rank), then resumed: the same rows and weights as the uninterrupted run."""
    straight, _ = ddp_straight
    out = tmp_path / "run"
    flags = ["--data-dir", str(cifar_dir), "--output-dir", str(out), "--data-pipeline", "gpu"]
    r = run_cli(*torchrun(*flags, "--stop-after-epoch", "1"), env=ENV)
    assert r.returncode == 0 and "stopped after epoch 1" in r.stderr, r.stderr[-3000:]
    assert "continue with: torchrun --nproc_per_node=2 train_resnet_cifar.py" in r.stderr

    proc = subprocess.Popen([sys.executable, *torchrun(*flags, "--resume")], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, **ENV, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("resnet18"):  # set up; training starts now and takes seconds to reach step 25
            break
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)  # what a Ctrl+C in the terminal does
    _, stderr = proc.communicate(timeout=300)
    assert "stopped in epoch 2 at step 25/50" in stderr, stderr[-3000:]
    assert stderr.count("SIGINT: finishing this step") == 1 and not our_traceback(stderr), stderr[-3000:]
    ck = load_checkpoint(out / "last.pt")
    assert (ck["epoch"], ck["step"]) == (1, 25) and ck["partial"]["count"] == 25 * 32

    r = run_cli(*torchrun(*flags, "--resume"), env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(straight, out, epochs=2)


@pytest.mark.parametrize("case", ["download_fails_on_rank_0", "loss_diverges"])
def test_torchrun_failure_ends_every_rank_with_one_line(cifar_dir, tmp_path, case):
    """Rank 0 alone downloads: its failure must not leave rank 1 crashing in a collective with a traceback;
    a NaN loss stops all ranks together (not one rank while the other waits on it)."""
    out = tmp_path / "run"
    extra = (["--data-dir", str(tmp_path / "no_cifar_here")] if case == "download_fails_on_rank_0"
             else ["--data-dir", str(cifar_dir), "--lr", "1e12"])
    r = run_cli(*torchrun("--output-dir", str(out), *extra), env=ENV, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1, r.stderr[-3000:]
    assert ("could not download CIFAR-10" if case == "download_fails_on_rank_0" else "NaN/Inf") in errors[0]
    assert not our_traceback(r.stderr), r.stderr[-3000:]
    assert not (out / "last.pt").exists()


def test_a_forwarded_ctrl_c_is_not_a_second_one():
    """Under torchrun a rank sees one Ctrl+C twice; only a later one quits at once."""
    with GracefulStop(announce=False, echo_s=0.5) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the launcher forwarding the same keypress
        assert stop.requested and stop.signum == signal.SIGINT
        time.sleep(0.6)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs between bytecodes
