"""Figures: training curves (four panels, seeds as a mean with a band), per-class accuracy as small
multiples, and reliability diagrams. Colour-blind-safe colours (Okabe-Ito) with line style and
marker as a second cue; accuracies in %; integer epochs; a provenance footnote under every
figure."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import UserError
from .specs import MODELS

OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
STYLE = {"pretrained": ("-", "o"), "scratch": ("--", "s"), "linear probe": (":", "^")}
PANELS = (("train_loss", "Train loss"), ("val_loss", "Validation loss"),
          ("train_acc", "Train accuracy"), ("val_acc", "Validation accuracy"))


def percent_formatter():
    """Tick labels in % with as many decimals as the ticks need to be written exactly (22.5 is never
    shown as 22%), so that no two ticks read the same on a narrow range."""
    from matplotlib.ticker import Formatter

    class Percent(Formatter):
        decimals = 0

        def format_ticks(self, values):
            self.decimals = next((d for d in range(6)
                                  if all(abs(round(v, d) - v) < 1e-7 for v in values)), 6)
            return [self(v) for v in values]

        def __call__(self, x, pos=None):
            return f"{x:.{self.decimals}f}%"

    return Percent()


def setup_matplotlib(safe: bool):
    """pyplot with a non-interactive backend when `safe` or when there is no display to show on."""
    import matplotlib

    headless = os.name != "nt" and not os.environ.get("DISPLAY") \
        and not os.environ.get("WAYLAND_DISPLAY") and matplotlib.get_backend().lower() != "macosx"
    if safe or headless:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def can_show(plt) -> bool:
    import matplotlib

    return matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo", "template")


def save_figure(fig, output: str | Path) -> Path:
    """Save by the output's extension (png, pdf, svg); a UserError for an unwritable path or
    format."""
    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, dpi=150, bbox_inches="tight")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot save {output} ({e}); use a .png, .pdf or .svg path in "
                        "a writable folder") from None
    return output


def add_footnote(fig, text: str) -> None:
    """The provenance line under a figure, wrapped to the figure's width (about 16 characters an
    inch at its size), so that a small figure is not widened by it."""
    import textwrap

    width = max(50, min(150, int(fig.get_figwidth() * 16)))
    lines = textwrap.wrap(text, width)
    fig.text(0.01, 0.005, "\n".join(lines), fontsize=7.5, color="#444444", va="bottom",
             ha="left")
    # room for it below the lowest axes' labels (about 36 pt), whatever its length
    needed = (len(lines) * 7.5 * 1.3 + 36) / (fig.get_figheight() * 72)
    if fig.subplotpars.bottom < needed:
        fig.subplots_adjust(bottom=needed)


def series_style(settings) -> list[dict[str, Any]]:
    """Colour per architecture, line style + marker per mode (pretrained / scratch / linear
    probe)."""
    archs: list[str] = []
    out = []
    for s in settings:
        if s.arch not in archs:
            archs.append(s.arch)
        line, marker = STYLE.get(s.mode, ("-.", "D"))
        if s.arch not in MODELS:  # a control architecture: its own markers, for grey print too
            marker = {"pretrained": "^", "scratch": "v"}.get(s.mode, "<")
        if not s.default_weights:
            line, marker = "-.", "D"
        out.append({"setting": s, "color": OKABE_ITO[archs.index(s.arch) % len(OKABE_ITO)],
                    "linestyle": line, "marker": marker})
    return out


# ----------------------------------------------------------------------------- curves

def mean_band(runs, column: str, band: str = "minmax"):
    """Per-epoch mean and (low, high) band over runs, on the epochs every run has."""
    import pandas as pd

    table = pd.concat([r.metrics.set_index("epoch")[column].rename(i) for i, r in enumerate(runs)],
                      axis=1).dropna()
    mean = table.mean(axis=1)
    if band == "std":
        std = table.std(axis=1).fillna(0.0)
        return mean, mean - std, mean + std
    return mean, table.min(axis=1), table.max(axis=1)


def spread_labels(values: Sequence[float], low: float, high: float, min_gap: float) -> list[float]:
    """Label positions near `values`, at least `min_gap` apart in the values' order, inside [low,
    high] where there is room: pushed up from below, then down from the top; lone labels stay
    put."""
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


def curves_figure(plt, styles: list[dict], title: str, footnote: str, band: str = "minmax"):
    """Train/validation loss and accuracy against epoch, one series per setting (several seeds:
    their mean with a band). On the validation panel a star marks the best epoch of the drawn curve:
    best.pt's epoch for one seed; for several, the best epoch of their mean, and a small x marks
    each seed's own best.pt."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for ax, (column, name) in zip(axes.flat, PANELS):
        acc = column.endswith("acc")
        scale = 100.0 if acc else 1.0
        ends = []
        for st in styles:
            runs = st["setting"].runs
            if len(runs) == 1:
                x, y = (runs[0].metrics["epoch"].to_numpy(),
                        runs[0].metrics[column].to_numpy() * scale)
            else:
                mean, lo, hi = mean_band(runs, column, band)
                x, y = mean.index.to_numpy(), mean.to_numpy() * scale
                ax.fill_between(x, lo.to_numpy() * scale, hi.to_numpy() * scale, color=st["color"],
                                alpha=0.18, lw=0)
            label = st["setting"].label + (f" (n={len(runs)} seeds)" if len(runs) > 1 else "")
            ax.plot(x, y, color=st["color"], linestyle=st["linestyle"], marker=st["marker"],
                    markersize=4, markevery=max(1, len(x) // 8), linewidth=1.7, label=label)
            ends.append((x[-1], y[-1], st["color"]))
            if column == "val_acc":
                b = int(np.argmax(y))
                ax.plot(x[b], y[b], marker="*", markersize=12, color=st["color"],
                        markeredgecolor="black", markeredgewidth=0.6, zorder=5)
                if len(runs) > 1:
                    for r in runs:
                        i = int(r.metrics["val_acc"].to_numpy().argmax())
                        ax.plot(r.metrics["epoch"].iloc[i], r.metrics["val_acc"].iloc[i] * scale,
                                marker="x", markersize=6, color=st["color"], linestyle="none",
                                zorder=5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.relim()
        ax.autoscale_view()
        if acc:  # a change of a few images must not look like a plunge
            floor_span(ax, MIN_ACC_SPAN)
        _annotate_ends(ax, ends, "{:.1f}%" if acc else "{:.3f}")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)" if acc else "cross-entropy loss")
        if acc:
            ax.yaxis.set_major_formatter(percent_formatter())
        ax.grid(alpha=0.3)
    band_text = {"minmax": "band: min–max over seeds", "std": "band: ±1 std over seeds"}[band]
    several = any(len(st["setting"].runs) > 1 for st in styles)
    star = ("★ best epoch of each curve (of the seeds' mean); x: each seed's best.pt; " + band_text
            if several
            else "★ best validation epoch (the epoch best.pt holds)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    # above the panels: hides no curve
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.955),
               ncol=min(4, len(labels)), fontsize=8.5, title=star, title_fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.04, 1, 0.90))
    add_footnote(fig, footnote)
    return fig


MIN_ACC_SPAN = 5.0  # points of accuracy an axis shows at least


def floor_span(ax, span: float, lo_limit: float = 0.0, hi_limit: float = 100.0) -> None:
    """Widen the y axis to at least `span` around its middle, within [lo_limit, hi_limit]."""
    lo, hi = ax.get_ylim()
    if hi - lo >= span:
        return
    mid = (lo + hi) / 2
    lo, hi = mid - span / 2, mid + span / 2
    if lo < lo_limit:
        lo, hi = lo_limit, lo_limit + span
    if hi > hi_limit:
        lo, hi = hi_limit - span, hi_limit
    ax.set_ylim(lo, hi)


def _annotate_ends(ax, ends, fmt: str) -> None:
    """Final values at the right of each curve, spread so that they do not overlap."""
    if not ends:
        return
    lo, hi = ax.get_ylim()
    x_max = max(e[0] for e in ends)
    gap = (hi - lo) * 0.075
    pos = spread_labels([e[1] for e in ends], lo + gap / 2, hi - gap / 2, min_gap=gap)
    for (x, y, color), p in zip(ends, pos):
        ax.annotate(fmt.format(y), xy=(x, y), xytext=(x_max + max(0.4, 0.04 * x_max), p),
                    color=color, fontsize=8, va="center", fontweight="bold",
                    arrowprops=dict(arrowstyle="-", color=color, lw=0.6, alpha=0.6))
    left, _ = ax.get_xlim()
    ax.set_xlim(left, x_max * 1.18 + 1)
    # no epoch ticks past the data
    ax.set_xticks([t for t in ax.get_xticks() if left <= t <= x_max])


# --------------------------------------------------------------------------- per class, calibration

def per_class_figure(plt, styles: list[dict], per_class: dict, title: str, footnote: str):
    """Small multiples, one panel per class: each setting's test accuracy on that class (recall)
    with its 95% interval: Wilson over the class's test images for one seed, over the images and the
    seeds (as seeds) for several (analysis.per_class)."""
    first = next(iter(per_class.values()))
    classes, counts = first.classes, first.counts
    cols = 5
    rows = (len(classes) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.6 * rows + 0.6), sharex=True,
                             squeeze=False)
    present = [st for st in styles if st["setting"].label in per_class]
    for k, (ax, cls) in enumerate(zip(axes.flat, classes)):
        for j, st in enumerate(present):
            pc = per_class[st["setting"].label]
            acc, lo, hi = pc.acc[k], pc.lo[k], pc.hi[k]
            ax.errorbar(100 * acc, j, xerr=[[100 * max(0.0, acc - lo)], [100 * max(0.0, hi - acc)]],
                        fmt=st["marker"], color=st["color"], ms=6, capsize=2)
        ax.set_yticks(range(len(present)),
                      [st["setting"].label for st in present] if k % cols == 0 else [], fontsize=8)
        ax.set_ylim(-0.7, len(present) - 0.3)
        ax.invert_yaxis()
        ax.set_title(f"{cls} (n={int(counts[k])})", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes.flat[len(classes):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("test accuracy (%)")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    seeds = max(pc.seeds for pc in per_class.values())
    whiskers = ("95% Wilson interval over the class's test images" if seeds == 1 else
                "95% interval over the class's test images and the seeds (seeds counted as seeds)")
    add_footnote(fig, footnote + f"; whiskers: {whiskers}")
    return fig


def count_ticks(lo: float, hi: float, most: int = 4) -> list[float]:
    """Tick values for a log axis of counts from lo to hi: the powers of ten inside, or 1-2-5 values
    where the range is narrower than that; at most `most`, always the ends' neighbours."""
    import math

    decades = range(int(math.floor(math.log10(max(lo, 1)))), int(math.ceil(math.log10(hi))) + 1)
    for subs in ((1,), (1, 2, 5), (1, 1.5, 2, 3, 5, 7)):
        ticks = [m * 10 ** d for d in decades for m in subs if lo <= m * 10 ** d <= hi]
        if len(ticks) >= 2:
            break
    if len(ticks) < 2:
        ticks = sorted({float(lo), float(hi)})
    step = -(-len(ticks) // most)
    return ticks[::step]


def reliability_figure(plt, styles: list[dict], calibration: dict, title: str, footnote: str):
    """One reliability diagram per setting: accuracy against confidence in 15 bins, the diagonal of
    perfect calibration, ECE in the panel title; below each, how many predictions fall in each bin
    (log scale), so a bin of a handful of images is not read like one of thousands."""
    from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator

    present = [st for st in styles if st["setting"].label in calibration]
    cols = min(4, len(present))
    rows = (len(present) + cols - 1) // cols
    fig = plt.figure(figsize=(3.6 * cols, 4.6 * rows + 0.6))
    grid = fig.add_gridspec(rows * 2, cols, height_ratios=[3, 1] * rows)
    for i, st in enumerate(present):
        cal = calibration[st["setting"].label]
        ax = fig.add_subplot(grid[2 * (i // cols), i % cols])
        hist = fig.add_subplot(grid[2 * (i // cols) + 1, i % cols], sharex=ax)
        for b in cal.bins:
            width = 100 * (b["hi"] - b["lo"])
            ax.bar(100 * b["lo"], 100 * b["acc"], width=width, align="edge", color=st["color"],
                   alpha=0.75, edgecolor="white")
            ax.bar(100 * b["lo"], 100 * (b["conf"] - b["acc"]), bottom=100 * b["acc"], width=width,
                   align="edge", color="none", edgecolor="#999999", hatch="//", linewidth=0.5)
            hist.bar(100 * b["lo"], b["n"], width=width, align="edge", color=st["color"], alpha=0.5,
                     edgecolor="white")
        ax.plot([0, 100], [0, 100], color="black", lw=0.8, linestyle="--")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        n = f"{cal.images:,} test images" + (f" x {cal.seeds} seeds" if cal.seeds > 1 else "")
        ax.set_title(f"{st['setting'].label}\nECE {100 * cal.ece:.1f}% ({n})", fontsize=9.5)
        ax.set_ylabel("accuracy (%)")
        ax.tick_params(labelbottom=False)
        hist.set_yscale("log")
        counts = [b["n"] for b in cal.bins if b["n"] > 0]
        # plain counts (100, 1,000), not 2x10^2; a few ticks, never crowded
        hist.set_yticks(count_ticks(min(counts), max(counts)) if counts else [1])
        hist.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        hist.yaxis.set_minor_formatter(NullFormatter())
        hist.yaxis.set_minor_locator(NullLocator())
        hist.set_ylabel("predictions", fontsize=8)
        hist.set_xlabel("confidence (%)")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    add_footnote(fig, footnote + "; hatched: gap between confidence and accuracy; dashed: perfect "
                 "calibration; lower panels: predictions per bin")
    return fig


def data_efficiency_figure(plt, sc, footnote: str):
    """Test accuracy against training images (log x) for each setting, with 95% interval bands;
    below it (when a model has a pretrained and a scratch setting) each model's pre-training gain
    and the difference of the gains, with theirs. Same
    colours and line styles as the curves (colour = model, solid = pretrained, dashed = scratch)."""
    from matplotlib.ticker import FuncFormatter

    from .analysis import setting_interval

    labels: dict[str, dict] = {}
    for n in sc.sizes:
        for st in series_style(sc.by_size[n].settings):
            labels.setdefault(st["setting"].label, st)
    has_gains = any(g.default for n in sc.sizes for g in sc.by_size[n].gains)
    if has_gains:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 9.5), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 2]})
    else:  # no pretrained/scratch pair yet: the accuracies alone, no empty gain panel
        fig, top = plt.subplots(figsize=(9, 6))
        bottom = top
    for label, st in labels.items():
        xs, ys, lo, hi = [], [], [], []
        for n in sc.sizes:
            s = next((x for x in sc.by_size[n].settings if x.label == label), None)
            if s is None or not s.test_acc():
                continue
            i = setting_interval(s)
            xs.append(n), ys.append(100 * float(np.mean(s.test_acc())))
            (lo.append(100 * (i.lo if i else ys[-1] / 100)),
             hi.append(100 * (i.hi if i else ys[-1] / 100)))
        top.plot(xs, ys, color=st["color"], linestyle=st["linestyle"], marker=st["marker"],
                 label=label)
        top.fill_between(xs, lo, hi, color=st["color"], alpha=0.15, lw=0)
    top.set_ylabel("test accuracy (%)")
    top.yaxis.set_major_formatter(percent_formatter())
    top.legend(fontsize=8.5, loc="lower right")
    top.grid(alpha=0.3)
    if has_gains:
        arch_style = {}
        for st in labels.values():
            arch_style.setdefault(st["setting"].arch, (st["color"], st["setting"].display))
        series = [(f"{name} gain", color, "-", "o" if a in MODELS else "^",
                   lambda c, a=a: _gain(c, a)) for a, (color, name) in arch_style.items()]
        # the controls' other weights (TinyViT-5M's ImageNet-1k): their own series, dash-dot
        controls = {g.pretrained.label: g.arch for n in sc.sizes for g in sc.by_size[n].gains
                    if not g.default}
        series += [(f"{label} gain (control)", arch_style.get(arch, ("#999999", ""))[0], "-.",
                    "D", lambda c, lbl=label: _gain_of(c, lbl)) for label, arch in controls.items()]
        series.append(("difference of the gains", "#000000", ":", "D",
                       lambda c: (c.gain_difference.estimate, c.gain_difference.interval)
                       if c.gain_difference else None))
        diff = next((sc.by_size[n].gain_difference for n in sc.sizes
                     if sc.by_size[n].gain_difference), None)
        if diff is not None:
            series[-1] = (f"difference ({diff.vit.display} − {diff.cnn.display})",
                          *series[-1][1:])
        for name, color, style, marker, get in series:
            pts = [(n, get(sc.by_size[n])) for n in sc.sizes]
            pts = [(n, v) for n, v in pts if v is not None]
            if not pts:
                continue
            xs = [n for n, _ in pts]
            bottom.plot(xs, [100 * v[0] for _, v in pts], color=color, linestyle=style,
                        marker=marker, label=name)
            bottom.fill_between(xs, [100 * v[1].lo for _, v in pts],
                                [100 * v[1].hi for _, v in pts], color=color, alpha=0.12, lw=0)
        bottom.axhline(0, color="#999999", lw=0.8)
        bottom.set_ylabel("points of test accuracy")
        bottom.set_xlabel("training images (log scale)")
        bottom.legend(fontsize=8.5)
        bottom.grid(alpha=0.3)
    else:
        top.set_xlabel("training images (log scale)")
    bottom.set_xscale("log")
    bottom.set_xticks(sc.sizes)
    bottom.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    bottom.minorticks_off()
    fig.suptitle("Pre-training gain against the number of training images" if has_gains else
                 "Test accuracy against the number of training images (no pretrained/scratch pair: "
                 "no gain)", fontsize=12)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    add_footnote(fig, footnote + "; bands: 95% intervals (over images and seeds with 2+ seeds, "
                 "over images alone with one)")
    return fig


def _gain_of(c, label: str):
    g = next((g for g in c.gains if g.pretrained.label == label), None)
    return None if g is None or g.interval is None else (g.gain, g.interval)


def _gain(c, arch: str):
    g = next((g for g in c.gains if g.default and g.arch == arch), None)
    return None if g is None or g.interval is None else (g.gain, g.interval)
