"""Checkpoints that are enough to resume exactly, written atomically, read with weights_only=True."""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import UserError


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through a temp file in the same folder, fsync, then os.replace: a crash or a full disk
    leaves the previous file intact. Errors become UserErrors naming the path."""
    path = Path(path)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); free disk space or choose another "
                        f"--output-dir (the previous {path.name}, if any, is intact)") from None
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)


def write_json(path: str | Path, data: dict) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, default=str) + "\n"), mode="w")


def capture_rng() -> dict[str, Any]:
    """Every RNG a training step touches, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save `state` atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_error_reason(e: Exception) -> str:
    """The informative line of a torch.load failure (its first line is generic advice)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("WeightsUnpickler error:"):
            return ln.split(". Please use")[0][:200]
    return (lines[0] if lines else type(e).__name__)[:200]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by save_checkpoint, or a UserError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; train that run first (README.md) or pass the right --checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled objects: all unusable the same way
        raise UserError(f"checkpoint {path} is corrupt, truncated or not a checkpoint ({load_error_reason(e)}); "
                        f"use the other checkpoint of the run (best.pt / last.pt) or retrain") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "config" not in state:
        raise UserError(f"{path} is not a checkpoint of this repository (no 'model' and 'config'); "
                        f"for a bare weights file use --weights")
    return state
