"""User-facing errors: one clear line, no traceback."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, no network); printed as one line."""

    quiet = False  # set on a torchrun rank whose error another rank reports: one message, not one per rank


class ReportedByAnotherRank(UserError):
    """Another torchrun process failed and printed why; this one exits with the same code, silently."""

    quiet = True


def exit_on_user_error(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap a script's main(): a UserError prints `error: ...` to stderr and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            if not e.quiet:
                print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:  # a second Ctrl+C: quit at once, files on disk are whole (atomic writes)
            if os.environ.get("RANK", "0") == "0":  # torchrun: every rank gets the Ctrl+C; rank 0 speaks
                print("\ninterrupted: quit at once; the last completed checkpoint is intact (--resume)",
                      file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
