"""Signs of life: a tqdm bar on a terminal; on a log file, nohup or a batch job (no terminal) a
plain line every `every_s` seconds, so a stalled job can be told from a slow one."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "step",
                 every_s: float = 30.0, enabled: bool = True):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done, self.start_done = initial, initial
        self.start = self.last = time.monotonic()
        self.enabled = enabled
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
            log.info(f"  {self.desc}: {self.done}/{self.total} {self.unit}s "
                     f"({rate:.1f}/s){self.postfix}")

    def set_postfix(self, **values: str) -> None:
        self.postfix = "  " + "  ".join(f"{k} {v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
