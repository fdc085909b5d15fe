"""Show what a trained model predicts: a test image (or your own photos) with its top-k probabilities, a grid
of test predictions, or the confusion matrix over the test set. Any run of either train script works.

    python show_resnet_example.py --checkpoint runs/resnet_ft/best.pt                 # a random test image
    python show_resnet_example.py --checkpoint runs/tinyvit_ft/best.pt --index 7 --topk 5
    python show_resnet_example.py --checkpoint runs/resnet_ft/best.pt --image cat.jpg dog.png
    python show_resnet_example.py --checkpoint runs/resnet_ft/best.pt --grid 6
    python show_resnet_example.py --checkpoint runs/resnet_ft/best.pt --confusion    # PNG + CSV

The checkpoint holds the run's config; the test images are read and transformed exactly as the run's final
test did, so the confusion matrix of best.pt reproduces summary.json's test accuracy. Figures go to the run
folder unless --output says otherwise.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import UserError, exit_on_user_error

MAX_PIXELS = 40_000_000  # a 40-megapixel photo decodes to 120 MB; larger files are refused before decoding


def parse_args(argv):
    doc = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=doc[0], epilog=doc[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/resnet_ft/best.pt", help="best.pt or last.pt of a run "
                   "(default: runs/resnet_ft/best.pt).")
    p.add_argument("--config", help="The run's config.json; by default the config stored in the checkpoint.")
    p.add_argument("--index", type=int, default=-1, help="Test image to show; -1 picks one at random (fixed by "
                   "--seed). Default: -1.")
    p.add_argument("--seed", type=int, default=42, help="Seed of the random picks. Default: 42.")
    p.add_argument("--topk", type=int, default=3, help="How many classes to list, 1-10. Default: 3.")
    p.add_argument("--data-dir", help="Where the run's data is now, if it moved (default: the path in the config).")
    p.add_argument("--image", nargs="+", metavar="PATH", help="Your own image files instead of test images.")
    p.add_argument("--grid", type=int, metavar="N", help="An N x N grid of test predictions, 1-20.")
    p.add_argument("--confusion", action="store_true", help="Confusion matrix and per-class accuracy (PNG and CSV).")
    p.add_argument("--output", help="Figure path (default: in the run folder).")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="Where to run the model.")
    p.add_argument("--safe", action="store_true", help="Never open a window, only save files.")
    return p.parse_args(argv)


def check_args(args) -> None:
    if not 1 <= args.topk <= 10:
        raise UserError(f"--topk {args.topk}: must be between 1 and 10")
    if args.grid is not None and not 1 <= args.grid <= 20:
        raise UserError(f"--grid {args.grid}: must be between 1 and 20")
    if args.index < -1:
        raise UserError(f"--index {args.index}: give a test image number (0 or more), or -1 for a random one")


def load_model(checkpoint: str, config: str | None, device):
    """The trained model (eval mode) and its run record, from the checkpoint (and optionally config.json)."""
    from common.checkpoint import load_checkpoint
    from common.models import build_model
    from common.runfolder import read_json
    from common.specs import resolve_model
    from common.state import load_model_state

    state = load_checkpoint(checkpoint, map_location="cpu")
    record = state["config"]
    if config:
        given = read_json(config, required=True)
        for key in ("model", "img_size"):
            if key not in given:
                raise UserError(f"--config {config} is not a run's config.json (no '{key}')")
            if given[key] != record.get(key):
                raise UserError(f"--config {config} has {key} {given[key]!r} but --checkpoint {checkpoint} was trained "
                                f"with {record.get(key)!r}; pass the config.json of the run that wrote it")
        record = {**record, **given}
    model, _ = build_model(resolve_model(record["model"], False), record["img_size"])
    load_model_state(model, state["model"], checkpoint)
    return model.to(device).eval(), record


def transform_for(record):
    from common.data.augment import EvalTransform, recipe_from_dict, resolve_recipe

    recipe = recipe_from_dict(record["recipe"]) if "recipe" in record else resolve_recipe("light")
    return EvalTransform(recipe, record["img_size"])


def test_set(record, data_dir: str | None):
    """The run's test images (its subset too), as its final test saw them."""
    from common.data.sources import open_source
    from common.data.splits import make_splits

    path = data_dir or (record.get("data") or {}).get("path") or record.get("data_dir", "./data")
    source = open_source(path, dummy=record.get("dummy", False), download=False, cache_dir=record.get("cache_dir"),
                         skip_bad_images=record.get("skip_bad_images", False))
    splits = make_splits(source, 0, record.get("split_seed", 0), 0, record.get("test_subset", 0))
    return splits.test_x, splits.test_y, list(source.classes)


def predict(model, images, transform, device, batch: int = 250):
    """Softmax probabilities for uint8 images (n, 3, 32, 32)."""
    import torch

    probs = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            probs.append(torch.softmax(model(transform(images[i:i + batch].to(device))).float(), 1).cpu())
    return torch.cat(probs)


def load_images(paths: list[str]):
    """Your images, any size and mode -> uint8 (n, 3, 32, 32) resized to CIFAR's size as training saw them,
    plus the originals for display. Files over MAX_PIXELS are refused before they are decoded."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    out, originals = [], []
    Image.MAX_IMAGE_PIXELS = None  # opening reads the header only; the size check below is ours, with a clear message
    for p in paths:
        try:
            with Image.open(p) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise UserError(f"--image {p} is {im.width}x{im.height} pixels, over the "
                                    f"{MAX_PIXELS // 1_000_000}-megapixel limit; shrink it first")
                im.draft("RGB", (256, 256))  # JPEG: decode at a reduced scale, far less memory
                rgb = im.convert("RGB")
        except FileNotFoundError:
            raise UserError(f"--image {p}: no such file") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise UserError(f"--image {p} is not a readable image ({e})") from None
        rgb.thumbnail((512, 512))
        originals.append(np.asarray(rgb))
        small = rgb.resize((32, 32), Image.Resampling.BICUBIC, reducing_gap=3.0)
        out.append(torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1))
    return torch.stack(out), originals


def provenance(record, checkpoint: str) -> str:
    from common.provenance import run_label
    from common.runfolder import SUMMARY, read_json

    summary = read_json(Path(checkpoint).parent / SUMMARY)
    return f"{Path(checkpoint).name} of {Path(checkpoint).parent}: {run_label(record, summary)}"


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    from common.data.sources import CIFAR_CLASSES
    from common.engine import resolve_device
    from common.plots import add_footnote, can_show, save_figure, setup_matplotlib

    device = resolve_device(args.device)
    model, record = load_model(args.checkpoint, args.config, device)
    transform = transform_for(record)
    folder = Path(args.checkpoint).parent
    plt = setup_matplotlib(args.safe)
    note = provenance(record, args.checkpoint)
    if args.image:
        classes = (record.get("data") or {}).get("classes") or list(CIFAR_CLASSES)
        images, originals = load_images(args.image)
        probs = predict(model, images, transform, device)
        for path, p in zip(args.image, probs):
            print_topk(Path(path).name, p, args.topk, None, classes)
        rows = [(o, p, Path(path).name, None) for path, o, p in zip(args.image, originals, probs)]
        name = f"predict_{Path(args.image[0]).stem}.png" if len(rows) == 1 else f"predict_{len(rows)}_images.png"
        fig, out = figure_rows(plt, rows, args.topk, classes), Path(args.output) if args.output else folder / name
    else:
        test_x, test_y, classes = test_set(record, args.data_dir)
        if args.confusion:
            fig, out = confusion(plt, model, transform, device, test_x, test_y, classes, folder, args, record)
        elif args.grid:
            fig, out = grid(plt, model, transform, device, test_x, test_y, classes, args, folder, record)
        else:
            fig, out = single(plt, model, transform, device, test_x, test_y, classes, args, folder, record)
    add_footnote(fig, note)
    save_figure(fig, out)
    print(f"saved {out}")
    if not args.safe and can_show(plt):
        plt.show()
    return 0


def single(plt, model, transform, device, test_x, test_y, classes, args, folder, record):
    import torch

    from common.provenance import data_label

    n = len(test_x)
    index = args.index if args.index >= 0 else int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(args.seed)))
    if index >= n:
        raise UserError(f"--index {index} is out of range: the test set has {n} images (0..{n - 1})")
    p = predict(model, test_x[index:index + 1], transform, device)[0]
    truth = classes[int(test_y[index])]
    print_topk(f"test image {index}", p, args.topk, truth, classes)
    name = record.get("model_info", {}).get("display", record["model"])
    title = f"{data_label(record).split(' (')[0]} test image #{index}  ({name})"
    fig = figure_rows(plt, [(test_x[index].permute(1, 2, 0).numpy(), p, title, truth)], args.topk, classes)
    return fig, Path(args.output) if args.output else folder / f"example_{index}.png"


def figure_rows(plt, rows: list[tuple], topk: int, classes: list[str]):
    """One row per image: the image and its top-k probability bars. With a ground truth the true class is
    green and named; without one (your own photos) every bar is neutral grey: nothing is known to be right."""
    fig, axes = plt.subplots(len(rows), 2, figsize=(9, 3.6 * len(rows) + 0.4), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.3]})
    for (ax_img, ax_bar), (image, probs, title, truth) in zip(axes, rows):
        ax_img.imshow(image, interpolation="nearest")
        ax_img.set_title(title + (f"\nground truth: {truth}" if truth else "\n(no ground truth)"), fontsize=10)
        ax_img.axis("off")
        top = probs.topk(min(topk, len(probs)))
        names = [classes[i] for i in top.indices.tolist()]
        colors = ["#009E73" if truth and n == truth else ("#D55E00" if truth and k == 0 else "#999999")
                  for k, n in enumerate(names)]
        ys = list(range(len(names)))[::-1]
        ax_bar.barh(ys, top.values.tolist(), color=colors)
        marks = [(" ✓ true class" if truth and n == truth else (" ✗" if truth and k == 0 else "")) for k, n in enumerate(names)]
        ax_bar.set_yticks(ys, [n + m for n, m in zip(names, marks)])
        for y, v in zip(ys, top.values.tolist()):
            ax_bar.text(min(v + 0.02, 0.86), y, f"{v:.1%}", va="center", fontsize=9)
        ax_bar.set_xlim(0, 1)
        ax_bar.set_xlabel("probability")
        ax_bar.set_title(f"top-{len(names)} prediction", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def print_topk(name: str, probs, k: int, truth: str | None, classes: list[str]) -> None:
    top = probs.topk(min(k, len(probs)))
    ranked = ", ".join(f"{classes[i]} {v:.1%}" for v, i in zip(top.values.tolist(), top.indices.tolist()))
    print(f"{name}: " + (f"ground truth {truth}; " if truth else "") + f"top-{k}: {ranked}")


def grid(plt, model, transform, device, test_x, test_y, classes, args, folder, record):
    import torch

    n = args.grid * args.grid
    idx = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(args.seed))[:n]
    probs = predict(model, test_x[idx], transform, device)
    pred = probs.argmax(1)
    fig, axes = plt.subplots(args.grid, args.grid, figsize=(1.9 * args.grid, 2.0 * args.grid + 0.5), squeeze=False)
    right = 0
    for ax, i, p, conf in zip(axes.flat, idx.tolist(), pred.tolist(), probs.max(1).values.tolist()):
        ok = p == int(test_y[i])
        right += ok
        ax.imshow(test_x[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(("✓ " if ok else "✗ ") + f"{classes[p]} {conf:.0%}" + ("" if ok else f"\n(is {classes[int(test_y[i])]})"),
                     fontsize=8, color="#009E73" if ok else "#D55E00")
        ax.axis("off")
    for ax in axes.flat[len(idx):]:
        ax.axis("off")
    name = record.get("model_info", {}).get("display", record["model"])
    fig.suptitle(f"{name}: {right}/{len(idx)} right (✓), wrong marked ✗ with the true class", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    print(f"grid: {right}/{len(idx)} correct")
    return fig, Path(args.output) if args.output else folder / f"grid_{args.grid}x{args.grid}.png"


def confusion(plt, model, transform, device, test_x, test_y, classes, folder, args, record):
    import pandas as pd
    import torch

    from common.checkpoint import atomic_write
    from common.runfolder import SUMMARY, read_json

    pred = predict(model, test_x, transform, device).argmax(1)
    k = len(classes)
    matrix = torch.zeros(k, k, dtype=torch.long)
    matrix.index_put_((test_y.long(), pred), torch.ones_like(pred), accumulate=True)
    per_class = matrix.diag().float() / matrix.sum(1).clamp(min=1)
    table = pd.DataFrame(matrix.numpy(), index=classes, columns=classes)
    table["per_class_acc"] = per_class.numpy().round(4)
    atomic_write(folder / "confusion.csv", table.to_csv(index_label="true\\predicted"))
    n = int(matrix.sum())
    acc = float(matrix.diag().sum()) / max(1, n)
    summary = read_json(folder / SUMMARY)
    key = "test_acc" if Path(args.checkpoint).name == "best.pt" else "test_acc_final"
    check = (f"= summary.json's {key} of {Path(args.checkpoint).name}" if key in summary and abs(summary[key] - acc) < 1e-9
             else (f"summary.json says {summary[key]:.2%} ({key}): different data or weights" if key in summary else
                   "no summary.json to compare with"))
    fig, ax = plt.subplots(figsize=(9, 8))
    im = ax.imshow(matrix.numpy(), cmap="cividis")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), [f"{c} ({a:.1%})" for c, a in zip(classes, per_class.tolist())])
    for i in range(k):
        for j in range(k):
            v = int(matrix[i, j])
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                        color="black" if v > matrix.max() * 0.5 else "white")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (per-class accuracy)")
    name = record.get("model_info", {}).get("display", record["model"])
    ax.set_title(f"{name}, {Path(args.checkpoint).name}: test accuracy {acc:.2%} on {n:,} images\n({check})", fontsize=10)
    bar = fig.colorbar(im, ax=ax, fraction=0.046)
    bar.set_label("test images")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    print(table.to_string())
    print(f"test accuracy {acc:.4f} ({check}); saved {folder / 'confusion.csv'}")
    return fig, Path(args.output) if args.output else folder / "confusion.png"


if __name__ == "__main__":
    sys.exit(main())
