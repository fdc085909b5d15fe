"""Copies from the CPU to the GPU that never make the CPU wait for it.

A copy from ordinary (pageable) CPU memory to a CUDA device is staged by the driver and, in practice,
waits for the work already queued on the device: `torch.tensor(values, device="cuda")` or `.to("cuda")`
of a fresh CPU tensor in a hot loop is a hidden host sync. The device pipeline draws its random
choices on the CPU (common/data/device_ops.py), so every chunk has small CPU tensors to send: they go
packed into one buffer, from pinned memory with `non_blocking=True`. PyTorch's pinned-memory
allocator keeps a buffer alive until its copy has run, so nothing here waits."""
from __future__ import annotations

from typing import Any

import torch


def pinned(t: torch.Tensor) -> torch.Tensor:
    """`t` in page-locked memory, where a non-blocking copy to the GPU is truly asynchronous."""
    return t.pin_memory()


def to_device(tree: Any, device: torch.device) -> Any:
    """Every tensor in `tree` (nested dicts, lists and tuples; other leaves are kept) on `device`.
    For a CUDA device the CPU tensors are packed into one pinned buffer of bytes and copied with
    non_blocking=True: one copy, and the CPU goes on at once. On the CPU: `tree` itself."""
    if device.type == "cpu":
        return tree
    leaves: list[torch.Tensor] = []

    def collect(node: Any) -> None:
        if isinstance(node, torch.Tensor):
            if node.device.type == "cpu":
                leaves.append(node)
        elif isinstance(node, dict):
            for v in node.values():
                collect(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                collect(v)

    collect(tree)
    moved: dict[int, torch.Tensor] = {}
    if leaves:
        buffer, spans = pack(leaves)
        # pinned memory is CUDA's (MPS shares memory with the CPU: a plain copy)
        on_device = (pinned(buffer) if device.type == "cuda" else buffer).to(device,
                                                                              non_blocking=True)
        moved = {id(t): v for t, v in zip(leaves, unpack(on_device, leaves, spans))}

    def rebuild(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            return moved.get(id(node), node)
        if isinstance(node, dict):
            return {k: rebuild(v) for k, v in node.items()}
        if isinstance(node, tuple):
            return tuple(rebuild(v) for v in node)
        if isinstance(node, list):
            return [rebuild(v) for v in node]
        return node

    return rebuild(tree)


def pack(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The tensors' bytes in one uint8 buffer, each at an offset aligned to 8 (so that it views back
    as its dtype), and the (offset, length) of each."""
    spans, offset = [], 0
    for t in tensors:
        size = t.numel() * t.element_size()
        spans.append((offset, size))
        offset += -(-size // 8) * 8
    buffer = torch.zeros(max(offset, 8), dtype=torch.uint8)
    for t, (start, size) in zip(tensors, spans):
        if size:
            buffer[start:start + size] = t.contiguous().reshape(-1).view(torch.uint8)
    return buffer, spans


def unpack(buffer: torch.Tensor, like: list[torch.Tensor],
           spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Views of `buffer` (wherever it is) shaped and typed as `like`, at pack()'s spans."""
    return [buffer[start:start + size].view(t.dtype).view(t.shape)
            for t, (start, size) in zip(like, spans)]


def channel_constant(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """A (1, C, 1, 1) tensor of `values` on `like`'s device and dtype, made by fill kernels on the
    device (no copy from the CPU)."""
    return torch.cat([torch.full((1, 1, 1, 1), float(v), device=like.device, dtype=like.dtype)
                      for v in values], 1)
