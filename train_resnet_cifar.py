"""Fine-tune (or train from scratch) ResNet-18 on CIFAR-10.

ResNet: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016. Pretrained = timm's
resnet18.a1_in1k (the weights the experiment's public code fine-tuned); tv/resnet18 selects torchvision's
IMAGENET1K_V1. Same data, augmentation, optimiser, schedule and budget as train_tinyvit_cifar.py.

    python train_resnet_cifar.py --pretrained --data-dir cifar10-jpeg.tar.gz      # runs/resnet_ft
    python train_resnet_cifar.py --no-pretrained --data-dir cifar10-jpeg.tar.gz   # runs/resnet_scratch
"""
from __future__ import annotations

import sys

from common.cli import entry_point
from common.config import build_parser, config_from_args
from common.specs import RESNET18 as SPEC


@entry_point
def main(argv: list[str] | None = None) -> int:
    head, _, examples = __doc__.partition("\n\n")
    parser = build_parser(head, SPEC.default_model, epilog=examples)
    cfg = config_from_args(parser.parse_args(argv), SPEC.run_prefix, SPEC.default_model)
    from common.trainer import run_training  # heavy imports after --help

    return run_training(cfg)


if __name__ == "__main__":
    sys.exit(main())
