"""The one config object of a training run. Each setting is declared once, as a TrainConfig field
with its metadata (default, help sentence, flag group, range, whether it is part of the run identity
and of the comparability of runs); the parser, the range checks, the resume identity and the
analysis's comparability keys are all derived from those declarations. Cross-field checks are
written out in `validate`."""
from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import UserError

MODEL, OPTIM, INPUT, MACHINE, DATA, FOLDER = ("model and weights",
                                              "optimisation (identical for all four runs)",
                                              "input and augmentation", "machine", "data",
                                              "run folder and interruptions")


@dataclass(frozen=True)
class Range:
    """An allowed interval of a numeric flag; `open_lo` / `open_hi` exclude the end. None passes
    (the recipe's value)."""

    lo: float
    hi: float
    open_lo: bool = False
    open_hi: bool = False
    note: str = ""

    def ok(self, v: float | None) -> bool:
        if v is None:
            return True
        return ((v > self.lo if self.open_lo else v >= self.lo)
                and (v < self.hi if self.open_hi else v <= self.hi))

    def message(self, flag: str) -> str:
        if self.open_lo or self.open_hi:
            span = (f"in {'(' if self.open_lo else '['}{self.lo:g}, "
                    f"{self.hi:g}{')' if self.open_hi else ']'}")
        elif self.hi >= 1e6:  # no meaningful upper end: a sanity bound
            span = f">= {self.lo:g}"
        else:
            span = f"between {self.lo:g} and {self.hi:g}"
        return f"{flag} must be {span}" + (f" ({self.note})" if self.note else "")


def opt(default: Any, help: str, group: str, *, flag: str | None = None, check: Range | None = None,
        identity: bool = False, compare: bool = False, choices: tuple[str, ...] | None = None,
        metavar: str | None = None, switch: bool = False, cli: bool = True) -> Any:
    """A TrainConfig field with its flag's metadata. `switch`: a store_true flag (bools default to
    --x/--no-x). `identity`: --resume refuses a change. `compare`: runs that differ are not
    compared."""
    return field(default=default, metadata=dict(help=help, group=group, flag=flag, check=check,
                                                identity=identity, compare=compare, choices=choices,
                                                metavar=metavar, switch=switch, cli=cli))


@dataclass
class TrainConfig:
    """Every setting of a run. The defaults are the experiment's recipe (README); a departure is a
    flag."""

    # ---- model and weights
    model: str = opt("resnet18.a1_in1k", "Architecture and weights: arch.tag for timm weights "
                     "(resnet18.a1_in1k, tiny_vit_5m_224.in1k), tv/arch for torchvision's "
                     "IMAGENET1K_V1 (tv/resnet18), or any timm model name.", MODEL, identity=True)
    pretrained: bool = opt(True, "Start from the model's ImageNet weights.", MODEL, identity=True)
    weights_file: str | None = opt(None, "Load ImageNet weights from this local "
                                   ".pth/.pt/.safetensors file instead of downloading them "
                                   "(offline machines); implies --pretrained.", MODEL,
                                   flag="--weights", metavar="PATH", identity=True)
    zero_init_last: bool | None = opt(
        None, "Start the last norm of every residual branch at zero (default: the library's "
        "choice: on for timm's ResNets and TinyViT, as the experiment had it; off for "
        "torchvision's). --no-zero-init-last removes the slow start of a "
        "scratch ResNet-18 under AdamW (design.md).", MODEL, identity=True)
    freeze_backbone: bool = opt(False, "Linear probe: train only the new head on frozen "
                                       "pretrained features.", MODEL,
                                switch=True, identity=True)
    # ---- optimisation: identical budget and optimiser for all four runs
    # not part of the identity: a resumed run may change it (the cosine is retargeted)
    epochs: int = opt(30, "Length of the cosine schedule, in epochs.", OPTIM,
                      check=Range(1, 10_000), compare=True)
    batch_size: int = opt(128, "Images per optimizer update, the experiment's batch (global: "
                          "split across GPUs under torchrun); --grad-accum-steps splits it into "
                          "micro-batches that fit the GPU.", OPTIM, check=Range(1, 65_536),
                          identity=True, compare=True)
    # not part of the identity: the micro-batch may change at an epoch boundary (the update does not)
    grad_accum_steps: str = opt("auto", "Split each update's --batch-size into this many "
                                "micro-batches, their gradients accumulated: auto chooses the "
                                "fewest that fit the GPU's free memory (1 on the CPU); a number "
                                "fixes it (--batch-size must divide by it). BatchNorm sees the "
                                "micro-batch, so it is recorded and compared.", OPTIM,
                                metavar="N|auto")
    lr: float = opt(3e-4, "Peak learning rate.", OPTIM, check=Range(0, 10, open_lo=True),
                    identity=True, compare=True)
    weight_decay: float = opt(0.05, "Decoupled weight decay (AdamW).", OPTIM, check=Range(0, 10),
                              identity=True, compare=True)
    decay_norm_and_bias: bool = opt(True, "Decay biases and normalisation weights too, as the "
                                    "experiment's AdamW(model.parameters()) does; "
                                    "--no-decay-norm-and-bias decays weight matrices and kernels "
                                    "only.",
                                    OPTIM, identity=True, compare=True)
    optimizer: str = opt("adamw", "The optimiser.", OPTIM, choices=("adamw", "sgd"), identity=True,
                         compare=True)
    momentum: float = opt(0.9, "Nesterov momentum of --optimizer sgd.", OPTIM,
                          check=Range(0, 1, open_hi=True), identity=True, compare=True)
    sched_step: str = opt("epoch", "When the cosine schedule steps: once per epoch after "
                          "validation (the experiment's CosineAnnealingLR) or after every "
                          "optimizer update.", OPTIM,
                          choices=("epoch", "step"), identity=True, compare=True)
    min_lr_ratio: float = opt(0.01, "Floor of the cosine, as a fraction of --lr (the experiment's "
                              "eta_min: 0.01 in its ResNet script, 0.1 "
                              "in its TinyViT script).", OPTIM, check=Range(0, 1),
                              identity=True, compare=True)
    warmup_epochs: float = opt(0.0, "Linear learning-rate warm-up before the cosine, in epochs.",
                               OPTIM, identity=True, compare=True)
    label_smoothing: float = opt(0.0, "Label smoothing of the loss.", OPTIM,
                                 check=Range(0, 1, open_hi=True), identity=True, compare=True)
    mixup: float = opt(0.0, "Mixup alpha; 0 turns it off.", OPTIM, check=Range(0, 100),
                       metavar="ALPHA", identity=True, compare=True)
    cutmix: float = opt(0.0, "CutMix alpha; 0 turns it off.", OPTIM, check=Range(0, 100),
                        metavar="ALPHA", identity=True, compare=True)
    grad_clip: float = opt(0.0, "Max gradient norm; 0 turns clipping off.", OPTIM,
                           check=Range(0, 1e6), identity=True, compare=True)
    head_lr_mult: float = opt(1.0, "Learning-rate multiplier of the new head (1 = no "
                                   "favour for the head).", OPTIM,
                              check=Range(0, 1000, open_lo=True), identity=True, compare=True)
    patience: int = opt(0, "Stop early after this many epochs without a better validation "
                           "accuracy; 0 = never.",
                        OPTIM, check=Range(0, 10_000), compare=True)
    seed: int = opt(0, "Seed of initialisation, sample order and augmentation.", OPTIM,
                    identity=True)
    split_seed: int = opt(0, "Seed of the train/validation split and of --train-subset; keep it "
                          "when varying --seed.", OPTIM, identity=True)
    # ---- input and augmentation (None = the recipe's value)
    img_size: int = opt(224, "CIFAR images are upsampled to this size.", INPUT,
                        check=Range(32, 1024), identity=True, compare=True)
    aug: str = opt("reference", "reference: the experiment's timm recipe (RandAugment "
                   "rand-m9-mstd0.5-inc1, crop scale 0.08-1 bicubic, flip, random erasing 0.25; "
                   "eval resize 256 + centre crop 224). light: the weaker earlier recipe "
                   "(torchvision RandAugment(2, 9), crop scale 0.25-1 bilinear, no erasing, "
                   "full-frame eval).",
                   INPUT, choices=("reference", "light"))
    crop_scale_min: float | None = opt(None, "Smallest RandomResizedCrop area, as a fraction of "
                                       "the image (default: the recipe's, 0.08 reference, "
                                       "0.25 light).", INPUT,
                                       check=Range(0, 1, open_lo=True))
    randaug_ops: int | None = opt(None, "RandAugment ops per image (default: the recipe's, 2).",
                                  INPUT, check=Range(0, 4))
    randaug_magnitude: float | None = opt(None, "RandAugment magnitude (default: the recipe's, 9: "
                                          "of 10 in timm, of 30 in torchvision).",
                                          INPUT, check=Range(0, 30))
    re_prob: float | None = opt(None, "Random-erasing probability (default: the recipe's, "
                                      "0.25 / 0).", INPUT,
                                check=Range(0, 1))
    re_mode: str | None = opt(None, "What fills an erased box: pixel (per-pixel normal noise, the "
                              "experiment's) or const (zeros, the normalised mean colour) "
                              "(default: the recipe's, pixel).", INPUT,
                              choices=("pixel", "const"))
    eval_crop: float | None = opt(None, "Evaluation centre-crop fraction: resize to size/crop, "
                                  "then crop; 1.0 = resize the full frame (default: the recipe's, "
                                  "0.875 reference, 1.0 light).",
                                  INPUT, check=Range(0.1, 1))
    drop_last: bool = opt(True, "Drop the last partial training batch of each epoch (a tiny batch "
                          "upsets BatchNorm); --no-drop-last trains on it, as the "
                          "experiment's DataLoader did.", INPUT,
                          identity=True, compare=True)
    # ---- machine
    device: str = opt("auto", "Where to train; auto picks a CUDA GPU, else Apple silicon's GPU "
                      "(mps: the CPU-fed pipeline in fp32), else the CPU.", MACHINE,
                      choices=("auto", "cuda", "mps", "cpu"))
    amp: bool = opt(True, "Mixed precision for training: on by default on CUDA, on the CPU only "
                    "with an explicit --amp-dtype.", MACHINE)
    amp_dtype: str = opt("auto", "Autocast dtype; auto = bf16 where the GPU supports it, else fp16 "
                         "with a GradScaler.",
                         MACHINE, choices=("auto", "bf16", "fp16"))
    amp_eval: bool = opt(False, "Evaluate under autocast too; by default validation and test run "
                         "in fp32, as in the experiment.", MACHINE, identity=True,
                         compare=True)
    channels_last: bool = opt(True, "Use the channels-last memory format.", MACHINE)
    deterministic: bool = opt(False, "Bit-exact repeats on a GPU: cuDNN's deterministic "
                              "algorithms without autotuning, no TF32, torch's deterministic "
                              "algorithms (a warning names an op that has none); slower. "
                              "Without it a resumed GPU run equals an uninterrupted one in "
                              "distribution, not bit for bit (README).", MACHINE, switch=True)
    compile: bool = opt(False, "torch.compile the model.", MACHINE)
    data_pipeline: str = opt("auto", "device: the data set lives on the training device and is "
                             "augmented there in batches; cpu: DataLoader workers with timm's own "
                             "per-image transforms; auto: device on CUDA, cpu otherwise.",
                             MACHINE, choices=("auto", "device", "cpu"))
    num_workers: int = opt(-1, "DataLoader workers of the cpu pipeline; -1 = min(8, CPU cores). "
                           "Results do not depend on it.", MACHINE, check=Range(-1, 256))
    # ---- data
    data_dir: str = opt("./data", "CIFAR-10: a folder holding (or to receive) "
                        "cifar-10-batches-py/, an image folder with train/<class>/ and "
                        "test/<class>/, or a .tar.gz, .tgz, .tar or .zip of one.", DATA)
    cache_dir: str | None = opt(None, "Where decoded image folders are cached (default: beside the "
                                "data, or ~/.cache when that is read-only).", DATA, metavar="DIR")
    download: bool | None = opt(None, "Download CIFAR-10 when --data-dir has none; by default only "
                                "into the default ./data (another path that does not exist is a "
                                "typo, not a place to download to); --no-download never.", DATA)
    skip_bad_images: bool = opt(False, "Skip unreadable or wrongly sized images of an image folder "
                                "(counted in config.json) instead of stopping.", DATA, switch=True)
    train_subset: int = opt(0, "Train on N of the training images, class-stratified and nested (a "
                            "smaller N is inside a larger one; fixed by --split-seed); 0 = "
                            "all.", DATA,
                            check=Range(0, 10_000_000, note="0 = all"), metavar="N", identity=True)
    val_size: int = opt(5000, "Training images held out for validation; 0 = validate on the test "
                        "set (then best.pt is chosen on the test set: not for results).", DATA,
                        check=Range(0, 10_000_000, note="0 = validate on the test set"),
                        identity=True)
    val_split: str = opt("stratified", "How the validation images are chosen: stratified (the same "
                         "share of each class) or random (torch.randperm under "
                         "manual_seed(--split-seed), the first --val-size: the experiment's split "
                         "with --split-seed 42).",
                         DATA, choices=("stratified", "random"),
                         identity=True)
    test_subset: int = opt(0, "Test on a class-stratified N of the test images (smoke runs; fixed "
                           "by --split-seed); 0 = all.",
                           DATA, check=Range(0, 10_000_000, note="0 = all"), metavar="N",
                           identity=True)
    dummy: bool = opt(False, "Synthetic CIFAR-sized data instead of CIFAR-10: no download, for "
                             "install checks.",
                      DATA, switch=True, identity=True)
    # ---- run folder
    output_dir: str | None = opt(None, "Run folder (default: runs/<resnet|tinyvit>_<ft|scratch> "
                                 "for the script's default model).", FOLDER, metavar="DIR")
    resume: bool = opt(False, "Continue the run in --output-dir from its last.pt (starts it when "
                              "there is none).",
                       FOLDER, switch=True)
    overwrite: bool = opt(False, "Replace a finished or partial run in --output-dir.", FOLDER,
                          switch=True)
    stop_after_epoch: int = opt(0, "Exit after epoch N of the schedule, to --resume later (job "
                                "time limits); 0 = off.",
                                FOLDER, check=Range(0, 10_000, note="0 = off"), metavar="N")
    progress_every: float = opt(30.0, "When the output is not a terminal (a log file, nohup, a "
                                "batch job), print a progress line this often within an "
                                "epoch; 0 = never.", FOLDER,
                                check=Range(0, 86_400), metavar="SECONDS")

    @property
    def effective_batch(self) -> int:
        """Images per optimizer update."""
        return self.batch_size

    @property
    def fixed_accum_steps(self) -> int | None:
        """--grad-accum-steps as a number, or None for auto (memory decides)."""
        return None if self.grad_accum_steps == "auto" else int(self.grad_accum_steps)

    def validate(self) -> "TrainConfig":
        """Range checks from the declarations, then the checks that involve several settings."""
        for f in dataclasses.fields(self):
            check = f.metadata["check"]
            if check is not None and not check.ok(getattr(self, f.name)):
                raise UserError(check.message(flag_of(f)))
        accum = str(self.grad_accum_steps).strip()
        if accum != "auto" and not (accum.isdigit() and 1 <= int(accum) <= 1024):
            raise UserError(f"--grad-accum-steps {self.grad_accum_steps}: give auto or a number "
                            "from 1 to 1024")
        self.grad_accum_steps = accum
        for ok, message in (
            (0 <= self.warmup_epochs < self.epochs, "--warmup-epochs must be in [0, --epochs)"),
            (self.fixed_accum_steps is None or self.batch_size % self.fixed_accum_steps == 0,
             f"--batch-size {self.batch_size} does not split into --grad-accum-steps "
             f"{self.grad_accum_steps} equal micro-batches: choose a divisor of it"),
            (self.weights_file is None or bool(self.weights_file.strip()),
             "--weights is empty: give the path of a weights file"),
            (not (self.freeze_backbone and not self.pretrained),
             "--freeze-backbone trains only the head: it needs pretrained weights (drop "
             "--no-pretrained)"),
            (self.output_dir is None or bool(self.output_dir.strip()),
             "--output-dir is empty: give a folder"),
            (self.drop_last or self.fixed_accum_steps in (None, 1),
             "--no-drop-last needs --grad-accum-steps 1 (a last partial accumulation would weigh "
             "its batches wrong); with auto it is 1"),
        ):
            if not ok:
                raise UserError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _keys(which: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata[which])


IDENTITY_KEYS = _keys("identity")   # --resume refuses a change of these (performance-only flags may
                                    # change)
COMPARE_KEYS = _keys("compare")     # runs that differ in these are not compared
                                    # (common/analysis.py)


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'flag: saved -> now' for every identity setting that differs between two configs (as
    dicts)."""
    return [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
            for k in IDENTITY_KEYS
            if saved.get(k) != current.get(k)]


# ----------------------------------------------------------------------------- the parser

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description and the usage examples verbatim; shows '(default: X)' once, and not for
    flags whose default is None or whose help already says it."""

    def _get_help_string(self, action):
        if (action.default is None or action.default is argparse.SUPPRESS
                or "default" in (action.help or "")):
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse, except that a mistake is one line, not the usage: the flag that was meant when one
    is close (--data_dir, --epoch), and where the list of flags is."""

    def error(self, message: str):
        self.exit(2, f"error: {self.explain(message)}\n")

    def explain(self, message: str) -> str:
        found = re.fullmatch(r"unrecognized arguments: (.*)", message)
        if found:
            flags = [a.split("=")[0] for a in found.group(1).split() if a.startswith("-")]
            words = [self.suggest(f) for f in flags] or [found.group(1)]
            message = (f"unrecognized flag{'s' if len(words) > 1 else ''} " + ", ".join(words))
        return f"{message}; python {self.prog} --help lists every flag"

    def suggest(self, flag: str) -> str:
        import difflib

        known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        normal = flag.replace("_", "-").lower()
        close = ([normal] if normal in known else
                 difflib.get_close_matches(normal, known, n=1, cutoff=0.75))
        return f"{flag} (did you mean {close[0]}?)" if close else flag


def new_parser(description: str, epilog: str = "", parents: tuple = ()) -> argparse.ArgumentParser:
    """A parser as every script of this repository builds it: examples verbatim, no abbreviated
    flags (a typo in a job script must fail, not match another flag), mistakes in one line."""
    return OneLineParser(description=description, epilog=epilog, formatter_class=HelpFormatter,
                         allow_abbrev=False, parents=list(parents))


def build_parser(description: str, default_model: str, epilog: str = "") -> argparse.ArgumentParser:
    """The flags both train scripts share, derived from TrainConfig's declarations."""
    p = new_parser(description, epilog)
    add_train_flags(p, default_model)
    return p


def add_train_flags(p: argparse.ArgumentParser, default_model: str) -> None:
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        m = f.metadata
        if not m["cli"]:
            continue
        g = (groups.get(m["group"])
             or groups.setdefault(m["group"], p.add_argument_group(m["group"])))
        kwargs: dict[str, Any] = dict(dest=f.name, help=m["help"])
        default = default_model if f.name == "model" else f.default
        if m["switch"]:
            kwargs.update(action="store_true")
        elif f.type in ("bool", "bool | None"):
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        else:
            kwargs.update(type=_type_of(f), default=default)
            if m["choices"]:
                kwargs["choices"] = list(m["choices"])
            if m["metavar"]:
                kwargs["metavar"] = m["metavar"]
        g.add_argument(flag_of(f), **kwargs)


def _type_of(f: dataclasses.Field) -> Callable[[str], Any]:
    base = f.type.split("|")[0].strip()
    return {"int": int, "float": float, "str": str}[base]


def config_from_args(args: argparse.Namespace, run_prefix: str, default_model: str) -> TrainConfig:
    """Turn parsed flags into a validated TrainConfig; the default run folder names the weights
    used."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if hasattr(args, f.name)}
    if values.get("weights_file"):
        values["pretrained"] = True
    if values.get("output_dir") is None:
        values["output_dir"] = default_output_dir(values["model"], values["pretrained"], run_prefix,
                                                  default_model)
    return TrainConfig(**values).validate()


def default_output_dir(model: str, pretrained: bool, run_prefix: str, default_model: str) -> str:
    """runs/<prefix>_<ft|scratch> for the script's default model, runs/<arch[.tag]>_<ft|scratch>
    otherwise (a scratch run's name never carries a weights tag)."""
    suffix = "ft" if pretrained else "scratch"
    if model == default_model:
        return f"runs/{run_prefix}_{suffix}"
    name = model if pretrained else model.split(".")[0]
    return f"runs/{name.replace('/', '-')}_{suffix}"


def strip_flags(argv: list[str], drop: set[str]) -> list[str]:
    """argv without the flags whose dest is in `drop` (and their values), parsed with the train
    parser's own definitions: `--stop-after-epoch 3` and `--stop-after-epoch=3` both go. Used to
    print a resume command."""
    p = build_parser("", "resnet18")
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        action = p._option_string_actions.get(name) if token.startswith("--") else None
        takes_value = action is not None and action.nargs != 0 and "=" not in token
        if action is not None and action.dest in drop:
            i += 2 if takes_value else 1
            continue
        out.append(token)
        if takes_value and i + 1 < len(argv):
            out.append(argv[i + 1])
            i += 1
        i += 1
    return out
