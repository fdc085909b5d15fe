"""results.md: the answer first (the difference of the gains with its interval), then every test accuracy, each
gain with its interval and McNemar's test, the confound, per-class accuracy and what produced every run."""
from __future__ import annotations

import numpy as np

from . import stats
from .analysis import MARK, Comparison, Setting, calibration, differences_text, per_class
from .specs import RESNET18, TINYVIT_5M


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.{digits}f}%"


def _top1(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}%"


def _points(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f}"


def accuracy_cell(setting: Setting, final: bool = False) -> str:
    """One run: acc (Wilson 95% CI). Several: mean ± std (min–max), n seeds."""
    accs = setting.test_acc(final)
    if not accs:
        return "– (no test yet)"
    if len(accs) == 1:
        n = setting.runs[0].summary.test_images
        lo, hi = stats.wilson(round(accs[0] * n), n)
        return f"{_pct(accs[0], 2)} [{_pct(lo)}, {_pct(hi)}]"
    return (f"{_pct(np.mean(accs), 2)} ± {100 * np.std(accs, ddof=1):.2f} ({_pct(min(accs))}–{_pct(max(accs))}, "
            f"{len(accs)} seeds)")


def headline(c: Comparison) -> str:
    """The first line of results.md: the number the question asks for."""
    d = c.gain_difference
    if d is None:
        return ("**Not answered yet:** the difference of the gains needs four runs with test predictions "
                "(ResNet-18 and TinyViT-5M, each pretrained and from scratch).")
    v, r = d.vit, d.cnn
    mark = MARK if c.mismatched else ""
    n_seeds = max(max(v.seeds), max(r.seeds))
    return (f"**ImageNet pre-training helps TinyViT-5M by {_points(v.gain)} points and ResNet-18 by "
            f"{_points(r.gain)} points of test accuracy; the difference of the gains is "
            f"{_points(d.estimate)}{mark} points (95% CI [{_points(d.lo)}, {_points(d.hi)}], paired "
            f"bootstrap over the {v.n_images:,} test images" + (" and the seeds" if n_seeds > 1 else "") + ").**")


def results_markdown(c: Comparison) -> str:
    first = c.settings[0].runs[0]
    lines = ["# Results", "", headline(c), "",
             f"Data and budget: {first.record.line(first.summary)}. Test accuracy is that of best.pt, the epoch "
             f"chosen on validation; the test set was used for nothing else.", ""]
    if c.mismatched:
        lines += [f"**{MARK} The runs differ in settings that matter** (compared because of --allow-mismatch):", ""]
        lines += [f"- {differences_text(k, vals)}" for k, vals in c.mismatched.items()]
        lines.append("")
    lines += ["## Test accuracy", "",
              "| setting | test acc, best.pt [95% CI] | test acc, final epoch | best val acc (epoch) | weights "
              "(ImageNet top-1) | ECE | train time |",
              "|---|---:|---:|---:|---|---:|---:|"]
    for s in c.settings:
        best_val = [float(r.metrics["val_acc"].max()) for r in s.runs]
        best_epoch = "/".join(str(int(r.metrics.loc[r.metrics["val_acc"].idxmax(), "epoch"])) for r in s.runs)
        cal = calibration(s)
        minutes = np.mean([r.summary.train_time_s if r.summary else float(r.metrics["epoch_time_s"].sum())
                           for r in s.runs]) / 60
        lines.append(f"| {s.label}{c.marked(s)} | {accuracy_cell(s)} | {accuracy_cell(s, final=True)} | "
                     f"{_pct(np.mean(best_val))} ({best_epoch}) | {s.record.weights.label()} | "
                     f"{'–' if cal is None else _pct(cal[0])} | {minutes:.1f} min |")
    lines += ["", "## Gain from ImageNet pre-training", "",
              "| model | weights | pretrained − scratch, points [95% CI] | McNemar (only pretrained right / only "
              "scratch right, p) | linear probe (frozen features) | source's ImageNet top-1 |",
              "|---|---|---:|---|---:|---:|"]
    for g in c.gains:
        probe = next((s for s in c.settings if s.arch == g.arch and s.mode == "linear probe"), None)
        ci = f" [{_points(g.lo)}, {_points(g.hi)}]" if g.lo is not None else " (no per-image predictions)"
        mc = g.mcnemar
        mc_txt = f"{mc['only_a']} / {mc['only_b']}, p = {mc['p']:.2g}" if mc else "–"
        lines.append(f"| {g.display} | {g.pretrained.tag or 'file'}{'' if g.default else ' (control)'} | "
                     f"{_points(g.gain)}{c.marked(g.pretrained)}{ci} | {mc_txt} | "
                     f"{accuracy_cell(probe) if probe else '– (run with --freeze-backbone)'} | {_top1(g.top1)} |")
    if not c.gains:
        lines.append("| – | – | needs a pretrained and a scratch run of the same model | – | – | – |")
    lines += ["", confound_note(), ""]
    lines += _per_class_table(c) + _runs_table(c)
    return "\n".join(lines) + "\n"


def confound_note() -> str:
    """The unequal pre-training of the two models' weights, with the published figures from specs.py."""
    vit, cnn = TINYVIT_5M.default_weights, RESNET18.default_weights
    vit_1k, swsl = TINYVIT_5M.weights_for("timm", "in1k"), RESNET18.weights_for("timm", "fb_swsl_ig1b_ft_in1k")
    tv = RESNET18.weights_for("torchvision", "IMAGENET1K_V1")
    return ("**The confound.** The two models' ImageNet weights are not equally good: TinyViT-5M's default weights "
            f"saw {vit.pretrain_data} ({vit.imagenet_top1:.1f}% top-1), ResNet-18's saw {cnn.pretrain_data} only "
            f"(timm resnet18.{cnn.tag} {cnn.imagenet_top1:.1f}% in {cnn.top1_source}; torchvision V1 {tv.imagenet_top1:.1f}%). So part "
            "of \"the ViT gains more from pre-training\" may be \"its pre-trained weights are better\". Controls: "
            f"`python train_tinyvit_cifar.py --model tiny_vit_5m_224.in1k` (ImageNet-1k only, "
            f"{vit_1k.imagenet_top1:.1f}%) and `python train_resnet_cifar.py --model resnet18.fb_swsl_ig1b_ft_in1k` "
            f"(a billion extra images, {swsl.imagenet_top1:.1f}%) or `--model tv/resnet18` "
            f"({tv.imagenet_top1:.1f}%); give their folders to this script and they appear as control rows above.")


def _per_class_table(c: Comparison) -> list[str]:
    rows = [(s, pc) for s in c.settings if (pc := per_class(s)) is not None]
    if not rows:
        return []
    classes = rows[0][1][0]
    lines = ["## Per-class test accuracy (best.pt)", "", "| setting | " + " | ".join(classes) + " |",
             "|---|" + "---:|" * len(classes)]
    for s, (_, acc, _) in rows:
        lines.append(f"| {s.label} | " + " | ".join(f"{100 * a:.1f}" for a in acc) + " |")
    return lines + [""]


def _runs_table(c: Comparison) -> list[str]:
    lines = ["## The runs", "", "| run | what produced it |", "|---|---|"]
    for s in c.settings:
        for r in s.runs:
            lines.append(f"| {r.folder} | {r.record.line(r.summary)}; {r.record.environment.label()} |")
    return lines
