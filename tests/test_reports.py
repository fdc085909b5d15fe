"""Reports that cannot mislead, each defect of the validity audit as the behaviour a reader depends
on, checked through the scripts a user runs (compare_runs.py, plot_four_panels.py) on run folders
with known answers."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import compare_runs
import plot_four_panels
from common import plots
from test_analysis import N_TEST, right, write_run

FOUR = (("resnet_ft", "resnet18", True, 0.90), ("resnet_scratch", "resnet18", False, 0.80),
        ("tinyvit_ft", "tiny_vit_5m_224", True, 0.95),
        ("tinyvit_scratch", "tiny_vit_5m_224", False, 0.70))


def seeded_runs(root, seeds=(0, 1, 2)):
    """The four settings, several seeds each; seed s shifts which images are right, so seeds
    disagree."""
    paths = []
    for name, arch, pre, acc in FOUR:
        for s in seeds:
            c = right(acc - 0.01 * s, offset=7 * s)
            paths.append(str(write_run(root / f"{name}_s{s}", arch, pre, c, seed=s)))
    return paths


def results(tmp_path, paths, *flags) -> str:
    out = tmp_path / "fig.png"
    assert compare_runs.main([*paths, "--output", str(out), "--results", str(tmp_path / "r.md"),
                              "--safe", *flags]) == 0
    return (tmp_path / "r.md").read_text()


def refused(capsys, paths, *flags) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        compare_runs.main([*paths, "--safe", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_runs_selected_on_the_test_set_are_refused_or_marked(tmp_path, capsys):
    a = write_run(tmp_path / "a", "resnet18", True, right(0.9))
    b = write_run(tmp_path / "b", "resnet18", False, right(0.8))
    cfg = json.loads((b / "config.json").read_text())
    cfg["config"]["val_size"], cfg["data"]["splits"]["val_is_test"] = 0, True
    (b / "config.json").write_text(json.dumps(cfg))
    err = refused(capsys, [str(a), str(b)])
    assert "chose best.pt on the test set" in err and "--allow-test-selection" in err
    text = results(tmp_path, [str(a), str(b)], "--allow-test-selection", "--allow-mismatch")
    assert ("‡ Selected on the test set" in text
            and "the test set was used for nothing else" not in text)
    assert "+10.0†‡" in text


def test_mcnemar_is_reported_per_seed_pair_and_nothing_depends_on_the_order_of_the_folders(
        tmp_path):
    paths = seeded_runs(tmp_path / "runs")
    first = results(tmp_path, paths)
    rng = np.random.default_rng(0)
    for _ in range(2):
        assert (results(tmp_path, list(rng.permutation(paths)))
                == first), "another order, another report"
    row = next(ln for ln in first.splitlines() if ln.startswith("| ResNet-18 | a1_in1k"))
    assert "over 3 seed pairs (0–0, 1–1, 2–2)" in row


def test_three_copies_of_a_seed_do_not_shrink_the_per_class_intervals(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "save_figure",
                        lambda fig, path: figures.append((str(path), fig)) or path)
    one = [str(write_run(tmp_path / "one" / n, a, p, right(f))) for n, a, p, f in FOUR]
    copies = [str(write_run(tmp_path / "copies" / f"{n}_s{s}", a, p, right(f), seed=s))
              for n, a, p, f in FOUR
              for s in range(3)]

    def whisker(paths):
        figures.clear()
        assert plot_four_panels.main(["--runs", *paths, "--output", str(tmp_path / "f.png"),
                                      "--safe"]) == 0
        fig = next(f for p, f in figures if p.endswith("per_class.png"))
        seg = fig.axes[0].collections[0].get_segments()[0]  # class 0, first setting: its whisker
        return abs(seg[1][0] - seg[0][0])

    assert whisker(copies) >= 0.9 * whisker(one), "seeds counted as extra test images"


def test_hub_weights_and_a_weights_file_are_two_settings_and_duplicates_are_refused(
        tmp_path, capsys):
    hub = write_run(tmp_path / "hub", "tiny_vit_5m_224", True, right(0.9))
    f = write_run(tmp_path / "file", "tiny_vit_5m_224", True, right(0.8), seed=1)
    cfg = json.loads((f / "config.json").read_text())
    cfg["weights"].update(init="file", file="mine.safetensors", sha256="ab" * 32, tag=None)
    (f / "config.json").write_text(json.dumps(cfg))
    text = results(tmp_path, [str(hub), str(f)])
    rows = [ln for ln in text.split("## Test accuracy")[1].split("\n\n")[1].splitlines()
            if ln.startswith("| Tiny")]
    assert len(rows) == 2 and any("file abababababab" in r for r in rows), rows
    err = refused(capsys, [str(hub), str(hub)])
    assert "given twice" in err
    twin = tmp_path / "twin"
    shutil.copytree(hub, twin)
    assert ("the same setting (TinyViT-5M pretrained) "
            "with the same seed 0" in refused(capsys, [str(hub), str(twin)]))


def test_reliability_diagrams_count_images_and_seeds_and_show_the_bin_counts(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "save_figure",
                        lambda fig, path: figures.append((str(path), fig)) or path)
    paths = seeded_runs(tmp_path / "runs")
    assert plot_four_panels.main(["--runs", *paths, "--output", str(tmp_path / "f.png"),
                                  "--safe"]) == 0
    fig = next(f for p, f in figures if p.endswith("calibration.png"))
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert all(f"{N_TEST} test images x 3 seeds" in t for t in titles), titles
    assert any(ax.get_ylabel() == "predictions" for ax in fig.axes), ("a panel with the "
                                                                      "predictions per bin")


def test_the_validation_star_says_what_it_marks_with_several_seeds(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "save_figure",
                        lambda fig, path: figures.append((str(path), fig)) or path)
    results(tmp_path, seeded_runs(tmp_path / "runs"))
    legend = figures[0][1].legends[0].get_title().get_text()
    assert "seeds' mean" in legend and "each seed's best.pt" in legend


def test_predictions_are_paired_by_image_index(tmp_path, capsys):
    paths = [str(write_run(tmp_path / n, a, p, right(f, offset=50))) for n, a, p, f in FOUR]
    before = results(tmp_path, paths)
    shuffled = tmp_path / "resnet_scratch" / "test_predictions.csv"
    frame = pd.read_csv(shuffled)
    frame.sample(frac=1.0, random_state=0).to_csv(shuffled, index=False)
    assert results(tmp_path, paths) == before, "rows in another order: the same pairing"
    frame.iloc[:300].to_csv(shuffled, index=False)  # another test set
    assert "tested on different test images" in refused(capsys, paths)


def test_the_data_and_budget_line_describes_every_setting(tmp_path):
    paths = seeded_runs(tmp_path / "runs", seeds=(0, 1))
    line = next(ln for ln in results(tmp_path, paths).splitlines()
                if ln.startswith("Data and budget"))
    assert "ResNet-18 scratch: random init, seeds 0, 1" in line
    assert "TinyViT-5M pretrained: ImageNet: timm tiny_vit_5m_224.dist_in22k_ft_in1k" in line
    assert line.count("seeds 0, 1") == 4


def test_a_synthetic_and_a_real_run_are_never_pooled(tmp_path, capsys):
    smoke = write_run(tmp_path / "smoke", "resnet18", False, right(0.5), data="synthetic", epochs=1)
    real = write_run(tmp_path / "smoke_real", "resnet18", False, right(0.3), epochs=2)
    err = refused(capsys, [str(smoke), str(real)])
    assert "not comparable" in err and "synthetic data (--dummy, not CIFAR-10) ssssssssssss" in err
    assert ("CIFAR-10 (tar, lossy copy (JPEG)) cccccccccccc" in err
            and "epochs run: 1 (" in err), "the differences, whole"
    assert "because of --allow-mismatch" not in err


def test_figures_say_only_what_they_draw_and_keep_small_changes_small(tmp_path):
    """The curves' title names the line styles of the settings drawn (no "solid = pretrained"
    without a pretrained run); an accuracy axis spans at least 5 points, so two images' difference
    does not look like a plunge; the calibration counts are plain numbers on a few ticks."""
    from common import analysis, plots, report

    scratch = write_run(tmp_path / "s", "resnet18", False, right(0.5), epochs=2)
    ft = write_run(tmp_path / "f", "resnet18", True, right(0.7), epochs=2)
    only = report._title(analysis.compare([report.load_runs([str(scratch)], None)[0][0]]))
    assert "dashed = from scratch" in only and "solid" not in only, only
    both = report._title(analysis.compare(report.load_runs([str(scratch), str(ft)], None)[0]))
    assert "solid = pretrained, dashed = from scratch" in both, both
    plt = plots.setup_matplotlib(True)
    fig, ax = plt.subplots()
    ax.plot([1, 2], [15.70, 15.90])
    plots.floor_span(ax, plots.MIN_ACC_SPAN)
    lo, hi = ax.get_ylim()
    assert hi - lo == pytest.approx(5.0) and lo < 15.70 and hi > 15.90
    ax.set_ylim(0.2, 1.0)
    plots.floor_span(ax, 5.0)
    assert ax.get_ylim() == (0.0, 5.0), "never below 0%"
    plt.close(fig)
    assert plots.count_ticks(3, 600) == [10, 100]
    assert plots.count_ticks(300, 700) == [300, 500, 700]
    assert len(plots.count_ticks(1, 10**6)) <= 4
