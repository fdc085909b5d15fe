"""The first hour on a fresh machine, as a new user meets it: a broken torchvision, a data path that
does not exist, a folder holding the archive, a run folder given to the demo, the lr of a short run,
--help, a typo'd flag, figure ticks on a narrow range, a failed start."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest

from conftest import SMALL, one_line_error, one_line_error_in_process, run_cli, train


@pytest.fixture
def broken_torchvision(tmp_path):
    """A torchvision whose import fails as a CUDA torchvision does beside a CPU torch."""
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not '
                                      'exist")\n')
    return {"PYTHONPATH": str(tmp_path / "site")}


@pytest.mark.parametrize("script", [["check.py"],
                                    ["train_resnet_cifar.py", "--dummy", "--no-pretrained"],
                                    ["train_tinyvit_cifar.py", "--dummy", "--no-pretrained"]])
def test_a_torchvision_built_for_another_torch_is_one_line_with_the_fix(
        broken_torchvision, tmp_path, script):
    # the other scripts meet it at their first model or figure: the same line
    r = run_cli(*script, *(["--output-dir", str(tmp_path / "r")] if "--dummy" in script else []),
                env=broken_torchvision)
    one_line_error(r, "does not match torch", "pip install --force-reinstall --no-deps",
                   "torchvision==0.")


def test_check_on_a_machine_without_gpu_says_what_works_here(capsys):
    import check
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert check.main([]) == 1
    out = capsys.readouterr().out
    assert "works on this machine: the CPU-sized runs of README's 'Try it'" in out
    assert "not ready for the experiment" in out


def test_an_archive_path_that_does_not_exist_is_no_such_file(tmp_path, capsys):
    missing = tmp_path / "cifar10-jpeg.tar.gz"
    one_line_error_in_process(lambda a: train("train_resnet_cifar", *a),
                              ["--no-pretrained", "--data-dir", str(missing), "--output-dir",
                               str(tmp_path / "r")],
                              capsys, f"--data-dir {missing}: no such file")
    assert not missing.exists() and not (tmp_path / "r").exists(), ("nothing created, no empty "
                                                                    "run folder left")


def test_a_folder_holding_one_archive_is_read_and_two_are_a_question(tmp_path, capsys):
    from common.data import sources
    from test_sources import image_folder, tar_of

    folder = image_folder(tmp_path / "imgs")
    holder = tmp_path / "downloads"
    holder.mkdir()
    tar_of(folder, holder / "cifar10.tar.gz")
    src = sources.open_source(holder)
    assert src.kind == "tar" and len(src.train_x) == 150
    assert "holds one CIFAR-10 archive, cifar10.tar.gz" in capsys.readouterr().err
    shutil.copy(holder / "cifar10.tar.gz", holder / "other.tgz")
    with pytest.raises(Exception, match="holds 2 archives .*pass the one to read"):
        sources.open_source(holder)


def test_the_demo_takes_a_run_folder(tmp_path, capsys, cifar_dir):
    import show_resnet_example as demo

    out = tmp_path / "run"
    assert train("train_resnet_cifar", "--model", "test_resnet", "--no-pretrained", "--epochs", "1",
                 "--data-dir", str(cifar_dir), "--output-dir", str(out), *SMALL) == 0
    assert demo.main(["--checkpoint", str(out), "--index", "3", "--safe"]) == 0
    assert (out / "example_3.png").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error_in_process(demo.main, ["--checkpoint", str(empty), "--safe"], capsys,
                              f"{empty} is a folder without best.pt")


def test_a_one_epoch_run_logs_the_lr_it_trained_at(tmp_path, cifar_dir):
    out = tmp_path / "run"
    assert train("train_resnet_cifar", "--model", "test_resnet", "--no-pretrained", "--epochs", "1",
                 "--data-dir", str(cifar_dir), "--output-dir", str(out), *SMALL) == 0
    assert pd.read_csv(out / "metrics.csv")["lr"].tolist() == [pytest.approx(3e-4)]


@pytest.mark.parametrize("script", ["train_resnet_cifar.py", "train_tinyvit_cifar.py"])
def test_help_keeps_the_usage_examples_verbatim(script):
    import importlib

    r = run_cli(script, "--help")
    doc = importlib.import_module(script.removesuffix(".py")).__doc__
    examples = [ln for ln in doc.splitlines() if ln.strip().startswith("python ")]
    assert examples and all(ln in r.stdout for ln in examples), "an example was reflowed"
    assert ".tar.gz, .tgz, .tar or .zip" in " ".join(r.stdout.split())


def test_an_abbreviated_flag_is_refused_not_guessed(tmp_path):
    r = run_cli("train_resnet_cifar.py", "--epoch", "3", "--dummy", "--no-pretrain", "--output-dir",
                str(tmp_path / "r"))
    assert r.returncode == 2 and "unrecognized arguments: --epoch 3 --no-pretrain" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "r").exists()


def test_percent_ticks_stay_distinct_on_a_narrow_range():
    from common.plots import percent_formatter, setup_matplotlib

    plt = setup_matplotlib(True)
    for low, high in ((14.1, 15.3), (23.3, 23.5), (10, 90), (99.91, 99.97)):
        fig, ax = plt.subplots()
        ax.plot([1, 2, 3], [low, (low + high) / 2, high])
        ax.yaxis.set_major_formatter(percent_formatter())
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert len(labels) == len(set(labels)) >= 3, (low, high, labels)
        plt.close(fig)


def test_a_failed_start_leaves_no_empty_run_folder(tmp_path, capsys):
    out = tmp_path / "new"
    one_line_error_in_process(lambda a: train("train_resnet_cifar", *a),
                              ["--dummy", "--no-pretrained", "--img-size", "32", "--train-subset",
                               "64", "--batch-size", "128", "--output-dir", str(out)], capsys,
                              "--batch-size 128 is larger")
    assert not out.exists()
    kept = tmp_path / "kept"
    (kept / "notes").mkdir(parents=True)  # a folder the user made: left as it is
    one_line_error_in_process(lambda a: train("train_resnet_cifar", *a),
                              ["--dummy", "--no-pretrained", "--img-size", "32", "--train-subset",
                               "64", "--batch-size", "128", "--output-dir", str(kept)], capsys,
                              "is larger")
    assert (kept / "notes").is_dir()
