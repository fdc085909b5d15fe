"""Fine-tune (or train from scratch) a torchvision ResNet-18 on CIFAR-10.

ResNet: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
Pretrained = ImageNet-1k weights (ResNet18_Weights.IMAGENET1K_V1); the 1000-way fc becomes a 10-way one.
Same data, augmentation, optimiser, schedule and budget as train_tinyvit_cifar.py (see design.md).

    python train_resnet_cifar.py --pretrained --output-dir runs/resnet_ft
    python train_resnet_cifar.py --no-pretrained --output-dir runs/resnet_scratch
"""
from __future__ import annotations

import sys

from common.config import build_parser, config_from_args
from common.errors import exit_on_user_error

DEFAULT_MODEL = "resnet18"


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.splitlines()[0], default_model=DEFAULT_MODEL,
                          model_help="any torchvision ResNet-style model (resnet18, resnet34, resnet50, ...)")
    cfg = config_from_args(parser.parse_args(argv), "resnet", DEFAULT_MODEL, "resnet")
    from common.trainer import run_training  # heavy imports after --help

    return run_training(cfg)


if __name__ == "__main__":
    sys.exit(main())
