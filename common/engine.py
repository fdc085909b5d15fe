"""The pieces of the training loop both scripts share: AdamW (or SGD) with warm-up + cosine, one
training step and one epoch with on-device metric sums, the Evaluator (validation, test, the demo
and the benchmarks all evaluate through it), and Ctrl+C handling."""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from . import distributed as D
from .errors import UserError
from .faults import failpoint
from .models import head_module, set_train_mode, unwrap_model
from .runtime import autocast, full_fp32
from .syncs import HotLoopSyncs
from .transfer import to_device

log = logging.getLogger(__name__)

# steps between host reads of the on-device counters (progress, NaN check, DDP stop)
CHECK_EVERY = 25


class NonFiniteLoss(UserError):
    """The loss stayed NaN/Inf: training cannot recover, the last good checkpoint stays."""


# ----------------------------------------------------------------------------- optimisation

def build_optimizer(model: nn.Module, optimizer: str, lr: float, weight_decay: float,
                    momentum: float, head_lr_mult: float, device: torch.device,
                    decay_norm_and_bias: bool = True) -> torch.optim.Optimizer:
    """Trainable parameters in groups (backbone, head) x (decayed, not decayed). By default every
    parameter is decayed, as the experiment's AdamW(model.parameters(), weight_decay=0.05); with
    decay_norm_and_bias False, biases and normalisation weights (the 1-d tensors) are not."""
    head_ids = {id(p) for p in head_module(model).parameters()}
    groups = {(h, d): [] for h in (False, True) for d in (False, True)}
    for p in unwrap_model(model).parameters():
        if p.requires_grad:
            groups[(id(p) in head_ids, decay_norm_and_bias or p.ndim >= 2)].append(p)
    params = [{"params": ps, "lr": lr * (head_lr_mult if head else 1.0),
               "weight_decay": weight_decay if decay else 0.0}
              for (head, decay), ps in groups.items() if ps]
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True)
    # fused: one kernel for all parameters
    return torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda")


class CosineSchedule:
    """The lr factor at schedule step k (k counts epochs or optimizer steps): linear warm-up from
    ~0, then a cosine from 1 down to `floor` at k = total. With k counting epochs and no warm-up
    this is exactly CosineAnnealingLR(T_max=epochs, eta_min=floor x lr) stepped once per epoch, the
    experiment's schedule (its last epoch trains at a little above the floor). A stateful callable,
    so LambdaLR saves it: when a resumed run changes --epochs, `retarget` continues the cosine from
    the current factor down to the floor at the new end."""

    def __init__(self, total: int, warmup: int, floor: float = 0.0):
        self.total, self.warmup, self.floor = total, warmup, floor
        # (start step, factor there, new last step)
        self.segments: list[tuple[int, float, int]] = []

    def _cosine(self, start_factor: float, progress: float) -> float:
        return (self.floor + (start_factor - self.floor) * 0.5
                * (1.0 + math.cos(math.pi * min(1.0, progress))))

    def __call__(self, k: int) -> float:
        for start, factor, end in reversed(self.segments):
            if k >= start:
                return self._cosine(factor, (k - start) / max(1, end - start))
        if k < self.warmup:
            return (k + 1) / self.warmup
        return self._cosine(1.0, (k - self.warmup) / max(1, self.total - self.warmup))

    def retarget(self, k: int, total: int) -> None:
        self.segments.append((k, self(k), total))


def schedule_length(epochs: int, updates_per_epoch: int, per_epoch: bool) -> int:
    """How many schedule steps the run has: one per epoch, or one per optimizer update."""
    return epochs if per_epoch else epochs * updates_per_epoch


def build_scheduler(optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: float,
                    updates_per_epoch: int, per_epoch: bool = False, floor: float = 0.0):
    """LambdaLR over CosineSchedule, counted in epochs (per_epoch) or in optimizer updates."""
    unit = 1 if per_epoch else updates_per_epoch
    schedule = CosineSchedule(schedule_length(epochs, updates_per_epoch, per_epoch),
                              int(warmup_epochs * unit), floor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def build_loss_and_mixup(label_smoothing: float, mixup: float, cutmix: float, num_classes: int):
    if not (mixup or cutmix):
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing), None
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    # Mixup applies the smoothing itself
    return SoftTargetCrossEntropy(), Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix,
                                           label_smoothing=label_smoothing, num_classes=num_classes)


# ----------------------------------------------------------------------------- interrupts

class GracefulStop:
    """First Ctrl+C / SIGTERM sets `requested` (the loop saves and exits after the current step); a
    second Ctrl+C raises KeyboardInterrupt at once. Under torchrun one Ctrl+C reaches a rank twice
    (from the terminal, then forwarded by the launcher), so a repeat within `echo_s` counts as the
    same."""

    def __init__(self, announce: bool = True, echo_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.announce, self.echo_s, self.clock = announce, echo_s, clock
        self.requested, self.signum, self._first = False, 0, 0.0
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if signum == signal.SIGINT and self.clock() - self._first > self.echo_s:
                raise KeyboardInterrupt
            return
        self.requested, self.signum, self._first = True, signum, self.clock()
        if self.announce:
            log.info(f"\n{signal.Signals(signum).name}: finishing this step, then saving (Ctrl+C "
                     "again to quit at once)")

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- one step, one epoch

@dataclass
class EpochSums:
    """Running sums kept on the device (no per-step host sync); part of a mid-epoch checkpoint."""

    loss: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor
    bad_streak: torch.Tensor  # consecutive non-finite losses

    KEYS = ("loss", "correct", "count", "bad_streak")

    @classmethod
    def zeros(cls, device: torch.device) -> "EpochSums":
        return cls(*(torch.zeros((), device=device, dtype=torch.float64) for _ in cls.KEYS))

    def state(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in self.KEYS}

    @classmethod
    def from_state(cls, s: dict[str, float], device: torch.device) -> "EpochSums":
        return cls(*(torch.full((), float(s[k]), device=device, dtype=torch.float64)
                     for k in cls.KEYS))


class TrainStep:
    """One batch: autocast forward, (scaled) backward; after every `accum_steps` batches one update:
    optional clipping, the optimizer step and, when the schedule counts updates, the scheduler step.
    The loss of each batch is divided by accum_steps, so N batches of B accumulate the gradient of
    one batch of N x B (BatchNorm statistics come from each batch of B, as in any accumulation).
    Returns (loss, logits) for the metric sums."""

    def __init__(self, model: nn.Module, optimizer, scheduler, scaler, loss_fn, mixup, amp_dtype,
                 grad_clip: float, channels_last: bool, device: torch.device, accum_steps: int = 1,
                 step_scheduler: bool = True, compile: bool = False):
        self.model, self.optimizer, self.scheduler, self.scaler = (model, optimizer, scheduler,
                                                                   scaler)
        self.loss_fn, self.mixup, self.amp_dtype = loss_fn, mixup, amp_dtype
        self.grad_clip, self.channels_last, self.device = grad_clip, channels_last, device
        self.accum_steps, self.step_scheduler = accum_steps, step_scheduler
        self.micro = 0  # batches since the last update
        # --compile: the forward and the loss, under autocast, as one graph (its backward compiled
        # with it by AOTAutograd); the fused AdamW is one kernel already, and compiling it would
        # recompile at every lr change
        self.forward_loss = torch.compile(self._forward_loss) if compile else self._forward_loss

    def _forward_loss(self, x: torch.Tensor,
                      target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device, self.amp_dtype):
            logits = self.model(x)
            return self.loss_fn(logits, target), logits

    @property
    def at_update_boundary(self) -> bool:
        """No gradient is half-accumulated: a checkpoint here resumes exactly."""
        return self.micro == 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        target = y
        if self.mixup is not None:
            x, target = self.mixup(x, y)
        if self.micro == 0:
            self.optimizer.zero_grad(set_to_none=True)
        self.micro += 1
        update = self.micro == self.accum_steps
        # DDP all-reduces the gradients once, at the update: no_sync must hold the forward too
        # (DDP's forward arms the reducer for the backward that follows)
        no_sync = getattr(self.model, "no_sync", None)
        with no_sync() if no_sync is not None and not update else contextlib.nullcontext():
            loss, logits = self.forward_loss(x, target)
            scaled = loss / self.accum_steps if self.accum_steps > 1 else loss
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        if update:
            self.micro = 0
            self._update()
        return loss.detach(), logits.detach()

    def _update(self) -> None:
        if self.scaler is not None:
            if self.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
        if self.step_scheduler:
            self.scheduler.step()


def train_one_epoch(step_fn: Callable, batches: Iterable, sums: EpochSums, stop: GracefulStop,
                    dist: D.DistInfo, start_step: int = 0, progress=None,
                    frozen_backbone: bool = False, run_step0: int = 0,
                    syncs: HotLoopSyncs | None = None) -> tuple[int, bool]:
    """Train over `batches` from `start_step`; returns (steps done in the epoch, stopped early). A
    stop is taken at an update boundary only (never with half-accumulated gradients). `run_step0`:
    the run's steps before this epoch (the fault tests count steps over the whole run); `syncs`
    counts the host syncs of the steps (check.py --smoke on a GPU)."""
    set_train_mode(step_fn.model, frozen_backbone)
    step = start_step
    pending = False
    syncs = syncs or HotLoopSyncs(torch.device("cpu"))
    for x, y in syncs.batches(batches):
        with syncs.counting():
            loss, logits = step_fn(x, y)
            with torch.no_grad():
                finite = torch.isfinite(loss)
                n = y.shape[0]
                sums.loss += torch.where(finite, loss.double(), 0.0) * n
                sums.correct += (logits.argmax(1) == y).sum()
                sums.count += n
                # the streak of non-finite losses without a host read: x 0 on a finite loss, + 1
                # on a bad one
                sums.bad_streak.mul_(~finite).add_(~finite)
        syncs.step_done()
        step += 1
        failpoint(f"step:{run_step0 + step}")
        # one process: a host bool, checked every step
        pending |= stop.requested and not dist.enabled
        if step % CHECK_EVERY == 0:  # the only host syncs of the epoch
            pending |= _check_in(sums, CHECK_EVERY, step_fn.scheduler, stop, dist)
            if progress is not None:
                count = max(1.0, float(sums.count))
                progress.set_postfix(loss=f"{float(sums.loss) / count:.3f}",
                                     acc=f"{float(sums.correct) / count:.3f}")
        if progress is not None:
            progress.advance(1)
        if pending and getattr(step_fn, "at_update_boundary", True):
            return step, True
    # the epoch's last check-in: an epoch shorter than CHECK_EVERY steps never had one, so there
    # half the epoch non-finite in a row counts as diverged (a single bad batch does not)
    stopped = _check_in(sums, min(CHECK_EVERY, max(1, step // 2)), step_fn.scheduler, stop, dist)
    return step, stopped


def _check_in(sums: EpochSums, streak: int, scheduler, stop: GracefulStop,
              dist: D.DistInfo) -> bool:
    """Raise NonFiniteLoss when the last `streak` losses were all NaN/Inf (fp16 steps the scaler
    skips have finite losses and never count); return whether a stop was asked. Under DDP both are a
    max over ranks (one collective), so the ranks stop or fail together."""
    flags = D.max_over_ranks(torch.stack([sums.bad_streak.double(),
                                          torch.full((), float(stop.requested), dtype=torch.float64,
                                                     device=sums.bad_streak.device)]), dist)
    bad_streak, stop_any = flags.tolist()
    if bad_streak >= streak:
        err = NonFiniteLoss(f"the loss was NaN/Inf for {int(bad_streak)} steps in a row "
                            f"(lr {scheduler.get_last_lr()[0]:.3g} too high? try a lower --lr, "
                            f"--grad-clip 1, or --amp-dtype bf16); the last saved checkpoint, if "
                            f"any, is intact")
        err.quiet = not dist.is_main  # every rank raises it; rank 0 reports
        raise err
    return bool(stop_any)


@dataclass
class Evaluator:
    """Evaluation as the run does it: the eval transform on uint8 images, batched, on the run's
    device, with the run's autocast dtype (None: fp32) and memory format. Validation, the final
    test, the demo and the benchmarks all call it, so they score identically."""

    transform: Callable[[torch.Tensor], torch.Tensor]
    batch_size: int
    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        self._compiled: dict[int, Callable] = {}

    def numerics(self):
        """fp32 evaluation is true fp32 on a GPU (no TF32 in matmuls and convolutions: the
        experiment's fp32 evaluation); under --amp-eval the autocast dtype decides."""
        return full_fp32(self.device) if self.amp_dtype is None else contextlib.nullcontext()

    def _forward(self, model: nn.Module) -> Callable:
        if not self.compile:
            return model
        # the eval-mode graphs: the full batch and the last partial one
        if id(model) not in self._compiled:
            self._compiled[id(model)] = torch.compile(model)
        return self._compiled[id(model)]

    def logits(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Float logits of one batch of uint8 images (on the CPU, or already on the device)."""
        x = self.transform(images.to(self.device, non_blocking=True))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp_dtype):
            return self._forward(model)(x).float()

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (on the CPU) of every image, in eval mode."""
        model.eval()
        images = to_device(images, self.device)  # one copy, not one per batch
        with self.numerics():
            probs = [torch.softmax(self.logits(model, images[i:i + self.batch_size]), 1)
                     for i in range(0, len(images), self.batch_size)]
        return torch.cat(probs).cpu() if probs else torch.empty(0, 0)

    @torch.no_grad()
    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 dist: D.DistInfo = D.DistInfo(), keep_probs: bool = False,
                 stop: GracefulStop | None = None, progress=None) -> dict | None:
        """Loss and accuracy over uint8 images (this rank's shard, summed over ranks); with
        keep_probs, also the softmax of every image (single process). None when `stop` was requested
        half-way."""
        model.eval()
        if dist.enabled:
            images, labels = images[dist.rank::dist.world], labels[dist.rank::dist.world]
        device = self.device
        start = time.perf_counter()
        # the images and labels in one copy each (pinned, non-blocking), not one per batch; sums and
        # probabilities stay on the device until the end: no host sync per batch
        images, labels = to_device((images, labels), device)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.float64)
        probs = []
        with self.numerics():
            for i in range(0, len(images), self.batch_size):
                if stop is not None and stop.requested:
                    return None
                if i == 0:
                    failpoint("eval")
                logits = self.logits(model, images[i:i + self.batch_size])
                y = labels[i:i + self.batch_size]
                loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
                correct += (logits.argmax(1) == y).sum()
                if keep_probs:
                    probs.append(torch.softmax(logits, 1))
                if progress is not None:
                    progress.advance(len(y))
        count = torch.full((), float(len(images)), device=device, dtype=torch.float64)
        totals = D.all_reduce_sum(torch.stack([loss_sum, correct, count]), dist)
        loss_sum, correct, n = totals.tolist()  # the one host read of an evaluation
        n = max(1.0, n)
        out = {"loss": loss_sum / n, "acc": correct / n, "n": int(n),
               "img_per_s": n / max(1e-9, time.perf_counter() - start)}
        if keep_probs:
            out["probs"] = torch.cat(probs).cpu() if probs else torch.empty(0, 0)
        return out
