"""The lowest versions requirements.txt allows, at work: run with the Python of an environment that
holds exactly those versions (tests/test_floors.py builds one), from the repository root:

    /path/to/floors-venv/bin/python tests/floors_smoke.py

Each step is what a user runs (both models, both data pipelines, fp32 / bf16 / fp16 with the
GradScaler, an interrupt and --resume against an uninterrupted run, a weights file, the final test of
best.pt, the reports and the demo, check.py), on synthetic data at 32 px on the CPU: a few minutes.
Prints one PASS/FAIL line per step and the versions; exit 0 when every step passes."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--no-pretrained", "--dummy", "--img-size", "32", "--epochs", "2", "--batch-size", "32",
        "--train-subset", "256", "--val-size", "64", "--test-subset", "64", "--num-workers", "0",
        "--device", "cpu"]


def run(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def last_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (r.stderr + r.stdout).strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else f"exit {r.returncode}, no output"


def steps(tmp: Path):
    """(name, check) pairs; a check returns an error string or ''."""
    def train(script: str, out: str, *flags: str, env: dict | None = None,
              expect: int = 0) -> str:
        r = run(script, *TINY, *flags, "--output-dir", str(tmp / out), env=env)
        if r.returncode != expect or "Traceback" in r.stderr:
            return f"exit {r.returncode}: {last_line(r)}"
        return ""

    def same_metrics(a: str, b: str) -> str:
        import pandas as pd

        ma, mb = (pd.read_csv(tmp / n / "metrics.csv") for n in (a, b))
        cols = ["train_loss", "val_loss", "val_acc"]
        return "" if ma[cols].equals(mb[cols]) else f"{b} differs from {a}:\n{ma[cols]}\n{mb[cols]}"

    def readiness() -> str:
        r = run("check.py")  # exit 1 without a GPU: "not ready for the experiment"
        return "" if r.returncode in (0, 1) and "Traceback" not in r.stderr else last_line(r)

    yield "check.py readiness", readiness
    for script, model, tag in (("train_resnet_cifar.py", "resnet18", "r"),
                               ("train_tinyvit_cifar.py", "tiny_vit_5m_224", "t")):
        m = ["--model", model]
        yield f"{model} device pipeline fp32", lambda s=script, m=m, t=tag: train(
            s, f"{t}_device", *m, "--data-pipeline", "device", "--no-amp")
        yield f"{model} cpu pipeline bf16 autocast", lambda s=script, m=m, t=tag: train(
            s, f"{t}_bf16", *m, "--data-pipeline", "cpu", "--amp-dtype", "bf16")
        yield f"{model} cpu pipeline fp16 + GradScaler", lambda s=script, m=m, t=tag: train(
            s, f"{t}_fp16", *m, "--data-pipeline", "cpu", "--amp-dtype", "fp16")
        yield f"{model} SIGTERM at step 5, then --resume = uninterrupted", (
            lambda s=script, m=m, t=tag: train(s, f"{t}_resumed", *m, "--data-pipeline", "device",
                                               "--no-amp", env={"CIFAR_FAILPOINT": "step:5@term"},
                                               expect=143)
            or train(s, f"{t}_resumed", *m, "--data-pipeline", "device", "--no-amp", "--resume")
            or same_metrics(f"{t}_device", f"{t}_resumed"))

    def weights_file() -> str:
        import timm
        import torch

        torch.save(timm.create_model("resnet18").state_dict(), tmp / "resnet18.pth")
        return train("train_resnet_cifar.py", "r_weights", "--weights", str(tmp / "resnet18.pth"),
                     "--epochs", "1")

    yield "--weights FILE (the offline pretrained path)", weights_file
    yield "compare_runs.py", lambda: ("" if (r := run(
        "compare_runs.py", str(tmp / "r_device"), str(tmp / "t_device"), "--output",
        str(tmp / "cmp.png"), "--safe", "--allow-mismatch")).returncode == 0 else last_line(r))
    yield "plot_four_panels.py", lambda: ("" if (r := run(
        "plot_four_panels.py", "--runs", str(tmp / "r_device"), str(tmp / "t_device"),
        str(tmp / "r_weights"), "--output", str(tmp / "plots" / "four.png"), "--safe",
        "--allow-mismatch")).returncode == 0 else last_line(r))
    yield "show_resnet_example.py", lambda: ("" if (r := run(
        "show_resnet_example.py", "--checkpoint", str(tmp / "t_device" / "best.pt"), "--grid",
        "3", "--safe", "--output", str(tmp / "grid.png"))).returncode == 0 else last_line(r))


def versions() -> str:
    import matplotlib
    import numpy
    import pandas
    import timm
    import torch
    import torchvision

    return (f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm "
            f"{timm.__version__}, numpy {numpy.__version__}, pandas {pandas.__version__}, "
            f"matplotlib {matplotlib.__version__}, Python {sys.version.split()[0]}")


def main() -> int:
    print(f"floors smoke with {versions()}", flush=True)
    failed = total = 0
    with tempfile.TemporaryDirectory(prefix="cifar-floors-") as tmp:
        for name, check in steps(Path(tmp)):
            start = time.perf_counter()
            error = check()
            total += 1
            failed += bool(error)
            print(f"{'FAIL' if error else 'PASS'} {name}  {time.perf_counter() - start:.0f} s"
                  + (f"\n     {error}" if error else ""), flush=True)
    print(f"floors smoke: {total - failed} of {total} steps pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
