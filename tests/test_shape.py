"""The shape the other issues build on: each flag declared once (parser, range checks, identity and
comparability derived from the declarations), one typed and versioned run record, the head sized to
the data's classes, the resume command parsed rather than pattern-matched, and one output
channel."""
from __future__ import annotations

import ast
import dataclasses
import json
import shutil

import pytest

from common import config as C
from common.errors import UserError
from common.record import FORMAT, RunRecord, read_record
from conftest import PHOTOS, ROOT, fake_record, one_line_error_in_process, train


def test_every_declared_setting_has_its_flag_help_and_range():
    parser = C.build_parser("x", "resnet18")
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(C.TrainConfig):
        a = actions[f.name]
        assert a.help == f.metadata["help"] and C.flag_of(f) in a.option_strings, f.name
        assert a.default == (f.default if f.name != "model" else "resnet18"), f.name
        check = f.metadata["check"]
        if check is not None:
            low = check.lo - 1 if not check.open_lo else check.lo
            with pytest.raises(UserError, match=C.flag_of(f)):
                C.TrainConfig(**{f.name: type(f.default if f.default is not None
                                              else 0.5)(low)}).validate()
    assert set(C.IDENTITY_KEYS) <= set(actions) and set(C.COMPARE_KEYS) <= set(actions)
    assert "epochs" not in C.IDENTITY_KEYS, ("--epochs may change on resume (the cosine is "
                                             "retargeted)")
    assert ({"lr", "epochs", "img_size", "weight_decay"} <= set(C.COMPARE_KEYS)
            and "seed" not in C.COMPARE_KEYS)
    assert {"batch_size"} <= set(C.COMPARE_KEYS) & set(C.IDENTITY_KEYS), (
        "the batch per update is the experiment's")
    assert "grad_accum_steps" not in set(C.COMPARE_KEYS) | set(C.IDENTITY_KEYS), (
        "the micro-batch may change between epochs; the run record's micro-batch is compared")


def test_a_new_setting_is_one_declaration(monkeypatch):
    """Declaring a field is all it takes: the parser has its flag, validate() its range, the
    identity its key."""
    fields = [(f.name, f.type, f) for f in dataclasses.fields(C.TrainConfig)]
    extra = ("my_knob", "float", C.opt(0.5, "A new knob.", C.OPTIM, check=C.Range(0, 1),
                                       identity=True, compare=True))
    New = dataclasses.make_dataclass("TrainConfig", fields + [extra], bases=(C.TrainConfig,))
    monkeypatch.setattr(C, "TrainConfig", New)
    args = C.build_parser("x", "resnet18").parse_args(["--my-knob", "0.25"])
    assert args.my_knob == 0.25
    with pytest.raises(UserError, match=r"--my-knob must be between 0 and 1"):
        New(my_knob=2.0).validate()
    assert "my_knob" in C._keys("identity") and "my_knob" in C._keys("compare")


def test_abbreviated_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        C.build_parser("x", "resnet18").parse_args(["--epoch", "3"])
    assert "unrecognized flag --epoch (did you mean --epochs?)" in capsys.readouterr().err


def test_the_resume_command_drops_stop_after_epoch_in_either_form():
    argv = ["--epochs", "30", "--stop-after-epoch=5", "--lr", "1e-3", "--stop-after-epoch", "7",
            "--resume", "--output-dir", "runs/x"]
    assert C.strip_flags(
        argv, {"resume", "stop_after_epoch"}) == ["--epochs", "30", "--lr", "1e-3", "--output-dir",
                                                                   "runs/x"]


def test_the_run_record_round_trips_and_refuses_other_formats(tmp_path):
    record = fake_record("tiny_vit_5m_224", pretrained=True, lr=1e-3)
    d = json.loads(json.dumps(record.to_dict()))
    assert d["format"] == FORMAT and RunRecord.from_dict(d, "x") == record
    for damage, words in ((lambda d: d.update(format=1), "format 1"),
                          (lambda d: d.pop("format"), "older layout"),
                          (lambda d: d["config"].update(bogus=1), "unknown keys bogus"),
                          (lambda d: d["model"].pop("params"), "missing params")):
        broken = json.loads(json.dumps(d))
        damage(broken)
        path = tmp_path / "config.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(UserError, match=words) as e:
            read_record(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_an_image_folder_of_three_classes_trains_a_three_way_head(tmp_path):
    data = tmp_path / "three"
    for split, take in (("train", slice(4, None)), ("test", slice(0, 4))):
        for cls in ("cat", "dog", "ship"):
            for f in sorted((PHOTOS / cls).glob("*.png"))[take]:
                (data / split / cls).mkdir(parents=True, exist_ok=True)
                shutil.copy(f, data / split / cls / f.name)
    out = tmp_path / "run"
    assert train("train_resnet_cifar", "--model", "test_resnet", "--no-pretrained", "--epochs", "1",
                 "--data-dir", str(data), "--img-size", "32", "--batch-size", "8", "--val-size",
                 "8", "--num-workers", "0", "--output-dir", str(out)) == 0
    record = read_record(out / "config.json")
    assert record.model.num_classes == 3 and record.data.classes == ["cat", "dog", "ship"]
    import torch

    assert torch.load(out / "best.pt", weights_only=True)["model"]["fc.weight"].shape[0] == 3


def test_no_module_in_common_prints():
    """One output channel: logging; the `error:` and `interrupted:` lines are printed by
    errors.exit_on_user_error alone (a user error, a broken install, a second Ctrl+C)."""
    for path in (ROOT / "common").rglob("*.py"):
        calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)
                 and getattr(n.func, "id", None) == "print"]
        allowed = 3 if path.name == "errors.py" else 0
        assert len(calls) == allowed, f"{path.relative_to(ROOT)} prints ({len(calls)} print calls)"


def test_the_demo_is_a_thin_shell():
    assert len((ROOT / "show_resnet_example.py").read_text().splitlines()) < 120


def test_a_write_error_names_the_callers_remedy(tmp_path, monkeypatch, capsys):
    """atomic_write says what failed; the train script adds its own flags to the advice."""
    from common.errors import WriteError
    from common.files import atomic_write

    monkeypatch.setenv("CIFAR_FAILPOINT", "write:x.json@enospc")
    with pytest.raises(WriteError) as e:
        atomic_write(tmp_path / "x.json", "{}")
    assert "--output-dir" not in str(e.value) and "--resume" not in str(e.value)
    monkeypatch.delenv("CIFAR_FAILPOINT")


def test_every_planted_bug_of_the_mutation_audit_still_finds_its_line():
    """tests/mutation_audit.py plants each bug by replacing a snippet that must occur exactly once:
    a refactor that moves the line makes the audit silently useless, so the suite says so."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mutation_audit",
                                                  ROOT / "tests" / "mutation_audit.py")
    audit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(audit)
    stale = [f"{name} ({file}: {(ROOT / file).read_text().count(old)} matches)"
             for name, file, old, _, _ in audit.MUTATIONS
             if (ROOT / file).read_text().count(old) != 1]
    assert not stale, stale
    assert all((ROOT / t.split("::")[0]).exists() for *_, tests in audit.MUTATIONS
               for t in tests.split()
               if t.startswith("tests/"))
