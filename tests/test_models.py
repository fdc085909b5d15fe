"""Models and weights: the registry's names, 10-way heads, --weights files in every layout, the real
download paths (patched to local files) with their hash checks, nothing unpickled, offline failures
in seconds."""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import torch
import torchvision

from common import models
from common.downloads import host_reachable
from common.errors import UserError
from common.specs import resolve_model
from conftest import one_line_error, run_cli


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_model_names_say_which_weights_are_used():
    assert resolve_model("resnet18.a1_in1k", True).name == "resnet18.a1_in1k"
    assert (resolve_model("resnet18.a1_in1k", False).name
            == "resnet18"), "a scratch run carries no weights tag"
    assert (resolve_model("tiny_vit_5m_224", True).tag
            == "dist_in22k_ft_in1k"), "the registry's default weights"
    tv = resolve_model("tv/resnet18", True)
    assert ((tv.library, tv.tag, tv.weights_info.imagenet_top1)
            == ("torchvision", "IMAGENET1K_V1", 69.758))
    assert resolve_model("tiny_vit_5m_224.in1k", True).weights_info.imagenet_top1 == 79.1
    from common.config import default_output_dir

    assert default_output_dir("tiny_vit_5m_224.dist_in22k_ft_in1k", False, "tinyvit",
                              "tiny_vit_5m_224.dist_in22k_ft_in1k") == "runs/tinyvit_scratch"
    assert (default_output_dir("tiny_vit_5m_224.in1k", False, "tinyvit", "x")
            == "runs/tiny_vit_5m_224_scratch")
    assert (default_output_dir("tiny_vit_5m_224.in1k", True, "tinyvit", "x")
            == "runs/tiny_vit_5m_224.in1k_ft")


def _timm_hub_file(tmp_path: Path, arch: str, good_hash: bool = True) -> tuple[Path, dict]:
    """A safetensors file laid out as the Hugging Face cache does (snapshots/... ->
    blobs/<sha256>)."""
    import timm
    from safetensors.torch import save_file

    state = timm.create_model(arch, num_classes=1000).state_dict()
    tmp = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    blob = blobs / (_sha(tmp) if good_hash else "0" * 64)
    tmp.rename(blob)
    snap = tmp_path / "hub" / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(blob)
    return snap / "model.safetensors", state


def test_pretrained_timm_weights_are_downloaded_checked_and_applied(tmp_path, monkeypatch):
    import huggingface_hub

    path, state = _timm_hub_file(tmp_path, "resnet18")
    asked = []
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, f: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, f: asked.append((repo, f)) or str(path))
    monkeypatch.setattr(models, "host_reachable", lambda url, timeout=4.0: True)
    model, record = models.build_model(resolve_model("resnet18.a1_in1k", True), 32, 10)
    assert asked == [("timm/resnet18.a1_in1k", "model.safetensors")]
    mine = model.state_dict()
    for k, v in state.items():
        if not k.startswith("fc."):
            assert torch.equal(mine[k], v), k
    assert model.fc.out_features == 10 and sorted(record.new_head) == ["fc.bias", "fc.weight"]
    assert (record.init == "ImageNet" and record.hash_checked
            and record.sha256 == path.resolve().name)
    assert record.imagenet_top1 == 73.16 and record.tag == "a1_in1k"


def test_a_hub_file_whose_content_does_not_match_its_hash_is_refused(tmp_path, monkeypatch):
    import huggingface_hub

    path, _ = _timm_hub_file(tmp_path, "resnet18", good_hash=False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, f: str(path))
    with pytest.raises(UserError, match="does not match its published SHA-256.*delete it"):
        models.build_model(resolve_model("resnet18.a1_in1k", True), 32, 10)


def test_torchvision_weights_are_downloaded_hash_checked_and_applied(tmp_path, monkeypatch):
    source = torchvision.models.resnet18()
    file = tmp_path / "src.pth"
    torch.save(source.state_dict(), file)
    prefix = _sha(file)[:8]

    class Fake:
        url = f"https://download.pytorch.org/models/resnet18-{prefix}.pth"

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torchvision.models, "get_model_weights",
                        lambda arch: {"IMAGENET1K_V1": Fake})
    monkeypatch.setattr(models, "host_reachable", lambda url, timeout=4.0: True)
    fetched = []

    def download(url, dst, hash_prefix=None, progress=True):
        fetched.append((url, hash_prefix))
        Path(dst).write_bytes(file.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    model, record = models.build_model(resolve_model("tv/resnet18", True), 32, 10)
    assert fetched == [(Fake.url, prefix)]
    assert torch.equal(model.conv1.weight, source.conv1.weight) and model.fc.out_features == 10
    assert record.hash_checked and record.imagenet_top1 == 69.758


class _Payload:
    """Unpickling this runs code (writes a marker file): what a planted weights file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_planted_pickle_in_the_weights_cache_is_never_unpickled(tmp_path, monkeypatch):
    import torchvision.models as tvm

    marker = tmp_path / "executed"
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    name = Path(tvm.ResNet18_Weights.IMAGENET1K_V1.url).name
    with open(hub / name, "wb") as f:
        # the protocol torch.save uses
        pickle.dump({"conv1.weight": _Payload(marker)}, f, protocol=2)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UserError, match="does not match its published SHA-256"):
        models.build_model(resolve_model("tv/resnet18", True), 32, 10)
    assert not marker.exists(), "the planted file ran code"
    # and were its hash right, weights_only=True would still refuse the object
    with pytest.raises(UserError, match="pickled Python objects"):
        models.read_state_dict(hub / name)
    assert not marker.exists()


def test_resnet_weights_file_loads_backbone_and_replaces_head(tmp_path):
    source = torchvision.models.resnet18()  # an ImageNet-shaped state dict, random values
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model, record = models.build_model(resolve_model("tv/resnet18", True), 224, 10, str(path))
    assert model.fc.out_features == 10 and record.init == "file" and record.sha256 == _sha(path)
    assert record.imagenet_top1 is None, "a file's ImageNet accuracy is not known"
    mine = model.state_dict()
    for k, v in source.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(mine[k], v), k


@pytest.mark.parametrize("fmt", ["model_key", "state_dict_key", "safetensors"])
def test_tinyvit_weights_file_in_each_layout(tmp_path, fmt):
    import timm

    sd = timm.create_model("tiny_vit_5m_224", num_classes=1000).state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save({"model" if fmt == "model_key" else "state_dict": sd}, path)
    model, record = models.build_model(resolve_model("tiny_vit_5m_224", True), 224, 10, str(path))
    assert sorted(record.new_head) == ["head.fc.bias", "head.fc.weight"]
    mine = model.state_dict()
    assert torch.equal(mine["patch_embed.conv1.conv.weight"], sd["patch_embed.conv1.conv.weight"])
    assert torch.equal(mine["stages.3.blocks.1.mlp.fc2.weight"],
                       sd["stages.3.blocks.1.mlp.fc2.weight"])


def test_tinyvit_small_inputs_get_small_windows_and_still_load_224_weights(tmp_path):
    import timm

    assert models.tiny_vit_window_sizes("tiny_vit_5m_224", 224) is None
    assert models.tiny_vit_window_sizes("tiny_vit_5m_224", 32) == (1, 1, 2, 1)
    assert models.tiny_vit_window_sizes("resnet18", 32) is None
    path = tmp_path / "w.pth"
    torch.save(timm.create_model("tiny_vit_5m_224", num_classes=1000).state_dict(), path)
    model, _ = models.build_model(resolve_model("tiny_vit_5m_224", True), 32, 10, str(path))
    # attention biases were resized on load
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "other_model"])
def test_bad_weights_file_is_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.pth"
    if content == "other_model":
        torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as e:
        models.build_model(resolve_model("resnet18", True), 32, 10, str(path))
    assert str(path) in str(e.value) and ("--weights" in str(e.value)
                                          or "another model" in str(e.value))


def test_model_override_takes_other_architectures():
    assert models.build_model(resolve_model("tv/resnet34", False), 32, 10)[0].fc.out_features == 10
    vit, record = models.build_model(resolve_model("vit_tiny_patch16_224", False), 32, 10)
    assert vit(torch.zeros(1, 3, 32, 32)).shape == (1, 10) and record.init == "random init"
    with pytest.raises(UserError, match="not a timm model"):
        models.build_model(resolve_model("no_such_net", False), 32, 10)


def test_freeze_backbone_leaves_only_the_head_trainable():
    model, _ = models.build_model(resolve_model("resnet18", False), 32, 10)
    frozen = models.freeze_backbone(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert (trainable == ["fc.weight", "fc.bias"]
            and len(frozen) == len(list(model.parameters())) - 2)
    models.set_train_mode(model, frozen_backbone=True)
    assert not model.training and model.fc.training, "BatchNorm statistics stay frozen too"


def test_offline_pretrained_fails_fast_and_says_what_to_do(tmp_path):
    """Both scripts' default weights come from the Hugging Face hub through the same code: one
    script suffices. (The timeout is a guard against a hang, not a speed target: the probe below is
    what makes it fast.)"""
    script = "train_tinyvit_cifar.py"
    if host_reachable("https://huggingface.co"):
        pytest.skip("network available: the offline failure cannot be provoked here")
    r = run_cli(script, "--pretrained", "--dummy", "--output-dir", str(tmp_path / "run"),
                "--img-size", "32", env={"TORCH_HOME": str(tmp_path / "th"),
                                         "HF_HOME": str(tmp_path / "hf")}, timeout=300)
    one_line_error(r, "fetch https://huggingface.co/timm/tiny_vit_5m_224.dist_in22k_ft_in1k/"
                      "resolve/main/model.safetensors", "python train_tinyvit_cifar.py --weights "
                      "tiny_vit_5m_224.dist_in22k_ft_in1k.safetensors", "--no-pretrained")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_an_unreachable_hub_is_refused_before_any_download_is_tried(monkeypatch):
    """What makes the offline error fast: one reachability probe, and no call into the hub client
    (which retries for a minute)."""
    import huggingface_hub

    probes = []
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, f: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *a, **k: pytest.fail("tried to download"))
    monkeypatch.setattr(models, "host_reachable",
                        lambda url, timeout=4.0: probes.append(url) or False)
    with pytest.raises(UserError, match=r"no network, not cached\): fetch https://huggingface.co/"
                       "timm/tiny_vit_5m_224.dist_in22k_ft_in1k/resolve/main/model.safetensors.*"
                       "--weights tiny_vit_5m_224.dist_in22k_ft_in1k.safetensors"):
        models.build_model(resolve_model("tiny_vit_5m_224", True), 32, 10)
    assert probes == ["https://huggingface.co"]


def test_the_file_to_fetch_offline_is_named_for_each_source():
    assert models.weights_url(resolve_model("resnet18", True)) == (
        "https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/model.safetensors")
    assert models.weights_url(resolve_model("tv/resnet18", True)) == (
        "https://download.pytorch.org/models/resnet18-f37072fd.pth")
    hint = models.offline_hint(resolve_model("tv/resnet18", True))
    assert "--weights resnet18-f37072fd.pth" in hint and "train_resnet_cifar.py" in hint
    assert models.weights_url(resolve_model("resnet18", False)) is None


def test_flops_and_params_are_counted():
    model, _ = models.build_model(resolve_model("resnet18", False), 224, 10)
    assert 11.1e6 < models.count_parameters(model) < 11.3e6
    assert 3.4e9 < models.flops_per_image(model, 224) < 3.9e9  # 1.82 GMACs = 3.64 GFLOPs


@pytest.mark.parametrize("name,default",
                         [("resnet18", True), ("tv/resnet18", False), ("tiny_vit_5m_224", True)])
def test_zero_init_last_defaults_to_the_library_and_can_be_set_either_way(name, default):
    """timm zero-initialises the last BatchNorm of every ResNet block (and TinyViT the last norm of
    its MBConv blocks); torchvision does not. The flag sets it either way; a model without such
    norms refuses it."""
    choice = resolve_model(name, False)
    assert models.starts_at_zero(models.create_model(choice, 32, 10)) is default
    for flag in (True, False):
        model = models.create_model(choice, 32, 10, zero_init_last=flag)
        norms = models.last_norms(model)
        assert len(norms) >= 2 and all(torch.equal(w, torch.full_like(w, 0.0 if flag else 1.0))
                                       for w in norms)
    with pytest.raises(UserError,
                       match="--no-zero-init-last: vit_tiny_patch16_224 has no residual branches"):
        models.create_model(resolve_model("vit_tiny_patch16_224", False), 32, 10,
                            zero_init_last=False)
