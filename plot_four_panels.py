"""The experiment's figure: ResNet-18 and TinyViT-5M, pretrained (solid) vs from scratch (dashed), in four
quadrants (Train Loss / Val Loss / Train Acc / Val Acc), plus results.md with the table and the
pretraining gain of each model.

    python plot_four_panels.py                                   # runs/{resnet,tinyvit}_{ft,scratch}
    python plot_four_panels.py --output runs/four_panels.pdf     # PDF/SVG by extension
    python plot_four_panels.py --runs runs/a runs/b --labels "ResNet-18 pretrained" "ResNet-18 scratch"
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import UserError, exit_on_user_error

DEFAULT_RUNS = ("runs/resnet_ft", "runs/resnet_scratch", "runs/tinyvit_ft", "runs/tinyvit_scratch")
DEFAULT_LABELS = ("ResNet-18 pretrained", "ResNet-18 scratch", "TinyViT-5M pretrained", "TinyViT-5M scratch")
PRETTY = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50", "tiny_vit_5m_224": "TinyViT-5M",
          "tiny_vit_11m_224": "TinyViT-11M", "vit_tiny_patch16_224": "ViT-Tiny/16"}
MODEL_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 3)[3])
    p.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="run folders (or metrics.csv files)")
    p.add_argument("--labels", nargs="+", help="one per run; repeat a label to group seeds")
    p.add_argument("--output", default="runs/four_panels.png", help=".png, .pdf or .svg")
    p.add_argument("--results", help="markdown results file (default: results.md beside --output)")
    p.add_argument("--safe", action="store_true", help="never open a window, only save")
    return p.parse_args(argv)


def describe(run) -> tuple[str, bool]:
    """(model name, pretrained?) of a run: from its config.json, else from its folder name."""
    cfg = run.config
    model = cfg.get("model") or run.label.replace(" pretrained", "").replace(" scratch", "")
    pretrained = cfg["pretrained"] if "pretrained" in cfg else not any(
        w in (run.folder.name + run.label).lower() for w in ("scratch", "random"))
    return model, pretrained


def pretraining_gains(groups) -> list[str]:
    """Lines of markdown: pretrained minus scratch, per model, for best val and test accuracy."""
    from common.plots import run_row

    by_model: dict[str, dict[bool, dict]] = {}
    names: dict[str, str] = {}
    for label, runs in groups.items():
        model, pretrained = describe(runs[0])
        by_model.setdefault(model, {})[pretrained] = run_row(runs)
        names[model] = PRETTY.get(model.split(".")[0], model.split(".")[0])
    lines = ["| model | best val acc: pretrained − scratch | test acc: pretrained − scratch |", "|---|---:|---:|"]
    for model, rows in by_model.items():
        if True in rows and False in rows:
            def gain(key):
                a, b = rows[True][key], rows[False][key]
                return "–" if a is None or b is None else f"{(a[0] - b[0]) * 100:+.1f} points"
            lines.append(f"| {names[model]} | {gain('best_val')} | {gain('test_acc')} |")
        else:
            lines.append(f"| {names[model]} | needs both runs | needs both runs |")
    return lines


def four_panel_figure(plt, groups, missing: list[str]):
    """Four quadrants; one colour per model, solid = pretrained, dashed = from scratch."""
    from common.plots import panel_figure

    model_order: list[str] = []
    series = []
    for label, group in groups.items():
        model, pretrained = describe(group[0])
        if model not in model_order:
            model_order.append(model)
        series.append({"label": label, "runs": group, "color": MODEL_COLORS[model_order.index(model) % 5],
                       "linestyle": "-" if pretrained else "--"})
    title = "ImageNet pre-training on CIFAR-10: solid = pretrained, dashed = from scratch (★ = best val epoch)"
    if missing:
        title += f"\nmissing: {', '.join(missing)}"
    return panel_figure(plt, series, title)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    labels = args.labels or (list(DEFAULT_LABELS) if args.runs == list(DEFAULT_RUNS) else None)
    if labels and len(labels) != len(args.runs):
        raise UserError(f"--labels has {len(labels)} names for {len(args.runs)} runs; give one per run")
    from common.plots import can_show, group_runs, read_run, results_table, save_figure, setup_matplotlib

    runs, missing = [], []
    for i, path in enumerate(args.runs):
        csv = Path(path) / "metrics.csv" if not str(path).endswith(".csv") else Path(path)
        if not csv.is_file():
            missing.append(str(path))
            continue
        runs.append(read_run(path, labels[i] if labels else None))
    if missing:
        print(f"missing (not drawn): {', '.join(missing)}", file=sys.stderr)
    if not runs:
        raise UserError(f"none of the runs exist ({', '.join(args.runs)}); train them first (README.md)")
    groups = group_runs(runs)
    plt = setup_matplotlib(args.safe)
    fig = four_panel_figure(plt, groups, missing)
    output = save_figure(fig, args.output)
    table = results_table(groups)
    gains = pretraining_gains(groups)
    results = Path(args.results) if args.results else output.with_name("results.md")
    from common.checkpoint import atomic_write

    text = "# Results\n\n" + table + "\n\n## Gain from ImageNet pre-training\n\n" + "\n".join(gains) + "\n"
    if missing:
        text += f"\nMissing runs (not included): {', '.join(missing)}\n"
    atomic_write(results, lambda f: f.write(text), mode="w")
    print(table + "\n\n" + "\n".join(gains))
    print(f"\nsaved {output} and {results}")
    if not args.safe and can_show(plt):
        plt.show()
    plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
