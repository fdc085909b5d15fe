"""The sweep (run_suite.py): a grid of ordinary train commands with deterministic folders run
through submitit (debug in this process, local as job processes, Slurm as a job array that
requeues), resumable, refusing bad grids up front; and the analysis across training-set sizes
(results.md by size, data_efficiency.png)."""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_same_run, one_line_error_in_process
from test_analysis import right, write_run

import run_suite
from common import suite as S
from common.models import create_model
from common.report import report
from common.specs import resolve_model

TRAIN = ["--epochs", "2", "--img-size", "32", "--batch-size", "32", "--val-size", "400",
         "--test-subset", "100", "--num-workers", "0", "--aug", "light", "--device", "cpu",
         "--data-pipeline", "device"]
# the whole grid's runs: one epoch, a smaller validation split
GRID_TRAIN = ["--epochs", "1", "--img-size", "32", "--batch-size", "32", "--val-size", "200",
              "--test-subset", "100", "--num-workers", "0", "--aug", "light", "--device", "cpu",
              "--data-pipeline", "device"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """ImageNet-shaped (1000-class) weight files of the test models, standing in for downloaded
    ones."""
    folder = tmp_path_factory.mktemp("weights")
    out = {}
    for arch in ("test_resnet", "test_vit"):
        torch.manual_seed(0)
        path = folder / f"{arch}.pth"
        torch.save(create_model(resolve_model(arch, False), 32, 1000).state_dict(), path)
        out[arch] = str(path)
    return out


def suite(cifar_dir, root, weights, *extra, models=("test_resnet", "test_vit"),
          sizes=("200", "400"), seeds=("0", "1"), train=TRAIN) -> list[str]:
    return ["--data-dir", str(cifar_dir), "--root", str(root), "--models", *models, "--train-sizes",
            *sizes, "--seeds", *seeds, "--launcher", "debug",
            *(["--weights", *(f"{a}={p}" for a, p in weights.items())] if weights else []),
            *extra, "--", *train]


def test_a_2x2x2x2_grid_runs_every_folder_and_ends_with_the_size_analysis(
        cifar_dir, tmp_path, weights, capsys):
    """Seeds 1 and 2 (not 0 and 1, so that a seed taken from the run's position shows), one epoch
    each: every folder holds the run its name says, trained with that seed, size and init."""
    root = tmp_path / "suite"
    grid = dict(seeds=("1", "2"), train=GRID_TRAIN)
    assert run_suite.main(suite(cifar_dir, root, weights, **grid)) == 0
    folders = sorted(p.parent for p in root.glob("*/*/*/summary.json"))
    assert len(folders) == 16
    for folder in folders:
        name, size, seed = folder.relative_to(root).parts
        cfg = json.loads((folder / "config.json").read_text())
        assert (cfg["config"]["seed"] == int(seed.removeprefix("seed"))
                and cfg["config"]["train_subset"] == int(size.removeprefix("n"))
                and cfg["data"]["splits"]["train"] == int(size.removeprefix("n"))
                and cfg["model"]["arch"] == name.rsplit("_", 1)[0]
                and cfg["weights"]["init"] == ("file" if name.endswith("_ft") else "random init")
                ), (folder, cfg["config"], cfg["weights"])
    assert {p.relative_to(root).as_posix() for p in folders} >= {"test_resnet_ft/n200/seed1",
                                                                 "test_vit_scratch/n400/"
                                                                 "seed2"}
    text = (root / "results.md").read_text()
    assert text.startswith("# Results across training-set sizes")
    table = text.split("## Test accuracy and gains by training-set size")[1].split(
        "\n\n")[1].splitlines()
    assert (table[0].count("gain") == 3
            and [r.split(" |")[0] for r in table[2:]] == ["| 200", "| 400"])
    assert ((root / "data_efficiency.png").stat().st_size > 20_000
            and (root / "four_panels.png").is_file())
    # a second call finds everything done and runs nothing
    capsys.readouterr()
    assert run_suite.main(suite(cifar_dir, root, weights, "--no-analysis", **grid)) == 0
    assert "16 done (16 from before)" in capsys.readouterr().err


def test_an_interrupted_sweep_skips_finished_runs_and_resumes_the_interrupted_one(
        cifar_dir, tmp_path, weights, monkeypatch):
    """Ctrl+C in the middle of the sweep's third run (it saves at its step, the sweep stops); the
    restarted sweep skips the two finished runs, resumes the third and runs the fourth: every folder
    equals an uninterrupted sweep's."""
    one = {"test_resnet": weights["test_resnet"]}
    grid = dict(models=("test_resnet",), sizes=("200",), seeds=("0", "1"))
    straight, root = tmp_path / "straight", tmp_path / "interrupted"
    assert run_suite.main(suite(cifar_dir, straight, one, "--no-analysis", **grid)) == 0
    real, calls = S._run_in_process, []

    def interrupting(run):
        calls.append(run)
        if len(calls) < 3:
            return real(run)
        # run 3 of 4, in its second epoch (6 steps each)
        monkeypatch.setenv("CIFAR_FAILPOINT", "step:9@int")
        code, _ = real(run)
        monkeypatch.delenv("CIFAR_FAILPOINT", raising=False)
        assert code == 130
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "_run_in_process", interrupting)
    assert run_suite.main(suite(cifar_dir, root, one, "--no-analysis", **grid)) == 130
    runs = S.plan_grid(["test_resnet"], ["pretrained", "scratch"], [200], [0, 1], root, [], {})
    assert [S.status_of(r) for r in runs] == ["done", "done", "interrupted", "new"]
    restarted = []
    monkeypatch.setattr(S, "_run_in_process", lambda run: restarted.append(run) or real(run))
    assert run_suite.main(suite(cifar_dir, root, one, "--no-analysis", **grid)) == 0
    assert [r.folder for r in restarted] == [r.folder for r in runs[2:]], "finished runs skipped"
    for r in runs:
        assert_same_run(straight / r.folder.relative_to(root), r.folder, epochs=2)


def _kill_the_launcher_alone(cifar_dir, tmp_path, weights, sig):
    """run_suite.py --launcher local with one run, paused by the failpoint at its step 3; `sig` to
    run_suite.py's process alone (not its group); then what is left: (its exit, its stderr, the
    run folder)."""
    import subprocess
    import sys

    root = tmp_path / "local"
    argv = suite(cifar_dir, root, weights, "--no-analysis", "--modes", "scratch",
                 models=("test_resnet",), sizes=("200",), seeds=("0",))
    argv[argv.index("debug")] = "local"
    mark = tmp_path / "paused"
    env = {**os.environ, "CIFAR_FAILPOINT": "step:3@pause", "CIFAR_FAILPOINT_MARK": str(mark),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "run_suite.py", *argv], cwd=str(ROOT), env=env,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # waiting for the run to reach the failpoint, not timing it
        assert mark.exists(), "the run never reached its step 3"
        os.kill(proc.pid, sig)
        err = proc.communicate(timeout=240)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, root / "test_resnet_scratch" / "n200" / "seed0", argv


def test_a_launcher_killed_alone_stops_its_runs_with_a_checkpoint_and_a_rerun_resumes(
        cifar_dir, tmp_path, weights, capsys):
    """The local launcher runs each job as its own process, logging to the run's train.log. `kill
    PID` of run_suite.py (SIGTERM to it alone, not to its process group): the running run saves at
    its step and stops, nothing keeps training unsupervised; the same grid run again then continues
    the run (--resume) to its end."""
    from common import runfolder as RF
    from common.checkpoint import load_checkpoint

    code, err, folder, argv = _kill_the_launcher_alone(cifar_dir, tmp_path, weights,
                                                       signal.SIGTERM)
    assert code == 130 and "stopped: the running runs saved their checkpoints" in err, err[-2000:]
    assert not RF.in_use(folder), "the train process outlived the launcher"
    assert load_checkpoint(folder / "last.pt")["step"] == 3
    log = (folder / "train.log").read_text()
    assert log.startswith(S.ATTEMPT) and "epoch 1" in log, "the job's own log"
    # the rerun (in this process: the launcher does not matter to the resume) continues the run
    argv[argv.index("local")] = "debug"
    capsys.readouterr()
    assert run_suite.main(argv) == 0
    assert "resuming" in capsys.readouterr().err
    root = folder.parents[2]
    assert [p.parent.relative_to(root).as_posix() for p in root.glob("*/*/*/summary.json")] == [
        "test_resnet_scratch/n200/seed0"]


@pytest.mark.slow
def test_a_launcher_killed_with_sigkill_still_leaves_no_run_training(cifar_dir, tmp_path,
                                                                     weights):
    """SIGKILL cannot be handled: the job's process gets a SIGINT when the launcher dies (Linux's
    parent-death signal), and the train process its SIGTERM: it saves, then exits."""
    from common import runfolder as RF
    from common.checkpoint import load_checkpoint

    code, err, folder, _ = _kill_the_launcher_alone(cifar_dir, tmp_path, weights, signal.SIGKILL)
    assert code == -signal.SIGKILL
    deadline = time.monotonic() + 120
    while RF.in_use(folder) and time.monotonic() < deadline:
        time.sleep(0.2)  # the orphaned train process saving; bounded
    assert not RF.in_use(folder), "the train process outlived the launcher"
    assert load_checkpoint(folder / "last.pt")["step"] == 3


def test_the_slurm_path_submits_one_array_whose_tasks_run_the_grid_and_requeue(
        cifar_dir, tmp_path, weights, monkeypatch):
    """Without Slurm: the sbatch script submitit would submit (array size and parallelism, GPUs,
    time, the requeue signal) and the command of every task; a task's checkpoint() requeues the same
    run (--resume)."""
    import submitit
    from submitit.core import core

    scripts = []

    class FakeSbatch:
        def __init__(self, command, verbose=False):
            self.command = command

        def __call__(self):
            scripts.append(Path(self.command[-1]).read_text())
            return "Submitted batch job 4242\n"

    monkeypatch.setattr(core.utils, "CommandFunction", FakeSbatch)
    # a login node has sbatch and srun
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    root = tmp_path / "slurm"
    runs = S.plan_grid(["test_resnet", "test_vit"], ["pretrained", "scratch"], [200, 400], [0, 1],
                       root, ["--data-dir", str(cifar_dir), *TRAIN], weights)
    progress = S.Progress(runs, {r.folder: "queued" for r in runs})
    executor = S.slurm_executor(root / ".submitit", "gpu", 1, 240, 4)
    jobs = S.run_slurm(runs, root / ".submitit", progress, S.StatusBoard(), executor, wait=False)
    assert len(jobs) == 16 and len(scripts) == 1
    sbatch = scripts[0]
    for line in ("#SBATCH --array=0-15%4", "#SBATCH --gpus-per-node=1", "#SBATCH --time=240",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@120",
                 "#SBATCH --open-mode=append"):
        assert line in sbatch, line
    tasks = []
    for job in jobs:
        with open(job.paths.submitted_pickle, "rb") as f:
            tasks.append(pickle.load(f).function)
    assert [t.run for t in tasks] == runs and all("--resume" in t.run.argv for t in tasks)
    # a task that hits --time is requeued (and resumes) up to 30 times: 30 x 240 min, where
    # submitit's default, 3, would end a long run after its fourth time limit
    delayed = []
    for job in jobs:
        with open(job.paths.submitted_pickle, "rb") as f:
            delayed.append(pickle.load(f))
    assert {(d._timeout_min, d._timeout_countdown) for d in delayed} == {(240, 30)}
    requeued = tasks[3].checkpoint()
    assert (isinstance(requeued, submitit.helpers.DelayedSubmission)
            and requeued.function.run == runs[3])


def test_every_run_of_a_grid_gets_the_micro_batch_its_hungriest_model_needs(cifar_dir, tmp_path):
    """BatchNorm sees the micro-batch, so the runs of one experiment must share it: on a card where
    one model needs 2 accumulation steps at --batch-size 32 and the other none, every run of the
    grid is given --grad-accum-steps 2, and the line says why; train flags that fix it are kept."""
    from common import memory as M
    from common.data.augment import resolve_recipe
    from common.data.streams import default_chunk

    archs = ("test_resnet", "test_vit")
    runs = S.plan_grid(list(archs), ["scratch"], [200], [0], tmp_path, TRAIN, {})
    recipe = resolve_recipe(runs[0].config().aug)  # TRAIN's: light, AMP on (as on a GPU)
    chunk = default_chunk(recipe, 32)
    costs = {a: M.measure_costs(create_model(resolve_model(a, False), 32, 10), 32,
                                torch.bfloat16, None, recipe, True, 1600, 10_000) for a in archs}
    # the plan shrinks the augmentation chunk before the micro-batch: compare at one batch a chunk
    need = {a: c.train_bytes(32, 32) for a, c in costs.items()}
    hungry, other = sorted(archs, key=need.get, reverse=True)
    free = int((max(need[other], costs[hungry].train_bytes(16, 16)) + M.HEADROOM)
               / M.SAFETY) + 1
    assert need[hungry] > M.usable_bytes(free) >= need[other] and chunk > 1
    fixed, line = S.fix_micro_batch(runs, (free, 8 * 2**30), 1600)
    assert all(r.argv[-2:] == ("--grad-accum-steps", "2") for r in fixed)
    assert line.startswith("one micro-batch for every run: 16 x 2 accumulation steps "
                           f"(--grad-accum-steps 2), what {hungry} needs"), line
    assert f"{other} alone: 32 x 1" in line
    told = S.plan_grid(["test_resnet"], ["scratch"], [200], [0], tmp_path,
                       [*TRAIN, "--grad-accum-steps", "4"], {})
    assert S.fix_micro_batch(told, (free, 8 * 2**30), 1600) == (told, "")
    assert S.fix_micro_batch(runs, None, 1600) == (runs, ""), "no GPU: no accumulation"


@pytest.mark.parametrize("case,words", [
    ("model", "--models nope: not a model"),
    ("size", "--train-sizes 5000: larger than the 1600 training images"),
    ("seeds", "--seeds lists 1 twice"), ("clash", "set --seed, which the suite sets per run"),
    ("weights", "--weights resnet18: give ARCH=PATH"),
    ("slurm", "--launcher slurm: no sbatch/srun on this machine's PATH"),
    ("no-gpu", "--launcher slurm from a machine without a GPU: give --gpu-memory GIB"),
    ("recipe", "holds a run of another recipe (lr: 0.0003 in the checkpoint, 0.001 now)"),
    ("one-too-many", "--train-sizes 1601: larger than the 1600 training images"),
    ("same", "--train-sizes 0 and 1600 are the same training set"),
    ("negative", "--train-sizes must be >= 0"),
    ("time", "--time must be >= 1"), ("max-parallel", "--max-parallel must be >= 1"),
    ("gpus-per-run", "--gpus-per-run must be >= 1"), ("gpu-memory", "--gpu-memory must be > 0")])
def test_bad_grids_are_one_line_errors_before_anything_starts(
        cifar_dir, tmp_path, weights, capsys, monkeypatch, case, words):
    root = tmp_path / "s"
    argv = {"model": suite(cifar_dir, root, {}, models=("nope",)),
            "size": suite(cifar_dir, root, {}, sizes=("5000",)),
            "seeds": suite(cifar_dir, root, {}, seeds=("1", "1")),
            "clash": suite(cifar_dir, root, {}) + ["--seed", "3"],
            "weights": ["--data-dir", str(cifar_dir), "--weights", "resnet18"],
            # the micro-batch fixed, so that nothing is planned before the refusal
            "slurm": suite(cifar_dir, root, {}, "--launcher", "slurm",
                           train=[*TRAIN, "--grad-accum-steps", "1"]),
            "no-gpu": suite(cifar_dir, root, {}, "--launcher", "slurm"),
            "one-too-many": suite(cifar_dir, root, {}, sizes=("1601",)),
            "same": suite(cifar_dir, root, {}, sizes=("0", "1600")),
            "negative": suite(cifar_dir, root, {}, sizes=("-1",)),
            "time": suite(cifar_dir, root, {}, "--time", "0"),
            "max-parallel": suite(cifar_dir, root, {}, "--max-parallel", "0"),
            "gpus-per-run": suite(cifar_dir, root, {}, "--gpus-per-run", "0"),
            "gpu-memory": suite(cifar_dir, root, {}, "--gpu-memory", "0")}.get(case)
    # no probe of the hub for the pretrained runs' weights (its timeout is not what is tested)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if case == "slurm":
        monkeypatch.setenv("PATH", str(tmp_path))  # this machine is no login node
    if case == "recipe":
        grid = dict(models=("test_resnet",), sizes=("200",), seeds=("0",))
        assert run_suite.main(suite(cifar_dir, root, weights, "--no-analysis", "--modes", "scratch",
                                    **grid)) == 0
        argv = suite(cifar_dir, root, weights, "--modes", "scratch", **grid) + ["--lr", "1e-3"]
    one_line_error_in_process(run_suite.main, argv, capsys, words)
    if case != "recipe":
        assert not root.exists(), "nothing started"


def test_the_full_training_split_is_a_size_the_grid_allows(cifar_dir, tmp_path, capsys):
    """The bound's edge: 1600 training images are left after the validation split, and 1600 (as
    0, all of them) is a size that plans and runs; 1601 is refused (above)."""
    for sizes in (("1600",), ("0",), ("200", "1600")):
        assert run_suite.main(suite(cifar_dir, tmp_path / "d", {}, "--dry-run",
                                    sizes=sizes)) == 0, sizes
    out = capsys.readouterr().out
    assert "--train-subset 1600 --seed 1" in out and "--train-subset 0 --seed 1" in out


def test_every_run_trains_the_seed_size_and_weights_its_folder_names(tmp_path):
    """--seeds 1 2 3 trains seeds 1, 2 and 3 (not the runs' positions 0, 1, 2); each folder's
    command resolves to the seed, size, model and init its path names, a control's weights
    included."""
    runs = S.plan_grid(["test_resnet", "tiny_vit_5m_224.in1k"], ["pretrained", "scratch"],
                       [300, 0], [1, 2, 3], tmp_path, TRAIN, {})
    assert len(runs) == 2 * 2 * 2 * 3
    for r in runs:
        name, size, seed = r.folder.relative_to(tmp_path).parts
        cfg = r.config()
        assert (cfg.seed == r.seed == int(seed.removeprefix("seed"))
                and cfg.train_subset == r.size == (0 if size == "nall" else
                                                   int(size.removeprefix("n")))
                and cfg.pretrained == name.endswith("_ft") and cfg.output_dir == str(r.folder)
                and cfg.resume), (r.folder, cfg)
        model = name.removesuffix("_ft").removesuffix("_scratch")
        assert cfg.model == (model if cfg.pretrained else model.split(".")[0]), (r.folder,
                                                                                   cfg.model)
    assert sorted({r.seed for r in runs}) == [1, 2, 3]


def test_the_local_launcher_gives_each_running_run_its_own_gpu(tmp_path, monkeypatch):
    """Three runs on the GPUs the user made visible (2 and 5): each job is pinned to one GPU (its
    CUDA_VISIBLE_DEVICES, by submitit's visible_gpus), two run at once on different GPUs, and the
    third takes the GPU the first one freed; on a CPU, one at a time with no GPU."""
    import submitit

    submitted, running = [], []

    class FakeJob:
        def __init__(self, gpus, job):
            self.gpus, self.job, self.polls = gpus, job, 0

        def done(self):
            self.polls += 1
            if self.polls < 2 + len(submitted):  # the later jobs run longer
                return False
            if self in running:
                running.remove(self)
            return True

        def result(self):
            return 1, "error: a stand-in job"

    class FakeExecutor:
        def __init__(self, folder):
            self.params = {}

        def update_parameters(self, **params):
            self.params = params

        def submit(self, job):
            gpus = tuple(self.params["visible_gpus"])
            assert len(gpus) == self.params["gpus_per_node"]
            assert not any(j.gpus == gpus for j in running), f"GPU {gpus} given twice at once"
            j = FakeJob(gpus, job)
            submitted.append(j)
            running.append(j)
            return j

    monkeypatch.setattr(submitit, "LocalExecutor", FakeExecutor)
    runs = S.plan_grid(["test_resnet"], ["scratch"], [200], [0, 1, 2], tmp_path, TRAIN, {})
    for gpus, expected in (([2, 5], [(2,), (5,), (2,)]), ([], [(), (), ()])):
        submitted.clear()
        monkeypatch.setattr(S, "visible_gpus", lambda gpus=gpus: gpus)
        progress = S.Progress(runs, {r.folder: "queued" for r in runs})
        S.run_local(runs, tmp_path / "logs", progress, S.StatusBoard(io.StringIO()), poll_s=0)
        assert [j.gpus for j in submitted] == expected
        assert [j.job.run for j in submitted] == runs, "each run once, in the grid's order"
        assert all(progress.state[r.folder] == "failed" for r in runs)


def test_a_failed_run_is_reported_with_the_last_error_of_its_latest_attempt(tmp_path, capsys):
    """train.log is appended across restarts: the report names the latest attempt's last error
    line, not an earlier attempt's, and its last line when it died without one."""
    child = tmp_path / "fake_train.py"
    child.write_text(
        "import pathlib, sys\n"
        "n = pathlib.Path('attempts'); k = int(n.read_text()) + 1 if n.exists() else 1\n"
        "n.write_text(str(k))\n"
        "print(f'epoch 1 step 3 (attempt {k})')\n"
        "if k == 1:\n"
        "    print('error: out of memory on attempt 1'); print('saved last.pt')\n"
        "elif k == 2:\n"
        "    print('error: a first error of attempt 2')\n"
        "    print('error: disk full on attempt 2'); print('progress line after it')\n"
        "else:\n"
        "    print('Segmentation fault (attempt 3)')\n"
        "sys.exit(1)\n")
    folder = tmp_path / "run"
    run = S.Run("test_resnet", "scratch", 0, 0, folder, str(child), (), cwd=str(folder))
    folder.mkdir()
    seen = []
    for _ in range(3):
        code, error = S.TrainJob(run)()
        seen.append((code, error))
    assert seen == [(1, "error: out of memory on attempt 1"), (1, "error: disk full on attempt 2"),
                    (1, "Segmentation fault (attempt 3)")]
    log = (folder / "train.log").read_text()
    assert log.count(S.ATTEMPT) == 3 and "error: out of memory on attempt 1" in log

    class Finished:
        def result(self):
            return seen[-1]

    progress = S.Progress([run], {folder: "running"})
    S._finish(Finished(), run, progress)
    assert progress.state[folder] == "failed"
    assert progress.errors[folder] == "Segmentation fault (attempt 3)"


def test_dry_run_prints_each_command_and_the_projected_time(cifar_dir, tmp_path, weights, capsys):
    """The projection against a hand computation: per run, start-up and test (other_s) plus, per
    epoch, its training images at the training rate and the 400 validation images at the
    evaluation rate; the runs one at a time here (no GPU, debug launcher)."""
    bench = tmp_path / "bench.json"
    rates = {"test_resnet": (100.0, 400.0), "test_vit": (50.0, 200.0)}  # train, val img/s
    bench.write_text(json.dumps({"runs": {a: {"train_img_per_s": t, "val_img_per_s": v,
                                              "other_s": 10.0} for a, (t, v) in rates.items()}}))
    assert run_suite.main(suite(cifar_dir, tmp_path / "d", weights, "--dry-run", "--bench",
                                str(bench))) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert (out.count("python train_resnet_cifar.py --model test_") == 16
            and "--train-subset 400 --seed 1" in out)
    # 2 epochs; sizes 200 and 400 x 2 modes x 2 seeds per model
    by_hand = sum(4 * (10 + 2 * (n / t + 400 / v)) for t, v in rates.values() for n in (200, 400))
    assert by_hand == 4 * (10 + 2 * (2 + 1)) + 4 * (10 + 2 * (4 + 1)) + 4 * (10 + 2 * (4 + 2)) \
        + 4 * (10 + 2 * (8 + 2))
    assert f"16 runs, 16 to run, 1 at a time; projected time {S._fmt(by_hand)}" in out, out[-300:]
    assert "# 0:00:22" in out, "each command with its own projection (test_vit, 200 images)"
    assert "warning: no GPU here: the 16 runs would train on the CPU, projected" in captured.err
    assert not (tmp_path / "d").exists()
    assert S.makespan([100.0, 50.0, 50.0], 2) == 100.0 and S.makespan([60.0] * 4, 2) == 120.0
    assert S.parallelism("slurm", 12, 36) == 12 and S.parallelism("slurm", 12, 5) == 5
    assert S.parallelism("debug", 12, 36) == 1


# ------------------------------------------------------------------------ the analysis across sizes

def sweep_folders(root: Path, gains: dict[int, tuple[float, float]]) -> list[str]:
    """Registry-model runs at several sizes whose gains are known: per size (ResNet-18 gain,
    TinyViT-5M gain)."""
    paths = []
    for n, (g_cnn, g_vit) in gains.items():
        base = {"resnet18": 0.6, "tiny_vit_5m_224": 0.5}
        for arch, gain in (("resnet18", g_cnn), ("tiny_vit_5m_224", g_vit)):
            for pre, acc in ((True, base[arch] + gain), (False, base[arch])):
                for s in (0, 1):
                    c = right(acc + 0.005 * s, offset=3 * s)
                    paths.append(str(write_run(root / f"{arch}_{pre}_{n}_{s}", arch, pre, c, seed=s,
                                               train_images=n)))
    return paths


def test_the_size_analysis_gives_the_difference_of_gains_against_size(tmp_path):
    import plot_four_panels

    paths = sweep_folders(tmp_path / "runs",
                          {1000: (0.05, 0.30), 5000: (0.04, 0.20), 45000: (0.03, 0.10)})
    assert plot_four_panels.main(["--runs", *paths, "--output", str(tmp_path / "f.png"),
                                  "--safe"]) == 0
    text = (tmp_path / "results.md").read_text()
    first = text.splitlines()[2]
    assert first.startswith("**With 45,000 training images the difference of the gains "
                            "(TinyViT-5M's minus ResNet-18's) is +7.0 points [")
    assert ("1,000: +25.0 [" in first and "5,000: +16.0 [" in first
            and "over the 400 test images and the seeds" in first)
    rows = [ln for ln in text.splitlines()
            if ln.startswith("| 1,000 |") or ln.startswith("| 45,000 |")]
    assert len(rows) == 2 and "+25.0 [" in rows[0]
    assert (tmp_path / "data_efficiency.png").stat().st_size > 20_000
    assert "### Test accuracy" in text and "## 5,000 training images" in text


def test_each_size_cell_is_its_intervals_centre_and_the_gains_are_the_main_weights(tmp_path):
    """Known run folders at two sizes, two seeds each, with a TinyViT-5M control of other weights
    far from the main ones; each run's final-epoch test accuracy 10 points below best.pt's. By hand:
    a cell is the mean of best.pt's test accuracies over the seeds (the centre of its interval), a
    model's gain column its main weights' mean minus its scratch mean, the control's column its own
    weights' gain."""
    accs = {}  # (arch, tag, pretrained, size) -> per seed accuracy
    paths = []
    for n, scale in ((1000, 0.0), (5000, 0.1)):
        for arch, tag, pre, acc in (("resnet18", None, True, 0.70), ("resnet18", None, False, 0.50),
                                    ("tiny_vit_5m_224", None, True, 0.80),
                                    ("tiny_vit_5m_224", "in1k", True, 0.40),
                                    ("tiny_vit_5m_224", None, False, 0.30)):
            for s in (0, 1):
                a = round(acc + scale + 0.02 * s, 3)
                folder = write_run(tmp_path / f"{arch}_{tag}_{pre}_{n}_{s}", arch, pre,
                                   right(a, offset=7 * s), seed=s, tag=tag, train_images=n)
                summary = json.loads((folder / "summary.json").read_text())
                summary["test_acc_final"] = a - 0.1
                (folder / "summary.json").write_text(json.dumps(summary))
                accs.setdefault((arch, tag, pre, n), []).append(a)
                paths.append(str(folder))
    # results.md alone is read here: without the per-class and calibration figures
    report(paths, None, tmp_path / "f.png", tmp_path / "results.md", False, "minmax", True, None,
           extra_figures=False)
    text = (tmp_path / "results.md").read_text()
    table = text.split("## Test accuracy and gains by training-set size")[1].split(
        "\n\n")[1].splitlines()
    rows = [[c.strip() for c in row.strip().strip("|").split("|")] for row in table]
    header, body = rows[0], rows[2:]
    assert [r[0] for r in body] == ["1,000", "5,000"]
    controls = [h for h in header if h.endswith("gain (control)")]
    assert len(controls) == 1, header
    for row, n in zip(body, (1000, 5000)):
        cell = dict(zip(header, row))

        def mean(arch, tag, pre):
            return float(np.mean(accs[(arch, tag, pre, n)]))

        gains = {"ResNet-18 gain": mean("resnet18", None, True) - mean("resnet18", None, False),
                 "TinyViT-5M gain": (mean("tiny_vit_5m_224", None, True)
                                     - mean("tiny_vit_5m_224", None, False)),
                 controls[0]: (mean("tiny_vit_5m_224", "in1k", True)
                               - mean("tiny_vit_5m_224", None, False))}
        for name, gain in gains.items():
            assert cell[name].startswith(f"{100 * gain:+.1f} ["), (n, name, cell[name], gain)
        accuracy_cells = [h for h in header[1:] if not h.endswith("gain") and "gain" not in h]
        assert len(accuracy_cells) == 5, header
        centres = sorted(float(cell[h].split(" [")[0].rstrip("%")) for h in accuracy_cells)
        assert centres == sorted(round(100 * float(np.mean(v)), 1)
                                 for k, v in accs.items() if k[3] == n), (n, centres)
        for h in accuracy_cells:  # within its interval
            centre, lo, hi = (float(v) for v in cell[h].replace("[", "").replace("]", "")
                              .replace(",", "").replace("%", "").split())
            assert lo <= centre <= hi, (h, cell[h])


def test_the_sweeps_analysis_refuses_a_best_pt_chosen_on_the_test_set(tmp_path, capsys):
    """--val-size 0 runs among a sweep's sizes: refused as in a single comparison, unless
    --allow-test-selection marks them."""
    import plot_four_panels

    paths = sweep_folders(tmp_path / "runs", {1000: (0.05, 0.30), 5000: (0.04, 0.20)})
    for path in paths:  # a sweep run with --val-size 0
        config = Path(path) / "config.json"
        d = json.loads(config.read_text())
        d["data"]["splits"].update(val_is_test=True, val_size=0)
        d["config"]["val_size"] = 0
        config.write_text(json.dumps(d))
    argv = ["--runs", *paths, "--output", str(tmp_path / "f.png"), "--safe"]
    one_line_error_in_process(plot_four_panels.main, argv, capsys, "chose best.pt on the test set",
                              "--allow-test-selection")
    assert not (tmp_path / "results.md").exists()


def test_runs_of_several_sizes_must_match_in_everything_else(tmp_path, capsys):
    import compare_runs

    a = write_run(tmp_path / "a", "resnet18", False, right(0.6), train_images=1000)
    b = write_run(tmp_path / "b", "resnet18", False, right(0.7), train_images=5000, img_size=32)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        compare_runs.main([str(a), str(b), "--safe"])
    err = capsys.readouterr().err
    assert ("not comparable across sizes" in err and "img_size: 224" in err
            and "training set" not in err)


def test_intervals_of_accuracies_stay_in_range(tmp_path):
    from common import analysis
    from common.runfolder import load_run

    runs = [load_run(write_run(tmp_path / f"s{i}", "resnet18", False, right(acc), seed=i))
            for i, acc in enumerate((0.02, 0.30))]
    i = analysis.setting_interval(analysis.group_settings(runs)[0])
    assert 0.0 <= i.lo <= i.estimate <= i.hi <= 1.0 and np.isclose(i.estimate, 0.16)


def test_the_status_board_redraws_a_terminal_in_place_and_logs_only_changes(
        tmp_path, caplog, monkeypatch):
    import io
    import logging

    # the elapsed time stands still: only states change
    monkeypatch.setattr(S.time, "monotonic", lambda: 1000.0)
    runs = S.plan_grid(["test_resnet"], ["scratch"], [200], [0, 1], tmp_path, ["--data-dir", "x"],
                       {})
    progress = S.Progress(runs, {r.folder: "queued" for r in runs}, started=1000.0)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    board, log_board = S.StatusBoard(term), S.StatusBoard(io.StringIO())
    with caplog.at_level(logging.INFO, logger="common.suite"):
        for state in ("queued", "running", "running", "running", "done"):
            progress.state[runs[0].folder] = state
            board.update(progress)
            log_board.update(progress)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["suite: 0 done (0 from before), 0 running, 2 queued, 0 failed; "
                     "elapsed 0:00:00, projected –",
                     "suite: test_resnet scratch n=200 seed 0 running",
                     "suite: 0 done (0 from before), 1 running, 1 queued, 0 failed; "
                     "elapsed 0:00:00, projected –",
                     "suite: test_resnet scratch n=200 seed 0 done",
                     "suite: 1 done (0 from before), 0 running, 1 queued, 0 failed; "
                     "elapsed 0:00:00, projected –"], \
        "a line per change, none per poll"
    screen = term.getvalue()
    assert screen.count("\x1b[3F\x1b[J") == 2, ("the 3-line table is redrawn in place, once per "
                                                "change")
    assert screen.rstrip().endswith("queued   test_resnet scratch n=200 seed 1")


@pytest.mark.parametrize("modes", [("pretrained", "scratch"), ("scratch",)])
def test_the_size_table_is_well_formed_markdown_with_or_without_gains(tmp_path, modes):
    """Every row of the size table has the header's cells (a scratch-only sweep has no gain
    columns, and once drew an empty header cell that broke the table)."""
    paths = sweep_folders(tmp_path / "runs", {1000: (0.05, 0.30), 5000: (0.04, 0.20)})
    if modes == ("scratch",):
        paths = [p for p in paths if "_False_" in p]
    report(paths, None, tmp_path / "f.png", tmp_path / "results.md", False, "minmax", True, None,
           extra_figures=False)
    text = (tmp_path / "results.md").read_text()
    table = text.split("## Test accuracy and gains by training-set size")[1].split(
        "\n\n")[1].splitlines()
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in table]
    assert len({len(c) for c in cells}) == 1 and all(cells[0]), table
    gains = [h for h in cells[0] if h.endswith(" gain")]
    assert gains == (["ResNet-18 gain", "TinyViT-5M gain"] if len(modes) == 2 else []), cells[0]
    assert [c[0] for c in cells[2:]] == ["1,000", "5,000"]


@pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="Slurm's USR2 exists on POSIX only")
def test_slurms_usr2_makes_the_train_process_save_and_the_job_requeue_promptly(tmp_path):
    """Slurm sends USR2 to every process of the job before its limit: the train process ignores it,
    submitit's handler (checkpoint(), on the job's main thread, interrupting __call__) sends it
    SIGTERM, the trainer saves and exits, and checkpoint() sees that at once, not after its 60 s
    timeout. The train process is started in the suite's working directory."""
    import threading

    import submitit

    child = tmp_path / "fake_train.py"
    child.write_text(
        "import os, pathlib, signal, sys, time\n"
        "pathlib.Path('cwd.txt').write_text(os.getcwd())\n"
        "def save(*_):\n"
        "    pathlib.Path('last.pt').write_text('saved')\n"
        "    sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, save)\n"
        "pathlib.Path('started').write_text('')\n"
        "while True:\n"
        "    time.sleep(0.05)\n")
    folder = tmp_path / "run"
    run = S.Run("test_resnet", "scratch", 0, 0, folder, str(child), (), cwd=str(folder))
    job = S.TrainJob(run)
    requeued = []

    def on_usr2(signum, frame):  # what submitit's handler does: checkpoint(), then requeue
        start = time.monotonic()
        requeued.append((job.checkpoint(), time.monotonic() - start))

    def slurm():  # USR2 to the job and to the train process, once the latter runs
        while not (folder / "started").exists():
            time.sleep(0.05)
        os.kill(job.child.pid, signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)

    previous = signal.signal(signal.SIGUSR2, on_usr2)
    sender = threading.Thread(target=slurm, daemon=True)
    try:
        sender.start()
        code, _ = job()
    finally:
        sender.join(timeout=60)  # its signals are sent before the handler goes
        signal.signal(signal.SIGUSR2, previous)
    assert code == 143 and (folder / "last.pt").read_text() == "saved", "saved on SIGTERM, not USR2"
    assert (folder / "cwd.txt").read_text() == str(folder)
    (delayed, seconds), = requeued
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.function.run == run
    assert seconds < 30, f"checkpoint() waited {seconds:.0f} s for a child that had exited"


def test_runs_are_pinned_to_the_gpus_the_user_made_visible(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert S.visible_gpus() == [2, 3]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert S.visible_gpus() == [0, 1]


def test_before_it_starts_the_sweep_warns_of_missing_weights_offline_and_of_no_gpu(
        tmp_path, monkeypatch):
    """Pretrained runs whose weights are neither cached nor reachable are named with the file to
    fetch and the flag that uses it; a machine without a GPU is said to train on the CPU."""
    from common import downloads, models

    runs = S.plan_grid(["resnet18"], ["pretrained", "scratch"], [0], [0, 1], tmp_path, TRAIN, {})
    monkeypatch.setattr(models, "weights_cached", lambda choice: False)
    monkeypatch.setattr(downloads, "host_reachable", lambda url, timeout=4.0: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    warnings = S.preflight_warnings(runs, 3600.0)
    assert warnings[0].startswith("warning: the 2 pretrained run(s) of resnet18 need "
                                  "resnet18.a1_in1k, not cached here, and no network reaches the "
                                  "hub: fetch https://huggingface.co/timm/resnet18.a1_in1k/"), warnings
    assert "(run_suite.py --weights resnet18=PATH)" in warnings[0]
    assert warnings[1] == ("warning: no GPU here: the 4 runs would train on the CPU, projected "
                           "1:00:00 on this machine (check.py --bench-suite)")
    monkeypatch.setattr(models, "weights_cached", lambda choice: True)
    assert len(S.preflight_warnings(runs, None)) == 1 and "days at 224 px" in S.preflight_warnings(
        runs, None)[0]
