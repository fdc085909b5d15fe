"""From run folders to the answer: settings (model x weights x pretrained / scratch / linear probe x
init, seeds grouped), a comparability check, test accuracies with intervals, pre-training gains and
the difference of the gains with intervals that count the seeds as seeds, McNemar's test per seed
pair, per-class accuracy and calibration. results.md is written from the Comparison by
common/results_md.py, the figures by plots.py.

Nothing here depends on the order in which run folders are given: runs are sorted canonically
first."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import stats
from .config import COMPARE_KEYS
from .errors import UserError
from .runfolder import Run
from .specs import REGISTRY

MARK = "†"            # a comparison of runs that differ in settings that matter (--allow-mismatch)
TEST_MARK = "‡"       # best.pt chosen on the test set itself (--val-size 0, --allow-test-selection)
MODES = ("pretrained", "scratch", "linear probe")
# what differs between the sizes of a sweep
TRAINING_SET = ("train", "train_subset", "indices_sha256")


@dataclass(frozen=True)
class Kind:
    """What a run is, read from its record: the architecture, the training mode, the weights and the
    init."""

    arch: str
    display: str
    mode: str                     # pretrained | scratch | linear probe
    weights: str                  # the weights' identity: "timm arch.tag", "file <sha256[:12]>",
                                  # "random init"
    tag: str | None
    registry_default: bool        # the registry's default weights, or random init
    init: str                     # "" (the library's init) or "no zero-init-last" /
                                  # "zero-init-last"

    @property
    def sort_key(self) -> tuple:
        order = list(REGISTRY)
        return (order.index(self.arch) if self.arch in order else len(order), self.arch,
                MODES.index(self.mode), not self.registry_default, self.weights, self.init)

    def label(self) -> str:
        extra = [] if self.registry_default else [self.tag or self.weights]
        extra += [self.init] if self.init else []
        return f"{self.display} {self.mode}" + (f" ({', '.join(extra)})" if extra else "")


def describe(run: Run) -> Kind:
    r = run.record
    spec = REGISTRY.get(r.model.arch)
    pretrained = r.weights.pretrained
    mode = ("linear probe" if r.config.freeze_backbone
            else ("pretrained" if pretrained else "scratch"))
    # a weights file stands in for the weights --model named (their tag is recorded with it)
    tag = r.weights.tag if pretrained else None
    default = (not pretrained or spec is None
               or (r.weights.init in ("ImageNet", "file") and r.weights.library == "timm"
                   and tag == spec.default_tag))
    init = ""
    if (r.config.zero_init_last is not None
            and r.config.zero_init_last != (r.model.library == "timm")):
        init = "zero-init-last" if r.config.zero_init_last else "no zero-init-last"
    return Kind(r.model.arch, r.model.display, mode, r.weights.identity, tag, default, init)


@dataclass
class Setting:
    """Runs (seeds) of one model x weights x training mode x init."""

    label: str
    kind: Kind
    runs: list[Run] = field(default_factory=list)
    main: bool = False            # part of the experiment's four settings (else a control)

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
        return self.main

    @property
    def record(self):
        return self.runs[0].record

    @property
    def seeds(self) -> list[int]:
        return [r.record.config.seed for r in self.runs]

    def test_acc(self, final: bool = False) -> list[float]:
        return [r.summary.test_acc_final if final else r.summary.test_acc for r in self.runs
                if r.summary]

    def final_val_acc(self) -> list[float]:
        return [float(r.metrics["val_acc"].iloc[-1]) for r in self.runs]

    def predictions(self) -> list | None:
        """Each run's test_predictions.csv, rows ordered by test-image index; None when a run has
        none yet."""
        preds = [r.predictions for r in self.runs]
        if any(p is None for p in preds):
            return None
        return [p.sort_values("index", kind="stable").reset_index(drop=True) for p in preds]

    def correct(self, which: str = "best") -> tuple[np.ndarray, list[np.ndarray]] | None:
        """(test-image indices, per seed whether each of those images is right); None without
        predictions."""
        preds = self.predictions()
        if preds is None:
            return None
        index = preds[0]["index"].to_numpy()
        for r, p in zip(self.runs[1:], preds[1:]):
            _same_test_images(self.runs[0], index, r, p["index"].to_numpy())
        return index, [(p[f"{which}_pred"] == p["label"]).to_numpy() for p in preds]


def _same_test_images(a: Run, ia: np.ndarray, b: Run, ib: np.ndarray) -> None:
    if len(ia) != len(ib) or not np.array_equal(ia, ib):
        raise UserError(f"{a.folder} and {b.folder} were tested on different test images "
                        f"({len(ia)} and {len(ib)} images, {len(np.intersect1d(ia, ib))} shared); "
                        "compare runs of the same --test-subset and data")


def canonical(runs: Sequence[Run],
              labels: Sequence[str] | None) -> tuple[list[Run], list[str] | None]:
    """The runs (and their labels) in one order whatever order they were given in: by setting, seed,
    folder. The same folder twice, or two folders of one setting with the same seed, are refused."""
    seen: dict[Path, Run] = {}
    for r in runs:
        key = r.folder.resolve()
        if key in seen:
            raise UserError(f"{r.folder} is given twice; give each run once")
        seen[key] = r
    items = sorted(zip(runs, labels or [None] * len(runs)),
                   key=lambda x: (describe(x[0]).sort_key, x[1] or "", x[0].record.config.seed,
                                  str(x[0].folder)))
    by_seed: dict[tuple, Run] = {}
    for r, label in items:
        key = (label or describe(r).label(), r.record.config.seed)
        if key in by_seed:
            raise UserError(f"{by_seed[key].folder} and {r.folder} are the same setting ({key[0]}) "
                            f"with the same seed {key[1]}: one run counted twice would shrink the "
                            "intervals; give each seed once")
        by_seed[key] = r
    return [r for r, _ in items], ([lbl for _, lbl in items] if labels else None)


def group_settings(runs: Sequence[Run], labels: Sequence[str] | None = None) -> list[Setting]:
    """Settings in a stable order (registry models first; pretrained, scratch, linear probe; main
    before controls). Runs with the same label (given, or derived from model, weights, mode and
    init) are seeds of one setting. The main pretrained setting of a model is its registry weights,
    or a lone weights-file setting."""
    runs, labels = canonical(runs, labels)
    settings: dict[str, Setting] = {}
    for i, run in enumerate(runs):
        kind = describe(run)
        label = labels[i] if labels else kind.label()
        settings.setdefault(label, Setting(label, kind)).runs.append(run)
    ordered = sorted(settings.values(), key=lambda s: s.kind.sort_key)
    for s in ordered:
        s.main = s.kind.registry_default and not s.kind.init
    for arch in {s.arch for s in ordered}:
        pre = [s for s in ordered if s.arch == arch and s.mode == "pretrained" and not s.kind.init]
        files = [s for s in pre if s.kind.weights.startswith("file")]
        if not any(s.main for s in pre) and len(files) == 1:
            # offline users: their copy of the weights, named by its hash in the label
            files[0].main = True
    return ordered


def comparable_values(run: Run) -> dict[str, str]:
    """The settings that must match for a comparison to be fair, as text: the data and its split,
    the recipe, every flag declared `compare` in common/config.py (the batch per update among
    them), the micro-batch and the epochs actually run."""
    r = run.record
    split = {k: v for k, v in vars(r.data.splits).items() if k not in TRAINING_SET}
    values = {"data": f"{r.data.label()} {r.data.sha256[:12]}", "data.splits": _text(split),
              "training set": _text({k: getattr(r.data.splits, k) for k in TRAINING_SET}),
              "recipe": _text({k: v for k, v in r.recipe.to_dict().items()
                               if k != "departures_from_preset"})}
    values.update({k: _text(getattr(r.config, k)) for k in COMPARE_KEYS})
    # the update is --batch-size (compared above); BatchNorm sees the micro-batch, so 128 and 64 x 2
    # are not quite the same run
    values["micro-batch (what BatchNorm sees)"] = str(r.run.micro_batch)
    values["epochs run"] = str(run.summary.epochs_run if run.summary
                               else int(run.metrics["epoch"].iloc[-1]))
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
            seen.setdefault(key, {}).setdefault(value, []).append(str(r.folder))
    return {k: v for k, v in seen.items() if len(v) > 1}


def differences_text(key: str, values: dict[str, list[str]]) -> str:
    return f"{key}: " + "; ".join(f"{v} ({', '.join(runs)})" for v, runs in values.items())


@dataclass
class Interval:
    """An estimate with its 95% interval and what the interval accounts for."""

    estimate: float
    lo: float
    hi: float
    # "seeds": test images and training seeds; "images": test images only
    method: str

    @property
    def covers_seeds(self) -> bool:
        return self.method == "seeds"


@dataclass
class McNemar:
    seed_a: int
    seed_b: int
    only_a: int
    only_b: int
    p: float


@dataclass
class Gain:
    """A pretrained setting against the scratch setting of the same architecture (and init)."""

    pretrained: Setting
    scratch: Setting
    gain: float | None                    # mean accuracy difference (fractions; x 100 for points)
    interval: Interval | None = None
    mcnemar: list[McNemar] = field(default_factory=list)
    n_images: int = 0
    error_reduction: float | None = None  # (err_scratch - err_pretrained) / err_scratch
    correct: tuple[list, list] | None = None

    @property
    def arch(self) -> str:
        return self.pretrained.arch

    @property
    def display(self) -> str:
        return self.pretrained.display

    @property
    def default(self) -> bool:
        return self.pretrained.main and self.scratch.main

    @property
    def top1(self) -> float | None:
        return self.pretrained.record.weights.imagenet_top1

    @property
    def seeds(self) -> tuple[int, int]:
        return len(self.pretrained.runs), len(self.scratch.runs)


@dataclass
class GainDifference:
    """TinyViT-5M's gain minus ResNet-18's: the number the question asks for."""

    interval: Interval
    vit: Gain
    cnn: Gain

    @property
    def estimate(self) -> float:
        return self.interval.estimate


@dataclass
class Part:
    """One row of "what the extra gain is made of": a contrast of settings with its interval, and
    in words what it answers and what it does not."""

    key: str                     # extra | tinyvit_1k | deit | vit_21k | weights
    name: str
    answers: str
    not_answered: str
    interval: Interval
    settings: list[Setting]
    n_images: int

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(len(s.runs) for s in self.settings)


@dataclass
class Comparison:
    settings: list[Setting]
    mismatched: dict[str, dict[str, list[str]]]
    allow_mismatch: bool
    # runs whose best.pt was chosen on the test set
    test_selected: list[str] = field(default_factory=list)
    gains: list[Gain] = field(default_factory=list)
    gain_difference: GainDifference | None = None
    # the controls' decomposition of the extra gain (rows whose runs exist), and the controls missing
    decomposition: list[Part] = field(default_factory=list)
    missing_controls: list[str] = field(default_factory=list)

    def marked(self, setting: Setting | None = None) -> str:
        """The marks every number carries: † when runs that differ are compared (--allow-mismatch),
        since each number is read against the others; ‡ when a best.pt was chosen on the test
        set."""
        return (MARK if self.mismatched else "") + (TEST_MARK if self.test_selected else "")


def compare(runs: Sequence[Run], labels: Sequence[str] | None = None, allow_mismatch: bool = False,
            n_boot: int = 4000, allow_test_selection: bool = False) -> Comparison:
    """Check the runs are comparable, group them into settings, and compute the gains and their
    difference."""
    if labels and len(labels) != len(runs):
        raise UserError(f"--labels has {len(labels)} names for {len(runs)} runs; give one per run")
    selected = [str(r.folder) for r in runs if r.record.data.splits.val_is_test]
    if selected and not allow_test_selection:
        raise UserError(f"{', '.join(selected)} chose best.pt on the test set (--val-size 0), so "
                        "its test accuracy is not a test result; re-run with a validation split, "
                        f"or pass --allow-test-selection to show it marked {TEST_MARK} 'selected "
                        "on the test set'")
    differ = mismatches(runs)
    if differ and not allow_mismatch:
        what = "; ".join(differences_text(k, vals) for k, vals in differ.items())
        raise UserError(f"the runs are not comparable: {what}. Re-run them alike, or pass "
                        f"--allow-mismatch to compare anyway (every number is then marked {MARK})")
    settings = group_settings(runs, labels)
    comparison = Comparison(settings, differ, allow_mismatch, selected)
    comparison.gains = [_gain(pre, scratch, n_boot) for pre, scratch in _gain_pairs(settings)]
    main = [g for g in comparison.gains if g.default]
    vit = next((g for g in main if g.arch == "tiny_vit_5m_224"), None)
    cnn = next((g for g in main if g.arch == "resnet18"), None)
    if vit and cnn and vit.correct is not None and cnn.correct is not None:
        comparison.gain_difference = _difference(vit, cnn, n_boot)
    comparison.decomposition, comparison.missing_controls = decompose(settings, n_boot)
    return comparison


def _find(settings: Sequence[Setting], arch: str, mode: str, tag: str | None = None):
    """The setting of `arch` in `mode` with the library's init: the registry's default weights
    (tag None), or those of `tag`."""
    for s in settings:
        if s.arch != arch or s.mode != mode or s.kind.init:
            continue
        if mode == "scratch" or (s.main if tag is None else s.tag == tag):
            return s
    return None


def decompose(settings: Sequence[Setting], n_boot: int = 4000) -> tuple[list[Part], list[str]]:
    """What TinyViT-5M's extra gain is made of, from the control runs: each ViT's pre-training gain
    minus ResNet-18's (TinyViT-5M with its default ImageNet-22k weights, with ImageNet-1k weights,
    DeiT-Ti with ImageNet-1k, ViT-Ti with ImageNet-21k), and the weights' share (TinyViT-5M 22k
    minus 1k). Rows only where their runs exist with predictions; no control, no rows. Every
    interval is a contrast of the same paired predictions as the main gain."""
    rp, rs = _find(settings, "resnet18", "pretrained"), _find(settings, "resnet18", "scratch")
    t22, ts = (_find(settings, "tiny_vit_5m_224", "pretrained"),
               _find(settings, "tiny_vit_5m_224", "scratch"))
    t1 = _find(settings, "tiny_vit_5m_224", "pretrained", "in1k")
    dp, ds = (_find(settings, "deit_tiny_patch16_224", "pretrained"),
              _find(settings, "deit_tiny_patch16_224", "scratch"))
    vp, vs = (_find(settings, "vit_tiny_patch16_224", "pretrained"),
              _find(settings, "vit_tiny_patch16_224", "scratch"))
    if not any((t1, dp, ds, vp, vs)):
        return [], []
    vs_resnet = "minus ResNet-18's gain (ImageNet-1k weights)"
    rows = [
        ("extra", "TinyViT-5M, ImageNet-22k weights (distilled): its gain " + vs_resnet,
         "the whole extra gain (results.md's first line)",
         "how much of it is the architecture and how much the better weights", [t22, ts, rp, rs],
         [1, -1, -1, 1]),
        ("tinyvit_1k", "TinyViT-5M, ImageNet-1k weights (distilled): its gain " + vs_resnet,
         "the architecture at equal pre-training images (both ImageNet-1k)",
         "whether it is the transformer: TinyViT-5M is a hybrid (its stem and first stage are "
         "convolutions), and its 1k weights were distilled from a large teacher, ResNet-18's were "
         "not", [t1, ts, rp, rs], [1, -1, -1, 1]),
        ("deit", "DeiT-Ti/16, ImageNet-1k weights: its gain " + vs_resnet,
         "a plain ViT (no convolution but the patch embedding) at equal pre-training images",
         "DeiT-Ti differs from TinyViT-5M in more than convolutions (16 px patches, no hierarchy, "
         "global instead of windowed attention, its own training recipe) and from ResNet-18 in "
         "size (5.7 M against 11.7 M parameters)", [dp, ds, rp, rs], [1, -1, -1, 1]),
        ("vit_21k", "ViT-Ti/16, ImageNet-21k weights: its gain " + vs_resnet,
         "a plain ViT with more pre-training images than ResNet-18's",
         "the architecture apart from the data (ViT-Ti's weights saw 21 times the images)",
         [vp, vs, rp, rs], [1, -1, -1, 1]),
        ("weights",
         "weights: TinyViT-5M's gain with ImageNet-22k weights minus with ImageNet-1k weights",
         "what ImageNet-22k pre-training adds to TinyViT-5M's gain, the architecture and the "
         "distillation the same",
         "anything about other architectures (the scratch runs cancel: it is the difference of "
         "the two fine-tuned accuracies)", [t22, t1], [1, -1]),
    ]
    names = {"TinyViT-5M ImageNet-1k": t1, "DeiT-Ti/16 pretrained": dp, "DeiT-Ti/16 scratch": ds}
    missing = [n for n, s in names.items() if s is None]
    parts = []
    for key, name, answers, not_answered, needed, weights in rows:
        if any(s is None for s in needed):
            continue
        interval = contrast(needed, weights, n_boot)
        if interval is not None:
            index, _ = needed[0].correct()
            parts.append(Part(key, name, answers, not_answered, interval, list(needed),
                              len(index)))
    return parts, missing


def _gain_pairs(settings: list[Setting]) -> list[tuple[Setting, Setting]]:
    """(pretrained, scratch) of the same architecture: the main weights first, then the controls. A
    pretrained setting is paired with the main scratch setting (the init variant pairs with its own
    variant)."""
    pairs = []
    for s in settings:
        if s.mode != "pretrained":
            continue
        scratch = [t for t in settings
                   if t.arch == s.arch and t.mode == "scratch" and t.kind.init == s.kind.init]
        chosen = next((t for t in scratch if t.main), scratch[0] if scratch else None)
        if chosen is not None:
            pairs.append((s, chosen))
    return pairs


def _aligned(settings: Sequence[Setting]) -> dict[str, list[np.ndarray]] | None:
    """Per setting, its seeds' correctness on the same test images (checked by index); None without
    predictions."""
    out, first = {}, None
    for s in settings:
        got = s.correct()
        if got is None:
            return None
        index, correct = got
        if first is None:
            first = (s.runs[0], index)
        else:
            _same_test_images(first[0], first[1], s.runs[0], index)
        out[s.label] = correct
    return out


def contrast(settings: Sequence[Setting], weights: Sequence[float], n_boot: int) -> Interval | None:
    """sum_i w_i x accuracy of settings[i], with a 95% interval: over the seeds and the test images
    when every setting has 2 or more seeds (variance components, stats.seed_interval), else over the
    test images alone (paired bootstrap), which then says nothing about training noise."""
    correct = _aligned(settings)
    if correct is None:
        return None
    w = {s.label: float(x) for s, x in zip(settings, weights)}
    if all(len(s.runs) >= 2 for s in settings):
        r = stats.seed_interval(correct, w)
        return Interval(r["estimate"], r["lo"], r["hi"], "seeds")
    est, lo, hi = stats.bootstrap({k: [np.asarray(c) for c in v] for k, v in correct.items()},
                                  lambda m: sum(wk * m[k] for k, wk in w.items()), n_boot)
    # the bootstrap resamples the seeds of settings that have several; with one seed somewhere it
    # cannot count that setting's training noise
    several = any(len(s.runs) >= 2 for s in settings)
    return Interval(est, lo, hi, "images and some seeds" if several else "images")


def _gain(pre: Setting, scratch: Setting, n_boot: int) -> Gain:
    acc_pre, acc_scr = pre.test_acc(), scratch.test_acc()
    gain = Gain(pre, scratch,
                float(np.mean(acc_pre) - np.mean(acc_scr)) if acc_pre and acc_scr else None)
    if gain.gain is not None:
        gain.error_reduction = stats.relative_error_reduction(float(np.mean(acc_pre)),
                                                              float(np.mean(acc_scr)))
    interval = contrast([pre, scratch], [1, -1], n_boot)
    if interval is None:
        return gain
    correct = _aligned([pre, scratch])
    a, b = correct[pre.label], correct[scratch.label]
    gain.interval, gain.gain, gain.correct, gain.n_images = (interval, interval.estimate, (a, b),
                                                             len(a[0]))
    gain.mcnemar = [McNemar(sa, sb, **stats.mcnemar(ca, cb))
                    for sa, sb, ca, cb in _seed_pairs(pre, scratch, a, b)]
    return gain


def _seed_pairs(pre: Setting, scratch: Setting, a: list, b: list):
    """McNemar pairs: runs with the same seed where both settings have it, else the i-th seed of
    each."""
    common = [s for s in pre.seeds if s in scratch.seeds]
    if common:
        return [(s, s, a[pre.seeds.index(s)], b[scratch.seeds.index(s)]) for s in common]
    return [(sa, sb, ca, cb) for sa, sb, ca, cb in zip(pre.seeds, scratch.seeds, a, b)]


def _difference(vit: Gain, cnn: Gain, n_boot: int) -> GainDifference:
    """TinyViT's gain minus ResNet's, on the shared test images (and over the seeds)."""
    interval = contrast([vit.pretrained, vit.scratch, cnn.pretrained, cnn.scratch], [1, -1, -1, 1],
                        n_boot)
    return GainDifference(interval, vit, cnn)


# ------------------------------------------------------------------------ across training-set sizes

@dataclass
class SizeComparison:
    """A sweep: one Comparison per training-set size (its own comparability check), all other
    settings equal."""

    sizes: list[int]
    by_size: dict[int, Comparison]
    mismatched: dict[str, dict[str, list[str]]]

    @property
    def largest(self) -> Comparison:
        return self.by_size[self.sizes[-1]]


def training_images(run: Run) -> int:
    return run.record.data.splits.train


def compare_sizes(runs: Sequence[Run], allow_mismatch: bool = False, n_boot: int = 4000,
                  allow_test_selection: bool = False) -> SizeComparison:
    """Runs of several training-set sizes: everything but the training set must match across
    sizes."""
    across = {k: v for k, v in mismatches(runs).items() if k != "training set"}
    if across and not allow_mismatch:
        what = "; ".join(differences_text(k, vals) for k, vals in across.items())
        raise UserError(f"the runs of the sweep are not comparable across sizes: {what}. Re-run "
                        "them alike, or pass --allow-mismatch (every number is then marked "
                        f"{MARK})")
    sizes = sorted({training_images(r) for r in runs})
    by_size = {n: compare([r for r in runs if training_images(r) == n], None, allow_mismatch,
                          n_boot, allow_test_selection) for n in sizes}
    return SizeComparison(sizes, by_size, across)


def setting_interval(setting: Setting, n_boot: int = 2000) -> Interval | None:
    """A setting's mean test accuracy with its 95% interval (over images and seeds when it has 2 or
    more), within [0, 1] (an accuracy cannot leave it, even when two seeds make Student's t
    wide)."""
    i = contrast([setting], [1.0], n_boot)
    return None if i is None else Interval(i.estimate, max(0.0, i.lo), min(1.0, i.hi), i.method)


# --------------------------------------------------------------------------- per class, calibration

@dataclass
class PerClass:
    classes: list[str]
    acc: np.ndarray               # mean over seeds of each class's accuracy (recall)
    lo: np.ndarray
    hi: np.ndarray
    counts: np.ndarray            # test images per class (the same for every seed)
    seeds: int


def per_class(setting: Setting) -> PerClass | None:
    """Each class's test accuracy (the share of its images predicted as it: recall), with a 95%
    interval: Wilson over the class's images for one seed; over the images and the seeds (as seeds,
    not as more images) for several. None without predictions."""
    got = setting.correct()
    if got is None:
        return None
    preds = setting.predictions()
    labels = preds[0]["label"].to_numpy()
    classes = list(setting.record.data.classes)
    correct = got[1]
    acc, lo, hi, counts = [], [], [], []
    for c in range(len(classes)):
        mask = labels == c
        n = int(mask.sum())
        per_seed = [float(x[mask].mean()) if n else float("nan") for x in correct]
        counts.append(n)
        acc.append(float(np.mean(per_seed)))
        if n == 0:
            lo.append(np.nan), hi.append(np.nan)
        elif len(correct) == 1:
            a, b = stats.wilson(int(correct[0][mask].sum()), n)
            lo.append(a), hi.append(b)
        else:
            r = stats.seed_interval({"s": [x[mask] for x in correct]}, {"s": 1.0})
            lo.append(max(0.0, r["lo"])), hi.append(min(1.0, r["hi"]))
    return PerClass(classes, np.array(acc), np.array(lo), np.array(hi), np.array(counts),
                    len(correct))


@dataclass
class Calibration:
    ece: float
    bins: list[dict]
    images: int
    seeds: int


def calibration(setting: Setting) -> Calibration | None:
    """ECE (15 bins) and the bins of best.pt's predictions, pooled over seeds; None without
    predictions."""
    preds = setting.predictions()
    if preds is None:
        return None
    conf = np.concatenate([p["best_conf"].to_numpy() for p in preds])
    ok = np.concatenate([(p["best_pred"] == p["label"]).to_numpy() for p in preds])
    ece, bins = stats.ece(conf, ok, 15)
    return Calibration(ece, bins, len(preds[0]), len(preds))


def footnote(settings: Sequence[Setting]) -> str:
    """The provenance line drawn under a figure: what data, how many test images, size, epochs,
    weights, seeds."""
    runs = [r for s in settings for r in s.runs]
    labels = {r.record.data.label() for r in runs}
    sizes = {str(r.record.config.img_size) for r in runs}
    epochs = {str(r.summary.epochs_run if r.summary else int(r.metrics["epoch"].iloc[-1]))
              for r in runs}
    n_test = {str(r.summary.test_images if r.summary else r.record.data.splits.test) for r in runs}
    n_train = {str(r.record.data.splits.train) for r in runs}  # several: a data-size sweep
    # once per setting
    named = {s.label: s.record.weights.label() for s in settings if s.mode != "scratch"}
    weights = "; ".join(f"{label}: {w}" for label, w in named.items())
    seeds = "/".join(sorted({str(len(s.runs)) for s in settings}, key=int))
    return (f"{' / '.join(sorted(labels))}; {'/'.join(sorted(n_train, key=int))} train and "
            f"{'/'.join(sorted(n_test))} test images; {'/'.join(sorted(sizes))} px; "
            f"{'/'.join(sorted(epochs, key=float))} epochs; recipe "
            f"{settings[0].record.recipe.name}; {seeds} "
            "seed(s) per setting" + (f"; {weights}" if weights else ""))
