"""Fine-tune (or train from scratch) TinyViT-5M on CIFAR-10.

TinyViT: Wu et al., "TinyViT: Fast Pretraining Distillation for Small Vision Transformers", ECCV 2022.
Pretrained = tiny_vit_5m_224.dist_in22k_ft_in1k (ImageNet-22k distillation, then ImageNet-1k);
tiny_vit_5m_224.in1k is the ImageNet-1k-only control. Same data, augmentation, optimiser, schedule and
budget as train_resnet_cifar.py. --model takes any timm model (e.g. vit_tiny_patch16_224).

    python train_tinyvit_cifar.py --pretrained --data-dir cifar10-jpeg.tar.gz      # runs/tinyvit_ft
    python train_tinyvit_cifar.py --no-pretrained --data-dir cifar10-jpeg.tar.gz   # runs/tinyvit_scratch
"""
from __future__ import annotations

import sys

from common.cli import entry_point
from common.config import build_parser, config_from_args
from common.specs import TINYVIT_5M as SPEC


@entry_point
def main(argv: list[str] | None = None) -> int:
    head, _, examples = __doc__.partition("\n\n")
    parser = build_parser(head, SPEC.default_model, epilog=examples)
    cfg = config_from_args(parser.parse_args(argv), SPEC.run_prefix, SPEC.default_model)
    from common.trainer import run_training  # heavy imports after --help

    return run_training(cfg)


if __name__ == "__main__":
    sys.exit(main())
