"""What produced a run, recorded in config.json (versions, hardware, git state, command) and told back in one
line under every figure and table: data, image count, size, epochs, weights, seed."""
from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def git_state(folder: Path = REPO) -> dict[str, Any]:
    """{commit, dirty}: dirty when tracked files differ from the commit; None outside a git checkout."""
    def run(*cmd: str) -> str | None:
        try:
            out = subprocess.run(["git", *cmd], cwd=folder, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def environment(device) -> dict[str, Any]:
    """Versions, hardware and the command, recorded with every run."""
    import timm
    import torch
    import torchvision

    git = git_state()
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "timm": str(timm.__version__),
            "cuda": torch.version.cuda, "platform": platform.platform(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()})",
            "cpu_threads": torch.get_num_threads(), "git_commit": git["commit"], "git_dirty": git["dirty"],
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "start_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def data_label(config: dict[str, Any]) -> str:
    """'CIFAR-10 (image folder)' or 'synthetic data (--dummy, not CIFAR-10)'; 'unknown data' for old runs."""
    data = config.get("data") or {}
    if config.get("dummy") or data.get("kind") == "synthetic":
        return "synthetic data (--dummy, not CIFAR-10)"
    if not data:
        return "unknown data (config.json predates provenance)"
    return f"CIFAR-10 ({data.get('kind', '?')})"


def weights_label(config: dict[str, Any]) -> str:
    """'ImageNet: timm resnet18.a1_in1k (top-1 73.16%)', 'weights file x.pth' or 'random init'."""
    w = config.get("weights") or {}
    init = w.get("init") or ("ImageNet" if config.get("pretrained") else "random init")
    if init == "random init":
        return "random init"
    if init == "file":
        return f"weights file {Path(w.get('file', '?')).name}"
    top1 = w.get("imagenet_top1")
    name = f"{w.get('library', '?')} {w.get('arch', '?')}.{w.get('tag', '?')}" if w else config.get("model", "?")
    return f"ImageNet: {name}" + (f" (ImageNet top-1 {top1:.1f}%)" if top1 else "")


def run_label(config: dict[str, Any], summary: dict[str, Any] | None = None) -> str:
    """One line of provenance: data, test images, size, epochs run/planned, recipe, weights, seeds."""
    summary = summary or {}
    splits = (config.get("data") or {}).get("splits", {})
    n_test = summary.get("test_images") or splits.get("test", "?")
    epochs = summary.get("epochs_run")
    epochs_txt = f"{epochs}/{config.get('epochs', '?')} epochs" if epochs else f"{config.get('epochs', '?')} epochs planned"
    recipe = (config.get("recipe") or {}).get("name", config.get("aug", "?"))
    train = splits.get("train", "?")
    return (f"{data_label(config)}, {train} train / {n_test} test images, {config.get('img_size', '?')} px, "
            f"{epochs_txt}, recipe {recipe}, {weights_label(config)}, seed {config.get('seed', '?')}"
            f"/split {config.get('split_seed', '?')}")
