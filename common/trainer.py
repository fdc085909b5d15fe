"""One training run from a TrainConfig: run folder, resume, epochs, checkpoints, summary."""
from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed as D
from .checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint, write_json
from .config import RUN_IDENTITY_KEYS, TrainConfig
from .data import load_splits, make_train_stream
from .engine import (EpochSums, GracefulStop, build_mixup, build_optimizer,
                     build_scheduler, evaluate, resolve_amp, resolve_device, seed_everything, train_one_epoch)
from .errors import UserError
from .models import build_model, count_parameters, flops_per_image, unwrap_model
from .runlog import MetricsLog, environment

RUN_FILES = ("last.pt", "best.pt", "metrics.csv", "summary.json")


class Progress:
    """A tqdm bar per epoch (only on a terminal) with loss, accuracy and images/s."""

    def __init__(self, total: int, initial: int, desc: str, batch: int, enabled: bool):
        self.bar = None
        self.batch, self.start, self.done0 = batch, time.perf_counter(), initial
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def update_stats(self, sums: EpochSums) -> None:
        if self.bar is not None:
            count = max(1.0, float(sums.count))
            rate = (self.bar.n - self.done0) * self.batch / max(1e-9, time.perf_counter() - self.start)
            self.bar.set_postfix(loss=f"{float(sums.loss) / count:.3f}", acc=f"{float(sums.correct) / count:.3f}",
                                 img_s=f"{rate:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def prepare_run_folder(cfg: TrainConfig, is_main: bool = True) -> dict[str, Any] | None:
    """Refuse to clobber an earlier run; with --resume return its last checkpoint (checked to match).
    Every rank checks; only the main one deletes (--overwrite)."""
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"  # one per process: torchrun ranks run this together
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--output-dir {out} is not writable ({e.strerror or e}); choose another folder") from None
    existing = [n for n in RUN_FILES if (out / n).exists()]
    if cfg.resume:
        last = out / "last.pt"
        if not last.is_file():
            raise UserError(f"--resume: {last} does not exist; start the run without --resume")
        ckpt = load_checkpoint(last)
        saved = ckpt["config"]
        diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {getattr(cfg, k)!r} now"
                 for k in RUN_IDENTITY_KEYS if saved.get(k) != getattr(cfg, k)]
        if diffs:
            raise UserError(f"--resume refused, {last} was trained with other settings: " + "; ".join(diffs)
                            + ". Use the original flags, or a new --output-dir")
        return ckpt
    if existing and not cfg.overwrite:
        raise UserError(f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                        f"--output-dir for a new run, or --overwrite to replace it")
    if existing and is_main:
        for n in (*RUN_FILES, "config.json"):
            (out / n).unlink(missing_ok=True)
        for f in out.glob("events.out.tfevents.*"):
            f.unlink()
    return None


def checkpoint_state(model, optimizer, scheduler, scaler, cfg: TrainConfig, epoch: int, step: int,
                     sums: EpochSums | None, best: dict[str, float], finished: bool = False) -> dict[str, Any]:
    """Everything a resume needs, as tensors and plain values (loadable with weights_only=True)."""
    return {"model": unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch, "step": step, "partial": sums.state() if sums is not None else None,
            "best_val_acc": best["acc"], "best_epoch": best["epoch"], "epochs_since_best": best["since"],
            "rng": capture_rng(), "finished": finished,
            "config": cfg.to_dict()}


def run_training(cfg: TrainConfig) -> int:
    """Train, validate, checkpoint and test one model; returns the process exit code."""
    dist = D.init_distributed("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    try:
        return _run(cfg, dist)
    finally:
        D.cleanup(dist)


def _run(cfg: TrainConfig, dist: D.DistInfo) -> int:
    # Under torchrun each step that can fail on some ranks only runs in D.together: all ranks then raise,
    # one of them prints, and none is left waiting for a peer that has exited.
    with D.together(dist):
        device = resolve_device(cfg.device, dist.local_rank)
        if cfg.batch_size % dist.world:
            raise UserError(f"--batch-size {cfg.batch_size} is the global batch: it must divide by the "
                            f"{dist.world} processes")
        ckpt = prepare_run_folder(cfg, dist.is_main)
    if cfg.num_workers < 0:
        cfg.num_workers = min(8, os.cpu_count() or 1)
    out = Path(cfg.output_dir)
    if ckpt is not None and ckpt.get("finished") and (ckpt["epoch"] >= cfg.epochs
                                                      or ckpt["config"].get("epochs") == cfg.epochs):
        if dist.is_main:
            print(f"{out} is finished ({ckpt['epoch']}/{cfg.epochs} epochs, best val acc "
                  f"{ckpt['best_val_acc']:.4f}); nothing to resume. Pass a larger --epochs to extend it.")
        return 0
    seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    for downloader in (True, False):  # rank 0 downloads data and weights first; the others read its copies
        with D.together(dist):
            if dist.is_main == downloader:
                splits = load_splits(cfg.data_dir, cfg.download and downloader, cfg.dummy, cfg.val_size,
                                     cfg.train_subset, cfg.seed, quiet=not downloader, test_subset=cfg.test_subset)
                if len(splits.train_x) < cfg.batch_size:
                    raise UserError(f"--batch-size {cfg.batch_size} is larger than the {len(splits.train_x)} "
                                    f"training images; lower it or raise --train-subset")
                model = build_model(cfg.family, cfg.model, cfg.pretrained and ckpt is None, cfg.weights,
                                    cfg.img_size, quiet=not downloader).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params, flops = count_parameters(model), flops_per_image(model, cfg.img_size)
    amp_dtype = resolve_amp(cfg, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    optimizer = build_optimizer(model, cfg, device)
    stream = make_train_stream(splits, cfg, device, dist.rank, dist.world)
    steps_per_epoch = len(stream)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    best = {"acc": -1.0, "epoch": 0, "since": 0}
    start_epoch, start_step, sums_state = 0, 0, None
    if ckpt is not None:
        unwrap_model(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        best = {"acc": ckpt["best_val_acc"], "epoch": ckpt["best_epoch"], "since": ckpt["epochs_since_best"]}
        start_epoch, start_step, sums_state = ckpt["epoch"], ckpt["step"], ckpt["partial"]
    cfg.extra = {**environment(device), "params": params, "flops_per_image": flops,
                 "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
                 "data_pipeline": stream.name, "world_size": dist.world, "steps_per_epoch": steps_per_epoch,
                 "train_images": len(splits.train_x), "val_images": len(splits.val_x),
                 "test_images": len(splits.test_x), "val_is_test": splits.val_is_test,
                 "resumed_from": f"epoch {start_epoch} step {start_step}" if ckpt is not None else None}
    log = None
    if dist.is_main:
        write_json(out / "config.json", cfg.to_dict())
        log = MetricsLog(out)
        log.truncate_after(start_epoch)
        print(f"{cfg.model} ({'pretrained' if cfg.pretrained else 'scratch'}): {params / 1e6:.2f}M params, "
              f"{flops / 1e9:.2f} GFLOPs/img at {cfg.img_size}px, {len(splits.train_x)} train / "
              f"{len(splits.val_x)} val images, {steps_per_epoch} steps/epoch, {device} "
              f"{cfg.extra['amp_dtype']}, {stream.name} data pipeline -> {out}", flush=True)
    train_model = model
    if cfg.compile:
        train_model = torch.compile(train_model)
    if dist.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = _loss_fn(cfg)
    mixup = build_mixup(cfg)
    eval_bs = max(256, cfg.batch_size // dist.world * 2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_run = time.perf_counter()

    if ckpt is not None and start_step:  # mid-epoch: continue the interrupted random streams, last of all
        restore_rng(ckpt["rng"])
    try:
        with GracefulStop(announce=dist.is_main, echo_s=2.0 if dist.enabled else 0.0) as stop:
            for epoch in range(start_epoch, cfg.epochs):
                if start_step == 0:
                    seed_everything(cfg.seed * 1000 + epoch)  # augmentation and dropout: a function of the epoch
                # saved partial sums are already summed over ranks: one rank carries them, the others add to 0
                sums = (EpochSums.from_state(sums_state, device) if sums_state and dist.is_main
                        else EpochSums.zeros(device))
                progress = Progress(steps_per_epoch, start_step, f"epoch {epoch + 1}/{cfg.epochs}",
                                    cfg.batch_size, dist.is_main)
                t0 = time.perf_counter()
                step, stopped = train_one_epoch(train_model, stream.epoch(epoch, start_step), optimizer, scheduler,
                                                scaler, loss_fn, mixup, sums, amp_dtype, cfg.grad_clip,
                                                cfg.channels_last, stop, dist, start_step, progress)
                progress.close()
                for total in (sums.loss, sums.correct, sums.count):
                    D.all_reduce_sum(total, dist)
                if stopped:
                    with D.together(dist):
                        if dist.is_main:
                            save_checkpoint(out / "last.pt", checkpoint_state(model, optimizer, scheduler, scaler,
                                                                              cfg, epoch, step, sums, best))
                            _print_resume_hint(out, epoch, step, steps_per_epoch, dist.world)
                    return 128 + (stop.signum or 2)
                train_time = time.perf_counter() - t0
                val = evaluate(model, splits.val_x, splits.val_y,  # the raw module: DDP/compile wrap the same weights
                               cfg.img_size, eval_bs, device, amp_dtype, cfg.channels_last, dist)
                count = max(1.0, float(sums.count))
                steps_run = step - start_step
                row = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0],
                       "train_loss": float(sums.loss) / count, "train_acc": float(sums.correct) / count,
                       "val_loss": val["loss"], "val_acc": val["acc"], "epoch_time_s": time.perf_counter() - t0,
                       "train_img_per_s": steps_run * cfg.batch_size / max(1e-9, train_time),
                       "val_img_per_s": val["img_per_s"],
                       "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0}
                improved = val["acc"] > best["acc"]
                best = ({"acc": val["acc"], "epoch": epoch + 1, "since": 0} if improved
                        else {**best, "since": best["since"] + 1})
                early = cfg.patience and best["since"] >= cfg.patience
                finished = epoch + 1 == cfg.epochs or bool(early)
                with D.together(dist):
                    if dist.is_main:
                        _save_epoch(out, log, row, checkpoint_state(model, optimizer, scheduler, scaler, cfg,
                                                                    epoch + 1, 0, None, best, finished), improved)
                if dist.is_main:
                    print(f"epoch {epoch + 1:3d}/{cfg.epochs}  lr {row['lr']:.2e}  train loss {row['train_loss']:.4f} "
                          f"acc {row['train_acc']:.4f}  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
                          f"{' *' if improved else '  '}  {row['epoch_time_s']:.1f}s  "
                          f"{row['train_img_per_s']:.0f} img/s", flush=True)
                start_step, sums_state = 0, None
                if cfg.stop_after_epoch and epoch + 1 >= cfg.stop_after_epoch and not finished:
                    if dist.is_main:
                        _print_resume_hint(out, epoch + 1, 0, steps_per_epoch, dist.world,
                                           f"stopped after epoch {epoch + 1} as --stop-after-epoch asked")
                    return 0
                if early:
                    if dist.is_main:
                        print(f"early stop: no better val acc for {cfg.patience} epochs (best {best['acc']:.4f} "
                              f"at epoch {best['epoch']})", flush=True)
                    break
    finally:
        if log is not None:
            log.close()

    with D.together(dist):  # every rank tests best.pt (written before the last together)
        unwrap_model(model).load_state_dict(load_checkpoint(out / "best.pt", map_location=device)["model"])
    test = evaluate(model, splits.test_x, splits.test_y, cfg.img_size, eval_bs, device, amp_dtype,
                    cfg.channels_last, dist)
    with D.together(dist):
        if dist.is_main:
            summary = {"test_loss": test["loss"], "test_acc": test["acc"], "test_images": test["n"],
                       "best_epoch": best["epoch"], "best_val_acc": best["acc"],
                       "total_time_s": time.perf_counter() - t_run, "params": params, "flops_per_image": flops,
                       "peak_gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30
                       if device.type == "cuda" else None, "val_is_test": splits.val_is_test}
            write_json(out / "summary.json", summary)
            print(f"test acc of best.pt (epoch {best['epoch']}): {summary['test_acc']:.4f}  "
                  f"loss {summary['test_loss']:.4f}  -> {out / 'summary.json'}", flush=True)
    return 0


def _save_epoch(out: Path, log: MetricsLog, row: dict[str, float], state: dict[str, Any], improved: bool) -> None:
    """Order matters for a kill between writes: the row first (a resume drops rows past last.pt),
    best.pt before last.pt (a resume redoes the epoch and rewrites best.pt)."""
    log.append(row)
    if improved:
        save_checkpoint(out / "best.pt", state)
    save_checkpoint(out / "last.pt", state)


def _loss_fn(cfg: TrainConfig):
    if cfg.mixup or cfg.cutmix:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()  # Mixup already applied the label smoothing
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def _print_resume_hint(out: Path, epoch: int, step: int, steps: int, world: int, why: str = "") -> None:
    flags = [a for a in sys.argv[1:] if a != "--resume"]
    if "--stop-after-epoch" in flags:
        i = flags.index("--stop-after-epoch")
        del flags[i:i + 2]
    where = why or f"stopped in epoch {epoch + 1} at step {step}/{steps}"
    launcher = f"torchrun --nproc_per_node={world}" if world > 1 else "python"
    print(f"{where}; saved {out / 'last.pt'}.\ncontinue with: {launcher} {Path(sys.argv[0]).name} "
          f"{shlex.join(flags)} --resume", file=sys.stderr, flush=True)
