"""Reading runs back: comparison figures, the four-setting figure, results tables, the prediction demo."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.plots import read_run, spread_labels
from common.runlog import METRIC_COLUMNS
from conftest import run_cli


def write_run(folder: Path, final_val: float, epochs: int = 6, model: str = "resnet18", pretrained: bool = True,
              seed: int = 0, test_acc: float | None = None) -> Path:
    """A run folder as the train scripts write it (metrics.csv, config.json, summary.json)."""
    rng = np.random.default_rng(seed)
    e = np.arange(1, epochs + 1)
    val = final_val - (final_val - 0.3) * np.exp(-e / 2) + rng.normal(0, 0.003, epochs)
    train = np.minimum(0.999, val + 0.03)
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"epoch": e, "lr": 3e-4, "train_loss": -np.log(train), "train_acc": train, "val_loss": -np.log(val),
                  "val_acc": val, "epoch_time_s": 10.0, "train_img_per_s": 5000.0 + seed, "val_img_per_s": 9000.0,
                  "peak_mem_gb": 1.0})[list(METRIC_COLUMNS)].to_csv(folder / "metrics.csv", index=False)
    (folder / "config.json").write_text(json.dumps({"model": model, "pretrained": pretrained}))
    if test_acc is not None:
        (folder / "summary.json").write_text(json.dumps({"test_acc": test_acc, "total_time_s": 120.0}))
    return folder


@pytest.fixture
def four_runs(tmp_path) -> Path:
    runs = tmp_path / "runs"
    write_run(runs / "resnet_ft", 0.95, test_acc=0.948)
    write_run(runs / "resnet_scratch", 0.85, pretrained=False, test_acc=0.842)
    write_run(runs / "tinyvit_ft", 0.97, model="tiny_vit_5m_224.dist_in22k_ft_in1k", test_acc=0.969)
    write_run(runs / "tinyvit_scratch", 0.70, epochs=4, model="tiny_vit_5m_224.dist_in22k_ft_in1k", pretrained=False,
              test_acc=0.70)
    return runs


def test_compare_two_runs_figure_and_table(four_runs, tmp_path, capsys):
    import compare_runs

    out = tmp_path / "cmp.png"
    assert compare_runs.main([str(four_runs / "resnet_ft" / "metrics.csv"), str(four_runs / "tinyvit_ft"),
                              "--labels", "ResNet", "TinyViT", "--output", str(out), "--safe"]) == 0
    assert out.stat().st_size > 10_000
    table = capsys.readouterr().out
    for label, name in (("ResNet", "resnet_ft"), ("TinyViT", "tinyvit_ft")):
        m = pd.read_csv(four_runs / name / "metrics.csv")
        best = m["val_acc"].max()
        epoch = int(m.loc[m["val_acc"].idxmax(), "epoch"])
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        assert f"{best:.1%} ({epoch})" in row and f"{m['val_acc'].iloc[-1]:.1%}" in row
    assert "94.8%" in table and "96.9%" in table  # test accuracy from summary.json

    from common.plots import group_runs, setup_matplotlib

    plt = setup_matplotlib(True)
    fig = compare_runs.plot_comparison(plt, group_runs([read_run(four_runs / "resnet_ft")]))
    assert len(fig.axes) == 4
    assert [ax.get_title() for ax in fig.axes] == ["Train Loss", "Val Loss", "Train Acc", "Val Acc"]
    assert any(t.get_text().endswith("%") for t in fig.axes[3].texts)  # final values written at the curve ends


def test_single_run_log_path_keeps_the_old_command(four_runs):
    r = run_cli("compare_runs.py", "--log-path", str(four_runs / "resnet_ft" / "metrics.csv"), "--safe")
    assert r.returncode == 0, r.stderr
    assert (four_runs / "resnet_ft" / "resnet_ft_curve.png").is_file()


def test_seeds_are_drawn_as_a_band_and_tabled_as_mean_std(tmp_path, capsys):
    import compare_runs

    paths = [str(write_run(tmp_path / f"s{i}", 0.9, seed=i)) for i in range(3)]
    out = tmp_path / "seeds.png"
    assert compare_runs.main([*paths, "--labels", "A", "A", "A", "--output", str(out), "--safe"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| A (n=3)"))
    best = [pd.read_csv(Path(p) / "metrics.csv")["val_acc"].max() for p in paths]
    assert f"{np.mean(best):.1%} ± {np.std(best, ddof=1):.1%}" in row

    from common.plots import group_runs, setup_matplotlib

    plt = setup_matplotlib(True)
    fig = compare_runs.plot_comparison(plt, group_runs([read_run(p, "A") for p in paths]))
    assert any(type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection") for c in fig.axes[3].collections)
    assert compare_runs.main([*paths, "--group-by", "model", "--output", str(out), "--safe"]) == 0


def test_four_panel_figure_results_and_gains(four_runs, tmp_path, capsys):
    import plot_four_panels
    from common.plots import group_runs, setup_matplotlib

    out = tmp_path / "four.png"
    runs = [str(four_runs / n) for n in ("resnet_ft", "resnet_scratch", "tinyvit_ft", "tinyvit_scratch")]
    assert plot_four_panels.main(["--runs", *runs, "--output", str(out), "--safe"]) == 0
    assert out.is_file()
    results = (tmp_path / "results.md").read_text()
    best = {n: pd.read_csv(four_runs / n / "metrics.csv")["val_acc"].max() for n in ("resnet_ft", "resnet_scratch")}
    assert f"| ResNet-18 | {(best['resnet_ft'] - best['resnet_scratch']) * 100:+.1f} points | +10.6 points |" in results
    assert "| TinyViT-5M |" in results and "+26.9 points" in results
    plt = setup_matplotlib(True)
    groups = group_runs([read_run(p) for p in runs])
    fig = plot_four_panels.four_panel_figure(plt, groups, [])
    assert len(fig.axes) == 4
    styles = {line.get_label(): (line.get_color(), line.get_linestyle()) for line in fig.axes[0].get_lines()
              if not line.get_label().startswith("_")}
    assert styles["resnet_ft"][0] == styles["resnet_scratch"][0] != styles["tinyvit_ft"][0]
    assert styles["resnet_ft"][1] == "-" and styles["resnet_scratch"][1] == "--"


def test_four_panels_defaults_draw_what_exists_and_name_the_missing(four_runs, tmp_path):
    import shutil

    shutil.rmtree(four_runs / "tinyvit_scratch")
    r = run_cli(str(Path(__file__).resolve().parents[1] / "plot_four_panels.py"), "--output", "runs/f.pdf", "--safe",
                cwd=four_runs.parent)
    assert r.returncode == 0, r.stderr
    assert "runs/tinyvit_scratch" in r.stderr
    assert (four_runs / "f.pdf").read_bytes()[:4] == b"%PDF"
    assert "needs both runs" in (four_runs / "results.md").read_text()


def test_end_labels_never_overlap():
    pos = spread_labels([0.95, 0.951, 0.952, 0.5], 0.0, 1.0, 0.05)
    ordered = sorted(pos)
    assert all(b - a >= 0.05 - 1e-9 for a, b in zip(ordered, ordered[1:]))
    assert max(pos) <= 1.0 + 1e-9 and pos[3] == 0.5


@pytest.mark.parametrize("content,words", [
    (None, "does not exist"), ("", "is empty"), ("epoch,train_loss,train_acc,val_loss,val_acc\n", "no rows"),
    ("epoch,train_loss,train_acc,val_loss\n1,1,0.5,1\n", "lacks the column(s) val_acc"),
    ("epoch,train_loss,train_acc,val_loss,val_acc\n1,1,0.5,1,0.4\n2,oops,0.6,1,0.5\n", "line 3: column train_loss")])
def test_bad_metrics_files_are_one_line_errors(tmp_path, content, words):
    csv = tmp_path / "run" / "metrics.csv"
    csv.parent.mkdir()
    if content is not None:
        csv.write_text(content)
    r = run_cli("compare_runs.py", str(csv), "--safe")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert words in r.stderr and str(csv) in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


# ----------------------------------------------------------------------------- the prediction demo

def test_demo_on_a_test_image(trained_resnet, cifar_dir):
    r = run_cli("show_resnet_example.py", "--config", str(trained_resnet / "config.json"), "--checkpoint",
                str(trained_resnet / "best.pt"), "--index", "-1", "--seed", "42", "--topk", "3", "--safe")
    assert r.returncode == 0, r.stderr
    assert "ground truth" in r.stdout and "top-3" in r.stdout and r.stdout.count("%") >= 3
    assert len(list(trained_resnet.glob("example_*.png"))) == 1


def test_demo_on_real_photos_of_any_mode_and_size(trained_resnet, tmp_path, real_sample):
    from PIL import Image

    photos = sorted(real_sample.glob("*/*.png"))[:3]
    rgba = tmp_path / "rgba.png"
    Image.open(photos[0]).convert("RGBA").resize((300, 200)).save(rgba)
    grey = tmp_path / "grey.jpg"
    Image.open(photos[1]).convert("L").save(grey)
    out = tmp_path / "mine.png"
    r = run_cli("show_resnet_example.py", "--checkpoint", str(trained_resnet / "best.pt"), "--image",
                str(photos[2]), str(rgba), str(grey), "--output", str(out), "--safe")
    assert r.returncode == 0, r.stderr
    assert out.is_file() and r.stdout.count("top-3") == 3 and "ground truth" not in r.stdout


def test_demo_grid_and_confusion_agree_with_the_summary(trained_resnet):
    r = run_cli("show_resnet_example.py", "--checkpoint", str(trained_resnet / "best.pt"), "--grid", "3", "--safe")
    assert r.returncode == 0, r.stderr
    assert (trained_resnet / "grid_3x3.png").is_file() and "/9 correct" in r.stdout
    r = run_cli("show_resnet_example.py", "--checkpoint", str(trained_resnet / "best.pt"), "--confusion", "--safe")
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(trained_resnet / "confusion.csv", index_col=0)
    assert table.shape == (10, 11) and table.drop(columns="per_class_acc").to_numpy().sum() == 500
    acc = np.trace(table.drop(columns="per_class_acc").to_numpy()) / 500
    assert acc == pytest.approx(json.loads((trained_resnet / "summary.json").read_text())["test_acc"], abs=1e-9)
    assert (trained_resnet / "confusion.png").is_file()


@pytest.mark.parametrize("case", ["missing_checkpoint", "other_model_config", "bad_image", "corrupt_checkpoint"])
def test_demo_bad_input_is_one_line(trained_resnet, tmp_path, case):
    ck = str(trained_resnet / "best.pt")
    extra = []
    if case == "missing_checkpoint":
        ck = str(tmp_path / "nope.pt")
        words = "does not exist"
    elif case == "other_model_config":
        cfg = json.loads((trained_resnet / "config.json").read_text())
        cfg["model"] = "tiny_vit_5m_224.dist_in22k_ft_in1k"
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        extra = ["--config", str(tmp_path / "config.json")]
        words = "pass the matching pair"
    elif case == "bad_image":
        (tmp_path / "x.png").write_bytes(b"not an image")
        extra = ["--image", str(tmp_path / "x.png")]
        words = "not a readable image"
    else:
        (tmp_path / "c.pt").write_bytes((trained_resnet / "best.pt").read_bytes()[:5000])
        ck = str(tmp_path / "c.pt")
        words = "corrupt"
    r = run_cli("show_resnet_example.py", "--checkpoint", ck, *extra, "--safe")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert words in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
