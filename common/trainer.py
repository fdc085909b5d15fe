"""One training run from a TrainConfig. The loop reads like the experiment: for each epoch, train,
validate, log, save; then test the checkpoint chosen on validation. Everything around it (folder checks,
resume decisions, data, model) is prepared first, by prepare()."""
from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed as D
from . import runfolder as RF
from .checkpoint import atomic_write, load_checkpoint, restore_rng, save_checkpoint, write_json
from .config import TrainConfig, identity_differences
from .data.augment import EvalTransform, resolve_recipe
from .data.sources import NUM_CLASSES, open_source
from .data.splits import Splits, make_splits
from .data.streams import TrainStream, make_train_stream
from .engine import (EpochSums, GracefulStop, TrainStep, build_loss_and_mixup, build_optimizer, build_scheduler,
                     evaluate, make_scaler, resolve_amp, resolve_device, seed_everything, train_one_epoch)
from .errors import UserError
from .faults import failpoint
from .models import build_model, count_parameters, flops_per_image, freeze_backbone, unwrap_model
from .progress import Progress
from .provenance import environment
from .specs import resolve_model
from .state import RunState, load_model_state


@dataclass
class Context:
    """What the epoch loop needs, prepared once."""

    cfg: TrainConfig
    dist: D.DistInfo
    device: torch.device
    out: Path
    splits: Splits
    stream: TrainStream
    eval_tf: EvalTransform
    state: RunState
    step_fn: TrainStep
    amp_dtype: Any
    record: dict[str, Any]
    log: RF.MetricsLog | None
    eval_batch: int
    test_only: bool = False


def run_training(cfg: TrainConfig) -> int:
    """Train, validate, checkpoint and test one model; returns the process exit code."""
    dist = D.init_distributed("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    lock = RF.RunLock(Path(cfg.output_dir))
    try:
        with D.together(dist):
            device = resolve_device(cfg.device, dist.local_rank)
            if cfg.batch_size % dist.world:
                raise UserError(f"--batch-size {cfg.batch_size} is the global batch: it must divide by the "
                                f"{dist.world} processes")
            ckpt = open_run_folder(cfg, lock, dist.is_main)
        return _run(cfg, dist, device, ckpt)
    finally:
        lock.release()
        D.cleanup(dist)


def _run(cfg: TrainConfig, dist: D.DistInfo, device: torch.device, ckpt: dict | None) -> int:
    if ckpt is not None and _already_finished(cfg, ckpt, dist):
        return 0
    ctx = prepare(cfg, dist, device, ckpt)
    try:
        with GracefulStop(announce=dist.is_main, echo_s=2.0 if dist.enabled else 0.0) as stop:
            if not ctx.test_only:
                for epoch in range(ctx.state.epoch, cfg.epochs):
                    result = train_epoch(ctx, epoch, stop)
                    if result.stopped:
                        return save_interrupted(ctx, epoch, result, stop)
                    val = evaluate(ctx.state.model, ctx.splits.val_x, ctx.splits.val_y, ctx.eval_tf, ctx.eval_batch,
                                   device, ctx.amp_dtype, cfg.channels_last, dist)
                    action = log_and_save(ctx, epoch, result, val)
                    if action == "pause":
                        return 0
                    if action == "early":
                        break
            return test_and_summarise(ctx, stop)
    finally:
        if ctx.log is not None:
            ctx.log.close()


# ----------------------------------------------------------------------------- the run folder

def open_run_folder(cfg: TrainConfig, lock: RF.RunLock, is_main: bool) -> dict | None:
    """Check the folder (writable, not in use, nothing clobbered) and return the checkpoint to resume, if any.
    The main process takes the lock and removes temp files that an interrupted write left behind."""
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"  # one per process: torchrun ranks run this together
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--output-dir {out} is not writable ({e.strerror or e}); choose another folder") from None
    if is_main:
        took_over = lock.acquire()
        if took_over:
            RF.say(f"{out}: {took_over}")
        removed = RF.remove_stale_temp(out)
        if removed:
            RF.say(f"{out}: removed {len(removed)} temp file(s) of an interrupted write ({', '.join(removed)})")
    existing = [n for n in RF.RUN_FILES if (out / n).exists()]
    last = out / RF.LAST
    if cfg.resume:  # job scripts pass --resume every time: a folder with nothing to continue starts the run
        if last.is_file():
            return load_checkpoint(last)
        if is_main and existing:  # killed before the first checkpoint: nothing to continue, so start over
            RF.say(f"{out} has no checkpoint yet (it stopped before epoch 1 was saved): starting it from epoch 1")
            _clear(out)
        elif is_main:
            RF.say(f"--resume: nothing to resume in {out}; starting a new run")
        return None
    if existing and not cfg.overwrite:
        raise UserError(f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                        f"--output-dir for a new run, or --overwrite to replace it")
    if existing and is_main:
        _clear(out)
    return None


def _clear(out: Path) -> None:
    for n in RF.RUN_FILES:
        (out / n).unlink(missing_ok=True)
    for f in out.glob("events.out.tfevents.*"):
        f.unlink()


def _already_finished(cfg: TrainConfig, ckpt: dict, dist: D.DistInfo) -> bool:
    """Decide what a --resume of a stopped or finished run does when --epochs is unchanged, larger or smaller.
    True when there is nothing to do."""
    out = Path(cfg.output_dir)
    done, planned = ckpt["epoch"], ckpt["config"].get("epochs")
    if cfg.epochs < done or (cfg.epochs == done and ckpt["step"]):
        raise UserError(f"--epochs {cfg.epochs} is below the {done} epochs {out / RF.LAST} has trained; resume "
                        f"with --epochs {done} to end the run there (it then runs the test), or more to continue")
    if ckpt.get("finished") and cfg.epochs > planned:
        raise UserError(f"{out} finished its {planned}-epoch cosine schedule (the lr is 0): more epochs would not "
                        f"train. Start a new run with --epochs {cfg.epochs} in another --output-dir")
    if ckpt.get("finished") and (out / RF.SUMMARY).is_file():
        if dist.is_main:
            print(f"{out} is finished ({done}/{planned} epochs, best val acc {ckpt['best']['acc']:.4f}, test "
                  f"result in {RF.SUMMARY}); nothing to resume")
        return True
    return False


# ----------------------------------------------------------------------------- preparation

def prepare(cfg: TrainConfig, dist: D.DistInfo, device: torch.device, ckpt: dict | None) -> Context:
    """Data, model, optimiser, the state to start from, and the run record (config.json)."""
    out = Path(cfg.output_dir)
    if ckpt is not None:  # the flags first, before data and model are loaded; the resolved record below
        diffs = identity_differences(ckpt["config"], cfg.to_dict(), resolved=False)
        if diffs:
            raise UserError(f"--resume refused, {out / RF.LAST} was trained with other settings: " + "; ".join(diffs)
                            + ". Use the original flags, or a new --output-dir")
    if cfg.num_workers < 0:
        cfg.num_workers = min(8, os.cpu_count() or 1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)
    recipe = resolve_recipe(cfg.aug, cfg.crop_scale_min, cfg.randaug_ops, cfg.randaug_magnitude, cfg.re_prob,
                            cfg.eval_crop)
    choice = resolve_model(cfg.model, cfg.pretrained)
    source, splits, model, weights = load_data_and_model(cfg, dist, choice, ckpt)
    if cfg.freeze_backbone:
        freeze_backbone(model)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = resolve_amp(cfg.amp, cfg.amp_dtype, device)
    pipeline = cfg.data_pipeline if cfg.data_pipeline != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    stream = make_train_stream(pipeline, splits.train_x, splits.train_y, recipe, cfg.img_size, cfg.batch_size,
                               cfg.seed, cfg.num_workers, device, dist.rank, dist.world)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.head_lr_mult, device)
    scheduler = build_scheduler(optimizer, cfg.epochs, cfg.warmup_epochs, len(stream))
    state = RunState(model, optimizer, scheduler, make_scaler(amp_dtype, device))
    eval_tf = EvalTransform(recipe, cfg.img_size)
    record = _record(cfg, choice, weights, source, splits, recipe, eval_tf, model, stream, dist, device, amp_dtype, ckpt)
    if ckpt is not None:
        diffs = identity_differences(ckpt["config"], record)
        if diffs:
            raise UserError(f"--resume refused, {out / RF.LAST} was trained with other settings: " + "; ".join(diffs)
                            + ". Use the original flags, or a new --output-dir")
        state.restore(ckpt, str(out / RF.LAST))
        _retarget_schedule(cfg, ckpt, state, len(stream))
    log = _open_log(out, record, state, ckpt, dist, stream)
    loss_fn, mixup = build_loss_and_mixup(cfg.label_smoothing, cfg.mixup, cfg.cutmix, NUM_CLASSES)
    train_model = torch.compile(model) if cfg.compile else model
    if dist.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    step_fn = TrainStep(train_model, optimizer, scheduler, state.scaler, loss_fn, mixup, amp_dtype, cfg.grad_clip,
                        cfg.channels_last, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if ckpt is not None and state.step:  # mid-epoch: continue the interrupted random streams, last of all
        restore_rng(ckpt["rng"])
    test_only = ckpt is not None and (state.finished or state.epoch >= cfg.epochs)
    if test_only and not state.finished and dist.is_main:  # --epochs lowered to the epochs done: end the run here
        state.finished = True
        save_checkpoint(out / RF.LAST, state.full_checkpoint(record))
    return Context(cfg, dist, device, out, splits, stream, eval_tf, state, step_fn, amp_dtype, record, log,
                   max(256, cfg.batch_size // dist.world * 2), test_only)


def load_data_and_model(cfg: TrainConfig, dist: D.DistInfo, choice, ckpt: dict | None):
    """(source, splits, model, weights record). Rank 0 reads or downloads the data and the weights first; the
    other ranks then use its copies (inside D.together, so a failure on rank 0 stops every rank)."""
    for downloader in (True, False):
        with D.together(dist):
            if dist.is_main == downloader:
                source = open_source(cfg.data_dir, dummy=cfg.dummy, download=cfg.download and downloader,
                                     cache_dir=cfg.cache_dir, skip_bad_images=cfg.skip_bad_images, quiet=not downloader)
                splits = make_splits(source, cfg.val_size, cfg.split_seed, cfg.train_subset, cfg.test_subset)
                if len(splits.train_x) < cfg.batch_size:
                    raise UserError(f"--batch-size {cfg.batch_size} is larger than the {len(splits.train_x)} "
                                    f"training images; lower it or raise --train-subset")
                seed_everything(cfg.seed)  # the same init whichever rank downloaded
                if ckpt is None:
                    model, weights = build_model(choice, cfg.img_size, cfg.weights_file, quiet=not downloader)
                else:  # the weights come from last.pt
                    model = build_model(resolve_model(cfg.model, False), cfg.img_size)[0]
                    weights = ckpt["config"]["weights"]
    return source, splits, model, weights


def _record(cfg, choice, weights, source, splits, recipe, eval_tf, model, stream, dist, device, amp_dtype,
            ckpt) -> dict:
    """config.json: the resolved flags and everything needed to judge the run."""
    previous = (ckpt or {}).get("config", {})
    resumed = previous.get("run", {}).get("resumed", []) + ([f"epoch {ckpt['epoch'] + 1} step {ckpt['step']}"]
                                                            if ckpt else [])
    return {**cfg.to_dict(),
            "model_info": {"name": choice.name, "display": choice.display, "arch": choice.arch,
                           "library": choice.library, "params": count_parameters(model),
                           "flops_per_image": flops_per_image(model, cfg.img_size)},
            "weights": weights,
            "recipe": recipe.to_dict(),
            "data": {**source.provenance(), "splits": splits.provenance()},
            "run": {"amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
                    "data_pipeline": stream.name, "world_size": dist.world, "steps_per_epoch": len(stream),
                    "eval_transform": eval_tf.describe(), "resumed": resumed},
            "environment": previous.get("environment") or environment(device),
            "environment_now": environment(device) if ckpt else None}


def _retarget_schedule(cfg: TrainConfig, ckpt: dict, state: RunState, steps_per_epoch: int) -> None:
    """A resumed run with another --epochs: the cosine goes on from where it stands to 0 at the new end."""
    planned = ckpt["config"].get("epochs")
    if planned != cfg.epochs:
        step = state.epoch * steps_per_epoch + state.step
        schedule = state.scheduler.lr_lambdas[0]
        schedule.retarget(step, cfg.epochs * steps_per_epoch)
        RF.say(f"--epochs {cfg.epochs} (was {planned}): the cosine schedule continues from lr "
               f"{cfg.lr * schedule(step):.3g} at epoch {state.epoch + 1} down to 0 at epoch {cfg.epochs}")


def _open_log(out: Path, record: dict, state: RunState, ckpt: dict | None, dist: D.DistInfo,
              stream: TrainStream) -> RF.MetricsLog | None:
    with D.together(dist):  # every rank passes through; rank 0 writes
        if dist.is_main:
            write_json(out / RF.CONFIG, record)
    if not dist.is_main:
        return None
    log = RF.MetricsLog(out)
    for problem in log.reconcile(state.epoch):
        RF.say(f"{out / RF.METRICS}: {problem} (repaired)")
    info, data = record["model_info"], record["data"]
    print(f"{info['name']} ({record['weights'].get('init')}): {info['params'] / 1e6:.2f}M params, "
          f"{info['flops_per_image'] / 1e9:.2f} GFLOPs/img at {record['img_size']}px; {data['splits']['train']} "
          f"train / {data['splits']['val']} val images of {data['name']}; recipe {record['recipe']['name']}; "
          f"{len(stream)} steps/epoch on {stream.device} {record['run']['amp_dtype']}, {stream.name} pipeline "
          f"-> {out}", flush=True)
    if ckpt is not None:
        print(f"resuming {out} at epoch {state.epoch + 1} step {state.step}/{len(stream)}", flush=True)
    return log


# ----------------------------------------------------------------------------- the epoch

@dataclass
class EpochResult:
    sums: EpochSums
    stopped: bool
    train_time: float
    steps_run: int


def train_epoch(ctx: Context, epoch: int, stop: GracefulStop) -> EpochResult:
    start_step = ctx.state.step
    if start_step == 0:
        seed_everything(ctx.cfg.seed * 1000 + epoch)  # augmentation and dropout: a function of the epoch
    # saved partial sums are already summed over ranks: one rank carries them, the others add to 0
    sums = (EpochSums.from_state(ctx.state.partial, ctx.device) if ctx.state.partial and ctx.dist.is_main
            else EpochSums.zeros(ctx.device))
    progress = Progress(len(ctx.stream), f"epoch {epoch + 1}/{ctx.cfg.epochs}", start_step,
                        every_s=ctx.cfg.progress_every or float("inf"), enabled=ctx.dist.is_main)
    t0 = time.perf_counter()
    step, stopped = train_one_epoch(ctx.step_fn, ctx.stream.epoch(epoch, start_step), sums, stop, ctx.dist,
                                    start_step, progress, ctx.cfg.freeze_backbone)
    progress.close()
    for total in (sums.loss, sums.correct, sums.count):
        D.all_reduce_sum(total, ctx.dist)
    ctx.state.step = step
    return EpochResult(sums, stopped, time.perf_counter() - t0, step - start_step)


def save_interrupted(ctx: Context, epoch: int, result: EpochResult, stop: GracefulStop) -> int:
    """Ctrl+C / SIGTERM mid-epoch: a last.pt at this step, and the command that continues."""
    ctx.state.partial = result.sums.state()
    with D.together(ctx.dist):
        if ctx.dist.is_main:
            save_checkpoint(ctx.out / RF.LAST, ctx.state.full_checkpoint(ctx.record))
            resume_hint(ctx.out, ctx.dist.world, f"stopped in epoch {epoch + 1} at step {ctx.state.step}/"
                                                 f"{len(ctx.stream)}")
    return 128 + (stop.signum or 2)


def log_and_save(ctx: Context, epoch: int, result: EpochResult, val: dict) -> str:
    """Write the epoch's row and checkpoints; returns 'go', 'pause' (--stop-after-epoch) or 'early' (--patience)."""
    cfg, state, sums = ctx.cfg, ctx.state, result.sums
    count = max(1.0, float(sums.count))
    row = {"epoch": epoch + 1, "lr": state.scheduler.get_last_lr()[0], "train_loss": float(sums.loss) / count,
           "train_acc": float(sums.correct) / count, "val_loss": val["loss"], "val_acc": val["acc"],
           "epoch_time_s": result.train_time + val["n"] / val["img_per_s"],
           "train_img_per_s": result.steps_run * cfg.batch_size / max(1e-9, result.train_time),
           "val_img_per_s": val["img_per_s"],
           "peak_mem_gb": torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else 0.0}
    improved = state.best.update(val["acc"], epoch + 1)
    early = bool(cfg.patience and state.best.since >= cfg.patience)
    state.epoch, state.step, state.partial = epoch + 1, 0, None
    state.finished = epoch + 1 == cfg.epochs or early
    with D.together(ctx.dist):
        if ctx.dist.is_main:  # order matters for a kill between writes: row, best.pt, last.pt (design.md)
            ctx.log.append(row)
            failpoint(f"epoch:{epoch + 1}")
            if improved:
                save_checkpoint(ctx.out / RF.BEST, state.weights_checkpoint(ctx.record))
            save_checkpoint(ctx.out / RF.LAST, state.full_checkpoint(ctx.record))
    if ctx.dist.is_main:
        print(f"epoch {epoch + 1:3d}/{cfg.epochs}  lr {row['lr']:.2e}  train loss {row['train_loss']:.4f} "
              f"acc {row['train_acc']:.4f}  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
              f"{' *' if improved else '  '}  {row['epoch_time_s']:.1f}s  {row['train_img_per_s']:.0f} img/s",
              flush=True)
    if cfg.stop_after_epoch and epoch + 1 >= cfg.stop_after_epoch and not state.finished:
        if ctx.dist.is_main:
            resume_hint(ctx.out, ctx.dist.world, f"stopped after epoch {epoch + 1} as --stop-after-epoch asked")
        return "pause"
    if early and ctx.dist.is_main:
        print(f"early stop: no better val acc for {cfg.patience} epochs (best {state.best.acc:.4f} at epoch "
              f"{state.best.epoch})", flush=True)
    return "early" if early else "go"


# ----------------------------------------------------------------------------- the test

def test_and_summarise(ctx: Context, stop: GracefulStop) -> int:
    """Test best.pt (chosen on validation) and the final epoch's weights on the test set, once; write the
    per-image predictions and summary.json. An interrupt here loses nothing: --resume runs the test only."""
    cfg, out = ctx.cfg, ctx.out
    if ctx.dist.is_main:
        failpoint("test")
        final = evaluate(ctx.state.model, ctx.splits.test_x, ctx.splits.test_y, ctx.eval_tf, ctx.eval_batch,
                         ctx.device, ctx.amp_dtype, cfg.channels_last, keep_probs=True, stop=stop)
        best_ckpt = load_checkpoint(out / RF.BEST, map_location=ctx.device)
        final_weights = {k: v.clone() for k, v in unwrap_model(ctx.state.model).state_dict().items()}
        load_model_state(ctx.state.model, best_ckpt["model"], str(out / RF.BEST))
        best = None if final is None else evaluate(
            ctx.state.model, ctx.splits.test_x, ctx.splits.test_y, ctx.eval_tf, ctx.eval_batch, ctx.device,
            ctx.amp_dtype, cfg.channels_last, keep_probs=True, stop=stop)
        unwrap_model(ctx.state.model).load_state_dict(final_weights)
    with D.together(ctx.dist):
        if ctx.dist.is_main:
            if best is None:
                resume_hint(out, ctx.dist.world, "stopped during the final test (training is complete and saved)")
                return 128 + (stop.signum or 2)
            failpoint("summary")
            atomic_write(out / RF.PREDICTIONS, RF.prediction_rows(
                torch.from_numpy(ctx.splits.test_idx), ctx.splits.test_y, best["probs"], final["probs"]))
            write_json(out / RF.SUMMARY, _summary(ctx, best, final))
            print(f"test acc of best.pt (epoch {ctx.state.best.epoch}, chosen on validation): {best['acc']:.4f}; "
                  f"of the final epoch: {final['acc']:.4f} -> {out / RF.SUMMARY}", flush=True)
    return 0


def _summary(ctx: Context, best: dict, final: dict) -> dict[str, Any]:
    metrics = RF.read_metrics(ctx.out / RF.METRICS)
    info = ctx.record["model_info"]
    return {"test_acc": best["acc"], "test_loss": best["loss"], "test_acc_final": final["acc"],
            "test_loss_final": final["loss"], "test_images": best["n"], "tested": "best.pt (chosen on validation) "
            "and the final epoch's weights", "best_epoch": ctx.state.best.epoch, "best_val_acc": ctx.state.best.acc,
            "final_val_acc": float(metrics["val_acc"].iloc[-1]), "epochs_run": int(metrics["epoch"].iloc[-1]),
            "epochs_planned": ctx.cfg.epochs, "train_time_s": float(metrics["epoch_time_s"].sum()),
            "params": info["params"], "flops_per_image": info["flops_per_image"],
            "peak_gpu_mem_gb": torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda"
            else None, "val_is_test": ctx.splits.val_is_test}


def resume_hint(out: Path, world: int, why: str) -> None:
    flags = [a for a in sys.argv[1:] if a != "--resume"]
    if "--stop-after-epoch" in flags:
        i = flags.index("--stop-after-epoch")
        del flags[i:i + 2]
    launcher = f"torchrun --nproc_per_node={world}" if world > 1 else "python"
    print(f"{why}; saved in {out}.\ncontinue with: {launcher} {Path(sys.argv[0]).name} {shlex.join(flags)} --resume",
          file=sys.stderr, flush=True)
