"""From run folders to the answer: settings (model x weights x pretrained / scratch / linear probe, seeds
grouped), a comparability check, test accuracies with intervals, pre-training gains with paired-bootstrap
intervals and McNemar's test, the difference of the gains, per-class accuracy, calibration. results.md is
written from the Comparison by common/results_md.py, the figures by common/plots.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import stats
from .config import COMPARE_KEYS
from .errors import UserError
from .runfolder import Run
from .specs import MODELS

MARK = "†"
MODES = ("pretrained", "scratch", "linear probe")


@dataclass(frozen=True)
class Kind:
    """What a run is, read from its record: the architecture, the training mode and the weights."""

    arch: str
    display: str
    mode: str                     # pretrained | scratch | linear probe
    tag: str | None
    default_weights: bool         # the registry's default weights (the main comparison) or a control
    weights: str                  # the weights' identity (tag or file hash)


def describe(run: Run) -> Kind:
    r = run.record
    spec = MODELS.get(r.model.arch)
    pretrained = r.weights.pretrained
    mode = "linear probe" if r.config.freeze_backbone else ("pretrained" if pretrained else "scratch")
    tag = r.weights.tag if pretrained else None
    # a local weights file is taken for the default weights (offline copies of them); other tags are controls
    default = (not pretrained or spec is None or r.weights.init == "file"
               or (tag == spec.default_tag and r.weights.library == "timm"))
    return Kind(r.model.arch, r.model.display, mode, tag, default, r.weights.identity)


@dataclass
class Setting:
    """Runs (seeds) of one model x weights x training mode."""

    label: str
    kind: Kind
    runs: list[Run] = field(default_factory=list)

    @property
    def arch(self) -> str:
        return self.kind.arch

    @property
    def display(self) -> str:
        return self.kind.display

    @property
    def mode(self) -> str:
        return self.kind.mode

    @property
    def tag(self) -> str | None:
        return self.kind.tag

    @property
    def default_weights(self) -> bool:
        return self.kind.default_weights

    @property
    def record(self):
        return self.runs[0].record

    def test_acc(self, final: bool = False) -> list[float]:
        return [r.summary.test_acc_final if final else r.summary.test_acc for r in self.runs if r.summary]

    def predictions(self) -> list | None:
        """Each run's test_predictions.csv; None when a run has none yet."""
        preds = [r.predictions for r in self.runs]
        return None if any(p is None for p in preds) else preds

    def correct(self, which: str = "best") -> list[np.ndarray] | None:
        """Per seed, whether each test image is right; None when a run has no predictions file."""
        preds = self.predictions()
        return None if preds is None else [(p[f"{which}_pred"] == p["label"]).to_numpy() for p in preds]


def group_settings(runs: Sequence[Run], labels: Sequence[str] | None = None) -> list[Setting]:
    """Settings in a stable order (registry models first; pretrained, scratch, linear probe, then controls).
    Runs with the same label (given, or derived from model, weights and mode) are seeds of one setting."""
    settings: dict[str, Setting] = {}
    for i, run in enumerate(runs):
        kind = describe(run)
        label = labels[i] if labels else f"{kind.display} {kind.mode}" + (
            "" if kind.default_weights else f" ({kind.tag or 'file'})")
        settings.setdefault(label, Setting(label, kind)).runs.append(run)
    order = list(MODELS)
    return sorted(settings.values(), key=lambda s: (order.index(s.arch) if s.arch in order else len(order), s.arch,
                                                    not s.default_weights, MODES.index(s.mode)))


def comparable_values(run: Run) -> dict[str, str]:
    """The settings that must match for a comparison to be fair, as text: the data and its split, the recipe,
    and every flag declared `compare` in common/config.py."""
    r = run.record
    values = {"data.sha256": r.data.sha256[:12],
              "data.splits": _text({k: v for k, v in vars(r.data.splits).items()}),
              "recipe": _text({k: v for k, v in r.recipe.to_dict().items() if k != "departures_from_preset"})}
    values.update({k: _text(getattr(r.config, k)) for k in COMPARE_KEYS})
    values["effective batch"] = str(r.config.effective_batch)  # 128, or 64 x 2 accumulated: the same experiment
    values["epochs run"] = str(run.summary.epochs_run if run.summary else int(run.metrics["epoch"].iloc[-1]))
    return values


def _text(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    return str(v)


def mismatches(runs: Sequence[Run]) -> dict[str, dict[str, list[str]]]:
    """For each comparability setting that differs between runs: value -> the runs that have it."""
    seen: dict[str, dict[str, list[str]]] = {}
    for r in runs:
        for key, value in comparable_values(r).items():
            seen.setdefault(key, {}).setdefault(value, []).append(r.label)
    return {k: v for k, v in seen.items() if len(v) > 1}


@dataclass
class Gain:
    """A pretrained setting against the scratch setting of the same architecture."""

    pretrained: Setting
    scratch: Setting
    gain: float | None                    # points / 100 (mean over seeds)
    lo: float | None = None               # 95% interval (paired bootstrap over images and seeds)
    hi: float | None = None
    mcnemar: dict | None = None
    n_images: int = 0
    seeds: tuple[int, int] = (0, 0)
    correct: tuple[list, list] | None = None

    @property
    def arch(self) -> str:
        return self.pretrained.arch

    @property
    def display(self) -> str:
        return self.pretrained.display

    @property
    def default(self) -> bool:
        return self.pretrained.default_weights

    @property
    def top1(self) -> float | None:
        return self.pretrained.record.weights.imagenet_top1


@dataclass
class GainDifference:
    """TinyViT-5M's gain minus ResNet-18's: the number the question asks for."""

    estimate: float
    lo: float
    hi: float
    vit: Gain
    cnn: Gain


@dataclass
class Comparison:
    settings: list[Setting]
    mismatched: dict[str, dict[str, list[str]]]
    allow_mismatch: bool
    gains: list[Gain] = field(default_factory=list)
    gain_difference: GainDifference | None = None

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
        what = "; ".join(differences_text(k, vals)[:300] for k, vals in differ.items())
        raise UserError(f"the runs are not comparable: {what}. Re-run them alike, or pass --allow-mismatch to "
                        f"compare anyway (every affected number is then marked {MARK})")
    comparison.gains = [_gain(pre, scratch, n_boot) for pre, scratch in pairs]
    main = [g for g in comparison.gains if g.default]
    vit = next((g for g in main if g.arch == "tiny_vit_5m_224"), None)
    cnn = next((g for g in main if g.arch == "resnet18"), None)
    if vit and cnn and vit.correct is not None and cnn.correct is not None:
        comparison.gain_difference = _difference(vit, cnn, n_boot)
    return comparison


def differences_text(key: str, values: dict[str, list[str]]) -> str:
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


def _gain(pre: Setting, scratch: Setting, n_boot: int) -> Gain:
    acc_pre, acc_scr = _mean(pre.test_acc()), _mean(scratch.test_acc())
    gain = Gain(pre, scratch, None if acc_pre is None or acc_scr is None else acc_pre - acc_scr)
    a, b = pre.correct(), scratch.correct()
    if a is not None and b is not None and len(a[0]) == len(b[0]):
        est, lo, hi = stats.bootstrap({"pre": a, "scr": b}, lambda m: m["pre"] - m["scr"], n_boot)
        gain.gain, gain.lo, gain.hi = est, lo, hi
        gain.correct, gain.mcnemar = (a, b), stats.mcnemar(a[0], b[0])
        gain.n_images, gain.seeds = len(a[0]), (len(a), len(b))
    return gain


def _difference(vit: Gain, cnn: Gain, n_boot: int) -> GainDifference:
    """TinyViT's gain minus ResNet's, with a paired bootstrap over the shared test images and the seeds."""
    correct = {"vit_pre": vit.correct[0], "vit_scr": vit.correct[1],
               "cnn_pre": cnn.correct[0], "cnn_scr": cnn.correct[1]}
    est, lo, hi = stats.bootstrap(correct, lambda m: (m["vit_pre"] - m["vit_scr"]) - (m["cnn_pre"] - m["cnn_scr"]),
                                  n_boot)
    return GainDifference(est, lo, hi, vit, cnn)


# ----------------------------------------------------------------------------- per class, calibration

def per_class(setting: Setting) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """(class names, mean accuracy per class over seeds, test images per class); None without predictions."""
    preds = setting.predictions()
    if preds is None:
        return None
    classes = setting.record.data.classes
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


def footnote(settings: Sequence[Setting]) -> str:
    """The provenance line drawn under a figure: what data, how many test images, size, epochs, weights."""
    runs = [r for s in settings for r in s.runs]
    labels = {r.record.data.label() for r in runs}
    sizes = {str(r.record.config.img_size) for r in runs}
    epochs = {str(r.summary.epochs_run if r.summary else int(r.metrics["epoch"].iloc[-1])) for r in runs}
    n_test = {str(r.summary.test_images if r.summary else r.record.data.splits.test) for r in runs}
    weights = "; ".join(f"{s.label}: {s.record.weights.label()}" for s in settings if s.mode != "scratch")
    seeds = max(len(s.runs) for s in settings)
    return (f"{' / '.join(sorted(labels))}; {'/'.join(sorted(n_test))} test images; {'/'.join(sorted(sizes))} px; "
            f"{'/'.join(sorted(epochs, key=float))} epochs; recipe {settings[0].record.recipe.name}; {seeds} seed(s) "
            f"per setting" + (f"; {weights}" if weights else ""))
