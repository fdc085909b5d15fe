"""The device-side pipeline against the torchvision reference: same op family and ranges, same crop and
flip statistics, labels aligned, learns as well. Runs on the CPU (it is tensor ops)."""
from __future__ import annotations


import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from common import gpu_data
from common.config import TrainConfig
from common.data import MEAN, STD, synthetic_cifar
from test_data import _real_images

CPU = torch.device("cpu")


def test_op_list_and_magnitudes_match_torchvision_randaugment():
    space = v2.RandAugment()._AUGMENTATION_SPACE
    assert tuple(space) == gpu_data.OPS
    for op, (make, signed) in space.items():
        values = make(31, 32, 32)
        if isinstance(values, torch.Tensor) and values.ndim:
            expected = float(values[9])
            ours = gpu_data.op_strength(op, 9, 32)
            assert ours == pytest.approx(expected, abs=1e-5), op


def test_crop_scale_and_ratio_follow_random_resized_crop():
    n = 20_000
    torch.manual_seed(0)
    ref = torch.tensor([v2.RandomResizedCrop.get_params(torch.empty(3, 32, 32), [0.25, 1.0], [3 / 4, 4 / 3])
                        for _ in range(n)], dtype=torch.float)  # (top, left, h, w)
    ours = gpu_data.sample_crop_params(n, 32, (0.25, 1.0), torch.Generator().manual_seed(0), CPU)
    for crops in (ref, ours):
        assert (crops[:, 0] >= 0).all() and (crops[:, 0] + crops[:, 2] <= 32).all()
        assert (crops[:, 1] >= 0).all() and (crops[:, 1] + crops[:, 3] <= 32).all()

    def stats(c):
        area = c[:, 2] * c[:, 3] / 1024
        ratio = torch.log(c[:, 3] / c[:, 2])
        centre = c[:, 1] + c[:, 3] / 2
        return [area.mean(), area.std(), ratio.mean(), ratio.std(), centre.mean(), centre.std()]

    for a, b in zip(stats(ours), stats(ref)):
        assert float(a) == pytest.approx(float(b), abs=0.03 * max(1.0, abs(float(b)))), (stats(ours), stats(ref))


def test_flip_rate_and_op_mix_are_uniform():
    aug = gpu_data.BatchAugment(32, 0.25, 2, 9)
    p = aug.sample(28_000, torch.Generator().manual_seed(1), CPU)
    assert float(p["flips"].float().mean()) == pytest.approx(0.5, abs=0.01)
    counts = torch.bincount(p["ops"].flatten(), minlength=len(gpu_data.OPS)).float() / p["ops"].numel()
    assert torch.allclose(counts, torch.full_like(counts, 1 / 14), atol=0.006), counts
    assert float((p["signs"] > 0).float().mean()) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("op", ["Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize",
                                "AutoContrast", "Equalize"])
def test_colour_ops_match_torchvision_on_real_photos(op, real_sample):
    images = _real_images(real_sample)[:64]
    strength = gpu_data.op_strength(op, 9, 32)
    ours = gpu_data.colour_op(op, images.float() / 255, strength, torch.ones(64))
    factor = 1 + strength
    ref = {"Brightness": lambda x: TF.adjust_brightness(x, factor), "Color": lambda x: TF.adjust_saturation(x, factor),
           "Contrast": lambda x: TF.adjust_contrast(x, factor), "Sharpness": lambda x: TF.adjust_sharpness(x, factor),
           "Posterize": lambda x: TF.posterize(x, int(strength)),
           "Solarize": lambda x: TF.solarize(x, strength * 255), "AutoContrast": TF.autocontrast,
           "Equalize": TF.equalize}[op](images)
    diff = (ours * 255 - ref.float()).abs()
    assert float(diff.mean()) < 1.0 and float(diff.max()) <= 2.0, (op, float(diff.mean()), float(diff.max()))


def test_geometric_ops_move_pixels_like_torchvision():
    """A single TranslateX by +t pixels shifts content right by t, as torchvision's affine does."""
    img = torch.zeros(1, 3, 32, 32)
    img[..., 10:20, 10:14] = 1.0
    m = gpu_data.geometric_inverse("TranslateX", 5.0, torch.ones(1), 32)
    grid = torch.nn.functional.affine_grid(m[:, :2], [1, 3, 32, 32], align_corners=False)
    ours = torch.nn.functional.grid_sample(img, grid, align_corners=False)
    ref = TF.affine(img, angle=0.0, translate=[5, 0], scale=1.0, shear=[0.0, 0.0])
    assert torch.allclose(ours, ref, atol=1e-5)


def test_labels_stay_aligned_through_the_stream():
    """Each image is one flat grey level that encodes its label; crops and flips keep it flat."""
    n = 640
    labels = torch.arange(n) % 10
    images = (labels * 20 + 30).to(torch.uint8).view(-1, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    cfg = TrainConfig(img_size=48, batch_size=64, randaug_ops=0)
    stream = gpu_data.GpuTrainStream(images, labels, cfg, CPU)
    seen = 0
    for x, y in stream.epoch(3):
        grey = x[:, 0].mean(dim=(1, 2)) * STD[0] + MEAN[0]
        assert torch.equal(torch.round((grey * 255 - 30) / 20).long(), y)
        seen += len(y)
    assert seen == n


def test_stream_resumes_mid_epoch_with_identical_batches():
    x, y = synthetic_cifar(1200, seed=0)
    stream = gpu_data.GpuTrainStream(x, y, TrainConfig(img_size=32, batch_size=50), CPU)
    full = list(stream.epoch(2))
    tail = list(stream.epoch(2, start_step=13))
    assert len(full) == 24 and len(tail) == 11
    for (a, ya), (b, yb) in zip(full[13:], tail):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(full[0][0], list(stream.epoch(3))[0][0])


def test_device_pipeline_survives_thousands_of_real_and_synthetic_images(real_sample):
    aug = gpu_data.BatchAugment(32, 0.25, 2, 9)
    gen = torch.Generator().manual_seed(0)
    real = _real_images(real_sample)
    synthetic, _ = synthetic_cifar(1000, seed=5)
    for images in [real] * 10 + [synthetic] * 4:
        out = aug(images, gen)
        assert out.shape == (len(images), 3, 32, 32) and torch.isfinite(out).all()
    assert 0.3 < float(out.std()) < 3.0  # normalised, not collapsed


def test_both_pipelines_learn_equally(cifar_dir, tmp_path):
    import pandas as pd

    from conftest import SMALL
    from train_resnet_cifar import main

    acc = {}
    for pipeline in ("gpu", "cpu"):
        out = tmp_path / pipeline
        assert main(["--no-pretrained", "--epochs", "2", "--data-dir", str(cifar_dir), "--output-dir", str(out),
                     "--data-pipeline", pipeline, *SMALL]) == 0
        acc[pipeline] = pd.read_csv(out / "metrics.csv")["val_acc"].iloc[-1]
    assert min(acc.values()) > 0.5 and abs(acc["gpu"] - acc["cpu"]) < 0.2, acc
