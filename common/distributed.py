"""torchrun support: detected from RANK/WORLD_SIZE; NCCL on CUDA, gloo on CPU; rank 0 alone
writes."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .errors import ReportedByAnotherRank, UserError


# How long the other ranks may wait while rank 0 alone downloads CIFAR-10 and the weights, decodes
# the images or runs the final test: NCCL's own timeout (10 minutes) is too short for a slow
# download, so those waits run on a gloo group of their own with this timeout, and the training
# collectives keep NCCL's
SLOW_WAIT = timedelta(hours=2)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # the gloo group with SLOW_WAIT for rank-0-alone phases (None: one process)
    slow_group: Any = field(default=None, compare=False, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group torchrun set up (no-op for a plain `python script.py`)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    info.slow_group = dist.new_group(backend="gloo", timeout=SLOW_WAIT)
    return info


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (in place); identity in a single process."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def max_over_ranks(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise max over ranks (in place), so every rank takes the same branch; identity
    alone."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


@contextlib.contextmanager
def together(info: DistInfo, slow: bool = False) -> Iterator[None]:
    """Run a block that can raise a UserError on some ranks only (rank 0's download or checkpoint
    write); every rank enters it. If any rank failed, every rank raises: the lowest failed rank its
    own error, the others quietly. So torchrun shows one clear line, and no rank is left waiting in
    a later collective for a peer that has exited (gloo: a crash with a traceback; NCCL: blocked
    until torchrun stops it). The block itself must hold no collective: a rank that failed early
    would skip it. `slow`: rank 0 may take long in it alone (a download, the decode, the final
    test), so the others wait on the gloo group with SLOW_WAIT, not in an NCCL collective."""
    err: UserError | None = None
    try:
        yield
    except UserError as e:
        err = e
    if not info.enabled:
        if err is not None:
            raise err
        return
    group = info.slow_group if slow else None
    device = (torch.device("cuda", info.local_rank) if dist.get_backend(group) == "nccl"
              else torch.device("cpu"))
    failed = torch.zeros(info.world, device=device)
    failed[info.rank] = float(err is not None)
    dist.all_reduce(failed, op=dist.ReduceOp.SUM, group=group)
    ranks = failed.nonzero().flatten().tolist()
    if not ranks:
        return
    if err is not None and info.rank == ranks[0]:
        raise err
    raise ReportedByAnotherRank(f"rank {ranks[0]} failed")


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
