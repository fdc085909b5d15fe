"""The experiment's figures and results.md: ResNet-18 and TinyViT-5M, pretrained (solid) against from
scratch (dashed), as four curve panels, test accuracy per class, calibration, and the answer with its
uncertainty.

    python plot_four_panels.py                                    # runs/{resnet,tinyvit}_{ft,scratch}
    python plot_four_panels.py --output runs/four_panels.pdf      # PDF/SVG by extension
    python plot_four_panels.py --runs runs/*_ft runs/*_scratch runs/seed*/* runs/tinyvit_probe

Writes the curves figure (--output), per_class.png and calibration.png beside it, and results.md. Give more
seeds and control runs (other weights, --freeze-backbone) with --runs; they are grouped automatically.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import exit_on_user_error

DEFAULT_RUNS = ("runs/resnet_ft", "runs/resnet_scratch", "runs/tinyvit_ft", "runs/tinyvit_scratch")


def parse_args(argv):
    doc = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=doc[0], epilog=doc[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS),
                   help="Run folders (or metrics.csv files); missing ones are listed and left out.")
    p.add_argument("--labels", nargs="+", help="One label per run; runs with the same label are seeds of one setting.")
    p.add_argument("--output", default="runs/four_panels.png", help="The curves figure: .png, .pdf or .svg.")
    p.add_argument("--results", help="The markdown results (default: results.md beside --output).")
    p.add_argument("--band", choices=["minmax", "std"], default="minmax",
                   help="The band drawn around a mean over seeds: min-max (default) or one standard deviation.")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="Compare runs that differ in data, split, size, epochs, recipe or budget; marks the numbers.")
    p.add_argument("--safe", action="store_true", help="Never open a window, only save files.")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from common.report import report

    results = Path(args.results) if args.results else Path(args.output).with_name("results.md")
    return report(args.runs, args.labels, args.output, results, args.allow_mismatch, args.band, args.safe, None,
                  extra_figures=True, skip_missing=True)


if __name__ == "__main__":
    sys.exit(main())
