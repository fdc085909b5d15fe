"""Models with a 10-way head: timm models (ResNet-18, TinyViT-5M, any other) or torchvision ResNets,
started from random init or from ImageNet weights. Weights come from the library's download path
(checked against the published hash, then loaded without unpickling code) or from a local --weights
file."""
from __future__ import annotations

import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_error_reason
from .downloads import file_digest, host_reachable
from .errors import UserError
from .record import WeightsInfo
from .specs import ModelChoice

OFFLINE_HINT = "pass --weights PATH (a local weights file) or --no-pretrained to train from scratch"


def weights_url(choice: ModelChoice) -> str | None:
    """Where the ImageNet weights of `choice` can be fetched by hand (env_setup.md's table)."""
    if choice.tag is None:
        return None
    if choice.library == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model_weights(choice.arch)[choice.tag].url
        except (KeyError, ValueError):
            return None
    import timm

    cfg = timm.models.get_pretrained_cfg(f"{choice.arch}.{choice.tag}")
    if cfg is None or not cfg.hf_hub_id:
        return None
    return f"https://huggingface.co/{cfg.hf_hub_id.split('@')[0]}/resolve/main/model.safetensors"


def weights_cached(choice: ModelChoice) -> bool:
    """Whether the ImageNet weights of `choice` are in the library's cache (no download needed)."""
    if choice.library == "torchvision":
        url = weights_url(choice)
        return bool(url) and (Path(torch.hub.get_dir()) / "checkpoints"
                              / os.path.basename(url)).is_file()
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(f"{choice.arch}.{choice.tag}")
    if cfg is None or not cfg.hf_hub_id:
        return False
    repo = cfg.hf_hub_id.split("@")[0]
    return any(isinstance(try_to_load_from_cache(repo, f), str)
               for f in ("model.safetensors", "pytorch_model.bin"))


def offline_hint(choice: ModelChoice) -> str:
    """The file to fetch on a machine with network and the flag that uses it; or scratch."""
    url = weights_url(choice)
    if url is None:
        return OFFLINE_HINT
    name = (os.path.basename(url) if choice.library == "torchvision"
            else f"{choice.arch}.{choice.tag}.safetensors")
    script = choice.spec.script if choice.spec else "train_resnet_cifar.py"
    return (f"fetch {url} on a machine with network (save it as {name}), then: python {script} "
            f"--weights {name} ... (env_setup.md, 'Pretrained weights on an offline machine'); or "
            "--no-pretrained to train from scratch")
log = logging.getLogger(__name__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP and torch.compile wrappers so state dicts have plain keys."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def forget_cached_weights(model: nn.Module) -> None:
    """Drop what a model computed from its weights and kept: timm's TinyViT caches its attention
    biases per device in eval mode, and load_state_dict (which copies into the parameters) leaves
    that cache as it was; timm 1.0.9 to 1.0.20 clear it only in train(), so best.pt would be scored
    with the biases of the weights it replaced. Called after every weight load."""
    for m in unwrap_model(model).modules():
        if isinstance(getattr(m, "attention_bias_cache", None), dict):
            m.attention_bias_cache = {}


def head_module(model: nn.Module) -> nn.Module:
    """The classifier layer that is replaced by a fresh 10-way one."""
    model = unwrap_model(model)
    return model.get_classifier() if hasattr(model, "get_classifier") else model.fc


def freeze_backbone(model: nn.Module) -> list[str]:
    """Linear probe: only the head trains. Returns the frozen parameter names."""
    head = {id(p) for p in head_module(model).parameters()}
    frozen = []
    for name, p in unwrap_model(model).named_parameters():
        if id(p) not in head:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def set_train_mode(model: nn.Module, frozen_backbone: bool) -> None:
    """model.train(), except that a frozen backbone stays in eval mode (its BatchNorm statistics
    too)."""
    model.train()
    if frozen_backbone:
        target = unwrap_model(model)
        target.eval()
        head_module(target).train()


# ----------------------------------------------------------------------------- building

def tiny_vit_window_sizes(arch: str, img_size: int) -> tuple[int, ...] | None:
    """Window sizes for a timm TinyViT at `img_size`: scaled down below its native size, since its
    windows pad small feature maps and most compute would go to padding. None for other models or at
    full size."""
    import timm

    if not arch.startswith("tiny_vit_"):
        return None
    native = getattr(timm.models.get_pretrained_cfg(arch), "input_size", (3, 224, 224))[-1]
    if img_size >= native:
        return None
    try:
        with torch.device("meta"):  # shapes only: instant
            probe = timm.create_model(arch, pretrained=False)
    except (RuntimeError, NotImplementedError):  # timm < 1.0.12 reads a value at construction
        probe = timm.create_model(arch, pretrained=False)
    windows = [7] + [stage.blocks[0].window_size for stage in probe.stages[1:]]
    return tuple(max(1, math.ceil(w * img_size / native)) for w in windows)


def last_norms(model: nn.Module) -> list[torch.Tensor]:
    """The scale of the last norm of every residual branch: what zero-init-last sets to 0. timm
    ResNet blocks (bn2 / bn3), torchvision's BasicBlock / Bottleneck (bn2 / bn3), timm TinyViT's
    MBConv blocks (conv3.bn)."""
    found = []
    for m in unwrap_model(model).modules():
        kind = type(m).__name__
        if kind in ("BasicBlock", "Bottleneck"):
            norm = getattr(m, "bn3", None) if kind == "Bottleneck" else getattr(m, "bn2", None)
            if isinstance(norm, nn.BatchNorm2d):
                found.append(norm.weight)
        elif kind == "MBConv" and hasattr(m, "conv3"):
            found.append(m.conv3.bn.weight)
    return found


def starts_at_zero(model: nn.Module) -> bool | None:
    """Whether every residual branch's last norm is zero (None: the model has no such norms)."""
    norms = last_norms(model)
    return bool(all(float(w.detach().abs().max()) == 0 for w in norms)) if norms else None


def create_model(choice: ModelChoice, img_size: int, num_classes: int,
                 zero_init_last: bool | None = None) -> nn.Module:
    """The architecture with a fresh `num_classes`-way head and random weights. `zero_init_last`
    (None: the library's choice, on for timm's ResNets and TinyViT, off for torchvision's) sets
    whether the last norm of every residual branch starts at zero."""
    model = _create(choice, img_size, num_classes, zero_init_last)
    norms = last_norms(model)
    if zero_init_last is not None and not norms:
        raise UserError(f"--{'' if zero_init_last else 'no-'}zero-init-last: {choice.requested} "
                        "has no residual branches ending in a norm (it applies to ResNets and "
                        "TinyViT)")
    if zero_init_last is not None:
        with torch.no_grad():
            for w in norms:  # BatchNorm's own default scale is 1
                w.fill_(0.0 if zero_init_last else 1.0)
    return model


def _create(choice: ModelChoice, img_size: int, num_classes: int,
            zero_init_last: bool | None) -> nn.Module:
    if choice.library == "torchvision":
        import torchvision

        if choice.arch not in torchvision.models.list_models(module=torchvision.models):
            raise UserError(f"--model {choice.requested}: {choice.arch} is not a torchvision "
                            "classification model (e.g. tv/resnet18, tv/resnet50)")
        model = torchvision.models.get_model(choice.arch, weights=None,
                                             zero_init_residual=bool(zero_init_last))
        if not isinstance(getattr(model, "fc", None), nn.Linear):
            raise UserError(f"--model {choice.requested} has no `fc` classifier; use a "
                            "ResNet-style model")
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model
    import timm

    if not timm.is_model(choice.arch):
        raise UserError(f"--model {choice.requested} is not a timm model (e.g. resnet18.a1_in1k, "
                        f"tiny_vit_5m_224.dist_in22k_ft_in1k, tv/resnet18); list them with "
                        f"timm.list_models()")
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    windows = tiny_vit_window_sizes(choice.arch, img_size)
    if windows is not None:
        kwargs["window_sizes"] = windows
    if (("vit_" in choice.arch and not choice.arch.startswith("tiny_vit_"))
            or choice.arch.startswith("deit_")):
        kwargs["img_size"] = img_size  # plain ViTs fix their input size at construction
    return timm.create_model(choice.arch, pretrained=False, **kwargs)


def build_model(choice: ModelChoice, img_size: int, num_classes: int,
                weights_file: str | None = None,
                zero_init_last: bool | None = None) -> tuple[nn.Module, WeightsInfo]:
    """create_model, then its starting weights: random init, the library's ImageNet weights
    (downloaded or cached, hash-checked), or a local file; with a record of which."""
    return apply_weights(create_model(choice, img_size, num_classes, zero_init_last), choice,
                         weights_file)


def apply_weights(model: nn.Module, choice: ModelChoice,
                  weights_file: str | None) -> tuple[nn.Module, WeightsInfo]:
    """Load the ImageNet weights `choice` names (or a local file) into `model`; random init when
    scratch."""
    if weights_file:
        state = read_state_dict(weights_file)
        record = WeightsInfo("file", file=str(weights_file), sha256=file_digest(Path(weights_file)))
    elif choice.tag is not None:
        state, record = download_weights(choice)
    else:
        return model, WeightsInfo("random init", library=choice.library, arch=choice.arch)
    report = load_weights(model, state, str(weights_file or record.file))
    # a local file's ImageNet accuracy is not known
    published = None if weights_file else choice.weights_info
    # a file stands in for the weights --model names: their tag is kept, their top-1 is not known
    record.library, record.arch, record.tag = choice.library, choice.arch, choice.tag
    record.loaded_tensors, record.new_head = report["loaded"], report["dropped"]
    if published is not None:
        record.imagenet_top1, record.top1_source = published.imagenet_top1, published.top1_source
        record.pretrain_data = published.pretrain_data
    return model, record


# ----------------------------------------------------------------------------- downloads, checked

def download_weights(choice: ModelChoice) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """The ImageNet state dict of `choice` from the library's download path, verified against the
    hash the library publishes (torchvision: in the file name; Hugging Face hub: the blob's
    SHA-256), never unpickled."""
    if choice.library == "torchvision":
        path, expected = _torchvision_file(choice)
    else:
        path, expected = _timm_file(choice)
    actual = file_digest(path)
    if expected and not actual.startswith(expected):
        raise UserError(f"{path} does not match its published SHA-256 ({expected[:16]}..., found "
                        f"{actual[:16]}...): it is damaged or was replaced; delete it to download "
                        f"it again, or {offline_hint(choice)}")
    state = read_state_dict(path, flag="pretrained weights")
    source = "torchvision" if choice.library == "torchvision" else "Hugging Face hub (timm)"
    return state, WeightsInfo("ImageNet", source=source, file=str(path), sha256=actual,
                              hash_checked=bool(expected))


def _torchvision_file(choice: ModelChoice) -> tuple[Path, str]:
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(choice.arch)[choice.tag]
    except (KeyError, ValueError):
        raise UserError(f"--model {choice.requested}: torchvision has no {choice.tag} weights for "
                        f"{choice.arch}; {OFFLINE_HINT}") from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    prefix = re.search(r"-([a-f0-9]{6,})\.", path.name)
    if not path.is_file():
        if not host_reachable(weights.url):
            raise UserError(f"cannot download the ImageNet weights of {choice.arch} from "
                            f"{weights.url} (no network?): {offline_hint(choice)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(weights.url, str(path),
                                           hash_prefix=prefix.group(1) if prefix else None,
                                           progress=log.isEnabledFor(logging.INFO))
        except (OSError, RuntimeError) as e:
            raise UserError(f"downloading {weights.url} failed ({e}): "
                            f"{offline_hint(choice)}") from None
    return path, prefix.group(1) if prefix else ""


def _timm_file(choice: ModelChoice) -> tuple[Path, str]:
    import timm
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    name = f"{choice.arch}.{choice.tag}"
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise UserError(f"--model {choice.requested}: timm has no hub weights named {name}; "
                        f"use a full tag such as resnet18.a1_in1k, or {OFFLINE_HINT}")
    repo = cfg.hf_hub_id.split("@")[0]
    for filename in ("model.safetensors", "pytorch_model.bin"):
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return Path(cached), _hub_blob_hash(Path(cached))
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or not host_reachable(endpoint):
        raise UserError(f"cannot download the pretrained weights of {name} from the Hugging Face "
                        f"hub (no network, not cached): {offline_hint(choice)}")
    try:
        path = Path(hf_hub_download(repo, "model.safetensors"))
    except Exception as e:  # hub errors: network, missing file, auth; one message
        raise UserError(f"downloading the weights of {name} from the hub failed "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:150]}): "
                        f"{offline_hint(choice)}") from None
    return path, _hub_blob_hash(path)


def _hub_blob_hash(path: Path) -> str:
    """The hub stores a large file as blobs/<its SHA-256>; the snapshot file links there."""
    real = path.resolve()
    return (real.name if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name)
            else "")


# ----------------------------------------------------------------------------- weights files

def read_state_dict(path: str | Path, flag: str = "--weights") -> dict[str, torch.Tensor]:
    """Tensors of a weights file (.safetensors, or .pth/.pt/.bin read with weights_only=True): a
    state dict, or a checkpoint holding one under `model` / `state_dict`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, pickled code objects: one message
        raise UserError(f"{flag} {path} is not a readable weights file "
                        f"({load_error_reason(e, path)}); download it again or pass "
                        "another file") from None
    for key in ("model", "state_dict", "model_state", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{flag} {path} holds no state dict (expected tensors, or a dict with "
                        "'model' or 'state_dict')")
    clean = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            for p in ("module.", "_orig_mod."):
                k = k[len(p):] if k.startswith(p) else k
            clean[k] = v
    return clean


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], label: str) -> dict:
    """Load `state` into `model`: the timm checkpoint filter of the model is applied (it resizes
    TinyViT attention biases), tensors of another shape (the 1000-class head) are dropped and
    reported. Refuses a file that fits less than half the model."""
    target = unwrap_model(model)
    filter_fn = getattr(sys.modules.get(type(target).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None and type(target).__module__.startswith("timm."):
        try:
            state = filter_fn(state, target)
        except Exception as e:  # foreign layouts make the filter fail: that is a wrong file
            raise UserError(f"{label} does not fit {type(target).__name__} "
                            f"({type(e).__name__}: {e})") from None
    own = target.state_dict()
    dropped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in dropped}
    result = target.load_state_dict(state, strict=False)
    forget_cached_weights(target)
    loaded = len(state) - len(result.unexpected_keys)
    if loaded == 0 or loaded < 0.5 * len(own):
        raise UserError(f"{label} does not match {type(target).__name__}: only {loaded} of "
                        f"{len(own)} tensors fit; is it a file for another model? (pass the "
                        "matching --model)")
    report = {"loaded": loaded, "missing": [k for k in result.missing_keys if k not in dropped],
              "unexpected": list(result.unexpected_keys), "dropped": dropped}
    log.info(f"loaded {loaded}/{len(own)} tensors from {label}")
    for key in ("missing", "unexpected", "dropped"):
        if report[key]:
            more = len(report[key]) - 6
            shown = ", ".join(report[key][:6]) + (f" (+{more} more)" if more > 0 else "")
            note = " (another shape: the new head, initialised fresh)" if key == "dropped" else ""
            log.info(f"  {key}: {shown}{note}")
    return report


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
