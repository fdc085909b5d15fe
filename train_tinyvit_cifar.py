"""Fine-tune (or train from scratch) timm's TinyViT-5M on CIFAR-10.

TinyViT: Wu et al., "TinyViT: Fast Pretraining Distillation for Small Vision Transformers", ECCV 2022.
Pretrained = tiny_vit_5m_224.dist_in22k_ft_in1k (ImageNet-22k distillation, then ImageNet-1k); the
head becomes a 10-way one. Same data, augmentation, optimiser, schedule and budget as
train_resnet_cifar.py (see design.md). --model takes any timm model (e.g. vit_tiny_patch16_224).

    python train_tinyvit_cifar.py --pretrained --output-dir runs/tinyvit_ft
    python train_tinyvit_cifar.py --no-pretrained --output-dir runs/tinyvit_scratch
"""
from __future__ import annotations

import sys

from common.config import build_parser, config_from_args
from common.errors import exit_on_user_error

# The bare name resolves to the 21,841-class ImageNet-22k head; the full tag is the 1k fine-tune.
DEFAULT_MODEL = "tiny_vit_5m_224.dist_in22k_ft_in1k"


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.splitlines()[0], default_model=DEFAULT_MODEL,
                          model_help="any timm model name, with a pretrained tag when --pretrained")
    cfg = config_from_args(parser.parse_args(argv), "timm", DEFAULT_MODEL, "tinyvit")
    from common.trainer import run_training

    return run_training(cfg)


if __name__ == "__main__":
    sys.exit(main())
