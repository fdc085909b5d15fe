"""Is this machine ready to run the experiment? Versions, GPUs, data, cached weights; --bench measures speed.

    python check.py                  # exit 0 when ready to train on a GPU
    python check.py --bench [--json] # images/s of each data path and model (see design.md)
    python check.py --bench-suite 2  # time 2 real epochs of each model; project the four 30-epoch runs
    python check.py --bench-profile tiny_vit_5m_224  # which kernels a training step spends its time in
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

from common.errors import exit_on_user_error


def readiness(data_dir: str) -> tuple[list[str], list[str]]:
    """(report lines, missing pieces) for the environment."""
    import timm
    import torch
    import torchvision
    from huggingface_hub import try_to_load_from_cache

    from common.data import FOLDER, cifar_present

    lines = [f"python       {platform.python_version()}", f"torch        {torch.__version__}",
             f"torchvision  {torchvision.__version__}", f"timm         {timm.__version__}"]
    missing = []
    cuda = torch.cuda.is_available()
    lines.append(f"CUDA         {'available, ' + str(torch.version.cuda) if cuda else 'not available'}"
                 f" (torch built for CUDA {torch.version.cuda or 'none: CPU-only build'})")
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}        {p.name}, {p.total_memory / 2**30:.1f} GiB, compute {p.major}.{p.minor}")
        lines.append(f"cuDNN        {torch.backends.cudnn.version()}")
        lines.append(f"bf16         {'supported' if torch.cuda.is_bf16_supported() else 'not supported: fp16 + GradScaler'}")
    else:
        missing.append("no CUDA GPU visible to PyTorch: install a CUDA build of torch (env_setup.md) or train "
                       "with --device cpu (slow)")
    have_data = cifar_present(data_dir)
    lines.append(f"CIFAR-10     {'present' if have_data else 'missing'} in {Path(data_dir) / FOLDER}")
    if not have_data:
        missing.append(f"CIFAR-10 not in {Path(data_dir) / FOLDER}: the train scripts download it, or see "
                       f"env_setup.md to place it by hand")
    resnet_file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(
        torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    tinyvit_cached = any(isinstance(try_to_load_from_cache("timm/tiny_vit_5m_224.dist_in22k_ft_in1k", f), str)
                         for f in ("model.safetensors", "pytorch_model.bin"))
    lines.append(f"ResNet-18 ImageNet weights  {'cached' if resnet_file.is_file() else 'not cached'} ({resnet_file})")
    lines.append(f"TinyViT-5M weights          {'cached' if tinyvit_cached else 'not cached'} (Hugging Face cache)")
    if not resnet_file.is_file():
        missing.append("ResNet-18 ImageNet weights not cached: downloaded on the first --pretrained run, "
                       "or pass --weights PATH")
    if not tinyvit_cached:
        missing.append("TinyViT-5M weights not cached: downloaded on the first --pretrained run, or pass --weights PATH")
    return lines, missing


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--bench", action="store_true", help="measure data and training throughput")
    parser.add_argument("--json", action="store_true", help="with --bench: print the results as JSON")
    parser.add_argument("--bench-img-size", type=int, default=224)
    parser.add_argument("--bench-batch-size", type=int, default=128)
    parser.add_argument("--bench-steps", type=int, default=0, help="timed steps per measurement (0 = auto)")
    parser.add_argument("--bench-compile", action="store_true", help="torch.compile the models")
    parser.add_argument("--bench-channels-last", default=True, action=argparse.BooleanOptionalAction)
    parser.add_argument("--bench-suite", type=int, default=0, metavar="EPOCHS",
                        help="train each model for EPOCHS epochs on CIFAR-sized synthetic data through the "
                             "training code and project the time of the four-run suite")
    parser.add_argument("--bench-suite-flags", default="", metavar="FLAGS",
                        help='training flags for --bench-suite, e.g. "--batch-size 256 --compile"')
    parser.add_argument("--bench-profile", choices=["resnet18", "tiny_vit_5m_224"],
                        help="profile training steps of one model: the operators/kernels that take the time")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    args = parser.parse_args(argv)
    if args.bench_profile:
        from common.bench import bench_profile

        return bench_profile(args.bench_profile, args.device, args.bench_img_size, args.bench_batch_size,
                             args.bench_steps, args.bench_compile, args.bench_channels_last)
    if args.bench_suite < 0:
        parser.error("--bench-suite must be a number of epochs >= 1")
    if args.bench_suite:
        from common.bench import bench_suite

        return bench_suite(args.bench_suite, args.device, args.bench_suite_flags, args.json)
    if args.bench:
        from common.bench import run_benchmarks

        return run_benchmarks(args.device, args.bench_img_size, args.bench_batch_size, args.bench_steps, args.json,
                              args.bench_compile, args.bench_channels_last)
    lines, missing = readiness(args.data_dir)
    print("\n".join(lines))
    if missing:
        print(f"\nnot ready ({len(missing)}):")
        for m in missing:
            print(f"  - {m}")
        return 1
    print("\nready: all four runs can start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
