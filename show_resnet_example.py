"""Show what a trained model predicts: a test image (or your own photos) with its top-k probabilities, a grid
of test predictions, or the confusion matrix over the test set. Any run of either train script works.

    python show_resnet_example.py --checkpoint runs/resnet_ft                         # its best.pt, a test image
    python show_resnet_example.py --checkpoint runs/tinyvit_ft/best.pt --index 7 --topk 5
    python show_resnet_example.py --checkpoint runs/resnet_ft --image cat.jpg dog.png
    python show_resnet_example.py --checkpoint runs/resnet_ft --grid 6
    python show_resnet_example.py --checkpoint runs/resnet_ft --confusion             # PNG + CSV

The checkpoint holds the run's record; the test images are read and evaluated exactly as the run's final test
did, so the confusion matrix of best.pt reproduces summary.json's test accuracy. Figures go to the run folder
unless --output says otherwise.
"""
from __future__ import annotations

import sys
from pathlib import Path

from common.cli import entry_point, script_parser
from common.errors import UserError


def parse_args(argv):
    p = script_parser(__doc__)
    p.add_argument("--checkpoint", default="runs/resnet_ft",
                   help="A run folder (its best.pt) or a checkpoint file, best.pt or last.pt.")
    p.add_argument("--config", help="The run's config.json; by default the record stored in the checkpoint.")
    p.add_argument("--index", type=int, default=-1,
                   help="Test image to show; -1 picks one at random (fixed by --seed).")
    p.add_argument("--seed", type=int, default=42, help="Seed of the random picks.")
    p.add_argument("--topk", type=int, default=3, help="How many classes to list, 1-10.")
    p.add_argument("--data-dir", help="Where the run's data is now, if it moved (default: the "
                                      "path in the record).")
    p.add_argument("--image", nargs="+", metavar="PATH", help="Your own image files instead of test images.")
    p.add_argument("--grid", type=int, metavar="N", help="An N x N grid of test predictions, 1-20.")
    p.add_argument("--confusion", action="store_true",
                   help="Confusion matrix and per-class accuracy (PNG and CSV).")
    p.add_argument("--output", help="Figure path (default: in the run folder).")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="Where to run the model.")
    p.add_argument("--safe", action="store_true", help="Never open a window, only save files.")
    args = p.parse_args(argv)
    for bad, message in (
        (not 1 <= args.topk <= 10, f"--topk {args.topk}: must be between 1 and 10"),
        (args.grid is not None and not 1 <= args.grid <= 20, f"--grid {args.grid}: must be 1-20"),
        (args.index < -1, f"--index {args.index}: give a test image number (0 or more), or -1 "
                          f"for a random one")):
        if bad:
            raise UserError(message)
    return args


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from common import inference as I
    from common import prediction_plots as P
    from common.files import atomic_write
    from common.plots import add_footnote, can_show, save_figure, setup_matplotlib
    from common.runtime import resolve_device

    run = I.load_trained_run(args.checkpoint, resolve_device(args.device), args.config)
    classes, name, plt = run.classes, run.record.model.display, setup_matplotlib(args.safe)
    if args.image:
        images, originals = I.load_images(args.image)
        probs = run.predict(images)
        names = [Path(p).name for p in args.image]
        print("\n".join(P.topk_line(n, p, args.topk, None, classes) for n, p in zip(names, probs)))
        fig = P.figure_rows(plt, [(o, p, f"{n}  ({name}, {run.checkpoint.name})", None) for o, p, n
                                  in zip(originals, probs, names)], args.topk, classes)
        default = (f"predict_{Path(args.image[0]).stem}.png" if len(names) == 1
                   else f"predict_{len(names)}_images.png")
    else:
        test_x, test_y = run.test_set(args.data_dir)
        if args.confusion:
            matrix = I.confusion_matrix(test_y, run.predict(test_x).argmax(1), len(classes))
            acc = float(matrix.diag().sum()) / max(1, int(matrix.sum()))
            check = I.agreement_with_summary(run, acc)
            import pandas as pd

            table = pd.DataFrame(matrix.numpy(), index=classes, columns=classes)
            table["per_class_acc"] = I.per_class_recall(matrix).numpy().round(4)
            atomic_write(run.folder / "confusion.csv", table.to_csv(index_label="true\\predicted"))
            print(f"{table.to_string()}\ntest accuracy {acc:.4f} ({check}); saved "
                  f"{run.folder / 'confusion.csv'}")
            fig = P.confusion_figure(plt, matrix, classes,
                                     f"{name}, {run.checkpoint.name}: test accuracy {acc:.2%} "
                                     f"on {int(matrix.sum()):,} images\n({check})")
            default = "confusion.png"
        elif args.grid:
            idx = torch.randperm(
                len(test_x), generator=torch.Generator().manual_seed(args.seed))[:args.grid ** 2]
            fig, right = P.grid_figure(plt, test_x[idx], test_y[idx], run.predict(test_x[idx]),
                                       classes, args.grid, name)
            print(f"grid: {right}/{len(idx)} correct")
            default = f"grid_{args.grid}x{args.grid}.png"
        else:
            n = len(test_x)
            i = args.index if args.index >= 0 else int(
                torch.randint(n, (1,), generator=torch.Generator().manual_seed(args.seed)))
            if i >= n:
                raise UserError(f"--index {i} is out of range: the test set has {n} images (0..{n - 1})")
            p, truth = run.predict(test_x[i:i + 1])[0], classes[int(test_y[i])]
            print(P.topk_line(f"test image {i}", p, args.topk, truth, classes))
            title = f"{run.record.data.label().split(' (')[0]} test image #{i}  ({name})"
            fig = P.figure_rows(plt, [(test_x[i].permute(1, 2, 0).numpy(), p, title, truth)],
                                args.topk, classes)
            default = f"example_{i}.png"
    add_footnote(fig, f"{run.checkpoint.name} of {run.folder}: {run.record.line(run.summary)}")
    out = save_figure(fig, Path(args.output) if args.output else run.folder / default)
    print(f"saved {out}")
    if not args.safe and can_show(plt):
        plt.show()
    return 0


if __name__ == "__main__":
    sys.exit(main())
