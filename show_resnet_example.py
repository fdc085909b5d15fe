"""Show what a trained model predicts: a CIFAR-10 test image (or your own files) with its top-k
probabilities, a grid of test predictions, or the confusion matrix over the test set.

    python show_resnet_example.py --config runs/resnet_ft/config.json --checkpoint runs/resnet_ft/best.pt
    python show_resnet_example.py --checkpoint runs/tinyvit_ft/best.pt --index -1 --seed 42 --topk 3
    python show_resnet_example.py --checkpoint runs/resnet_ft/best.pt --image cat.jpg dog.png
    python show_resnet_example.py --checkpoint runs/resnet_ft/best.pt --grid 6
    python show_resnet_example.py --checkpoint runs/resnet_ft/best.pt --confusion

Works for any model a train script trained (the checkpoint holds its config). Figures go to the run folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.errors import UserError, exit_on_user_error


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--checkpoint", default="runs/resnet_ft/best.pt", help="best.pt or last.pt of a run")
    p.add_argument("--config", help="the run's config.json (default: the config stored in the checkpoint)")
    p.add_argument("--index", type=int, default=-1, help="test image index; -1 = random (fixed by --seed)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--data-dir", help="CIFAR-10 folder (default: the one in the config)")
    p.add_argument("--image", nargs="+", metavar="PATH", help="your own image files instead of CIFAR-10")
    p.add_argument("--grid", type=int, metavar="N", help="an N x N grid of test predictions")
    p.add_argument("--confusion", action="store_true", help="confusion matrix + per-class accuracy (PNG and CSV)")
    p.add_argument("--output", help="figure path (default: in the run folder)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--safe", action="store_true", help="never open a window, only save")
    return p.parse_args(argv)


def load_model(checkpoint: str, config: str | None, device):
    """Rebuild the trained model from its config and load the checkpoint's weights (strictly)."""
    from common.checkpoint import load_checkpoint
    from common.config import TrainConfig
    from common.models import build_model

    state = load_checkpoint(checkpoint, map_location="cpu")
    cfg_dict = state["config"]
    if config:
        try:
            cfg_dict = json.loads(Path(config).read_text())
        except FileNotFoundError:
            raise UserError(f"--config {config} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"--config {config} is not valid JSON") from None
        if not isinstance(cfg_dict, dict) or "model" not in cfg_dict:
            raise UserError(f"--config {config} is not a run's config.json (no 'model')")
        if cfg_dict.get("model") != state["config"].get("model"):
            raise UserError(f"--config {config} is for {cfg_dict.get('model')} but --checkpoint {checkpoint} "
                            f"holds {state['config'].get('model')}; pass the matching pair")
    cfg = TrainConfig.from_dict(cfg_dict)
    model = build_model(cfg.family, cfg.model, False, None, cfg.img_size)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(f"--checkpoint {checkpoint} does not fit {cfg.model} at {cfg.img_size}px "
                        f"({str(e).splitlines()[0][:150]}); pass the config of the run that wrote it") from None
    return model.to(device).eval(), cfg


def load_images(paths: list[str]):
    """User images of any size and mode -> uint8 (n, 3, 32, 32): resized to CIFAR's size, as training saw."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    out, originals = [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                rgb = im.convert("RGB")
        except FileNotFoundError:
            raise UserError(f"--image {p}: no such file") from None
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"--image {p} is not a readable image ({e})") from None
        originals.append(np.asarray(rgb))
        small = rgb.resize((32, 32), Image.Resampling.BICUBIC, reducing_gap=3.0)
        out.append(torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1))
    return torch.stack(out), originals


def test_set(cfg, data_dir: str | None):
    from common.data import load_splits

    splits = load_splits(data_dir or cfg.data_dir, cfg.download, cfg.dummy, val_size=0, train_subset=0,
                         seed=cfg.seed, quiet=False)
    return splits.test_x, splits.test_y


def predict(model, images, cfg, device, batch: int = 500):
    """Softmax probabilities for uint8 images (n, 3, 32, 32)."""
    import torch

    from common.data import eval_batch

    probs = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = eval_batch(images[i:i + batch].to(device), cfg.img_size)
            probs.append(torch.softmax(model(x).float(), 1).cpu())
    return torch.cat(probs)


def figure_rows(plt, rows: list[tuple], topk: int):
    """One row per image: the image (upscaled crisply) and its top-k probability bars.
    rows: (image HxWx3 uint8, probs, title, ground truth or None)."""
    from common.data import CIFAR_CLASSES

    fig, axes = plt.subplots(len(rows), 2, figsize=(9, 3.6 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.3]})
    for (ax_img, ax_bar), (image, probs, title, truth) in zip(axes, rows):
        ax_img.imshow(image, interpolation="nearest")
        ax_img.set_title(title + (f"\nground truth: {truth}" if truth else ""), fontsize=10)
        ax_img.axis("off")
        top = probs.topk(min(topk, len(probs)))
        names = [CIFAR_CLASSES[i] for i in top.indices.tolist()]
        # green = the true class (or the top guess when there is no truth); the rest grey
        colors = ["#2ca02c" if (n == truth if truth else k == 0) else "#bbbbbb" for k, n in enumerate(names)]
        ys = list(range(len(names)))[::-1]
        ax_bar.barh(ys, top.values.tolist(), color=colors)
        ax_bar.set_yticks(ys, names)
        for y, v in zip(ys, top.values.tolist()):
            ax_bar.text(min(v + 0.02, 0.86), y, f"{v:.1%}", va="center", fontsize=9)
        ax_bar.set_xlim(0, 1)
        ax_bar.set_xlabel("probability")
        ax_bar.set_title(f"top-{len(names)} prediction", fontsize=10)
    fig.tight_layout()
    return fig


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.topk < 1 or args.topk > 10:
        raise UserError("--topk must be between 1 and 10")
    if args.grid is not None and not 1 <= args.grid <= 20:
        raise UserError("--grid must be between 1 and 20")
    import torch

    from common.data import CIFAR_CLASSES
    from common.engine import resolve_device
    from common.plots import can_show, save_figure, setup_matplotlib

    device = resolve_device(args.device)
    model, cfg = load_model(args.checkpoint, args.config, device)
    folder = Path(args.checkpoint).parent
    plt = setup_matplotlib(args.safe)
    figures = []
    if args.image:
        images, originals = load_images(args.image)
        probs = predict(model, images, cfg, device)
        for path, p in zip(args.image, probs):
            print_topk(Path(path).name, p, args.topk, None)
        rows = [(original, p, Path(path).name, None) for path, original, p in zip(args.image, originals, probs)]
        name = f"predict_{Path(args.image[0]).stem}.png" if len(rows) == 1 else f"predict_{len(rows)}_images.png"
        figures.append((figure_rows(plt, rows, args.topk), Path(args.output) if args.output else folder / name))
    else:
        test_x, test_y = test_set(cfg, args.data_dir)
        if args.confusion:
            figures.append(confusion(plt, model, cfg, device, test_x, test_y, folder, args.output))
        elif args.grid:
            figures.append(grid(plt, model, cfg, device, test_x, test_y, args, folder))
        else:
            n = len(test_x)
            index = args.index if args.index >= 0 else int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(args.seed)))
            if index >= n:
                raise UserError(f"--index {index} is out of range: the test set has {n} images (0..{n - 1})")
            p = predict(model, test_x[index:index + 1], cfg, device)[0]
            truth = CIFAR_CLASSES[int(test_y[index])]
            print_topk(f"test image {index}", p, args.topk, truth)
            image = test_x[index].permute(1, 2, 0).numpy()
            fig = figure_rows(plt, [(image, p, f"CIFAR-10 test #{index}  ({cfg.model.split('.')[0]})", truth)], args.topk)
            figures.append((fig, Path(args.output) if args.output else folder / f"example_{index}.png"))
    for fig, out in figures:
        save_figure(fig, out)
        print(f"saved {out}")
    if not args.safe and can_show(plt):
        plt.show()
    return 0


def print_topk(name: str, probs, k: int, truth: str | None) -> None:
    from common.data import CIFAR_CLASSES

    top = probs.topk(min(k, len(probs)))
    ranked = ", ".join(f"{CIFAR_CLASSES[i]} {v:.1%}" for v, i in zip(top.values.tolist(), top.indices.tolist()))
    print(f"{name}: " + (f"ground truth {truth}; " if truth else "") + f"top-{k}: {ranked}")


def grid(plt, model, cfg, device, test_x, test_y, args, folder: Path):
    import torch

    from common.data import CIFAR_CLASSES

    n = args.grid * args.grid
    idx = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(args.seed))[:n]
    probs = predict(model, test_x[idx], cfg, device)
    pred = probs.argmax(1)
    fig, axes = plt.subplots(args.grid, args.grid, figsize=(1.9 * args.grid, 2.0 * args.grid), squeeze=False)
    right = 0
    for ax, i, p, conf in zip(axes.flat, idx.tolist(), pred.tolist(), probs.max(1).values.tolist()):
        ok = p == int(test_y[i])
        right += ok
        ax.imshow(test_x[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"{CIFAR_CLASSES[p]} {conf:.0%}" + ("" if ok else f"\n(is {CIFAR_CLASSES[int(test_y[i])]})"),
                     fontsize=8, color="#2ca02c" if ok else "#d62728")
        ax.axis("off")
    fig.suptitle(f"{cfg.model.split('.')[0]}: {right}/{len(idx)} right (green), wrong in red", fontsize=11)
    fig.tight_layout()
    print(f"grid: {right}/{len(idx)} correct")
    return fig, Path(args.output) if args.output else folder / f"grid_{args.grid}x{args.grid}.png"


def confusion(plt, model, cfg, device, test_x, test_y, folder: Path, output: str | None):
    import pandas as pd
    import torch

    from common.checkpoint import atomic_write
    from common.data import CIFAR_CLASSES

    pred = predict(model, test_x, cfg, device).argmax(1)
    matrix = torch.zeros(10, 10, dtype=torch.long)
    matrix.index_put_((test_y.long(), pred), torch.ones_like(pred), accumulate=True)
    per_class = matrix.diag().float() / matrix.sum(1).clamp(min=1)
    table = pd.DataFrame(matrix.numpy(), index=CIFAR_CLASSES, columns=CIFAR_CLASSES)
    table["per_class_acc"] = per_class.numpy().round(4)
    csv = folder / "confusion.csv"
    atomic_write(csv, lambda f: table.to_csv(f, index_label="true\\predicted"), mode="w")
    fig, ax = plt.subplots(figsize=(8.5, 7.5))
    im = ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set_xticks(range(10), CIFAR_CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(10), [f"{c} ({a:.1%})" for c, a in zip(CIFAR_CLASSES, per_class.tolist())])
    for i in range(10):
        for j in range(10):
            v = int(matrix[i, j])
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                        color="white" if v > matrix.max() * 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (per-class accuracy)")
    acc = float(matrix.diag().sum()) / max(1, int(matrix.sum()))
    ax.set_title(f"{cfg.model.split('.')[0]}: test accuracy {acc:.2%} on {int(matrix.sum())} images")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    print(table.to_string())
    print(f"test accuracy {acc:.4f}; saved {csv}")
    return fig, Path(output) if output else folder / "confusion.png"


if __name__ == "__main__":
    sys.exit(main())
