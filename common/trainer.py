"""One training run from a TrainConfig, top to bottom: open the run folder and decide what a
--resume does; prepare data, model, state and the run record once; then for each epoch train,
validate, log and save; then test the checkpoint chosen on validation, once."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import distributed as D
from . import runfolder as RF
from .checkpoint import capture_rng, gather_rng, load_checkpoint, restore_rng, save_checkpoint
from .config import TrainConfig, identity_differences, strip_flags
from .data.augment import EvalTransform, Recipe, recipe_of
from .data.sources import DataSource, open_source
from .data.splits import Splits, make_splits
from .data.streams import TrainStream, default_chunk, make_train_stream
from .engine import (EpochSums, Evaluator, GracefulStop, TrainStep, build_loss_and_mixup,
                     build_optimizer, build_scheduler, schedule_length, train_one_epoch)
from .errors import LoadError, UserError, WriteError, hint
from .faults import failpoint
from .memory import MemoryPlan, measure_costs, plan_memory
from .files import write_json
from .models import (apply_weights, count_parameters, create_model, flops_per_image,
                     freeze_backbone, starts_at_zero, unwrap_model)
from .progress import Progress, RunClock
from .provenance import environment
from .record import DataInfo, ModelInfo, RunInfo, RunRecord, SplitInfo, Summary, WeightsInfo
from .runtime import (Runtime, backends, dtype_name, make_scaler, resolve_runtime,
                      seed_everything)
from .specs import ModelChoice, resolve_model
from .state import RunState, load_model_state
from .syncs import HotLoopSyncs

log = logging.getLogger(__name__)
WRITE_HINT = "free disk space or choose another --output-dir, then --resume"


@dataclass
class Context:
    """What the epoch loop needs, prepared once."""

    cfg: TrainConfig
    rt: Runtime
    out: Path
    splits: Splits
    stream: TrainStream
    evaluator: Evaluator
    state: RunState
    step_fn: TrainStep
    record: RunRecord
    log: RF.MetricsLog | None
    test_only: bool = False
    plan: MemoryPlan | None = None
    recipe: Recipe | None = None
    retried: bool = False          # the micro-batch was halved after an out-of-memory error
    eval_retried: bool = False     # the evaluation batch was
    syncs: HotLoopSyncs | None = None
    clock: RunClock | None = None


def run_training(cfg: TrainConfig) -> int:
    """Train, validate, checkpoint and test one model; returns the process exit code."""
    on_cuda = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
    dist = D.init_distributed("cuda" if on_cuda else "cpu")
    lock = RF.RunLock(Path(cfg.output_dir))
    created = not Path(cfg.output_dir).exists()
    failed = True
    try:
        with D.together(dist):
            rt = resolve_runtime(cfg, dist)
            if cfg.batch_size % dist.world:
                raise UserError(f"--batch-size {cfg.batch_size} is the global batch: it must "
                                f"divide by the {dist.world} processes")
            if not cfg.drop_last and dist.enabled:
                raise UserError("--no-drop-last works in one process only (under torchrun every "
                                "rank must take the same number of steps): drop it, or run "
                                "without torchrun")
            ckpt = open_run_folder(cfg, lock, dist.is_main)
            done = ckpt is not None and check_resume(cfg, ckpt, is_main=dist.is_main)
        if done:
            failed = False
            return 0
        with backends(rt.device, cfg.deterministic):
            code = train_and_test(prepare(cfg, rt, ckpt))
        failed = False
        return code
    finally:
        lock.release()
        if failed and created and dist.is_main:
            _remove_if_empty(Path(cfg.output_dir))
        D.cleanup(dist)


def _remove_if_empty(out: Path) -> None:
    """A run that failed before writing anything leaves no empty folder behind (it created the
    folder)."""
    try:
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    except OSError:
        pass


def train_and_test(ctx: Context) -> int:
    cfg, state = ctx.cfg, ctx.state
    first = state.epoch
    start = Snapshot.take(ctx) if can_halve(ctx) else None  # for an out-of-memory retry
    try:
        with GracefulStop(announce=ctx.rt.is_main,
                          echo_s=2.0 if ctx.rt.dist.enabled else 0.0) as stop:
            for epoch in range(state.epoch, 0 if ctx.test_only else cfg.epochs):
                result = train_epoch_or_retry(ctx, epoch, stop, start if epoch == first else None)
                if result.stopped:
                    return save_interrupted(ctx, epoch, result, stop)
                start = None  # the snapshot is of no use past the first epoch
                val = evaluate(ctx, ctx.splits.val_x, ctx.splits.val_y,
                               f"validating epoch {epoch + 1}", dist=ctx.rt.dist)
                row = epoch_row(ctx, epoch, result, val)
                improved, early = close_epoch(ctx, epoch, val["acc"])
                # CosineAnnealingLR as the experiment stepped it: after validation
                if cfg.sched_step == "epoch":
                    state.scheduler.step()
                write_epoch(ctx, row, improved)
                if ctx.rt.is_main:
                    log_epoch(cfg, row, improved, early, state, ctx.clock)
                if (cfg.stop_after_epoch and epoch + 1 >= cfg.stop_after_epoch
                        and not state.finished):
                    if ctx.rt.is_main:
                        resume_hint(ctx.out, ctx.rt.dist.world,
                                    f"stopped after epoch {epoch + 1} as "
                                    f"--stop-after-epoch asked")
                    return 0
                if early:
                    break
            if ctx.rt.is_main:
                ctx.syncs.write(ctx.out)
            return test_and_summarise(ctx, stop)
    finally:
        if ctx.log is not None:
            ctx.log.close()


# ---------------------------------------------------------------------- the run folder and --resume

def open_run_folder(cfg: TrainConfig, lock: RF.RunLock, is_main: bool) -> dict | None:
    """Check the folder (writable, not in use, nothing clobbered) and return the checkpoint to
    resume, if any. The main process takes the lock and removes temp files that an interrupted write
    left behind."""
    from .files import writable

    out = Path(cfg.output_dir)
    if not writable(out):
        raise UserError(f"--output-dir {out} is not writable; choose another folder")
    if is_main:
        with hint(RF.FolderInUse, "or use another --output-dir"):
            took_over = lock.acquire()
        if took_over:
            log.info(f"{out}: {took_over}")
        removed = RF.remove_stale_writes(out)
        if removed:
            log.info(f"{out}: removed {len(removed)} temp file(s) of an interrupted write "
                     f"({', '.join(removed)})")
    existing = [n for n in RF.RUN_FILES if (out / n).exists()]
    last = out / RF.LAST
    # job scripts pass --resume every time: a folder with nothing to continue starts the run
    if cfg.resume:
        if last.is_file():
            with hint(LoadError, "or start it again with --overwrite"):
                return load_checkpoint(last)
        # killed before the first checkpoint: nothing to continue, so start over
        if is_main and existing:
            log.info(f"{out} has no checkpoint yet (it stopped before epoch 1 was saved): "
                     "starting it from epoch 1")
            _clear(out)
        elif is_main:
            log.info(f"--resume: nothing to resume in {out}; starting a new run")
        return None
    if existing and not cfg.overwrite:
        raise UserError(f"{out} already holds a run ({', '.join(existing)}); pass --resume to "
                        "continue it, --output-dir for a new run, or --overwrite to replace it")
    if existing and is_main:
        _clear(out)
    return None


def _clear(out: Path) -> None:
    for n in RF.RUN_FILES:
        (out / n).unlink(missing_ok=True)
    for f in out.glob("events.out.tfevents.*"):
        f.unlink()


def check_resume(cfg: TrainConfig, ckpt: dict, record: RunRecord | None = None,
                 is_main: bool = True) -> bool:
    """Refuse a --resume with other settings (the flags; with `record`, also what they resolved to:
    recipe, data, AMP dtype, pipeline, weights file), or with --epochs that cannot continue the
    schedule. True when the run is finished and tested: nothing to do."""
    out = Path(cfg.output_dir)
    saved = RunRecord.from_dict(ckpt["record"], str(out / RF.LAST))
    diffs = [_model_words(saved, cfg) if d.startswith("model:") else d
             for d in identity_differences(saved.config.to_dict(), cfg.to_dict())]
    fixed = cfg.fixed_accum_steps
    if ckpt["step"] and fixed is not None and fixed != saved.run.accum_steps:
        diffs.append(f"--grad-accum-steps {fixed} in the middle of an epoch (step {ckpt['step']}, "
                     f"split into {saved.run.accum_steps}): the batch per update may be split "
                     "differently only from an epoch's start (or pass --grad-accum-steps auto)")
    if record is not None:
        now = record.resolved_identity()
        diffs += [f"{k} differs ({_short(v)} in the checkpoint, {_short(now[k])} now)"
                  for k, v in saved.resolved_identity().items() if v != now[k]]
    if diffs:
        raise UserError(f"--resume refused: {out} holds {_held(saved)}, trained with other "
                        "settings: " + "; ".join(diffs)
                        + ". Use the original flags, or a new --output-dir")
    if record is not None:
        return False
    done, planned = ckpt["epoch"], saved.config.epochs
    if cfg.epochs < done or (cfg.epochs == done and ckpt["step"]):
        raise UserError(f"--epochs {cfg.epochs} is below the {done} epochs {out / RF.LAST} has "
                        f"trained; resume with --epochs {done} to end the run there (it then runs "
                        "the test), or more to continue")
    if ckpt.get("finished") and cfg.epochs > planned:
        raise UserError(f"{out} finished its {planned}-epoch cosine schedule (the lr came down to "
                        "its floor): more epochs would be another experiment. Start a new run "
                        f"with --epochs {cfg.epochs} in another --output-dir")
    if ckpt.get("finished") and (out / RF.SUMMARY).is_file():
        if is_main:
            log.info(f"{out} is finished ({done}/{planned} epochs, best val acc "
                     f"{ckpt['best']['acc']:.4f}, test result in {RF.SUMMARY}); nothing to resume")
        return True
    return False


def _held(record: RunRecord) -> str:
    """What a run folder holds, as it was made: 'ResNet-18 from scratch (resnet18)'."""
    if record.weights.init == "random init":
        return f"{record.model.display} from scratch ({record.model.name}, no pretrained weights)"
    return f"{record.model.display} fine-tuned from {record.weights.label()}"


def _model_words(saved: RunRecord, cfg: TrainConfig) -> str:
    """The model difference as the runs' own names (a scratch run's name carries no weights tag)."""
    now = resolve_model(cfg.model, cfg.pretrained).name
    return f"model: {saved.model.name} in the checkpoint, {now} now"


def _short(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())[:160]
    return repr(v)[:80]


# ----------------------------------------------------------------------------- preparation

def prepare(cfg: TrainConfig, rt: Runtime, ckpt: dict | None) -> Context:
    """Data, model, optimiser, the state to start from, and the run record (config.json)."""
    out = Path(cfg.output_dir)
    recipe = recipe_of(cfg)
    source, splits = rank0_first(rt.dist, lambda downloader: load_data(cfg, downloader))
    choice = resolve_model(cfg.model, cfg.pretrained)
    model, weights, zero_init = rank0_first(
        rt.dist, lambda downloader: load_model(cfg, choice, len(source.classes), ckpt))
    plan = choose_batches(cfg, rt, model, recipe, splits, ckpt)  # before the weights move
    model = model.to(rt.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    stream = build_stream(cfg, rt, splits, recipe, plan)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum,
                                cfg.head_lr_mult, rt.device, cfg.decay_norm_and_bias)
    scheduler = build_scheduler(optimizer, cfg.epochs, cfg.warmup_epochs,
                                len(stream) // plan.accum_steps, cfg.sched_step == "epoch",
                                cfg.min_lr_ratio)
    state = RunState(model, optimizer, scheduler, make_scaler(rt.amp_dtype, rt.device))
    evaluator = Evaluator(EvalTransform(recipe, cfg.img_size), plan.eval_batch, rt.device,
                          rt.amp_dtype if cfg.amp_eval else None, cfg.channels_last, cfg.compile)
    record = make_record(cfg, rt, choice, weights, zero_init, source, splits, recipe, evaluator,
                         model, stream, ckpt, plan)
    if ckpt is not None:
        check_resume(cfg, ckpt, record)
        state.restore(ckpt, str(out / RF.LAST))
        _retarget_schedule(cfg, ckpt, state, len(stream), plan.accum_steps)
    metrics = open_log(out, record, state, ckpt, rt, len(stream))
    step_fn = make_step(cfg, rt, model, state, len(source.classes), plan.accum_steps)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    # mid-epoch: continue the interrupted random streams, last of all
    if ckpt is not None and state.step:
        restore_rng(ckpt["rng"], rt.device, rt.dist.rank)
    test_only = ckpt is not None and (state.finished or state.epoch >= cfg.epochs)
    # --epochs lowered to the epochs done: end the run here
    if test_only and not state.finished and rt.is_main:
        state.finished = True
        with hint(WriteError, WRITE_HINT):
            save_checkpoint(out / RF.LAST,
                            state.full_checkpoint(record.to_dict(), capture_rng(rt.device)))
    return Context(cfg, rt, out, splits, stream, evaluator, state, step_fn, record, metrics,
                   test_only, plan, recipe, syncs=HotLoopSyncs(rt.device),
                   clock=RunClock(cfg.epochs, len(stream)))


def gpu_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of the GPU, or None off CUDA (the tests stand in a card here)."""
    return torch.cuda.mem_get_info(device) if device.type == "cuda" else None


def choose_batches(cfg: TrainConfig, rt: Runtime, model: nn.Module, recipe: Recipe,
                   splits: Splits, ckpt: dict | None) -> MemoryPlan:
    """The micro-batch, accumulation steps, augmentation chunk and evaluation batch of this run:
    --grad-accum-steps N as given; auto from the GPU's free memory and the memory model (on the CPU:
    no accumulation). A mid-epoch resume keeps the interrupted epoch's split. Under torchrun every
    rank plans from its own free memory and all take the smallest micro-batch."""
    per_rank = cfg.batch_size // rt.dist.world
    fixed = cfg.fixed_accum_steps if cfg.drop_last else 1
    if fixed is None and ckpt is not None and ckpt["step"]:
        fixed = RunRecord.from_dict(ckpt["record"], "last.pt").run.accum_steps
    if fixed is not None and per_rank % fixed:
        raise UserError(f"--batch-size {cfg.batch_size} over {rt.dist.world} process(es) is "
                        f"{per_rank} per process, which does not split into --grad-accum-steps "
                        f"{fixed} equal micro-batches")
    chunk = default_chunk(recipe, cfg.img_size) if rt.pipeline == "device" else 1
    eval_batch = max(256, per_rank * 2)
    memory = gpu_memory(rt.device)
    if memory is None:
        accum = fixed or 1
        plan = MemoryPlan(per_rank // accum, accum, chunk, eval_batch,
                          reason="as --grad-accum-steps says" if fixed else "no GPU: no "
                          "accumulation needed")
        if rt.is_main:
            log.info(plan.line(cfg.batch_size))
        return plan
    costs = measure_costs(model, cfg.img_size, rt.amp_dtype, rt.amp_dtype if cfg.amp_eval
                          else None, recipe, rt.pipeline == "device", len(splits.train_x),
                          max(len(splits.val_x), len(splits.test_x)), cfg.optimizer)
    plan = plan_memory(costs, *memory, per_rank, chunk, eval_batch, fixed)
    if rt.dist.enabled:  # the smallest micro-batch, chunk and evaluation batch of all ranks
        agreed = D.max_over_ranks(torch.tensor([plan.accum_steps, -plan.chunk_batches,
                                                -plan.eval_batch], device=rt.device), rt.dist)
        accum, chunk, eval_batch = (int(v) for v in agreed.tolist())
        plan = dataclasses.replace(plan, accum_steps=accum, micro_batch=per_rank // accum,
                                   chunk_batches=-chunk, eval_batch=-eval_batch)
    if not plan.fits and fixed is None:
        raise UserError(f"{choice_name(cfg)} at {cfg.img_size} px does not fit the "
                        f"{plan.free_gb:.1f} GiB free on this GPU even in micro-batches of 1 (the "
                        f"memory model needs about {plan.need_gb:.1f} GiB): free the GPU of other "
                        "processes, or lower --img-size")
    if rt.is_main:
        log.info(plan.line(cfg.batch_size) + ("" if plan.fits else "; the memory model expects "
                                              "it not to fit: an out-of-memory error would say so"))
    return plan


def choice_name(cfg: TrainConfig) -> str:
    return resolve_model(cfg.model, cfg.pretrained).display


def build_stream(cfg: TrainConfig, rt: Runtime, splits: Splits, recipe: Recipe,
                 plan: MemoryPlan) -> TrainStream:
    """The training batches in micro-batches of the plan (global: per process x processes),
    whole updates per epoch."""
    return make_train_stream(rt.pipeline, splits.train_x, splits.train_y, recipe, cfg.img_size,
                             plan.micro_batch * rt.dist.world, cfg.seed, rt.num_workers,
                             rt.device, rt.dist.rank, rt.dist.world, cfg.drop_last,
                             plan.accum_steps, plan.chunk_batches)


def rank0_first(dist: D.DistInfo, fn: Callable[[bool], Any]) -> Any:
    """fn(True) on rank 0 first (it downloads), then fn(False) on the others (they find rank 0's
    copies); inside D.together, so a failure on any rank stops every rank."""
    result = None
    for downloader in (True, False):
        with D.together(dist, slow=True):
            if dist.is_main == downloader:
                result = fn(downloader)
    return result


def load_data(cfg: TrainConfig, downloader: bool) -> tuple[DataSource, Splits]:
    source = open_source(cfg.data_dir, dummy=cfg.dummy, download=cfg.download if downloader
                         else False,
                         cache_dir=cfg.cache_dir, skip_bad_images=cfg.skip_bad_images)
    splits = make_splits(source, cfg.val_size, cfg.split_seed, cfg.train_subset, cfg.test_subset,
                         cfg.val_split)
    official_order = source.kind in ("cifar-batches", "synthetic")
    if cfg.val_split == "random" and not official_order and downloader:
        log.warning(f"--val-split random picks the experiment's images only in the official "
                    f"batch order; {source.kind} copies list the images class by class, so these "
                    "5,000 indices are other images (a random split all the same)")
    if len(splits.train_x) < cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {len(splits.train_x)} "
                        "training images; lower it or raise --train-subset")
    return source, splits


def load_model(cfg: TrainConfig, choice: ModelChoice, num_classes: int,
               ckpt: dict | None) -> tuple[nn.Module, WeightsInfo, bool | None]:
    """The model with its initial weights (random, ImageNet or a file) and whether its residual
    branches' last norms started at zero; on --resume the architecture alone, since the weights come
    from last.pt. Seeded, so every rank builds the same initial model."""
    seed_everything(cfg.seed)
    model = create_model(choice, cfg.img_size, num_classes, cfg.zero_init_last)
    zero_init = starts_at_zero(model)
    if ckpt is None:
        model, weights = apply_weights(model, choice, cfg.weights_file)
    else:
        weights = RunRecord.from_dict(ckpt["record"], "last.pt").weights
    if cfg.freeze_backbone:
        freeze_backbone(model)
    return model, weights, zero_init


def make_record(cfg: TrainConfig, rt: Runtime, choice: ModelChoice, weights: WeightsInfo,
                zero_init: bool | None, source: DataSource, splits: Splits, recipe: Recipe,
                evaluator: Evaluator, model: nn.Module, stream: TrainStream,
                ckpt: dict | None, plan: MemoryPlan) -> RunRecord:
    """config.json: the resolved flags and everything needed to judge the run."""
    previous = RunRecord.from_dict(ckpt["record"], "last.pt") if ckpt else None
    resumed = previous.run.resumed if previous else []
    if ckpt:
        split = previous.run.accum_steps != plan.accum_steps
        resumed = resumed + [f"epoch {ckpt['epoch'] + 1} step {ckpt['step']}" + (
            f" with micro-batch {plan.micro_batch} x {plan.accum_steps} accumulation steps"
            if split else "")]
    data = source.provenance()
    env = environment(rt.device)
    return RunRecord(
        config=cfg,
        model=ModelInfo(choice.name, choice.display, choice.arch, choice.library,
                        count_parameters(model), flops_per_image(model, cfg.img_size),
                        len(source.classes), zero_init),
        weights=weights, recipe=recipe,
        data=DataInfo(**data, splits=SplitInfo(**splits.provenance())),
        run=RunInfo(dtype_name(rt.amp_dtype), dtype_name(evaluator.amp_dtype), stream.name,
                    rt.dist.world, len(stream), evaluator.transform.describe(), resumed,
                    plan.micro_batch, plan.accum_steps,
                    plan.chunk_batches if stream.name == "device" else 0, plan.eval_batch,
                    plan.line(cfg.batch_size), rt.num_workers if stream.name == "cpu" else 0),
        environment=previous.environment if previous else env,
        environment_now=env if previous else None)


def make_step(cfg: TrainConfig, rt: Runtime, model: nn.Module, state: RunState,
              num_classes: int, accum_steps: int) -> TrainStep:
    loss_fn, mixup = build_loss_and_mixup(cfg.label_smoothing, cfg.mixup, cfg.cutmix, num_classes)
    train_model = model
    if rt.dist.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return TrainStep(train_model, state.optimizer, state.scheduler, state.scaler, loss_fn, mixup,
                     rt.amp_dtype, cfg.grad_clip, cfg.channels_last, rt.device,
                     accum_steps, cfg.sched_step == "step", cfg.compile)


def schedule_position(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int,
                      accum_steps: int) -> int:
    """Where the schedule stands at (epoch, micro-step in it): in epochs, or in optimizer
    updates."""
    if cfg.sched_step == "epoch":
        return epoch
    return (epoch * steps_per_epoch + step) // accum_steps


def _retarget_schedule(cfg: TrainConfig, ckpt: dict, state: RunState, steps_per_epoch: int,
                       accum_steps: int) -> None:
    """A resumed run with another --epochs: the cosine goes on from where it stands to its floor at
    the new end."""
    planned = RunRecord.from_dict(ckpt["record"], "last.pt").config.epochs
    if planned != cfg.epochs:
        k = schedule_position(cfg, state.epoch, state.step, steps_per_epoch, accum_steps)
        schedule = state.scheduler.lr_lambdas[0]
        schedule.retarget(k, schedule_length(cfg.epochs, steps_per_epoch // accum_steps,
                                             cfg.sched_step == "epoch"))
        log.info(f"--epochs {cfg.epochs} (was {planned}): the cosine schedule continues from lr "
                 f"{cfg.lr * schedule(k):.3g} at epoch {state.epoch + 1} down to its floor at "
                 f"epoch {cfg.epochs}")


def open_log(out: Path, record: RunRecord, state: RunState, ckpt: dict | None, rt: Runtime,
             steps: int) -> RF.MetricsLog | None:
    """Write config.json (before the first step) and open metrics.csv, repairing what a kill left
    behind."""
    with D.together(rt.dist):  # every rank passes through; rank 0 writes
        if rt.is_main:
            with hint(WriteError, WRITE_HINT):
                write_json(out / RF.CONFIG, record.to_dict())
    if not rt.is_main:
        return None
    metrics = RF.MetricsLog(out)
    for problem in metrics.reconcile(state.epoch):
        log.info(f"{out / RF.METRICS}: {problem} (repaired)")
    m, data, s = record.model, record.data, record.data.splits
    log.info(f"{m.name} ({record.weights.init}): {m.params / 1e6:.2f}M params, "
             f"{m.flops_per_image / 1e9:.2f} GFLOPs/img at {record.config.img_size}px; {s.train} "
             f"train / {s.val} val images of {data.name}; recipe {record.recipe.name}; {steps} "
             f"steps/epoch on {rt.device} {record.run.amp_dtype}, {record.run.data_pipeline} "
             f"pipeline -> {out}")
    if ckpt is not None:
        log.info(f"resuming {out} at epoch {state.epoch + 1} step {state.step}/{steps}")
    return metrics


# ----------------------------------------------------------------------------- the epoch

@dataclass
class EpochResult:
    sums: EpochSums
    stopped: bool
    train_time: float
    images_run: int              # in this process's session (a resumed epoch counts from its resume
                                 # point)
    lr: float                    # the learning rate the epoch trained at (in --sched-step step: its
                                 # first update's)


def train_epoch(ctx: Context, epoch: int, stop: GracefulStop) -> EpochResult:
    start_step = ctx.state.step
    if start_step == 0:
        # augmentation and dropout: a function of the epoch
        seed_everything(ctx.cfg.seed * 1000 + epoch)
    # saved partial sums are already summed over ranks: one rank carries them, the others add to 0
    sums = (EpochSums.from_state(ctx.state.partial, ctx.rt.device)
            if ctx.state.partial and ctx.rt.is_main
            else EpochSums.zeros(ctx.rt.device))
    def current() -> dict[str, str]:  # read when a progress line is printed: one sync a line
        count = max(1.0, float(sums.count))
        return {"loss": f"{float(sums.loss) / count:.3f}",
                "acc": f"{float(sums.correct) / count:.3f}"}

    progress = Progress(len(ctx.stream), f"epoch {epoch + 1}/{ctx.cfg.epochs}", start_step,
                        every_s=ctx.cfg.progress_every or float("inf"), enabled=ctx.rt.is_main,
                        values=current, suffix=lambda done: ctx.clock.text(epoch, done))
    lr = ctx.cfg.lr * ctx.state.scheduler.lr_lambdas[0](
        schedule_position(ctx.cfg, epoch, start_step, len(ctx.stream), ctx.plan.accum_steps))
    counted = float(sums.count) if start_step else 0.0
    t0 = time.perf_counter()
    try:
        step, stopped = train_one_epoch(ctx.step_fn, ctx.stream.epoch(epoch, start_step), sums,
                                        stop, ctx.rt.dist, start_step, progress,
                                        ctx.cfg.freeze_backbone, epoch * len(ctx.stream),
                                        ctx.syncs)
    finally:
        progress.close()
    for total in (sums.loss, sums.correct, sums.count):
        D.all_reduce_sum(total, ctx.rt.dist)
    ctx.state.step = step
    seconds = time.perf_counter() - t0
    ctx.clock.trained(step - start_step, seconds)
    return EpochResult(sums, stopped, seconds, int(float(sums.count) - counted), lr)


# ----------------------------------------------------------------------------- out of memory

@dataclass
class Snapshot:
    """Where this session's first epoch starts (CPU copies): what an out-of-memory retry goes back
    to before it runs that epoch again in smaller micro-batches."""

    model: dict
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    position: tuple
    rng: dict

    @classmethod
    def take(cls, ctx: Context) -> "Snapshot":
        s = ctx.state
        cpu = lambda tree: _map_tensors(tree, lambda t: t.detach().to("cpu", copy=True))  # noqa
        return cls(cpu(unwrap_model(s.model).state_dict()), cpu(s.optimizer.state_dict()),
                   copy.deepcopy(s.scheduler.state_dict()),
                   copy.deepcopy(s.scaler.state_dict()) if s.scaler is not None else None,
                   (s.epoch, s.step, copy.deepcopy(s.partial), copy.deepcopy(s.best)),
                   capture_rng(ctx.rt.device))

    def restore(self, ctx: Context) -> None:
        s = ctx.state
        load_model_state(s.model, self.model, "the run's starting weights")
        s.optimizer.load_state_dict(self.optimizer)
        s.scheduler.load_state_dict(self.scheduler)
        if s.scaler is not None and self.scaler is not None:
            s.scaler.load_state_dict(self.scaler)
        s.epoch, s.step, s.partial, s.best = (self.position[0], self.position[1],
                                              copy.deepcopy(self.position[2]),
                                              copy.deepcopy(self.position[3]))
        restore_rng(self.rng, ctx.rt.device)


def _map_tensors(tree: Any, fn: Callable) -> Any:
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_tensors(v, fn) for v in tree)
    return copy.deepcopy(tree)


def can_halve(ctx: Context) -> bool:
    """An out-of-memory error may halve the micro-batch: once, when the memory plan chose it (auto),
    in one process (ranks would have to fail together), and while it halves evenly."""
    return (not ctx.retried and ctx.cfg.fixed_accum_steps is None and ctx.cfg.drop_last
            and not ctx.rt.dist.enabled and ctx.plan is not None
            and ctx.plan.micro_batch % 2 == 0)


def train_epoch_or_retry(ctx: Context, epoch: int, stop: GracefulStop,
                         start: Snapshot | None) -> "EpochResult":
    """One epoch. An out-of-memory error in this session's first epoch (`start` given) means the
    memory model's micro-batch does not fit after all: the state goes back to `start` and the
    epoch runs again at half the micro-batch, with twice the accumulation steps (the same update),
    once and said in one line. Any other out-of-memory error is one line with the fix."""
    doing = f"training epoch {epoch + 1}"
    if start is not None:
        try:
            return train_epoch(ctx, epoch, stop)
        except torch.OutOfMemoryError:
            pass  # retried below, once the failed step's tensors are gone with the exception
        halve_micro_batch(ctx, start, doing)
    with out_of_memory_hint(ctx, doing):
        return train_epoch(ctx, epoch, stop)


def halve_micro_batch(ctx: Context, start: Snapshot, doing: str) -> None:
    old = ctx.plan
    ctx.stream = None  # its chunk (and, for the device pipeline, the split) on the GPU goes first
    if ctx.rt.device.type == "cuda":
        torch.cuda.empty_cache()
    start.restore(ctx)
    ctx.retried = True
    ctx.plan = dataclasses.replace(old, micro_batch=old.micro_batch // 2,
                                   accum_steps=old.accum_steps * 2)
    ctx.stream = build_stream(ctx.cfg, ctx.rt, ctx.splits, ctx.recipe, ctx.plan)
    ctx.step_fn = make_step(ctx.cfg, ctx.rt, ctx.state.model, ctx.state,
                            ctx.record.model.num_classes, ctx.plan.accum_steps)
    note = (f"out of GPU memory {doing} with micro-batch {old.micro_batch}: it starts again with "
            f"micro-batch {ctx.plan.micro_batch} x {ctx.plan.accum_steps} accumulation steps = "
            f"{ctx.cfg.batch_size} per update (the same update; BatchNorm now sees "
            f"{ctx.plan.micro_batch} images)")
    run = ctx.record.run
    run.micro_batch, run.accum_steps, run.steps_per_epoch = (ctx.plan.micro_batch,
                                                             ctx.plan.accum_steps, len(ctx.stream))
    run.memory = f"{ctx.plan.line(ctx.cfg.batch_size)}; {note}"
    _rewrite_record(ctx)
    log.info(note)


def evaluate(ctx: Context, images: torch.Tensor, labels: torch.Tensor, doing: str,
             **kwargs) -> dict | None:
    """The Evaluator on the run's model, with its own progress line (or bar); an out-of-memory
    error halves the evaluation batch once (evaluation changes nothing, so it simply runs again)
    and says so in one line."""
    start = time.perf_counter()
    progress = Progress(len(images) // (ctx.rt.dist.world or 1), doing, unit="image",
                        every_s=ctx.cfg.progress_every or float("inf"), enabled=ctx.rt.is_main)
    try:
        return _evaluate(ctx, images, labels, doing, progress, **kwargs)
    finally:
        progress.close()
        if doing.startswith("validating"):
            ctx.clock.validated(time.perf_counter() - start)


def _evaluate(ctx: Context, images: torch.Tensor, labels: torch.Tensor, doing: str, progress,
              **kwargs) -> dict | None:
    retry = False
    kwargs["progress"] = progress
    try:
        return ctx.evaluator(ctx.state.model, images, labels, **kwargs)
    except torch.OutOfMemoryError:
        retry = ctx.evaluator.batch_size > 1 and not ctx.eval_retried
        if not retry:
            raise out_of_memory_error(ctx, doing) from None
    old = ctx.evaluator.batch_size
    if ctx.rt.device.type == "cuda":
        torch.cuda.empty_cache()
    ctx.evaluator.batch_size = old // 2
    ctx.eval_retried = True
    ctx.record.run.eval_batch = ctx.evaluator.batch_size
    ctx.record.run.memory += (f"; out of GPU memory {doing} with evaluation batch {old}: "
                              f"halved to {ctx.evaluator.batch_size}")
    _rewrite_record(ctx)
    log.info(f"out of GPU memory {doing} with evaluation batch {old}: it runs again with "
             f"{ctx.evaluator.batch_size}")
    with out_of_memory_hint(ctx, doing):
        return ctx.evaluator(ctx.state.model, images, labels, **kwargs)


def _rewrite_record(ctx: Context) -> None:
    if ctx.rt.is_main:
        with hint(WriteError, WRITE_HINT):
            write_json(ctx.out / RF.CONFIG, ctx.record.to_dict())


def out_of_memory_error(ctx: Context, doing: str) -> UserError:
    """What ran out, and the same experiment in smaller micro-batches. Nothing is written at that
    point: the checkpoint of the last finished epoch stays as it was."""
    cfg, plan = ctx.cfg, ctx.plan
    if ctx.rt.device.type == "cuda":
        torch.cuda.empty_cache()
    saved = (f"{ctx.out / RF.LAST} (epoch {ctx.state.epoch}) is intact" if ctx.state.epoch
             else "nothing is lost")
    more = plan.accum_steps * 2
    fix = (f"the same experiment in smaller micro-batches: --grad-accum-steps {more} (then "
           "--resume)" if (cfg.batch_size // ctx.rt.dist.world) % more == 0
           else "--img-size lower, or a GPU with more free memory")
    return UserError(f"out of GPU memory {doing} of {ctx.record.model.display} at "
                     f"{cfg.img_size} px with micro-batch {plan.micro_batch} x "
                     f"{plan.accum_steps} accumulation steps = {cfg.batch_size} per update and "
                     f"evaluation batch {ctx.evaluator.batch_size}; {fix}; {saved}")


@contextlib.contextmanager
def out_of_memory_hint(ctx: Context, doing: str):
    """A GPU out-of-memory error becomes one line (out_of_memory_error)."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise out_of_memory_error(ctx, doing) from None


def save_interrupted(ctx: Context, epoch: int, result: EpochResult, stop: GracefulStop) -> int:
    """Ctrl+C / SIGTERM mid-epoch: a last.pt at this step, and the command that continues."""
    ctx.state.partial = result.sums.state()
    rng = gather_rng(ctx.rt.dist, ctx.rt.device)  # every rank's, before rank 0 alone writes
    with D.together(ctx.rt.dist):
        if ctx.rt.is_main:
            with hint(WriteError, WRITE_HINT):
                save_checkpoint(ctx.out / RF.LAST,
                                ctx.state.full_checkpoint(ctx.record.to_dict(), rng))
            resume_hint(ctx.out, ctx.rt.dist.world,
                        f"stopped in epoch {epoch + 1} at step {ctx.state.step}/"
                        f"{len(ctx.stream)}")
    return 128 + (stop.signum or 2)


def epoch_row(ctx: Context, epoch: int, result: EpochResult, val: dict) -> dict[str, float]:
    """The epoch's metrics.csv row."""
    count = max(1.0, float(result.sums.count))
    device = ctx.rt.device
    return {"epoch": epoch + 1, "lr": result.lr,
            "train_loss": float(result.sums.loss) / count, "train_acc": float(result.sums.correct)
            / count, "val_loss": val["loss"], "val_acc": val["acc"],
            "epoch_time_s": result.train_time + val["n"] / val["img_per_s"],
            "train_img_per_s": result.images_run / max(1e-9, result.train_time),
            "val_img_per_s": val["img_per_s"],
            "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
            else 0.0}


def close_epoch(ctx: Context, epoch: int, val_acc: float) -> tuple[bool, bool]:
    """The decision after an epoch: is it the best so far, does --patience stop the run; the state
    moves to the start of the next epoch. Returns (improved, early stop)."""
    state, cfg = ctx.state, ctx.cfg
    improved = state.best.update(val_acc, epoch + 1)
    early = bool(cfg.patience and state.best.since >= cfg.patience)
    state.epoch, state.step, state.partial = epoch + 1, 0, None
    state.finished = epoch + 1 == cfg.epochs or early
    return improved, early


def write_epoch(ctx: Context, row: dict[str, float], improved: bool) -> None:
    """The epoch's writes, in the order that a kill between any two leaves repairable (design.md):
    the row, best.pt (if better), last.pt."""
    rng = gather_rng(ctx.rt.dist, ctx.rt.device)
    with D.together(ctx.rt.dist), hint(WriteError, WRITE_HINT):
        if ctx.rt.is_main:
            ctx.log.append(row)
            failpoint(f"epoch:{row['epoch']}")
            if improved:
                save_checkpoint(ctx.out / RF.BEST,
                                ctx.state.weights_checkpoint(ctx.record.to_dict()))
            save_checkpoint(ctx.out / RF.LAST, ctx.state.full_checkpoint(ctx.record.to_dict(), rng))


def log_epoch(cfg: TrainConfig, row: dict[str, float], improved: bool, early: bool,
              state: RunState, clock: RunClock | None = None) -> None:
    where = f"  ({clock.text(row['epoch'], 0)})" if clock is not None else ""
    log.info(f"epoch {row['epoch']:3d}/{cfg.epochs}  lr {row['lr']:.2e}  train loss "
             f"{row['train_loss']:.4f} acc {row['train_acc']:.4f}  val loss {row['val_loss']:.4f} "
             f"acc {row['val_acc']:.4f}{' *' if improved else '  '}  {row['epoch_time_s']:.1f}s  "
             f"{row['train_img_per_s']:.0f} img/s{where}")
    if early:
        log.info(f"early stop: no better val acc for {cfg.patience} epochs (best "
                 f"{state.best.acc:.4f} at epoch {state.best.epoch})")


# ----------------------------------------------------------------------------- the test

def test_and_summarise(ctx: Context, stop: GracefulStop) -> int:
    """Test best.pt (chosen on validation) and the final epoch's weights on the test set, once;
    write the per-image predictions and summary.json. An interrupt here loses nothing: --resume runs
    the test only."""
    out, model, splits = ctx.out, ctx.state.model, ctx.splits
    if ctx.rt.is_main:
        failpoint("test")
        final = evaluate(ctx, splits.test_x, splits.test_y,
                         "in the final test (the final epoch's weights)", keep_probs=True, stop=stop)
        with hint(LoadError, "--resume runs the test again once best.pt is restored (or start over "
                             "with --overwrite)"):
            best_ckpt = load_checkpoint(out / RF.BEST, map_location=ctx.rt.device)
        final_weights = {k: v.clone() for k, v in unwrap_model(model).state_dict().items()}
        load_model_state(model, best_ckpt["model"], str(out / RF.BEST))
        best = None if final is None else evaluate(ctx, splits.test_x, splits.test_y,
                                                   "in the final test (best.pt)", keep_probs=True,
                                                   stop=stop)
        load_model_state(model, final_weights, "the final epoch's weights")
    with D.together(ctx.rt.dist, slow=True):  # the others wait while rank 0 tests
        if ctx.rt.is_main:
            if best is None:
                resume_hint(out, ctx.rt.dist.world,
                            "stopped during the final test (training is complete and saved)")
                return 128 + (stop.signum or 2)
            failpoint("summary")
            with hint(WriteError, WRITE_HINT):
                RF.write_predictions(out / RF.PREDICTIONS, torch.from_numpy(splits.test_idx),
                                     splits.test_y, best["probs"], final["probs"])
                write_json(out / RF.SUMMARY, asdict(summarise(ctx, best, final)))
            chosen = ("chosen on the test set (--val-size 0)" if splits.val_is_test
                      else "chosen on validation")
            log.info(f"test acc of best.pt (epoch {ctx.state.best.epoch}, {chosen}): "
                     f"{best['acc']:.4f}; of the final epoch: {final['acc']:.4f} -> "
                     f"{out / RF.SUMMARY}")
    return 0


def summarise(ctx: Context, best: dict, final: dict) -> Summary:
    metrics = RF.read_metrics(ctx.out / RF.METRICS)
    device = ctx.rt.device
    tested = ("best.pt (chosen on the test set itself: --val-size 0) and the final epoch's weights"
              if ctx.splits.val_is_test
              else "best.pt (chosen on validation) and the final epoch's weights")
    return Summary(test_acc=best["acc"], test_loss=best["loss"], test_acc_final=final["acc"],
                   test_loss_final=final["loss"], test_images=best["n"], tested=tested,
                   best_epoch=ctx.state.best.epoch, best_val_acc=ctx.state.best.acc,
                   final_val_acc=float(metrics["val_acc"].iloc[-1]),
                   epochs_run=int(metrics["epoch"].iloc[-1]), epochs_planned=ctx.cfg.epochs,
                   train_time_s=float(metrics["epoch_time_s"].sum()),
                   params=ctx.record.model.params, flops_per_image=ctx.record.model.flops_per_image,
                   peak_gpu_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30
                   if device.type == "cuda"
                   else None, val_is_test=ctx.splits.val_is_test)


def resume_hint(out: Path, world: int, why: str) -> None:
    """Say how to continue: this command without --resume / --stop-after-epoch (in any form), plus
    --resume."""
    flags = strip_flags(sys.argv[1:], {"resume", "stop_after_epoch"})
    launcher = f"torchrun --nproc_per_node={world}" if world > 1 else "python"
    log.info(f"{why}; saved in {out}.\ncontinue with: {launcher} {Path(sys.argv[0]).name} "
                f"{shlex.join(flags)} --resume")
