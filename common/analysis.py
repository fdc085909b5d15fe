"""From run folders to the answer: settings (model x pretrained / scratch / linear probe, seeds grouped),
a comparability check, test accuracies with intervals, pre-training gains with paired-bootstrap intervals
and McNemar's test, the difference of the gains, per-class accuracy, calibration, and the confound of
unequal pre-training. Produces results.md; the figures are drawn by common/plots.py from the same object."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import stats
from .errors import UserError
from .provenance import data_label, run_label, weights_label
from .runfolder import Run
from .specs import MODELS

# Settings that must match for a comparison to be fair: the data, its split, the input and the budget.
COMPARABLE = (("data", "sha256"), ("data", "splits"), ("img_size", None), ("epochs", None), ("recipe", None),
              ("batch_size", None), ("lr", None), ("weight_decay", None), ("optimizer", None),
              ("warmup_epochs", None), ("label_smoothing", None), ("mixup", None), ("cutmix", None))
MARK = "†"


@dataclass
class Setting:
    """Runs (seeds) of one model x weights x training mode."""

    label: str
    arch: str
    display: str
    mode: str                     # pretrained | scratch | linear probe
    tag: str | None
    default_weights: bool         # the registry's default weights (the main comparison) or a control
    runs: list[Run] = field(default_factory=list)

    @property
    def config(self) -> dict:
        return self.runs[0].config

    def test_acc(self, which: str = "test_acc") -> list[float]:
        return [r.summary[which] for r in self.runs if which in r.summary]

    def predictions(self) -> list | None:
        """Each run's test_predictions.csv; None when a run has none (runs of older versions)."""
        preds = [r.predictions for r in self.runs]
        return None if any(p is None for p in preds) else preds

    def correct(self, which: str = "best") -> list[np.ndarray] | None:
        """Per seed, whether each test image is right; None when a run has no predictions file."""
        preds = self.predictions()
        return None if preds is None else [(p[f"{which}_pred"] == p["label"]).to_numpy() for p in preds]


def describe(run: Run) -> tuple[str, str, str, str | None, bool]:
    """(arch, display name, mode, weights tag, default weights?) of a run, from its config.json."""
    cfg = run.config
    info = cfg.get("model_info") or {}
    arch = info.get("arch") or str(cfg.get("model", run.folder.name)).split(".")[0].replace("tv/", "")
    spec = MODELS.get(arch)
    display = info.get("display") or (spec.display if spec else arch)
    weights = cfg.get("weights") if isinstance(cfg.get("weights"), dict) else {}
    pretrained = weights.get("init", "ImageNet" if cfg.get("pretrained") else "random init") != "random init"
    mode = "linear probe" if cfg.get("freeze_backbone") else ("pretrained" if pretrained else "scratch")
    tag = weights.get("tag") if pretrained else None
    # a local weights file is taken for the default weights (offline copies of them); other tags are controls
    default = (not pretrained or spec is None or weights.get("init") == "file"
               or (tag == spec.default_tag and weights.get("library") == "timm"))
    return arch, display, mode, tag, default


def group_settings(runs: Sequence[Run], labels: Sequence[str] | None = None) -> list[Setting]:
    """Settings in a stable order (registry models first; pretrained, scratch, linear probe, then controls).
    Runs with the same label (given, or derived from model, weights and mode) are seeds of one setting."""
    settings: dict[str, Setting] = {}
    for i, run in enumerate(runs):
        arch, display, mode, tag, default = describe(run)
        label = labels[i] if labels else f"{display} {mode}" + ("" if default else f" ({tag or 'file'})")
        if label not in settings:
            settings[label] = Setting(label, arch, display, mode, tag, default)
        settings[label].runs.append(run)
    order = list(MODELS)
    modes = ["pretrained", "scratch", "linear probe"]
    return sorted(settings.values(), key=lambda s: (order.index(s.arch) if s.arch in order else len(order), s.arch,
                                                    not s.default_weights, modes.index(s.mode)))


def _value(cfg: dict, key: str, sub: str | None) -> Any:
    v = cfg.get(key)
    if sub is not None:
        v = v.get(sub) if isinstance(v, dict) else None
    if key == "recipe" and isinstance(v, dict):
        v = {k: x for k, x in v.items() if k != "departures_from_preset"}
    return v


def mismatches(runs: Sequence[Run]) -> dict[str, dict[str, list[str]]]:
    """For each comparability setting that differs between runs: value -> the runs that have it."""
    out = {}
    for key, sub in COMPARABLE:
        seen: dict[str, list[str]] = {}
        for r in runs:
            seen.setdefault(_describe_value(_value(r.config, key, sub)), []).append(r.label)
        if len(seen) > 1:
            out[key + (f".{sub}" if sub else "")] = seen
    epochs_run = {}
    for r in runs:
        epochs_run.setdefault(str(r.summary.get("epochs_run", int(r.metrics["epoch"].iloc[-1]))), []).append(r.label)
    if len(epochs_run) > 1:
        out["epochs run"] = epochs_run
    return out


def _describe_value(v: Any) -> str:
    if v is None:
        return "unrecorded"
    if isinstance(v, str) and len(v) == 64:
        return v[:12]
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    return str(v)


@dataclass
class Comparison:
    settings: list[Setting]
    mismatched: dict[str, dict[str, list[str]]]
    allow_mismatch: bool
    gains: list[dict[str, Any]] = field(default_factory=list)
    gain_difference: dict[str, Any] | None = None

    def marked(self, setting: Setting) -> str:
        """The mark of numbers from a comparison of runs that differ in settings that matter (--allow-mismatch):
        every row and gain is then affected, since each is read against the others."""
        return MARK if self.mismatched else ""


def compare(runs: Sequence[Run], labels: Sequence[str] | None = None, allow_mismatch: bool = False,
            n_boot: int = 4000) -> Comparison:
    """Group runs into settings, check they are comparable, and compute gains (see the module docstring)."""
    settings = group_settings(runs, labels)
    differ = mismatches(runs)
    comparison = Comparison(settings, differ, allow_mismatch)
    pairs = _gain_pairs(settings)
    if pairs and differ and not allow_mismatch:
        what = "; ".join(_differences_text(k, vals)[:300] for k, vals in differ.items())
        raise UserError(f"the runs are not comparable: {what}. Re-run them alike, or pass --allow-mismatch to "
                        f"compare anyway (every affected number is then marked {MARK})")
    for pre, scratch in pairs:
        comparison.gains.append(_gain(pre, scratch, n_boot))
    main = [g for g in comparison.gains if g["default"]]
    vit = next((g for g in main if g["arch"] == "tiny_vit_5m_224"), None)
    cnn = next((g for g in main if g["arch"] == "resnet18"), None)
    if vit and cnn and vit.get("correct") is not None and cnn.get("correct") is not None:
        comparison.gain_difference = _difference(vit, cnn, n_boot)
    return comparison


def _differences_text(key: str, values: dict[str, list[str]]) -> str:
    return f"{key}: " + "; ".join(f"{v} ({', '.join(runs)})" for v, runs in values.items())


def _gain_pairs(settings: list[Setting]) -> list[tuple[Setting, Setting]]:
    """(pretrained, scratch) of the same architecture: the default weights first, then the controls."""
    pairs = []
    for s in settings:
        if s.mode == "pretrained":
            scratch = next((t for t in settings if t.arch == s.arch and t.mode == "scratch"), None)
            if scratch is not None:
                pairs.append((s, scratch))
    return pairs


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _gain(pre: Setting, scratch: Setting, n_boot: int) -> dict[str, Any]:
    acc_pre, acc_scr = _mean(pre.test_acc()), _mean(scratch.test_acc())
    gain = {"arch": pre.arch, "display": pre.display, "pretrained": pre, "scratch": scratch, "default": pre.default_weights,
            "gain": None if acc_pre is None or acc_scr is None else acc_pre - acc_scr,
            "top1": (pre.config.get("weights") or {}).get("imagenet_top1"), "correct": None}
    a, b = pre.correct(), scratch.correct()
    if a is not None and b is not None and len(a[0]) == len(b[0]):
        est, lo, hi = stats.bootstrap({"pre": a, "scr": b}, lambda m: m["pre"] - m["scr"], n_boot)
        gain.update(gain=est, lo=lo, hi=hi, correct=(a, b), mcnemar=stats.mcnemar(a[0], b[0]),
                    n_images=len(a[0]), seeds=(len(a), len(b)))
    return gain


def _difference(vit: dict, cnn: dict, n_boot: int) -> dict[str, Any]:
    """TinyViT's gain minus ResNet's, with a paired bootstrap over the shared test images and the seeds."""
    correct = {"vit_pre": vit["correct"][0], "vit_scr": vit["correct"][1],
               "cnn_pre": cnn["correct"][0], "cnn_scr": cnn["correct"][1]}
    est, lo, hi = stats.bootstrap(correct, lambda m: (m["vit_pre"] - m["vit_scr"]) - (m["cnn_pre"] - m["cnn_scr"]),
                                  n_boot)
    return {"estimate": est, "lo": lo, "hi": hi, "vit": vit, "cnn": cnn}


# ----------------------------------------------------------------------------- per class, calibration

def per_class(setting: Setting) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """(class names, mean accuracy per class over seeds, test images per class); None without predictions."""
    preds = setting.predictions()
    if preds is None:
        return None
    classes = (setting.config.get("data") or {}).get("classes") or [f"class {i}" for i in range(10)]
    acc = np.mean([[(p.loc[p["label"] == c, "best_pred"] == c).mean() for c in range(len(classes))] for p in preds], 0)
    counts = np.bincount(preds[0]["label"], minlength=len(classes))
    return list(classes), acc, counts


def calibration(setting: Setting) -> tuple[float, list[dict]] | None:
    """ECE (15 bins) and the bins of best.pt's predictions, pooled over seeds; None without predictions."""
    preds = setting.predictions()
    if preds is None:
        return None
    conf = np.concatenate([p["best_conf"].to_numpy() for p in preds])
    ok = np.concatenate([(p["best_pred"] == p["label"]).to_numpy() for p in preds])
    return stats.ece(conf, ok, 15)


# ----------------------------------------------------------------------------- results.md

def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.{digits}f}%"


def _top1(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}%"


def _points(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f}"


def accuracy_cell(setting: Setting, which: str = "test_acc") -> str:
    """One run: acc (Wilson 95% CI). Several: mean ± std (min–max), n seeds."""
    accs = setting.test_acc(which)
    if not accs:
        return "– (no test yet)"
    if len(accs) == 1:
        n = setting.runs[0].summary.get("test_images", 0)
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
    v, r = d["vit"], d["cnn"]
    mark = MARK if c.mismatched else ""
    n_seeds = max(max(v["seeds"]), max(r["seeds"]))
    return (f"**ImageNet pre-training helps TinyViT-5M by {_points(v['gain'])} points and ResNet-18 by "
            f"{_points(r['gain'])} points of test accuracy; the difference of the gains is "
            f"{_points(d['estimate'])}{mark} points (95% CI [{_points(d['lo'])}, {_points(d['hi'])}], paired "
            f"bootstrap over the {v['n_images']:,} test images" + (" and the seeds" if n_seeds > 1 else "") + ").**")


def results_markdown(c: Comparison) -> str:
    lines = ["# Results", "", headline(c), ""]
    first = c.settings[0].runs[0]
    lines += [f"Data and budget: {run_label(first.config, first.summary)}. "
              "Test accuracy is that of best.pt, the epoch chosen on validation; the test set was used for nothing "
              "else.", ""]
    if c.mismatched:
        lines += [f"**{MARK} The runs differ in settings that matter** (compared because of --allow-mismatch):", ""]
        lines += [f"- {_differences_text(k, vals)}" for k, vals in c.mismatched.items()]
        lines.append("")
    lines += ["## Test accuracy", "",
              "| setting | test acc, best.pt [95% CI] | test acc, final epoch | best val acc (epoch) | weights (ImageNet top-1) | ECE | train time |",
              "|---|---:|---:|---:|---|---:|---:|"]
    for s in c.settings:
        best_val = [float(r.metrics["val_acc"].max()) for r in s.runs]
        best_epoch = "/".join(str(int(r.metrics.loc[r.metrics["val_acc"].idxmax(), "epoch"])) for r in s.runs)
        cal = calibration(s)
        minutes = np.mean([r.summary.get("train_time_s", float(r.metrics.get("epoch_time_s", np.nan).sum()))
                           for r in s.runs]) / 60
        ece_txt = "–" if cal is None else _pct(cal[0])
        lines.append(f"| {s.label}{c.marked(s)} | {accuracy_cell(s)} | {accuracy_cell(s, 'test_acc_final')} | "
                     f"{_pct(np.mean(best_val))} ({best_epoch}) | {weights_label(s.config)} | {ece_txt} | "
                     f"{minutes:.1f} min |")
    lines += ["", "## Gain from ImageNet pre-training", "",
              "| model | weights | pretrained − scratch, points [95% CI] | McNemar (only pretrained right / only scratch right, p) | linear probe (frozen features) | source's ImageNet top-1 |",
              "|---|---|---:|---|---:|---:|"]
    for g in c.gains:
        probe = next((s for s in c.settings if s.arch == g["arch"] and s.mode == "linear probe"), None)
        ci = f" [{_points(g['lo'])}, {_points(g['hi'])}]" if "lo" in g else " (no per-image predictions)"
        mc = g.get("mcnemar")
        mc_txt = f"{mc['only_a']} / {mc['only_b']}, p = {mc['p']:.2g}" if mc else "–"
        lines.append(f"| {g['display']} | {g['pretrained'].tag or 'file'}{'' if g['default'] else ' (control)'} | "
                     f"{_points(g['gain'])}{c.marked(g['pretrained'])}{ci} | {mc_txt} | "
                     f"{accuracy_cell(probe) if probe else '– (run with --freeze-backbone)'} | "
                     f"{_top1(g['top1'])} |")
    if not c.gains:
        lines.append("| – | – | needs a pretrained and a scratch run of the same model | – | – | – |")
    lines += ["", CONFOUND, ""]
    lines += _per_class_table(c) + _runs_table(c)
    return "\n".join(lines) + "\n"


CONFOUND = ("**The confound.** The two models' ImageNet weights are not equally good: TinyViT-5M's default "
            "weights were distilled from a large teacher on ImageNet-22k and then fine-tuned on ImageNet-1k (80.7% "
            "top-1), ResNet-18's saw ImageNet-1k only (timm resnet18.a1_in1k 73.2% at 288 px; torchvision V1 "
            "69.8%). So part of \"the ViT gains more from pre-training\" may be \"its pre-trained weights are "
            "better\". Controls: `python train_tinyvit_cifar.py --model tiny_vit_5m_224.in1k` (ImageNet-1k only, "
            "79.1%) and `python train_resnet_cifar.py --model resnet18.fb_swsl_ig1b_ft_in1k` (a billion extra "
            "images, 73.3%) or `--model tv/resnet18` (69.8%); give their folders to this script and they appear "
            "as control rows above.")


def _per_class_table(c: Comparison) -> list[str]:
    rows = [(s, per_class(s)) for s in c.settings]
    rows = [(s, pc) for s, pc in rows if pc is not None]
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
            env = r.config.get("environment") or {}
            commit = env.get("git_commit")
            git = f", git {commit[:8]}{' (dirty)' if env.get('git_dirty') else ''}" if commit else ""
            lines.append(f"| {r.folder} | {run_label(r.config, r.summary)}; {env.get('device_name', '?')}, torch "
                         f"{env.get('torch', '?')}, timm {env.get('timm', '?')}{git} |")
    return lines


def footnote(settings: Sequence[Setting]) -> str:
    """The provenance line drawn under a figure: what data, how many test images, size, epochs, weights."""
    first = settings[0].runs[0]
    labels = {data_label(r.config) for s in settings for r in s.runs}
    sizes = {str(r.config.get("img_size", "?")) for s in settings for r in s.runs}
    epochs = {str(r.summary.get("epochs_run") or r.metrics["epoch"].iloc[-1]) for s in settings for r in s.runs}
    n_test = {str(r.summary.get("test_images", "?")) for s in settings for r in s.runs}
    weights = "; ".join(f"{s.label}: {weights_label(s.config)}" for s in settings if s.mode != "scratch")
    seeds = max(len(s.runs) for s in settings)
    return (f"{' / '.join(sorted(labels))}; {'/'.join(sorted(n_test))} test images; {'/'.join(sorted(sizes))} px; "
            f"{'/'.join(sorted(epochs, key=float))} epochs; recipe "
            f"{(first.config.get('recipe') or {}).get('name', '?')}; {seeds} seed(s) per setting"
            + (f"; {weights}" if weights else ""))
