"""Faults and mistakes, driven exactly (CIFAR_FAILPOINT, common/faults.py): kills, signals and full
disks at each phase of a run, a second process on the same folder, damaged files, changed flags.
Every case: nothing already written is lost, the error is one line, and the resumed run equals an
uninterrupted one.

The default run covers each kind of fault once; `python -m pytest -m slow tests/test_resilience.py`
runs the whole matrix (every signal at every phase)."""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from common.checkpoint import load_checkpoint, save_checkpoint
from common.errors import UserError
from common.runfolder import RunLock
from conftest import (ROOT, assert_same_run, one_line_error, one_line_error_in_process, run_cli,
                      train)

# 10 steps per epoch on 320 images with timm's 0.4M-parameter test_resnet (a ResNet with BatchNorm
# and an fc head, made for tests): the mechanics are the model's, at a fraction of ResNet-18's time.
# On the CPU, where resume is promised bit-exact.
TINY = ["--model", "test_resnet", "--no-pretrained", "--device", "cpu", "--epochs", "4",
        "--img-size", "32", "--batch-size", "32", "--num-workers", "0", "--val-size", "160",
        "--train-subset", "320", "--test-subset", "200", "--seed", "0"]


def args(cifar_dir: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY, "--data-dir", str(cifar_dir), "--output-dir", str(out), *extra]


def resnet(*argv: str) -> int:
    return train("train_resnet_cifar", *argv)


def with_fault(point: str, cifar_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The train script in a subprocess that meets CIFAR_FAILPOINT=point."""
    return run_cli("train_resnet_cifar.py", *args(cifar_dir, out, *extra),
                   env={"CIFAR_FAILPOINT": point})


@pytest.fixture(scope="module")
def straight(cifar_dir, tmp_path_factory) -> Path:
    """4 epochs without interruption: the reference every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert resnet(*args(cifar_dir, out)) == 0
    return out


def same_test_result(a: Path, b: Path) -> None:
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    assert sa["test_acc"] == sb["test_acc"] and sa["best_epoch"] == sb["best_epoch"]
    assert (a / "test_predictions.csv").read_text() == (b / "test_predictions.csv").read_text()


# ----------------------------------------------------------------------------- resume is exact

def test_two_epochs_plus_resume_equals_four_straight(cifar_dir, tmp_path, straight, capsys):
    out = tmp_path / "run"
    assert resnet(*args(cifar_dir, out, "--stop-after-epoch", "2")) == 0
    assert (pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1, 2]
            and not (out / "summary.json").exists())
    assert resnet(*args(cifar_dir, out, "--resume")) == 0
    assert f"resuming {out} at epoch 3 step 0/10" in capsys.readouterr().err
    assert_same_run(straight, out, epochs=4)
    same_test_result(straight, out)
    assert json.loads((out / "config.json").read_text())["run"]["resumed"] == ["epoch 3 step 0"]


@pytest.fixture(scope="module")
def straight_mixup(cifar_dir, tmp_path_factory) -> Path:
    """The straight run with mixup, which draws from numpy's global RNG during the epoch."""
    out = tmp_path_factory.mktemp("straight_mixup") / "run"
    assert resnet(*args(cifar_dir, out, "--mixup", "0.4")) == 0
    return out


def test_ctrl_c_mid_epoch_with_loader_workers_resumes_exactly(cifar_dir, tmp_path, straight_mixup):
    """A terminal's Ctrl+C (SIGINT to the whole process group, the 2 DataLoader workers included)
    at step 15, in epoch 2, with mixup: the stop line once (the workers leave it to the trainer), a
    mid-epoch last.pt with the RNG states; the resumed run (any worker count) sees the same
    augmented, mixed batches and ends identical."""
    out = tmp_path / "run"
    r = with_fault("step:15@pgint", cifar_dir, out, "--num-workers", "2", "--mixup", "0.4")
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.count("SIGINT: finishing this step, then saving") == 1, r.stderr[-2000:]
    assert ("stopped in epoch 2 at step 15/10" not in r.stderr
            and "stopped in epoch 2 at step 5/10" in r.stderr)
    assert "continue with: python train_resnet_cifar.py" in r.stderr and "--resume" in r.stderr
    ck = load_checkpoint(out / "last.pt")
    assert (ck["epoch"], ck["step"]) == (1, 5) and ck["partial"]["count"] == 5 * 32
    assert resnet(*args(cifar_dir, out, "--resume", "--num-workers", "1", "--mixup", "0.4")) == 0
    assert_same_run(straight_mixup, out, epochs=4)


def test_sigkill_after_a_metrics_row_before_its_checkpoint_resumes_exactly(
        cifar_dir, tmp_path, straight, capsys):
    out = tmp_path / "run"
    r = with_fault("epoch:3@kill", cifar_dir, out)
    assert r.returncode == -signal.SIGKILL
    assert (pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
            and load_checkpoint(out / "last.pt")["epoch"] == 2)
    assert resnet(*args(cifar_dir, out, "--resume")) == 0
    assert "epoch 3 is past the checkpoint (epoch 2) (repaired)" in capsys.readouterr().err
    assert_same_run(straight, out, epochs=4)
    same_test_result(straight, out)


def test_a_kill_before_the_first_checkpoint_can_be_resumed(cifar_dir, tmp_path, straight, capsys):
    """Killed after epoch 1's row but before its last.pt: --resume starts over and says so (not
    'nothing to resume')."""
    out = tmp_path / "run"
    assert with_fault("epoch:1@kill", cifar_dir, out).returncode == -signal.SIGKILL
    assert (out / "metrics.csv").is_file() and not (out / "last.pt").exists()
    assert resnet(*args(cifar_dir, out, "--resume")) == 0
    assert "has no checkpoint yet" in capsys.readouterr().err
    assert_same_run(straight, out, epochs=4)


@pytest.mark.slow
def test_an_interrupt_during_the_final_test_is_finished_by_resume(
        cifar_dir, tmp_path, straight, capsys):
    out = tmp_path / "run"
    r = with_fault("test@term", cifar_dir, out)
    assert (r.returncode == 128 + signal.SIGTERM
            and "stopped during the final test" in r.stderr), r.stderr[-1500:]
    assert not (out / "summary.json").exists() and load_checkpoint(out / "last.pt")["finished"]
    before = (out / "last.pt").stat().st_mtime_ns
    assert resnet(*args(cifar_dir, out, "--resume")) == 0
    assert "epoch   5" not in capsys.readouterr().err, "no training, the test only"
    assert (out / "last.pt").stat().st_mtime_ns == before
    same_test_result(straight, out)


def test_a_kill_while_writing_a_checkpoint_keeps_the_old_one_and_the_temp_file_is_cleaned(
        cifar_dir, tmp_path, straight, capsys):
    out = tmp_path / "run"
    r = with_fault("write:last.pt@kill", cifar_dir, out, "--stop-after-epoch", "0")
    assert r.returncode == -signal.SIGKILL
    temps = list(out.glob(".last.pt.*.tmp"))
    assert temps and not (out / "last.pt").exists(), "killed half-way through the first last.pt"
    assert resnet(*args(cifar_dir, out, "--resume")) == 0
    err = capsys.readouterr().err
    assert "removed 1 temp file(s) of an interrupted write" in err and not list(out.glob(".*.tmp"))
    assert_same_run(straight, out, epochs=4)


# ----------------------------------------------------------------------------- full disks

def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(
        cifar_dir, tmp_path, straight, capsys, monkeypatch):
    out = tmp_path / "run"
    assert resnet(*args(cifar_dir, out, "--stop-after-epoch", "1")) == 0
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    monkeypatch.setenv("CIFAR_FAILPOINT", "write:last.pt@enospc")
    one_line_error_in_process(lambda a: resnet(*a), args(cifar_dir, out, "--resume"), capsys,
                              f"cannot write {out / 'last.pt'}", "No space left on device",
                              "it needs", "MB free", "intact",
                              "choose another --output-dir, then --resume")
    assert (out / "last.pt").read_bytes() == before and not list(out.glob(".*.tmp"))
    monkeypatch.delenv("CIFAR_FAILPOINT")
    assert resnet(*args(cifar_dir, out, "--resume")) == 0
    assert_same_run(straight, out, epochs=4)


def test_a_disk_that_cannot_hold_the_checkpoint_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil as sh

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "config": {}})
    before = path.read_bytes()
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError) as e:
        save_checkpoint(path, {"model": {"w": torch.zeros(10_000)}, "config": {}})
    assert ("No space left" in str(e.value)
            and re.search(r"it needs 4\d kB, 1 kB free", str(e.value)))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("name", ["config.json", "summary.json", "results.md"])
def test_json_and_results_are_written_atomically(tmp_path, monkeypatch, name):
    """A disk that fills half-way through the write: the previous file stays whole, no temp file is
    left."""
    from common.files import atomic_write, write_json

    path = tmp_path / name
    write = ((lambda d: atomic_write(path, json.dumps(d))) if name.endswith(".md")
             else (lambda d: write_json(path, d)))
    write({"test_acc": 0.5})
    before = path.read_bytes()
    monkeypatch.setenv("CIFAR_FAILPOINT", f"write:{name}@enospc")
    with pytest.raises(UserError, match=f"cannot write {re.escape(str(path))} .No space left"):
        write({"test_acc": 0.9, "pad": "x" * 10_000})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.slow
def test_a_real_file_size_limit_mid_run_is_one_line_and_resumable(cifar_dir, tmp_path, straight):
    """The kernel refuses writes past RLIMIT_FSIZE (as a full quota would): no mocks anywhere."""
    out = tmp_path / "run"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # best.pt (45 MB) fits, last.pt not
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000_000, 60_000_000))

    r = subprocess.run([sys.executable, "train_resnet_cifar.py",
                        *args(cifar_dir, out, "--model", "resnet18")],
                       cwd=ROOT, text=True, capture_output=True, preexec_fn=limit)
    one_line_error(r, "cannot write", "last.pt", "intact")
    assert (not list(out.glob(".*.tmp")) and (out / "best.pt").is_file()
            and not (out / "last.pt").exists())
    # resumed below with the test model: the point is the first run's clean failure
    shutil.rmtree(out)
    assert resnet(*args(cifar_dir, out, "--stop-after-epoch", "1")) == 0
    assert resnet(*args(cifar_dir, out, "--resume")) == 0
    assert_same_run(straight, out, epochs=4)


# --------------------------------------------------------------------------- one process per folder

def test_a_second_process_on_a_running_folder_is_refused(cifar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = RunLock(out)
    holder.acquire()  # another training process holds the folder
    try:
        one_line_error_in_process(lambda a: resnet(*a), args(cifar_dir, out), capsys, str(out),
                                  "in use by another training process", f"pid {os.getpid()}")
        one_line_error_in_process(lambda a: resnet(*a), args(cifar_dir, out, "--resume"), capsys,
                                  "in use")
    finally:
        holder.release()


def test_a_stale_lock_of_a_dead_process_is_taken_over(cifar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("")  # the lock file a killed process left (its OS lock died with it)
    (out / ".lock.holder").write_text(f"pid 999999999 on {socket.gethostname()} since 2026-01-01 "
                                      "00:00:00\n")
    assert resnet(*args(cifar_dir, out, "--epochs", "1")) == 0
    assert "took over the lock of pid 999999999" in capsys.readouterr().err
    assert (not (out / ".lock").exists()
            and not (out / ".lock.holder").exists()), "released at the end"


# ----------------------------------------------------------------------------- damaged files

def test_a_damaged_metrics_csv_is_repaired_on_resume(cifar_dir, tmp_path, straight, capsys):
    out = tmp_path / "run"
    assert resnet(*args(cifar_dir, out, "--stop-after-epoch", "2")) == 0
    lines = (out / "metrics.csv").read_text().splitlines(keepends=True)
    # epoch 2 twice, a cut-off row
    (out / "metrics.csv").write_text("".join(lines) + lines[2] + lines[2][:20])
    assert resnet(*args(cifar_dir, out, "--resume")) == 0
    err = capsys.readouterr().err
    assert ("line 4: epoch 2 appears twice" in err and "line 5: truncated row" in err
            and "(repaired)" in err)
    assert_same_run(straight, out, epochs=4)


@pytest.mark.parametrize("damage,words", [
    ("truncated", "truncated: the file ends before its zip directory"),
    ("garbage", "not a PyTorch file"),
    ("bare_state_dict", "not a checkpoint of this repository"),
    ("other_model", "does not fit ResNet: 1 missing (fc.bias)"),
    ("newer", "holds a run record of format 4, newer than this version reads (3)")])
def test_a_damaged_or_foreign_last_pt_says_what_is_wrong(
        cifar_dir, tmp_path, straight, capsys, damage, words):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    last = out / "last.pt"
    ck = torch.load(last, weights_only=True)
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "garbage":
        # fixed bytes (os.urandom made the test flaky)
        last.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "bare_state_dict":
        torch.save(ck["model"], last)
    elif damage == "newer":  # written by a later version of this repository
        ck["record"]["format"] = 4
        ck["finished"], ck["epoch"] = False, 3
        torch.save(ck, last)
    else:
        ck["model"].pop("fc.bias")
        ck["finished"] = False
        ck["epoch"] = 3
        torch.save(ck, last)
    one_line_error_in_process(lambda a: resnet(*a), args(cifar_dir, out, "--resume"), capsys,
                              str(last), words)


def test_resume_refuses_other_settings_and_names_them(cifar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert resnet(*args(cifar_dir, out, "--stop-after-epoch", "1")) == 0
    one_line_error_in_process(lambda a: resnet(*a), args(cifar_dir, out, "--resume", "--img-size",
                                                         "64", "--batch-size", "16", "--grad-clip",
                                                         "1", "--momentum", "0.8"), capsys,
                              "img_size: 32 in the checkpoint, 64 now", "batch_size", "grad_clip",
                              "momentum", "--output-dir")
    one_line_error_in_process(lambda a: resnet(*a),
                              args(cifar_dir, out, "--resume", "--data-pipeline", "device"), capsys,
                              "run.data_pipeline differs ('cpu' in the checkpoint, 'device' now)")
    one_line_error_in_process(lambda a: resnet(*a),
                              args(cifar_dir, out, "--resume", "--aug", "light"), capsys,
                              "recipe differs")


# ----------------------------------------------------------------------------- --epochs on resume

def test_raising_epochs_on_resume_continues_the_cosine_from_where_it_stands(
        cifar_dir, tmp_path, capsys):
    from common.engine import CosineSchedule

    out = tmp_path / "run"
    assert resnet(*args(cifar_dir, out, "--stop-after-epoch", "2")) == 0
    assert resnet(*args(cifar_dir, out, "--resume", "--epochs", "6")) == 0
    assert "the cosine schedule continues from lr" in capsys.readouterr().err
    lr = pd.read_csv(out / "metrics.csv")["lr"].to_numpy()
    s = CosineSchedule(4, 0, floor=0.01)  # per epoch (the default): the lr each epoch trained at
    s.retarget(2, 6)
    expected = [3e-4 * s(e) for e in range(6)]
    assert lr == pytest.approx(expected, rel=1e-5)
    assert all(a >= b for a, b in zip(lr, lr[1:])), "no jump back up"


def test_lowering_epochs_below_those_done_is_a_clear_error_and_a_finished_run_is_not_extended(
        cifar_dir, tmp_path, straight, capsys):
    out = tmp_path / "run"
    assert resnet(*args(cifar_dir, out, "--stop-after-epoch", "2")) == 0
    one_line_error_in_process(lambda a: resnet(*a),
                              args(cifar_dir, out, "--resume", "--epochs", "1"), capsys,
                              "--epochs 1 is below the 2 epochs", "--epochs 2 to end the run there")
    assert (resnet(*args(cifar_dir, out, "--resume", "--epochs", "2"))
            == 0), "--epochs = epochs done ends the run"
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 2
    one_line_error_in_process(lambda a: resnet(*a),
                              args(cifar_dir, straight, "--resume", "--epochs", "8"), capsys,
                              "finished its 4-epoch cosine schedule", "another --output-dir")


def test_resume_of_a_finished_run_says_so_and_touches_nothing(cifar_dir, straight, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in straight.iterdir()}
    assert resnet(*args(cifar_dir, straight, "--resume")) == 0
    assert "is finished" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in straight.iterdir()} == before


def test_an_existing_run_is_not_overwritten_without_a_flag(cifar_dir, straight, tmp_path, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in straight.iterdir()}
    one_line_error_in_process(lambda a: resnet(*a), args(cifar_dir, straight), capsys, "--resume",
                              "--output-dir", "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in straight.iterdir()} == before
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    assert resnet(*args(cifar_dir, out, "--overwrite", "--epochs", "1")) == 0
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1]


def test_a_loss_that_stays_nan_stops_with_advice_and_no_checkpoint(cifar_dir, tmp_path, capsys):
    """Weights with an Inf in them (a damaged file): every loss is NaN; the run stops with advice,
    saving nothing."""
    import timm

    state = timm.create_model("test_resnet", num_classes=10).state_dict()
    state["conv1.0.weight"][0, 0, 0, 0] = float("inf")
    torch.save(state, tmp_path / "bad.pth")
    out = tmp_path / "run"
    flags = [a for a in args(cifar_dir, out) if a != "--no-pretrained"]
    one_line_error_in_process(lambda a: resnet(*a),
                              [*flags, "--weights", str(tmp_path / "bad.pth")], capsys,
                              "NaN/Inf for 10 steps in a row", "--lr", "--grad-clip")
    assert not (out / "last.pt").exists(), "no checkpoint of diverged weights"


def test_an_unwritable_output_dir_is_a_clear_error(cifar_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error_in_process(lambda a: resnet(*a), args(cifar_dir, blocker / "run"), capsys,
                              "--output-dir", str(blocker / "run"), "not writable")


# -------------------------------------------------------------------------- the whole matrix (slow)

@pytest.mark.slow
@pytest.mark.parametrize("point", ["step:15@kill", "step:15@term", "step:25@int", "epoch:2@kill",
                                   "write:best.pt@kill", "write:last.pt@kill", "test@kill",
                                   "test@int", "summary@kill", "write:summary.json@kill",
                                   "write:test_predictions.csv@kill"])
def test_every_fault_at_every_phase_resumes_to_the_straight_run(
        cifar_dir, tmp_path, straight, point):
    out = tmp_path / "run"
    r = with_fault(point, cifar_dir, out)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = run_cli("train_resnet_cifar.py", *args(cifar_dir, out, "--resume"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert_same_run(straight, out, epochs=4)
    same_test_result(straight, out)
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("action", ["kill", "int"])
def test_a_fault_while_decoding_an_image_folder_leaves_no_cache_and_the_next_run_works(
        tmp_path, action):
    from test_sources import image_folder

    folder = image_folder(tmp_path / "f", n_test=5)
    # 2,000+ files: decoded in chunks, the fault mid-way
    for i, f in enumerate(sorted(folder.rglob("*.png"))):
        for k in range(10):
            shutil.copy(f, f.with_name(f"{f.stem}_{k}.png"))
    flags = ["--no-pretrained", "--epochs", "1", "--img-size", "32", "--batch-size", "32",
             "--num-workers", "0", "--val-size", "100", "--data-dir", str(folder), "--output-dir",
             str(tmp_path / "run")]
    r = run_cli("train_resnet_cifar.py", *flags, env={"CIFAR_FAILPOINT": f"decode@{action}"})
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert not list(tmp_path.glob("f.decoded-*.npz"))
    r = run_cli("train_resnet_cifar.py", *flags, "--resume")
    assert r.returncode == 0, r.stderr[-1500:]
    assert list(tmp_path.glob("f.decoded-*.npz")) and (tmp_path / "run" / "summary.json").is_file()
