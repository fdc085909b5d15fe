"""The two augmentation recipes as batched tensor ops, run on the device that holds the images (on
the CPU in the tests). Random choices are drawn on the CPU from a seeded generator, so the same seed
gives the same augmentation on any device, and the device work needs no host sync.

- ReferenceAugment: timm's train transform of the experiment, op for op: RandomResizedCrop (Pillow's
  bicubic, exactly), flip, RandAugment `rand-m9-mstd0.5-inc1` at the output size (Pillow's op
  semantics: uint8 rounding, blend truncation, affine bicubic with the ImageNet-mean fill),
  normalise, RandomErasing.
- LightAugment: the earlier, weaker recipe: torchvision's RandAugment(2, 9) at 32x32 with the
  geometry composed into one affine map, RandomResizedCrop (scale >= 0.25) and flip, one bilinear
  upsample."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..transfer import channel_constant, to_device
from .augment import Recipe, normalize
from .resample import resize_crops

# ----------------------------------------------------------------------------- shared random draws


def sample_crops(n: int, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                 gen: torch.Generator, allow_empty: bool = False,
                 attempts: int = 10) -> torch.Tensor:
    """(n, 4) crops (top, left, height, width) drawn as timm's RandomResizedCropAndInterpolation
    (and torchvision's RandomResizedCrop) do: up to 10 tries of area x aspect ratio, first fit, else
    the image."""
    area = size * size * torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=gen)
    r = torch.exp(torch.empty(n, attempts)
                  .uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen))
    w, h = torch.round(torch.sqrt(area * r)), torch.round(torch.sqrt(area / r))
    ok = (w <= size) & (h <= size) & ((w > 0) & (h > 0) | allow_empty)
    first = torch.where(ok.any(1), ok.float().argmax(1), -1)
    pick = first.clamp(min=0).unsqueeze(1)
    full = torch.full((n,), float(size))
    w = torch.where(first >= 0, w.gather(1, pick).squeeze(1), full)
    h = torch.where(first >= 0, h.gather(1, pick).squeeze(1), full)
    u = torch.rand(n, 2, generator=gen)
    top, left = torch.floor(u[:, 0] * (size - h + 1)), torch.floor(u[:, 1] * (size - w + 1))
    return torch.stack([top, left, h, w], 1).long()


def sample_erasing(n: int, size: int, prob: float, gen: torch.Generator, min_area: float = 0.02,
                   max_area: float = 1 / 3, min_aspect: float = 0.3,
                   attempts: int = 10) -> torch.Tensor:
    """(n, 4) boxes (top, left, height, width) of timm's RandomErasing (one box, re_count=1); height
    0 = none."""
    apply = torch.rand(n, generator=gen) <= prob
    area = size * size * torch.empty(n, attempts).uniform_(min_area, max_area, generator=gen)
    r = torch.exp(torch.empty(n, attempts).uniform_(math.log(min_aspect), -math.log(min_aspect),
                                                    generator=gen))
    h, w = torch.round(torch.sqrt(area * r)), torch.round(torch.sqrt(area / r))
    ok = (w < size) & (h < size)
    first = ok.float().argmax(1, keepdim=True)
    found = ok.any(1) & apply
    h = torch.where(found, h.gather(1, first).squeeze(1), 0.0)
    w = torch.where(found, w.gather(1, first).squeeze(1), 0.0)
    u = torch.rand(n, 2, generator=gen)
    top, left = torch.floor(u[:, 0] * (size - h + 1)), torch.floor(u[:, 1] * (size - w + 1))
    return torch.stack([top, left, h, w], 1).long()


def erase(x: torch.Tensor, boxes: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Fill each image's box with `noise` (timm's 'pixel' mode: per-pixel N(0, 1) in normalised
    units, shaped like x) or with zeros (its 'const' mode: the mean colour); height 0 leaves the
    image alone."""
    size = x.shape[-1]
    top, left, h, w = boxes.to(x.device, non_blocking=True).view(-1, 4, 1).unbind(1)
    pos = torch.arange(size, device=x.device).view(1, -1)
    rows = (pos >= top) & (pos < top + h)
    cols = (pos >= left) & (pos < left + w)
    mask = (rows.unsqueeze(2) & cols.unsqueeze(1)).unsqueeze(1)
    return x.masked_fill(mask, 0.0) if noise is None else torch.where(mask, noise, x)


def noise_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on `device` for the erasing noise, seeded from the chunk's CPU draws (normal
    draws on the device are one kernel; drawing them on the CPU would cost more than the rest of the
    pipeline)."""
    return torch.Generator(device=device).manual_seed(seed)


# ------------------------------------------------------------------------- Pillow's ops on [0, 255]

def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L (ITU-R 601-2, integer arithmetic), (n, 1, H, W)."""
    return torch.floor((19595 * x[:, 0:1] + 38470 * x[:, 1:2] + 7471 * x[:, 2:3] + 32768) / 65536)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, image, factor) as ImageEnhance does: clipped, truncated to uint8."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0, 255).floor_()


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """ImageFilter.SMOOTH (3x3, centre 5, sum 13), rounded; the one-pixel border is copied."""
    # made on the device (a fill and a pad): no copy from the CPU
    centre = torch.full((1, 1), 4 / 13, device=x.device, dtype=x.dtype)
    k = F.pad(centre, (1, 1, 1, 1)) + 1 / 13
    n, c, h, w = x.shape
    inner = F.conv2d(x.reshape(n * c, 1, h, w), k.view(1, 1, 3, 3)).view(n, c, h - 2, w - 2)
    out = x.clone()
    out[..., 1:-1, 1:-1] = (inner + 0.5).floor_().clamp_(0, 255)
    return out


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast per channel: stretch min..max to 0..255 through Pillow's truncated lut
    (built in float64 on 256 entries, then looked up: exact, and no float64 image)."""
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w)
    lo, hi = flat.amin(1, keepdim=True).double(), flat.amax(1, keepdim=True).double()
    scale = 255.0 / (hi - lo).clamp(min=1)
    levels = torch.arange(256, device=x.device, dtype=torch.float64).view(1, 256)
    lut = torch.where(hi > lo, torch.trunc(levels * scale - lo * scale).clamp(0, 255),
                      levels).to(x.dtype)
    return lut.gather(1, flat.long()).view(n, c, h, w)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize per channel (Pillow's lut: step from all but the last non-empty bin)."""
    n, c, h, w = x.shape
    v = x.long().reshape(n * c, h * w)
    hist = (torch.zeros(n * c, 256, device=x.device)
            .scatter_add_(1, v, torch.ones_like(v, dtype=torch.float)))
    last = hist.gather(1, 255 - torch.flip(hist, [1]).ne(0).float().argmax(1, keepdim=True))
    step = torch.div(hist.sum(1, keepdim=True) - last, 255, rounding_mode="floor")
    lut = torch.div(torch.cumsum(hist, 1) + torch.div(step, 2, rounding_mode="floor"),
                    step.clamp(min=1), rounding_mode="floor")
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], 1).clamp_(0, 255)
    out = torch.where(step > 0, lut.gather(1, v), v.float())
    return out.view(n, c, h, w).to(x.dtype)


def _cubic_weights(d: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Weights of the 4 neighbours in Pillow's affine BICUBIC (the a = -1 cubic of Geometry.c)."""
    d2, d3 = d * d, d * d * d
    return -d + 2 * d2 - d3, 1 - 2 * d2 + d3, d + d2 - d3, -d2 + d3


def pil_affine(x: torch.Tensor, mats: torch.Tensor, fill: tuple[float, ...]) -> torch.Tensor:
    """Image.transform(size, AFFINE, (a, b, c, d, e, f), BICUBIC, fillcolor=fill) per image: each
    output pixel centre (x + .5, y + .5) maps to (a x + b y + c, d x + e y + f) in the input;
    outside -> fill. The 16 taps of every output pixel are gathered a row of 4 at a time and
    weighted by the x and y cubic weights (float32 coordinates: exact to 1e-5 px at 224 px); a row
    at a time holds a quarter of the memory that all 16 taps at once did."""
    n, ch, h, w = x.shape
    dev = x.device
    a, b, c, d, e, f = mats.to(dev, torch.float32, non_blocking=True).view(n, 6, 1, 1).unbind(1)
    xs = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w) + 0.5
    ys = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1) + 0.5
    xin, yin = a * xs + b * ys + c, d * xs + e * ys + f                            # (n, h, w)
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    xf, yf = xin - 0.5, yin - 0.5
    x0, y0 = torch.floor(xf), torch.floor(yf)
    taps = torch.arange(-1, 3, device=dev, dtype=torch.float32).view(1, 4, 1, 1)
    cols = (x0.unsqueeze(1) + taps).clamp_(0, w - 1).long()                       # (n, 4, h, w)
    rows = (y0.unsqueeze(1) + taps).clamp_(0, h - 1).long()
    wx = torch.stack(_cubic_weights(xf - x0), 1).unsqueeze(1)                      # (n, 1, 4, h, w)
    wy = torch.stack(_cubic_weights(yf - y0), 1)                                   # (n, 4, h, w)
    flat = x.reshape(n, ch, h * w)
    out = None
    for r in range(4):
        idx = (rows[:, r:r + 1] * w + cols).view(n, 1, 4 * h * w)   # the 4 taps of row r
        row = (flat.gather(2, idx.expand(n, ch, 4 * h * w)).view(n, ch, 4, h, w) * wx).sum(2)
        term = row * wy[:, r:r + 1]
        out = term if out is None else out.add_(term)
    out = out.clamp_(0, 255).floor_()
    return torch.where(inside.unsqueeze(1), out, channel_constant(fill, x))


def _affine_matrix(name: str, level: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 6) Pillow AFFINE data of timm's geometric ops at signed level (degrees, shear, or
    fraction)."""
    n = level.shape[0]
    one, zero = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    level = level.double()
    if name == "Rotate":  # Image.rotate: about the centre, counter-clockwise
        ang = -torch.deg2rad(level)
        cos, sin = torch.cos(ang), torch.sin(ang)
        cx = cy = size / 2.0
        return torch.stack([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos,
                            -sin * -cx + cos * -cy + cy], 1)
    if name == "ShearX":
        return torch.stack([one, level, zero, zero, one, zero], 1)
    if name == "ShearY":
        return torch.stack([one, zero, zero, level, one, zero], 1)
    if name == "TranslateXRel":
        return torch.stack([one, zero, level * size, zero, one, zero], 1)
    return torch.stack([one, zero, zero, zero, one, level * size], 1)  # TranslateYRel


# timm's _RAND_INCREASING_TRANSFORMS, in its order
TIMM_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
            "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
            "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
            "TranslateYRel")
GEOMETRIC_SCALE = {"Rotate": 30.0, "ShearX": 0.3, "ShearY": 0.3, "TranslateXRel": 0.45,
                   "TranslateYRel": 0.45}


def timm_op(name: str, x: torch.Tensor, magnitude: torch.Tensor, sign: torch.Tensor,
            fill: tuple[float, ...]) -> torch.Tensor:
    """One op of timm's increasing RandAugment on [0, 255] images, with its level arithmetic
    (magnitude in [0, 10], sign +-1 for the signed ops), as AugmentOp + the Pillow function would
    compute it."""
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Invert":
        return 255.0 - x
    # the matrices are made on the CPU, where the draws are: no device sync
    if name in GEOMETRIC_SCALE:
        level = magnitude.double().cpu() / 10 * GEOMETRIC_SCALE[name] * sign.double().cpu()
        return pil_affine(x, _affine_matrix(name, level, x.shape[-1]), fill)
    m = magnitude.to(x.device, torch.float64, non_blocking=True)
    s = sign.to(x.device, torch.float64, non_blocking=True)
    view = (lambda t: t.view(-1, 1, 1, 1).to(x.dtype))
    # keep 4 - int(4 m / 10) bits; 0 bits = black, as Pillow < 13 did
    if name == "PosterizeIncreasing":
        shift = 2.0 ** (8 - (4 - torch.trunc(m / 10 * 4)))
        return torch.floor(x / view(shift)) * view(shift)
    if name == "SolarizeIncreasing":
        thresh = 256 - torch.clamp(torch.trunc(m / 10 * 256), max=256)
        return torch.where(x >= view(thresh), 255.0 - x, x)
    if name == "SolarizeAdd":
        add = torch.clamp(torch.trunc(m / 10 * 110), max=128)
        return torch.where(x < 128, (x + view(add)).clamp(max=255), x)
    factor = torch.clamp(1.0 + s * (m / 10 * 0.9), min=0.1).to(x.dtype)
    if name == "ColorIncreasing":
        return _blend(_luma(x).expand_as(x), x, factor)
    if name == "ContrastIncreasing":
        mean = torch.floor(_luma(x).double().mean(dim=(1, 2, 3), keepdim=True) + 0.5).to(x.dtype)
        return _blend(mean.expand_as(x), x, factor)
    if name == "BrightnessIncreasing":
        return _blend(torch.zeros_like(x), x, factor)
    if name == "SharpnessIncreasing":
        return _blend(_smooth(x), x, factor)
    raise ValueError(f"unknown op {name}")


class DeviceAugment:
    """A recipe as batched ops: sample() draws every random choice on the CPU from a seeded
    generator; apply() is the device work on a chunk of batches; finish() the last step, once per
    batch."""

    def __init__(self, recipe: Recipe, img_size: int):
        self.recipe, self.size = recipe, img_size

    def sample(self, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def apply(self, images: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.finish(self.apply(images, self.sample(len(images), gen)))


class ReferenceAugment(DeviceAugment):
    """timm's train transform of the experiment on a batch: uint8 (n, 3, 32, 32) -> normalised
    float.

    sample() makes every data-dependent decision on the CPU: the crops and flips, and for each
    RandAugment layer which images take which op (an image takes one op per layer, so the ops
    partition the images and their order within a layer does not matter: the five geometric ops
    become one affine pass), the affine matrices, the erasing boxes. apply() is then device work on
    tensors of known shapes, with no host read."""

    def __init__(self, recipe: Recipe, img_size: int):
        super().__init__(recipe, img_size)
        # timm's img_mean fill
        self.fill = tuple(float(min(255, round(255 * m))) for m in recipe.mean)

    def sample(self, n: int, gen: torch.Generator) -> dict:
        r = self.recipe
        layers = r.ra_ops
        crops = sample_crops(n, 32, r.crop_scale, r.crop_ratio, gen, allow_empty=True)
        flips = torch.rand(n, generator=gen) < r.hflip
        ops = torch.randint(len(TIMM_OPS), (layers, n), generator=gen)
        apply = torch.rand(layers, n, generator=gen) <= r.ra_prob
        magnitude = (r.ra_magnitude + r.ra_std * torch.randn(layers, n, generator=gen)).clamp(0, 10)
        signs = torch.where(torch.rand(layers, n, generator=gen) > 0.5, -1.0, 1.0)
        erase_boxes = sample_erasing(n, self.size, r.re_prob, gen)
        noise_seed = int(torch.randint(2**62, (1,), generator=gen))
        plan = []
        for layer in range(layers):
            geometric_idx, geometric_mats = [], []
            for k, name in enumerate(TIMM_OPS):
                sel = torch.nonzero((ops[layer] == k) & apply[layer]).flatten()
                if not len(sel):
                    continue
                m, s = magnitude[layer][sel], signs[layer][sel]
                if name in GEOMETRIC_SCALE:
                    level = m.double() / 10 * GEOMETRIC_SCALE[name] * s.double()
                    geometric_idx.append(sel)
                    geometric_mats.append(_affine_matrix(name, level, self.size))
                else:
                    plan.append((name, sel, m, s))
            if geometric_idx:
                plan.append(("affine", torch.cat(geometric_idx), torch.cat(geometric_mats), None))
        erased = torch.nonzero(erase_boxes[:, 2] > 0).flatten()
        return {"crops": crops, "flips": flips, "ops": ops, "apply": apply, "magnitude": magnitude,
                "signs": signs, "erase": erase_boxes, "erased": erased,
                "erase_boxes": erase_boxes[erased], "noise_seed": noise_seed, "plan": plan}

    def apply(self, images: torch.Tensor, p: dict) -> torch.Tensor:
        p = to_device(_device_part(p, ("crops", "flips", "plan", "erased", "erase_boxes")),
                      images.device) | {"noise_seed": p["noise_seed"]}
        x = resize_crops(images, p["crops"], self.size, self.recipe.interpolation, flips=p["flips"])
        for name, sel, magnitude, sign in p["plan"]:
            if name == "affine":
                x[sel] = pil_affine(x[sel], magnitude, self.fill)
            else:
                x[sel] = timm_op(name, x[sel], magnitude, sign, self.fill)
        x = normalize(x, self.recipe.mean, self.recipe.std)
        if not len(p["erased"]):
            return x
        sel = p["erased"]  # only the images with a box: a quarter of them
        noise = None
        if self.recipe.re_mode == "pixel":
            g = noise_generator(x.device, p["noise_seed"])
            noise = torch.randn((len(sel), *x.shape[1:]), generator=g, device=x.device,
                                dtype=x.dtype)
        x[sel] = erase(x[sel], p["erase_boxes"], noise)
        return x


def _device_part(p: dict, keys: tuple[str, ...]) -> dict:
    """The draws that apply() needs on the device (the rest of a plan is for inspection)."""
    return {k: p[k] for k in keys}


# ----------------------------------------------------------------------------- the light recipe

# torchvision RandAugment's 14 ops, in its order. Signed ops get a random sign (p = 0.5).
TV_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
          "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
TV_GEOMETRIC = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
TV_BINS = 31  # torchvision's magnitude bins: value = max * magnitude / 30


def tv_op_strength(op: str, magnitude: float, size: int = 32) -> float:
    """The op's parameter at `magnitude`, as torchvision's RandAugment._augmentation_space computes
    it."""
    frac = magnitude / (TV_BINS - 1)
    return {"ShearX": 0.3 * frac, "ShearY": 0.3 * frac, "TranslateX": 150.0 / 331.0 * size * frac,
            "TranslateY": 150.0 / 331.0 * size * frac, "Rotate": 30.0 * frac, "Brightness": 0.9
            * frac, "Color": 0.9 * frac, "Contrast": 0.9 * frac, "Sharpness": 0.9 * frac,
            "Posterize": float(8 - int(round(magnitude / ((TV_BINS - 1) / 4)))),
            "Solarize": 1.0 - frac}.get(op, 0.0)


def _tv_gray(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _tv_blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp_(0, 1)


def tv_colour_op(op: str, x: torch.Tensor, strength: float, sign: torch.Tensor) -> torch.Tensor:
    """One torchvision colour op on a float batch in [0, 1]; `sign` (+-1 per sample) for the signed
    ops."""
    factor = 1.0 + strength * sign.to(x.device)
    if op == "Brightness":
        return _tv_blend(x, torch.zeros_like(x), factor)
    if op == "Color":
        return _tv_blend(x, _tv_gray(x).expand_as(x), factor)
    if op == "Contrast":
        return _tv_blend(x, _tv_gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), factor)
    if op == "Sharpness":
        return _tv_blend(x, _smooth(x * 255) / 255, factor)
    if op == "Posterize":
        mask = -(1 << (8 - int(strength)))  # keep the top `strength` bits
        return ((x * 255).round().to(torch.int32) & mask).float() / 255
    if op == "Solarize":
        return torch.where(x >= strength, 1.0 - x, x)
    if op == "AutoContrast":
        lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
        scale = torch.where(hi > lo, 1.0 / (hi - lo), torch.ones_like(hi))
        return ((x - torch.where(hi > lo, lo, torch.zeros_like(lo))) * scale).clamp_(0, 1)
    if op == "Equalize":
        return _equalize((x * 255).round()) / 255
    return x


def tv_geometric_inverse(op: str, strength: float, sign: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 3, 3) maps from output to input coordinates (normalised, [-1, 1]) of one geometric op."""
    n = sign.shape[0]
    m = torch.eye(3).repeat(n, 1, 1)
    s = strength * sign
    if op == "ShearX":
        m[:, 0, 1] = -s
    elif op == "ShearY":
        m[:, 1, 0] = -s
    elif op == "TranslateX":
        m[:, 0, 2] = -2 * s / size
    elif op == "TranslateY":
        m[:, 1, 2] = -2 * s / size
    elif op == "Rotate":
        a = torch.deg2rad(s)
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = (torch.cos(a), -torch.sin(a), torch.sin(a),
                                                          torch.cos(a))
    return m


class LightAugment(DeviceAugment):
    """RandAugment(num_ops, magnitude) at 32x32 + RandomResizedCrop + flip + normalise, one
    upsample."""

    def sample(self, n: int, gen: torch.Generator) -> dict:
        """The draws, and what they decide: the colour op of each image per layer (the selections),
        and the one affine map per image that composes its geometric ops with its crop and flip
        (computed here, on the CPU)."""
        r = self.recipe
        ops = torch.randint(len(TV_OPS), (r.ra_ops, n), generator=gen)
        signs = torch.where(torch.rand(r.ra_ops, n, generator=gen) < 0.5, -1.0, 1.0)
        crops = sample_crops(n, 32, r.crop_scale, r.crop_ratio, gen)
        flips = torch.rand(n, generator=gen) < r.hflip
        inverse = torch.eye(3).repeat(n, 1, 1)
        colour = []
        for layer in range(ops.shape[0]):
            for k, op in enumerate(TV_OPS):
                chosen = ops[layer] == k
                if op == "Identity" or not chosen.any():
                    continue
                strength = tv_op_strength(op, r.ra_magnitude, 32)
                if op in TV_GEOMETRIC:
                    m = tv_geometric_inverse(op, strength, signs[layer], 32)
                    inverse = torch.where(chosen.view(-1, 1, 1), inverse @ m, inverse)
                else:
                    sel = torch.nonzero(chosen).flatten()
                    colour.append((op, sel, strength, signs[layer][sel]))
        top, left, h, w = crops.float().unbind(1)
        flip = torch.where(flips, -1.0, 1.0)
        crop = torch.zeros(n, 3, 3)
        crop[:, 0, 0], crop[:, 0, 2] = w / 32 * flip, (2 * left + w) / 32 - 1
        crop[:, 1, 1], crop[:, 1, 2] = h / 32, (2 * top + h) / 32 - 1
        crop[:, 2, 2] = 1
        return {"ops": ops, "signs": signs, "crops": crops, "flips": flips, "colour": colour,
                "theta": (inverse @ crop)[:, :2].contiguous()}

    def apply(self, images: torch.Tensor, p: dict) -> torch.Tensor:
        """All random ops at 32x32: uint8 (n, 3, 32, 32) -> normalised float (n, 3, 32, 32); see
        finish()."""
        n = images.shape[0]
        p = to_device(_device_part(p, ("colour", "theta")), images.device)
        x = images.float().div_(255)
        for op, sel, strength, sign in p["colour"]:
            x[sel] = tv_colour_op(op, x[sel], strength, sign)
        theta = p["theta"]
        # sample at 32x32 (black fill outside) and normalise there: normalising is per-channel
        # affine and commutes with the bilinear upsample, so it costs a 32x32 pass, not an img_size
        # one
        grid = F.affine_grid(theta, [n, 3, 32, 32], align_corners=False)
        return normalize(F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                                       align_corners=False) * 255,
                         self.recipe.mean, self.recipe.std)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The single upsample to img_size, per batch (it dominates the cost and the memory)."""
        if self.size == x.shape[-1]:
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


def make_device_augment(recipe: Recipe, img_size: int) -> DeviceAugment:
    """The batched augmentation of `recipe` (see the module docstring)."""
    return (ReferenceAugment if recipe.family == "timm" else LightAugment)(recipe, img_size)
