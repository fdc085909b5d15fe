"""Uncertainty for accuracies measured on a finite test set: Wilson intervals, McNemar's exact test for two
classifiers on the same images, a paired bootstrap over test images (and seeds) for gains and differences of
gains, and the expected calibration error. numpy only, each checked against hand-computed cases."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion correct/n (behaves at 0 and 1, unlike the normal one)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> dict[str, float]:
    """McNemar's exact test on paired predictions: b = images only A gets right, c = only B; the two-sided
    p-value of b against Binomial(b + c, 1/2)."""
    a, b_ = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    only_a, only_b = int((a & ~b_).sum()), int((~a & b_).sum())
    return {"only_a": only_a, "only_b": only_b, "p": binomial_two_sided(min(only_a, only_b), only_a + only_b)}


def binomial_two_sided(k: int, n: int) -> float:
    """P(X <= k) + P(X >= n - k) for X ~ Binomial(n, 1/2), k <= n/2 (exact, in log space)."""
    if n == 0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2 * tail)


def bootstrap(correct: dict[str, Sequence[np.ndarray]], contrast: Callable[[dict[str, np.ndarray]], np.ndarray],
              n_boot: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """(estimate, 2.5%, 97.5%) of `contrast` over a paired bootstrap. `correct` maps a setting to its runs
    (seeds), each a bool array over the same test images. Every replicate draws one resample of the images,
    shared by all settings (pairing), and for each setting a resample of its seeds; `contrast` gets, per
    setting, the replicates' mean accuracies and returns the quantity (e.g. a gain)."""
    rng = np.random.default_rng(seed)
    runs = {k: np.stack([np.asarray(r, np.float64) for r in v]) for k, v in correct.items()}
    n = next(iter(runs.values())).shape[1]
    estimate = float(contrast({k: r.mean(1).mean(keepdims=True) for k, r in runs.items()})[0])
    replicates = []
    for start in range(0, n_boot, 500):
        b = min(500, n_boot - start)
        counts = rng.multinomial(n, np.full(n, 1 / n), size=b).astype(np.float64)   # (b, n) image weights
        means = {}
        for k, r in runs.items():
            seeds = rng.integers(0, len(r), size=(b, len(r)))                       # seed resample per replicate
            per_run = counts @ r.T / n                                              # (b, runs)
            means[k] = np.take_along_axis(per_run, seeds, 1).mean(1)
        replicates.append(contrast(means))
    values = np.concatenate(replicates)
    lo, hi = np.percentile(values, [2.5, 97.5])
    return estimate, float(lo), float(hi)


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error with `bins` equal-width confidence bins ((0, 1/15], ...), and the bins:
    sum over bins of (share of images) x |accuracy - mean confidence|."""
    conf, ok = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    table, total = [], 0.0
    for i in range(bins):
        sel = which == i
        if sel.any():
            acc, mean_conf = ok[sel].mean(), conf[sel].mean()
            total += sel.mean() * abs(acc - mean_conf)
            table.append({"lo": edges[i], "hi": edges[i + 1], "n": int(sel.sum()), "acc": acc, "conf": mean_conf})
    return float(total), table
