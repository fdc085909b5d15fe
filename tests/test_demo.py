"""The prediction demo: a test image, your own photos (any mode, size and aspect), a grid with right
and wrong marked by a symbol, a confusion matrix that reproduces summary.json, and one-line errors
for bad input."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import show_resnet_example as demo
from conftest import PHOTOS, SMALL, one_line_error_in_process, train


@pytest.fixture(scope="module")
def run(cifar_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    assert train("train_resnet_cifar", "--model", "test_resnet", "--no-pretrained", "--epochs", "2",
                 "--data-dir", str(cifar_dir), "--output-dir", str(out), *SMALL) == 0
    return out


def main(*argv: str) -> int:
    return demo.main([*argv, "--safe"])


def test_a_test_image_with_its_top_k(run, capsys):
    assert main("--checkpoint", str(run / "best.pt"), "--index", "-1", "--seed", "42", "--topk",
                "3") == 0
    out = capsys.readouterr().out
    assert "ground truth" in out and "top-3" in out and out.count("%") >= 3
    assert len(list(run.glob("example_*.png"))) == 1


def test_your_own_photos_of_any_mode_size_and_aspect(run, tmp_path, capsys):
    from PIL import Image

    photos = sorted(PHOTOS.glob("*/*.png"))[:3]
    rgba, grey, wide = tmp_path / "rgba.png", tmp_path / "grey.jpg", tmp_path / "wide.jpg"
    Image.open(photos[0]).convert("RGBA").resize((300, 200)).save(rgba)
    Image.open(photos[1]).convert("L").save(grey)
    Image.open(photos[2]).resize((600, 100)).save(wide)
    out = tmp_path / "mine.png"
    assert main("--checkpoint", str(run / "best.pt"), "--image", str(photos[2]), str(rgba),
                str(grey), str(wide), "--output", str(out)) == 0
    text = capsys.readouterr().out
    assert out.stat().st_size > 10_000 and text.count("top-3") == 4 and "ground truth" not in text


def test_without_ground_truth_nothing_is_coloured_right_or_wrong(run):
    import torch

    from common.plots import setup_matplotlib
    from common.prediction_plots import figure_rows

    plt = setup_matplotlib(True)
    fig = figure_rows(plt, [(np.zeros((32, 32, 3), np.uint8),
                             torch.tensor([.5, .3, .2] + [0.0] * 7), "x", None)],
                           3, [f"c{i}" for i in range(10)])
    colours = {tuple(round(c, 3) for c in bar.get_facecolor()[:3]) for bar in fig.axes[1].patches}
    assert colours == {(0.6, 0.6, 0.6)}, "all bars neutral grey"
    assert "no ground truth" in fig.axes[0].get_title()


def test_a_decompression_bomb_is_refused_before_decoding(run, tmp_path, capsys):
    """A PNG that claims 20000 x 20000 pixels: the header alone decides."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))
    one_line_error_in_process(demo.main, ["--checkpoint", str(run / "best.pt"), "--image",
                                          str(bomb), "--safe"],
                              capsys, str(bomb), "20000x20000", "40-megapixel limit")


def test_the_grid_marks_right_and_wrong_with_symbols(run, capsys):
    assert main("--checkpoint", str(run / "best.pt"), "--grid", "3") == 0
    assert (run / "grid_3x3.png").is_file() and "/9 correct" in capsys.readouterr().out


def test_the_confusion_matrix_reproduces_the_summary(run, capsys):
    assert main("--checkpoint", str(run / "best.pt"), "--confusion") == 0
    out = capsys.readouterr().out
    table = pd.read_csv(run / "confusion.csv", index_col=0)
    counts = table.drop(columns="per_class_acc").to_numpy()
    summary = json.loads((run / "summary.json").read_text())
    assert counts.shape == (10, 10) and counts.sum() == summary["test_images"]
    assert np.trace(counts) / counts.sum() == pytest.approx(summary["test_acc"], abs=1e-12)
    assert "= summary.json's test_acc of best.pt" in out
    assert main("--checkpoint", str(run / "last.pt"), "--confusion", "--output",
                str(run / "c_last.png")) == 0
    assert "= summary.json's test_acc_final of last.pt" in capsys.readouterr().out


@pytest.mark.parametrize("case,words", [
    ("missing_checkpoint", "does not exist"),
    ("other_model_config", "pass the config.json of the run"),
    ("other_size_config", "img_size 64 but --checkpoint"), ("bad_image", "not a readable image"),
    ("corrupt_checkpoint", "truncated"), ("index", "--index -2"), ("topk", "--topk 0")])
def test_bad_input_is_one_line(run, tmp_path, capsys, case, words):
    ck, extra = str(run / "best.pt"), []
    if case == "missing_checkpoint":
        ck = str(tmp_path / "nope.pt")
    elif case in ("other_model_config", "other_size_config"):
        cfg = json.loads((run / "config.json").read_text())
        cfg["config"].update({"model": "tiny_vit_5m_224"} if case == "other_model_config"
                             else {"img_size": 64})
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        extra = ["--config", str(tmp_path / "config.json")]
    elif case == "bad_image":
        (tmp_path / "x.png").write_bytes(b"not an image")
        extra = ["--image", str(tmp_path / "x.png")]
    elif case == "corrupt_checkpoint":
        (tmp_path / "c.pt").write_bytes((run / "best.pt").read_bytes()[:5000])
        ck = str(tmp_path / "c.pt")
    elif case == "index":
        extra = ["--index", "-2"]
    else:
        extra = ["--topk", "0"]
    one_line_error_in_process(demo.main, ["--checkpoint", ck, *extra, "--safe"], capsys, words)


def test_a_synthetic_run_is_not_shown_as_cifar10(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("train_resnet_cifar", "--model", "test_resnet", "--dummy", "--no-pretrained",
                 "--epochs", "1", "--img-size", "32", "--train-subset", "256", "--val-size", "128",
                 "--test-subset", "100", "--num-workers", "0", "--output-dir", str(out)) == 0
    capsys.readouterr()
    assert main("--checkpoint", str(out / "best.pt"), "--index", "3", "--output",
                str(tmp_path / "e.png")) == 0
    text = capsys.readouterr().out
    assert "ground truth class" in text and "airplane" not in text


def test_your_photos_figure_names_the_model_and_the_grid_title_clears_the_images(run, tmp_path,
                                                                                monkeypatch):
    """predict_*.png says which model made the predictions; the grid's title, wrapped to the
    figure's width, stays inside it and above the first row's labels at 3x3 and 6x6."""
    import torch

    from common import prediction_plots as P
    from common.plots import setup_matplotlib

    titles = []
    real_rows = P.figure_rows
    monkeypatch.setattr(P, "figure_rows", lambda plt, rows, *a: (
        titles.extend(r[2] for r in rows), real_rows(plt, rows, *a))[1])
    photo = sorted(PHOTOS.glob("*/*.png"))[0]
    assert main("--checkpoint", str(run / "best.pt"), "--image", str(photo), "--output",
                str(tmp_path / "p.png")) == 0
    assert titles == [f"{photo.name}  (test_resnet, best.pt)"]
    monkeypatch.undo()
    plt = setup_matplotlib(True)
    for side in (3, 6):
        n = side * side
        images, labels = torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.arange(n) % 10
        probs = torch.softmax(torch.randn(n, 10, generator=torch.Generator().manual_seed(0)), 1)
        fig, _ = P.grid_figure(plt, images, labels, probs, [f"class{i}" for i in range(10)], side,
                               "ResNet-18")
        fig.canvas.draw()
        title = fig._suptitle.get_window_extent()
        width = fig.get_size_inches()[0] * fig.dpi
        top_labels = max(ax.title.get_window_extent().y1 for ax in fig.axes[:side])
        assert 0 <= title.x0 and title.x1 <= width, side
        assert title.y0 > top_labels, f"{side}x{side}: the title crowds the first row"
        plt.close(fig)
