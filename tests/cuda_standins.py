"""CPU stand-ins for a CUDA GPU, for the tests that check the CUDA-only code without one: fake CUDA
tensors (FakeTensorMode: shapes, dtypes and devices, no data) and a counter of everything that makes
the CPU wait for a GPU."""
from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
CUDA = torch.device("cuda", 0)
# ops whose output shape depends on the data: the CPU must read the GPU to allocate it
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten.unique_dim.default,
                  aten._unique2.default, aten.repeat_interleave.Tensor}


@dataclass
class Event:
    kind: str      # read | pageable copy | pinned copy | data-dependent shape
    op: str
    where: list[str] = field(default_factory=list)   # the repository functions on the stack

    def __str__(self) -> str:
        return f"{self.kind} ({self.op}) in {' <- '.join(self.where[:4]) or '?'}"


def _our_frames() -> list[str]:
    """The functions of this repository on the stack, innermost first."""
    frames = []
    for f in reversed(traceback.extract_stack()):
        if "/common/" in f.filename or f.filename.endswith("_cifar.py"):
            frames.append(f.name)
    return frames


class HostSyncs(TorchDispatchMode):
    """Entered inside a FakeTensorMode, sees every op first and records what would make the CPU
    wait for the GPU: a read of a CUDA value (.item(), float(), bool(), .tolist(), answered with 0
    here), a copy between CPU and CUDA memory (to CUDA from ordinary, pageable memory waits for the
    device's queue; from pinned memory it does not), and ops whose output shape depends on CUDA
    data. `pinned` holds the tensors the test's pin_memory stand-in marked."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []
        self.pinned: list[torch.Tensor] = []

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        """Stands in for Tensor.pin_memory (which needs a driver)."""
        self.pinned.append(t)
        return t

    def _is_pinned(self, t: torch.Tensor) -> bool:
        return any(t is p for p in self.pinned)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_cuda = any(t.device.type == "cuda" for t in tensors)
        if func is aten._local_scalar_dense.default and on_cuda:
            self.events.append(Event("read", "item", _our_frames()))
            return {torch.bool: False}.get(args[0].dtype, 0 if not args[0].is_floating_point()
                                           else 0.0)
        if func in (aten._to_copy.default, aten.copy_.default):
            if func is aten._to_copy.default:
                src, dst = args[0], kwargs.get("device") or args[0].device
            else:
                src, dst = args[1], args[0].device
            dst = torch.device(dst)
            if src.device.type == "cpu" and dst.type == "cuda" and src.numel() > 0:
                kind = "pinned copy" if self._is_pinned(src) else "pageable copy"
                self.events.append(Event(kind, str(func), _our_frames()))
            elif src.device.type == "cuda" and dst.type == "cpu":
                self.events.append(Event("read", "copy to the CPU", _our_frames()))
        if func in DATA_DEPENDENT and on_cuda:
            self.events.append(Event("data-dependent shape", str(func), _our_frames()))
        return func(*args, **kwargs)

    def count(self, kind: str, outside: tuple[str, ...] = ()) -> list[Event]:
        """The events of `kind`, except those inside one of the functions `outside`."""
        return [e for e in self.events if e.kind == kind and not set(outside) & set(e.where)]


@contextlib.contextmanager
def fake_cuda(monkeypatch):
    """FakeTensorMode (device="cuda" tensors without a GPU; a CPU/CUDA mix raises) with a HostSyncs
    counter inside it. The CUDA generator of the erasing noise and pinned memory need a driver:
    CPU stand-ins take their place (neither changes what is copied or read)."""
    from common import transfer
    from common.data import device_ops

    syncs = HostSyncs()
    monkeypatch.setattr(device_ops, "noise_generator",
                        lambda device, seed: torch.Generator().manual_seed(seed))
    monkeypatch.setattr(transfer, "pinned", syncs.pin)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        with syncs:
            yield mode, syncs


def cpu_draws(augment) -> None:
    """Make `augment.sample` run on real CPU tensors inside a fake mode (sample() is CPU work by
    design; the fake mode covers the device work)."""
    real = augment.sample

    def sample(n, gen):
        with unset_fake_temporarily():
            return real(n, gen)

    augment.sample = sample


def fake_cuda_model(arch: str = "test_resnet", img_size: int = 32, num_classes: int = 10):
    """A model built with fake CUDA weights (call inside fake_cuda)."""
    from common.models import create_model
    from common.specs import resolve_model

    with torch.device(CUDA):
        return create_model(resolve_model(arch, False), img_size, num_classes)


def describe(events: list[Event]) -> str:
    return "\n".join(str(e) for e in events[:12]) + ("\n..." if len(events) > 12 else "")


