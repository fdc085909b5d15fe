"""Checkpoints enough to resume exactly, written atomically (common/files.py) and read back with
weights_only=True; the RNG states they carry; what a failed load means, in words."""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .distributed import DistInfo
from .errors import LoadError
from .files import atomic_write


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise in memory first (its size is then known for the free-space check), then write
    atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getbuffer().tobytes())


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG a training step touches in this process, as tensors and plain values
    (weights_only-safe): Python's, NumPy's, torch's CPU generator and, on a GPU, the generator of
    the device this process trains on (not every visible GPU's: a run resumed under another
    CUDA_VISIBLE_DEVICES sees fewer)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2],
             "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2])}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if device is not None and device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def gather_rng(dist: DistInfo, device: torch.device) -> dict[str, Any]:
    """What last.pt stores as "rng": this process's states, and under torchrun every rank's, so
    that rank k resumes with its own (all ranks call it: it is a collective)."""
    own = capture_rng(device)
    if not dist.enabled:
        return own
    import torch.distributed

    ranks: list[Any] = [None] * dist.world
    torch.distributed.all_gather_object(ranks, own)
    return {**own, "ranks": ranks}


def restore_rng(saved: dict[str, Any], device: torch.device | None = None, rank: int = 0) -> None:
    """Put back the states capture_rng / gather_rng saved: rank `rank`'s own under torchrun, and
    the CUDA state onto `device` only."""
    ranks = saved.get("ranks") or []
    # a run resumed with more processes than it had: the extra ranks take rank 0's states
    state = ranks[rank] if rank < len(ranks) else saved
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], 0, 0.0))
    if device is not None and device.type == "mps" and state.get("mps") is not None:
        torch.mps.set_rng_state(state["mps"])
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per visible GPU
        index = device.index or 0
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def load_error_reason(e: Exception, path: str | Path | None = None) -> str:
    """What a torch.load failure means, in words: truncated, not a torch file, or pickled code
    refused."""
    text = str(e)
    if path is not None:
        import zipfile

        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
            return ("truncated: the file ends before its zip directory (an interrupted write or "
                    "copy)")
        # neither a zip nor a pickle (protocol 2+) starts so
        if head[:1] != b"\x80" and head != b"PK\x03\x04":
            return "not a PyTorch file: its bytes are not a saved state"
    if "Weights only load failed" in text or "WeightsUnpickler error" in text:
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        return ("it holds pickled Python objects, which are never unpickled here (that could run "
                "code): "
                + (detail[0].split(". Please use")[0][:120] if detail else "refused"))
    if "central directory" in text or "failed reading zip archive" in text or "EOF" in text:
        return "truncated or not a complete file: the zip archive's directory is missing"
    if any(k in text for k in ("invalid load key", "could not find MARK", "not a zip file",
                               "magic number")):
        return "not a PyTorch file: its bytes are not a saved state"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first[:200]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint of this repository, or a LoadError naming the file, what was expected and what
    was found (the caller adds which flag to change)."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        # truncated zip, random bytes, pickled objects: all unusable the same way
        raise LoadError(f"checkpoint {path} is unusable ({load_error_reason(e, path)}); use the "
                        "run's other checkpoint (best.pt / last.pt) or retrain") from None
    if (not isinstance(state, dict) or not isinstance(state.get("model"), dict)
            or "record" not in state):
        found = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise LoadError(f"{path} is not a checkpoint of this repository (expected 'model' and "
                        f"'record', found {found}); for a bare weights file use --weights")
    return state
