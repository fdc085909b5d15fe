"""What a run's settings mean on this machine, resolved once: the device, the AMP dtype, the data
pipeline, the worker count, the evaluation batch. The validated config itself is never changed."""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .distributed import DistInfo
from .errors import UserError


def mps_available() -> bool:
    """Apple silicon's GPU through PyTorch's MPS backend."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto: a CUDA GPU, else Apple silicon's GPU (MPS), else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else ("mps" if mps_available() else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda but PyTorch sees no CUDA GPU (CPU-only build or no "
                            "driver); run python check.py, or use --device cpu")
        return torch.device("cuda", local_rank)
    if name == "mps":
        if not mps_available():
            raise UserError("--device mps but PyTorch sees no Apple-silicon GPU (MPS needs macOS "
                            "12.3+ on an M-series Mac); use --device cpu")
        return torch.device("mps")
    return torch.device("cpu")


def check_mps(cfg, device: torch.device, world: int) -> None:
    """What this repository runs on Apple's MPS: the CPU-fed pipeline in fp32, one process. The
    rest is refused in one line rather than tried (none of it has run on a Mac: the MPS path is
    checked by tests with mocks only)."""
    if device.type != "mps":
        return
    for bad, why in (
        (cfg.data_pipeline == "device", "--data-pipeline device: its augmentation computes in "
         "float64, which MPS lacks; use --data-pipeline cpu (the default there)"),
        (cfg.amp and cfg.amp_dtype != "auto", f"--amp-dtype {cfg.amp_dtype}: mixed precision on "
         "MPS is not supported here; train in fp32 (drop --amp-dtype)"),
        (cfg.compile, "--compile: torch.compile on MPS is not supported here; drop --compile"),
        (world > 1, "torchrun: several processes on MPS are not supported here; run one process"),
    ):
        if bad:
            raise UserError(f"--device mps (Apple silicon): {why}")


def resolve_amp(amp: bool, amp_dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. AMP is a CUDA default; on the CPU only an explicit
    --amp-dtype turns it on (CPU autocast is slower than fp32 on most CPUs); MPS trains in fp32."""
    if not amp or (device.type in ("cpu", "mps") and amp_dtype == "auto"):
        return None
    if amp_dtype == "fp16":
        return torch.float16
    if amp_dtype == "bf16" or device.type == "cpu" or native_bf16(device):
        return torch.bfloat16
    return torch.float16


def native_bf16(device: torch.device | None = None) -> bool:
    """Whether the GPU computes bf16 in hardware: NVIDIA compute capability 8.0 (Ampere) and newer,
    and the AMD GPUs of PyTorch's ROCm build. torch.cuda.is_bf16_supported() also counts emulated
    bf16 by default (V100, T4, RTX 20xx), which is far slower there than fp16 + GradScaler."""
    if torch.version.hip:
        return torch.cuda.is_bf16_supported()
    return torch.cuda.get_device_capability(device)[0] >= 8


def dtype_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def make_scaler(amp_dtype: torch.dtype | None, device: torch.device):
    """A GradScaler for fp16 (its small range underflows gradients), none for bf16 or fp32."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_workers() -> int:
    """DataLoader workers when --num-workers is -1: one per core, at most 8 (more only add start-up
    time)."""
    return min(8, os.cpu_count() or 1)


def _backend_state() -> tuple:
    return (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())


def _set_backend_state(state: tuple) -> None:
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = state[:4]
    torch.use_deterministic_algorithms(state[4], warn_only=state[5])


@contextlib.contextmanager
def backends(device: torch.device, deterministic: bool = False) -> Iterator[None]:
    """The numerics of a run, restored on exit. On CUDA by default: cuDNN autotuning (the fixed
    input shape makes it pay off) and TF32 in training matmuls (evaluation turns TF32 off:
    full_fp32). With `deterministic` (--deterministic): cuDNN's deterministic algorithms, no
    autotuning, no TF32, torch's deterministic algorithms (a warning names an op that has none) and
    cuBLAS's fixed workspace, so a resumed run repeats an uninterrupted one bit for bit on the same
    GPU, driver and versions."""
    saved = _backend_state()
    try:
        if deterministic:
            # read when cuBLAS makes its handle, so before the first matmul on the device
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            _set_backend_state((False, True, False, False, True, True))
        elif device.type == "cuda":
            _set_backend_state((True, False, True, True, *saved[4:]))
        yield
    finally:
        _set_backend_state(saved)


@contextlib.contextmanager
def full_fp32(device: torch.device) -> Iterator[None]:
    """Float32 products in full precision inside (no TF32 in matmuls and cuDNN convolutions);
    nothing to do off CUDA."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Runtime:
    """The resolved machine side of a run."""

    dist: DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    pipeline: str                # device | cpu
    num_workers: int

    @property
    def is_main(self) -> bool:
        return self.dist.is_main


def resolve_runtime(cfg, dist: DistInfo) -> Runtime:
    """Device, AMP dtype, pipeline (auto: device on CUDA), workers (-1: default_workers()). The
    batches are the memory plan's (trainer.choose_batches)."""
    device = resolve_device(cfg.device, dist.local_rank)
    check_mps(cfg, device, dist.world)
    pipeline = (cfg.data_pipeline if cfg.data_pipeline != "auto"
                else ("device" if device.type == "cuda" else "cpu"))
    workers = cfg.num_workers if cfg.num_workers >= 0 else default_workers()
    return Runtime(dist, device, resolve_amp(cfg.amp, cfg.amp_dtype, device), pipeline, workers)
