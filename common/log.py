"""One output channel: the standard logging module, configured once by each entry point. Messages go
to stderr (stdout is left to a script's results: tables, JSON); torchrun ranks other than 0 show
warnings only. User mistakes are not logged: they end the program as the one `error:` line
(common/errors.py)."""
from __future__ import annotations

import logging
import sys


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test's capture, a redirected stream)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return f"warning: {text}" if record.levelno == logging.WARNING else text


def setup_logging(rank: int = 0) -> None:
    """INFO and up on rank 0, WARNING and up elsewhere, as plain lines on stderr."""
    handler = _Stderr()
    handler.setFormatter(_Format())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for noisy in ("PIL", "matplotlib", "urllib3", "huggingface_hub", "filelock", "torch",
                  "submitit"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
