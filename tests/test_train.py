"""End-to-end training on learnable CIFAR-format data: accuracy, run outputs, resume, refusals."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from common.runlog import METRIC_COLUMNS
from conftest import ROOT, SMALL, run_cli


def test_resnet_learns_and_writes_every_output(trained_resnet):
    out = trained_resnet
    for name in ("config.json", "metrics.csv", "best.pt", "last.pt", "summary.json"):
        assert (out / name).is_file(), name
    m = pd.read_csv(out / "metrics.csv")
    assert list(m.columns) == list(METRIC_COLUMNS)
    assert m["epoch"].tolist() == [1, 2]
    assert m[["train_acc", "val_acc"]].apply(lambda c: c.between(0, 1).all()).all()
    assert m["val_acc"].iloc[-1] > 0.5, "10 classes: chance is 0.1; labels and images must line up"
    assert (m["train_img_per_s"] > 0).all() and (m["epoch_time_s"] > 0).all()

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "resnet18" and cfg["pretrained"] is False and cfg["epochs"] == 2
    for key in ("python", "torch", "torchvision", "timm", "device_name", "start_time", "params", "git_commit"):
        assert key in cfg["extra"], key
    assert 11.1e6 < cfg["extra"]["params"] < 11.3e6

    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val_acc"] == pytest.approx(m["val_acc"].max(), abs=1e-5)
    assert summary["best_epoch"] == int(m.loc[m["val_acc"].idxmax(), "epoch"])
    assert summary["test_acc"] > 0.5 and summary["test_images"] == 500
    assert summary["flops_per_image"] > 0 and summary["total_time_s"] > 0

    for name in ("best.pt", "last.pt"):
        ck = torch.load(out / name, weights_only=True)
        for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "best_val_acc", "rng", "config"):
            assert key in ck, (name, key)
        assert isinstance(ck["config"], dict) and ck["config"]["model"] == "resnet18"
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2


def test_tensorboard_has_a_scalar_per_metrics_column(trained_resnet):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained_resnet))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert set(METRIC_COLUMNS) - {"epoch"} <= tags
    assert [e.step for e in acc.Scalars("val_acc")] == [1, 2]


def test_tinyvit_learns_at_32px(cifar_dir, tmp_path):
    from train_tinyvit_cifar import main

    out = tmp_path / "tinyvit"
    assert main(["--no-pretrained", "--epochs", "2", "--data-dir", str(cifar_dir), "--output-dir", str(out),
                 *SMALL]) == 0
    m = pd.read_csv(out / "metrics.csv")
    assert m["val_acc"].iloc[-1] > 0.5
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "tiny_vit_5m_224.dist_in22k_ft_in1k" and 5.0e6 < cfg["extra"]["params"] < 5.2e6


def test_weights_flag_end_to_end(cifar_dir, tmp_path, trained_resnet):
    """A checkpoint of an earlier run works as --weights (its 10-way head loads too)."""
    from train_resnet_cifar import main

    out = tmp_path / "ft"
    assert main(["--weights", str(trained_resnet / "best.pt"), "--epochs", "1", "--data-dir", str(cifar_dir),
                 "--output-dir", str(out), *SMALL]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pretrained"] is True and cfg["weights"].endswith("best.pt")
    assert pd.read_csv(out / "metrics.csv")["val_acc"].iloc[0] > 0.5  # started from a trained model


def test_dummy_runs_without_any_data_folder(tmp_path):
    r = run_cli("train_resnet_cifar.py", "--dummy", "--no-pretrained", "--epochs", "1", "--img-size", "32",
                "--train-subset", "256", "--val-size", "128", "--num-workers", "0",
                "--data-dir", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "summary.json").is_file() and not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("flags,words", [(["--epochs", "0"], "--epochs"), (["--val-size", "-1"], "--val-size"),
                                         (["--batch-size", "0"], "--batch-size")])
def test_bad_flags_are_one_line_errors(tmp_path, flags, words):
    from train_resnet_cifar import main

    with pytest.raises(SystemExit) as e:
        main(["--dummy", "--no-pretrained", "--output-dir", str(tmp_path / "r"), *flags])
    assert e.value.code == 2


def test_check_reports_what_is_missing(tmp_path):
    r = run_cli("check.py", "--data-dir", str(tmp_path))
    assert "torch " in r.stdout and "timm " in r.stdout and "CIFAR-10" in r.stdout
    if not torch.cuda.is_available():
        assert r.returncode == 1 and "no CUDA GPU" in r.stdout
    assert "CIFAR-10 not in" in r.stdout and str(tmp_path) in r.stdout


def test_bench_measures_both_paths_and_models():
    r = run_cli("check.py", "--bench", "--json", "--device", "cpu", "--bench-img-size", "32",
                "--bench-batch-size", "16", "--bench-steps", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)  # --json: stdout is the result alone
    assert set(res["data"]) == {"cpu", "gpu"} and all(v > 0 for v in res["data"].values())
    assert set(res["models"]) == {"resnet18", "tiny_vit_5m_224"}
    for m in res["models"].values():
        assert all(m[k] > 0 for k in ("ceiling", "fed_cpu", "fed_gpu", "eval"))


def test_bench_suite_times_real_epochs_and_projects_the_suite(tmp_path):
    flags = "--img-size 32 --batch-size 64 --train-subset 384 --val-size 128 --test-subset 128 --num-workers 0"
    r = run_cli(str(ROOT / "check.py"), "--bench-suite", "2", "--json", "--device", "cpu",
                "--bench-suite-flags", flags, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["full_epochs"] == 30 and set(res["runs"]) == {"ResNet-18", "TinyViT-5M"}
    for run in res["runs"].values():
        assert run["train_images"] == 384 and run["img_size"] == 32 and run["batch_size"] == 64
        assert run["later_epoch_s"] > 0 and run["setup_s"] > 0
        assert run["projected_run_s"] >= 29 * run["later_epoch_s"] + run["first_epoch_s"]
    assert res["projected_suite_s"] == pytest.approx(2 * sum(x["projected_run_s"] for x in res["runs"].values()))
    assert "epoch   2/2" in r.stderr, "the epoch lines go to stderr, not into the JSON"
    assert not list(tmp_path.iterdir()), "the timed runs leave nothing behind"


@pytest.mark.parametrize("flags, words", [("--batch-size 0", "--batch-size must be"),
                                          ("--bogus 3", "unrecognized arguments: --bogus 3")])
def test_bench_suite_bad_flags_are_one_line(flags, words):
    r = run_cli("check.py", "--bench-suite", "1", "--bench-suite-flags", flags)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr


def test_bench_profile_names_the_operators_a_step_spends_time_in():
    r = run_cli("check.py", "--bench-profile", "tiny_vit_5m_224", "--device", "cpu", "--bench-img-size", "64",
                "--bench-batch-size", "4", "--bench-steps", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "img/s under the profiler" in r.stdout
    assert "aten::convolution_backward" in r.stdout and "Self CPU" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("mode", [["--bench"], ["--bench-profile", "resnet18"], ["--bench-suite", "1"]])
def test_bench_on_a_missing_gpu_is_one_line(mode):
    r = run_cli("check.py", *mode, "--device", "cuda")
    assert r.returncode == 2 and r.stderr.startswith("error: --device cuda") and "Traceback" not in r.stderr
