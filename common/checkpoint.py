"""Files written so that a crash, a kill or a full disk never leaves a half-written one: temp file, fsync,
os.replace; checkpoints enough to resume exactly, read back with weights_only=True."""
from __future__ import annotations

import functools
import io
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError
from .faults import failpoint


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path` through a temp file in the same folder, fsync, then os.replace. Refuses up
    front when the disk cannot hold it; any failure leaves the previous file intact and no temp file, and
    is a one-line UserError naming the file, the space needed and the space free."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        if free < len(payload) + (1 << 20):
            raise OSError(28, "No space left on device")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            half = len(payload) // 2
            f.write(payload[:half])
            failpoint(f"write:{path.name}")
            f.write(payload[half:])
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600; results are shared like any file
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as e:
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        space = f"; it needs {_mb(len(payload))}, {_mb(free)} free" if e.errno == 28 else ""
        raise UserError(f"cannot write {path} ({e.strerror or e}{space}); free disk space or choose another "
                        f"--output-dir, then --resume (the previous {path.name}, if any, is intact)") from None
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)


def write_json(path: str | Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise in memory first (its size is then known for the free-space check), then write atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getbuffer().tobytes())


def capture_rng() -> dict[str, Any]:
    """Every RNG a training step touches, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2], "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_error_reason(e: Exception, path: str | Path | None = None) -> str:
    """What a torch.load failure means, in words: truncated, not a torch file, or pickled code refused."""
    if path is not None:
        import zipfile

        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
            return "truncated: the file ends before its zip directory (an interrupted write or copy)"
    text = str(e)
    if "central directory" in text or "failed reading zip archive" in text or "EOF" in text:
        return "truncated or not a complete file: the zip archive's directory is missing"
    if any(k in text for k in ("invalid load key", "could not find MARK", "not a zip file", "Unsupported operand",
                               "magic number")):
        return "not a PyTorch file: its bytes are not a saved state"
    if "Weights only load failed" in text or "WeightsUnpickler error" in text:
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        return ("it holds pickled Python objects, which are never unpickled here (that could run code): "
                + (detail[0].split(". Please use")[0][:120] if detail else "refused"))
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first[:200]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint of this repository, or a UserError naming the file, what was expected and what was found."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; train that run first (README.md) or pass the right "
                        f"--checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled objects: all unusable the same way
        raise UserError(f"checkpoint {path} is unusable ({load_error_reason(e, path)}); use the run's other "
                        f"checkpoint (best.pt / last.pt) or retrain") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "config" not in state:
        found = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path} is not a checkpoint of this repository (expected 'model' and 'config', found "
                        f"{found}); for a bare weights file use --weights")
    return state
