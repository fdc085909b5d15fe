"""What may change between a run and its resume, and between runs that are compared: every setting
of TrainConfig is declared (common/config.py) `identity` (--resume refuses a change), `compare`
(runs that differ are not pooled or compared), both, or neither, and the ones declared neither are
listed here with the reason a change of them leaves the result alone or is guarded another way. The
declarations are tested field by field for what they do, so that dropping one fails a test, and a
new setting that changes the result cannot be added without a declaration."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from conftest import fake_record
from test_analysis import right, write_run

from common import analysis
from common.config import COMPARE_KEYS, IDENTITY_KEYS, TrainConfig
from common.data.augment import recipe_of, resolve_recipe
from common.errors import UserError
from common.runfolder import load_run
from common.trainer import check_resume

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# the result's settings: a resume must keep them, and runs that differ in them are not compared
BOTH = {"batch_size", "lr", "weight_decay", "decay_norm_and_bias", "optimizer", "momentum",
        "sched_step", "min_lr_ratio", "warmup_epochs", "label_smoothing", "mixup", "cutmix",
        "grad_clip", "head_lr_mult", "img_size", "drop_last", "amp_eval"}
# a resume must keep them; comparisons see them another way
IDENTITY_ONLY = {
    "model": "what is compared: each model and its weights is a setting",
    "pretrained": "the same", "weights_file": "the same (the file's hash: weights.sha256)",
    "freeze_backbone": "the same (a probe is its own setting)",
    "zero_init_last": "the same (an init is its own setting)",
    "seed": "the seeds of one setting are pooled",
    "split_seed": "compared as the split (data.splits)", "val_size": "the same",
    "val_split": "the same", "test_subset": "the same",
    "train_subset": "compared as the training set (each size on its own)",
    "dummy": "compared as the data (its name and hash)"}
# a resume may change them; runs that differ in them are not compared
COMPARE_ONLY = {"epochs": "a resume may lengthen the schedule (the cosine is retargeted)",
                "patience": "a resume may stop earlier or later"}
# declared neither: resolved into a part of the record that is checked, or no effect on the result
RESOLVED = {
    "aug": "recipe", "crop_scale_min": "recipe", "randaug_ops": "recipe",
    "randaug_magnitude": "recipe", "re_prob": "recipe", "re_mode": "recipe", "eval_crop": "recipe",
    "amp": "run.amp_dtype", "amp_dtype": "run.amp_dtype", "data_pipeline": "run.data_pipeline",
    "data_dir": "data.sha256", "skip_bad_images": "data.sha256",
    "grad_accum_steps": "run.micro_batch (compared; may change at an epoch boundary)"}
PERFORMANCE_ONLY = {"device", "channels_last", "deterministic", "compile", "num_workers",
                    "cache_dir", "download", "output_dir", "resume", "overwrite",
                    "stop_after_epoch", "progress_every"}


def another(name: str, value):
    """A valid value of the setting other than `value`."""
    f = FIELDS[name]
    special = {"model": "resnet34", "weights_file": "other.pth", "zero_init_last": False,
               "warmup_epochs": 0.5, "momentum": 0.5, "min_lr_ratio": 0.5,
               "label_smoothing": 0.1, "img_size": 64, "batch_size": 64, "grad_accum_steps": "2",
               "data_dir": "elsewhere/cifar-10-batches-py", "re_mode": "const"}
    if name in special:
        return special[name]
    if f.metadata["choices"]:
        return next(c for c in f.metadata["choices"] if c != value)
    if isinstance(value, bool) or f.type in ("bool", "bool | None"):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.25
    if value is None:
        return {"int | None": 1, "float | None": 0.5, "str | None": "x"}[f.type]
    return f"{value}-other"


def test_every_setting_is_declared_or_listed_with_why_it_may_differ():
    """Fails when a setting that changes the result loses its declaration, or when a new setting is
    added without saying which it is."""
    listed = BOTH | set(IDENTITY_ONLY) | set(COMPARE_ONLY) | set(RESOLVED) | PERFORMANCE_ONLY
    assert set(FIELDS) == listed, ("declare each new TrainConfig field and list it here: "
                                   f"{sorted(set(FIELDS) ^ listed)}")
    assert set(IDENTITY_KEYS) == BOTH | set(IDENTITY_ONLY), sorted(
        set(IDENTITY_KEYS) ^ (BOTH | set(IDENTITY_ONLY)))
    assert set(COMPARE_KEYS) == BOTH | set(COMPARE_ONLY), sorted(
        set(COMPARE_KEYS) ^ (BOTH | set(COMPARE_ONLY)))


def _checkpoint(**config):
    record = fake_record("resnet18", pretrained=True, **config)
    return record, {"record": record.to_dict(), "step": 0, "epoch": 2, "finished": False,
                    "best": {"acc": 0.5, "epoch": 2, "since": 0}}


@pytest.mark.parametrize("name", sorted(BOTH | set(IDENTITY_ONLY)))
def test_a_resume_refuses_another_value_of_every_identity_setting(name, tmp_path):
    record, ckpt = _checkpoint()
    saved = record.config
    changed = dataclasses.replace(saved, output_dir=str(tmp_path),
                                  **{name: another(name, getattr(saved, name))}).validate()
    with pytest.raises(UserError, match="--resume refused") as e:
        check_resume(changed, ckpt)
    assert f"{name}: " in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("name", sorted(set(COMPARE_ONLY) | set(RESOLVED) | PERFORMANCE_ONLY))
def test_a_resume_lets_the_other_settings_change(name, tmp_path):
    """What the flags resolved to is checked separately (below); the flags themselves may be
    respelled (--amp-dtype bf16 where auto was bf16), and the performance ones changed."""
    record, ckpt = _checkpoint()
    saved = record.config
    value = getattr(saved, name)
    new = {"epochs": saved.epochs + 4, "output_dir": str(tmp_path / "elsewhere")}.get(
        name, another(name, value))
    changed = dataclasses.replace(saved, **{"output_dir": str(tmp_path), name: new}).validate()
    assert check_resume(changed, ckpt) is False


# what the flags resolve to, in the run record: a resume must find the same
RESOLVED_IDENTITY = {
    "recipe": lambda r: dataclasses.replace(r, recipe=resolve_recipe("reference", re_prob=0.5)),
    "data.sha256": lambda r: dataclasses.replace(r, data=dataclasses.replace(r.data,
                                                                            sha256="d" * 64)),
    "run.amp_dtype": lambda r: dataclasses.replace(r, run=dataclasses.replace(r.run,
                                                                             amp_dtype="fp16")),
    "run.data_pipeline": lambda r: dataclasses.replace(r, run=dataclasses.replace(
        r.run, data_pipeline="cpu")),
    "weights.sha256": lambda r: dataclasses.replace(r, weights=dataclasses.replace(
        r.weights, sha256="v" * 64)),
}


@pytest.mark.parametrize("key", sorted(RESOLVED_IDENTITY))
def test_a_resume_refuses_what_the_flags_resolved_to_when_it_differs(key, tmp_path):
    record, ckpt = _checkpoint()
    assert set(record.resolved_identity()) == set(RESOLVED_IDENTITY)
    cfg = dataclasses.replace(record.config, output_dir=str(tmp_path))
    assert check_resume(cfg, ckpt, record) is False, "the same record resumes"
    with pytest.raises(UserError, match=f"--resume refused: .*{key} differs"):
        check_resume(cfg, ckpt, RESOLVED_IDENTITY[key](record))


@pytest.mark.parametrize("name", sorted(n for n, where in RESOLVED.items() if where == "recipe"))
def test_every_augmentation_flag_reaches_the_recipe(name):
    """The recipe is what the resume identity and the comparison check; each of its flags must
    change it."""
    cfg = TrainConfig().validate()
    changed = dataclasses.replace(cfg, **{name: another(name, getattr(cfg, name)) if name != "aug"
                                          else "light"})
    assert recipe_of(changed) != recipe_of(cfg)


def _two_runs(tmp_path, edit):
    """Two seeds of one setting (their pooling is what a difference must stop), the second's
    config.json edited."""
    a = write_run(tmp_path / "a", "resnet18", False, right(0.6), seed=0)
    b = write_run(tmp_path / "b", "resnet18", False, right(0.62), seed=1)
    d = json.loads((b / "config.json").read_text())
    edit(d)
    (b / "config.json").write_text(json.dumps(d))
    return [load_run(a), load_run(b)]


@pytest.mark.parametrize("name", sorted(BOTH | set(COMPARE_ONLY)))
def test_runs_that_differ_in_a_compared_setting_are_not_pooled(name, tmp_path):
    saved = fake_record("resnet18", pretrained=False).config
    runs = _two_runs(tmp_path, lambda d: d["config"].update(
        {name: another(name, getattr(saved, name))}))
    with pytest.raises(UserError, match="the runs are not comparable") as e:
        analysis.compare(runs)
    assert f"{name}: " in str(e.value)


@pytest.mark.parametrize("key,edit", [
    ("recipe", lambda d: d["recipe"].update(re_prob=0.5)),
    ("data", lambda d: d["data"].update(sha256="d" * 64)),
    ("data.splits", lambda d: d["data"]["splits"].update(split_seed=3)),
    ("micro-batch", lambda d: d["run"].update(micro_batch=64)),
])
def test_runs_that_differ_in_what_was_resolved_are_not_pooled(key, edit, tmp_path):
    with pytest.raises(UserError, match=f"the runs are not comparable: {key}"):
        analysis.compare(_two_runs(tmp_path, edit))


def test_alike_runs_are_pooled(tmp_path):
    """The control: the same two runs unedited are one setting of two seeds."""
    settings = analysis.compare(_two_runs(tmp_path, lambda d: None)).settings
    assert [len(s.runs) for s in settings] == [2]


# ----------------------------------------------------------------------------- format versions

@pytest.mark.parametrize("file", ["config.json", "summary.json"])
def test_a_record_of_a_newer_format_is_one_line_that_says_to_update(file, tmp_path, capsys):
    import compare_runs
    from conftest import one_line_error_in_process

    folder = write_run(tmp_path / "run", "resnet18", False, right(0.6))
    d = json.loads((folder / file).read_text())
    d["format"] = d["format"] + 1
    (folder / file).write_text(json.dumps(d))
    shutil.copy(folder / file, tmp_path / "kept")
    one_line_error_in_process(compare_runs.main, [str(folder), "--safe"], capsys,
                              str(folder / file), f"format {d['format']}, newer than this "
                              "version reads", "git pull")
    assert (folder / file).read_bytes() == (tmp_path / "kept").read_bytes(), "left as it was"
