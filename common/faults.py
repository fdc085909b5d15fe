"""Fault injection for the fault tests: with CIFAR_FAILPOINT=<point>[@<action>] set, the process
acts at that point of a run, exactly, instead of a test guessing the moment from outside. Unset
(always, for users), every failpoint() is a dictionary lookup and nothing else.

Points: decode (half-way through decoding images), step:<n> (after the run's n-th training step),
epoch:<n> (after epoch n's metrics row, before its checkpoints), write:<file> (half-way through
writing that file: last.pt, best.pt, summary.json, ...), test (during the final test), summary
(before summary.json), eval (at an evaluation's first batch). Actions: kill (SIGKILL, the default),
int (SIGINT), term (SIGTERM), pgint (SIGINT to the whole process group, as a terminal's Ctrl+C
sends it), enospc (the write fails as on a full disk), oom (the GPU's out-of-memory error, once),
pause (wait there for a signal, after writing this process's pid to CIFAR_FAILPOINT_MARK: a test
catches a run mid-step without timing it)."""
from __future__ import annotations

import errno
import os
import signal

ENV = "CIFAR_FAILPOINT"
# Windows has no SIGKILL: os.kill with SIGTERM terminates the process there just as abruptly
_SIGNALS = {"kill": getattr(signal, "SIGKILL", signal.SIGTERM), "int": signal.SIGINT,
            "term": signal.SIGTERM}


def failpoint(point: str) -> None:
    """Act here if CIFAR_FAILPOINT names this point (see the module docstring)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, action = spec.partition("@")
    if target != point:
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.environ.pop(ENV)  # once: a signal the run survives must not fire again
    if action == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory ({ENV} at {point})")
    if action == "pgint":
        os.killpg(os.getpgid(0), signal.SIGINT)
        return
    if action == "pause":
        mark = os.environ.get(f"{ENV}_MARK")
        if mark:
            with open(mark, "w") as f:
                f.write(str(os.getpid()))
        signal.pause()
        return
    os.kill(os.getpid(), _SIGNALS[action or "kill"])
