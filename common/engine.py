"""The pieces of the training loop both scripts share: device and AMP choice, AdamW (or SGD) with
warmup + cosine, one training epoch with on-device metric sums, evaluation, and Ctrl+C handling."""
from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import nn

from . import distributed as D
from .config import TrainConfig
from .data import NUM_CLASSES, eval_batch
from .errors import UserError
from .models import head_module, unwrap_model

CHECK_EVERY = 25  # steps between host reads of the on-device counters (progress bar, NaN check, DDP stop)


class NonFiniteLoss(UserError):
    """The loss stayed NaN/Inf: training cannot recover, the last good checkpoint stays."""


# ----------------------------------------------------------------------------- machine

def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda but PyTorch sees no CUDA GPU (CPU-only build or no driver); "
                            "run python check.py, or use --device cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_amp(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. AMP is a CUDA default; on the CPU only an explicit
    --amp-dtype turns it on (CPU autocast is slower than fp32 on most CPUs)."""
    if not cfg.amp or (device.type == "cpu" and cfg.amp_dtype == "auto"):
        return None
    if cfg.amp_dtype == "fp16":
        return torch.float16
    if cfg.amp_dtype == "bf16" or device.type == "cpu" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- optimisation

def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Four parameter groups: (backbone, head) x (decayed weights, no-decay biases and norms)."""
    head_ids = {id(p) for p in head_module(model).parameters()}
    groups = {(h, d): [] for h in (False, True) for d in (False, True)}
    for p in unwrap_model(model).parameters():
        if p.requires_grad:
            groups[(id(p) in head_ids, p.ndim >= 2)].append(p)
    params = [{"params": ps, "lr": cfg.lr * (cfg.head_lr_mult if head else 1.0),
               "weight_decay": cfg.weight_decay if decay else 0.0}
              for (head, decay), ps in groups.items() if ps]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    fused = device.type == "cuda"  # one kernel for all parameters
    return torch.optim.AdamW(params, lr=cfg.lr, fused=fused)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup from ~0, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))


def build_mixup(cfg: TrainConfig):
    if not (cfg.mixup or cfg.cutmix):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=NUM_CLASSES)


# ----------------------------------------------------------------------------- interrupts

class GracefulStop:
    """First Ctrl+C / SIGTERM sets `requested` (the loop saves and exits after the current step);
    a second Ctrl+C raises KeyboardInterrupt at once. Under torchrun one Ctrl+C reaches a rank twice
    (from the terminal, then forwarded by the launcher), so a repeat within `echo_s` counts as the same."""

    def __init__(self, announce: bool = True, echo_s: float = 0.0) -> None:
        self.announce = announce  # under torchrun every rank gets the signal; rank 0 alone says so
        self.echo_s = echo_s
        self.requested = False
        self.signum = 0
        self._first = 0.0
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if signum == signal.SIGINT and time.monotonic() - self._first > self.echo_s:
                raise KeyboardInterrupt
            return
        self.requested, self.signum, self._first = True, signum, time.monotonic()
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving last.pt "
                  f"(Ctrl+C again to quit at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- one epoch

@dataclass
class EpochSums:
    """Running sums kept on the device (no per-step host sync); part of a mid-epoch checkpoint."""

    loss: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor
    bad_streak: torch.Tensor  # consecutive non-finite losses

    @classmethod
    def zeros(cls, device: torch.device) -> "EpochSums":
        return cls(*(torch.zeros((), device=device, dtype=torch.float64) for _ in range(4)))

    def state(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in ("loss", "correct", "count", "bad_streak")}

    @classmethod
    def from_state(cls, s: dict[str, float], device: torch.device) -> "EpochSums":
        return cls(*(torch.tensor(float(s[k]), device=device, dtype=torch.float64)
                     for k in ("loss", "correct", "count", "bad_streak")))


def train_one_epoch(model: nn.Module, batches: Iterable, optimizer, scheduler, scaler, loss_fn, mixup,
                    sums: EpochSums, amp_dtype, grad_clip: float, channels_last: bool,
                    stop: GracefulStop, dist: D.DistInfo, start_step: int = 0, progress=None) -> tuple[int, bool]:
    """Train over `batches` from `start_step`; returns (steps done in the epoch, stopped early)."""
    device = sums.loss.device
    model.train()
    step = start_step
    for x, y in batches:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        target = y
        if mixup is not None:
            x, target = mixup(x, y)
        with autocast(device, amp_dtype):
            logits = model(x)
            loss = loss_fn(logits, target)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        scheduler.step()
        step += 1
        with torch.no_grad():
            finite = torch.isfinite(loss.detach())
            n = y.shape[0]
            sums.loss += torch.where(finite, loss.detach().double(), 0.0) * n
            sums.correct += (logits.argmax(1) == y).sum()
            sums.count += n
            sums.bad_streak.mul_(~finite).add_(~finite)
        stop_now = stop.requested and not dist.enabled  # one process: a host bool, checked every step
        if step % CHECK_EVERY == 0:  # the only host syncs of the epoch
            stop_now = _check_in(sums, CHECK_EVERY, scheduler, stop, dist)
            if progress is not None:
                progress.update_stats(sums)
        if progress is not None:
            progress.advance(1)
        if stop_now:
            return step, True
    stopped = _check_in(sums, min(CHECK_EVERY, max(1, step // 2)), scheduler, stop, dist)  # ended in NaNs?
    return step, stopped


def _check_in(sums: EpochSums, streak: int, scheduler, stop: GracefulStop, dist: D.DistInfo) -> bool:
    """Raise NonFiniteLoss when the last `streak` losses were all NaN/Inf (fp16 steps the scaler skips have
    finite losses and never count); return whether a stop was asked. Under DDP both are a max over ranks
    (one collective), so the ranks stop or fail together instead of one waiting on another that left."""
    flags = D.max_over_ranks(torch.stack([sums.bad_streak.double(),
                                          torch.tensor(float(stop.requested), dtype=torch.float64,
                                                       device=sums.bad_streak.device)]), dist)
    bad_streak, stop_any = flags.tolist()
    if bad_streak >= streak:
        err = NonFiniteLoss(f"the loss was NaN/Inf for {int(bad_streak)} steps in a row "
                            f"(lr {scheduler.get_last_lr()[0]:.3g} too high? try a lower --lr, "
                            f"--grad-clip 1, or --amp-dtype bf16); last.pt holds the last good epoch")
        err.quiet = not dist.is_main  # every rank raises it; rank 0 reports
        raise err
    return bool(stop_any)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, img_size: int, batch_size: int,
             device: torch.device, amp_dtype=None, channels_last: bool = False,
             dist: D.DistInfo = D.DistInfo()) -> dict[str, float]:
    """Loss and accuracy over uint8 images (this rank's shard; summed over ranks)."""
    model.eval()
    if dist.enabled:
        images, labels = images[dist.rank::dist.world], labels[dist.rank::dist.world]
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.float64)
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        x = eval_batch(images[i:i + batch_size].to(device, non_blocking=True), img_size)
        y = labels[i:i + batch_size].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    totals = D.all_reduce_sum(torch.stack([loss_sum, correct,
                                           torch.tensor(float(len(images)), device=device, dtype=torch.float64)]), dist)
    n = max(1.0, float(totals[2]))
    return {"loss": float(totals[0]) / n, "acc": float(totals[1]) / n, "n": int(n),
            "img_per_s": n / max(1e-9, time.perf_counter() - start)}
