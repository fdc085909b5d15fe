"""check.py --smoke: does every path of a run work on this machine? Each case is a short real run
(training steps, validation, checkpoints, the final test) in a temp folder, as an ordinary train
command in its own process (a crash of one cannot take the others down): on a GPU each model x data
pipeline x AMP dtype (bf16, fp16 with the GradScaler), a SIGTERM in the middle of an epoch and a
SIGKILL in the second, each followed by --resume, and --compile, each case's line with its host syncs
per training step (a sync fails the case), its peak memory against the card's and its images/s,
then whether the four-run experiment fits this GPU and how long it takes. On a CPU a short subset
(each model's device pipeline and an interrupt with --resume; all cases with --smoke-all).

The plan comes first (how many cases, about how long), a summary line last, also when interrupted
(Ctrl+C or SIGTERM: the running case is stopped, the temp folder removed)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import runfolder as RF
from .specs import MODELS

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
CASE_TIMEOUT_S = 300
# seconds a CPU case took on this repository's 2-core machine (design.md): the plan's projection;
# no GPU figure yet (the cases' own times set the estimate there)
CPU_CASE_S = 20.0
GPU_ONLY = ("bf16 and fp16 autocast (the GradScaler), both data pipelines at 224 px, a SIGKILL in "
            "epoch 2 then --resume, --compile, host syncs per training step, peak memory and "
            "images/s, and whether the four runs fit this GPU and how long they take")


@dataclass
class Case:
    name: str
    steps: list[tuple[list[str], dict]]   # (train flags, extra environment) run one after the other
    script: str
    result: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)  # GPU: syncs, peak memory, images/s


def plan(data_dir: str, on_gpu: bool, img_size: int, models=tuple(MODELS),
         full: bool = False) -> list[Case]:
    """The cases. On a GPU: both pipelines x bf16 and fp16, then per model two interrupts +
    --resume and a --compile run, at the default batch. On a CPU: each model's device pipeline and
    a SIGTERM + --resume (full: the GPU's cases in fp32)."""
    if on_gpu:
        sizes = ["--train-subset", "1024", "--val-size", "256", "--test-subset", "256",
                 "--batch-size", "128"]
    else:
        sizes = ["--train-subset", "256", "--val-size", "64", "--test-subset", "64",
                 "--batch-size", "32"]
    base = ["--no-pretrained", "--data-dir", data_dir, "--img-size", str(img_size), "--epochs",
            "2", *sizes, "--num-workers", "2", "--device", "cuda" if on_gpu else "cpu"]
    env = {"CIFAR_SYNC_CHECK": "1"} if on_gpu else {}
    dtypes = ["bf16", "fp16"] if on_gpu else ["fp32"]
    cases = []
    for arch in models:
        script = MODELS[arch].script if arch in MODELS else "train_resnet_cifar.py"
        model = ["--model", arch]
        for pipeline in ("device", "cpu") if on_gpu or full else ("device",):
            for dtype in dtypes:
                amp = ["--no-amp"] if dtype == "fp32" else ["--amp-dtype", dtype]
                flags = [*base, *model, "--data-pipeline", pipeline, *amp]
                cases.append(Case(f"{arch} {pipeline} pipeline {dtype}", [(flags, env)], script))
        # 8 steps an epoch: step 5 is mid-epoch 1, step 13 mid-epoch 2
        interrupts = (("step:5@term", "SIGTERM mid-epoch (step 5)"),
                      ("step:13@kill", "SIGKILL in epoch 2"))
        for point, what in interrupts if on_gpu or full else interrupts[:1]:
            steps = [([*base, *model], {**env, "CIFAR_FAILPOINT": point}),
                     ([*base, *model, "--resume"], env)]
            cases.append(Case(f"{arch} {what}, then --resume", steps, script))
        if on_gpu or full:
            cases.append(Case(f"{arch} --compile", [([*base, *model, "--compile"], env)], script))
    return cases


class Interrupted(Exception):
    """Ctrl+C or SIGTERM during the smoke check."""


def _stop_child(proc: subprocess.Popen) -> None:
    """The case's process and anything it started (its DataLoader workers)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL) if hasattr(os, "killpg") else proc.kill()
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _run(argv: list[str], env: dict) -> tuple[int | None, str]:
    """One train command in its own session (a Ctrl+C at the terminal reaches the smoke check, which
    stops the case); (exit code or None after the timeout, its stderr)."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env},
                                stdout=subprocess.DEVNULL, stderr=err, text=True,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=CASE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _stop_child(proc)
        err.seek(0)
        return code, err.read()


def run_case(case: Case, folder: Path, verbose: bool = False) -> Case:
    out = folder / case.name.replace(" ", "_").replace(",", "").replace("-", "")
    start = time.perf_counter()
    try:
        for flags, env in case.steps:
            argv = [sys.executable, case.script, *flags, "--output-dir", str(out),
                    "--progress-every", "60"]
            if verbose:
                log.info("  $ " + " ".join(argv[1:])
                         + "".join(f"  ({k}={v})" for k, v in env.items()))
            code, stderr = _run(argv, env)
            if code is None:  # a hung case must not eat a GPU session
                case.result = f"FAIL: no result after {CASE_TIMEOUT_S} s (stopped)"
                return case
            if "CIFAR_FAILPOINT" in env:  # interrupted on purpose: a checkpoint, no result
                if (out / RF.SUMMARY).is_file() or not (out / RF.LAST).is_file():
                    case.result = (f"FAIL: after {env['CIFAR_FAILPOINT']} expected a last.pt and "
                                   f"no summary.json (exit {code}: {_last_error(stderr)})")
                    return case
                continue
            if code != 0:
                case.result = "FAIL: " + _last_error(stderr)
                return case
        from .record import read_summary

        summary = read_summary(out / RF.SUMMARY)
        case.result = "PASS" if summary is not None else "FAIL: no summary.json written"
        if summary is not None:
            case.notes.append(f"test acc {summary.test_acc:.3f}, {summary.epochs_run} epochs")
        if case.steps[-1][1].get("CIFAR_SYNC_CHECK"):
            gpu_figures(case, out)
    finally:
        case.seconds = time.perf_counter() - start
    return case


def gpu_figures(case: Case, out: Path, total_gib: float | None = None) -> None:
    """Host syncs per training step (a sync in the hot loop fails the case), peak memory against
    the card's and the memory model's, images/s: from the case's run folder."""
    import pandas as pd

    from .syncs import FILE

    if total_gib is None:
        import torch

        total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    syncs = json.loads((out / FILE).read_text()) if (out / FILE).is_file() else None
    metrics = pd.read_csv(out / RF.METRICS)
    memory = json.loads((out / RF.CONFIG).read_text())["run"]["memory"]
    modelled = memory.split("peak about ")[1].split(" GiB")[0] if "peak about " in memory else None
    peak = float(metrics["peak_mem_gb"].max())
    case.figures = {"syncs": syncs, "peak_gib": peak, "total_gib": total_gib,
                    "img_per_s": float(metrics["train_img_per_s"].iloc[-1]),
                    "val_img_per_s": float(metrics["val_img_per_s"].iloc[-1])}
    if syncs is None:
        case.notes.append("host syncs not counted")
    else:
        case.notes.append(f"host syncs {syncs['syncs']} in {syncs['steps']} steps")
        if syncs["syncs"] and case.result == "PASS":
            case.result = (f"FAIL: {syncs['syncs']} host syncs in {syncs['steps']} training steps "
                           f"(at {', '.join(syncs['where'])})")
    case.notes.append(f"peak {peak:.1f} of {total_gib:.1f} GiB"
                      + (f" (memory model {modelled})" if modelled else ""))
    case.notes.append(f"{case.figures['img_per_s']:,.0f} img/s")


def _last_error(stderr: str) -> str:
    """The failure's line: the last `error:` line, else the last line naming an error; never the
    trainer's 'continue with' advice (a smoke case is not resumed by hand)."""
    lines = [ln.strip() for ln in stderr.strip().splitlines()
             if ln.strip() and not ln.strip().startswith("continue with:")]
    errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln]
    return (errors[-1] if errors else lines[-1] if lines else "no output")[:300]


def _fmt_s(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def smoke_lines(data_dir: str, on_gpu: bool, img_size: int, keep: str | None = None,
                verbose: bool = False, models=tuple(MODELS), only: str | None = None,
                full: bool = False, closing=None):
    """The plan, each case's line(s) as it ends, then the summary (also when interrupted); check.py
    prints them. The generator returns 0 when all pass, 1 when one fails, 130 when interrupted.
    `closing`: the GPU's closing line from the cases (fits_line, by default)."""
    cases = [c for c in plan(data_dir, on_gpu, img_size, models, full)
             if not only or only in c.name]
    if not cases:
        from .errors import UserError

        names = "; ".join(c.name for c in plan(data_dir, on_gpu, img_size, models, full))
        raise UserError(f"--smoke-only {only}: no case's name contains it (the cases: {names})")
    every = len(plan(data_dir, on_gpu, img_size, models, full=True))
    if on_gpu:
        yield (f"smoke: {len(cases)} cases on this GPU at {img_size} px; the time left is shown "
               "after each case")
    else:
        subset = (f", a short subset (--smoke-all runs all {every})" if not full and not only
                  else "")
        yield (f"smoke: {len(cases)} cases on the CPU at {img_size} px{subset}; about "
               f"{_fmt_s(CPU_CASE_S * len(cases))} ({CPU_CASE_S:.0f} s a case on this "
               "repository's 2-core machine; a busy machine takes several times longer)")
        yield f"       on a GPU it also checks {GPU_ONLY}"
    folder = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="cifar-smoke-"))
    folder.mkdir(parents=True, exist_ok=True)
    done: list[Case] = []
    try:
        for case in cases:
            run_case(case, folder, verbose)
            done.append(case)
            note = f"  ({'; '.join(case.notes)})" if case.notes else ""
            left = len(cases) - len(done)
            eta = (f"  [{left} left, about {_fmt_s(left * sum(c.seconds for c in done) / len(done))}]"
                   if left else "")
            yield f"{case.result.split(':')[0]:4s} {case.name}  {case.seconds:.0f} s{note}{eta}"
            if case.result != "PASS":
                yield f"     {case.result[6:]}"
    except (KeyboardInterrupt, Interrupted):
        passed = sum(c.result == "PASS" for c in done)
        missing = [c.name for c in cases[len(done):]]
        yield (f"smoke: interrupted after {len(done)} of {len(cases)} cases: {passed} pass, "
               f"{len(done) - passed} fail; not finished: {'; '.join(missing)}")
        return 130
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    failed = sum(c.result != "PASS" for c in done)
    kept = f" (run folders in {folder})" if keep else ""
    yield f"smoke: {len(cases) - failed} of {len(cases)} cases pass{kept}"
    if on_gpu and not failed:
        line = (closing or fits_line)(done)
        if line:
            yield line
    return 1 if failed else 0


def fits_line(cases: list[Case], memory=None) -> str:
    """Whether the four-run experiment fits this GPU at the defaults (the memory model on its free
    memory), and how long the four 30-epoch runs take at the images/s of the device-pipeline bf16
    cases (45,000 training and 5,000 validation images an epoch, then the test)."""
    import torch

    from .data.augment import resolve_recipe
    from .data.streams import default_chunk
    from .memory import measure_costs, plan_memory
    from .models import create_model
    from .specs import resolve_model

    memory = memory or torch.cuda.mem_get_info(0)
    recipe = resolve_recipe("reference")
    fits, seconds = [], 0.0
    for arch, spec in MODELS.items():
        model = create_model(resolve_model(arch, False), 224, 10)
        costs = measure_costs(model, 224, torch.bfloat16, None, recipe, True, 45_000, 10_000)
        p = plan_memory(costs, *memory, 128, default_chunk(recipe, 224), 256)
        fits.append(f"{spec.display} {p.micro_batch} x {p.accum_steps}" + ("" if p.fits
                                                                           else " (does not fit)"))
        case = next((c for c in cases if c.name == f"{arch} device pipeline bf16" and c.figures),
                    None)
        if case is None:
            return ""
        epoch = 45_000 / case.figures["img_per_s"] + 5_000 / case.figures["val_img_per_s"]
        seconds += 2 * (30 * epoch + 2 * 10_000 / case.figures["val_img_per_s"])
    ok = all("does not fit" not in f for f in fits)
    return (f"this GPU {'fits' if ok else 'does not fit'} the four-run experiment at the defaults "
            f"(micro-batch x accumulation steps: {', '.join(fits)}); the four 30-epoch runs take "
            f"about {seconds / 3600:.1f} h at these cases' images/s (224 px, batch 128; the "
            "downloads and the decode aside)")


def run_smoke(*args, emit=None, **kwargs) -> int:
    """smoke_lines, each line handed to `emit` (check.py: print) as it comes; a SIGTERM is taken
    like a Ctrl+C (the summary, then the clean-up). 0 when all pass."""
    def terminate(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        lines = smoke_lines(*args, **kwargs)
        while True:
            try:
                line = next(lines)
            except StopIteration as done:
                return done.value
            except (KeyboardInterrupt, Interrupted) as e:
                # raised while the generator was not running (between lines): close it there
                try:
                    line = lines.throw(e)
                except StopIteration as done:
                    return done.value
            if emit is not None:
                emit(line)
    finally:
        signal.signal(signal.SIGTERM, previous)
