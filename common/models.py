"""Models: torchvision ResNets and timm models (TinyViT-5M by default) with a 10-way head, ImageNet
weights from the real download paths (failing fast offline) or from a local `--weights` file."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_error_reason
from .data import NUM_CLASSES
from .downloads import host_reachable
from .errors import UserError

OFFLINE_HINT = "pass --weights PATH (a local weights file) or --no-pretrained to train from scratch"


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP and torch.compile wrappers so state dicts have plain keys."""
    while True:
        if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def head_module(model: nn.Module) -> nn.Module:
    """The classifier layer that is replaced by a fresh 10-way one."""
    model = unwrap_model(model)
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    return model.fc


# ----------------------------------------------------------------------------- torchvision

def _build_torchvision(name: str, pretrained_download: bool) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"--model {name} is not a torchvision classification model "
                        f"(e.g. resnet18, resnet34, resnet50)")
    weights = None
    if pretrained_download:
        try:
            weights = torchvision.models.get_model_weights(name)["IMAGENET1K_V1"]
        except KeyError:
            raise UserError(f"--model {name} has no IMAGENET1K_V1 weights in torchvision; {OFFLINE_HINT}") from None
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        if not cached.is_file() and not host_reachable(weights.url):
            raise UserError(f"cannot download the ImageNet weights of {name} from {weights.url} "
                            f"(no network?): {OFFLINE_HINT}")
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as e:  # urllib errors are OSErrors; a bad cached file is a RuntimeError
        raise UserError(f"downloading the ImageNet weights of {name} failed ({e}): {OFFLINE_HINT}") from None
    if not isinstance(getattr(model, "fc", None), nn.Linear):
        raise UserError(f"--model {name} has no `fc` classifier; the ResNet script takes ResNet-style models")
    model.fc = nn.Linear(model.fc.in_features, NUM_CLASSES)
    return model


# ----------------------------------------------------------------------------- timm

def tiny_vit_window_sizes(name: str, img_size: int) -> tuple[int, ...] | None:
    """Window sizes for a timm TinyViT at `img_size`: scaled down below the native size, since its
    windows pad small feature maps and most compute would go to padding. None for other models."""
    import timm

    base, _ = timm.models.split_model_name_tag(name)
    if not base.startswith("tiny_vit_"):
        return None
    native = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(base)
    native_size = native.input_size[-1] if native is not None else 224
    if img_size >= native_size:
        return None
    with torch.device("meta"):
        probe = timm.create_model(base, pretrained=False)
    windows = [7] + [stage.blocks[0].window_size for stage in probe.stages[1:]]
    return tuple(max(1, math.ceil(w * img_size / native_size)) for w in windows)


def _timm_hub_ready(name: str) -> None:
    """Fail in seconds, not after a minute of retries, when the hub weights are neither cached nor reachable."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise UserError(f"--model {name}: timm has no pretrained weights under this name; "
                        f"use a full tag such as tiny_vit_5m_224.dist_in22k_ft_in1k, or {OFFLINE_HINT}")
    hub_id = cfg.hf_hub_id
    if not hub_id:
        return  # weights served from a plain URL: timm's own download reports failures quickly
    hub_id = hub_id.split("@")[0]
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(hub_id, filename), str):
            return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or not host_reachable(endpoint):
        raise UserError(f"cannot download the pretrained weights of {name} from the Hugging Face hub "
                        f"(no network, not cached): {OFFLINE_HINT}")


def _build_timm(name: str, pretrained_download: bool, img_size: int) -> nn.Module:
    import timm

    base, _ = timm.models.split_model_name_tag(name)
    if not timm.is_model(base):
        raise UserError(f"--model {name} is not a timm model (e.g. tiny_vit_5m_224.dist_in22k_ft_in1k, "
                        f"vit_tiny_patch16_224); list them with timm.list_models()")
    kwargs: dict[str, Any] = {"num_classes": NUM_CLASSES}
    windows = tiny_vit_window_sizes(name, img_size)
    if windows is not None:
        kwargs["window_sizes"] = windows
    if "vit_" in base and not base.startswith("tiny_vit_"):
        kwargs["img_size"] = img_size  # plain ViTs fix their input size at construction
    if pretrained_download:
        _timm_hub_ready(name)
    try:
        return timm.create_model(name, pretrained=pretrained_download, **kwargs)
    except (OSError, RuntimeError) as e:  # hub errors are OSErrors
        raise UserError(f"loading the pretrained weights of {name} failed ({e}): {OFFLINE_HINT}") from None


# ----------------------------------------------------------------------------- weights files

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: a state dict, or a checkpoint holding one under `model`/`state_dict`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, pickled code objects: one message
        raise UserError(f"--weights {path} is not a readable weights file ({load_error_reason(e)}); "
                        f"re-download it or pass another file") from None
    for key in ("model", "state_dict", "model_state", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights {path} holds no state dict (expected tensors, or a dict with 'model' "
                        f"or 'state_dict')")
    prefixes = ("module.", "_orig_mod.")
    clean = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            for p in prefixes:
                k = k[len(p):] if k.startswith(p) else k
            clean[k] = v
    return clean


def load_weights_file(model: nn.Module, path: str | Path, quiet: bool = False) -> dict[str, list[str]]:
    """Load `path` into `model`: the checkpoint filter of the model's timm module is applied (it resizes
    TinyViT attention biases), tensors whose shape differs (the 1000-class head) are dropped, and
    missing / unexpected / dropped keys are reported. Refuses a file that matches nothing."""
    state = read_state_dict(path)
    target = unwrap_model(model)
    filter_fn = getattr(sys.modules.get(type(target).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None and type(target).__module__.startswith("timm."):
        try:
            state = filter_fn(state, target)
        except Exception as e:  # foreign layouts make the filter fail: that is a wrong file
            raise UserError(f"--weights {path} does not fit {type(target).__name__} ({type(e).__name__}: {e})") from None
    own = target.state_dict()
    dropped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for k in dropped:
        del state[k]
    result = target.load_state_dict(state, strict=False)
    report = {"missing": [k for k in result.missing_keys if k not in dropped],
              "unexpected": list(result.unexpected_keys), "dropped": dropped}
    loaded = len(state) - len(report["unexpected"])
    if loaded == 0 or loaded < 0.5 * len(own):
        raise UserError(f"--weights {path} does not match {type(target).__name__}: only {loaded} of "
                        f"{len(own)} tensors fit; is it a file for another model?")
    if not quiet:
        print(f"loaded {loaded}/{len(own)} tensors from {path}", file=sys.stderr)
        for label, keys in report.items():
            if keys:
                shown = ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
                note = " (shape differs: the new 10-way head, initialised fresh)" if label == "dropped" and all(
                    k.startswith(("fc.", "head.", "classifier.")) for k in keys) else ""
                print(f"  {label}: {shown}{note}", file=sys.stderr)
    return report


# ----------------------------------------------------------------------------- entry point

def build_model(family: str, name: str, pretrained: bool, weights: str | None, img_size: int,
                quiet: bool = False) -> nn.Module:
    """A classifier with a 10-way head: ImageNet weights downloaded (pretrained, no file), loaded
    from `weights`, or random (scratch)."""
    download = pretrained and not weights
    if family == "resnet":
        model = _build_torchvision(name, download)
    elif family == "timm":
        model = _build_timm(name, download, img_size)
    else:
        raise ValueError(f"unknown model family {family!r}")
    if pretrained and weights:
        load_weights_file(model, weights, quiet=quiet)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in unwrap_model(model).parameters())


def flops_per_image(model: nn.Module, img_size: int) -> int:
    """Forward FLOPs of one image, counted by torch.utils.flop_counter (matmuls and convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    target = unwrap_model(model)
    was_training = target.training
    param = next(target.parameters())
    target.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            target(torch.zeros(1, 3, img_size, img_size, device=param.device, dtype=param.dtype))
    finally:
        target.train(was_training)
    return int(counter.get_total_flops())
