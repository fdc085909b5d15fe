"""The augmentation recipes, each described once and read by both pipelines: the CPU path builds it
from timm's (or torchvision's) own transforms, the device path from common/data/device_ops.py.

`reference` is the experiment's recipe: timm.data.create_transform(224, is_training=True,
auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel", re_count=1,
interpolation="bicubic") with timm's defaults (scale (0.08, 1), hflip 0.5) for training; resize to
floor(224 / 0.875) = 256 (bicubic) + centre crop 224 for evaluation.
`light` is the weaker recipe this repository used before: torchvision RandAugment(2, 9) at 32x32,
RandomResizedCrop(scale 0.25-1, bilinear), flip, no erasing, full-frame bilinear resize for
evaluation."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..transfer import channel_constant
from .resample import eval_geometry, resize_center_crop

# both pretrained models expect it; scratch runs lose nothing by it
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Recipe:
    """Every parameter of one train + eval transform (all of it goes into config.json)."""

    name: str
    family: str                      # "timm": RandAugment after the crop, at the output size;
                                     # "torchvision": before
    ra_ops: int                      # RandAugment layers per image
    ra_magnitude: float              # timm: of 10 (9 = 90% of each op's range); torchvision: of 30
    ra_std: float                    # timm's magnitude noise (mstd)
    ra_prob: float                   # probability of each chosen op (timm 0.5)
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    # bicubic | bilinear, for the crop, RandAugment's geometry and evaluation
    interpolation: str
    hflip: float
    re_prob: float                   # RandomErasing probability
    re_mode: str                     # pixel: the box is per-pixel N(0, 1) noise (after
                                     # normalising); const: zeros
    eval_crop: float                 # eval: resize to floor(size / eval_crop), centre-crop size;
                                     # 1.0 = full frame
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def randaugment(self) -> str:
        """The RandAugment spec in its library's terms (timm's as the experiment wrote it: n2 is
        timm's default)."""
        if self.family == "timm":
            layers = "" if self.ra_ops == 2 else f"-n{self.ra_ops}"
            return f"rand-m{self.ra_magnitude:g}{layers}-mstd{self.ra_std:g}-inc1"
        return f"torchvision RandAugment(num_ops={self.ra_ops}, magnitude={self.ra_magnitude:g})"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "randaugment": self.randaugment,
                "departures_from_preset": self.departures()}

    def departures(self) -> list[str]:
        """Fields that differ from the preset of this name (flags such as --crop-scale-min)."""
        base = PRESETS[self.name]
        return [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(base, f.name)]


PRESETS = {
    "reference": Recipe("reference", "timm", ra_ops=2, ra_magnitude=9, ra_std=0.5, ra_prob=0.5,
                        crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), interpolation="bicubic",
                        hflip=0.5, re_prob=0.25, re_mode="pixel", eval_crop=0.875),
    "light": Recipe("light", "torchvision", ra_ops=2, ra_magnitude=9, ra_std=0.0, ra_prob=1.0,
                    crop_scale=(0.25, 1.0), crop_ratio=(3 / 4, 4 / 3), interpolation="bilinear",
                    hflip=0.5, re_prob=0.0, re_mode="pixel", eval_crop=1.0),
}


def resolve_recipe(name: str, crop_scale_min: float | None = None, ra_ops: int | None = None,
                   ra_magnitude: float | None = None, re_prob: float | None = None,
                   eval_crop: float | None = None, re_mode: str | None = None) -> Recipe:
    """The preset with any named overrides (None keeps the preset's value)."""
    base = PRESETS[name]
    changes: dict[str, Any] = {}
    if crop_scale_min is not None:
        changes["crop_scale"] = (float(crop_scale_min), 1.0)
    for field, value in (("ra_ops", ra_ops), ("ra_magnitude", ra_magnitude), ("re_prob", re_prob),
                         ("eval_crop", eval_crop), ("re_mode", re_mode)):
        if value is not None:
            changes[field] = type(getattr(base, field))(value)
    return dataclasses.replace(base, **changes)


def recipe_of(cfg: Any) -> Recipe:
    """The recipe a run's config resolves to: --aug's preset with the flags that override it (the
    one place that reads them, for the trainer and the sweep alike)."""
    return resolve_recipe(cfg.aug, cfg.crop_scale_min, cfg.randaug_ops, cfg.randaug_magnitude,
                          cfg.re_prob, cfg.eval_crop, cfg.re_mode)


def recipe_from_dict(d: dict[str, Any]) -> Recipe:
    """A Recipe back from config.json."""
    names = {f.name for f in dataclasses.fields(Recipe)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
    return Recipe(**values)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """[0, 255] -> (x / 255 - mean) / std, per channel, as one multiply-add: x * 1/(255 std) -
    mean/std."""
    # constants made by fills on x's device: a torch.tensor(list, device=cuda) here was a host sync
    scale = channel_constant(tuple(1 / (255.0 * s) for s in std), x)
    shift = channel_constant(tuple(-m / s for m, s in zip(mean, std)), x)
    return torch.addcmul(shift, x, scale)


# ------------------------------------------------------------------------- the CPU (per-image) path

def _posterize_zero_bits_is_black(img, bits_to_keep, **_):
    """timm's PosterizeIncreasing asks for 0 bits when the noisy magnitude reaches 10 (about 1 call
    in 40 of that op). Pillow >= 13 raises on it (ValueError: bits must be between or equal to 1 and
    8); older Pillow returned a black image, which is what the experiment's runs saw: keep that."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size, 0)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform) -> None:
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize_zero_bits_is_black


class FromTensor:
    """Feeds a uint8 (3, H, W) tensor to a PIL-based transform (`transform`: timm's Compose)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        return self.transform(Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy())))


def cpu_train_transform(recipe: Recipe, img_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-image training transform: uint8 (3, 32, 32) tensor -> normalised float (3, S, S)."""
    if recipe.family == "timm":
        from timm.data import create_transform

        tf = create_transform(img_size, is_training=True, auto_augment=recipe.randaugment,
                              re_prob=recipe.re_prob, re_mode=recipe.re_mode, re_count=1,
                              interpolation=recipe.interpolation, scale=recipe.crop_scale,
                              ratio=recipe.crop_ratio, hflip=recipe.hflip, mean=recipe.mean,
                              std=recipe.std)
        _patch_posterize(tf)
        return FromTensor(tf)
    from torchvision.transforms import InterpolationMode, v2

    steps = ([v2.RandAugment(num_ops=recipe.ra_ops, magnitude=int(recipe.ra_magnitude))]
             if recipe.ra_ops else [])
    steps += [v2.RandomResizedCrop(img_size, scale=recipe.crop_scale, ratio=recipe.crop_ratio,
                                   interpolation=InterpolationMode(recipe.interpolation),
                                   antialias=True),
              v2.RandomHorizontalFlip(recipe.hflip), v2.ToDtype(torch.float32, scale=True),
              v2.Normalize(recipe.mean, recipe.std)]
    return v2.Compose(steps)


# -------------------------------------------------------------------------- evaluation (both paths)

class EvalTransform:
    """The eval transform on a batch of uint8 images: timm's Resize + CenterCrop, Pillow-exact, then
    normalise. Identical for validation and test, and for both training pipelines."""

    def __init__(self, recipe: Recipe, img_size: int):
        self.recipe, self.img_size = recipe, img_size
        self.resize_to, self.crop = eval_geometry(img_size, recipe.eval_crop)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_center_crop(images, self.img_size, self.recipe.eval_crop,
                               self.recipe.interpolation)
        return normalize(x, self.recipe.mean, self.recipe.std)

    def describe(self) -> str:
        return (f"resize {self.resize_to} ({self.recipe.interpolation}) + centre crop {self.crop}"
                if self.resize_to != self.crop
                else f"resize {self.crop} ({self.recipe.interpolation})")
