"""What produced a run: versions, hardware, git state and the command, recorded in config.json."""
from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from .record import Environment

REPO = Path(__file__).resolve().parents[1]


def git_state(folder: Path = REPO) -> dict[str, Any]:
    """{commit, dirty}: dirty when tracked files differ from the commit; None outside a git
    checkout."""
    def run(*cmd: str) -> str | None:
        try:
            out = subprocess.run(["git", *cmd], cwd=folder, capture_output=True, text=True,
                                 timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def environment(device) -> Environment:
    """Versions, hardware and the command, recorded with every run."""
    import timm
    import torch
    import torchvision

    git = git_state()
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()})")
    return Environment(python=platform.python_version(), torch=str(torch.__version__),
                       torchvision=str(torchvision.__version__), timm=str(timm.__version__),
                       cuda=torch.version.cuda, platform=platform.platform(), device=str(device),
                       device_name=name, cpu_threads=torch.get_num_threads(),
                       git_commit=git["commit"], git_dirty=git["dirty"],
                       command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                       start_time=datetime.datetime.now().astimezone().isoformat(
                           timespec="seconds"))
