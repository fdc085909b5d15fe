"""The experiment as one command: models x pretrained / scratch x training-set sizes x seeds, each an ordinary
train command in its own folder under --root, run here (one per GPU) or on a Slurm cluster, and read back as
results.md and data_efficiency.png (the pre-training gains against the number of training images).

    python run_suite.py --data-dir D                                             # the four runs, seed 0
    python run_suite.py --data-dir D --train-sizes 1000 5000 45000 --seeds 0 1 2 # 36 runs, one per GPU
    python run_suite.py --data-dir D --train-sizes 1000 5000 45000 --seeds 0 1 2 --launcher slurm \\
        --partition gpu --gpus-per-run 1 --time 240 --max-parallel 12
    python run_suite.py --data-dir D --seeds 0 1 2 --dry-run                     # the commands, and the time
    python run_suite.py --data-dir D -- --epochs 30 --grad-accum-steps 2         # train flags after --

Run it again at any time: finished runs are skipped, interrupted ones continue (--resume), a grown grid adds
runs without touching the finished ones. A run that fails is reported with its folder and last error line,
and the others go on.
"""
from __future__ import annotations

import sys
from pathlib import Path

from common.cli import entry_point, script_parser
from common.errors import UserError
from common.specs import CONTROLS, MODELS


def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    train_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = script_parser(__doc__)
    p.add_argument("--data-dir", required=True, help="CIFAR-10, as the train scripts' --data-dir.")
    p.add_argument("--models", nargs="+", default=list(MODELS),
                   help="Architectures to run (arch, or arch.tag for other ImageNet weights).")
    p.add_argument("--controls", action="store_true",
                   help="Add the controls that split the extra gain into architecture and "
                        f"weights: {', '.join(CONTROLS)} (pretrained and scratch, every size and "
                        "seed; TinyViT-5M's scratch runs are shared).")
    p.add_argument("--modes", nargs="+", default=["pretrained", "scratch"],
                   help="pretrained and/or scratch.")
    p.add_argument("--train-sizes", nargs="+", type=int, default=[0], metavar="N",
                   help="Training-set sizes (class-stratified, nested: a smaller one lies inside a "
                        "larger one; 0 = all of the training split).")
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="Seeds of every setting and size.")
    p.add_argument("--root", default="runs/suite",
                   help="Where the run folders go: <root>/<model>_<ft|scratch>/"
                   "n<size>/seed<seed>.")
    p.add_argument("--weights", nargs="+", default=[], metavar="ARCH=PATH",
                   help="Local ImageNet weights for a model's pretrained runs (offline machines), "
                        "e.g. resnet18=resnet18.a1_in1k.safetensors; arch.tag=PATH for other "
                        "weights (tiny_vit_5m_224.in1k=...).")
    p.add_argument("--launcher", choices=["local", "slurm", "debug"], default="local",
                   help="local: this machine, one run per visible GPU (one at a time on a CPU); "
                        "slurm: a job array; debug: in this process, one after the other.")
    p.add_argument("--partition", help="Slurm partition.")
    p.add_argument("--gpus-per-run", type=int, default=1,
                   help="Slurm: GPUs of each run (torchrun is not used: 1).")
    p.add_argument("--time", type=int, default=240, metavar="MINUTES",
                   help="Slurm: time limit of each job; a run that needs longer is requeued and "
                        "continues.")
    p.add_argument("--max-parallel", type=int, default=16, help="Slurm: runs of the array at once.")
    p.add_argument("--gpu-memory", type=float, metavar="GIB",
                   help="Free memory of the GPU each run gets, in GiB (default: this machine's "
                        "first GPU; needed for --launcher slurm from a node without one): one "
                        "micro-batch is chosen for every run from it, since BatchNorm sees the "
                        "micro-batch.")
    p.add_argument("--dry-run", action="store_true",
                   help="Print the commands and the projected time; run nothing.")
    p.add_argument("--no-analysis", action="store_true", help="Do not run the analysis at the end.")
    p.add_argument("--bench", default="runs/bench_suite.json",
                   help="check.py --bench-suite figures for the "
                   "projected time.")
    args = p.parse_args(argv)
    if args.controls:
        args.models = [*args.models, *(c for c in CONTROLS if c not in args.models)]
    args.train_flags = ["--data-dir", args.data_dir, *train_flags]
    weights = {}
    for item in args.weights:
        arch, sep, path = item.partition("=")
        if not sep or not path:
            raise UserError(f"--weights {item}: give ARCH=PATH, e.g. "
                            "resnet18=resnet18.a1_in1k.safetensors")
        weights[arch] = path
    args.weights = weights
    if any(n < 0 for n in args.train_sizes):
        raise UserError("--train-sizes must be >= 0 (0 = all)")
    for flag in ("time", "max_parallel", "gpus_per_run"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    return args


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from common import suite as S

    root = Path(args.root)
    runs = S.plan_grid(args.models, args.modes, args.train_sizes, args.seeds, root,
                       args.train_flags, args.weights)
    n_train = training_split_size(runs[0].config())
    S.check_grid(runs, n_train)
    runs, chosen = S.fix_micro_batch(runs, gpu_memory(args), n_train)
    if chosen:
        print(chosen)
    epochs = runs[0].config().epochs
    times = S.projected_seconds(runs, S.load_bench(Path(args.bench)), epochs)
    progress = S.Progress(runs, {r.folder: {"done": "skipped"}.get(S.status_of(r), "queued")
                                 for r in runs})
    todo = [r for r in runs if progress.state[r.folder] == "queued"]
    parallel = S.parallelism(args.launcher, args.max_parallel, len(todo))
    if times:
        progress.projected_s = S.makespan([times[r.folder] for r in todo], parallel)
    for warning in S.preflight_warnings(todo, progress.projected_s if times else None):
        print(warning, file=sys.stderr)
    if args.dry_run:
        for r in runs:
            state = {"skipped": "done", "queued": S.status_of(r)}[progress.state[r.folder]]
            took = f"  # {S._fmt(times[r.folder])}" if times else ""
            print(f"{'#' if state == 'done' else ' '} {S.shell_line(r)}{took}"
                  + ("  (done)" if state == "done" else
                   ("  (resumes)" if state ==
                    "interrupted" else "")))
        print(f"{len(runs)} runs, {len(todo)} to run, {parallel} at a time; projected time " + (
            f"{S._fmt(progress.projected_s)} (check.py --bench-suite figures in {args.bench})"
            if times else
            "unknown: run python check.py --bench-suite 2 on this machine first (it writes "
            f"{args.bench})"))
        return 0
    logs = root / ".submitit"
    # no sbatch here: one line before anything starts
    executor = (S.slurm_executor(logs, args.partition, args.gpus_per_run, args.time,
                                 args.max_parallel)
                if args.launcher == "slurm" else None)
    board = S.StatusBoard()
    board.update(progress)
    try:
        with S.sigterm_as_interrupt():
            if args.launcher == "debug":
                S.run_debug(runs, logs, progress, board)
            elif args.launcher == "local":
                S.run_local(runs, logs, progress, board)
            else:
                S.run_slurm(runs, logs, progress, board, executor)
    except KeyboardInterrupt:
        print("stopped: the running runs saved their checkpoints; the same command continues them "
              "(finished runs are skipped)", file=sys.stderr)
        return 130
    failed = [r for r in runs if progress.state[r.folder] == "failed"]
    for r in failed:
        print(f"failed: {r.name} in {r.folder}: {progress.errors[r.folder]}", file=sys.stderr)
    done = [str(r.folder) for r in runs if S.status_of(r) == "done"]
    if done and not args.no_analysis:
        from common.report import report

        report(done, None, root / "four_panels.png", root / "results.md", False, "minmax", True,
               None, extra_figures=True)
        figure = root / "data_efficiency.png"
        print(f"results: {root / 'results.md'}" + (f", {figure}" if figure.is_file() else ""))
    return 1 if failed else 0


def gpu_memory(args) -> tuple[int, int] | None:
    """(free, total) bytes of the GPU the runs get: --gpu-memory, else this machine's first GPU;
    None without either (no accumulation needed on a CPU). A Slurm grid from a node without a GPU
    must say it, so that every run gets the same micro-batch."""
    if args.gpu_memory is not None:
        if args.gpu_memory <= 0:
            raise UserError("--gpu-memory must be > 0 (GiB)")
        size = int(args.gpu_memory * 2**30)
        return size, size
    import torch

    if torch.cuda.is_available():
        return torch.cuda.mem_get_info(0)
    if args.launcher == "slurm" and "--grad-accum-steps" not in args.train_flags:
        raise UserError("--launcher slurm from a machine without a GPU: give --gpu-memory GIB "
                        "(the free memory of the cluster's GPUs) so that every run gets the same "
                        "micro-batch, or --grad-accum-steps N after --")
    return None


def training_split_size(cfg) -> int | None:
    """Training images left after the validation split, from the data itself (a decoded source is
    cached)."""
    from common.data.sources import open_source

    try:
        source = open_source(cfg.data_dir, dummy=cfg.dummy, download=False, cache_dir=cfg.cache_dir,
                             skip_bad_images=cfg.skip_bad_images)
    except UserError:
        return None  # not there yet: the first run downloads it, and says so if it cannot
    return len(source.train_x) - cfg.val_size


if __name__ == "__main__":
    sys.exit(main())
