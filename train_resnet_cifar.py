"""Fine-tune (or train from scratch) ResNet-18 on CIFAR-10.

ResNet: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016. Pretrained = timm's
resnet18.a1_in1k (the weights the experiment's public code fine-tuned); tv/resnet18 selects torchvision's
IMAGENET1K_V1. Same data, augmentation, optimiser, schedule and budget as train_tinyvit_cifar.py.

    python train_resnet_cifar.py --pretrained --data-dir cifar10-jpeg.tar.gz      # runs/resnet_ft
    python train_resnet_cifar.py --no-pretrained --data-dir cifar10-jpeg.tar.gz   # runs/resnet_scratch
"""
from __future__ import annotations

import sys

from common.config import build_parser, config_from_args
from common.errors import exit_on_user_error
from common.specs import RESNET18

DEFAULT_MODEL = f"{RESNET18.arch}.{RESNET18.default_tag}"


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    doc = __doc__.split("\n\n")
    parser = build_parser(doc[0], DEFAULT_MODEL, epilog="\n\n".join(doc[1:]))
    cfg = config_from_args(parser.parse_args(argv), RESNET18.run_prefix, DEFAULT_MODEL)
    from common.trainer import run_training  # heavy imports after --help

    return run_training(cfg)


if __name__ == "__main__":
    sys.exit(main())
