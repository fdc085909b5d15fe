"""Uncertainty for accuracies measured on a finite test set: Wilson intervals, McNemar's exact test
for two classifiers on the same images, a paired bootstrap over test images (and seeds) for gains
and differences of gains, and the expected calibration error. numpy only, each checked against
hand-computed cases."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion correct/n (behaves at 0 and 1, unlike the normal
    one)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> dict[str, float]:
    """McNemar's exact test on paired predictions: b = images only A gets right, c = only B; the
    two-sided p-value of b against Binomial(b + c, 1/2)."""
    a, b_ = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    only_a, only_b = int((a & ~b_).sum()), int((~a & b_).sum())
    return {"only_a": only_a, "only_b": only_b,
            "p": binomial_two_sided(min(only_a, only_b), only_a + only_b)}


def binomial_two_sided(k: int, n: int) -> float:
    """P(X <= k) + P(X >= n - k) for X ~ Binomial(n, 1/2), k <= n/2 (exact, in log space)."""
    if n == 0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
            for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2 * tail)


def bootstrap(correct: dict[str, Sequence[np.ndarray]],
              contrast: Callable[[dict[str, np.ndarray]], np.ndarray], n_boot: int = 4000,
              seed: int = 0) -> tuple[float, float, float]:
    """(estimate, 2.5%, 97.5%) of `contrast` over a paired bootstrap. `correct` maps a setting to
    its runs (seeds), each a bool array over the same test images. Every replicate draws one
    resample of the images, shared by all settings (pairing), and for each setting a resample of its
    seeds; `contrast` gets, per setting, the replicates' mean accuracies and returns the quantity
    (e.g. a gain)."""
    rng = np.random.default_rng(seed)
    runs = {k: np.stack([np.asarray(r, np.float64) for r in v]) for k, v in correct.items()}
    n = next(iter(runs.values())).shape[1]
    estimate = float(contrast({k: r.mean(1).mean(keepdims=True) for k, r in runs.items()})[0])
    replicates = []
    for start in range(0, n_boot, 500):
        b = min(500, n_boot - start)
        # (b, n) image weights
        counts = rng.multinomial(n, np.full(n, 1 / n), size=b).astype(np.float64)
        means = {}
        for k, r in runs.items():
            seeds = rng.integers(0, len(r), size=(b, len(r)))  # seed resample per replicate
            per_run = counts @ r.T / n                         # (b, runs)
            means[k] = np.take_along_axis(per_run, seeds, 1).mean(1)
        replicates.append(contrast(means))
    values = np.concatenate(replicates)
    lo, hi = np.percentile(values, [2.5, 97.5])
    return estimate, float(lo), float(hi)


def ece(confidence: np.ndarray, correct: np.ndarray,
        bins: int = 15) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error with `bins` equal-width confidence bins ((0, 1/15], ...), and the
    bins: sum over bins of (share of images) x |accuracy - mean confidence|."""
    conf, ok = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    table, total = [], 0.0
    for i in range(bins):
        sel = which == i
        if sel.any():
            acc, mean_conf = ok[sel].mean(), conf[sel].mean()
            total += sel.mean() * abs(acc - mean_conf)
            table.append({"lo": edges[i], "hi": edges[i + 1], "n": int(sel.sum()), "acc": acc,
                          "conf": mean_conf})
    return float(total), table


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` (possibly fractional) degrees of freedom, by
    bisection on the regularised incomplete beta function (no SciPy: numpy and math only). df = inf
    gives the normal quantile."""
    if math.isinf(df) or df > 1e7:
        return _normal_quantile(p)
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _t_cdf(t: float, df: float) -> float:
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2, 0.5, x)
    return 1 - tail if t > 0 else tail


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes'
    betacf)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
                     + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1 - x)
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
    f = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
            c = 1.0 + numerator / c
            c = c if abs(c) > 1e-300 else 1e-300
            f *= c * d
        if abs(c * d - 1.0) < 1e-12:
            break
    return front * f / a


def _normal_quantile(p: float) -> float:
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def seed_interval(correct: dict[str, Sequence[np.ndarray]], weights: dict[str, float],
                  level: float = 0.95) -> dict[str, float]:
    """The contrast sum_s w_s x accuracy_s over settings s, each with 2 or more seeds evaluated on
    the same test images, with an interval that counts both sources of noise (variance components).
    Write a run's correctness on image m as setting + image effect + seed effect + seed-by-image
    noise. Then
      - the test images: the per-image contrast d_m = sum_s w_s x (mean over s's seeds of
        correct[s][seed, m]) gives var(d) / n, which holds the image effect and the seed-by-image
        noise over n x k;
      - training: each setting's accuracies over its k seeds give s^2 / k, which holds the seed
        effect and again that noise; its share (the within-image variance across seeds, over
        n x k) is taken out once, so the noise is not counted twice (the seed part is floored at 0);
    added up, with Student's t at the Welch-Satterthwaite degrees of freedom (2 seeds give wide
    intervals, as they should). Simulated coverage is in design.md and the slow tests. Returns
    estimate, lo, hi, se, df and the two variance parts."""
    runs = {k: np.stack([np.asarray(r, np.float64) for r in v]) for k, v in correct.items()}
    n = next(iter(runs.values())).shape[1]
    d = sum(w * runs[k].mean(0) for k, w in weights.items())
    var_images = float(d.var(ddof=1)) / n
    parts = {}
    for k, w in weights.items():
        seeds = len(runs[k])
        between = float(runs[k].mean(1).var(ddof=1)) / seeds
        # the noise's share of `between`
        within = float(runs[k].var(0, ddof=1).mean()) / (n * seeds)
        parts[k] = w * w * max(0.0, between - within)
    var_seeds = sum(parts.values())
    var = var_images + var_seeds
    denom = sum(p * p / (len(runs[k]) - 1) for k, p in parts.items()) + var_images ** 2 / (n - 1)
    df = var * var / denom if denom > 0 else math.inf
    se = math.sqrt(var)
    half = t_quantile(0.5 + level / 2, df) * se
    estimate = float(d.mean())
    return {"estimate": estimate, "lo": estimate - half, "hi": estimate + half, "se": se, "df": df,
            "var_images": var_images, "var_seeds": var_seeds}


def relative_error_reduction(acc_new: float, acc_base: float) -> float | None:
    """How much of the base's error the new model removes: (err_base - err_new) / err_base."""
    err = 1 - acc_base
    return None if err <= 0 else (acc_new - acc_base) / err
