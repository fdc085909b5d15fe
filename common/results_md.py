"""results.md: the answer first (the difference of the gains with its interval and what the interval
covers), then every test accuracy beside the experiment's published figure of the same kind, each
gain with its interval, relative error reduction and McNemar's test per seed pair, the confounds,
per-class accuracy and what produced every run."""
from __future__ import annotations

import numpy as np

from . import stats
from .analysis import (MARK, TEST_MARK, Comparison, Gain, Interval, Setting, calibration,
                       differences_text, per_class)
from .specs import MODELS, RESNET18, TINYVIT_5M

SEEDS_FOR_A_CLAIM = 5


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.{digits}f}%"


def _top1(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}%"


def _points(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f}"


def _ci(i: Interval | None) -> str:
    return "" if i is None else f" [{_points(i.lo)}, {_points(i.hi)}]"


def accuracy_cell(setting: Setting, final: bool = False) -> str:
    """One run: acc (Wilson 95% CI). Several: mean ± std (min–max), n seeds."""
    accs = setting.test_acc(final)
    if not accs:
        return "– (no test yet)"
    if len(accs) == 1:
        n = setting.runs[0].summary.test_images
        lo, hi = stats.wilson(round(accs[0] * n), n)
        return f"{_pct(accs[0], 2)} [{_pct(lo)}, {_pct(hi)}]"
    return (f"{_pct(np.mean(accs), 2)} ± {100 * np.std(accs, ddof=1):.2f} "
            f"({_pct(min(accs))}–{_pct(max(accs))}, {len(accs)} seeds)")


def interval_note(i: Interval, n_images: int, seeds: tuple[int, ...]) -> str:
    if i.covers_seeds:
        return (f"95% CI over the {n_images:,} test images and the seeds "
                f"({'/'.join(map(str, seeds))} per setting; Student's t on variance components)")
    if i.method == "images and some seeds":
        return (f"95% CI from a paired bootstrap over the {n_images:,} test images and the seeds "
                f"({'/'.join(map(str, seeds))} per setting): a setting with one seed brings no "
                "measure of its training noise, so it is not a full seed-aware interval; run "
                f"{SEEDS_FOR_A_CLAIM} seeds of every setting for a claim")
    return (f"95% CI from a paired bootstrap over the {n_images:,} test images; with one seed per "
            f"setting it covers test-set noise only, not training noise: run {SEEDS_FOR_A_CLAIM} "
            "seeds for a claim")


def decomposition_line(c: Comparison) -> str | None:
    """results.md's second line, when the controls ran: the weights' share and the architecture's
    at equal pre-training data."""
    weights = next((p for p in c.decomposition if p.key == "weights"), None)
    arch = [p for p in c.decomposition if p.key in ("tinyvit_1k", "deit")]
    if weights is None and not arch:
        return None
    said = []
    if weights is not None:
        said.append(f"the ImageNet-22k weights account for {_points(weights.interval.estimate)} "
                    f"points{_ci(weights.interval)} of TinyViT-5M's gain")
    for p in arch:
        who = p.name.split(",")[0]
        said.append(f"with ImageNet-1k weights, as ResNet-18's, {who}'s gain minus ResNet-18's is "
                    f"{_points(p.interval.estimate)} points{_ci(p.interval)}")
    return ("**What the extra gain is made of (the controls):** " + "; ".join(said)
            + " (95% CIs; the table below says what each interval covers and each row answers).")


def headline(c: Comparison) -> str:
    """The first line of results.md: the number the question asks for."""
    d = c.gain_difference
    if d is None:
        return ("**Not answered yet:** the difference of the gains needs four runs with test "
                "predictions (ResNet-18 and TinyViT-5M, each pretrained and from scratch).")
    v, r = d.vit, d.cnn
    mark = c.marked()
    seeds = (*v.seeds, *r.seeds)
    return (f"**ImageNet pre-training helps TinyViT-5M by {_points(v.gain)} points (relative error "
            f"reduction {_pct(v.error_reduction, 0)}) and ResNet-18 by {_points(r.gain)} points "
            f"({_pct(r.error_reduction, 0)}) of test accuracy; the difference of the gains is "
            f"{_points(d.estimate)}{mark} points{_ci(d.interval)}: "
            f"{interval_note(d.interval, v.n_images, seeds)}.**")


def results_markdown(c: Comparison) -> str:
    lines = ["# Results", "", headline(c), ""]
    second = decomposition_line(c)
    if second:
        lines += [second, ""]
    lines += [f"Data and budget: {data_and_budget(c)}", ""]
    if c.test_selected:
        lines += [f"**{TEST_MARK} Selected on the test set:** {', '.join(c.test_selected)} chose "
                  "best.pt on the test set (--val-size 0); their test accuracies are not test "
                  "results (shown because of --allow-test-selection).", ""]
    if c.mismatched:
        lines += [f"**{MARK} The runs differ in settings that matter** (compared because of "
                  "--allow-mismatch):", ""]
        lines += [f"- {differences_text(k, vals)}" for k, vals in c.mismatched.items()]
        lines.append("")
    lines += _accuracy_table(c) + _gain_table(c) + _decomposition_table(c)
    archs_pretrained = {s.arch for s in c.settings if s.mode == "pretrained"}
    # the notes where they bear on what is shown: the weights confound on a comparison of the two
    # models' pre-training, the init note on a ResNet-18 gain
    if {"resnet18", "tiny_vit_5m_224"} <= archs_pretrained:
        lines += [confound_note(), ""]
    if any(g.arch == "resnet18" for g in c.gains) and any(
            s.arch == "resnet18" and s.mode == "scratch" and not s.kind.init for s in c.settings):
        lines += [INIT_NOTE, ""]
    lines += _per_class_table(c) + _runs_table(c)
    return "\n".join(lines) + "\n"


def data_and_budget(c: Comparison) -> str:
    """What all settings share, then what each one is (weights, seeds); best.pt's selection in
    words."""
    first = c.settings[0].runs[0]
    s = first.record.data.splits
    shared = (f"{first.record.data.label()}, {s.train} training / {s.val} validation / "
              f"{first.summary.test_images if first.summary else s.test} test images, "
              f"{first.record.config.img_size} px, {first.record.config.epochs} epochs, recipe "
              f"{first.record.recipe.name}, split seed {first.record.config.split_seed}")
    each = "; ".join(f"{st.label}: {st.record.weights.label()}, "
                     f"seed{'s' if len(st.runs) > 1 else ''} "
                     f"{', '.join(map(str, st.seeds))}" for st in c.settings)
    chosen = ("chosen on the test set itself (marked ‡)" if c.test_selected else
              "chosen on validation; the test set was used for nothing else")
    return f"{shared}. {each}. Test accuracy is that of best.pt, the epoch {chosen}."


def published(setting: Setting) -> str:
    """The experiment's published figure for this setting, when ours is the same kind of number (a
    final-epoch validation accuracy of the main setting, on the full data at 224 px), with what
    still differs between their run and ours said beside it."""
    spec = MODELS.get(setting.arch)
    if spec is None or not setting.main or setting.mode not in spec.published:
        return "–"
    r = setting.record
    if r.config.img_size != 224 or r.data.splits.train < 45_000 or r.data.synthetic:
        return "– (ours: not the full data at 224 px)"
    p = spec.published[setting.mode]
    stopped = (f"{p.epochs} of a {p.schedule_epochs}-epoch schedule" if p.epochs
               != p.schedule_epochs else f"{p.epochs} epochs")
    return f"{p.final_val_acc:.2f}% ({stopped}){published_differences(setting, p)}"


def published_differences(setting: Setting, p) -> str:
    """'; ours: JPEG copy (lossy), floor 0.01, ...': what our run does otherwise than the
    author's run behind the published number (empty when nothing)."""
    r, c = setting.record, setting.record.config
    runs = setting.runs
    epochs = {x.summary.epochs_run if x.summary else int(x.metrics["epoch"].iloc[-1])
              for x in runs}
    planned = c.epochs
    diffs = []
    if r.data.kind != "cifar-batches":
        diffs.append(f"a {r.data.fidelity or 'copy'} of the data, not the official files")
    if epochs != {p.epochs}:
        diffs.append(f"{'/'.join(map(str, sorted(epochs)))} epochs run")
    if planned != p.schedule_epochs:
        diffs.append(f"a {planned}-epoch schedule")
    if abs(c.min_lr_ratio - p.floor) > 1e-12:
        diffs.append(f"floor {c.min_lr_ratio:g} x lr (theirs {p.floor:g})")
    if c.val_split != "random" or c.split_seed != 42 or r.data.kind != "cifar-batches":
        diffs.append("another validation split" if c.val_split != "random" or c.split_seed != 42
                     else "their split's indices on another image order")
    if 42 not in setting.seeds:
        diffs.append(f"seed {'/'.join(map(str, setting.seeds))} (theirs 42)")
    return f"; ours differs: {', '.join(diffs)}" if diffs else ""


def _accuracy_table(c: Comparison) -> list[str]:
    lines = ["## Test accuracy, and our final-epoch validation accuracy beside the experiment's",
             "", "| setting | test acc, best.pt [95% CI] | test acc, final epoch | final-epoch val "
             "acc | the experiment's final-epoch val acc | best val acc (epoch) | weights "
             "(ImageNet top-1) | ECE | train time |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for s in c.settings:
        best_val = [float(r.metrics["val_acc"].max()) for r in s.runs]
        best_epoch = "/".join(str(int(r.metrics.loc[r.metrics["val_acc"].idxmax(), "epoch"]))
                              for r in s.runs)
        final_val = s.final_val_acc()
        final_txt = (_pct(final_val[0], 2) if len(final_val) == 1 else
                     f"{_pct(np.mean(final_val), 2)} ± {100 * np.std(final_val, ddof=1):.2f}")
        cal = calibration(s)
        minutes = np.mean([r.summary.train_time_s if r.summary
                           else float(r.metrics["epoch_time_s"].sum())
                           for r in s.runs]) / 60
        lines.append(f"| {s.label}{c.marked(s)} | {accuracy_cell(s)} | "
                     f"{accuracy_cell(s, final=True)} | {final_txt} | {published(s)} | "
                     f"{_pct(np.mean(best_val))} ({best_epoch}) | {s.record.weights.label()} | "
                     f"{'–' if cal is None else _pct(cal.ece)} | {minutes:.1f} min |")
    return lines + ["", "The experiment published final-epoch validation accuracies only (its "
                    "TinyViT-5M fine-tune ran 21 epochs); they stand beside ours of the same "
                    "kind, and our test accuracy is separate.", ""]


def _mcnemar_text(g: Gain) -> str:
    if not g.mcnemar:
        return "–"
    if len(g.mcnemar) == 1:
        m = g.mcnemar[0]
        return f"{m.only_a} / {m.only_b}, p = {m.p:.2g} (seed {m.seed_a} vs {m.seed_b})"
    ps = [m.p for m in g.mcnemar]
    pairs = ", ".join(f"{m.seed_a}–{m.seed_b}" for m in g.mcnemar)
    return f"p = {min(ps):.2g} to {max(ps):.2g} over {len(ps)} seed pairs ({pairs})"


def _gain_table(c: Comparison) -> list[str]:
    lines = ["## Gain from ImageNet pre-training", "",
             "| model | weights | pretrained − scratch, points [95% CI] | relative error reduction "
             "| McNemar (only pretrained right / only scratch right, p) | linear probe (frozen "
             "features) | source's ImageNet top-1 |",
             "|---|---|---:|---:|---|---:|---:|"]
    for g in c.gains:
        probe = next((s for s in c.settings if s.arch == g.arch and s.mode == "linear probe"), None)
        ci = _ci(g.interval) if g.interval else " (no per-image predictions)"
        covers = "" if g.interval is None else (" (images and seeds)" if g.interval.covers_seeds
                                                else " (images)")
        name = (g.pretrained.label.split(" pretrained")[-1].strip(" ()") or g.pretrained.tag
                or "file")
        lines.append(f"| {g.display} | {name}{'' if g.default else ' (control)'} | "
                     f"{_points(g.gain)}{c.marked()}{ci}{covers} | {_pct(g.error_reduction, 0)} | "
                     f"{_mcnemar_text(g)} | "
                     f"{accuracy_cell(probe) if probe else '– (run with --freeze-backbone)'} | "
                     f"{_top1(g.top1)} |")
    if not c.gains:
        lines.append("| – | – | needs a pretrained and a scratch run of the same model | – | – | "
                     "– | – |")
    return lines + [""]


def _decomposition_table(c: Comparison) -> list[str]:
    if not c.decomposition and not c.missing_controls:
        return []
    lines = ["## What the extra gain is made of", "",
             "From the control runs (`run_suite.py --controls`): each row a contrast of the same "
             "paired test predictions as the gains above.", "",
             "| contrast | points [95% CI] | what it answers | what it does not |",
             "|---|---:|---|---|"]
    for p in c.decomposition:
        note = ("images and seeds" if p.interval.covers_seeds else
                "images and some seeds" if p.interval.method == "images and some seeds"
                else "test images only")
        lines.append(f"| {p.name} | {_points(p.interval.estimate)}{c.marked()}{_ci(p.interval)} "
                     f"({note}) | {p.answers} | {p.not_answered} |")
    if c.missing_controls:
        lines += ["", "Not run yet (their rows are missing, not estimated): "
                  + ", ".join(c.missing_controls) + "."]
    return lines + [""]


def confound_note() -> str:
    """The unequal pre-training of the two models' weights, with the published figures from
    specs.py."""
    vit, cnn = TINYVIT_5M.default_weights, RESNET18.default_weights
    vit_1k, swsl = (TINYVIT_5M.weights_for("timm", "in1k"),
                    RESNET18.weights_for("timm", "fb_swsl_ig1b_ft_in1k"))
    tv = RESNET18.weights_for("torchvision", "IMAGENET1K_V1")
    return ("**The confound.** The two models' ImageNet weights are not equally good: "
            f"TinyViT-5M's default weights saw {vit.pretrain_data} ({vit.imagenet_top1:.1f}% "
            f"top-1), ResNet-18's saw {cnn.pretrain_data} only (timm resnet18.{cnn.tag} "
            f"{cnn.imagenet_top1:.1f}% in {cnn.top1_source}; torchvision V1 "
            f"{tv.imagenet_top1:.1f}%). So part of \"the ViT gains more from pre-training\" may be "
            "\"its pre-trained weights are better\". Controls: `python train_tinyvit_cifar.py "
            f"--model tiny_vit_5m_224.in1k` (ImageNet-1k only, {vit_1k.imagenet_top1:.1f}%) and "
            "`python train_resnet_cifar.py --model resnet18.fb_swsl_ig1b_ft_in1k` (a billion "
            f"extra images, {swsl.imagenet_top1:.1f}%) or `--model tv/resnet18` "
            f"({tv.imagenet_top1:.1f}%); give their folders to this script and they appear as "
            "control rows above.")


INIT_NOTE = ("**The scratch ResNet-18's init.** timm's ResNet-18 starts the last BatchNorm of "
             "every residual block at zero (zero-init-last, as the experiment's runs had it); "
             "under AdamW such a scale moves by about one lr a step, so the residual branches open "
             "slowly and a short scratch run is handicapped. Part of \"pre-training helps "
             "ResNet-18\" is then \"this init starts slowly\" (measured in design.md). Control: "
             "`python train_resnet_cifar.py --no-pretrained --no-zero-init-last` (its folder "
             "appears as a control row).")


def _per_class_table(c: Comparison) -> list[str]:
    rows = [(s, pc) for s in c.settings if (pc := per_class(s)) is not None]
    if not rows:
        return []
    classes = rows[0][1].classes
    lines = ["## Per-class test accuracy (best.pt; recall: the share of each class's images "
             "predicted as it)", "",
             "| setting | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
    for s, pc in rows:
        lines.append(f"| {s.label} | " + " | ".join(f"{100 * a:.1f}" for a in pc.acc) + " |")
    return lines + [""]


def _runs_table(c: Comparison) -> list[str]:
    lines = ["## The runs", "", "| run | what produced it |", "|---|---|"]
    for s in c.settings:
        for r in s.runs:
            lines.append(f"| {r.folder} | {r.record.line(r.summary)}; "
                         f"{r.record.environment.label()} |")
    return lines


# ----------------------------------------------------------------------------- a data-size sweep

def sizes_headline(sc) -> str:
    """The first line of a sweep's results.md: the difference of the gains at the largest size, and
    how it moves with the number of training images."""
    diffs = [(n, sc.by_size[n].gain_difference) for n in sc.sizes]
    have = [(n, d) for n, d in diffs if d is not None]
    if not have:
        return ("**Not answered yet:** each size needs the four settings (ResNet-18 and "
                "TinyViT-5M, pretrained and from scratch) with test predictions.")
    n, d = have[-1]
    trend = "; ".join(f"{m:,}: {_points(x.estimate)}{_ci(x.interval)}" for m, x in have)
    if len(have) > 1:
        moves = (f" By training images: {trend} (it changes from {_points(have[0][1].estimate)} at "
                 f"{have[0][0]:,} to {_points(have[-1][1].estimate)} at {have[-1][0]:,}; the "
                 "intervals say how much of that change is noise).")
    else:
        moves = ""
    covers = interval_note(d.interval, d.vit.n_images, (*d.vit.seeds, *d.cnn.seeds))
    return (f"**With {n:,} training images the difference of the gains (TinyViT-5M's minus "
            f"ResNet-18's) is {_points(d.estimate)} points{_ci(d.interval)}: {covers}.{moves}**")


def sizes_markdown(sc) -> str:
    """results.md of a sweep: the answer against size, a table per size, then each size's full
    tables."""
    from .analysis import setting_interval

    lines = ["# Results across training-set sizes", "", sizes_headline(sc), ""]
    if sc.mismatched:
        lines += [f"**{MARK} The runs differ in settings that matter** (compared because of "
                  "--allow-mismatch):", ""]
        lines += [f"- {differences_text(k, vals)}" for k, vals in sc.mismatched.items()] + [""]
    labels = []
    for n in sc.sizes:
        labels += [s.label for s in sc.by_size[n].settings if s.label not in labels]
    # one gain column per pretrained setting: the models' own, then the controls'
    gain_cols: list[tuple[str, str]] = []
    for n in sc.sizes:
        for g in sc.by_size[n].gains:
            key = (g.pretrained.label, f"{g.display} gain" if g.default
                   else f"{g.pretrained.label} gain (control)")
            if key not in gain_cols:
                gain_cols.append(key)
    header = ["training images", *labels, *(name for _, name in gain_cols),
              "difference of the gains"]
    lines += ["## Test accuracy and gains by training-set size", "",
              "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for n in sc.sizes:
        c = sc.by_size[n]
        cells = [f"{n:,}"]
        for label in labels:
            s = next((x for x in c.settings if x.label == label), None)
            i = setting_interval(s) if s else None
            cells.append("–" if s is None else f"{_pct(np.mean(s.test_acc()), 1)}" + (
                f" [{_pct(i.lo)}, {_pct(i.hi)}]" if i else ""))
        gains = {g.pretrained.label: g for g in c.gains}
        cells += [f"{_points(gains[k].gain)}{_ci(gains[k].interval)}" if k in gains else "–"
                  for k, _ in gain_cols]
        d = c.gain_difference
        cells.append(_points(d.estimate) + _ci(d.interval) if d else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Intervals: 95%, over the test images and the seeds where a setting has 2 or "
              "more seeds, over the test images alone with one seed (which then says nothing "
              "about training noise).", ""]
    for n in sc.sizes:
        # without its own "# Results" title
        body = results_markdown(sc.by_size[n]).split("\n", 2)[2]
        lines += [f"## {n:,} training images", "", body.replace("\n## ", "\n### ")]
    return "\n".join(lines) + "\n"
