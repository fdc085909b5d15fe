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

import sys
from pathlib import Path

from common.cli import analysis_options, entry_point, script_parser
from common.specs import default_run_folders


def parse_args(argv):
    p = script_parser(__doc__, parents=(analysis_options(),))
    p.add_argument("--runs", nargs="+", default=list(default_run_folders()),
                   help="Run folders (or metrics.csv files); missing ones are listed and left out.")
    p.add_argument("--output", default="runs/four_panels.png",
                   help="The curves figure: .png, .pdf or .svg.")
    p.add_argument("--results", help="The markdown results (default: results.md beside --output).")
    return p.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from common.report import report

    results = Path(args.results) if args.results else Path(args.output).with_name("results.md")
    text = report(args.runs, args.labels, args.output, results, args.allow_mismatch, args.band,
                  args.safe, None, extra_figures=True, skip_missing=True,
                  allow_test_selection=args.allow_test_selection)
    # the answer, not the whole file: the tables are in results.md
    print("\n".join(answer_lines(text)) + f"\n\nthe tables, intervals and notes: {results}")
    return 0


def answer_lines(text: str) -> list[str]:
    """results.md's answer: its first paragraph after the heading, and the data line."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return lines[:2]


if __name__ == "__main__":
    sys.exit(main())
