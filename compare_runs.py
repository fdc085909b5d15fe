"""Compare training runs: the four curves (train/validation loss and accuracy against epoch), test accuracies
with intervals, and pre-training gains when a model has both a pretrained and a scratch run.

    python compare_runs.py runs/resnet_ft runs/tinyvit_ft --output runs/resnet_vs_tinyvit.png --safe
    python compare_runs.py --log-path runs/resnet_ft/metrics.csv --safe   # one run -> runs/resnet_ft/resnet_ft_curve.png
    python compare_runs.py runs/seed*/ --band std                          # seeds of one setting: mean with a band
    python compare_runs.py runs/resnet_ft runs/resnet_scratch runs/resnet18.tv_in1k_ft --results runs/controls.md

Runs are run folders or their metrics.csv. Runs of the same model, weights and mode (or given the same
--labels) are seeds of one setting. Runs that differ in data, split, image size, epochs, recipe or budget are
refused unless --allow-mismatch, which marks every affected number with a dagger.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import UserError, exit_on_user_error


def parse_args(argv):
    doc = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=doc[0], epilog=doc[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="Run folders or metrics.csv files.")
    p.add_argument("--log-path", action="append", default=[], help="A run's metrics.csv (same as a positional run).")
    p.add_argument("--labels", nargs="+", help="One label per run; runs with the same label are seeds of one setting.")
    p.add_argument("--band", choices=["minmax", "std"], default="minmax",
                   help="The band drawn around a mean over seeds: min-max (default) or one standard deviation.")
    p.add_argument("--output", help="Figure path, .png/.pdf/.svg (default: <run>_curve.png in a single run's "
                                    "folder, else runs/compare.png).")
    p.add_argument("--results", help="Also write the tables to this markdown file.")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="Compare runs that differ in data, split, size, epochs, recipe or budget; marks the numbers.")
    p.add_argument("--title", help="Figure title (default: says what data and comparison it is).")
    p.add_argument("--safe", action="store_true", help="Never open a window, only save files.")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = [*args.runs, *args.log_path]
    if not paths:
        raise UserError("give at least one run: a run folder or its metrics.csv (see --help)")
    from common.report import report

    output = args.output or default_output(paths)
    return report(paths, args.labels, output, args.results, args.allow_mismatch, args.band, args.safe, args.title,
                  extra_figures=False)


def default_output(paths: list[str]) -> Path:
    if len(paths) == 1:
        folder = Path(paths[0]) if Path(paths[0]).is_dir() else Path(paths[0]).parent
        return folder / f"{folder.name}_curve.png"
    return Path("runs") / "compare.png"


if __name__ == "__main__":
    sys.exit(main())
