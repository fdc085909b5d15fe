"""Reading runs back (metrics.csv, summary.json, config.json) and drawing them: four-panel curves with
end-of-curve values and best-epoch markers, seed groups as mean + band, and the markdown results table."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError

REQUIRED = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")
PANELS = (("train_loss", "Train Loss"), ("val_loss", "Val Loss"), ("train_acc", "Train Acc"), ("val_acc", "Val Acc"))


@dataclass
class Run:
    """One run folder's outputs."""

    path: Path                       # the metrics.csv
    label: str
    metrics: Any                     # pandas.DataFrame
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.path.parent


def setup_matplotlib(safe: bool):
    """pyplot with a non-interactive backend when `safe` or when there is no display to show on."""
    import matplotlib

    headless = os.name != "nt" and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY") \
        and matplotlib.get_backend().lower() != "macosx"
    if safe or headless:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def can_show(plt) -> bool:
    import matplotlib

    return matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo", "template")


def read_run(path: str | Path, label: str | None = None) -> Run:
    """A run from its folder or its metrics.csv, validated; a UserError names the file and the problem."""
    import pandas as pd

    path = Path(path)
    csv = path / "metrics.csv" if path.is_dir() else path
    if not csv.is_file():
        raise UserError(f"{csv} does not exist (pass a run folder or its metrics.csv)")
    try:
        frame = pd.read_csv(csv)
    except pd.errors.EmptyDataError:
        raise UserError(f"{csv} is empty: the run has not finished an epoch yet") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{csv} is not a readable CSV ({str(e).splitlines()[0]})") from None
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise UserError(f"{csv} lacks the column(s) {', '.join(missing)}; expected a metrics.csv of the train scripts")
    if frame.empty:
        raise UserError(f"{csv} has a header but no rows: the run has not finished an epoch yet")
    numeric = frame[list(REQUIRED)].apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna() & frame[list(REQUIRED)].notna()
    if bad.any().any():
        col = bad.any().idxmax()
        row = int(bad[col].idxmax()) + 2  # header is line 1
        raise UserError(f"{csv} line {row}: column {col} holds {frame[col].iloc[row - 2]!r}, not a number")
    frame[list(REQUIRED)] = numeric
    folder = csv.parent
    summary = _read_json(folder / "summary.json")
    config = _read_json(folder / "config.json")
    return Run(csv, label or folder.name, frame.sort_values("epoch").reset_index(drop=True), summary, config)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; delete it or re-run the training") from None


def group_runs(runs: Sequence[Run], group_by: str | None = None) -> dict[str, list[Run]]:
    """Runs grouped by label (the same label = seeds of one setting) or by a config key."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        key = r.label
        if group_by:
            if group_by not in r.config:
                raise UserError(f"--group-by {group_by}: {r.folder / 'config.json'} has no such key")
            key = f"{group_by}={r.config[group_by]}"
        groups.setdefault(key, []).append(r)
    return groups


def mean_band(runs: Sequence[Run], column: str, band: str = "minmax"):
    """Per-epoch mean and (low, high) band across runs, over the epochs every run has."""
    import pandas as pd

    table = pd.concat([r.metrics.set_index("epoch")[column].rename(i) for i, r in enumerate(runs)], axis=1)
    table = table.dropna()
    mean = table.mean(axis=1)
    if band == "std":
        std = table.std(axis=1).fillna(0.0)
        return mean, mean - std, mean + std
    return mean, table.min(axis=1), table.max(axis=1)


def spread_labels(values: Sequence[float], low: float, high: float, min_gap: float) -> list[float]:
    """Label positions near `values`, at least `min_gap` apart in the values' order, inside [low, high]
    where there is room: pushed up from below, then down from the top; lone labels stay put."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    stacked = [values[i] for i in order]
    for k in range(1, len(stacked)):
        stacked[k] = max(stacked[k], stacked[k - 1] + min_gap)
    if stacked:
        stacked[-1] = min(stacked[-1], high)
    for k in range(len(stacked) - 2, -1, -1):
        stacked[k] = min(stacked[k], stacked[k + 1] - min_gap)
    if stacked and stacked[0] < low:  # no room for all: keep the gaps, overflow the top
        stacked[0] = low
        for k in range(1, len(stacked)):
            stacked[k] = max(stacked[k], stacked[k - 1] + min_gap)
    pos = [0.0] * len(values)
    for i, p in zip(order, stacked):
        pos[i] = p
    return pos


def draw_panels(axes, series: list[dict], best_marks: bool = True) -> None:
    """Draw curves on the four axes. Each series: label, color, linestyle, runs (one or several seeds)."""
    for ax, (column, title) in zip(axes, PANELS):
        ends = []
        for s in series:
            runs = s["runs"]
            if len(runs) == 1:
                m = runs[0].metrics
                x, y = m["epoch"].to_numpy(), m[column].to_numpy()
            else:
                mean, lo, hi = mean_band(runs, column, s.get("band", "minmax"))
                x, y = mean.index.to_numpy(), mean.to_numpy()
                ax.fill_between(x, lo.to_numpy(), hi.to_numpy(), color=s["color"], alpha=0.25, linewidth=0)
            label = s["label"] + (f" (n={len(runs)})" if len(runs) > 1 else "")
            ax.plot(x, y, color=s["color"], linestyle=s.get("linestyle", "-"), linewidth=1.8, label=label)
            ends.append((x[-1], y[-1], s["color"]))
            if best_marks and column == "val_acc" and len(y):
                b = int(y.argmax())
                ax.plot(x[b], y[b], marker="*", markersize=11, color=s["color"], markeredgecolor="black",
                        markeredgewidth=0.6, zorder=5)
        _annotate_ends(ax, ends, percent=column.endswith("acc"))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if column.endswith("acc") else "cross-entropy")
        ax.grid(alpha=0.3)


def panel_figure(plt, series: list[dict], title: str):
    """The 2x2 figure (Train Loss / Val Loss / Train Acc / Val Acc) of `series` (see draw_panels)."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    draw_panels(axes.flat, series)
    axes[0, 0].legend(loc="upper right", fontsize=9)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return fig


def _annotate_ends(ax, ends, percent: bool) -> None:
    """Final values at the right of each curve, spread so that they do not overlap."""
    if not ends:
        return
    ax.relim()
    ax.autoscale_view()
    lo, hi = ax.get_ylim()
    x_max = max(e[0] for e in ends)
    gap = (hi - lo) * 0.075
    pos = spread_labels([e[1] for e in ends], lo + gap / 2, hi - gap / 2, min_gap=gap)
    for (x, y, color), p in zip(ends, pos):
        text = f"{y:.1%}" if percent else f"{y:.3f}"
        ax.annotate(text, xy=(x, y), xytext=(x_max + max(0.4, 0.04 * x_max), p), color=color, fontsize=8,
                    va="center", fontweight="bold",
                    arrowprops=dict(arrowstyle="-", color=color, lw=0.6, alpha=0.6))
    left, _ = ax.get_xlim()
    ax.set_xlim(left, x_max * 1.18 + 1)


def run_row(runs: Sequence[Run]) -> dict[str, Any]:
    """One results-table row: per-run numbers, mean and std over the runs (seeds)."""
    import numpy as np

    def stat(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    best = [float(r.metrics["val_acc"].max()) for r in runs]
    best_epoch = [int(r.metrics.loc[r.metrics["val_acc"].idxmax(), "epoch"]) for r in runs]
    return {"n": len(runs), "best_val": stat(best), "best_epoch": best_epoch,
            "train_acc": stat([float(r.metrics["train_acc"].iloc[-1]) for r in runs]),
            "val_acc": stat([float(r.metrics["val_acc"].iloc[-1]) for r in runs]),
            "test_acc": stat([r.summary.get("test_acc") for r in runs]),
            "epochs": [int(r.metrics["epoch"].iloc[-1]) for r in runs],
            "time_s": stat([r.summary.get("total_time_s", float(r.metrics["epoch_time_s"].sum())
                                          if "epoch_time_s" in r.metrics else None) for r in runs]),
            "img_s": stat([float(r.metrics["train_img_per_s"].mean()) if "train_img_per_s" in r.metrics else None
                           for r in runs])}


def _fmt(s, pct: bool = True, digits: int = 1) -> str:
    if s is None:
        return "–"
    mean, std = s
    if pct:
        return f"{mean:.{digits}%}" + (f" ± {std:.{digits}%}" if std else "")
    return f"{mean:,.0f}" + (f" ± {std:,.0f}" if std else "")


def results_table(groups: dict[str, list[Run]]) -> str:
    """Markdown: run, best val acc (epoch), final train/val acc, test acc, epochs, wall time, images/s."""
    lines = ["| run | best val acc (epoch) | final train acc | final val acc | test acc | epochs | wall time | "
             "train img/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, runs in groups.items():
        r = run_row(runs)
        epoch = str(r["best_epoch"][0]) if r["n"] == 1 else "/".join(map(str, r["best_epoch"]))
        epochs = str(r["epochs"][0]) if len(set(r["epochs"])) == 1 else "/".join(map(str, r["epochs"]))
        wall = "–" if r["time_s"] is None else f"{r['time_s'][0] / 60:.1f} min"
        name = label + (f" (n={r['n']})" if r["n"] > 1 else "")
        lines.append(f"| {name} | {_fmt(r['best_val'])} ({epoch}) | {_fmt(r['train_acc'])} | {_fmt(r['val_acc'])} | "
                     f"{_fmt(r['test_acc'])} | {epochs} | {wall} | {_fmt(r['img_s'], pct=False)} |")
    return "\n".join(lines)


def save_figure(fig, output: str | Path) -> Path:
    """Save by the output's extension (png, pdf, svg); a UserError for an unwritable path or format."""
    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, dpi=150, bbox_inches="tight")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot save {output} ({e}); use a .png, .pdf or .svg path in a writable folder") from None
    return output
