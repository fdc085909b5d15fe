"""check.py --smoke: does every path of a run work on this machine? For each model x data
pipeline x AMP dtype, a short real run (training steps, validation, checkpoints, the final test) in
a temp folder; then a SIGTERM in the middle of an epoch and a SIGKILL in the second, each
followed by --resume; then --compile. Each case is one PASS/FAIL line with the failure's last
error line, so a first GPU session knows in minutes what works, before it spends more.

Every case is an ordinary train command, run as its own process, so a crash of one (a CUDA error, a
kill) cannot take the others down."""
from __future__ import annotations

import logging
import os
import shutil
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


@dataclass
class Case:
    name: str
    steps: list[tuple[list[str], dict]]   # (train flags, extra environment) run one after the other
    script: str
    result: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def plan(data_dir: str, on_gpu: bool, img_size: int, models=tuple(MODELS)) -> list[Case]:
    """The cases: on a GPU both pipelines x bf16 and fp16 (GradScaler); on a CPU both pipelines in
    fp32 (the CPU runs no AMP by default). Then, per model, two interrupts + --resume and a
    --compile run."""
    base = ["--no-pretrained", "--data-dir", data_dir, "--img-size", str(img_size),
            "--epochs", "2", "--train-subset", "512", "--val-size", "256", "--test-subset", "256",
            "--batch-size", "64", "--num-workers", "2", "--device", "cuda" if on_gpu else "cpu"]
    dtypes = ["bf16", "fp16"] if on_gpu else ["fp32"]
    cases = []
    for arch in models:
        script = MODELS[arch].script if arch in MODELS else "train_resnet_cifar.py"
        model = ["--model", arch]
        for pipeline in ("device", "cpu"):
            for dtype in dtypes:
                amp = ["--no-amp"] if dtype == "fp32" else ["--amp-dtype", dtype]
                flags = [*base, *model, "--data-pipeline", pipeline, *amp]
                cases.append(Case(f"{arch} {pipeline} pipeline {dtype}", [(flags, {})], script))
        # 512 images / 64 = 8 steps an epoch: step 5 is mid-epoch 1, step 13 mid-epoch 2
        interrupts = (("step:5@term", "SIGTERM mid-epoch (step 5)"),
                      ("step:13@kill", "SIGKILL in epoch 2"))
        for point, what in interrupts:
            steps = [([*base, *model], {"CIFAR_FAILPOINT": point}),
                     ([*base, *model, "--resume"], {})]
            cases.append(Case(f"{arch} {what}, then --resume", steps, script))
        cases.append(Case(f"{arch} --compile", [([*base, *model, "--compile"], {})], script))
    return cases


def run_case(case: Case, folder: Path, verbose: bool = False) -> Case:
    out = folder / case.name.replace(" ", "_").replace(",", "").replace("-", "")
    start = time.perf_counter()
    for flags, env in case.steps:
        argv = [sys.executable, case.script, *flags, "--output-dir", str(out),
                "--progress-every", "60"]
        if verbose:
            log.info("  $ " + " ".join(argv[1:])
                     + "".join(f"  ({k}={v})" for k, v in env.items()))
        try:
            r = subprocess.run(argv, cwd=REPO, env={**os.environ, **env}, capture_output=True,
                               text=True, timeout=CASE_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # a hung case must not eat a GPU session
            case.result = f"FAIL: no result after {CASE_TIMEOUT_S} s (killed)"
            break
        if "CIFAR_FAILPOINT" in env:  # interrupted on purpose: a checkpoint to resume, no result
            if (out / RF.SUMMARY).is_file() or not (out / RF.LAST).is_file():
                case.result = (f"FAIL: after {env['CIFAR_FAILPOINT']} expected a last.pt and no "
                               f"summary.json (exit {r.returncode}: {_last_error(r.stderr)})")
                break
            continue
        if r.returncode != 0:
            case.result = "FAIL: " + _last_error(r.stderr)
            break
    else:
        from .record import read_summary

        summary = read_summary(out / RF.SUMMARY)
        case.result = "PASS" if summary is not None else "FAIL: no summary.json written"
        if summary is not None:
            case.notes.append(f"test acc {summary.test_acc:.3f}, {summary.epochs_run} epochs")
    case.seconds = time.perf_counter() - start
    return case


def _last_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln]
    return (errors[-1] if errors else lines[-1] if lines else "no output")[:300]


def smoke_lines(data_dir: str, on_gpu: bool, img_size: int, keep: str | None = None,
                verbose: bool = False, models=tuple(MODELS), only: str | None = None):
    """Run every case, yielding its line(s) as it ends, then the count line; check.py prints them
    (stdout is the script's, as for the benchmarks). The generator returns 0 when all pass."""
    cases = [c for c in plan(data_dir, on_gpu, img_size, models) if not only or only in c.name]
    if not cases:
        from .errors import UserError

        names = "; ".join(c.name for c in plan(data_dir, on_gpu, img_size, models))
        raise UserError(f"--smoke-only {only}: no case's name contains it (the cases: {names})")
    folder = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="cifar-smoke-"))
    folder.mkdir(parents=True, exist_ok=True)
    failed = 0
    try:
        for case in cases:
            run_case(case, folder, verbose)
            failed += case.result != "PASS"
            note = f"  ({'; '.join(case.notes)})" if case.notes else ""
            yield f"{case.result.split(':')[0]:4s} {case.name}  {case.seconds:.0f} s{note}"
            if case.result != "PASS":
                yield f"     {case.result[6:]}"
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    kept = f" (run folders in {folder})" if keep else ""
    yield f"smoke: {len(cases) - failed} of {len(cases)} cases pass{kept}"
    return 1 if failed else 0


def run_smoke(*args, emit=None, **kwargs) -> int:
    """smoke_lines, each line handed to `emit` (check.py: print) as it comes. 0 when all pass."""
    lines = smoke_lines(*args, **kwargs)
    while True:
        try:
            line = next(lines)
        except StopIteration as done:
            return done.value
        if emit is not None:
            emit(line)
