"""Is this machine ready to run the experiment? Versions, GPU, data, cached weights; --bench* measure speed.

    python check.py                          # exit 0 when ready to train on a GPU
    python check.py --data-dir cifar10-jpeg.tar.gz   # what kind of CIFAR-10 copy that is, and its counts
    python check.py --bench [--json]         # images/s of each data path and model (see design.md)
    python check.py --bench-suite 2          # time 2 real epochs of each model; project the four 30-epoch runs
    python check.py --bench-profile tiny_vit_5m_224  # which kernels a training step spends its time in
    python check.py --smoke --data-dir cifar10-jpeg.tar.gz   # every run path, a PASS/FAIL line each
    python check.py --memory                 # the GPU memory model: parts, card sizes, its check
"""
from __future__ import annotations

import argparse
import json
import sys

from common.cli import entry_point, script_parser
from common.errors import UserError
from common.specs import MODELS


def parse_args(argv):
    p = script_parser(__doc__)
    p.add_argument("--data-dir", default="./data",
                   help="The CIFAR-10 copy to check (as the train scripts' "
                   "--data-dir).")
    p.add_argument("--bench", action="store_true", help="Measure data and training throughput.")
    p.add_argument("--json", action="store_true",
                   help="With --bench or --bench-suite: print only the result, as JSON.")
    p.add_argument("--bench-img-size", type=int,
                   help="Image size of the benchmarks (default: 224 on a GPU, 64 on "
                   "a CPU).")
    p.add_argument("--bench-batch-size", type=int,
                   help="Batch size of the benchmarks (default: 128 on a GPU, 16 "
                   "on a CPU).")
    p.add_argument("--bench-steps", type=int,
                   help="Timed steps per measurement (default: 50 on a GPU, 2 on a CPU).")
    p.add_argument("--bench-compile", action="store_true",
                   help="torch.compile the models in --bench.")
    p.add_argument("--bench-channels-last", default=True, action=argparse.BooleanOptionalAction,
                   help="Channels-last memory format in --bench.")
    p.add_argument("--bench-suite", type=int, default=0, metavar="EPOCHS",
                   help="Run each train script for EPOCHS epochs on CIFAR-sized synthetic data and "
                        "project the time of the four-run suite.")
    p.add_argument("--bench-suite-output", default="runs/bench_suite.json", metavar="PATH",
                   help="Where --bench-suite saves its figures (run_suite.py --dry-run projects a "
                        "sweep from them).")
    p.add_argument("--bench-suite-flags", default="", metavar="FLAGS",
                   help='Training flags for --bench-suite, e.g. "--batch-size 256 --compile".')
    p.add_argument("--bench-profile", choices=[*MODELS, "augment"],
                   help="Profile training steps of one model (the operators or kernels that take "
                        "the time), or count the device augmentation's ops and bytes per batch "
                        "(augment).")
    p.add_argument("--memory", action="store_true",
                   help="The GPU memory model of both models at the defaults: the parts, the "
                        "micro-batch it chooses on 8 to 80 GB cards, and its check against a real "
                        "step on this CPU (about a minute).")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="Where to benchmark.")
    p.add_argument("--smoke", action="store_true",
                   help="Short real runs on --data-dir: on a GPU each model x data pipeline x AMP "
                        "dtype (bf16, fp16), a SIGTERM and a SIGKILL each followed by --resume, "
                        "and --compile, a PASS/FAIL line each with host syncs, peak memory and "
                        "images/s, then whether the four runs fit and how long they take; on a "
                        "CPU a short subset (4 cases, about 2 minutes on 2 cores). The plan is "
                        "printed first.")
    p.add_argument("--smoke-all", action="store_true",
                   help="On a CPU, all the cases of --smoke (10, at 32 px).")
    p.add_argument("--smoke-img-size", type=int,
                   help="Image size of --smoke (default: 224 on a GPU, 32 on a CPU).")
    p.add_argument("--smoke-only", metavar="WORDS",
                   help="Only the --smoke cases whose name contains WORDS.")
    p.add_argument("--smoke-keep", metavar="DIR",
                   help="Keep the --smoke run folders in DIR (default: a temp folder, removed).")
    args = p.parse_args(argv)
    for flag in ("bench_img_size", "bench_batch_size", "bench_steps", "bench_suite",
                 "smoke_img_size"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "bench_suite" else 1):
            raise UserError(f"--{flag.replace('_', '-')} must be a number >= 1")
    return args


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        import torch

        from common.smoke import run_smoke

        gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        size = args.smoke_img_size or (224 if gpu else 32)
        return run_smoke(args.data_dir, gpu, size, args.smoke_keep, only=args.smoke_only,
                         full=args.smoke_all, emit=lambda line: print(line, flush=True))
    if args.memory:
        from common.memory import memory_report

        print("\n".join(memory_report()))
        return 0
    if args.bench_profile == "augment":
        from common.bench import augment_profile

        print(augment_profile(args.bench_img_size, args.bench_batch_size))
        return 0
    if args.bench_profile:
        from common.bench import bench_profile

        print(bench_profile(args.bench_profile, args.device, args.bench_img_size,
                            args.bench_batch_size, args.bench_steps, args.bench_compile,
                            args.bench_channels_last))
        return 0
    if args.bench_suite:
        from common.bench_suite import bench_suite, format_suite

        result = bench_suite(args.bench_suite, args.device, args.bench_suite_flags,
                             args.bench_suite_output)
        print(json.dumps(result, indent=2) if args.json else format_suite(result))
        return 0
    if args.bench:
        from common.bench import format_table, run_benchmarks

        result = run_benchmarks(args.device, args.bench_img_size, args.bench_batch_size,
                                args.bench_steps, args.bench_compile, args.bench_channels_last)
        print(json.dumps(result, indent=2) if args.json else format_table(result))
        return 0
    from common.readiness import readiness

    lines, missing = readiness(args.data_dir)
    print("\n".join(lines))
    gpu = not any(m.startswith("no GPU") for m in missing)
    print("\nworks on this machine: " + ("everything" if gpu else
          "the CPU-sized runs of README's 'Try it' (32 px, small subsets), the tests, and reading "
          "runs back (compare_runs.py, plot_four_panels.py, show_resnet_example.py)"))
    if missing:
        print(f"\nnot ready for the experiment ({len(missing)}):")
        for m in missing:
            print(f"  - {m}")
        return 1
    print("\nready: all four runs can start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
