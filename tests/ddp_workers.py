"""What each of two gloo processes runs for tests/test_ddp_gloo.py (spawned: this module must be
importable by the child). Each check writes what it saw; the test asserts on it."""
from __future__ import annotations

import json
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

# the default group's timeout in these processes: shorter than rank 0's slow phase below
DEFAULT_TIMEOUT_S = 5.0
SLOW_PHASE_S = 7.0


def _check_slow_phase(info) -> dict:
    """rank0_first: rank 0 takes longer alone than the default group's timeout (a download, the
    decode); the other rank must still be waiting when it is done."""
    from common.trainer import rank0_first

    def fn(downloader: bool) -> str:
        if downloader:
            time.sleep(SLOW_PHASE_S)
        return "done"

    start = time.monotonic()
    return {"result": rank0_first(info, fn), "waited_s": time.monotonic() - start}


def _check_accumulation(info) -> dict:
    """The all-reduces of DDP, counted by a comm hook: per optimizer update with 4 accumulated
    micro-batches, and per plain step."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from common import engine as E

    counts = {}
    for accum in (1, 4):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        calls = []

        def hook(state, bucket, calls=calls):
            calls.append(bucket.index())
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, hook)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = E.build_scheduler(opt, 1, 0, 10)
        step = E.TrainStep(ddp, opt, sched, None, torch.nn.CrossEntropyLoss(), None, None, 0.0,
                           False, torch.device("cpu"), accum_steps=accum)
        gen = torch.Generator().manual_seed(info.rank)
        for _ in range(8):
            step(torch.randn(4, 8, generator=gen), torch.randint(0, 4, (4,), generator=gen))
        counts[accum] = {"calls": len(calls), "updates": 8 // accum}
    return counts


def _check_rng(info, folder: Path) -> dict:
    """Each rank's RNG after a checkpoint, put back on the same rank by a resume: the draws after
    the resume repeat the draws that followed the checkpoint, on every rank."""
    from common.checkpoint import gather_rng, restore_rng

    torch.manual_seed(100 + info.rank)
    torch.rand(5)  # the ranks' streams now differ
    saved = gather_rng(info, torch.device("cpu"))
    after_checkpoint = torch.rand(3).tolist()
    if info.rank == 0:
        torch.save(saved, folder / "rng.pt")
    dist.barrier()
    loaded = torch.load(folder / "rng.pt", weights_only=True)
    torch.manual_seed(12345)  # a fresh process's state
    restore_rng(loaded, torch.device("cpu"), info.rank)
    return {"after_checkpoint": after_checkpoint, "after_resume": torch.rand(3).tolist(),
            "ranks_saved": len(loaded.get("ranks", []))}


def _check_memory_agreement(info) -> dict:
    """Each rank plans from its own free memory (mocked: rank 1's card is small) and all take the
    smallest micro-batch."""
    from common import memory as M
    from common import trainer
    from common.config import TrainConfig
    from common.data.augment import resolve_recipe
    from common.data.splits import Splits
    from common.models import create_model
    from common.runtime import Runtime
    from common.specs import resolve_model

    recipe = resolve_recipe("reference")
    model = create_model(resolve_model("test_resnet", False), 32, 10)
    costs = M.measure_costs(model, 32, None, None, recipe, True, 1000, 1000)
    small = int((costs.train_bytes(16, 16) + M.HEADROOM) / M.SAFETY) + 1
    assert costs.train_bytes(32, 32) > M.usable_bytes(small)
    free = 8 * 2**30 if info.rank == 0 else small
    trainer.gpu_memory = lambda device: (free, 8 * 2**30)
    cfg = TrainConfig(model="test_resnet", pretrained=False, img_size=32, batch_size=64,
                      num_workers=0).validate()
    rt = Runtime(info, torch.device("cpu"), None, "device", 0)
    x = torch.zeros(1000, 3, 32, 32, dtype=torch.uint8)
    splits = Splits.__new__(Splits)
    splits.train_x, splits.val_x, splits.test_x = x, x[:10], x[:1000]
    plan = trainer.choose_batches(cfg, rt, model, recipe, splits, None)
    return {"micro": plan.micro_batch, "accum": plan.accum_steps, "eval": plan.eval_batch}


def worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    out = Path(folder)
    results: dict = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=DEFAULT_TIMEOUT_S))
        from common.distributed import init_distributed

        info = init_distributed("cpu")  # joins the group made above
        for name, check in (("slow_phase", _check_slow_phase),
                            ("accumulation", _check_accumulation),
                            ("memory", _check_memory_agreement),
                            ("rng", lambda i: _check_rng(i, out))):
            try:
                results[name] = check(info)
            except Exception as e:  # the test reports it as that check's failure
                results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}",
                                 "trace": traceback.format_exc()[-1500:]}
                break
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(results))
        if dist.is_initialized():
            dist.destroy_process_group()
