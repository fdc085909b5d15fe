"""Compare training runs: four panels (train/val loss, train/val accuracy vs epoch) and a markdown table.

    python compare_runs.py runs/resnet_ft/metrics.csv runs/tinyvit_ft/metrics.csv \
        --labels ResNet TinyViT --output runs/resnet_vs_tinyvit.png --safe
    python compare_runs.py --log-path runs/resnet_ft/metrics.csv --safe    # one run -> resnet_ft_curve.png
    python compare_runs.py runs/seed*/ --group-by model                   # seeds: mean with a band

Runs are metrics.csv files or run folders. Runs given the same --labels (or the same --group-by value)
are seeds of one setting: drawn as their mean with a min-max (or --band std) band, tabled as mean ± std.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import UserError, exit_on_user_error

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("runs", nargs="*", help="metrics.csv files or run folders")
    p.add_argument("--log-path", action="append", default=[], help="a run's metrics.csv (same as a positional)")
    p.add_argument("--labels", nargs="+", help="one label per run (repeat a label to group seeds)")
    p.add_argument("--group-by", help="group runs by this config.json key (e.g. model)")
    p.add_argument("--band", choices=["minmax", "std"], default="minmax", help="band drawn around a group mean")
    p.add_argument("--output", help="figure path (.png/.pdf/.svg); default <run>_curve.png or runs/compare.png")
    p.add_argument("--title", help="figure title")
    p.add_argument("--safe", action="store_true", help="never open a window, only save")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = [*args.runs, *args.log_path]
    if not paths:
        raise UserError("give at least one run: a metrics.csv or a run folder (see --help)")
    if args.labels and len(args.labels) != len(paths):
        raise UserError(f"--labels has {len(args.labels)} names for {len(paths)} runs; give one per run")
    from common.plots import can_show, group_runs, read_run, results_table, save_figure, setup_matplotlib

    runs = [read_run(p, args.labels[i] if args.labels else None) for i, p in enumerate(paths)]
    groups = group_runs(runs, args.group_by)
    plt = setup_matplotlib(args.safe)
    fig = plot_comparison(plt, groups, args.band, args.title)
    output = args.output or default_output(runs)
    save_figure(fig, output)
    print(results_table(groups))
    print(f"\nsaved {output}")
    if not args.safe and can_show(plt):
        plt.show()
    plt.close(fig)
    return 0


def default_output(runs) -> Path:
    if len(runs) == 1:
        return runs[0].folder / f"{runs[0].folder.name}_curve.png"
    return Path("runs") / "compare.png"


def plot_comparison(plt, groups, band: str = "minmax", title: str | None = None):
    """The four-panel figure of grouped runs; returns the Figure."""
    from common.plots import panel_figure

    series = [{"label": label, "runs": runs, "color": COLORS[i % len(COLORS)], "band": band}
              for i, (label, runs) in enumerate(groups.items())]
    return panel_figure(plt, series, title or " vs ".join(groups) + "  (★ = best val epoch)")

if __name__ == "__main__":
    sys.exit(main())
