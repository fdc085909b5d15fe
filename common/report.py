"""Read runs back and write what they show: the curves figure, per-class and calibration figures,
and results.md. compare_runs.py and plot_four_panels.py are thin front ends to report()."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from . import analysis, plots
from .errors import UserError, WriteError, hint
from .files import atomic_write
from .results_md import results_markdown, sizes_markdown
from .runfolder import load_run, metrics_path

log = logging.getLogger(__name__)


def load_runs(paths: Sequence[str], labels: Sequence[str] | None, skip_missing: bool = False):
    """(runs, missing paths): run folders or metrics.csv files, validated."""
    if labels and len(labels) != len(paths):
        raise UserError(f"--labels has {len(labels)} names for {len(paths)} runs; give one per run")
    runs, kept_labels, missing = [], [], []
    for i, path in enumerate(paths):
        if skip_missing and not metrics_path(path).is_file():
            missing.append(str(path))
            continue
        runs.append(load_run(path))
        if labels:
            kept_labels.append(labels[i])
    if not runs:
        raise UserError(f"none of the runs exist ({', '.join(paths)}); train them first "
                        "(README.md)")
    return runs, (kept_labels or None), missing


def report(paths: Sequence[str], labels: Sequence[str] | None, output: str | Path,
           results: str | Path | None, allow_mismatch: bool, band: str, safe: bool,
           title: str | None, extra_figures: bool, skip_missing: bool = False,
           allow_test_selection: bool = False) -> str:
    """Draw the figures, write results.md (when `results`), and return its text."""
    runs, labels, missing = load_runs(paths, labels, skip_missing)
    if missing:
        log.warning(f"missing (not drawn): {', '.join(missing)}")
    sizes = sorted({analysis.training_images(r) for r in runs})
    sweep = None
    # a data-size sweep: each size compared on its own, the curves of the largest drawn
    if len(sizes) > 1:
        if labels:
            raise UserError("--labels cannot be used with runs of several training-set sizes (the "
                            "sizes group them)")
        sweep = analysis.compare_sizes(runs, allow_mismatch,
                                       allow_test_selection=allow_test_selection)
        comparison = sweep.largest
    else:
        comparison = analysis.compare(runs, labels, allow_mismatch,
                                      allow_test_selection=allow_test_selection)
    styles = plots.series_style(comparison.settings)
    footnote = analysis.footnote(comparison.settings)
    if missing:
        footnote += f"; missing runs: {', '.join(missing)}"
    plt = plots.setup_matplotlib(safe)
    curves_title = title or _title(comparison) + (f" ({sizes[-1]:,} training "
                                                  "images)" if sweep else "")
    figures = [(plots.curves_figure(plt, styles, curves_title, footnote, band), Path(output))]
    if sweep is not None:
        all_settings = [s for n in sweep.sizes for s in sweep.by_size[n].settings]
        figures.append((plots.data_efficiency_figure(plt, sweep, analysis.footnote(all_settings)),
                        Path(output).with_name("data_efficiency.png")))
    if extra_figures:
        per_class = {s.label: pc for s in comparison.settings
                     if (pc := analysis.per_class(s)) is not None}
        calibration = {s.label: cal for s in comparison.settings
                       if (cal := analysis.calibration(s)) is not None}
        if per_class:
            figures.append((plots.per_class_figure(plt, styles, per_class,
                                                   "Test accuracy per class (best.pt)", footnote),
                            Path(output).with_name("per_class.png")))
        if calibration:
            figures.append((plots.reliability_figure(plt, styles, calibration,
                                                     "Calibration of best.pt on the test "
                                                     "set (reliability diagrams)", footnote),
                            Path(output).with_name("calibration.png")))
    for fig, path in figures:
        plots.save_figure(fig, path)
    text = sizes_markdown(sweep) if sweep is not None else results_markdown(comparison)
    if missing:
        text += f"\nMissing runs (not included): {', '.join(missing)}\n"
    if results:
        with hint(WriteError, "choose another --results path"):
            atomic_write(results, text)
    log.info("saved " + ", ".join(str(p) for _, p in figures)
             + (f" and {results}" if results else ""))
    if not safe and plots.can_show(plt):
        plt.show()
    for fig, _ in figures:
        plt.close(fig)
    return text


def _title(c: analysis.Comparison) -> str:
    data = {r.record.data.label() for s in c.settings for r in s.runs}
    inits = {r.record.weights.init for s in c.settings if s.mode != "scratch" for r in s.runs}
    if not inits:
        what = "Training from scratch"
    elif inits == {"ImageNet"}:
        what = "ImageNet pre-training"
    else:
        what = ("Pre-training (weights from local files)" if "ImageNet" not in inits
                else "Pre-training")
    modes = {s.mode for s in c.settings}
    styles = ["colour = model"] + [words for mode, words in (
        ("pretrained", "solid = pretrained"), ("scratch", "dashed = from scratch"),
        ("linear probe", "dotted = linear probe")) if mode in modes]
    if any(not s.default_weights for s in c.settings):
        styles.append("dash-dot = other weights")
    return f"{what} on {' / '.join(sorted(data))}: {', '.join(styles)}"
