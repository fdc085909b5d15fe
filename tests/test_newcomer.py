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
                                    ["train_resnet_cifar.py", "--dummy", "--no-pretrained"]])
def test_a_torchvision_built_for_another_torch_is_one_line_with_the_fix(
        broken_torchvision, tmp_path, script):
    # a train script meets it at its first model (train_tinyvit_cifar.py is the same shell over
    # common/trainer.py), the plot and demo scripts at their first figure: the same line
    r = run_cli(*script, *(["--output-dir", str(tmp_path / "r")] if "--dummy" in script else []),
                env=broken_torchvision)
    one_line_error(r, "does not match torch", "pip install --force-reinstall --no-deps",
                   "torchvision==0.", "torchvision 0.N goes with torch 2.(N-15), from the same "
                   "index as torch", "offline machines")


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


def test_an_abbreviated_or_mistyped_flag_is_one_line_with_the_flag_meant(tmp_path, capsys):
    """Not 40 lines of usage and then the complaint: one line, the closest flag, and where the list
    is; an abbreviation is refused, not guessed."""
    r = run_cli("train_resnet_cifar.py", "--epoch", "3", "--dummy", "--no-pretrain", "--output-dir",
                str(tmp_path / "r"))
    one_line_error(r, "unrecognized flags --epoch (did you mean --epochs?), --no-pretrain (did "
                   "you mean --no-pretrained?)", "python train_resnet_cifar.py --help lists every "
                   "flag")
    assert "usage:" not in r.stderr and not (tmp_path / "r").exists()
    import check
    import compare_runs
    import run_suite

    for main, argv, words in (
            (lambda a: train("train_resnet_cifar", *a), ["--data_dir", "x"],
             "unrecognized flag --data_dir (did you mean --data-dir?)"),
            (check.main, ["--smok"], "unrecognized flag --smok (did you mean --smoke?)"),
            (compare_runs.main, ["--nothing-like-it"], "unrecognized flag --nothing-like-it; "),
            (run_suite.main, ["--data-dir", "x", "--seed", "1"],
             "unrecognized flag --seed (did you mean --seeds?)"),
            (lambda a: train("train_resnet_cifar", *a), ["--aug", "heavy"],
             "argument --aug: invalid choice: 'heavy'")):
        one_line_error_in_process(main, argv, capsys, words, "--help lists every flag")
        assert "usage:" not in capsys.readouterr().err


def test_a_data_dir_typo_is_no_such_folder_and_an_empty_folder_says_what_it_takes(tmp_path,
                                                                                   capsys):
    """A --data-dir that does not exist is a typo, not a place to download to (that is only the
    default ./data, or --download); an existing folder without CIFAR-10 lists what --data-dir
    takes."""
    from common.data import sources

    train_ = lambda a: train("train_resnet_cifar", *a)  # noqa: E731
    typo = tmp_path / "cifar10_jpg"
    one_line_error_in_process(train_, ["--no-pretrained", "--data-dir", str(typo), "--output-dir",
                                       str(tmp_path / "r")],
                              capsys, f"--data-dir {typo}: no such file or folder",
                              f"--download to fetch it into {typo}")
    assert not typo.exists(), "nothing downloaded, nothing created"
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error_in_process(train_, ["--no-pretrained", "--data-dir", str(empty), "--output-dir",
                                       str(tmp_path / "r")],
                              capsys, f"--data-dir {empty} holds no CIFAR-10; it takes "
                              "cifar-10-batches-py/", "train/<class>/ and test/<class>/ image "
                              "folders", ".tar.gz")
    asked = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sources, "ensure_batches", lambda path, download: asked.append((path, download))
                  or (_ for _ in ()).throw(sources.UserError("stop here")))
        for where, download in ((sources.DEFAULT_DATA_DIR, None), (typo, True)):
            with pytest.raises(sources.UserError, match="stop here"):
                sources.open_source(where, download=download)
    assert asked == [(sources.DEFAULT_DATA_DIR, True), (typo, True)], (
        "the default ./data, and an explicit --download, are downloaded into")
    import check

    assert check.main(["--data-dir", str(typo)]) == 1
    assert f"CIFAR-10     {typo}: no such file or folder" in capsys.readouterr().out


def test_compare_runs_says_a_missing_folder_is_missing_and_one_run_gets_only_its_notes(
        tmp_path, capsys):
    """A run folder that does not exist is named as such (not as a missing metrics.csv); one run's
    results carry no four-run confound paragraphs; --log-path's help shows no '(default: [])'."""
    import compare_runs
    from test_analysis import right, write_run

    one_line_error_in_process(compare_runs.main, [str(tmp_path / "resnet_ft"), "--safe"], capsys,
                              f"{tmp_path / 'resnet_ft'}: no such run folder or metrics.csv")
    run = write_run(tmp_path / "r", "resnet18", False, right(0.5), epochs=2)
    assert compare_runs.main(["--log-path", str(run / "metrics.csv"), "--safe"]) == 0
    out = capsys.readouterr().out
    assert "The confound" not in out and "zero-init" not in out.lower() and "| ResNet-18" in out
    with pytest.raises(SystemExit):
        compare_runs.main(["--help"])
    assert "(default: [])" not in capsys.readouterr().out


def test_plot_four_panels_prints_the_answer_and_where_the_rest_went(tmp_path, capsys):
    import plot_four_panels
    from test_analysis import right, write_run

    runs = [str(write_run(tmp_path / f"{a}_{p}", a, p, right(acc), epochs=2))
            for a, p, acc in (("resnet18", True, 0.8), ("resnet18", False, 0.6),
                              ("tiny_vit_5m_224", True, 0.9), ("tiny_vit_5m_224", False, 0.5))]
    out_png = tmp_path / "figs" / "four.png"
    assert plot_four_panels.main(["--runs", *runs, "--output", str(out_png), "--safe"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("**ImageNet pre-training helps TinyViT-5M by"), out
    assert out[1].startswith("Data and budget:") and len(out) == 4, out
    assert out[-1] == f"the tables, intervals and notes: {out_png.with_name('results.md')}"


def test_resuming_into_another_models_folder_says_what_the_folder_holds(tmp_path, capsys):
    flags = ["--no-pretrained", "--dummy", "--epochs", "2", "--img-size", "32", "--batch-size",
             "32", "--train-subset", "128", "--val-size", "64", "--test-subset", "64",
             "--num-workers", "0", "--output-dir", str(tmp_path / "r")]
    assert train("train_resnet_cifar", *flags, "--stop-after-epoch", "1") == 0
    one_line_error_in_process(lambda a: train("train_tinyvit_cifar", *a), [*flags, "--resume"],
                              capsys, f"{tmp_path / 'r'} holds ResNet-18 from scratch (resnet18, "
                              "no pretrained weights)", "model: resnet18 in the checkpoint, "
                              "tiny_vit_5m_224 now")
    assert "a1_in1k" not in capsys.readouterr().err


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
