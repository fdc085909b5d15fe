"""What every script of this repository shares at its entry: the parser (usage examples kept
verbatim, no abbreviated flags), logging set up once, and user errors turned into one `error:`
line."""
from __future__ import annotations

import argparse
import functools
import os
from typing import Callable

from .config import HelpFormatter, new_parser
from .errors import exit_on_user_error
from .log import setup_logging


def script_parser(doc: str,
                  parents: tuple[argparse.ArgumentParser, ...] = ()) -> argparse.ArgumentParser:
    """A parser whose description is the docstring's first paragraph and whose epilog is the rest
    (examples)."""
    head, _, rest = doc.partition("\n\n")
    return new_parser(head, rest, parents)


def entry_point(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a script's main(argv): logging configured (torchrun ranks other than 0: warnings only),
    a UserError printed as one `error:` line with exit code 2."""
    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        setup_logging(int(os.environ.get("RANK", "0") or 0))
        return exit_on_user_error(main)(argv)

    return wrapper


def analysis_options() -> argparse.ArgumentParser:
    """The options compare_runs.py and plot_four_panels.py share (a parent parser)."""
    p = argparse.ArgumentParser(add_help=False, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--labels", nargs="+", help="One label per run; runs with the same label are "
                   "seeds of one setting.")
    p.add_argument("--band", choices=["minmax", "std"], default="minmax",
                   help="The band drawn around a mean over seeds: min-max or one standard "
                        "deviation.")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="Compare runs that differ in data, split, size, epochs, recipe or budget; "
                        "marks the numbers.")
    p.add_argument("--allow-test-selection", action="store_true",
                   help="Show runs whose best.pt was chosen on the test set (--val-size 0), every "
                        "number marked ‡.")
    p.add_argument("--safe", action="store_true", help="Never open a window, only save files.")
    return p
