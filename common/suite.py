"""The experiment as a grid of ordinary train commands (models x pretrained / scratch x training-set
sizes x seeds), each with a deterministic folder, handed to submitit (the launcher of DeiT / MAE /
ConvNeXt-style research code): `debug` runs them in this process, `local` on this machine (one run
per GPU, pinned with CUDA_VISIBLE_DEVICES; one at a time on a CPU), `slurm` as a job array that
requeues preempted and timed-out runs, which continue with --resume. Nothing in the train scripts
knows it is part of a sweep; the analysis reads the folders back."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import runfolder as RF
from .config import TrainConfig, build_parser, config_from_args, identity_differences
from .errors import UserError
from .files import die_with_parent, pid_alive
from .specs import MODELS, REGISTRY

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
MODES = ("pretrained", "scratch")


@dataclass(frozen=True)
class Run:
    """One cell of the grid: what it is, where it lives, the command that runs it."""

    arch: str
    mode: str
    size: int                    # training images; 0 = all of the training split
    seed: int
    folder: Path
    script: str
    argv: tuple[str, ...]
    tag: str = ""                # other weights than the registry's default (a control)
    # where the suite was started: the run's relative paths (--root, --data-dir, weights) mean the
    # same in the train process as in run_suite.py
    cwd: str = field(default_factory=os.getcwd, compare=False)

    @property
    def name(self) -> str:
        model = f"{self.arch}.{self.tag}" if self.tag else self.arch
        return f"{model} {self.mode} n={self.size or 'all'} seed {self.seed}"

    @property
    def command(self) -> list[str]:
        return [sys.executable, str(REPO / self.script), *self.argv]

    def config(self) -> TrainConfig:
        """The config the train script will resolve from this command (bad flags: a one-line
        UserError)."""
        spec = REGISTRY.get(self.arch)
        default = spec.default_model if spec else self.arch
        parser = build_parser("", default)

        def refuse(message: str):
            raise UserError(f"the train flags after --: {message} (see python {self.script} "
                            "--help)")

        parser.error = refuse
        return config_from_args(parser.parse_args(list(self.argv)),
                                spec.run_prefix if spec else "run", default)


def plan_grid(models: Sequence[str], modes: Sequence[str], sizes: Sequence[int],
              seeds: Sequence[int], root: Path, train_flags: Sequence[str],
              weights: dict[str, str]) -> list[Run]:
    """Every run of the grid, in a fixed order (size, model, mode, seed): small runs first, so the
    first answers come early."""
    for what, values in (("--train-sizes", sizes), ("--seeds", seeds), ("--models", models),
                         ("--modes", modes)):
        dupes = sorted({str(v) for v in values if list(values).count(v) > 1})
        if dupes:
            raise UserError(f"{what} lists {', '.join(dupes)} twice; give each once")
    for m in modes:
        if m not in MODES:
            raise UserError(f"--modes {m}: choose from {', '.join(MODES)}")
    controlled = {"--model", "--pretrained", "--no-pretrained", "--train-subset", "--seed",
                  "--output-dir", "--resume", "--overwrite", "--weights"}
    clash = sorted({f.split("=")[0] for f in train_flags if f.split("=")[0] in controlled})
    if clash:
        raise UserError(f"the train flags after -- set {', '.join(clash)}, which the suite sets "
                        "per run; use --models, --modes, --train-sizes, --seeds, --root and "
                        "--weights ARCH=PATH instead")
    runs = []
    archs = [m.partition(".")[0] for m in models]
    for size in sizes:
        for i, name in enumerate(models):
            arch, _, tag = name.partition(".")
            spec = REGISTRY.get(arch)
            for mode in modes:
                pretrained = mode == "pretrained"
                # other weights of a model already in the grid share its scratch runs
                if not pretrained and arch in archs[:i]:
                    continue
                model = ((name if tag else (spec.default_model if spec else arch)) if pretrained
                         else arch)
                for seed in seeds:
                    folder = (root / f"{name if pretrained and tag else arch}_"
                              f"{'ft' if pretrained else 'scratch'}"
                              / f"n{size or 'all'}" / f"seed{seed}")
                    argv = ["--model", model, "--pretrained" if pretrained else "--no-pretrained",
                            "--train-subset", str(size), "--seed", str(seed), "--output-dir",
                            str(folder), "--resume", *train_flags]
                    # a weights file for exactly these weights: arch.tag=PATH, or ARCH=PATH for
                    # the registry's default weights
                    path = weights.get(name) if tag else weights.get(arch)
                    if pretrained and path:
                        argv += ["--weights", path]
                    runs.append(Run(arch, mode, size, seed, folder,
                                    spec.script if spec else "train_resnet_cifar.py", tuple(argv),
                                    tag=tag if pretrained else ""))
    return runs


def fix_micro_batch(runs: Sequence[Run], memory: tuple[int, int] | None,
                    n_train: int | None) -> tuple[list[Run], str]:
    """One micro-batch for the whole grid: BatchNorm sees the micro-batch, so every run of one
    experiment must have the same. The memory plan of each model on the runs' GPU (`memory`:
    free, total bytes), and the most accumulation steps any of them needs, given to every run as
    --grad-accum-steps. Train flags that fix --grad-accum-steps, or no GPU (no accumulation), keep
    the runs as they are. Returns the runs and a line that says what was chosen."""
    if any(a.split("=")[0] == "--grad-accum-steps" for a in runs[0].argv):
        return list(runs), ""
    if memory is None:
        return list(runs), ""
    import dataclasses

    import torch

    from .data.augment import recipe_of
    from .data.streams import default_chunk
    from .memory import measure_costs, plan_memory
    from .models import create_model
    from .specs import resolve_model

    needs = {}
    for r in runs:
        if r.arch in needs:
            continue
        cfg = r.config()
        recipe = recipe_of(cfg)
        dtype = torch.bfloat16 if cfg.amp else None  # bf16 or fp16: the same two bytes
        model = create_model(resolve_model(r.arch, False), cfg.img_size, 10)
        device_pipeline = cfg.data_pipeline != "cpu"
        costs = measure_costs(model, cfg.img_size, dtype, dtype if cfg.amp_eval else None, recipe,
                              device_pipeline, n_train or 45_000, 10_000, cfg.optimizer)
        plan = plan_memory(costs, *memory, cfg.batch_size,
                           default_chunk(recipe, cfg.img_size) if device_pipeline else 1,
                           max(256, 2 * cfg.batch_size))
        needs[r.arch] = plan
    arch, worst = max(needs.items(), key=lambda kv: kv[1].accum_steps)
    accum = worst.accum_steps
    runs = [dataclasses.replace(r, argv=(*r.argv, "--grad-accum-steps", str(accum)))
            for r in runs]
    others = "; ".join(f"{REGISTRY[a].display if a in REGISTRY else a} alone: {p.micro_batch} x "
                       f"{p.accum_steps}" for a, p in needs.items() if a != arch)
    return runs, (f"one micro-batch for every run: {worst.micro_batch} x {accum} accumulation "
                  f"steps (--grad-accum-steps {accum}), what "
                  f"{REGISTRY[arch].display if arch in REGISTRY else arch} needs on "
                  f"{worst.free_gb:.1f} GiB free" + (f"; {others}" if others else ""))


def preflight_warnings(runs: Sequence[Run], projected_s: float | None) -> list[str]:
    """What will go wrong or slowly, said before anything starts: pretrained runs whose weights are
    neither cached nor downloadable here (no network), and no GPU (the runs train on the CPU)."""
    import torch

    from .downloads import host_reachable
    from .models import offline_hint, weights_cached
    from .specs import resolve_model

    warnings = []
    needed = {}
    for r in runs:
        if r.mode == "pretrained" and "--weights" not in r.argv:
            choice = resolve_model(r.argv[r.argv.index("--model") + 1], True)
            needed.setdefault(choice.name, choice)
    missing = {n: c for n, c in needed.items() if not weights_cached(c)}
    if missing:
        hub = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
        if offline or not host_reachable(hub):
            for name, choice in missing.items():
                runs_of = sum(r.mode == "pretrained" and r.arch == choice.arch for r in runs)
                warnings.append(f"warning: the {runs_of} pretrained run(s) of {choice.arch} need "
                                f"{name}, not cached here, and no network reaches the hub: "
                                f"{offline_hint(choice)} (run_suite.py --weights "
                                f"{choice.arch}=PATH)")
    if not torch.cuda.is_available():
        when = (f"projected {_fmt(projected_s)} on this machine (check.py --bench-suite)"
                if projected_s else "days at 224 px (python check.py --bench-suite 2 projects it)")
        warnings.append(f"warning: no GPU here: the {len(runs)} runs would train on the CPU, "
                        f"{when}")
    return warnings


def check_grid(runs: Sequence[Run], n_train: int | None) -> None:
    """Refuse, before anything starts, what cannot run: an unknown model, a size larger than the
    training split, flags the train scripts reject, a folder under --root that holds a run of
    another recipe."""
    import timm

    for arch in sorted({r.arch for r in runs}):
        if arch not in REGISTRY and not timm.is_model(arch):
            raise UserError(f"--models {arch}: not a model of this repository "
                            f"({', '.join(REGISTRY)}) nor of timm")
        spec = REGISTRY.get(arch)
        if spec is not None and spec.native_px != 224 and any(
                r.arch == arch and r.mode == "pretrained" for r in runs):
            raise UserError(f"--models {arch}: its ImageNet weights are for {spec.native_px} px and "
                            "the experiment runs at 224 px; a control that needs another input "
                            "size would change the recipe, so it is refused (drop it)")
    if n_train is not None:
        if 0 in {r.size for r in runs} and n_train in {r.size for r in runs}:
            raise UserError(f"--train-sizes 0 and {n_train} are the same training set (0 = all "
                            f"{n_train} images left after the validation split); give one of them")
        too_big = sorted({r.size for r in runs if r.size > n_train})
        if too_big:
            raise UserError(f"--train-sizes {', '.join(map(str, too_big))}: larger than the "
                            f"{n_train} training images left after the validation split (0 = all "
                            "of them)")
    for r in runs:
        planned = r.config()
        existing = r.folder / RF.CONFIG
        if existing.is_file():
            from .record import read_record

            saved = read_record(existing).config
            diffs = identity_differences(saved.to_dict(), planned.to_dict())
            if saved.epochs != planned.epochs:
                diffs.append(f"epochs: {saved.epochs} there, {planned.epochs} now")
            if diffs:
                raise UserError(f"{r.folder} holds a run of another recipe "
                                f"({'; '.join(diffs)[:300]}); use another --root, or the flags it "
                                "was run with")


def status_of(run: Run) -> str:
    """done (tested), interrupted (a checkpoint, no summary) or new."""
    if (run.folder / RF.SUMMARY).is_file():
        return "done"
    if (run.folder / RF.LAST).is_file():
        return "interrupted"
    return "new"


# ----------------------------------------------------------------------------- what a job runs

class TrainJob:
    """What submitit runs for one cell: the train script, with --resume (a requeued or restarted job
    continues where its run stopped). In a child process (local, slurm), so that a preemption can
    ask it to save first: checkpoint() sends it SIGTERM, waits for its last.pt, and requeues this
    same job. In this process for the debug launcher. Returns (exit code, last error line)."""

    def __init__(self, run: Run, in_process: bool = False, suite_pid: int | None = None):
        self.run = run
        self.in_process = in_process
        self.child: subprocess.Popen | None = None
        # the local launcher's run_suite.py: when it is gone (even killed with SIGKILL), the run
        # stops with a checkpoint rather than train on unsupervised
        self.suite_pid = suite_pid

    def __call__(self) -> tuple[int, str]:
        self.run.folder.mkdir(parents=True, exist_ok=True)
        if self.in_process:
            return _run_in_process(self.run)
        # this job's process stops its run when its parent dies (a SIGINT, taken below), and the
        # train process gets a SIGTERM (it saves) when this one dies
        die_with_parent(signal.SIGINT)
        with open(self.run.folder / "train.log", "a") as logfile:
            # train.log is appended across restarts: a line marks where this attempt starts, so
            # that a failure is reported with this attempt's last error, not an earlier one's
            logfile.write(f"{ATTEMPT} {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                          f"{shell_line(self.run)}\n")
            logfile.flush()
            self.child = subprocess.Popen(self.run.command, stdout=logfile,
                                          stderr=subprocess.STDOUT, cwd=self.run.cwd,
                                          preexec_fn=_child_setup)
            try:
                # poll, not wait(): checkpoint() runs as a signal handler on this thread and must
                # be able to wait for the child itself (a blocking wait() would hold Popen's lock)
                while self.child.poll() is None:
                    time.sleep(0.5)
                    if self.suite_pid is not None and not pid_alive(self.suite_pid):
                        self.stop_child()
            except KeyboardInterrupt:  # the suite stops (its cancel() is a SIGINT): save first
                self.stop_child()
                raise
        return self.child.returncode, _last_error(self.run.folder / "train.log")

    def stop_child(self, timeout: float = 180) -> None:
        """SIGTERM to the train process (it saves at its next step) and wait for it."""
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.child.wait(timeout=timeout)

    def checkpoint(self):
        """Preempted or timed out (Slurm's signal, some time before the kill): the run saves at its
        next step boundary, then the same job is requeued and continues with --resume."""
        import submitit

        self.stop_child(timeout=60)
        return submitit.helpers.DelayedSubmission(TrainJob(self.run, self.in_process))


_USR2 = getattr(signal, "SIGUSR2", None)


def _child_setup() -> None:
    """In the train process, before it starts: Slurm's --signal USR2 reaches every process of the
    job; the suite's checkpoint() answers it (SIGTERM to the trainer, which saves), so the trainer
    ignores it. And a SIGTERM when the job's process dies (the trainer saves, then exits)."""
    if _USR2:
        signal.signal(_USR2, signal.SIG_IGN)
    die_with_parent(signal.SIGTERM)


def _run_in_process(run: Run) -> tuple[int, str]:
    import importlib

    from .log import setup_logging

    module = importlib.import_module(run.script.removesuffix(".py"))
    captured = io.StringIO()
    tee = _Tee(sys.stderr, captured)
    with contextlib.redirect_stderr(tee):
        try:
            code = module.main(list(run.argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    setup_logging()
    lines = [ln for ln in captured.getvalue().splitlines() if ln.startswith("error: ")]
    return int(code or 0), (lines[-1] if lines else "")


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self) -> None:
        for st in self.streams:
            st.flush()

    def isatty(self) -> bool:
        return False


ATTEMPT = "--- run_suite.py starts this run"


def _last_error(path: Path) -> str:
    """The latest attempt's last `error:` line in train.log, else its last line."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    starts = [i for i, ln in enumerate(lines) if ln.startswith(ATTEMPT)]
    lines = lines[starts[-1] + 1:] if starts else lines
    errors = [ln for ln in lines if ln.startswith("error: ")]
    return errors[-1] if errors else (lines[-1] if lines else "")


# ----------------------------------------------------------------------------- launching

@dataclass
class Slot:
    """A place a run can go: a GPU (pinned), or this machine's CPU."""

    gpu: int | None
    job: Any = None
    run: Run | None = None


@dataclass
class Progress:
    """The suite's state, as the status board shows it."""

    runs: list[Run]
    # queued | running | done | failed | skipped
    state: dict[Path, str] = field(default_factory=dict)
    errors: dict[Path, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    projected_s: float | None = None

    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in ("done", "skipped", "running", "queued", "failed")}
        for s in self.state.values():
            out[s] += 1
        return out


def visible_gpus() -> list[int]:
    """The GPUs to pin runs to, as CUDA_VISIBLE_DEVICES numbers them: the user's own
    CUDA_VISIBLE_DEVICES=2,3 gives [2, 3], not [0, 1]."""
    import torch

    if not torch.cuda.is_available():
        return []
    n = torch.cuda.device_count()
    listed = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if listed and all(g.isdigit() for g in listed):
        return [int(g) for g in listed[:n]]
    return list(range(n))


def run_local(runs: Sequence[Run], logs: Path, progress: Progress, board,
              poll_s: float = 0.5) -> None:
    """One run per visible GPU, each pinned with CUDA_VISIBLE_DEVICES; one at a time on a CPU.
    submitit's LocalExecutor starts each job as its own process (and would start them all at once:
    the slots queue them)."""
    import submitit

    if os.name == "nt":  # submitit's local worker uses SIGCONT and SIGKILL, which Windows lacks
        raise UserError("--launcher local does not run on Windows; use --launcher debug (the runs "
                        "one after the other in this process)")
    gpus = visible_gpus()
    slots = [Slot(g) for g in gpus] or [Slot(None)]
    queue = [r for r in runs if progress.state[r.folder] == "queued"]
    try:
        while queue or any(s.job for s in slots):
            for slot in slots:
                if slot.job is not None and slot.job.done():
                    _finish(slot.job, slot.run, progress)
                    slot.job = slot.run = None
                if slot.job is None and queue:
                    run = queue.pop(0)
                    executor = submitit.LocalExecutor(folder=str(logs))
                    executor.update_parameters(timeout_min=60 * 24 * 30,
                                               gpus_per_node=1 if slot.gpu is not None else 0,
                                               visible_gpus=() if slot.gpu is None
                                               else (slot.gpu,))
                    slot.job, slot.run = executor.submit(TrainJob(run,
                                                                  suite_pid=os.getpid())), run
                    progress.state[run.folder] = "running"
            board.update(progress)
            time.sleep(poll_s)
    except KeyboardInterrupt:  # Ctrl+C, or the SIGTERM run_suite.py takes the same way
        stop_local(slots, progress)
        raise


@contextlib.contextmanager
def sigterm_as_interrupt():
    """`kill PID` (SIGTERM) to run_suite.py stops it as Ctrl+C does: its runs save first."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_local(slots, progress: Progress, timeout: float = 240) -> None:
    """The suite is stopped: every running run saves (its job is cancelled, which sends the train
    process SIGTERM) and is waited for, so that the same command continues them."""
    running = [s for s in slots if s.job is not None]
    if running:
        log.warning(f"stopping: {len(running)} running run(s) save their checkpoint first")
    for slot in running:
        slot.job.cancel(check=False)
    deadline = time.monotonic() + timeout
    for slot in running:
        # the job's process, then the train process it stopped (saving a checkpoint)
        while ((not slot.job.done() or RF.in_use(slot.run.folder))
               and time.monotonic() < deadline):
            time.sleep(0.5)
        progress.state[slot.run.folder] = "queued"


def run_debug(runs: Sequence[Run], logs: Path, progress: Progress, board) -> None:
    """In this process, one after the other (submitit's DebugExecutor): for tests and debugging."""
    import submitit

    executor = submitit.DebugExecutor(folder=str(logs))
    for run in runs:
        if progress.state[run.folder] != "queued":
            continue
        progress.state[run.folder] = "running"
        board.update(progress)
        job = executor.submit(TrainJob(run, in_process=True))
        _finish(job, run, progress)
    board.update(progress)


def slurm_executor(logs: Path, partition: str | None, gpus_per_run: int, time_min: int,
                   max_parallel: int):
    """A Slurm job array: each task one run, --signal USR2 some time before the limit (submitit's
    preemption and timeout signal), requeued by TrainJob.checkpoint."""
    import shutil

    import submitit

    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise UserError("--launcher slurm: no sbatch/srun on this machine's PATH; run run_suite.py "
                        "on the cluster's login node, or use --launcher local here")
    executor = submitit.SlurmExecutor(folder=str(logs), max_num_timeout=30)
    params: dict[str, Any] = dict(time=time_min, gpus_per_node=gpus_per_run, ntasks_per_node=1,
                                  cpus_per_task=max(2, 8 * gpus_per_run),
                                  array_parallelism=max_parallel, signal_delay_s=120,
                                  job_name="cifar-suite")
    if partition:
        params["partition"] = partition
    executor.update_parameters(**params)
    return executor


def run_slurm(runs: Sequence[Run], logs: Path, progress: Progress, board, executor,
              poll_s: float = 30.0, wait: bool = True) -> list:
    queued = [r for r in runs if progress.state[r.folder] == "queued"]
    if not queued:
        return []
    jobs = executor.submit_array([TrainJob(r) for r in queued])
    log.info(f"submitted {len(jobs)} runs to Slurm as job array "
             f"{str(jobs[0].job_id).split('_')[0]}")
    for r in queued:
        progress.state[r.folder] = "running"
    if not wait:
        return jobs
    pending = dict(zip(jobs, queued))
    while pending:
        for job, run in list(pending.items()):
            if job.done():
                _finish(job, run, progress)
                del pending[job]
        board.update(progress)
        time.sleep(poll_s)
    return jobs


def _finish(job, run: Run, progress: Progress) -> None:
    try:
        code, error = job.result()
    except Exception as e:  # the job process died (killed, out of memory): its log says more
        code, error = 1, str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    if code == 0 and status_of(run) == "done":
        progress.state[run.folder] = "done"
    else:
        progress.state[run.folder] = "failed"
        progress.errors[run.folder] = error or f"exit code {code}"
        log.warning(f"{run.name} failed ({run.folder}): {progress.errors[run.folder]}")


# ------------------------------------------------------------------------ projections and the board

def projected_seconds(runs: Sequence[Run], bench: dict | None,
                      epochs: int) -> dict[Path, float] | None:
    """Each run's time from check.py --bench-suite figures (runs/bench_suite.json): its start-up
    and test, then per epoch its training images at the training rate and the validation images at
    the evaluation rate (validation does not shrink with the training set); None without figures
    for every model of the grid."""
    if not bench:
        return None
    out = {}
    by_name = bench.get("runs", {})
    for r in runs:
        spec = REGISTRY.get(r.arch)
        b = by_name.get(spec.display if spec else r.arch) or by_name.get(r.arch)
        if b is None:
            return None
        cfg = r.config()
        n_train = r.size or (45_000 if cfg.val_size == 5000 else 50_000 - cfg.val_size)
        per_epoch = n_train / b["train_img_per_s"] + cfg.val_size / b["val_img_per_s"]
        out[r.folder] = b["other_s"] + epochs * per_epoch
    return out


def makespan(seconds: Sequence[float], parallel: int) -> float:
    """The wall time of runs on `parallel` slots: their total over the slots, and never less than
    the longest run."""
    if not seconds:
        return 0.0
    return max(sum(seconds) / max(1, parallel), max(seconds))


def parallelism(launcher: str, max_parallel: int, todo: int) -> int:
    """Runs at once: one per visible GPU here (local; one on a CPU), --max-parallel on Slurm, one in
    the debug launcher."""
    if launcher == "slurm":
        return max(1, min(max_parallel, todo))
    if launcher == "local":
        return max(1, len(visible_gpus()))
    return 1


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class StatusBoard:
    """The suite's progress: a table redrawn in place on a terminal; on a log file, a line when it
    changes."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.drawn = 0
        self.last = ""
        self.seen: dict = {}

    def lines(self, p: Progress) -> list[str]:
        c = p.counts()
        elapsed = time.monotonic() - p.started
        head = (f"suite: {c['done'] + c['skipped']} done ({c['skipped']} from before), "
                f"{c['running']} running, {c['queued']} queued, {c['failed']} failed; elapsed "
                f"{_fmt(elapsed)}, projected {_fmt(p.projected_s)}")
        if not self.tty:
            return [head]
        rows = []
        for r in p.runs:
            state = p.state[r.folder]
            rows.append(f"  {state:8s} {r.name}"
                        + (f"  ({p.errors[r.folder][:80]})" if r.folder in p.errors else ""))
        return [head, *rows[-30:]]

    def update(self, p: Progress) -> None:
        # a log: a line per run that changed state, then the counts (not every poll)
        if not self.tty:
            changed = [r for r in p.runs if self.seen.get(r.folder) != p.state[r.folder]]
            self.seen.update({r.folder: p.state[r.folder] for r in p.runs})
            if changed:
                if len(changed) < len(p.runs):
                    for r in changed:
                        log.info(f"suite: {r.name} {p.state[r.folder]}"
                                 + (f" ({p.errors[r.folder]})" if
                                   r.folder in p.errors else ""))
                log.info(self.lines(p)[0])
            return
        lines = self.lines(p)
        text = "\n".join(lines)
        if text == self.last:
            return
        self.last = text
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
        self.stream.write(text + "\n")
        self.drawn = len(lines)
        self.stream.flush()


def load_bench(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def shell_line(run: Run) -> str:
    return shlex.join(["python", run.script, *run.argv])

