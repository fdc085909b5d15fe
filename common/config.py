"""The one config object of a training run: built from the CLI, validated once, saved with the run (in
config.json and in every checkpoint), and compared on --resume."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import UserError


@dataclass
class TrainConfig:
    """Every setting of a run. The defaults are the experiment's recipe (design.md); a departure is a flag."""

    model: str = "resnet18.a1_in1k"
    pretrained: bool = True
    weights_file: str | None = None   # --weights: a local weights file instead of the download
    # identical budget and optimiser for all four runs
    epochs: int = 30
    batch_size: int = 128             # global batch: split across GPUs under torchrun
    lr: float = 3e-4
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    momentum: float = 0.9             # SGD only
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    grad_clip: float = 0.0            # 0 = off
    head_lr_mult: float = 1.0
    freeze_backbone: bool = False     # linear probe: only the new head trains
    patience: int = 0                 # early stop after this many epochs without a better val acc; 0 = off
    seed: int = 0                     # init, sample order, augmentation
    split_seed: int = 0               # which training images are held out for validation (and --train-subset)
    # input and augmentation (None = the recipe's value)
    img_size: int = 224
    aug: str = "reference"
    crop_scale_min: float | None = None
    randaug_ops: int | None = None
    randaug_magnitude: float | None = None
    re_prob: float | None = None
    eval_crop: float | None = None
    # machine
    device: str = "auto"
    amp: bool = True
    amp_dtype: str = "auto"           # auto = bf16 where supported, else fp16 with a GradScaler
    channels_last: bool = True
    compile: bool = False
    data_pipeline: str = "auto"       # auto = gpu on CUDA, cpu otherwise
    num_workers: int = -1             # -1 = min(8, CPU cores)
    # data
    data_dir: str = "./data"
    cache_dir: str | None = None
    download: bool = True
    skip_bad_images: bool = False
    train_subset: int = 0
    val_size: int = 5000
    test_subset: int = 0
    dummy: bool = False
    # run folder
    output_dir: str = "runs/run"
    resume: bool = False
    overwrite: bool = False
    stop_after_epoch: int = 0
    progress_every: float = 30.0      # seconds between progress lines when stderr is not a terminal

    def validate(self) -> "TrainConfig":
        """Reject impossible or absurd settings with a message naming the flag and its range."""
        checks = [
            (1 <= self.epochs <= 10_000, "--epochs must be between 1 and 10000"),
            (1 <= self.batch_size <= 65_536, "--batch-size must be between 1 and 65536"),
            (0 < self.lr <= 10, "--lr must be in (0, 10]"),
            (0 <= self.weight_decay <= 10, "--weight-decay must be in [0, 10]"),
            (0 <= self.momentum < 1, "--momentum must be in [0, 1)"),
            (0 <= self.warmup_epochs < self.epochs, "--warmup-epochs must be in [0, --epochs)"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (0 <= self.mixup <= 100 and 0 <= self.cutmix <= 100, "--mixup and --cutmix alphas must be in [0, 100]"),
            (0 <= self.grad_clip <= 1e6, "--grad-clip must be >= 0 (0 = off)"),
            (0 < self.head_lr_mult <= 1000, "--head-lr-mult must be in (0, 1000]"),
            (0 <= self.patience <= 10_000, "--patience must be >= 0 (0 = off)"),
            (32 <= self.img_size <= 1024, "--img-size must be between 32 and 1024"),
            (self.crop_scale_min is None or 0 < self.crop_scale_min <= 1, "--crop-scale-min must be in (0, 1]"),
            (self.randaug_ops is None or 0 <= self.randaug_ops <= 4, "--randaug-ops must be in [0, 4]"),
            (self.randaug_magnitude is None or 0 <= self.randaug_magnitude <= 30,
             "--randaug-magnitude must be in [0, 30] (timm's scale tops at 10, torchvision's at 30)"),
            (self.re_prob is None or 0 <= self.re_prob <= 1, "--re-prob must be in [0, 1]"),
            (self.eval_crop is None or 0.1 <= self.eval_crop <= 1, "--eval-crop must be in [0.1, 1]"),
            (-1 <= self.num_workers <= 256, "--num-workers must be -1 (auto) or between 0 and 256"),
            (0 <= self.train_subset <= 10_000_000, "--train-subset must be >= 0 (0 = all)"),
            (0 <= self.val_size <= 10_000_000, "--val-size must be >= 0 (0 = validate on the test set)"),
            (0 <= self.test_subset <= 10_000_000, "--test-subset must be >= 0 (0 = all)"),
            (0 <= self.stop_after_epoch <= 10_000, "--stop-after-epoch must be >= 0 (0 = off)"),
            (0 <= self.progress_every <= 86_400, "--progress-every must be between 0 and 86400 seconds"),
            (self.weights_file is None or bool(self.weights_file.strip()), "--weights is empty: give the path of a weights file"),
            (not (self.freeze_backbone and not self.pretrained),
             "--freeze-backbone trains only the head: it needs pretrained weights (drop --no-pretrained)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Rebuild from config.json or a checkpoint; keys of other versions are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# What a run computes: --resume refuses to mix them. Performance-only settings (channels_last, compile,
# num_workers: the CPU pipeline gives the same batches for any worker count) may change between sessions.
IDENTITY_KEYS = ("model", "pretrained", "weights_file", "img_size", "batch_size", "optimizer", "lr", "weight_decay",
                 "momentum", "warmup_epochs", "label_smoothing", "mixup", "cutmix", "grad_clip", "head_lr_mult",
                 "freeze_backbone", "seed", "split_seed", "train_subset", "val_size", "test_subset", "dummy")
RESOLVED_IDENTITY = (("recipe", None), ("data", "sha256"), ("run", "amp_dtype"), ("run", "data_pipeline"),
                     ("weights", "sha256"))


def identity_differences(saved: dict[str, Any], current: dict[str, Any], resolved: bool = True) -> list[str]:
    """'key: saved -> now' for every setting that defines the computation and differs; with resolved, also the
    resolved recipe, data hash, AMP dtype, pipeline and weights file of two run records."""
    diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
             for k in IDENTITY_KEYS if saved.get(k) != current.get(k)]
    for section, key in RESOLVED_IDENTITY if resolved else ():
        a, b = saved.get(section, {}), current.get(section, {})
        if key is not None:
            a, b = a.get(key), b.get(key)
        if a != b:
            diffs.append(f"{section}{'.' + key if key else ''} differs ({_short(a)} in the checkpoint, {_short(b)} now)")
    return diffs


def _short(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items() if k != "departures_from_preset")[:160]
    return repr(v)[:80]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' once, and not for flags whose default is None (their help says what None means)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(description: str, default_model: str, epilog: str = "") -> argparse.ArgumentParser:
    """The flags both train scripts share; defaults come from TrainConfig."""
    d = TrainConfig()
    p = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=_HelpFormatter)
    flag = dict(action=argparse.BooleanOptionalAction)
    g = p.add_argument_group("model and weights")
    g.add_argument("--model", default=default_model,
                   help="Architecture and weights: arch.tag for timm weights (resnet18.a1_in1k, "
                        "tiny_vit_5m_224.in1k), tv/arch for torchvision's IMAGENET1K_V1 (tv/resnet18), or any "
                        "timm model name.")
    g.add_argument("--pretrained", default=d.pretrained, help="Start from the model's ImageNet weights.", **flag)
    g.add_argument("--weights", dest="weights_file", metavar="PATH",
                   help="Load ImageNet weights from this local .pth/.pt/.safetensors file instead of downloading "
                        "them (offline machines); implies --pretrained.")
    g.add_argument("--freeze-backbone", action="store_true",
                   help="Linear probe: train only the new 10-way head on frozen pretrained features.")
    g = p.add_argument_group("optimisation (identical for all four runs)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="Length of the cosine schedule, in epochs.")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="Global batch size (split across GPUs under torchrun).")
    g.add_argument("--lr", type=float, default=d.lr, help="Peak learning rate.")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="Decoupled weight decay on weight matrices and kernels (not on biases and norms).")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default=d.optimizer, help="The optimiser.")
    g.add_argument("--momentum", type=float, default=d.momentum, help="Nesterov momentum of --optimizer sgd.")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs,
                   help="Linear learning-rate warm-up before the cosine, in epochs.")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="Label smoothing of the loss.")
    g.add_argument("--mixup", type=float, default=d.mixup, metavar="ALPHA", help="Mixup alpha; 0 turns it off.")
    g.add_argument("--cutmix", type=float, default=d.cutmix, metavar="ALPHA", help="CutMix alpha; 0 turns it off.")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="Max gradient norm; 0 turns clipping off.")
    g.add_argument("--head-lr-mult", type=float, default=d.head_lr_mult,
                   help="Learning-rate multiplier of the new head (1 = no favour for the head).")
    g.add_argument("--patience", type=int, default=d.patience,
                   help="Stop early after this many epochs without a better validation accuracy; 0 = never.")
    g.add_argument("--seed", type=int, default=d.seed, help="Seed of initialisation, sample order and augmentation.")
    g.add_argument("--split-seed", type=int, default=d.split_seed,
                   help="Seed of the train/validation split (and --train-subset); keep it when varying --seed.")
    g = p.add_argument_group("input and augmentation")
    g.add_argument("--img-size", type=int, default=d.img_size, help="CIFAR images are upsampled to this size.")
    g.add_argument("--aug", choices=["reference", "light"], default=d.aug,
                   help="reference: the experiment's timm recipe (RandAugment rand-m9-mstd0.5-inc1, crop scale "
                        "0.08-1 bicubic, flip, random erasing 0.25; eval resize 256 + centre crop 224). light: the "
                        "weaker earlier recipe (torchvision RandAugment(2, 9), crop scale 0.25-1 bilinear, no "
                        "erasing, full-frame eval).")
    g.add_argument("--crop-scale-min", type=float,
                   help="Smallest RandomResizedCrop area, as a fraction of the image (default: the recipe's, "
                        "0.08 reference, 0.25 light).")
    g.add_argument("--randaug-ops", type=int, help="RandAugment ops per image (default: the recipe's, 2).")
    g.add_argument("--randaug-magnitude", type=float,
                   help="RandAugment magnitude (default: the recipe's, 9: of 10 in timm, of 30 in torchvision).")
    g.add_argument("--re-prob", type=float, help="Random-erasing probability (default: the recipe's, 0.25 / 0).")
    g.add_argument("--eval-crop", type=float,
                   help="Evaluation centre-crop fraction: resize to size/crop, then crop; 1.0 = resize the full "
                        "frame (default: the recipe's, 0.875 reference, 1.0 light).")
    g = p.add_argument_group("machine")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default=d.device,
                   help="Where to train; auto picks CUDA when PyTorch sees a GPU.")
    g.add_argument("--amp", default=d.amp, help="Mixed precision: on by default on CUDA, on the CPU only with "
                   "an explicit --amp-dtype.", **flag)
    g.add_argument("--amp-dtype", choices=["auto", "bf16", "fp16"], default=d.amp_dtype,
                   help="Autocast dtype; auto = bf16 where the GPU supports it, else fp16 with a GradScaler.")
    g.add_argument("--channels-last", default=d.channels_last, help="Use the channels-last memory format.", **flag)
    g.add_argument("--compile", default=d.compile, help="torch.compile the model.", **flag)
    g.add_argument("--data-pipeline", choices=["auto", "gpu", "cpu"], default=d.data_pipeline,
                   help="gpu: the data set lives on the device and is augmented there in batches; cpu: DataLoader "
                        "workers; auto: gpu on CUDA, cpu otherwise.")
    g.add_argument("--num-workers", type=int, default=d.num_workers,
                   help="DataLoader workers of the cpu pipeline; -1 = min(8, CPU cores). Results do not depend on it.")
    g = p.add_argument_group("data and outputs")
    g.add_argument("--data-dir", default=d.data_dir,
                   help="CIFAR-10: a folder holding (or to receive) cifar-10-batches-py/, an image folder with "
                        "train/<class>/ and test/<class>/, or a .tar.gz/.tgz/.zip of one.")
    g.add_argument("--cache-dir", metavar="DIR",
                   help="Where decoded image folders are cached (default: beside the data, or ~/.cache when "
                        "that is read-only).")
    g.add_argument("--download", default=d.download, help="Download CIFAR-10 when --data-dir has none.", **flag)
    g.add_argument("--skip-bad-images", action="store_true",
                   help="Skip unreadable or wrongly sized images of an image folder (counted in config.json) "
                        "instead of stopping.")
    g.add_argument("--train-subset", type=int, default=d.train_subset, metavar="N",
                   help="Train on a random N of the training images (fixed by --split-seed); 0 = all.")
    g.add_argument("--val-size", type=int, default=d.val_size,
                   help="Training images held out for validation; 0 = validate on the test set (not recommended).")
    g.add_argument("--test-subset", type=int, default=d.test_subset, metavar="N",
                   help="Test on a class-stratified N of the test images (smoke runs; fixed by --split-seed); 0 = all.")
    g.add_argument("--dummy", action="store_true",
                   help="Synthetic CIFAR-sized data instead of CIFAR-10: no download, for install checks.")
    g.add_argument("--output-dir", metavar="DIR",
                   help="Run folder (default: runs/<resnet|tinyvit>_<ft|scratch> for the default model).")
    g.add_argument("--resume", action="store_true", help="Continue the run in --output-dir from its last.pt.")
    g.add_argument("--overwrite", action="store_true", help="Replace a finished or partial run in --output-dir.")
    g.add_argument("--stop-after-epoch", type=int, default=d.stop_after_epoch, metavar="N",
                   help="Exit after epoch N of the schedule, to --resume later (job time limits); 0 = off.")
    g.add_argument("--progress-every", type=float, default=d.progress_every, metavar="SECONDS",
                   help="When the output is not a terminal (a log file, nohup, a batch job), print a progress line "
                        "this often within an epoch; 0 = never.")
    return p


def config_from_args(args: argparse.Namespace, run_prefix: str, default_model: str) -> TrainConfig:
    """Turn parsed flags into a validated TrainConfig; the default run folder names the weights used."""
    values = vars(args).copy()
    if values.get("weights_file"):
        values["pretrained"] = True
    if values.get("output_dir") is None:
        values["output_dir"] = default_output_dir(values["model"], values["pretrained"], run_prefix, default_model)
    return TrainConfig(**values).validate()


def default_output_dir(model: str, pretrained: bool, run_prefix: str, default_model: str) -> str:
    """runs/<prefix>_<ft|scratch> for the script's default model, runs/<arch[.tag]>_<ft|scratch> otherwise
    (a scratch run's name never carries a weights tag)."""
    suffix = "ft" if pretrained else "scratch"
    if model == default_model:
        return f"runs/{run_prefix}_{suffix}"
    name = model if pretrained else model.split(".")[0]
    return f"runs/{name.replace('/', '-')}_{suffix}"
