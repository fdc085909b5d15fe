"""The behaviours a planted-bug audit found unguarded, each tested as what a user depends on (and
its neighbours: the other ops, the other flags, the boundaries): the device pipeline's resampling,
ops and epochs; the split seed end to end; the loss, mixup and patience; per-class recall and seed
groups; rank 0 alone writes."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from common.data import device_ops as D
from common.data.augment import resolve_recipe
from common.data.streams import CpuTrainStream, DeviceTrainStream
from conftest import SMALL, real_photos, train
from test_analysis import N_TEST, write_run

CPU = torch.device("cpu")
TINY = ["--model", "test_resnet", "--no-pretrained", "--data-dir"]


@pytest.fixture(scope="module")
def photos():
    return real_photos()


# ----------------------------------------------------------------------------- the device pipeline

def test_the_device_crop_resamples_with_the_recipes_bicubic_filter(photos):
    """The reference recipe's crop is Pillow's bicubic: each crop (and flip) against Pillow's crop +
    resize of that box, off by one grey level on a few pixels at most; a bilinear resample of the
    same boxes is far off."""
    from common.data.resample import resize_crops

    x, _ = photos
    recipe = resolve_recipe("reference", ra_ops=0, re_prob=0.0)
    aug = D.make_device_augment(recipe, 96)
    plan = aug.sample(64, torch.Generator().manual_seed(1))
    mean, std = (torch.tensor(recipe.mean).view(1, 3, 1, 1),
                 torch.tensor(recipe.std).view(1, 3, 1, 1))
    ours = (aug.finish(aug.apply(x[:64], plan)) * std + mean) * 255
    ref = []
    for img, (top, left, h, w), flip in zip(x[:64], plan["crops"].tolist(), plan["flips"].tolist()):
        pil = Image.fromarray(img.permute(1, 2, 0).numpy()).crop((left, top, left + w, top + h))
        pil = pil.resize((96, 96), Image.BICUBIC)
        if flip:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        ref.append(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float())
    ref = torch.stack(ref)
    diff = (ours - ref).abs()
    assert float(diff.max()) <= 1.01 and float((diff > 0.5).float().mean()) < 0.01
    assert plan["flips"].any() and not plan["flips"].all(), "both kinds of image were checked"
    bilinear = resize_crops(x[:64], plan["crops"], 96, "bilinear", plan["flips"])
    assert float((bilinear - ref).abs().mean()) > 0.5


@pytest.mark.parametrize("name", D.TIMM_OPS)
def test_each_reference_op_changes_exactly_the_images_that_drew_it(photos, name):
    """Force op `name` on every other image of a batch through the plan sample() makes: those images
    change, the others stay as the plain crop left them."""
    x, _ = photos
    recipe = resolve_recipe("reference", ra_ops=1, re_prob=0.0)
    aug = D.ReferenceAugment(recipe, 48)
    gen = torch.Generator().manual_seed(0)
    plan = aug.sample(64, gen)
    k = D.TIMM_OPS.index(name)
    plan_ops = plan["ops"].clone()
    plan_ops[0] = k
    apply = torch.zeros_like(plan["apply"])
    apply[0, ::2] = True
    magnitude = torch.full_like(plan["magnitude"], 9.0)
    forced = _replan(aug, plan, plan_ops, apply, magnitude)
    none = _replan(aug, plan, plan_ops, torch.zeros_like(apply), magnitude)
    out, base = aug.apply(x[:64], forced), aug.apply(x[:64], none)
    changed = (out - base).abs().flatten(1).amax(1) > 1e-6
    assert not changed[1::2].any(), "an image that did not draw the op changed"
    assert float(changed[::2].float().mean()) >= 0.8, (name, float(changed[::2].float().mean()))


def _replan(aug, plan, ops, apply, magnitude):
    """The plan sample() would make for these op choices (same crops, flips, boxes)."""
    gen_free = {**plan, "ops": ops, "apply": apply, "magnitude": magnitude}
    entries = []
    for layer in range(ops.shape[0]):
        geo_idx, geo_mats = [], []
        for k, name in enumerate(D.TIMM_OPS):
            sel = torch.nonzero((ops[layer] == k) & apply[layer]).flatten()
            if not len(sel):
                continue
            m, s = magnitude[layer][sel], plan["signs"][layer][sel]
            if name in D.GEOMETRIC_SCALE:
                geo_idx.append(sel)
                geo_mats.append(D._affine_matrix(name, m.double() / 10 * D.GEOMETRIC_SCALE[name]
                                                 * s.double(), aug.size))
            else:
                entries.append((name, sel, m, s))
        if geo_idx:
            entries.append(("affine", torch.cat(geo_idx), torch.cat(geo_mats), None))
    gen_free["plan"] = entries
    return gen_free


def test_the_plan_applies_every_op_that_was_drawn(photos):
    """sample()'s plan holds every drawn op once (the geometric ones merged into one affine entry
    per layer): no op is skipped, none applied twice."""
    aug = D.ReferenceAugment(resolve_recipe("reference"), 32)
    plan = aug.sample(2000, torch.Generator().manual_seed(0))
    assert {e[0] for e in plan["plan"]} == (set(D.TIMM_OPS) - set(D.GEOMETRIC_SCALE)) | {"affine"}
    assert (sum(len(e[1]) for e in plan["plan"])
            == int(plan["apply"].sum())), "every drawn op is in the plan once"


def test_the_device_stream_draws_anew_every_epoch(photos):
    """The per-chunk generator depends on the epoch: the same chunk of two epochs is seeded
    differently, and a photo is augmented differently even where it sits at the same place in both
    epochs."""
    x, y = photos
    stream = DeviceTrainStream(x, y, resolve_recipe("reference"), 32, 50, 0, CPU)
    seeds = {}
    real = stream.augment.sample

    def recording(n, gen):
        seeds.setdefault(epoch, []).append(gen.initial_seed())
        return real(n, gen)

    stream.augment.sample = recording
    for epoch in (0, 1):
        list(stream.epoch(epoch))
    assert not set(seeds[0]) & set(seeds[1]) and len(seeds[0]) == len(set(seeds[0]))



def test_the_cpu_stream_draws_anew_every_epoch(photos):
    """The per-sample seed depends on the epoch: a photo at the same place in two epochs (here the
    only photo) is augmented differently, and the same epoch drawn twice is the same."""
    x, y = photos
    stream = CpuTrainStream(x[:1], y[:1], resolve_recipe("reference"), 32, 1, 0, 0, CPU)
    first, second, again = (next(iter(stream.epoch(e)))[0] for e in (0, 1, 1))
    assert not torch.equal(first, second)
    assert torch.equal(second, again)

# ---------------------------------------------------------------------------- the split, end to end

def test_two_seeds_with_one_split_seed_share_their_validation_set_exactly(cifar_dir, tmp_path):
    flags = [*TINY, str(cifar_dir), "--epochs", "1", *SMALL, "--train-subset", "320"]
    runs = {}
    for name, extra in (("a", ["--seed", "0"]), ("b", ["--seed", "5"]),
                        ("c", ["--split-seed", "1"])):
        assert train("train_resnet_cifar", *flags, *extra, "--output-dir",
                     str(tmp_path / name)) == 0
        runs[name] = json.loads(
            (tmp_path / name / "config.json").read_text())["data"]["splits"]["indices_sha256"]
    assert runs["a"] == runs["b"], "--seed must not move the split"
    assert runs["a"] != runs["c"], "--split-seed must"


# ------------------------------------------------------------------------ the loss, mixup, patience

def test_the_default_loss_is_plain_cross_entropy_without_mixup():
    from common.config import TrainConfig
    from common.engine import build_loss_and_mixup

    cfg = TrainConfig()
    assert (cfg.label_smoothing, cfg.mixup, cfg.cutmix) == (0.0, 0.0, 0.0)
    loss, mixup = build_loss_and_mixup(cfg.label_smoothing, cfg.mixup, cfg.cutmix, 10)
    assert mixup is None and loss.label_smoothing == 0.0
    logits, y = torch.randn(8, 10), torch.arange(8)
    assert torch.allclose(loss(logits, y), torch.nn.functional.cross_entropy(logits, y))
    smoothed, _ = build_loss_and_mixup(0.1, 0.0, 0.0, 10)
    assert not torch.allclose(smoothed(logits, y), loss(logits, y)), ("the flag is the only way "
                                                                      "to smooth")


def test_validation_sees_no_mixup(cifar_dir, tmp_path):
    """With --mixup, the logged validation accuracy is that of the epoch's weights on the plain
    validation images, recomputed apart from the trainer."""
    from common.inference import load_trained_run

    out = tmp_path / "run"
    assert train("train_resnet_cifar", *TINY, str(cifar_dir), "--epochs", "1", *SMALL, "--mixup",
                 "0.8", "--output-dir", str(out)) == 0
    run = load_trained_run(out / "last.pt", CPU)
    from common.data.sources import open_source
    from common.data.splits import make_splits

    c = run.record.config
    splits = make_splits(open_source(c.data_dir), c.val_size, c.split_seed, c.train_subset,
                         c.test_subset)
    acc = float((run.predict(splits.val_x).argmax(1) == splits.val_y).float().mean())
    assert pd.read_csv(out / "metrics.csv")["val_acc"].iloc[-1] == pytest.approx(acc, abs=1e-6)


@pytest.mark.parametrize("patience,stops_after", [(1, 3), (2, 4), (3, 5)])
def test_patience_stops_exactly_after_n_epochs_without_a_better_one(
        cifar_dir, tmp_path, monkeypatch, patience, stops_after):
    """Validation accuracies 0.5, 0.6, then 0.6 (a tie is no better), 0.55, 0.4, 0.9: with
    --patience N the run ends after epoch 2 + N."""
    from common.engine import Evaluator

    real = Evaluator.__call__
    scripted = iter([0.5, 0.6, 0.6, 0.55, 0.4, 0.9])

    def fake(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        if not kwargs.get("keep_probs"):
            result["acc"] = next(scripted)
        return result

    monkeypatch.setattr(Evaluator, "__call__", fake)
    out = tmp_path / "run"
    assert train("train_resnet_cifar", *TINY, str(cifar_dir), "--epochs", "6", *SMALL,
                 "--train-subset", "320", "--patience", str(patience), "--output-dir",
                 str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == stops_after and summary["best_epoch"] == 2


# ----------------------------------------------------------------------------- analysis

def test_per_class_accuracy_is_recall_from_a_hand_computed_confusion(tmp_path):
    """Class 0 images all predicted 0; class 1 images half predicted 0: class 0's recall is 100%
    (its precision would be 2/3), class 1's 50%."""
    from common import analysis
    from common.runfolder import load_run

    folder = write_run(tmp_path / "r", "resnet18", False)
    preds = pd.read_csv(folder / "test_predictions.csv")
    labels = preds["label"].to_numpy()
    pred = labels.copy()
    ones = np.flatnonzero(labels == 1)
    pred[ones[: len(ones) // 2]] = 0
    preds["best_pred"] = pred
    preds.to_csv(folder / "test_predictions.csv", index=False)
    pc = analysis.per_class(analysis.group_settings([load_run(folder)])[0])
    assert pc.acc[0] == pytest.approx(1.0) and pc.acc[1] == pytest.approx(0.5)
    assert pc.counts[0] == pc.counts[1] == N_TEST // 10


def test_a_seed_group_cell_summarises_every_seed(tmp_path):
    from common import analysis
    from common.results_md import accuracy_cell
    from common.runfolder import load_run
    from test_analysis import right

    runs = [load_run(write_run(tmp_path / f"s{i}", "resnet18", False, right(acc), seed=i))
            for i, acc in enumerate((0.7, 0.8, 0.9))]
    cell = accuracy_cell(analysis.group_settings(runs)[0])
    assert cell == "80.00% ± 10.00 (70.0%–90.0%, 3 seeds)"


# -------------------------------------------------------------------- torchrun: rank 0 alone writes

def test_a_rank_other_than_0_writes_nothing(cifar_dir, tmp_path, monkeypatch):
    """The rank-0-writes rule, without a process group: the same run as rank 1 of a world of 1
    trains and evaluates but writes no file (no config.json, metrics.csv, checkpoint, event file or
    summary)."""
    from common import distributed, trainer

    monkeypatch.setattr(distributed, "init_distributed",
                        lambda kind: distributed.DistInfo(rank=1, world=1))
    monkeypatch.setattr(trainer.D, "init_distributed",
                        lambda kind: distributed.DistInfo(rank=1, world=1))
    out = tmp_path / "run"
    out.mkdir()
    assert train("train_resnet_cifar", *TINY, str(cifar_dir), "--epochs", "2", *SMALL,
                 "--output-dir", str(out)) == 0
    assert list(out.iterdir()) == [], [p.name for p in out.iterdir()]


# ----------------------------------------------------------------------------- the loop's edges

def _watch_steps(monkeypatch) -> list[tuple[int, float | None]]:
    """Per training step: its images, and the lr of the update it ends (None mid-accumulation)."""
    from common import engine as E

    seen = []
    real = E.TrainStep.__call__

    def watched(self, x, y):
        update = self.micro + 1 == self.accum_steps
        seen.append((len(x), self.optimizer.param_groups[0]["lr"] if update else None))
        return real(self, x, y)

    monkeypatch.setattr(E.TrainStep, "__call__", watched)
    return seen


@pytest.mark.parametrize("sched_step", ["step", "epoch"])
def test_each_update_trains_at_the_schedules_lr_for_it(cifar_dir, tmp_path, monkeypatch,
                                                       sched_step):
    """2 epochs of 5 updates (330 images in batches of 64: the last 10 dropped, the default): the
    k-th update (from 0) trains at lr x (0.01 + 0.99 x (1 + cos(pi k / 10)) / 2) with --sched-step
    step, and the epoch's with epoch: the scheduler steps after the optimizer (pytest.ini makes
    PyTorch's warning of the other order an error)."""
    seen = _watch_steps(monkeypatch)
    lr = 1e-3
    assert train("train_resnet_cifar", *TINY, str(cifar_dir), "--output-dir", str(tmp_path / "r"),
                 *SMALL, "--train-subset", "330", "--epochs", "2", "--lr", str(lr),
                 "--sched-step", sched_step, "--aug", "light", "--test-subset", "100") == 0
    assert [n for n, _ in seen] == [64] * 10, "each epoch: 5 full batches, the last 10 dropped"
    k = np.arange(10) if sched_step == "step" else np.repeat([0, 1], 5)
    total = 10 if sched_step == "step" else 2
    expected = lr * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * k / total)))
    np.testing.assert_allclose([r for _, r in seen], expected, rtol=1e-9)


@pytest.mark.parametrize("pipeline", ["cpu", "device"])
def test_no_drop_last_trains_the_last_partial_batch(cifar_dir, tmp_path, monkeypatch, pipeline):
    """200 images in batches of 64: with --no-drop-last every epoch trains on all 200 (the last
    batch has 8), on either pipeline, and the epoch's metrics count them."""
    seen = _watch_steps(monkeypatch)
    out = tmp_path / "r"
    assert train("train_resnet_cifar", *TINY, str(cifar_dir), "--output-dir", str(out), *SMALL,
                 "--train-subset", "200", "--epochs", "1", "--no-drop-last", "--aug", "light",
                 "--data-pipeline", pipeline, "--test-subset", "100") == 0
    assert [n for n, _ in seen] == [64, 64, 64, 8]
    assert json.loads((out / "config.json").read_text())["run"]["steps_per_epoch"] == 4
