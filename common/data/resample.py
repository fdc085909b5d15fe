"""Pillow's resize (crop, then resize with a bicubic or bilinear filter) as batched matrix products,
so the device-side pipeline and the batched evaluation resample exactly as timm's PIL transforms do.

Pillow resamples separably: for each output pixel a window of input pixels weighted by the filter
(support 2 for bicubic with a = -0.5, 1 for bilinear), normalised, first horizontally (rounded to
uint8), then vertically (rounded again). Upsampling 32 px to 224 is a (224 x 32) matrix per axis and
per crop."""
from __future__ import annotations

import math

import torch

from ..runtime import full_fp32

SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}


def _filter(x: torch.Tensor, kernel: str) -> torch.Tensor:
    x = x.abs()
    if kernel == "bilinear":
        return (1.0 - x).clamp(min=0.0)
    a = -0.5  # Pillow's bicubic
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resample_weights(out_size: int, start: torch.Tensor, length: torch.Tensor, in_size: int,
                     kernel: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, out_size, in_size) weights mapping input pixels to outputs, for n crops [start, start +
    length) of an axis of `in_size` pixels, as Pillow's precompute_coeffs computes them for the
    cropped image."""
    start = start.to(dtype).view(-1, 1, 1)
    length = length.to(dtype).view(-1, 1, 1)
    scale = length / out_size
    filterscale = scale.clamp(min=1.0)
    support = SUPPORT[kernel] * filterscale
    center = (torch.arange(out_size, dtype=dtype, device=start.device).view(1, -1, 1) + 0.5) * scale
    # crop coordinates
    j = torch.arange(in_size, dtype=dtype, device=start.device).view(1, 1, -1) - start
    lo = torch.trunc(center - support + 0.5).clamp(min=0.0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), length)
    w = _filter((j - center + 0.5) / filterscale, kernel) * ((j >= lo) & (j < hi))
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total == 0, torch.ones_like(total), total)


def _round_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.add(0.5).floor_().clamp_(0.0, 255.0)  # Pillow rounds half up and clips


def resize_crops(images: torch.Tensor, boxes: torch.Tensor, out_size: int, kernel: str,
                 flips: torch.Tensor | None = None) -> torch.Tensor:
    """uint8/float images (n, C, H, W) in [0, 255], crops (n, 4) = (top, left, height, width) ->
    float (n, C, out_size, out_size) in [0, 255], integer-valued: Pillow's
    img.crop(box).resize(size); with `flips` (n,) the flagged images come out mirrored, for free
    (their horizontal weights in reverse order)."""
    top, left, bh, bw = boxes.to(images.device, non_blocking=True).unbind(1)
    wx = resample_weights(out_size, left, bw, images.shape[-1], kernel)        # (n, out, W)
    wy = resample_weights(out_size, top, bh, images.shape[-2], kernel)         # (n, out, H)
    if flips is not None:
        wx = torch.where(flips.to(images.device, non_blocking=True).view(-1, 1, 1), wx.flip(1), wx)
    # float32 products without TF32 (its 10-bit mantissa would move pixels across Pillow's rounding
    # boundaries): exact enough, and far cheaper than float64
    with full_fp32(images.device):
        # horizontal pass, rounded to uint8
        x = _round_uint8(torch.einsum("nchw,now->ncho", images.float(), wx))
        x = _round_uint8(torch.einsum("ncho,nph->ncpo", x, wy))                # vertical pass
    return x.contiguous()


def eval_geometry(img_size: int, crop_pct: float) -> tuple[int, int]:
    """(resize to, centre crop) as timm's eval transform: floor(img_size / crop_pct), then
    img_size."""
    return math.floor(img_size / crop_pct), img_size


def resize_center_crop(images: torch.Tensor, img_size: int, crop_pct: float,
                       kernel: str) -> torch.Tensor:
    """timm's eval transform on a batch: resize the 32 px images to floor(img_size / crop_pct) with
    the recipe's filter, then take the centre img_size crop (torchvision's rounding of the
    offset)."""
    resize_to, crop = eval_geometry(img_size, crop_pct)
    n, _, h, w = images.shape
    dtype = torch.float32
    zero, full = (torch.zeros(1, device=images.device),
                  torch.full((1,), float(w), device=images.device))
    offset = int(round((resize_to - crop) / 2.0))
    # (crop, W)
    wx = resample_weights(resize_to, zero, full, w, kernel, dtype)[0, offset:offset + crop]
    wy = resample_weights(resize_to, zero, torch.full((1,), float(h), device=images.device), h,
                          kernel, dtype)[0, offset:offset + crop]
    with full_fp32(images.device):
        x = _round_uint8(torch.einsum("nchw,ow->ncho", images.to(dtype), wx))
        return _round_uint8(torch.einsum("ncho,ph->ncpo", x, wy)).contiguous()
