"""Counting the host syncs of the training loop on a real GPU, for check.py --smoke: with
CIFAR_SYNC_CHECK=1 set, CUDA's sync debug mode warns at every operation that makes the CPU wait for
the GPU, and each warning inside a training step or a batch's making is counted (the check-in every
25 steps reads the device by design and is not counted, nor are a session's first steps: lazy
initialisation). The count is written to sync_check.json in the run folder. Unset (always, for
users), nothing here does anything."""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import torch

ENV = "CIFAR_SYNC_CHECK"
FILE = "sync_check.json"
WARM_UP_STEPS = 2


class HotLoopSyncs:
    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda" and os.environ.get(ENV) == "1"
        self.steps = self.syncs = 0
        self._index = 0  # steps taken in this process
        self.examples: list[str] = []

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        if not self.enabled or self._index < WARM_UP_STEPS:
            yield
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(0)
        for w in caught:
            if "synchroniz" in str(w.message):
                self.syncs += 1
                if len(self.examples) < 3:
                    self.examples.append(f"{Path(w.filename).name}:{w.lineno}")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def batches(self, batches: Iterable) -> Iterator:
        """The batches, each made under counting (the device pipeline's augmentation)."""
        if not self.enabled:
            yield from batches
            return
        it = iter(batches)
        while True:
            with self.counting():
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch

    def step_done(self) -> None:
        if self.enabled:
            self.steps += self._index >= WARM_UP_STEPS
            self._index += 1

    def write(self, folder: Path) -> None:
        if self.enabled:
            (folder / FILE).write_text(json.dumps({"steps": self.steps, "syncs": self.syncs,
                                                   "where": self.examples}))
