"""The prediction demo's figures: images with their top-k bars, a grid of test predictions marked
right (✓) or wrong (✗), and the confusion matrix. Colours: green = the true class, vermillion = a
wrong top-1, grey when there is no ground truth (your own photos: nothing is known to be right)."""
from __future__ import annotations

import numpy as np
import torch

RIGHT, WRONG, NEUTRAL = "#009E73", "#D55E00", "#999999"


def topk_line(name: str, probs: torch.Tensor, k: int, truth: str | None, classes: list[str]) -> str:
    top = probs.topk(min(k, len(probs)))
    ranked = ", ".join(f"{classes[i]} {v:.1%}"
                       for v, i in zip(top.values.tolist(), top.indices.tolist()))
    return f"{name}: " + (f"ground truth {truth}; " if truth else "") + f"top-{k}: {ranked}"


def figure_rows(plt, rows: list[tuple], topk: int, classes: list[str]):
    """One row per (image, probabilities, title, true class or None): the image and its top-k
    bars."""
    fig, axes = plt.subplots(len(rows), 2, figsize=(9, 3.6 * len(rows) + 0.4), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.3]})
    for (ax_img, ax_bar), (image, probs, title, truth) in zip(axes, rows):
        ax_img.imshow(image, interpolation="nearest")
        ax_img.set_title(title + (f"\nground truth: {truth}" if truth else "\n(no ground truth)"),
                         fontsize=10)
        ax_img.axis("off")
        top = probs.topk(min(topk, len(probs)))
        names = [classes[i] for i in top.indices.tolist()]
        colors = [RIGHT if truth and n == truth else (WRONG if truth and k == 0 else NEUTRAL)
                  for k, n in enumerate(names)]
        ys = list(range(len(names)))[::-1]
        ax_bar.barh(ys, top.values.tolist(), color=colors)
        marks = [(" ✓ true class" if truth and n == truth else (" ✗" if truth and k == 0 else ""))
                 for k, n in enumerate(names)]
        ax_bar.set_yticks(ys, [n + m for n, m in zip(names, marks)])
        for y, v in zip(ys, top.values.tolist()):
            ax_bar.text(min(v + 0.02, 0.86), y, f"{v:.1%}", va="center", fontsize=9)
        ax_bar.set_xlim(0, 1)
        ax_bar.set_xlabel("the model's probability (softmax)")
        ax_bar.set_title(f"top-{len(names)} prediction", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def grid_figure(plt, images: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor,
                classes: list[str], side: int, name: str):
    """side x side test images, each titled ✓/✗, its predicted class and the model's confidence in
    it."""
    pred, conf = probs.argmax(1).tolist(), probs.max(1).values.tolist()
    fig, axes = plt.subplots(side, side, figsize=(1.9 * side, 2.2 * side + 0.5), squeeze=False)
    right = 0
    for ax, img, y, p, c in zip(axes.flat, images, labels.tolist(), pred, conf):
        ok = p == y
        right += ok
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(("✓ " if ok else "✗ ") + f"{classes[p]} {c:.0%}"
                     + ("" if ok else f"\n(is {classes[y]})"), fontsize=8,
                     color=RIGHT if ok else WRONG)
        ax.axis("off")
    for ax in axes.flat[len(images):]:
        ax.axis("off")
    import textwrap

    # wrapped to the figure's width, with room above the first row's titles
    text = (f"{name}: {right}/{len(images)} right (✓), wrong marked ✗ with the true class; the % "
            "is the model's confidence in its prediction")
    lines = textwrap.wrap(text, max(30, int(side * 1.9 * 11)))
    fig.suptitle("\n".join(lines), fontsize=10)
    top = 1 - (0.1 + 0.16 * len(lines)) / (2.2 * side + 0.5)
    fig.tight_layout(rect=(0, 0.06, 1, top))
    fig.subplots_adjust(hspace=0.55)  # the two-line titles of a row clear the images above
    return fig, right


def confusion_figure(plt, matrix: torch.Tensor, classes: list[str], title: str):
    """The confusion matrix with counts, per-class accuracy (recall) on the rows."""
    from .inference import per_class_recall

    k = len(classes)
    recall = per_class_recall(matrix)
    fig, ax = plt.subplots(figsize=(9, 8))
    im = ax.imshow(matrix.numpy(), cmap="cividis")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), [f"{c} ({a:.1%})" for c, a in zip(classes, recall.tolist())])
    top = int(matrix.max())
    for i, j in zip(*np.nonzero(matrix.numpy())):
        v = int(matrix[i, j])
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                color="black" if v > top * 0.5 else "white")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (per-class accuracy)")
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(im, ax=ax, fraction=0.046)
    bar.set_label("test images")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig
