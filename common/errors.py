"""User-facing errors: one clear line, no traceback. Low-level helpers say what went wrong with
which file; the caller that knows the user's flags adds the fix (`hint`)."""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Callable, Iterator


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, no network); printed as one line."""

    # set on a torchrun rank whose error another rank reports: one message, not one per rank
    quiet = False

    def with_hint(self, hint: str) -> "UserError":
        err = type(self)(f"{self}; {hint}")
        err.quiet = self.quiet
        return err


class WriteError(UserError):
    """A file could not be written (full disk, no permission); the previous file, if any, is
    intact."""


class LoadError(UserError):
    """A checkpoint or weights file could not be read."""


class ReportedByAnotherRank(UserError):
    """Another torchrun process failed and printed why; this one exits with the same code,
    silently."""

    quiet = True


@contextlib.contextmanager
def hint(kind: type[UserError], text: str) -> Iterator[None]:
    """Errors of `kind` raised inside get the caller's advice appended (its flags, its next
    step)."""
    try:
        yield
    except kind as e:
        raise e.with_hint(text) from None


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
        except (ImportError, RuntimeError) as e:
            from .deps import explain_import_error

            why = explain_import_error(e)
            if why is None:
                raise
            print(f"error: {why}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            # a second Ctrl+C: quit at once, files on disk are whole (atomic writes)
            # torchrun: every rank gets the Ctrl+C; rank 0 speaks
            if os.environ.get("RANK", "0") == "0":
                print("\ninterrupted: quit at once; the last completed checkpoint is intact "
                      "(--resume)",
                      file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
