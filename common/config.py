"""The one config object of a training run: built from the CLI, validated once, saved with the run."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError


@dataclass
class TrainConfig:
    """Every setting of a run. The defaults reproduce the four-run experiment (design.md)."""

    family: str = "resnet"            # "resnet" (torchvision) or "timm"; fixed by the script
    model: str = "resnet18"
    pretrained: bool = True
    weights: str | None = None        # local weights file instead of the download
    # identical budget for all four runs
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
    head_lr_mult: float = 1.0         # the new 10-way head learns k times faster
    img_size: int = 224
    crop_scale_min: float = 0.25      # RandomResizedCrop area floor: 0.08 of a 32x32 image is a 9x9 patch
    randaug_ops: int = 2
    randaug_magnitude: int = 9
    patience: int = 0                 # early stop after this many epochs without a better val acc; 0 = off
    seed: int = 0
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
    download: bool = True
    train_subset: int = 0             # 0 = all training images
    val_size: int = 5000              # held out of train; 0 = validate on the test set
    test_subset: int = 0              # only the first N test images (smoke runs); 0 = all
    dummy: bool = False
    # run folder
    output_dir: str = "runs/run"
    resume: bool = False
    overwrite: bool = False
    stop_after_epoch: int = 0         # exit (resumable) after this epoch: time-limited jobs; 0 = off
    extra: dict[str, Any] = field(default_factory=dict)  # resolved facts: versions, params, device name

    def validate(self) -> "TrainConfig":
        """Reject impossible settings with a message naming the flag."""
        checks = [
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.lr > 0, "--lr must be > 0"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.optimizer in ("adamw", "sgd"), "--optimizer must be adamw or sgd"),
            (0 <= self.warmup_epochs < self.epochs, "--warmup-epochs must be in [0, --epochs)"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (self.mixup >= 0 and self.cutmix >= 0, "--mixup/--cutmix alpha must be >= 0"),
            (self.grad_clip >= 0, "--grad-clip must be >= 0 (0 = off)"),
            (self.head_lr_mult > 0, "--head-lr-mult must be > 0"),
            (self.img_size >= 32, "--img-size must be >= 32"),
            (0 < self.crop_scale_min <= 1, "--crop-scale-min must be in (0, 1]"),
            (0 <= self.randaug_ops <= 4, "--randaug-ops must be in [0, 4]"),
            (0 <= self.randaug_magnitude <= 30, "--randaug-magnitude must be in [0, 30]"),
            (self.patience >= 0, "--patience must be >= 0 (0 = off)"),
            (self.device in ("auto", "cuda", "cpu"), "--device must be auto, cuda or cpu"),
            (self.amp_dtype in ("auto", "bf16", "fp16"), "--amp-dtype must be auto, bf16 or fp16"),
            (self.data_pipeline in ("auto", "gpu", "cpu"), "--data-pipeline must be auto, gpu or cpu"),
            (self.train_subset >= 0, "--train-subset must be >= 0"),
            (self.val_size >= 0, "--val-size must be >= 0"),
            (self.test_subset >= 0, "--test-subset must be >= 0"),
            (self.stop_after_epoch >= 0, "--stop-after-epoch must be >= 0 (0 = off)"),
            (self.weights is None or bool(self.weights.strip()), "--weights is empty: give the path of a weights file"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Rebuild from config.json or a checkpoint; keys from newer/older versions are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Settings that define what a run computes: --resume refuses to mix them.
RUN_IDENTITY_KEYS = (
    "family", "model", "img_size", "batch_size", "optimizer", "lr", "weight_decay", "warmup_epochs",
    "label_smoothing", "mixup", "cutmix", "head_lr_mult", "crop_scale_min", "randaug_ops",
    "randaug_magnitude", "seed", "train_subset", "val_size", "test_subset", "dummy", "pretrained",
)


def build_parser(description: str, default_model: str, model_help: str) -> argparse.ArgumentParser:
    """The flags both train scripts share; defaults come from TrainConfig."""
    d = TrainConfig()
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bool_flag = dict(action=argparse.BooleanOptionalAction)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default_model, help=model_help)
    g.add_argument("--pretrained", default=d.pretrained, help="start from ImageNet weights", **bool_flag)
    g.add_argument("--weights", default=None, metavar="PATH",
                   help="local .pth/.pt/.safetensors weights (offline machines); implies --pretrained")
    g = p.add_argument_group("optimisation (identical for all four runs)")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default=d.optimizer)
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warmup")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g.add_argument("--mixup", type=float, default=d.mixup, metavar="ALPHA", help="0 = off")
    g.add_argument("--cutmix", type=float, default=d.cutmix, metavar="ALPHA", help="0 = off")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max grad norm, 0 = off")
    g.add_argument("--head-lr-mult", type=float, default=d.head_lr_mult, help="lr multiplier of the new head")
    g.add_argument("--img-size", type=int, default=d.img_size, help="CIFAR images are upsampled to this")
    g.add_argument("--crop-scale-min", type=float, default=d.crop_scale_min, help="RandomResizedCrop area floor")
    g.add_argument("--randaug-ops", type=int, default=d.randaug_ops, help="RandAugment ops per image")
    g.add_argument("--randaug-magnitude", type=int, default=d.randaug_magnitude)
    g.add_argument("--patience", type=int, default=d.patience, help="early stop on val acc; 0 = off")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("machine")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default=d.device)
    g.add_argument("--amp", default=d.amp, help="mixed precision (on CUDA; on CPU only if asked)", **bool_flag)
    g.add_argument("--amp-dtype", choices=["auto", "bf16", "fp16"], default=d.amp_dtype)
    g.add_argument("--channels-last", default=d.channels_last, **bool_flag)
    g.add_argument("--compile", default=d.compile, help="torch.compile the model", **bool_flag)
    g.add_argument("--data-pipeline", choices=["auto", "gpu", "cpu"], default=d.data_pipeline,
                   help="gpu: data set on the device, batched augmentation; cpu: DataLoader workers")
    g.add_argument("--num-workers", type=int, default=d.num_workers, help="-1 = min(8, cores)")
    g = p.add_argument_group("data and outputs")
    g.add_argument("--data-dir", default=d.data_dir, help="holds (or receives) cifar-10-batches-py/")
    g.add_argument("--download", default=d.download, help="download CIFAR-10 when missing", **bool_flag)
    g.add_argument("--train-subset", type=int, default=d.train_subset, metavar="N", help="0 = all")
    g.add_argument("--val-size", type=int, default=d.val_size, help="held out of train; 0 = test set")
    g.add_argument("--test-subset", type=int, default=d.test_subset, metavar="N",
                   help="evaluate only the first N test images at the end (smoke runs); 0 = all")
    g.add_argument("--dummy", action="store_true", help="synthetic data, no download (install check)")
    g.add_argument("--output-dir", default=None, help="run folder (default runs/<model>_<ft|scratch>)")
    g.add_argument("--resume", action="store_true", help="continue from <output-dir>/last.pt")
    g.add_argument("--overwrite", action="store_true", help="replace a finished or partial run")
    g.add_argument("--stop-after-epoch", type=int, default=d.stop_after_epoch, metavar="N",
                   help="exit after epoch N of the --epochs schedule, to --resume later (job time limits)")
    return p


def config_from_args(args: argparse.Namespace, family: str, default_model: str, run_prefix: str) -> TrainConfig:
    """Turn parsed flags into a validated TrainConfig. The default run folder is
    runs/<run_prefix>_<ft|scratch> for the script's default model, runs/<model>_<ft|scratch> otherwise."""
    values = vars(args).copy()
    if values.get("weights"):
        values["pretrained"] = True
    if values.get("output_dir") is None:
        prefix = run_prefix if values["model"] == default_model else values["model"].split(".")[0]
        values["output_dir"] = f"runs/{prefix.replace('/', '_')}_{'ft' if values['pretrained'] else 'scratch'}"
    return TrainConfig(family=family, **values).validate()
