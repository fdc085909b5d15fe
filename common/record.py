"""The run record: what config.json holds and every checkpoint carries. A small versioned dataclass
(the resolved flags, the model and its weights, the augmentation recipe, the data and its split, how
the run ran, the environment), written by the trainer and read back through `read_record` alone,
which refuses a record of another format in one line. summary.json is read the same way
(`Summary`)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import TrainConfig
from .errors import UserError

if TYPE_CHECKING:  # the recipe module imports torch, which a sweep's job process does not need
    from .data.augment import Recipe

# bump when a field changes meaning; an older record is read only where its meaning converts exactly
# (2 -> 3: --batch-size became the batch per update), a newer one is refused
FORMAT = 3


@dataclass
class ModelInfo:
    name: str                    # the weights actually used: resnet18.a1_in1k, tv/resnet18,
                                 # tiny_vit_5m_224
    display: str                 # ResNet-18, TinyViT-5M (the registry's name) or the architecture
    arch: str
    library: str                 # timm | torchvision
    params: int
    flops_per_image: int
    num_classes: int
    # did the last norm of each residual branch start at zero (None: no such norm)
    zero_init_last: bool | None


@dataclass
class WeightsInfo:
    init: str                            # random init | ImageNet | file
    library: str | None = None
    arch: str | None = None
    tag: str | None = None
    source: str | None = None            # torchvision | Hugging Face hub (timm)
    file: str | None = None
    sha256: str | None = None
    hash_checked: bool = False
    loaded_tensors: int | None = None
    new_head: list[str] = field(default_factory=list)
    imagenet_top1: float | None = None   # as published by the weights' source (specs.py)
    top1_source: str | None = None
    pretrain_data: str | None = None

    @property
    def pretrained(self) -> bool:
        return self.init != "random init"

    @property
    def identity(self) -> str:
        """What tells two sets of weights apart: the library tag, or the file's hash."""
        if self.init == "random init":
            return "random init"
        if self.init == "file":
            return f"file {(self.sha256 or '?')[:12]}"
        return f"{self.library} {self.arch}.{self.tag}"

    def label(self) -> str:
        """'ImageNet: timm resnet18.a1_in1k (ImageNet top-1 73.2%)', 'weights file x.pth' or 'random
        init'."""
        if self.init == "random init":
            return "random init"
        if self.init == "file":
            return (f"weights file {Path(self.file or '?').name}"
                    + (f" (as {self.arch}.{self.tag})" if self.tag else ""))
        top1 = f" (ImageNet top-1 {self.imagenet_top1:.1f}%)" if self.imagenet_top1 else ""
        return f"ImageNet: {self.library} {self.arch}.{self.tag}{top1}"


@dataclass
class SplitInfo:
    val_size: int
    val_split: str               # stratified | random (the experiment's randperm)
    split_seed: int
    train_subset: int
    test_subset: int
    train: int
    val: int
    test: int
    val_is_test: bool
    # which images train / val / test hold: equal for runs that share the split
    indices_sha256: str


@dataclass
class DataInfo:
    kind: str                    # cifar-batches | image-folder | tar | zip | synthetic
    path: str | None
    name: str
    # of the decoded images, labels and class names: the same in any format
    sha256: str
    counts: dict[str, int]
    classes: list[str]
    skipped_images: int
    skipped_examples: list[str]
    splits: SplitInfo
    fidelity: str = ""           # official | lossless copy (PNG) | lossy copy (JPEG) | synthetic

    @property
    def synthetic(self) -> bool:
        return self.kind == "synthetic"

    @property
    def lossy(self) -> bool:
        return "lossy" in self.fidelity

    def label(self) -> str:
        """'CIFAR-10 (tar, lossy copy (JPEG))', 'CIFAR-10 (official)' or 'synthetic data (--dummy,
        not CIFAR-10)'."""
        if self.synthetic:
            return "synthetic data (--dummy, not CIFAR-10)"
        if self.kind == "cifar-batches":
            return "CIFAR-10 (official batches)"
        return f"CIFAR-10 ({self.kind}, {self.fidelity or 'copy'})"


@dataclass
class RunInfo:
    amp_dtype: str               # training autocast: bf16 | fp16 | fp32
    eval_dtype: str              # evaluation: fp32 unless --amp-eval
    data_pipeline: str           # device | cpu
    world_size: int
    steps_per_epoch: int         # micro-batches
    eval_transform: str
    resumed: list[str] = field(default_factory=list)
    # what the memory plan chose (common/memory.py): per process; BatchNorm sees the micro-batch
    micro_batch: int = 0
    accum_steps: int = 1
    chunk_batches: int = 0       # device pipeline: micro-batches augmented at once
    eval_batch: int = 0
    memory: str = ""             # the plan's line, and any out-of-memory retry
    # DataLoader workers of the cpu pipeline as resolved (--num-workers -1: one per core, at most
    # 8); 0 on the device pipeline; None in a format-2 record, which did not say
    num_workers: int | None = None


@dataclass
class Environment:
    python: str
    torch: str
    torchvision: str
    timm: str
    cuda: str | None
    platform: str
    device: str
    device_name: str
    cpu_threads: int
    git_commit: str | None
    git_dirty: bool | None
    command: str
    start_time: str

    def label(self) -> str:
        git = (f", git {self.git_commit[:8]}{' (dirty)' if self.git_dirty else ''}"
               if self.git_commit else "")
        return f"{self.device_name}, torch {self.torch}, timm {self.timm}{git}"


@dataclass
class RunRecord:
    """config.json: the resolved flags and everything needed to judge the run."""

    config: TrainConfig
    model: ModelInfo
    weights: WeightsInfo
    recipe: Recipe
    data: DataInfo
    run: RunInfo
    environment: Environment
    # the machine of the latest --resume, when it differs
    environment_now: Environment | None = None
    format: int = FORMAT

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["recipe"] = self.recipe.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "RunRecord":
        """The record in a config.json or a checkpoint; a UserError naming `where` for another
        format."""
        if not isinstance(d, dict):
            raise UserError(f"{where} does not hold a run record")
        from .data.augment import recipe_from_dict

        check_format(d, where, "a run record")
        d = _migrate(d)
        try:
            return cls(config=_build(TrainConfig, d["config"], where, "config"),
                       model=_build(ModelInfo, d["model"], where, "model"),
                       weights=_build(WeightsInfo, d["weights"], where, "weights"),
                       recipe=recipe_from_dict(d["recipe"]),
                       data=_build(DataInfo,
                                   {**d["data"], "splits": _build(SplitInfo, d["data"]["splits"],
                                                                  where, "data.splits")},
                                   where, "data"),
                       run=_build(RunInfo, d["run"], where, "run"),
                       environment=_build(Environment, d["environment"], where, "environment"),
                       environment_now=(_build(Environment, d["environment_now"], where,
                                               "environment_now")
                                        if d.get("environment_now") else None))
        except (KeyError, TypeError) as e:
            raise UserError(f"{where} is not a complete run record ({type(e).__name__}: {e}); it "
                            "is damaged or was edited by hand") from None

    def resolved_identity(self) -> dict[str, Any]:
        """What the flags resolved to and a --resume must not change: the recipe, the data's
        content, the AMP dtype, the data pipeline and the weights file."""
        recipe = {k: v for k, v in self.recipe.to_dict().items() if k != "departures_from_preset"}
        return {"recipe": recipe, "data.sha256": self.data.sha256,
                "run.amp_dtype": self.run.amp_dtype, "run.data_pipeline": self.run.data_pipeline,
                "weights.sha256": self.weights.sha256}

    def line(self, summary: "Summary | None" = None) -> str:
        """One line of provenance: data, images, size, epochs run/planned, recipe, weights,
        seeds."""
        c, s = self.config, self.data.splits
        epochs = (f"{summary.epochs_run}/{c.epochs} epochs" if summary
                  else f"{c.epochs} epochs planned")
        n_test = summary.test_images if summary else s.test
        return (f"{self.data.label()}, {s.train} train / {n_test} test images, {c.img_size} px, "
                f"{epochs}, recipe {self.recipe.name}, {self.weights.label()}, seed "
                f"{c.seed}/split {c.split_seed}")


def check_format(d: dict, where: str, what: str) -> None:
    """A one-line refusal of a record this version cannot read: newer, or older than format 2."""
    version = d.get("format")
    if version == FORMAT or version == 2:
        return
    if isinstance(version, int) and version > FORMAT:
        raise UserError(f"{where} holds {what} of format {version}, newer than this version reads "
                        f"({FORMAT}): update this repository (git pull) to read it")
    found = f"format {version}" if version is not None else "an older layout without a format number"
    raise UserError(f"{where} holds {what} of {found}; this version reads formats 2 and {FORMAT}: "
                    "re-run it with this version, or read it with the version that wrote it")


def _migrate(d: dict) -> dict:
    """Format 2 -> 3, exactly: --batch-size was the batch per step and --grad-accum-steps N made
    an update of N of them; now --batch-size is the batch per update."""
    if d.get("format") != 2:
        return d
    d = {**d, "config": dict(d["config"]), "run": dict(d["run"]), "format": FORMAT}
    batch, accum = int(d["config"]["batch_size"]), int(d["config"].get("grad_accum_steps", 1))
    world = int(d["run"].get("world_size", 1))
    d["config"].update(batch_size=batch * accum, grad_accum_steps=str(accum))
    d["run"].update(micro_batch=batch // world, accum_steps=accum,
                    eval_batch=max(256, batch // world * 2))
    return d


def _build(cls, values: Any, where: str, section: str):
    """A dataclass from exactly its fields: a key it does not know, or one it lacks, is a damaged
    record."""
    if not isinstance(values, dict):
        raise UserError(f"{where}: section '{section}' is not an object")
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    unknown, missing = sorted(set(values) - names), sorted(required - set(values))
    if unknown or missing:
        what = "; ".join(p for p in (f"unknown keys {', '.join(unknown)}" if unknown else "",
                                     f"missing {', '.join(missing)}" if missing else "") if p)
        raise UserError(f"{where}: section '{section}' does not match this version's run record "
                        f"({what})")
    return cls(**values)


def read_record(path: str | Path) -> RunRecord:
    """A run's config.json, validated and typed."""
    return RunRecord.from_dict(read_json(path, required=True), str(path))


@dataclass
class Summary:
    """summary.json: the test of best.pt and of the final epoch's weights, and what the run cost."""

    test_acc: float
    test_loss: float
    test_acc_final: float
    test_loss_final: float
    test_images: int
    tested: str
    best_epoch: int
    best_val_acc: float
    final_val_acc: float
    epochs_run: int
    epochs_planned: int
    train_time_s: float
    params: int
    flops_per_image: int
    peak_gpu_mem_gb: float | None
    val_is_test: bool
    format: int = FORMAT


def read_summary(path: str | Path) -> Summary | None:
    """A run's summary.json, or None when the run has not been tested yet."""
    path = Path(path)
    if not path.is_file():
        return None
    d = read_json(path)
    check_format(d, str(path), "a summary")
    return _build(Summary, {**d, "format": FORMAT}, str(path), "summary")


def read_json(path: str | Path, required: bool = False) -> dict:
    path = Path(path)
    if not path.is_file():
        if required:
            raise UserError(f"{path} does not exist")
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); delete it and --resume the "
                        "run to write it again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return data
