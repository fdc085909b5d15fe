"""User-facing errors: one clear line, no traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, no network); printed as one line."""


def exit_on_user_error(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap a script's main(): a UserError prints `error: ...` to stderr and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:  # a second Ctrl+C: quit at once, files on disk are whole (atomic writes)
            print("\ninterrupted: quit at once; the last completed checkpoint is intact (--resume)", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
