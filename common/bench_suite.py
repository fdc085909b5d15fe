"""`python check.py --bench-suite EPOCHS`: time real epochs of both models by running the train
scripts themselves (as subprocesses, on CIFAR-sized synthetic data) and project the four 30-epoch
runs from them."""
from __future__ import annotations

import logging
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .config import TrainConfig, build_parser
from .errors import UserError
from .record import read_record, read_summary
from .runfolder import CONFIG, SUMMARY, read_metrics
from .specs import CONTROLS, MODELS, REGISTRY

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)


def check_flags(flags: str) -> list[str]:
    """The extra training flags, parsed as the train scripts would (one-line errors for bad
    ones)."""
    argv = shlex.split(flags)
    parser = build_parser("bench", "resnet18")

    def fail(message: str):
        raise UserError(f"--bench-suite-flags: {message} (the flags of python "
                        "train_resnet_cifar.py --help)")

    parser.error = fail
    args = parser.parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    values.pop("output_dir", None)
    TrainConfig(**values).validate()
    return argv


def bench_suite(epochs: int, device_name: str, flags: str,
                output: str | Path | None = None) -> dict:
    """Projected wall time of the four-run suite, from `epochs` timed epochs per model (set-up,
    validation and test included). Pretrained and scratch runs do the same compute, so each model
    runs once, from scratch. The epoch lines of the timed runs go to stderr, as progress."""
    extra = check_flags(flags)
    full_epochs = TrainConfig().epochs
    results: dict = {"timed_epochs": epochs, "full_epochs": full_epochs, "flags": flags, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench_suite_") as tmp:
        # the experiment's two models, then the controls' other architectures (run_suite.py
        # --controls --dry-run projects them from these figures)
        control_archs = {c.partition(".")[0] for c in CONTROLS} - set(MODELS)
        for spec in [*MODELS.values(), *(REGISTRY[a] for a in sorted(control_archs))]:
            label, script = spec.display, spec.script
            out = Path(tmp) / spec.run_prefix
            cmd = [sys.executable, str(REPO / script), *extra, "--model", spec.arch,
                   "--no-pretrained", "--dummy", "--epochs", str(epochs), "--device", device_name,
                   "--output-dir", str(out)]
            start = time.perf_counter()
            last = _run_showing_progress(cmd)
            wall = time.perf_counter() - start
            if last is not None:
                raise UserError(f"the timed {label} run failed: {last}")
            m = read_metrics(out / "metrics.csv")
            summary, record = read_summary(out / SUMMARY), read_record(out / CONFIG)
            epoch_s = m["epoch_time_s"].tolist()
            later = float(m["epoch_time_s"].iloc[1:].median()) if len(epoch_s) > 1 else epoch_s[0]
            other_s = wall - sum(epoch_s)  # start-up, data, model, test
            results["device"] = record.environment.device_name
            results["runs"][label] = {
                "first_epoch_s": epoch_s[0], "later_epoch_s": later,
                "train_img_per_s": float(m["train_img_per_s"].iloc[-1]),
                "val_img_per_s": float(m["val_img_per_s"].iloc[-1]),
                "peak_mem_gb": float(m["peak_mem_gb"].max()), "other_s": other_s,
                "train_images": record.data.splits.train, "batch_size": record.config.batch_size,
                "img_size": record.config.img_size, "test_images": summary.test_images,
                "projected_run_s": other_s + epoch_s[0] + (full_epochs - 1) * later}
    results["projected_suite_s"] = 2 * sum(results["runs"][m.display]["projected_run_s"]
                                           for m in MODELS.values())
    if output:  # run_suite.py --dry-run projects a sweep from these figures
        from .files import write_json

        write_json(output, results)
    return results


def _run_showing_progress(cmd: list[str]) -> str | None:
    """Run a train script, passing its log lines on as progress; None on success, else its last
    line."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line.rstrip())
        log.info(line.rstrip())
    return None if proc.wait() == 0 else next((ln for ln in reversed(lines) if ln.strip()), "?")


def format_suite(r: dict) -> str:
    lines = [f"device: {r['device']}; {r['timed_epochs']} timed epoch(s) per model; extra flags: "
             f"{r['flags'] or 'none'}",
             "", "| model | first epoch | later epochs | train img/s | val img/s | peak GB | "
             "start-up + test | projected "
             f"{r['full_epochs']}-epoch run |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, x in r["runs"].items():
        lines.append(f"| {name} | {x['first_epoch_s']:.1f} s | {x['later_epoch_s']:.1f} s | "
                     f"{x['train_img_per_s']:,.0f} | {x['val_img_per_s']:,.0f} | "
                     f"{x['peak_mem_gb']:.1f} | {x['other_s']:.1f} s | "
                     f"{x['projected_run_s'] / 60:.1f} min |")
    lines += ["", f"four-run suite (each model pretrained and from scratch, {r['full_epochs']} "
              f"epochs): {r['projected_suite_s'] / 60:.1f} min projected from these epochs"]
    return "\n".join(lines)
