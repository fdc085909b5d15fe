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
from .errors import UserError
from .engine import EpochSums, GracefulStop, build_optimizer, build_scheduler, evaluate, resolve_amp, \
    resolve_device, train_one_epoch
from .gpu_data import GpuTrainStream
from .models import build_model

# family, model, run-folder prefix, label: the train scripts' defaults
MODELS = (("resnet", "resnet18", "resnet", "ResNet-18"),
          ("timm", "tiny_vit_5m_224.dist_in22k_ft_in1k", "tinyvit", "TinyViT-5M"))


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


def _stepper(model, cfg, device, batches, amp_dtype):
    """run(n): n training steps of `model` over `batches` through the scripts' train_one_epoch."""
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, 10_000)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    loss_fn = torch.nn.CrossEntropyLoss()

    def run(n):
        sums = EpochSums.zeros(device)
        train_one_epoch(model, itertools.islice(batches, n), optimizer, scheduler, scaler, loss_fn, None, sums,
                        amp_dtype, 0.0, cfg.channels_last, GracefulStop(), DistInfo())

    return run


def bench_train(model, cfg, device, batches, steps: int, amp_dtype) -> float:
    """Training images/s of `model` over `batches` (an iterator of device batches)."""
    run = _stepper(model, cfg, device, batches, amp_dtype)
    run(3)  # warm-up: cudnn autotuning, allocator
    return steps * cfg.batch_size / _timed(lambda: run(steps), device)


def _bench_setup(device_name: str, img_size: int, batch_size: int, compile_model: bool, channels_last: bool):
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = TrainConfig(img_size=img_size, batch_size=batch_size, num_workers=min(8, os.cpu_count() or 1),
                      device=device.type, channels_last=channels_last, compile=compile_model)
    return device, cfg, resolve_amp(cfg, device)


def _bench_model(family: str, name: str, cfg: TrainConfig, device: torch.device):
    model = build_model(family, name, False, None, cfg.img_size).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if cfg.compile else model


def count_ops(model, x: torch.Tensor, y: torch.Tensor, amp_dtype, device: torch.device) -> tuple[int, int]:
    """Operators dispatched by one forward and one backward (each a kernel launch or more on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from .engine import autocast

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


def bench_profile(which: str, device_name: str, img_size: int, batch_size: int, steps: int,
                  compile_model: bool = False, channels_last: bool = True, rows: int = 25) -> int:
    """Where a training step's time goes: the operators (CPU) or kernels (GPU) with the most self time over
    `steps` steps of synthetic on-device batches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    device, cfg, amp_dtype = _bench_setup(device_name, img_size, batch_size, compile_model, channels_last)
    family, name, *_ = next(m for m in MODELS if m[1].startswith(which))
    model = _bench_model(family, name, cfg, device)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    run = _stepper(model, cfg, device, itertools.repeat((x, y)), amp_dtype)
    steps = steps or (20 if device.type == "cuda" else 2)
    run(3)
    fwd, bwd = count_ops(model, x, y, amp_dtype, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds = _timed(lambda: run(steps), device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{name} on {device}, {img_size}px, batch {batch_size}, "
          f"{str(amp_dtype).replace('torch.', '') if amp_dtype else 'fp32'}, compile {compile_model}, "
          f"channels_last {channels_last}: {steps} steps in {seconds:.2f} s "
          f"({steps * batch_size / seconds:,.0f} img/s under the profiler); aten ops per step: "
          f"{fwd} forward, {bwd} backward")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))
    return 0


def run_benchmarks(device_name: str, img_size: int, batch_size: int, steps: int, as_json: bool,
                   compile_model: bool = False, channels_last: bool = True) -> int:
    device, cfg, amp_dtype = _bench_setup(device_name, img_size, batch_size, compile_model, channels_last)
    steps = steps or (50 if device.type == "cuda" else 3)
    images, labels = synthetic_cifar(max(10_000, batch_size * (steps + 8)), seed=0)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, "
               f"{torch.get_num_threads()} threads)", "img_size": img_size, "batch_size": batch_size,
               "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32", "torch": str(torch.__version__),
               "compile": compile_model, "channels_last": channels_last,
               "data": {}, "models": {}}
    for kind in ("cpu", "gpu"):
        results["data"][kind] = bench_data(kind, images, labels, cfg, device, steps)
    for family, name, *_ in MODELS:
        model = _bench_model(family, name, cfg, device)
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


def bench_suite(epochs: int, device_name: str, flags: str, as_json: bool) -> int:
    """Time `epochs` real epochs of each model through run_training (CIFAR-sized synthetic data, --dummy)
    and project the four-run suite at the default --epochs from the measured epoch times. Pretrained and
    scratch runs do the same compute, so each model is timed once (from scratch: no download) and counted twice."""
    import contextlib
    import shlex
    import sys
    import tempfile
    from pathlib import Path

    import pandas as pd

    from .config import build_parser, config_from_args
    from .trainer import run_training

    full_epochs = TrainConfig().epochs
    results: dict = {"timed_epochs": epochs, "full_epochs": full_epochs, "flags": flags, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench_suite_") as tmp:
        for family, model, prefix, label in MODELS:
            argv = [*shlex.split(flags), "--no-pretrained", "--dummy", "--epochs", str(epochs),
                    "--device", device_name, "--output-dir", str(Path(tmp) / prefix)]
            parser = build_parser("bench", model, "")
            parser.error = _flags_error
            cfg = config_from_args(parser.parse_args(argv), family, model, prefix)
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # the epoch lines are progress; stdout is the result
                code = run_training(cfg)
            wall = time.perf_counter() - start
            if code != 0:
                return code
            out = Path(cfg.output_dir)
            m = pd.read_csv(out / "metrics.csv")
            summary = json.loads((out / "summary.json").read_text())
            epoch_s = m["epoch_time_s"].tolist()
            later = float(pd.Series(epoch_s[1:]).median()) if len(epoch_s) > 1 else epoch_s[0]
            setup_s = wall - summary["total_time_s"]  # data and model set-up before epoch 1
            test_s = summary["total_time_s"] - sum(epoch_s)
            results["device"] = cfg.extra.get("device_name") or cfg.extra.get("device")
            results["runs"][label] = {
                "first_epoch_s": epoch_s[0], "later_epoch_s": later,
                "train_img_per_s": float(m["train_img_per_s"].iloc[-1]),
                "val_img_per_s": float(m["val_img_per_s"].iloc[-1]),
                "peak_mem_gb": float(m["peak_mem_gb"].max()), "setup_s": setup_s, "test_s": test_s,
                "train_images": cfg.extra["train_images"], "batch_size": cfg.batch_size, "img_size": cfg.img_size,
                "projected_run_s": setup_s + epoch_s[0] + (full_epochs - 1) * later + test_s}
    results["projected_suite_s"] = 2 * sum(r["projected_run_s"] for r in results["runs"].values())
    print(json.dumps(results, indent=2) if as_json else format_suite(results))
    return 0


def _flags_error(message: str):
    raise UserError(f"--bench-suite-flags: {message} (the flags of python train_resnet_cifar.py --help)")


def format_suite(r: dict) -> str:
    lines = [f"device: {r['device']}; {r['timed_epochs']} timed epoch(s) per model; "
             f"extra flags: {r['flags'] or 'none'}",
             "", "| model | first epoch | later epochs | train img/s | val img/s | peak GB | set-up + test "
             f"| projected {r['full_epochs']}-epoch run |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, x in r["runs"].items():
        lines.append(f"| {name} | {x['first_epoch_s']:.1f} s | {x['later_epoch_s']:.1f} s "
                     f"| {x['train_img_per_s']:,.0f} | {x['val_img_per_s']:,.0f} | {x['peak_mem_gb']:.1f} "
                     f"| {x['setup_s'] + x['test_s']:.1f} s | {x['projected_run_s'] / 60:.1f} min |")
    lines += ["", f"four-run suite (each model pretrained and from scratch, {r['full_epochs']} epochs): "
              f"{r['projected_suite_s'] / 60:.1f} min projected from these epochs"]
    return "\n".join(lines)
