"""The models this repository compares, in one registry that every script reads: what each is
called, where its ImageNet weights come from, and how good those weights are on ImageNet according
to their source.

A `--model` name is `arch` (the registry's default weights when pretrained), `arch.tag` (timm
weights with that tag, e.g. resnet18.a1_in1k) or `tv/arch` (torchvision, IMAGENET1K_V1 weights)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Weights:
    """One set of ImageNet weights and the top-1 accuracy its publisher reports."""

    library: str                 # timm | torchvision
    tag: str                     # timm tag or torchvision enum name
    pretrain_data: str
    imagenet_top1: float | None
    top1_source: str


@dataclass(frozen=True)
class Published:
    """A result of the experiment this repository reproduces, as its author's report gives it: the
    official CIFAR-10 files, 224 px, all 45,000 training images, 5,000 validation images by
    randperm(50000, seed 42), seed 42."""

    final_val_acc: float         # %, the last epoch's validation accuracy (their table's "Val Acc")
    epochs: int                  # how many epochs that run trained
    schedule_epochs: int = 30    # the length of its cosine schedule (the TinyViT fine-tune stopped
                                 # after 21 of 30)
    floor: float = 0.01          # its eta_min / lr: 0.01 in the ResNet script, 0.1 in the TinyViT one


@dataclass(frozen=True)
class ModelSpec:
    """An architecture the comparison uses, with its default and alternative ImageNet weights."""

    arch: str                    # timm (and torchvision) architecture name
    display: str                 # name in figures and tables
    run_prefix: str              # default run folder prefix: runs/<prefix>_<ft|scratch>
    script: str                  # the train script whose default model this is (or that trains it)
    paper: str
    default_tag: str
    weights: tuple[Weights, ...]
    published: dict[str, Published]  # by mode: pretrained | scratch
    params_m: float = 0.0        # million parameters with the 1000-class ImageNet head, as published
    params_source: str = ""
    native_px: int = 224         # the input size its ImageNet weights were trained at
    convolutions: str = ""       # where the architecture convolves (the hybrid question)

    def weights_for(self, library: str, tag: str) -> Weights | None:
        return next((w for w in self.weights if w.library == library and w.tag == tag), None)

    @property
    def default_model(self) -> str:
        return f"{self.arch}.{self.default_tag}"

    def run_folder(self, pretrained: bool) -> str:
        return f"runs/{self.run_prefix}_{'ft' if pretrained else 'scratch'}"

    @property
    def default_weights(self) -> Weights:
        return next(w for w in self.weights if w.library == "timm" and w.tag == self.default_tag)


TIMM_TABLE = "timm results-imagenet.csv"
RESNET18 = ModelSpec(
    "resnet18", "ResNet-18", "resnet", "train_resnet_cifar.py",
    "He et al., Deep Residual Learning for Image Recognition, CVPR 2016",
    default_tag="a1_in1k",  # the weights the experiment's public code fine-tuned
    weights=(
        Weights("timm", "a1_in1k", "ImageNet-1k", 73.16, f"{TIMM_TABLE} (evaluated at 288 px)"),
        Weights("timm", "tv_in1k", "ImageNet-1k", 69.76, TIMM_TABLE),
        Weights("timm", "fb_swsl_ig1b_ft_in1k",
                "Instagram-1B (semi-weakly supervised), then ImageNet-1k", 73.28, TIMM_TABLE),
        Weights("torchvision", "IMAGENET1K_V1", "ImageNet-1k", 69.758,
                "torchvision ResNet18_Weights.IMAGENET1K_V1"),
    ),
    published={"pretrained": Published(95.86, 30), "scratch": Published(83.16, 30)},
    params_m=11.7, params_source="timm (resnet18.a1_in1k model card)",
    convolutions="every layer (a CNN)")
TINYVIT_5M = ModelSpec(
    "tiny_vit_5m_224", "TinyViT-5M", "tinyvit", "train_tinyvit_cifar.py",
    "Wu et al., TinyViT: Fast Pretraining Distillation for Small Vision Transformers, ECCV 2022",
    default_tag="dist_in22k_ft_in1k",
    weights=(
        Weights("timm", "dist_in22k_ft_in1k",
                "ImageNet-22k (distilled from a large teacher), then ImageNet-1k", 80.7,
                "microsoft/Cream TinyViT model zoo"),
        Weights("timm", "in1k", "ImageNet-1k (distilled from a large teacher)", 79.1,
                "microsoft/Cream TinyViT model zoo"),
    ),
    published={"pretrained": Published(98.36, 21, floor=0.1),
               "scratch": Published(88.02, 30, floor=0.1)},
    params_m=5.4, params_source="TinyViT paper, Table 3",
    convolutions="the stem and the whole first stage (MBConv blocks), then windowed attention")
MODELS = {s.arch: s for s in (RESNET18, TINYVIT_5M)}

# The controls (issue: which part of the extra gain is the transformer, which the weights): trained
# by the ViT script with --model NAME and the same recipe, never the experiment's own four runs
DEIT_TINY = ModelSpec(
    "deit_tiny_patch16_224", "DeiT-Ti/16", "deit_tiny", "train_tinyvit_cifar.py",
    "Touvron et al., Training data-efficient image transformers & distillation through attention, "
    "ICML 2021",
    default_tag="fb_in1k",
    weights=(Weights("timm", "fb_in1k", "ImageNet-1k", 72.2, "DeiT paper, Table 1"),),
    published={}, params_m=5.7, params_source="DeiT paper, Table 1",
    convolutions="the patch embedding only (a plain ViT)")
VIT_TINY = ModelSpec(
    "vit_tiny_patch16_224", "ViT-Ti/16", "vit_tiny", "train_tinyvit_cifar.py",
    "Steiner et al., How to train your ViT? Data, Augmentation, and Regularization in Vision "
    "Transformers, TMLR 2022",
    default_tag="augreg_in21k_ft_in1k",
    weights=(Weights("timm", "augreg_in21k_ft_in1k", "ImageNet-21k, then ImageNet-1k", 75.5,
                     "timm results-imagenet.csv"),),
    published={}, params_m=5.7, params_source="timm (vit_tiny_patch16_224 model card)",
    convolutions="the patch embedding only (a plain ViT)")
CONTROL_SPECS = {s.arch: s for s in (DEIT_TINY, VIT_TINY)}
# every architecture with a registry entry: the experiment's two, then the controls
REGISTRY = {**MODELS, **CONTROL_SPECS}
# what run_suite.py --controls adds to the grid (pretrained and scratch of each; the scratch run of
# TinyViT-5M is the experiment's own, so its 1k weights add a pretrained run only)
CONTROLS = ("tiny_vit_5m_224.in1k", "deit_tiny_patch16_224")


def default_run_folders() -> tuple[str, ...]:
    """The four runs of the experiment, as the train scripts name them by default."""
    return tuple(s.run_folder(p) for s in MODELS.values() for p in (True, False))


@dataclass(frozen=True)
class ModelChoice:
    """What a --model name means once resolved: which library builds it, and which weights (if
    pretrained)."""

    library: str                 # timm | torchvision
    arch: str
    tag: str | None              # None = random init (scratch)
    requested: str               # the --model value as given

    @property
    def spec(self) -> ModelSpec | None:
        return REGISTRY.get(self.arch)

    @property
    def display(self) -> str:
        return self.spec.display if self.spec else self.arch

    @property
    def weights_info(self) -> Weights | None:
        if self.tag is None or self.spec is None:
            return None
        return self.spec.weights_for(self.library, self.tag)

    @property
    def name(self) -> str:
        """A name that says the weights actually used: resnet18.a1_in1k, tv/resnet18,
        tiny_vit_5m_224 (scratch)."""
        base = f"tv/{self.arch}" if self.library == "torchvision" else self.arch
        return base if self.tag is None or self.library == "torchvision" else f"{base}.{self.tag}"


def resolve_model(name: str, pretrained: bool) -> ModelChoice:
    """Parse a --model value. Scratch runs drop any tag: the name then says "no pretrained
    weights"."""
    library, rest = ("torchvision", name[3:]) if name.startswith("tv/") else ("timm", name)
    arch, _, tag = rest.partition(".")
    if library == "torchvision":
        tag = "IMAGENET1K_V1"
    elif not tag and pretrained:
        spec = REGISTRY.get(arch)
        tag = spec.default_tag if spec else _timm_default_tag(arch)
    return ModelChoice(library, arch, (tag or None) if pretrained else None, name)


def _timm_default_tag(arch: str) -> str:
    import timm

    cfg = timm.models.get_pretrained_cfg(arch) if timm.is_model(arch) else None
    return (getattr(cfg, "tag", "") or "") if cfg is not None else ""
