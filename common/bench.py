"""`python check.py --bench`: images/s of each data path (both recipes), each model's training
ceiling (input already on the device), training fed by each path, evaluation, and model FLOP
utilisation (MFU) on GPUs whose bf16 peak is known. Timed through the same TrainStep /
train_one_epoch / evaluate the scripts use."""
from __future__ import annotations

import itertools
import logging
import time

import torch

from .data.augment import EvalTransform, resolve_recipe
from .data.sources import synthetic_images
from .data.streams import make_train_stream
from .distributed import DistInfo
from .engine import (EpochSums, Evaluator, GracefulStop, TrainStep, build_optimizer,
                     build_scheduler, train_one_epoch)
from .models import build_model, flops_per_image
from .runtime import (backends, default_workers, dtype_name, make_scaler, resolve_amp,
                      resolve_device)
from .specs import MODELS, resolve_model

log = logging.getLogger(__name__)

# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a substring of the device
# name
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                    "H100": 756.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "RTX 4090": 165.2,
                    "RTX 4080": 97.5, "RTX 4070": 58.3, "RTX 3090": 71.0}
# finishes in about a minute on 2 cores
CPU_DEFAULTS = {"img_size": 64, "batch_size": 16, "steps": 2}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def peak_tflops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "no bf16 peak for CPUs"
    name = torch.cuda.get_device_name(device)
    for key, value in BF16_PEAK_TFLOPS.items():
        if key in name:
            return value, f"{name}: {value:g} TFLOP/s dense bf16 (data sheet)"
    return None, f"{name}: bf16 peak unknown"


def bench_data(pipeline: str, recipe, images, labels, img_size, batch_size, device,
               steps: int) -> float:
    """Training batches per second of one data path, as images/s (batches delivered on the
    device)."""
    stream = make_train_stream(pipeline, images, labels, recipe, img_size, batch_size, 0,
                               default_workers(), device)
    it = itertools.chain.from_iterable(stream.epoch(e) for e in itertools.count())
    # the device path augments `chunk` batches at once: time whole chunks
    chunk = getattr(stream, "chunk", 1)
    steps = -(-steps // chunk) * chunk
    for _ in itertools.islice(it, chunk):  # warm-up: workers started, kernels loaded
        pass
    seconds = _timed(lambda: [b for b in itertools.islice(it, steps)], device)
    return steps * batch_size / seconds


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    """The peak GPU memory since reset_peak (None on the CPU: no allocator statistics there)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def modelled_gb(model, img_size: int, batch_size: int, amp_dtype, recipe, n_images: int) -> float:
    """What the memory model (common/memory.py) predicts for the same phases: training at this
    micro-batch fed by the device pipeline, and an evaluation batch of twice it."""
    from .data.streams import default_chunk
    from .memory import GiB, measure_costs

    costs = measure_costs(model, img_size, amp_dtype, None, recipe, True, n_images, n_images)
    chunk = default_chunk(recipe, img_size)
    return max(costs.train_bytes(batch_size, batch_size * chunk),
               costs.eval_bytes(2 * batch_size)) / GiB


def make_step(model, device, amp_dtype, channels_last: bool) -> TrainStep:
    optimizer = build_optimizer(model, "adamw", 3e-4, 0.05, 0.9, 1.0, device)
    scheduler = build_scheduler(optimizer, 1, 0, 10_000)
    return TrainStep(model, optimizer, scheduler, make_scaler(amp_dtype, device),
                     torch.nn.CrossEntropyLoss(), None, amp_dtype, 0.0, channels_last, device)


def bench_train(step: TrainStep, batches, steps: int, device) -> float:
    """Training images/s over `batches` (an iterator of device batches), after 3 warm-up steps."""
    def run(n):
        train_one_epoch(step, itertools.islice(batches, n), EpochSums.zeros(device), GracefulStop(),
                        DistInfo())

    run(3)
    batch = next(batches)[1].shape[0]
    return steps * batch / _timed(lambda: run(steps), device)


def bench_model(arch: str, img_size: int, device, channels_last: bool, compile_model: bool):
    model = build_model(resolve_model(arch, False), img_size, 10)[0].to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile_model else model


def run_benchmarks(device_name: str, img_size: int | None, batch_size: int | None,
                   steps: int | None, compile_model: bool = False,
                   channels_last: bool = True) -> dict:
    """The measurements as a dict (format_table() turns it into design.md's tables)."""
    device = resolve_device(device_name)
    chosen = []
    if device.type == "cpu":  # CPU-sized defaults, said out loud, unless the user set them
        for name, value in (("img_size", img_size), ("batch_size", batch_size), ("steps", steps)):
            if value is None:
                chosen.append(f"--bench-{name.replace('_', '-')} {CPU_DEFAULTS[name]}")
        img_size, batch_size, steps = (img_size or CPU_DEFAULTS["img_size"],
                                       batch_size or CPU_DEFAULTS["batch_size"],
                                       steps or CPU_DEFAULTS["steps"])
    img_size, batch_size, steps = img_size or 224, batch_size or 128, steps or 50
    with backends(device):  # the numerics a run uses
        amp_dtype = resolve_amp(True, "auto", device)
        peak, peak_note = peak_tflops(device)
        x_np, y_np = synthetic_images(max(2_000, batch_size * (steps + 8)), seed=0)
        images, labels = torch.from_numpy(x_np), torch.from_numpy(y_np)
        import os

        results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                   f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
                   "img_size": img_size, "batch_size": batch_size, "steps": steps,
                   "amp": dtype_name(amp_dtype), "torch": str(torch.__version__),
                   "compile": compile_model, "channels_last": channels_last,
                   "chosen_for_cpu": chosen,
                   "peak": peak_note, "data": {}, "models": {}}
        if chosen:
            log.info(f"CPU: chose {' '.join(chosen)} so that this takes about a minute (224 px at "
                     "batch 128 would take tens of minutes); set them to override")
        for recipe_name in ("reference", "light"):
            recipe = resolve_recipe(recipe_name)
            for pipeline in ("cpu", "device"):
                results["data"][f"{recipe_name}/{pipeline}"] = bench_data(
                    pipeline, recipe, images, labels, img_size, batch_size, device, steps)
        recipe = resolve_recipe("reference")
        for arch, spec in MODELS.items():
            model = bench_model(arch, img_size, device, channels_last, compile_model)
            step = make_step(model, device, amp_dtype, channels_last)
            x = torch.randn(batch_size, 3, img_size, img_size, device=device)
            y = torch.randint(0, 10, (batch_size,), device=device)
            row = {"ceiling": bench_train(step, itertools.repeat((x, y)), steps, device)}
            reset_peak(device)  # the peak of what a run does: training fed, then evaluation
            for pipeline in ("cpu", "device"):
                stream = make_train_stream(pipeline, images, labels, recipe, img_size,
                                           batch_size, 0, default_workers(), device)
                row[f"fed_{pipeline}"] = bench_train(step, itertools.chain.from_iterable(
                    stream.epoch(e) for e in itertools.count()), steps, device)
            # fp32, as a run evaluates by default
            evaluator = Evaluator(EvalTransform(recipe, img_size), batch_size * 2, device, None,
                                  channels_last)
            n_eval = min(len(images), batch_size * steps * 2)
            evaluator(model, images[:batch_size], labels[:batch_size])  # warm-up
            row["eval"] = evaluator(model, images[:n_eval], labels[:n_eval])["img_per_s"]
            train_flops = 3 * flops_per_image(model, img_size)  # forward + backward ~ 3x forward
            row["mfu"] = row["fed_device"] * train_flops / (peak * 1e12) if peak else None
            row["peak_mem_gb"] = peak_gb(device)
            row["modelled_gb"] = (modelled_gb(model, img_size, batch_size, amp_dtype, recipe,
                                              len(images)) if device.type == "cuda" else None)
            results["models"][spec.display] = row
        return results


def format_table(r: dict) -> str:
    """The markdown tables design.md records."""
    lines = [f"device: {r['device']}, torch {r['torch']}, {r['img_size']}px, batch "
             f"{r['batch_size']}, {r['amp']}, compile {r['compile']}, channels_last "
             f"{r['channels_last']}, {r['steps']} timed steps; {r['peak']}",
             "", "| recipe / data path | training batches as images/s |", "|---|---:|"]
    lines += [f"| {k} | {v:,.0f} |" for k, v in r["data"].items()]
    lines += ["", "| model | ceiling (input on device) | fed by cpu path | fed by device path | "
              "device-fed / ceiling | eval | MFU "
              "(device-fed) | peak memory: training fed by both paths, evaluation (memory model) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in r["models"].items():
        mfu = "–" if m["mfu"] is None else f"{m['mfu']:.1%}"
        mem = ("– (CPU)" if m["peak_mem_gb"] is None else f"{m['peak_mem_gb']:.1f} GiB"
               + (f" ({m['modelled_gb']:.1f})" if m.get("modelled_gb") else ""))
        lines.append(f"| {name} | {m['ceiling']:,.0f} | {m['fed_cpu']:,.0f} | "
                     f"{m['fed_device']:,.0f} | {m['fed_device'] / m['ceiling']:.0%} | "
                     f"{m['eval']:,.0f} | {mfu} | {mem} |")
    lines.append("\n(fed paths use the reference recipe; MFU = training FLOP/s, 3x the forward "
                 "FLOPs, over the bf16 peak)")
    return "\n".join(lines)


def count_ops(model, x: torch.Tensor, y: torch.Tensor, amp_dtype,
              device: torch.device) -> tuple[int, int]:
    """Operators dispatched by one forward and one backward (each a kernel launch or more on a
    GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from .runtime import autocast

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    with Count() as c:
        with autocast(device, amp_dtype):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        fwd = c.n
        loss.backward()
    model.zero_grad(set_to_none=True)
    return fwd, c.n - fwd


def bench_profile(arch: str, device_name: str, img_size: int | None, batch_size: int | None,
                  steps: int | None, compile_model: bool = False, channels_last: bool = True,
                  rows: int = 25) -> str:
    """Where a training step's time goes: the operators (CPU) or kernels (GPU) with the most self
    time."""
    from torch.profiler import ProfilerActivity, profile

    device = resolve_device(device_name)
    img_size = img_size or (224 if device.type == "cuda" else CPU_DEFAULTS["img_size"])
    batch_size = batch_size or (128 if device.type == "cuda" else 4)
    steps = steps or (20 if device.type == "cuda" else 1)
    amp_dtype = resolve_amp(True, "auto", device)
    model = bench_model(arch, img_size, device, channels_last, compile_model)
    step = make_step(model, device, amp_dtype, channels_last)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    batches = itertools.repeat((x, y))
    train_one_epoch(step, itertools.islice(batches, 3), EpochSums.zeros(device), GracefulStop(),
                    DistInfo())
    fwd, bwd = count_ops(model, x, y, amp_dtype, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds = _timed(lambda: train_one_epoch(step, itertools.islice(batches, steps),
                                                 EpochSums.zeros(device), GracefulStop(),
                                                 DistInfo()), device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return (f"{arch} on {device}, {img_size}px, batch {batch_size}, {dtype_name(amp_dtype)}, "
            f"compile {compile_model}, channels_last {channels_last}: {steps} steps in "
            f"{seconds:.2f} s ({steps * batch_size / seconds:,.0f} img/s under the profiler); aten "
            f"ops per step: {fwd} "
            f"forward, {bwd} backward\n" + prof.key_averages().table(sort_by=key, row_limit=rows))


def augment_cost(recipe_name: str, img_size: int = 224, batch_size: int = 128,
                 seed: int = 0) -> dict[str, float]:
    """What the device augmentation of one batch dispatches, counted on the CPU: aten ops other than
    views (each one kernel launch or more on a GPU) and the bytes they read and write (a proxy for
    the memory traffic: views move nothing, an indexing op reads the rows it takes, an in-place op
    is not charged the whole tensor it writes into). Only apply() is counted: sample() draws on the
    CPU by design."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from .data.augment import resolve_recipe
    from .data.device_ops import make_device_augment

    def nbytes(tree) -> int:
        flat = tree if isinstance(tree, (list, tuple)) else [tree]
        return sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))

    class Count(TorchDispatchMode):
        ops = 0
        bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func._schema.name
            outs = list(out) if isinstance(out, (list, tuple)) else [out]
            if getattr(func, "is_view", False):  # a view moves no data
                return out
            self.ops += 1
            # reads the rows it takes
            if name in ("aten::index", "aten::index_select", "aten::gather"):
                self.bytes += nbytes(list(args[1:])) + 2 * nbytes(outs)
            elif name.endswith("_"):  # in place (index_put_, clamp_): the target is not read whole
                self.bytes += nbytes(list(args[1:]))
            else:
                self.bytes += nbytes(list(args)) + nbytes(outs)
            return out

    x_np, _ = synthetic_images(batch_size, seed=seed)
    images = torch.from_numpy(x_np)
    aug = make_device_augment(resolve_recipe(recipe_name), img_size)
    plan = aug.sample(batch_size, torch.Generator().manual_seed(seed))
    with Count() as c:
        aug.finish(aug.apply(images, plan))
    return {"ops": c.ops, "MB": c.bytes / 1e6}


def augment_profile(img_size: int | None, batch_size: int | None) -> str:
    """check.py --bench-profile augment: the device augmentation's ops and bytes per batch, both
    recipes."""
    img_size, batch_size = img_size or 224, batch_size or 128
    lines = [f"device augmentation of one batch of {batch_size} at {img_size} px (counted on the "
             "CPU; each op is one kernel launch or more on a GPU)",
             "", "| recipe | aten ops per batch | MB read + written |",
             "|---|---:|---:|"]
    for recipe in ("reference", "light"):
        c = augment_cost(recipe, img_size, batch_size)
        lines.append(f"| {recipe} | {c['ops']:,} | {c['MB']:,.0f} |")
    return "\n".join(lines)
