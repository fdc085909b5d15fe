"""The GPU memory model (common/memory.py): the simulated peak against a real step on the CPU, the
choice of micro-batch, augmentation chunk and evaluation batch from free memory, and the runs it
gives (tests/test_gpu_ready.py: a mocked small card, out-of-memory retries)."""
from __future__ import annotations

import pytest
import torch

from common import memory as M
from common.data.augment import resolve_recipe
from common.errors import UserError
from common.models import create_model
from common.specs import resolve_model

MiB, GiB = 2**20, 2**30


@pytest.mark.parametrize("img_size,micro,dtype", [(32, 8, None), (64, 4, torch.bfloat16)])
def test_the_simulated_peak_is_the_peak_a_real_step_reaches_on_the_cpu(img_size, micro, dtype):
    """The memory model adds up the tensors alive at each moment of a step run on fake tensors;
    a real step on the CPU, measured by the profiler's memory events, peaks no higher and not far
    below (the CPU kernels reuse some buffers: measured 16-19% below for this 0.4 M-parameter
    model, 1-6% for ResNet-18 and TinyViT-5M, `check.py --memory`)."""
    model = create_model(resolve_model("test_resnet", False), img_size, 10)
    simulated, measured = M.check_against_cpu(model, img_size, micro, dtype)
    assert 0 < measured <= simulated <= 1.3 * measured, (simulated, measured)


def test_the_per_image_parts_grow_with_the_image_and_the_batch():
    model = create_model(resolve_model("test_resnet", False), 32, 10)
    small = M.measure_costs(model, 32, None, None, resolve_recipe("reference"), True, 1000, 500)
    large = M.measure_costs(model, 64, None, None, resolve_recipe("reference"), True, 1000, 500)
    for part in ("train_per_image", "aug_per_image", "eval_per_image", "held_per_image"):
        assert getattr(large, part) > 2 * getattr(small, part), part
    assert small.weights == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert small.optimizer == 2 * small.grads, "AdamW keeps two moments per weight"
    assert small.data == 1000 * (3 * 32 * 32 + 8), "the split on the device, as uint8"
    assert small.train_bytes(64, 256) > small.train_bytes(32, 128)


def _costs(per_image_mib: float, aug_mib: float = 4.0) -> M.Costs:
    """A model whose training step needs `per_image_mib` per image, the rest small."""
    return M.Costs(weights=40 * MiB, grads=40 * MiB, optimizer=80 * MiB, data=130 * MiB,
                   eval_data=30 * MiB, train_fixed=40 * MiB,
                   train_per_image=int(per_image_mib * MiB), held_per_image=int(0.6 * MiB),
                   aug_per_image=int(aug_mib * MiB), eval_fixed=0, eval_per_image=11 * MiB)


def test_the_plan_takes_the_fewest_accumulation_steps_that_fit():
    """An 8 GB card with 7.5 GiB free, 6.1 GiB of it planned: a TinyViT-like 50 MiB per image does
    not fit 128 at once (6.7 GiB) but fits 64 x 2; a ResNet-like 11 MiB fits 128; on a 4 GB card
    TinyViT gets 32 x 4. Every chosen peak is within the planned share."""
    free, total = int(7.5 * GiB), 8 * GiB
    tinyvit = M.plan_memory(_costs(50), free, total, 128, 4, 256)
    assert (tinyvit.micro_batch, tinyvit.accum_steps, tinyvit.fits) == (64, 2, True)
    assert tinyvit.line(128).startswith("micro-batch 64 x 2 accumulation steps = 128 per update")
    assert "chosen for 7.5 GiB free of 8.0 GiB" in tinyvit.line(128)
    resnet = M.plan_memory(_costs(11), free, total, 128, 4, 256)
    assert (resnet.micro_batch, resnet.accum_steps) == (128, 1)
    small = M.plan_memory(_costs(50), int(3.5 * GiB), 4 * GiB, 128, 4, 256)
    assert (small.micro_batch, small.accum_steps) == (32, 4)
    for plan, free_bytes in ((tinyvit, free), (resnet, free), (small, int(3.5 * GiB))):
        assert plan.need_gb * GiB <= M.usable_bytes(free_bytes)


def test_the_augmentation_chunk_shrinks_before_the_micro_batch_and_the_evaluation_halves():
    """An augmentation that needs more than training (300 MiB per image): the chunk goes from 4
    micro-batches down before the micro-batch does; an evaluation batch that does not fit is
    halved until it does."""
    costs = _costs(11, aug_mib=40)
    plan = M.plan_memory(costs, int(7.5 * GiB), 8 * GiB, 128, 4, 256)
    assert plan.micro_batch == 128 and plan.chunk_batches < 4 and plan.fits
    assert costs.train_bytes(128, 128 * 4) > M.usable_bytes(int(7.5 * GiB))
    evals = M.Costs(**{**vars(_costs(11)), "eval_per_image": 40 * MiB})
    plan = M.plan_memory(evals, int(7.5 * GiB), 8 * GiB, 128, 4, 1024)
    assert plan.eval_batch < 1024 and evals.eval_bytes(plan.eval_batch) <= M.usable_bytes(
        int(7.5 * GiB)) < evals.eval_bytes(plan.eval_batch * 2)


def test_a_fixed_accumulation_is_kept_even_where_the_model_says_it_does_not_fit():
    plan = M.plan_memory(_costs(50), int(3.5 * GiB), 4 * GiB, 128, 4, 256, fixed_accum=1)
    assert (plan.micro_batch, plan.accum_steps, plan.fits) == (128, 1, False)
    assert "as --grad-accum-steps says" in plan.line(128)


def test_a_model_that_fits_no_micro_batch_is_one_line_before_anything_runs(monkeypatch):
    from common import trainer
    from common.config import TrainConfig
    from common.data.splits import Splits
    from common.runtime import Runtime

    monkeypatch.setattr(trainer, "gpu_memory", lambda device: (1 * MiB, 8 * GiB))
    cfg = TrainConfig(model="test_resnet", pretrained=False, img_size=32, batch_size=64).validate()
    rt = Runtime(__import__("common.distributed", fromlist=["x"]).DistInfo(), torch.device("cpu"),
                 None, "cpu", 0)
    x = torch.zeros(100, 3, 32, 32, dtype=torch.uint8)
    splits = Splits.__new__(Splits)
    splits.train_x, splits.val_x, splits.test_x = x, x[:10], x[:10]
    model = create_model(resolve_model("test_resnet", False), 32, 10)
    with pytest.raises(UserError, match="does not fit the 0.0 GiB free on this GPU even in "
                                        "micro-batches of 1"):
        trainer.choose_batches(cfg, rt, model, resolve_recipe("reference"), splits, None)
