"""Interrupts, kills, exact resume, refusals and bad files: nothing a user already has may be lost."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from common.checkpoint import load_checkpoint, save_checkpoint
from common.errors import UserError
from conftest import ROOT, assert_same_run, run_cli

# 10 steps per epoch on 320 images: each epoch takes seconds on 2 cores. On the CPU, since exact resume is
# promised there (cuDNN autotuning on a GPU is not bit-exact).
TINY = ["--no-pretrained", "--device", "cpu", "--epochs", "4", "--img-size", "32", "--batch-size", "32", "--num-workers", "0",
        "--val-size", "160", "--train-subset", "320", "--test-subset", "200", "--seed", "0"]


def args(cifar_dir: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY, "--data-dir", str(cifar_dir), "--output-dir", str(out), *extra]


def train(*argv: str) -> int:
    from train_resnet_cifar import main

    return main(list(argv))


@pytest.fixture(scope="module")
def straight(cifar_dir, tmp_path_factory) -> Path:
    """4 epochs without interruption: the reference every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert train(*args(cifar_dir, out)) == 0
    return out


def start(cifar_dir: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train_resnet_cifar.py", *args(cifar_dir, out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if line.startswith(prefix):
            return
        assert time.monotonic() < deadline, f"no line starting {prefix!r}"
    raise AssertionError(f"process ended before printing {prefix!r}: {proc.stderr.read()[-2000:]}")


def test_two_epochs_plus_resume_equals_four_straight(cifar_dir, tmp_path, straight):
    out = tmp_path / "run"
    assert train(*args(cifar_dir, out, "--stop-after-epoch", "2")) == 0
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1, 2]
    assert not (out / "summary.json").exists()
    assert train(*args(cifar_dir, out, "--resume")) == 0
    assert_same_run(straight, out, epochs=4)
    import json

    assert json.loads((out / "config.json").read_text())["extra"]["resumed_from"] == "epoch 2 step 0"


def test_sigint_mid_epoch_saves_resumes_and_matches(cifar_dir, tmp_path, straight):
    out = tmp_path / "run"
    proc = start(cifar_dir, out)
    wait_for_line(proc, "epoch   1/4")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    ck = load_checkpoint(out / "last.pt")
    assert ck["epoch"] == 1 and ck["step"] >= 1, "stopped inside epoch 2, at the end of a step"
    assert train(*args(cifar_dir, out, "--resume")) == 0
    assert_same_run(straight, out, epochs=4)


def test_second_ctrl_c_quits_at_once_leaving_a_loadable_checkpoint(cifar_dir, tmp_path):
    out = tmp_path / "run"
    proc = start(cifar_dir, out)
    wait_for_line(proc, "epoch   1/4")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert load_checkpoint(out / "last.pt")["epoch"] >= 1
    assert not list(out.glob(".*.tmp")), "no temp file left behind"


def test_sigkill_mid_epoch_then_resume_loses_nothing(cifar_dir, tmp_path, straight):
    out = tmp_path / "run"
    proc = start(cifar_dir, out)
    wait_for_line(proc, "epoch   2/4")
    time.sleep(0.4)  # inside epoch 3
    proc.kill()
    proc.communicate(timeout=60)
    ck = torch.load(out / "last.pt", weights_only=True)  # loadable after a SIGKILL
    assert ck["epoch"] in (2, 3) and ck["step"] == 0
    assert train(*args(cifar_dir, out, "--resume")) == 0
    assert_same_run(straight, out, epochs=4)  # no epoch twice, none missing, same numbers


def test_resume_refuses_other_settings_and_names_them(cifar_dir, tmp_path, straight):
    with pytest.raises(UserError) as e:
        from common.config import build_parser, config_from_args
        from common.trainer import prepare_run_folder

        a = build_parser("", "resnet18", "").parse_args(
            args(cifar_dir, straight, "--resume", "--img-size", "64", "--batch-size", "16"))
        prepare_run_folder(config_from_args(a, "resnet", "resnet18", "resnet"))
    msg = str(e.value)
    assert "img_size: 32" in msg and "64" in msg and "batch_size" in msg and "--output-dir" in msg


def test_resume_of_a_finished_run_says_so(cifar_dir, straight):
    before = (straight / "last.pt").stat().st_mtime_ns
    r = run_cli("train_resnet_cifar.py", *args(cifar_dir, straight, "--resume"))
    assert r.returncode == 0 and "is finished" in r.stdout
    assert (straight / "last.pt").stat().st_mtime_ns == before


def test_existing_run_is_not_overwritten_without_a_flag(cifar_dir, straight, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in straight.iterdir()}
    with pytest.raises(SystemExit) as e:
        train(*args(cifar_dir, straight))
    assert e.value.code == 2
    msg = capsys.readouterr().err
    assert "--resume" in msg and "--output-dir" in msg and "--overwrite" in msg
    assert {p.name: p.stat().st_mtime_ns for p in straight.iterdir()} == before


def test_overwrite_replaces_the_old_run(cifar_dir, tmp_path, straight):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    assert train(*args(cifar_dir, out, "--overwrite", "--epochs", "1")) == 0
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1]


def test_persistent_nan_loss_stops_with_advice(cifar_dir, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train_resnet_cifar.py", *args(cifar_dir, out, "--lr", "1e12"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "NaN/Inf" in r.stderr and "--lr" in r.stderr
    assert not (out / "last.pt").exists(), "no checkpoint of diverged weights"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bare_state_dict"])
def test_damaged_last_pt_gives_one_line(cifar_dir, tmp_path, straight, damage):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    last = out / "last.pt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "garbage":
        last.write_bytes(os.urandom(4096))
    else:
        torch.save(torch.load(last, weights_only=True)["model"], last)
    r = run_cli("train_resnet_cifar.py", *args(cifar_dir, out, "--resume"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(last) in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert ("not a checkpoint" in r.stderr) if damage == "bare_state_dict" else ("corrupt" in r.stderr)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "config": {}})
    before = path.read_bytes()

    def no_space(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(UserError) as e:
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "config": {}})
    assert str(path) in str(e.value) and "No space left" in str(e.value) and "intact" in str(e.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_unwritable_output_dir_is_a_clear_error(cifar_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit):
        train(*args(cifar_dir, blocker / "run"))
    err = capsys.readouterr().err
    assert "--output-dir" in err and str(blocker / "run") in err and "not writable" in err
