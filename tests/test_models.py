"""Model building: 10-way heads, --weights files, TinyViT window scaling, offline failures."""
from __future__ import annotations

import time

import pytest
import torch
import torchvision

from common import models
from common.downloads import host_reachable
from common.errors import UserError
from conftest import run_cli


def test_resnet_weights_file_loads_backbone_and_replaces_head(tmp_path):
    source = torchvision.models.resnet18()  # a 1000-class ImageNet-shaped state dict, random values
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = models.build_model("resnet", "resnet18", True, str(path), 224, quiet=True)
    assert model.fc.out_features == 10
    mine = model.state_dict()
    for k, v in source.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(mine[k], v), k


@pytest.mark.parametrize("fmt", ["model_key", "state_dict_key", "safetensors"])
def test_tinyvit_weights_file_in_each_layout(tmp_path, fmt):
    import timm

    source = timm.create_model("tiny_vit_5m_224", num_classes=1000)
    sd = source.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save({"model" if fmt == "model_key" else "state_dict": sd}, path)
    model = models.build_model("timm", "tiny_vit_5m_224.dist_in22k_ft_in1k", True, str(path), 224, quiet=True)
    report = models.load_weights_file(model, path, quiet=True)
    assert sorted(report["dropped"]) == ["head.fc.bias", "head.fc.weight"] and not report["unexpected"]
    mine = model.state_dict()
    assert torch.equal(mine["patch_embed.conv1.conv.weight"], sd["patch_embed.conv1.conv.weight"])
    assert torch.equal(mine["stages.3.blocks.1.mlp.fc2.weight"], sd["stages.3.blocks.1.mlp.fc2.weight"])


def test_tinyvit_small_inputs_get_small_windows_and_still_load_224_weights(tmp_path):
    import timm

    assert models.tiny_vit_window_sizes("tiny_vit_5m_224.dist_in22k_ft_in1k", 224) is None
    assert models.tiny_vit_window_sizes("tiny_vit_5m_224.dist_in22k_ft_in1k", 32) == (1, 1, 2, 1)
    assert models.tiny_vit_window_sizes("resnet18", 32) is None
    path = tmp_path / "w.pth"
    torch.save(timm.create_model("tiny_vit_5m_224", num_classes=1000).state_dict(), path)
    model = models.build_model("timm", "tiny_vit_5m_224.dist_in22k_ft_in1k", True, str(path), 32, quiet=True)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)  # attention biases were resized on load


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "other_model"])
def test_bad_weights_file_is_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.pth"
    if content == "other_model":
        torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as e:
        models.build_model("resnet", "resnet18", True, str(path), 32, quiet=True)
    assert str(path) in str(e.value) and "--weights" in str(e.value)


def test_model_override_takes_other_architectures():
    assert models.build_model("resnet", "resnet34", False, None, 32).fc.out_features == 10
    vit = models.build_model("timm", "vit_tiny_patch16_224", False, None, 32)
    assert vit(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(UserError, match="not a torchvision"):
        models.build_model("resnet", "no_such_net", False, None, 32)


@pytest.mark.parametrize("script,url", [("train_resnet_cifar.py", "https://download.pytorch.org"),
                                        ("train_tinyvit_cifar.py", "https://huggingface.co")])
def test_offline_pretrained_fails_fast_and_says_what_to_do(tmp_path, script, url):
    if host_reachable(url):
        pytest.skip("network available: the offline failure cannot be provoked here")
    start = time.monotonic()
    r = run_cli(script, "--pretrained", "--dummy", "--output-dir", str(tmp_path / "run"),
                env={"TORCH_HOME": str(tmp_path / "th"), "HF_HOME": str(tmp_path / "hf")}, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--weights PATH" in r.stderr and "--no-pretrained" in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr  # one line
    assert time.monotonic() - start < 45
    assert not (tmp_path / "run" / "last.pt").exists()


def test_flops_and_params_are_counted():
    model = models.build_model("resnet", "resnet18", False, None, 224)
    assert 11.1e6 < models.count_parameters(model) < 11.3e6
    assert 3.4e9 < models.flops_per_image(model, 224) < 3.9e9  # 1.82 GMACs = 3.64 GFLOPs
