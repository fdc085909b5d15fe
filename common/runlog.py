"""What a run writes besides checkpoints: config.json, metrics.csv, TensorBoard scalars, summary.json."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .errors import UserError


METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s",
                  "train_img_per_s", "val_img_per_s", "peak_mem_gb")


def git_commit(folder: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, recorded with every run."""
    import timm
    import torchvision

    info = {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "timm": str(timm.__version__),
            "platform": platform.platform(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_threads": torch.get_num_threads(),
            "git_commit": git_commit(Path(__file__).resolve().parent),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "start_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    return info


class MetricsLog:
    """metrics.csv (one flat row per epoch, flushed) and the same scalars in TensorBoard."""

    def __init__(self, folder: str | Path, tensorboard: bool = True):
        self.path = Path(folder) / "metrics.csv"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(folder))

    def truncate_after(self, epoch: int) -> None:
        """Drop rows of epochs > `epoch` (written after the checkpoint a resume starts from)."""
        if not self.path.is_file():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if r.get("epoch", "").isdigit() and int(r["epoch"]) <= epoch]
        if len(kept) != len(rows):
            from .checkpoint import atomic_write

            def write(f):
                w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
                w.writeheader()
                w.writerows(kept)

            atomic_write(self.path, write, mode="w")

    def append(self, row: dict[str, float]) -> None:
        new = not self.path.is_file() or self.path.stat().st_size == 0
        try:
            with open(self.path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow({k: (f"{v:.7g}" if isinstance(v, float) else v) for k, v in row.items()})
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise UserError(f"cannot append to {self.path} ({e.strerror or e}); free disk space, then "
                            f"--resume (last.pt of the previous epoch is intact)") from None
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch" and v is not None:
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """Rows of a metrics.csv as floats (plotting reads through pandas; this is for the loop and tests)."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items() if v not in (None, "")} for r in csv.DictReader(f)]
