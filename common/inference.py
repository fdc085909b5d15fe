"""A trained run loaded back to predict: its model from a checkpoint (or its run folder), its
record, the Evaluator it was tested with (eval transform, evaluation dtype), its test set, and your
own photos turned into CIFAR-sized images as training saw them. The prediction demo and the tests
use this, not the script."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .engine import Evaluator
from .errors import LoadError, UserError, hint
from .models import build_model
from .record import RunRecord, Summary, read_record, read_summary
from .runfolder import BEST, SUMMARY
from .runtime import resolve_amp
from .specs import resolve_model
from .state import load_model_state

# a 40-megapixel photo decodes to 120 MB; larger files are refused before decoding
MAX_PIXELS = 40_000_000


@dataclass
class TrainedRun:
    model: nn.Module             # in eval mode, on `evaluator.device`
    record: RunRecord
    checkpoint: Path
    evaluator: Evaluator

    @property
    def folder(self) -> Path:
        return self.checkpoint.parent

    @property
    def classes(self) -> list[str]:
        return list(self.record.data.classes)

    @property
    def summary(self) -> Summary | None:
        return read_summary(self.folder / SUMMARY)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities of uint8 images (n, 3, 32, 32), evaluated as the run's test was."""
        return self.evaluator.predict(self.model, images)

    def test_set(self, data_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The run's test images (its subset too), as its final test saw them."""
        from .data.sources import open_source
        from .data.splits import make_splits

        c = self.record.config
        path = data_dir or self.record.data.path or c.data_dir
        source = open_source(path, dummy=c.dummy, download=False, cache_dir=c.cache_dir,
                             skip_bad_images=c.skip_bad_images)
        if source.sha256 != self.record.data.sha256:
            raise UserError(f"{path} holds other images than the run was trained on (content hash "
                            f"{source.sha256[:12]}, the run's {self.record.data.sha256[:12]}); "
                            "pass --data-dir with the run's data")
        splits = make_splits(source, 0, c.split_seed, 0, c.test_subset)
        return splits.test_x, splits.test_y


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint given as the file itself or as its run folder (then its best.pt)."""
    path = Path(path)
    if path.is_dir():
        if not (path / BEST).is_file():
            raise UserError(f"{path} is a folder without {BEST}: give a run folder that holds "
                            "best.pt, or the checkpoint file itself (best.pt or last.pt)")
        return path / BEST
    return path


def load_trained_run(path: str | Path, device: torch.device,
                     config: str | None = None) -> TrainedRun:
    """The trained model (eval mode) and its record, from a checkpoint or run folder (and optionally
    the run's config.json, which must agree with the checkpoint on the model and image size)."""
    checkpoint = checkpoint_path(path)
    with hint(LoadError, "pass the right --checkpoint (a run folder or its best.pt / last.pt)"):
        state = load_checkpoint(checkpoint, map_location="cpu")
    record = RunRecord.from_dict(state["record"], str(checkpoint))
    if config:
        given = read_record(config)
        for key in ("model", "img_size"):
            mine, theirs = getattr(record.config, key), getattr(given.config, key)
            if mine != theirs:
                raise UserError(f"--config {config} has {key} {theirs!r} but --checkpoint "
                                f"{checkpoint} was trained with {mine!r}; pass the config.json of "
                                "the run that wrote it")
        record = given
    model, _ = build_model(resolve_model(record.config.model, False), record.config.img_size,
                           record.model.num_classes)
    load_model_state(model, state["model"], str(checkpoint))
    from .data.augment import EvalTransform

    amp = (None if record.run.eval_dtype == "fp32"
           else resolve_amp(True, record.run.eval_dtype, device))
    evaluator = Evaluator(EvalTransform(record.recipe, record.config.img_size), 250, device, amp,
                          record.config.channels_last)
    if record.config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return TrainedRun(model.to(device).eval(), record, checkpoint, evaluator)


def load_images(paths: list[str]) -> tuple[torch.Tensor, list]:
    """Your images, any size and mode -> uint8 (n, 3, 32, 32) resized to CIFAR's size as training
    saw them, plus the originals for display. Files over MAX_PIXELS are refused before they are
    decoded."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    out, originals = [], []
    # opening reads the header only; the size check below is ours, with a clear message
    Image.MAX_IMAGE_PIXELS = None
    for p in paths:
        try:
            with Image.open(p) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise UserError(f"--image {p} is {im.width}x{im.height} pixels, over the "
                                    f"{MAX_PIXELS // 1_000_000}-megapixel limit; shrink it first")
                im.draft("RGB", (256, 256))  # JPEG: decode at a reduced scale, far less memory
                rgb = im.convert("RGB")
        except FileNotFoundError:
            raise UserError(f"--image {p}: no such file") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise UserError(f"--image {p} is not a readable image ({e})") from None
        rgb.thumbnail((512, 512))
        originals.append(np.asarray(rgb))
        small = rgb.resize((32, 32), Image.Resampling.BICUBIC, reducing_gap=3.0)
        out.append(torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1))
    return torch.stack(out), originals


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, k: int) -> torch.Tensor:
    """(k, k) counts: row = true class, column = predicted class."""
    matrix = torch.zeros(k, k, dtype=torch.long)
    matrix.index_put_((labels.long(), predicted.long()),
                      torch.ones_like(predicted, dtype=torch.long), accumulate=True)
    return matrix


def per_class_recall(matrix: torch.Tensor) -> torch.Tensor:
    """Per-class accuracy (recall): the diagonal over each true class's row total."""
    return matrix.diag().float() / matrix.sum(1).clamp(min=1)


def agreement_with_summary(run: TrainedRun, accuracy: float) -> str:
    """Whether `accuracy` over the test set is summary.json's figure for this checkpoint, in
    words."""
    summary = run.summary
    key = "test_acc" if run.checkpoint.name == BEST else "test_acc_final"
    if summary is None:
        return "no summary.json to compare with"
    expected = getattr(summary, key)
    if abs(expected - accuracy) < 1e-9:
        return f"= summary.json's {key} of {run.checkpoint.name}"
    tested_on = run.record.environment_now or run.record.environment
    if tested_on.device.split(":")[0] != run.evaluator.device.type:
        return (f"summary.json says {expected:.2%} ({key}), tested on {tested_on.device}; here on "
                f"{run.evaluator.device.type}: arithmetic differs slightly between devices")
    return f"summary.json says {expected:.2%} ({key}): different data or weights"
