"""The device-side training pipeline: the split lives on the device as uint8, and each batch gets per-sample
RandAugment-equivalent ops, RandomResizedCrop and flip with batched tensor ops (no per-image Python).

Colour ops run at 32x32. RandAugment's geometric ops (shear, translate, rotate), the crop and the flip are
composed into one affine map per sample and applied by one grid_sample at 32x32; then a single bilinear
upsample makes the img_size input (upsampling dominates the cost, so it happens once, last). Op list and magnitude ranges follow torchvision's RandAugment;
it runs on the CPU too (it is just tensor ops), which is how the tests exercise it."""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from .data import TrainStream, epoch_order, normalize_batch

# torchvision RandAugment's 14 ops, in its order. Signed ops get a random sign (p = 0.5).
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
       "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
GEOMETRIC = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
NUM_BINS = 31  # torchvision's magnitude bins: value = max * magnitude / 30


def op_strength(op: str, magnitude: int, size: int = 32) -> float:
    """The op's parameter at `magnitude`, as torchvision's RandAugment._augmentation_space computes it."""
    frac = magnitude / (NUM_BINS - 1)
    return {"ShearX": 0.3 * frac, "ShearY": 0.3 * frac, "TranslateX": 150.0 / 331.0 * size * frac,
            "TranslateY": 150.0 / 331.0 * size * frac, "Rotate": 30.0 * frac, "Brightness": 0.9 * frac,
            "Color": 0.9 * frac, "Contrast": 0.9 * frac, "Sharpness": 0.9 * frac,
            "Posterize": float(8 - int(round(magnitude / ((NUM_BINS - 1) / 4)))),
            "Solarize": 1.0 - frac}.get(op, 0.0)


def sample_crop_params(n: int, size: int, scale: tuple[float, float], gen: torch.Generator,
                       device: torch.device, ratio=(3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """(n, 4) integer crops (top, left, height, width) drawn as torchvision's RandomResizedCrop.get_params:
    up to `attempts` tries of area x aspect ratio, first fit kept, else the whole image."""
    area = size * size
    target = area * torch.empty(n, attempts, device=device).uniform_(scale[0], scale[1], generator=gen)
    log_r = torch.empty(n, attempts, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    r = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * r))
    h = torch.round(torch.sqrt(target / r))
    ok = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=device))
    pick = first.clamp(min=0).unsqueeze(1)
    w = torch.where(first >= 0, w.gather(1, pick).squeeze(1), torch.full((n,), float(size), device=device))
    h = torch.where(first >= 0, h.gather(1, pick).squeeze(1), torch.full((n,), float(size), device=device))
    u = torch.rand(n, 2, device=device, generator=gen)
    top = torch.floor(u[:, 0] * (size - h + 1))
    left = torch.floor(u[:, 1] * (size - w + 1))
    return torch.stack([top, left, h, w], 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp_(0, 1)


def _sharpness_blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device, dtype=x.dtype) / 13
    blurred = F.conv2d(x.reshape(-1, 1, *x.shape[-2:]), k.view(1, 1, 3, 3)).view(x.shape[0], 3, x.shape[2] - 2, -1)
    out = x.clone()
    out[..., 1:-1, 1:-1] = blurred  # the border stays, as in torchvision
    return out


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 1.0 / (hi - lo), torch.ones_like(hi))
    lo = torch.where(hi > lo, lo, torch.zeros_like(lo))
    return ((x - lo) * scale).clamp_(0, 1)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel histogram equalisation (PIL's / torchvision's formula), batched."""
    b, c, h, w = x.shape
    v = (x * 255).round().long().view(b * c, h * w)
    hist = torch.zeros(b * c, 256, device=x.device).scatter_add_(1, v, torch.ones_like(v, dtype=torch.float))
    last = hist.gather(1, (255 - torch.flip(hist, [1]).ne(0).float().argmax(1, keepdim=True)))
    step = torch.div(hist.sum(1, keepdim=True) - last, 255, rounding_mode="floor")
    lut = torch.div(torch.cumsum(hist, 1) + torch.div(step, 2, rounding_mode="floor"), step.clamp(min=1),
                    rounding_mode="floor")
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], 1).clamp_(0, 255)
    out = lut.gather(1, v)
    out = torch.where(step > 0, out, v.float())
    return (out / 255).view(b, c, h, w)


def colour_op(op: str, x: torch.Tensor, strength: float, sign: torch.Tensor) -> torch.Tensor:
    """One colour op on a float batch in [0, 1]; `sign` (+-1 per sample) for the signed ops."""
    factor = 1.0 + strength * sign
    if op == "Brightness":
        return _blend(x, torch.zeros_like(x), factor)
    if op == "Color":
        return _blend(x, _gray(x).expand_as(x), factor)
    if op == "Contrast":
        return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), factor)
    if op == "Sharpness":
        return _blend(x, _sharpness_blur(x), factor)
    if op == "Posterize":
        mask = -(1 << (8 - int(strength)))  # keep the top `strength` bits
        return (((x * 255).round().to(torch.int32) & mask).float() / 255)
    if op == "Solarize":
        return torch.where(x >= strength, 1.0 - x, x)
    if op == "AutoContrast":
        return _autocontrast(x)
    if op == "Equalize":
        return _equalize(x)
    return x


def geometric_inverse(op: str, strength: float, sign: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 3, 3) maps from output to input coordinates (normalised, [-1, 1]) of one geometric op."""
    n = sign.shape[0]
    m = torch.eye(3, device=sign.device).repeat(n, 1, 1)
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
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)
    return m


class BatchAugment:
    """RandAugment(num_ops, magnitude) + RandomResizedCrop(img_size, scale) + flip + normalise, per sample."""

    def __init__(self, img_size: int, crop_scale_min: float, num_ops: int, magnitude: int):
        self.img_size, self.scale = img_size, (crop_scale_min, 1.0)
        self.num_ops, self.magnitude = num_ops, magnitude

    def sample(self, n: int, gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        """All random choices for n images: op indices and signs per round, crops, flips."""
        return {"ops": torch.randint(len(OPS), (self.num_ops, n), device=device, generator=gen),
                "signs": torch.where(torch.rand(self.num_ops, n, device=device, generator=gen) < 0.5, -1.0, 1.0),
                "crops": sample_crop_params(n, 32, self.scale, gen, device),
                "flips": torch.rand(n, device=device, generator=gen) < 0.5}

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """uint8 (n, 3, 32, 32) on any device -> normalised float (n, 3, img_size, img_size)."""
        return self.upsample(self.augment_small(images, gen))

    def augment_small(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """All random ops at 32x32: uint8 (n, 3, 32, 32) -> normalised float (n, 3, 32, 32)."""
        n, device = images.shape[0], images.device
        p = self.sample(n, gen, device)
        x = images.float().div_(255)
        inverse = torch.eye(3, device=device).repeat(n, 1, 1)
        for r in range(self.num_ops):
            for k, op in enumerate(OPS):
                chosen = p["ops"][r] == k
                if op == "Identity":
                    continue
                strength = op_strength(op, self.magnitude, 32)
                if op in GEOMETRIC:
                    m = geometric_inverse(op, strength, p["signs"][r], 32)
                    inverse = torch.where(chosen.view(-1, 1, 1), inverse @ m, inverse)
                else:
                    x = torch.where(chosen.view(-1, 1, 1, 1), colour_op(op, x, strength, p["signs"][r]), x)
        top, left, h, w = p["crops"].unbind(1)
        flip = torch.where(p["flips"], -1.0, 1.0)
        crop = torch.zeros(n, 3, 3, device=device)
        crop[:, 0, 0] = w / 32 * flip
        crop[:, 0, 2] = (2 * left + w) / 32 - 1
        crop[:, 1, 1] = h / 32
        crop[:, 1, 2] = (2 * top + h) / 32 - 1
        crop[:, 2, 2] = 1
        theta = (inverse @ crop)[:, :2]
        # Sample at 32x32 (black fill outside) and normalise there: normalising is per-channel affine and
        # commutes with the bilinear upsample, so it costs a 32x32 pass, not an img_size one.
        grid = F.affine_grid(theta, [n, 3, 32, 32], align_corners=False)
        return normalize_batch(F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False))

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        """The single upsample to img_size, done per batch (it dominates the cost and the memory)."""
        if self.img_size == x.shape[-1]:
            return x
        return F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)


class GpuTrainStream(TrainStream):
    """Training batches gathered and augmented on the device; the whole split stays resident as uint8.

    The 32x32 stage runs on CHUNK batches at once (a few hundred small kernels per call, so per-call
    overhead, not arithmetic, sets its speed); each chunk draws from a generator seeded by (seed, epoch,
    chunk), so a run resumed mid-epoch augments exactly as an uninterrupted one."""

    name = "gpu"
    CHUNK = 8

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg, device: torch.device,
                 rank: int = 0, world: int = 1):
        super().__init__(len(images), cfg, device, rank, world)
        self.images = images.to(device, non_blocking=True).contiguous()
        self.labels = labels.to(device, non_blocking=True)
        self.augment = BatchAugment(cfg.img_size, cfg.crop_scale_min, cfg.randaug_ops, cfg.randaug_magnitude)
        self.gen = torch.Generator(device=device)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(self.n, self.seed, epoch, self.rank, self.world).to(self.device)
        b, steps = self.local_batch, len(self)
        for chunk in range(start_step // self.CHUNK, (steps + self.CHUNK - 1) // self.CHUNK):
            first, last = chunk * self.CHUNK, min(steps, (chunk + 1) * self.CHUNK)
            self.gen.manual_seed(((self.seed * 1_000_003 + epoch) * 7919 + chunk) * 31 + self.rank)
            idx = order[first * b:last * b]
            small = self.augment.augment_small(self.images[idx], self.gen)
            labels = self.labels[idx]
            for step in range(max(first, start_step), last):
                j = (step - first) * b
                yield self.augment.upsample(small[j:j + b]), labels[j:j + b]
