"""`python check.py`: is this machine ready for the four runs? Versions, the PyTorch build and GPU,
the data (--data-dir: what kind it is and how many images each split holds) and the pretrained
weights."""
from __future__ import annotations

import platform
from pathlib import Path


def data_report(data_dir: str) -> tuple[list[str], list[str]]:
    """Lines about --data-dir, and what is missing."""
    from .data import cache, folders
    from .data.sources import (ACCEPTS, DEFAULT_DATA_DIR, batches_folder, describe_kind,
                               lone_archive, read_batches)

    path = Path(data_dir)
    if not path.exists() and path.name.lower().endswith(folders.ARCHIVE_SUFFIXES):
        return [f"CIFAR-10     {path}: no such file"], [f"--data-dir {path}: no such file; give "
                                                        "the archive's path"]
    if not path.exists() and path != DEFAULT_DATA_DIR:
        return ([f"CIFAR-10     {path}: no such file or folder"],
                [f"--data-dir {path}: no such file or folder; give the folder or archive that "
                 "holds CIFAR-10 (or the train scripts' --download fetches it there)"])
    path = lone_archive(path) or path
    kind = describe_kind(path)
    if kind == "missing":
        where = ("the train scripts download it there" if path == DEFAULT_DATA_DIR
                 else "the train scripts' --download fetches it there")
        return ([f"CIFAR-10     not found in {path}"],
                [f"no CIFAR-10 in {path}: {where}; --data-dir takes {ACCEPTS}"])
    if kind == "cifar-batches":
        train_x, _, test_x, _ = read_batches(batches_folder(path))
        counts = f"{len(train_x)} train / {len(test_x)} test images"
    else:
        cached_at = cache.cache_file(path, cache.source_fingerprint(path), None, False)
        hit = cache.load_cache(cached_at)
        if hit is not None:
            counts = (f"{hit[1]['counts']['train']} train / {hit[1]['counts']['test']} test images "
                      f"(decoded, cached in {cached_at})")
        else:
            entries = (folders.list_archive(path) if kind in ("tar", "zip")
                       else folders.list_folder(path))
            n = {s: sum(e.split == s for e in entries) for s in folders.SPLITS}
            counts = (f"{n['train']} train / {n['test']} test image files, "
                      f"{len({e.cls for e in entries})} classes (not decoded yet)")
    names = {"cifar-batches": "official cifar-10-batches-py", "image-folder": "image folder",
             "tar": "tar archive of an "
             "image folder", "zip": "zip archive of an image folder"}
    return [f"CIFAR-10     {names[kind]}: {path}, {counts}"], []


def readiness(data_dir: str) -> tuple[list[str], list[str]]:
    """(report lines, missing pieces) of this machine."""
    import timm
    import torch
    import torchvision

    from .specs import RESNET18, TINYVIT_5M

    lines = [f"python       {platform.python_version()}", f"torch        {torch.__version__}",
             f"torchvision  {torchvision.__version__}", f"timm         {timm.__version__}"]
    missing = []
    from .runtime import mps_available

    if not torch.cuda.is_available() and mps_available():
        lines.append("GPU          Apple silicon (MPS): the runs use it, CPU-fed, in fp32 (this path "
                     "is checked by tests only, not yet run on a Mac)")
    elif torch.version.cuda is None:
        lines.append("GPU          none: this PyTorch is a CPU-only build")
        missing.append("no GPU for the experiment (four 30-epoch runs at 224 px: hours on a GPU, "
                       "weeks on a CPU): on a machine with an NVIDIA GPU, install PyTorch's CUDA "
                       "build (env_setup.md)")
    elif not torch.cuda.is_available():
        lines.append(f"GPU          none visible (PyTorch built for CUDA {torch.version.cuda}, "
                     "but no GPU or driver found)")
        missing.append("no GPU visible for the experiment: if this machine has an NVIDIA GPU, "
                       "check its driver (nvidia-smi) and CUDA_VISIBLE_DEVICES; if it has none, "
                       "the experiment needs another machine")
    else:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}        {p.name}, {p.total_memory / 2**30:.1f} GiB, compute "
                         f"{p.major}.{p.minor}, CUDA {torch.version.cuda}")
        lines.append(f"cuDNN        {torch.backends.cudnn.version()}")
        lines.append(bf16_line(torch.device("cuda", 0)))
    data_lines, data_missing = data_report(data_dir)
    lines += data_lines
    missing += data_missing
    for spec in (RESNET18, TINYVIT_5M):
        cached = _hub_cached(f"timm/{spec.arch}.{spec.default_tag}")
        lines.append(f"{spec.display + ' weights':<12} {'cached' if cached else 'not cached'} "
                     f"({spec.arch}.{spec.default_tag}, Hugging Face cache)")
        if not cached:
            missing.append(f"{spec.display} ImageNet weights not cached: downloaded on the first "
                           "--pretrained run, or pass --weights PATH")
    return lines, missing


def bf16_line(device) -> str:
    """What the runs' AMP will be on this GPU: bf16 where it is native (compute capability 8.0 and
    newer), else fp16 with a GradScaler (emulated bf16 is slower)."""
    import torch

    from .runtime import native_bf16

    major, minor = torch.cuda.get_device_capability(device)
    if native_bf16(device):
        return f"bf16         native (compute {major}.{minor}): training runs in bf16 autocast"
    return (f"bf16         not native (compute {major}.{minor}, emulated at best): training runs "
            "in fp16 + GradScaler")


def _hub_cached(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, f), str)
               for f in ("model.safetensors", "pytorch_model.bin"))
