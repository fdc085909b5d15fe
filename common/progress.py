"""Signs of life: a tqdm bar on a terminal; on a log file, nohup or a batch job (no terminal) a
plain line every `every_s` seconds, so a stalled job can be told from a slow one. Each line shows
values as they are when it is printed, and where the whole run stands (RunClock)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable

log = logging.getLogger(__name__)


def hms(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RunClock:
    """Where the whole run stands: the time since this session started and an estimate of what is
    left, from the training steps and validations done in this session."""

    def __init__(self, epochs: int, steps_per_epoch: int, clock: Callable[[], float] = time.monotonic):
        self.epochs, self.steps_per_epoch, self.clock = epochs, steps_per_epoch, clock
        self.start = clock()
        self.train_s = self.val_s = 0.0
        self.steps = self.validations = 0

    def trained(self, steps: int, seconds: float) -> None:
        self.steps += steps
        self.train_s += seconds

    def validated(self, seconds: float) -> None:
        self.validations += 1
        self.val_s += seconds

    def left_s(self, epoch: int, step: int) -> float | None:
        """Seconds left from epoch `epoch` (0-based) at step `step` of it; None before a rate."""
        if not self.steps:
            return None
        steps_left = (self.epochs - epoch) * self.steps_per_epoch - step
        vals_left = self.epochs - epoch
        val_each = self.val_s / self.validations if self.validations else 0.0
        # the final test scores two sets of weights on the test set: about twice a validation
        return steps_left * self.train_s / self.steps + (vals_left + 2) * val_each

    def text(self, epoch: int, step: int) -> str:
        left = self.left_s(epoch, step)
        return (f"run {hms(self.clock() - self.start)} so far"
                + (f", about {hms(left)} left" if left is not None else ""))


class Progress:
    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "step",
                 every_s: float = 30.0, enabled: bool = True,
                 values: Callable[[], dict[str, str]] | None = None,
                 suffix: Callable[[int], str] | None = None):
        """`values`: the figures to show, read when a line is printed (on a log, every `every_s`);
        `suffix(done)`: more text for each line (where the whole run stands)."""
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done, self.start_done = initial, initial
        self.start = self.last = time.monotonic()
        self.enabled = enabled
        self.values, self.suffix = values, suffix
        self.bar = None
        self.postfix = ""
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False,
                            dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            rate = (self.done - self.start_done) / max(1e-9, self.last - self.start)
            values = ("  " + "  ".join(f"{k} {v}" for k, v in self.values().items())
                      if self.values else self.postfix)
            more = f"; {self.suffix(self.done)}" if self.suffix else ""
            log.info(f"  {self.desc}: {self.done}/{self.total} {self.unit}s "
                     f"({rate:.1f}/s){values}{more}")

    def set_postfix(self, **values: str) -> None:
        """The bar's figures (a terminal), set where they are read anyway (the check-in)."""
        if self.suffix:
            values["run"] = self.suffix(self.done).removeprefix("run ")
        self.postfix = "  " + "  ".join(f"{k} {v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
