"""The controls that split TinyViT-5M's extra gain into architecture and weights (run_suite.py
--controls): registered with their publishers' figures, added to the sweep's grid, and decomposed in
results.md from the same paired predictions as the main gain."""
from __future__ import annotations

import pytest
from test_analysis import right, write_run

import run_suite
from common import analysis
from common import suite as S
from common.results_md import results_markdown
from common.specs import CONTROLS, REGISTRY, resolve_model

# known test accuracies of one seed each: the decomposition is their arithmetic
ACC = {"resnet_ft": 0.80, "resnet_scratch": 0.60, "tinyvit_ft": 0.90, "tinyvit_1k_ft": 0.85,
       "tinyvit_scratch": 0.50, "deit_ft": 0.75, "deit_scratch": 0.45}
MADE = {"resnet_ft": ("resnet18", True, None), "resnet_scratch": ("resnet18", False, None),
        "tinyvit_ft": ("tiny_vit_5m_224", True, None),
        "tinyvit_1k_ft": ("tiny_vit_5m_224", True, "in1k"),
        "tinyvit_scratch": ("tiny_vit_5m_224", False, None),
        "deit_ft": ("deit_tiny_patch16_224", True, None),
        "deit_scratch": ("deit_tiny_patch16_224", False, None)}


def test_the_controls_are_registered_with_their_publishers_figures():
    deit, vit = REGISTRY["deit_tiny_patch16_224"], REGISTRY["vit_tiny_patch16_224"]
    assert (deit.display, deit.params_m, deit.default_weights.imagenet_top1,
            deit.default_weights.pretrain_data) == ("DeiT-Ti/16", 5.7, 72.2, "ImageNet-1k")
    assert vit.default_weights.imagenet_top1 == 75.5 and "21k" in vit.default_weights.pretrain_data
    tinyvit_1k = REGISTRY["tiny_vit_5m_224"].weights_for("timm", "in1k")
    assert tinyvit_1k.imagenet_top1 == 79.1 and tinyvit_1k.pretrain_data.startswith("ImageNet-1k")
    assert REGISTRY["resnet18"].params_m == 11.7 and REGISTRY["tiny_vit_5m_224"].params_m == 5.4
    for name in CONTROLS:
        choice = resolve_model(name, True)
        assert choice.spec is not None and choice.spec.script == "train_tinyvit_cifar.py", name
        assert choice.weights_info is not None and choice.weights_info.top1_source, name


def test_the_sweep_adds_the_controls_with_shared_scratch_runs(cifar_dir, tmp_path, capsys):
    """--controls: TinyViT-5M's ImageNet-1k weights (pretrained only: its scratch runs are the
    experiment's) and DeiT-Ti (pretrained and scratch), every size and seed, in folders of their
    own; the dry run lists them."""
    argv = ["--data-dir", str(cifar_dir), "--root", str(tmp_path / "s"), "--controls",
            "--train-sizes", "200", "400", "--seeds", "0", "1", "--dry-run", "--launcher", "debug",
            "--", "--img-size", "32", "--val-size", "400"]
    assert run_suite.main(argv) == 0
    out = capsys.readouterr().out
    for folder, count in (("tiny_vit_5m_224.in1k_ft/", 4), ("deit_tiny_patch16_224_ft/", 4),
                          ("deit_tiny_patch16_224_scratch/", 4), ("tiny_vit_5m_224_scratch/", 4),
                          ("resnet18_ft/", 4)):
        assert out.count(folder) == count, (folder, out)
    assert out.count("--model tiny_vit_5m_224.in1k --pretrained") == 4
    assert "tiny_vit_5m_224.in1k_scratch" not in out
    assert "28 runs" in out


def test_the_extra_gain_is_decomposed_by_hand_from_the_same_predictions(tmp_path):
    folders = [write_run(tmp_path / k, *MADE[k][:2], right(ACC[k]), tag=MADE[k][2]) for k in ACC]
    c = analysis.compare(analysis_runs(folders))
    rows = {p.name.split(":")[0]: p.interval.estimate for p in c.decomposition}
    gain = {k: ACC[f"{k}_ft"] - ACC["tinyvit_scratch" if "tinyvit" in k else f"{k}_scratch"]
            for k in ("resnet", "tinyvit", "tinyvit_1k", "deit")}
    expected = {
        "TinyViT-5M, ImageNet-22k weights (distilled)": gain["tinyvit"] - gain["resnet"],
        "TinyViT-5M, ImageNet-1k weights (distilled)": gain["tinyvit_1k"] - gain["resnet"],
        "DeiT-Ti/16, ImageNet-1k weights": gain["deit"] - gain["resnet"],
        "weights": gain["tinyvit"] - gain["tinyvit_1k"]}
    assert rows.keys() == expected.keys()
    for k, v in expected.items():
        assert rows[k] == pytest.approx(v, abs=1e-12), k
    assert rows["TinyViT-5M, ImageNet-22k weights (distilled)"] == pytest.approx(
        c.gain_difference.estimate), "the first row is results.md's first line"
    assert (rows["TinyViT-5M, ImageNet-22k weights (distilled)"] == pytest.approx(
        rows["weights"] + rows["TinyViT-5M, ImageNet-1k weights (distilled)"])), "it adds up"
    text = results_markdown(c)
    lines = text.splitlines()
    assert lines[2].startswith("**ImageNet pre-training helps TinyViT-5M by +40.0 points")
    assert lines[4].startswith("**What the extra gain is made of (the controls):** the "
                               "ImageNet-22k weights account for +5.0 points"), lines[4]
    assert "TinyViT-5M's gain minus ResNet-18's is +15.0 points" in lines[4]
    assert "DeiT-Ti/16's gain minus ResNet-18's is +10.0 points" in lines[4]
    assert lines[4].count("gain minus ResNet-18's") == 2, "the two architecture rows, once each"
    assert "## What the extra gain is made of" in text and "DeiT-Ti differs from TinyViT-5M" in text
    assert "(test images only)" in text, "one seed: said for what the interval is"


def test_missing_controls_are_listed_not_estimated(tmp_path):
    keep = [k for k in ACC if k != "deit_scratch"]
    folders = [write_run(tmp_path / k, *MADE[k][:2], right(ACC[k]), tag=MADE[k][2]) for k in keep]
    c = analysis.compare(analysis_runs(folders))
    assert not any(p.name.startswith("DeiT") for p in c.decomposition)
    assert c.missing_controls == ["DeiT-Ti/16 scratch"]
    assert "Not run yet (their rows are missing, not estimated): DeiT-Ti/16 scratch." in (
        results_markdown(c))
    plain = analysis.compare(analysis_runs([f for f, k in zip(folders, keep) if k in (
        "resnet_ft", "resnet_scratch", "tinyvit_ft", "tinyvit_scratch")]))
    assert plain.decomposition == [] and "made of" not in results_markdown(plain)


def analysis_runs(folders):
    from common.runfolder import load_run

    return [load_run(f) for f in folders]


def test_intervals_of_settings_with_unequal_seeds_say_what_they_cover(tmp_path):
    """Two seeds in some settings, one in others: the bootstrap resamples the images and the seeds
    it has, and says that it is not a full seed-aware interval."""
    folders = [write_run(tmp_path / f"{k}_{s}", *MADE[k][:2], right(ACC[k], offset=s), seed=s,
                         tag=MADE[k][2])
               for k in ("resnet_ft", "resnet_scratch", "tinyvit_ft", "tinyvit_scratch")
               for s in ((0, 1) if k.startswith("resnet") else (0,))]
    c = analysis.compare(analysis_runs(folders))
    assert c.gain_difference.interval.method == "images and some seeds"
    assert "a setting with one seed brings no measure of its training noise" in (
        results_markdown(c).splitlines()[2])


def test_a_control_that_needs_another_input_size_is_refused(cifar_dir, tmp_path, monkeypatch):
    import dataclasses

    from common.errors import UserError

    fake = dataclasses.replace(REGISTRY["deit_tiny_patch16_224"], native_px=384)
    monkeypatch.setitem(REGISTRY, "deit_tiny_patch16_224", fake)
    runs = S.plan_grid(["deit_tiny_patch16_224"], ["pretrained"], [0], [0], tmp_path,
                       ["--data-dir", str(cifar_dir)], {})
    with pytest.raises(UserError, match="weights are for 384 px and the experiment runs at 224 px"):
        S.check_grid(runs, None)


def test_the_data_efficiency_figure_draws_the_controls_as_their_own_series(tmp_path):
    """Two training-set sizes: the controls' settings are series of their own (their own colour,
    or their model's with a dash-dot line and diamonds), the ImageNet-1k weights' gain too; the
    per-size table has their columns."""
    from common import plots
    from common.report import report

    folders = []
    for n in (1000, 45000):
        bump = 0.0 if n == 1000 else 0.05
        folders += [str(write_run(tmp_path / f"{k}_{n}", *MADE[k][:2], right(ACC[k] + bump),
                                  tag=MADE[k][2], train_images=n)) for k in ACC]
    drawn = {}
    real = plots.data_efficiency_figure

    def keep(plt, sc, footnote):
        fig = real(plt, sc, footnote)
        drawn.update({line.get_label(): (line.get_color(), line.get_linestyle())
                      for ax in fig.axes for line in ax.get_lines()})
        return fig

    plots.data_efficiency_figure = keep
    try:
        # the per-class and calibration figures are not what this test looks at
        text = report(folders, None, tmp_path / "f" / "curves.png", tmp_path / "f" / "results.md",
                      False, "minmax", True, None, extra_figures=False)
    finally:
        plots.data_efficiency_figure = real
    assert (tmp_path / "f" / "data_efficiency.png").is_file()
    assert {"DeiT-Ti/16 pretrained", "DeiT-Ti/16 scratch", "TinyViT-5M pretrained (in1k)",
            "DeiT-Ti/16 gain", "TinyViT-5M pretrained (in1k) gain (control)"} <= set(drawn), drawn
    assert drawn["TinyViT-5M pretrained (in1k)"][1] == "-." and (
        drawn["TinyViT-5M pretrained (in1k)"][0] == drawn["TinyViT-5M pretrained"][0])
    assert drawn["DeiT-Ti/16 pretrained"][0] not in {drawn["TinyViT-5M pretrained"][0],
                                                      drawn["ResNet-18 pretrained"][0]}
    header = next(ln for ln in text.splitlines() if ln.startswith("| training images"))
    assert "TinyViT-5M pretrained (in1k) gain (control)" in header and "DeiT-Ti/16 gain" in header


@pytest.mark.slow
def test_tiny_control_runs_from_weight_files_make_the_decomposition(cifar_dir, tmp_path, capsys):
    """The whole path on the CPU: run_suite.py --controls through the debug launcher, every
    pretrained run from a weights file (ARCH=PATH, and arch.tag=PATH for TinyViT-5M's 1k weights),
    32 px, then results.md with the decomposition's rows."""
    import timm
    import torch

    files = {}
    for name, arch in (("resnet18", "resnet18"), ("tiny_vit_5m_224", "tiny_vit_5m_224"),
                       ("tiny_vit_5m_224.in1k", "tiny_vit_5m_224"),
                       ("deit_tiny_patch16_224", "deit_tiny_patch16_224")):
        torch.manual_seed(len(files))
        path = tmp_path / f"{name}.pth"
        torch.save(timm.create_model(arch).state_dict(), path)
        files[name] = f"{name}={path}"
    root = tmp_path / "suite"
    argv = ["--data-dir", str(cifar_dir), "--root", str(root), "--controls", "--train-sizes",
            "128", "--seeds", "0", "--launcher", "debug", "--weights", *files.values(), "--",
            "--img-size", "32", "--epochs", "1", "--batch-size", "32", "--val-size", "64",
            "--test-subset", "64", "--num-workers", "0", "--aug", "light"]
    assert run_suite.main(argv) == 0
    text = (root / "results.md").read_text()
    assert "## What the extra gain is made of" in text, text[:2000]
    for row in ("| TinyViT-5M, ImageNet-22k weights (distilled)", "| TinyViT-5M, ImageNet-1k "
                "weights (distilled)", "| DeiT-Ti/16, ImageNet-1k weights", "| weights: TinyViT"):
        assert row in text, row
    assert "weights file tiny_vit_5m_224.in1k.pth (as tiny_vit_5m_224.in1k)" in text
