"""`python check.py --bench`: images/s of each data path, the model-only ceiling, data-fed training and
eval, for ResNet-18 and TinyViT-5M, timed through the same train_one_epoch / evaluate the scripts use."""
from __future__ import annotations

import itertools
import json
import os
import time

import torch

from .config import TrainConfig
from .data import CpuTrainStream, synthetic_cifar
from .distributed import DistInfo
from .engine import EpochSums, GracefulStop, build_optimizer, build_scheduler, evaluate, resolve_amp, \
    resolve_device, train_one_epoch
from .gpu_data import GpuTrainStream
from .models import build_model

MODELS = (("resnet", "resnet18"), ("timm", "tiny_vit_5m_224.dist_in22k_ft_in1k"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _stream(kind: str, images, labels, cfg, device):
    return (GpuTrainStream if kind == "gpu" else CpuTrainStream)(images, labels, cfg, device)


def bench_data(kind: str, images, labels, cfg, device, steps: int) -> float:
    """Training batches per second of one data path, as images/s (batches delivered on the device)."""
    stream = _stream(kind, images, labels, cfg, device)
    it = stream.epoch(0)
    for _ in range(2):
        next(it)  # warm-up: workers started, kernels loaded
    seconds = _timed(lambda: [b for b in itertools.islice(it, steps)], device)
    return steps * cfg.batch_size / seconds


def bench_train(model, cfg, device, batches, steps: int, amp_dtype) -> float:
    """Training images/s of `model` over `batches` (an iterator of device batches)."""
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, 10_000)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    loss_fn = torch.nn.CrossEntropyLoss()

    def run(n):
        sums = EpochSums.zeros(device)
        train_one_epoch(model, itertools.islice(batches, n), optimizer, scheduler, scaler, loss_fn, None, sums,
                        amp_dtype, 0.0, cfg.channels_last, GracefulStop(), DistInfo())

    run(3)  # warm-up: cudnn autotuning, allocator
    return steps * cfg.batch_size / _timed(lambda: run(steps), device)


def run_benchmarks(device_name: str, img_size: int, batch_size: int, steps: int, as_json: bool,
                   compile_model: bool = False, channels_last: bool = True) -> int:
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    steps = steps or (50 if device.type == "cuda" else 3)
    cfg = TrainConfig(img_size=img_size, batch_size=batch_size, num_workers=min(8, os.cpu_count() or 1),
                      device=device.type, channels_last=channels_last, compile=compile_model)
    amp_dtype = resolve_amp(cfg, device)
    images, labels = synthetic_cifar(max(10_000, batch_size * (steps + 8)), seed=0)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, "
               f"{torch.get_num_threads()} threads)", "img_size": img_size, "batch_size": batch_size,
               "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32", "torch": str(torch.__version__),
               "compile": compile_model, "channels_last": channels_last,
               "data": {}, "models": {}}
    for kind in ("cpu", "gpu"):
        results["data"][kind] = bench_data(kind, images, labels, cfg, device, steps)
    for family, name in MODELS:
        model = build_model(family, name, False, None, img_size).to(device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if compile_model:
            model = torch.compile(model)
        x = torch.randn(batch_size, 3, img_size, img_size, device=device)
        y = torch.randint(0, 10, (batch_size,), device=device)
        row = {"ceiling": bench_train(model, cfg, device, itertools.repeat((x, y)), steps, amp_dtype)}
        for kind in ("cpu", "gpu"):
            stream = _stream(kind, images, labels, cfg, device)
            row[f"fed_{kind}"] = bench_train(model, cfg, device, itertools.chain.from_iterable(
                stream.epoch(e) for e in itertools.count()), steps, amp_dtype)
        ev_n = min(len(images), batch_size * steps * 2)
        evaluate(model, images[:batch_size * 2], labels[:batch_size * 2], img_size, batch_size * 2, device,
                 amp_dtype, cfg.channels_last)
        row["eval"] = evaluate(model, images[:ev_n], labels[:ev_n], img_size, batch_size * 2, device, amp_dtype,
                               cfg.channels_last)["img_per_s"]
        if device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        results["models"][name.split(".")[0]] = row
        del model
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results))
    return 0


def format_table(r: dict) -> str:
    """The markdown table design.md records."""
    lines = [f"device: {r['device']}, torch {r['torch']}, {r['img_size']}px, batch {r['batch_size']}, {r['amp']}, "
             f"compile {r['compile']}, channels_last {r['channels_last']}",
             "", "| data path | batches/s as images/s |", "|---|---:|"]
    lines += [f"| {k} | {v:,.0f} |" for k, v in r["data"].items()]
    lines += ["", "| model | ceiling (synthetic on device) | fed by cpu path | fed by gpu path | gpu-fed / ceiling "
              "| eval |", "|---|---:|---:|---:|---:|---:|"]
    for name, m in r["models"].items():
        lines.append(f"| {name} | {m['ceiling']:,.0f} | {m['fed_cpu']:,.0f} | {m['fed_gpu']:,.0f} | "
                     f"{m['fed_gpu'] / m['ceiling']:.0%} | {m['eval']:,.0f} |")
    return "\n".join(lines)
