"""The state of a run that checkpoints save and restore: model, optimizer, scheduler, scaler, where
in the schedule it stands (epoch, step, the partial sums of an interrupted epoch) and the best epoch
so far."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import UserError
from .models import forget_cached_weights, unwrap_model


@dataclass
class Best:
    """The best validation accuracy so far, its epoch, and the epochs since (for --patience)."""

    acc: float = -1.0
    epoch: int = 0
    since: int = 0

    def update(self, val_acc: float, epoch: int) -> bool:
        """Record an epoch's validation accuracy; True when it is a new best (ties keep the earlier
        epoch)."""
        if val_acc > self.acc:
            self.acc, self.epoch, self.since = val_acc, epoch, 0
            return True
        self.since += 1
        return False


@dataclass
class RunState:
    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any = None
    epoch: int = 0                    # epochs completed
    step: int = 0                     # steps done in epoch `epoch + 1` (a mid-epoch checkpoint)
    partial: dict | None = None       # that epoch's running sums
    best: Best = field(default_factory=Best)
    finished: bool = False

    def full_checkpoint(self, record: dict[str, Any], rng: dict[str, Any]) -> dict[str, Any]:
        """last.pt: everything an exact resume needs (tensors and plain values: weights_only=True
        loads it); `rng` from checkpoint.gather_rng (every rank's states under torchrun)."""
        return {"model": unwrap_model(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": self.epoch, "step": self.step, "partial": self.partial,
                "best": asdict(self.best), "finished": self.finished, "rng": rng,
                "record": record}

    def weights_checkpoint(self, record: dict[str, Any]) -> dict[str, Any]:
        """best.pt: the weights and what is needed to use them (no optimizer state: a tenth of the
        size)."""
        return {"model": unwrap_model(self.model).state_dict(), "epoch": self.epoch,
                "best": asdict(self.best), "record": record}

    def restore(self, ckpt: dict[str, Any], path: str) -> None:
        """Load a last.pt; a UserError says which part does not fit and why."""
        load_model_state(self.model, ckpt["model"], path)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None and ckpt.get("scaler") is not None:
                self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise UserError(f"{path}: the optimizer/scheduler state does not fit this run "
                            f"({str(e)[:150]}); resume with the original flags or start "
                            "a new --output-dir") from None
        self.epoch, self.step, self.partial = ckpt["epoch"], ckpt["step"], ckpt.get("partial")
        self.best = Best(**ckpt["best"])
        self.finished = bool(ckpt.get("finished"))


def load_model_state(model, state: dict[str, Any], path: str) -> None:
    """load_state_dict (strict) with an error that names the file, the model and the mismatching
    keys."""
    target = unwrap_model(model)
    own = target.state_dict()
    problems = []
    for label, keys in (("missing", [k for k in own if k not in state]),
                        ("unexpected", [k for k in state if k not in own]),
                        ("of another shape",
                         [k for k in state if k in own and own[k].shape != state[k].shape])):
        if keys:
            problems.append(f"{len(keys)} {label} "
                            f"({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    if problems:
        raise UserError(f"{path} does not fit {type(target).__name__}: {'; '.join(problems)} "
                        "tensors; was it written by another model or image size? (pass the "
                        "matching --model / --img-size)")
    target.load_state_dict(state)
    forget_cached_weights(target)
