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

import sys
from pathlib import Path

from common.cli import analysis_options, entry_point, script_parser
from common.errors import UserError


def parse_args(argv):
    p = script_parser(__doc__, parents=(analysis_options(),))
    p.add_argument("runs", nargs="*", help="Run folders or metrics.csv files.")
    p.add_argument("--log-path", action="append", metavar="CSV",
                   help="A run's metrics.csv (the same as giving it as a run; may be repeated).")
    p.add_argument("--output", help="Figure path, .png/.pdf/.svg (default: <run>_curve.png in a "
                                    "single run's folder, else runs/compare.png).")
    p.add_argument("--results", help="Also write the tables to this markdown file.")
    p.add_argument("--title", help="Figure title (default: says what data and comparison it is).")
    return p.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = [*args.runs, *(args.log_path or [])]
    if not paths:
        raise UserError("give at least one run: a run folder or its metrics.csv (see --help)")
    from common.report import report

    output = args.output or default_output(paths)
    print(report(paths, args.labels, output, args.results, args.allow_mismatch, args.band,
                 args.safe, args.title, extra_figures=False,
                 allow_test_selection=args.allow_test_selection))
    return 0


def default_output(paths: list[str]) -> Path:
    if len(paths) == 1:
        folder = Path(paths[0]) if Path(paths[0]).is_dir() else Path(paths[0]).parent
        return folder / f"{folder.name}_curve.png"
    return Path("runs") / "compare.png"


if __name__ == "__main__":
    sys.exit(main())
