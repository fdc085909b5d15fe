"""How much GPU memory one training process needs, part by part, and the micro-batch that fits.

The parts: the weights, the gradients, AdamW's two moments, the training split kept on the device
(device pipeline), a training step's saved activations and the backward's working memory (per image
of the micro-batch), the device augmentation's working set (per image of a chunk) and what a chunk
holds while it is trained on, and an evaluation batch. The per-image parts are measured by running
the step, the augmentation and the evaluation once on fake tensors (FakeTensorMode: exact shapes and
dtypes, no arithmetic) and adding up the bytes of the tensors alive at each moment: a simulated
allocator, not a guess. It matches the peaks measured on the CPU within a few percent (design.md;
`python check.py --memory` prints the parts, the choice for each card size and that check). On a
GPU, cuDNN's workspaces and the caching allocator's rounding come on top: only HEADROOM and
SAFETY of the free memory are planned for, and an out-of-memory error in the first epoch halves
the micro-batch once (common/trainer.py)."""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

GiB = 2**30
SAFETY = 0.85        # of the free memory, the share a run plans to use ...
HEADROOM = 256 * 2**20  # ... after this much for cuDNN workspaces and allocator rounding


# ----------------------------------------------------------------------------- the simulation

class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Inside a FakeTensorMode: the bytes of every storage an op creates, until that storage dies;
    `peak` is the most alive at once (what the CUDA allocator's max_memory_allocated would count,
    without its rounding)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key in self._seen:  # a view, or an in-place result
                    continue
                self._seen.add(key)
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, storage.nbytes(), key)
        return out

    def _free(self, nbytes: int, key: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)


def simulate(fn: Callable[[], object]) -> int:
    """The peak bytes that `fn` allocates (beyond what exists before), run on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        counter = _LiveBytes()
        with counter:
            result = fn()
        del result
    return counter.peak


def measured_cpu_peak(fn: Callable[[], object]) -> int:
    """The peak bytes that `fn` allocates on the CPU for real, from the profiler's memory events
    (what the simulation is checked against)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage),
                    key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def _autocast(dtype: torch.dtype | None):
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    # CPU autocast casts the same ops (convolutions, matmuls) to the same 2-byte width as CUDA's
    return torch.autocast("cpu", dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- the parts

@dataclass(frozen=True)
class Costs:
    """Bytes of one training process on its GPU, by part."""

    weights: int          # fp32 parameters and buffers
    grads: int            # fp32 gradients (alive between steps)
    optimizer: int        # AdamW's two moments (SGD: one)
    data: int             # the training split kept on the device as uint8 (device pipeline)
    eval_data: int        # the larger evaluation set's images and labels, copied per evaluation
    train_fixed: int      # a step's allocations that do not grow with its batch (gradients, casts)
    train_per_image: int  # saved activations and the backward's working memory, per image
    held_per_image: int   # what the stream holds per image of a chunk while it is trained on
    aug_per_image: int    # the device augmentation's peak per image of a chunk (its output included)
    eval_fixed: int
    eval_per_image: int

    def train_bytes(self, micro: int, chunk_images: int) -> int:
        """The peak of training: a step on `micro` images while its chunk is held, or the next
        chunk's augmentation while the last batch is held (one after the other, never together)."""
        step = self.train_fixed + micro * self.train_per_image + chunk_images * self.held_per_image
        augment = self.grads + chunk_images * self.aug_per_image + micro * self.held_per_image
        return self.weights + self.optimizer + self.data + max(step, augment)

    def eval_bytes(self, batch: int) -> int:
        return (self.weights + self.optimizer + self.grads + self.data + self.eval_data
                + self.eval_fixed + batch * self.eval_per_image)

    def parts_gb(self, micro: int, chunk_images: int, eval_batch: int) -> dict[str, float]:
        """The parts at one choice, in GiB (check.py --memory prints them)."""
        return {k: v / GiB for k, v in {
            "weights": self.weights, "gradients": self.grads, "optimizer state": self.optimizer,
            "training split on the device": self.data,
            f"training step, micro-batch {micro}": self.train_fixed + micro * self.train_per_image,
            f"augmentation, chunk of {chunk_images} images": chunk_images * self.aug_per_image,
            f"evaluation batch {eval_batch}": self.eval_fixed + eval_batch * self.eval_per_image,
            "peak (training)": self.train_bytes(micro, chunk_images),
            "peak (evaluation)": self.eval_bytes(eval_batch)}.items()}


def measure_costs(model: nn.Module, img_size: int, train_dtype: torch.dtype | None,
                  eval_dtype: torch.dtype | None, recipe, device_pipeline: bool, n_train: int,
                  n_eval: int, optimizer: str = "adamw") -> Costs:
    """The parts for `model` (any device: a CPU copy is simulated) at `img_size`."""
    from .models import unwrap_model

    target = unwrap_model(model)
    key = (type(target).__name__, sum(p.numel() for p in target.parameters()),
           tuple(p.shape[0] for p in target.parameters())[:8], img_size, str(train_dtype),
           str(eval_dtype), repr(recipe), device_pipeline)
    per = _per_image(key, target, img_size, train_dtype, eval_dtype, recipe, device_pipeline)
    params = sum(p.numel() * p.element_size() for p in target.parameters())
    buffers = sum(b.numel() * b.element_size() for b in target.buffers())
    trainable = sum(p.numel() * 4 for p in target.parameters() if p.requires_grad)
    return Costs(weights=params + buffers, grads=trainable,
                 optimizer=trainable * (2 if optimizer == "adamw" else 1),
                 data=n_train * (3 * 32 * 32 + 8) if device_pipeline else 0,
                 eval_data=n_eval * (3 * 32 * 32 + 8 + 40), **per)


_SIMULATED: dict[tuple, dict[str, int]] = {}  # per process: a sweep simulates each model once


def _per_image(key, model, img_size, train_dtype, eval_dtype, recipe, device_pipeline) -> dict:
    if key not in _SIMULATED:
        _SIMULATED[key] = _simulate_parts(model, img_size, train_dtype, eval_dtype, recipe,
                                          device_pipeline)
    return _SIMULATED[key]


def _simulate_parts(model, img_size, train_dtype, eval_dtype, recipe,
                    device_pipeline) -> dict[str, int]:
    from .data.augment import EvalTransform

    probe = copy.deepcopy(model).cpu()

    def train(m: int) -> int:
        probe.train()
        x = torch.randn(m, 3, img_size, img_size).contiguous(memory_format=torch.channels_last)

        def step():
            with _autocast(train_dtype):
                logits = probe(x)
                loss = nn.functional.cross_entropy(logits, torch.zeros(m, dtype=torch.long))
            loss.backward()
        peak = simulate(step)
        probe.zero_grad(set_to_none=True)
        return peak

    evaluate_transform = EvalTransform(recipe, img_size)

    def evaluate(b: int) -> int:
        probe.eval()
        images = torch.zeros(b, 3, 32, 32, dtype=torch.uint8)

        def forward():
            with torch.no_grad(), _autocast(eval_dtype):
                return torch.softmax(probe(evaluate_transform(images)).float(), 1)
        return simulate(forward)

    # two sizes give the line (2 and 4: BatchNorm refuses one image whose last map is 1 x 1)
    t2, t4 = train(2), train(4)
    e2, e4 = evaluate(2), evaluate(4)
    held = 3 * img_size * img_size * 4  # one float32 image at the output size
    aug = 0
    if device_pipeline:
        from .data.device_ops import make_device_augment

        augment = make_device_augment(recipe, img_size)
        n = 64
        peaks = []
        for seed in (0, 1):  # the ops are random: the larger of two draws
            plan = augment.sample(n, torch.Generator().manual_seed(seed))
            images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
            peaks.append(simulate(lambda: augment.apply(images, plan)))
        aug = -(-max(peaks) // n)
        if recipe.family != "timm":  # the light recipe holds 32 px chunks, upsampled per batch
            held = 3 * 32 * 32 * 4
    train_per_image, eval_per_image = max(1, -(-(t4 - t2) // 2)), max(1, -(-(e4 - e2) // 2))
    return {"train_fixed": max(0, t2 - 2 * train_per_image), "train_per_image": train_per_image,
            "held_per_image": held, "aug_per_image": aug,
            "eval_fixed": max(0, e2 - 2 * eval_per_image), "eval_per_image": eval_per_image}


# ----------------------------------------------------------------------------- the choice

@dataclass(frozen=True)
class MemoryPlan:
    """What a run uses: the micro-batch (per process), the accumulation steps, the augmentation
    chunk (in micro-batches), the evaluation batch, and why."""

    micro_batch: int
    accum_steps: int
    chunk_batches: int
    eval_batch: int
    free_gb: float | None = None
    total_gb: float | None = None
    need_gb: float | None = None
    fits: bool = True
    reason: str = ""

    def line(self, batch: int) -> str:
        """micro-batch 64 x 2 accumulation steps = 128 per update, ... chosen for 7.6 GiB free"""
        text = (f"micro-batch {self.micro_batch} x {self.accum_steps} accumulation step"
                f"{'s' if self.accum_steps != 1 else ''} = {batch} per update")
        if self.free_gb is not None:
            text += (f", augmentation chunks of {self.chunk_batches} micro-batches, evaluation "
                     f"batch {self.eval_batch}, {self.reason} {self.free_gb:.1f} GiB free of "
                     f"{self.total_gb:.1f} GiB (peak about {self.need_gb:.1f} GiB by the memory "
                     "model)")
        elif self.reason:
            text += f" ({self.reason})"
        return text


def usable_bytes(free: int) -> int:
    return int(free * SAFETY) - HEADROOM


def plan_memory(costs: Costs, free: int, total: int, batch_per_rank: int, chunk_batches: int,
                eval_batch: int, fixed_accum: int | None = None) -> MemoryPlan:
    """The fewest accumulation steps (largest micro-batch) whose training peak fits the usable
    share of `free`, shrinking the augmentation chunk before the micro-batch; the largest
    evaluation batch up to `eval_batch` that fits. A fixed --grad-accum-steps is kept even when the
    model says it does not fit (fits=False: the caller says so)."""
    usable = usable_bytes(free)
    steps = ([fixed_accum] if fixed_accum else
             [a for a in range(1, batch_per_rank + 1) if batch_per_rank % a == 0])
    chosen = None
    for accum in steps:
        micro = batch_per_rank // accum
        for chunk in range(chunk_batches, 0, -1):
            if costs.train_bytes(micro, micro * chunk) <= usable:
                chosen = (accum, micro, chunk)
                break
        if chosen:
            break
    fits = chosen is not None
    if chosen is None:
        accum = steps[-1]
        chosen = (accum, batch_per_rank // accum, 1)
    accum, micro, chunk = chosen
    eb = eval_batch
    while eb > 1 and costs.eval_bytes(eb) > usable:
        eb //= 2
    need = max(costs.train_bytes(micro, micro * chunk), costs.eval_bytes(eb))
    return MemoryPlan(micro, accum, chunk, eb, free / GiB, total / GiB, need / GiB,
                      fits and costs.eval_bytes(eb) <= usable,
                      "as --grad-accum-steps says, for" if fixed_accum else "chosen for")


# ----------------------------------------------------------------------------- check.py --memory

CARDS_GB = (8, 12, 16, 24, 40, 80)


def card_table(costs_by_model: dict[str, Costs], batch: int, chunk_batches: int, eval_batch: int,
               cards_gb=CARDS_GB, in_use_gb: float = 0.5) -> list[str]:
    """Markdown rows: the micro-batch x accumulation steps the plan chooses on each card size for
    each model (free = the card less `in_use_gb` for the CUDA context and the display)."""
    names = list(costs_by_model)
    rows = ["| card | " + " | ".join(names) + " |", "|---:|" + "---|" * len(names)]
    for gb in cards_gb:
        total = int(gb * GiB)
        free = total - int(in_use_gb * GiB)
        cells = []
        for costs in costs_by_model.values():
            p = plan_memory(costs, free, total, batch, chunk_batches, eval_batch)
            cells.append(f"{p.micro_batch} x {p.accum_steps}, chunk {p.chunk_batches}, eval "
                         f"{p.eval_batch}: {p.need_gb:.1f} GiB" + ("" if p.fits else " (no fit)"))
        rows.append(f"| {gb} GB | " + " | ".join(cells) + " |")
    return rows


def check_against_cpu(model: nn.Module, img_size: int, micro: int,
                      dtype: torch.dtype | None) -> tuple[int, int]:
    """(simulated, measured) peak bytes of one training step on the CPU: the memory model's check."""
    probe = copy.deepcopy(model).cpu().train()
    x = torch.randn(micro, 3, img_size, img_size).contiguous(memory_format=torch.channels_last)
    y = torch.zeros(micro, dtype=torch.long)

    def step():
        with _autocast(dtype):
            loss = nn.functional.cross_entropy(probe(x), y)
        loss.backward()

    step()  # warm-up: lazy initialisation is not the step
    probe.zero_grad(set_to_none=True)
    simulated = simulate(step)
    probe.zero_grad(set_to_none=True)
    measured = measured_cpu_peak(step)
    probe.zero_grad(set_to_none=True)
    return simulated, measured


def memory_report(img_size: int = 224, batch: int = 128, check_size: int = 64,
                  check_micro: int = 8) -> list[str]:
    """check.py --memory: for each model of the registry at the defaults (reference recipe, device
    pipeline, bf16 training, fp32 evaluation), the parts per image, the choice on each card size,
    and the simulation checked against a real step on this CPU."""
    from .data.augment import resolve_recipe
    from .data.streams import default_chunk
    from .models import create_model
    from .specs import MODELS, resolve_model

    recipe = resolve_recipe("reference")
    costs, lines = {}, []
    for arch, spec in MODELS.items():
        model = create_model(resolve_model(arch, False), img_size, 10)
        c = measure_costs(model, img_size, torch.bfloat16, None, recipe, True, 45_000, 10_000)
        costs[spec.display] = c
        lines.append(f"{spec.display} at {img_size} px: weights {c.weights / 2**20:.0f} MiB, "
                     f"gradients {c.grads / 2**20:.0f}, AdamW state {c.optimizer / 2**20:.0f}, "
                     f"training split {c.data / 2**20:.0f}; per image: training step "
                     f"{c.train_per_image / 2**20:.1f} MiB (+{c.train_fixed / 2**20:.0f} fixed), "
                     f"augmentation {c.aug_per_image / 2**20:.1f}, evaluation "
                     f"{c.eval_per_image / 2**20:.1f}")
    chunk = default_chunk(recipe, img_size)
    lines += ["", f"micro-batch x accumulation steps at --batch-size {batch} (free = card - 0.5 GB; "
              f"planned: {SAFETY:.0%} of free - {HEADROOM // 2**20} MiB):", ""]
    lines += card_table(costs, batch, chunk, max(256, 2 * batch))
    lines += ["", f"the simulation against a real training step on this CPU ({check_size} px, "
              f"micro-batch {check_micro}, bf16 autocast):", ""]
    for arch, spec in MODELS.items():
        model = create_model(resolve_model(arch, False), check_size, 10)
        simulated, measured = check_against_cpu(model, check_size, check_micro, torch.bfloat16)
        lines.append(f"{spec.display}: simulated {simulated / 2**20:.1f} MiB, measured "
                     f"{measured / 2**20:.1f} MiB ({(simulated - measured) / measured:+.1%})")
    return lines
