"""The recipe pinned to the author's code: every value of their two train scripts, each default
equal to it or a departure that README's departures table lists with the flag that undoes it (the
test reads the table). A default that drifts (weight decay 0.05 to 0.04, 30 epochs to 25, batch
128 to 96, 224 px to 192, 5,000 validation images to 4,000, the floor, ...) fails here."""
from __future__ import annotations

import pytest
from conftest import ROOT

from common.config import TrainConfig
from common.data.augment import cpu_train_transform, resolve_recipe
from common.data.resample import eval_geometry
from common.specs import RESNET18, TINYVIT_5M

CFG = TrainConfig()
RECIPE = resolve_recipe(CFG.aug)


def _erasing():
    """timm's RandomErasing in the default CPU transform (the author's create_transform)."""
    tf = cpu_train_transform(RECIPE, 224).transform
    return next(t for t in tf.transforms if type(t).__name__ == "RandomErasing")


# (what, the author's value, ours, the flag that matches theirs when ours departs)
AUTHOR = [
    ("learning rate", 3e-4, lambda: CFG.lr, None),
    ("weight decay", 0.05, lambda: CFG.weight_decay, None),
    ("weight decay on every parameter (AdamW(model.parameters()))", True,
     lambda: CFG.decay_norm_and_bias, None),
    ("optimizer", "adamw", lambda: CFG.optimizer, None),
    ("epochs", 30, lambda: CFG.epochs, None),
    ("batch per update", 128, lambda: CFG.batch_size, None),
    ("input size", 224, lambda: CFG.img_size, None),
    ("evaluation: resize, then centre crop", (256, 224),
     lambda: eval_geometry(CFG.img_size, RECIPE.eval_crop), None),
    ("interpolation", "bicubic", lambda: RECIPE.interpolation, None),
    ("RandAugment", "rand-m9-mstd0.5-inc1", lambda: RECIPE.randaugment, None),
    ("crop scale", (0.08, 1.0), lambda: RECIPE.crop_scale, None),
    ("horizontal flip", 0.5, lambda: RECIPE.hflip, None),
    ("random erasing probability", 0.25, lambda: _erasing().probability, None),
    ("random erasing mode", "pixel", lambda: _erasing().mode, None),
    ("random erasing boxes", 1, lambda: _erasing().max_count, None),
    ("validation images", 5000, lambda: CFG.val_size, None),
    ("schedule steps", "epoch", lambda: CFG.sched_step, None),
    ("cosine floor (the ResNet script's eta_min / lr)", 0.01, lambda: CFG.min_lr_ratio, None),
    ("warm-up", 0.0, lambda: CFG.warmup_epochs, None),
    ("label smoothing", 0.0, lambda: CFG.label_smoothing, None),
    ("mixup", 0.0, lambda: CFG.mixup, None),
    ("cutmix", 0.0, lambda: CFG.cutmix, None),
    ("gradient clipping", 0.0, lambda: CFG.grad_clip, None),
    ("evaluation in fp32", False, lambda: CFG.amp_eval, None),
    ("head learning rate multiplier", 1.0, lambda: CFG.head_lr_mult, None),
    ("early stopping", 0, lambda: CFG.patience, None),
    ("ResNet-18 weights", "a1_in1k", lambda: RESNET18.default_tag, None),
    # the departures, each with the flag README's table gives
    ("training seed", 42, lambda: CFG.seed, "--seed 42"),
    ("validation split", ("random", 42), lambda: (CFG.val_split, CFG.split_seed),
     "--val-split random --split-seed 42"),
    ("last partial batch", False, lambda: CFG.drop_last, "--no-drop-last"),
    ("AMP dtype", "fp16", lambda: {"auto": "bf16 where native"}.get(CFG.amp_dtype, CFG.amp_dtype),
     "--amp-dtype fp16"),
    ("the TinyViT script's floor", 0.1, lambda: CFG.min_lr_ratio, "--min-lr-ratio 0.1"),
    ("the TinyViT fine-tune's epochs (of its 30-epoch schedule)", 21,
     lambda: TINYVIT_5M.published["pretrained"].epochs if CFG.stop_after_epoch == 21 else 30,
     "--stop-after-epoch 21"),
]


def departures_table() -> list[str]:
    """The 'to match theirs' cells of README's departures table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Where the defaults depart from the author's code", 1)[1]
    table = section[section.index("\n|"):].split("\n\n", 1)[0].strip().splitlines()
    rows = [ln for ln in table[2:] if ln.startswith("| ")]  # after the header and the separator
    return [r.rstrip(" |").rsplit(" | ", 1)[-1] for r in rows]


@pytest.mark.parametrize("what,theirs,ours,flag", AUTHOR, ids=[a[0] for a in AUTHOR])
def test_each_default_is_the_authors_value_or_a_listed_departure(what, theirs, ours, flag):
    value = ours()
    if flag is None:
        assert value == theirs, f"{what}: the default is {value!r}, the author's code {theirs!r}"
        return
    assert value != theirs, f"{what} is the author's value: drop it from the departures"
    cells = departures_table()
    assert any(flag in c for c in cells), (f"{what}: ours {value!r}, theirs {theirs!r}, and "
                                           f"README's departures table has no row with {flag}")


def test_the_published_numbers_are_the_authors():
    assert {m: p.final_val_acc for m, p in RESNET18.published.items()} == {
        "pretrained": 95.86, "scratch": 83.16}
    assert {m: (p.final_val_acc, p.epochs, p.schedule_epochs, p.floor)
            for m, p in TINYVIT_5M.published.items()} == {
        "pretrained": (98.36, 21, 30, 0.1), "scratch": (88.02, 30, 30, 0.1)}
