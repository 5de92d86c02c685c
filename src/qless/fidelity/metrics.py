"""Agreement between approximate and exact task scores, with bootstrap confidence intervals.

Every metric compares two score vectors over the same pool rows, ``exact`` and ``approx``:

* ``spearman`` and ``kendall``: rank correlations (scipy's; ties get average ranks, Kendall's is
  tau-b), over the whole probe.
* ``recall@p``: the share of the exact top p% that the approximate top p% recovers, and
  ``jaccard@p`` = |A & E| / |A | E| of the two top sets. A top set has
  :meth:`qless.selection.SelectConfig.count` rows (``ceil(n p / 100)``, as the selection takes);
  ties are broken by row order, as the selection does.
* ``ndcg@p``: normalised discounted cumulative gain of the approximate top p% (same count), with
  each row's gain its exact score shifted so that the probe's lowest is 0 and discount
  ``1 / log2(rank + 1)``. 1 when the approximate top set is the exact one in the exact order.

:func:`bootstrap` resamples the probe's rows with replacement (the same resamples for every
setting, so settings are compared on paired draws) and reports percentile intervals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

from qless.selection import SelectConfig, rank


def top_count(n: int, percent: float) -> int:
    """Rows in a top ``percent``% of ``n`` (the selection's own rule)."""
    return SelectConfig(percent=percent).count(n)


def top_rows(scores: np.ndarray, n_top: int) -> np.ndarray:
    """Indices of the ``n_top`` highest scores, ties broken by row order (the selection's ranking)."""
    return rank(scores)[:n_top]


def spearman(exact: np.ndarray, approx: np.ndarray) -> float:
    return float(stats.spearmanr(exact, approx).statistic)


def kendall(exact: np.ndarray, approx: np.ndarray) -> float:
    return float(stats.kendalltau(exact, approx).statistic)


def recall_at(exact: np.ndarray, approx: np.ndarray, percent: float) -> float:
    n = top_count(len(exact), percent)
    hit = np.intersect1d(top_rows(exact, n), top_rows(approx, n), assume_unique=True)
    return len(hit) / n


def jaccard_at(exact: np.ndarray, approx: np.ndarray, percent: float) -> float:
    n = top_count(len(exact), percent)
    hit = len(np.intersect1d(top_rows(exact, n), top_rows(approx, n), assume_unique=True))
    return hit / (2 * n - hit)


def ndcg_at(exact: np.ndarray, approx: np.ndarray, percent: float) -> float:
    exact = np.asarray(exact, dtype=np.float64)
    n = top_count(len(exact), percent)
    gain = exact - exact.min()
    discount = 1.0 / np.log2(np.arange(2, n + 2))
    ideal = float(np.sort(gain)[::-1][:n] @ discount)
    if ideal == 0.0:
        return 1.0  # every row scores the same: any order is ideal
    return float(gain[top_rows(approx, n)] @ discount) / ideal


def metric_functions(percents: Sequence[float], ndcg_percent: float) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    """Metric name -> function(exact, approx), in table order."""
    out: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {"spearman": spearman, "kendall": kendall}
    for p in percents:
        out[f"recall@{p:g}"] = lambda e, a, p=p: recall_at(e, a, p)
    for p in percents:
        out[f"jaccard@{p:g}"] = lambda e, a, p=p: jaccard_at(e, a, p)
    out[f"ndcg@{ndcg_percent:g}"] = lambda e, a: ndcg_at(e, a, ndcg_percent)
    return out


def resamples(n: int, count: int, seed: int) -> np.ndarray:
    """``[count, n]`` row indices drawn with replacement (seeded; shared by every setting)."""
    return np.random.default_rng(seed).integers(0, n, size=(count, n))


def bootstrap(exact: np.ndarray, approx: np.ndarray, functions: dict[str, Callable[[np.ndarray, np.ndarray], float]],
              draws: np.ndarray, confidence: float) -> dict[str, dict[str, float]]:
    """Each metric on the whole probe (``value``) with its percentile interval (``low``,
    ``high``) over the resamples ``draws`` (``[B, n]``; no interval when ``B == 0``)."""
    exact = np.asarray(exact, dtype=np.float64)
    approx = np.asarray(approx, dtype=np.float64)
    out: dict[str, dict[str, float]] = {}
    tail = (1.0 - confidence) / 2
    for name, fn in functions.items():
        entry = {"value": fn(exact, approx)}
        if len(draws):
            values = np.array([fn(exact[idx], approx[idx]) for idx in draws])
            values = values[np.isfinite(values)]  # a resample of constant scores has no rank correlation
            if len(values):
                entry["low"], entry["high"] = (float(v) for v in np.quantile(values, [tail, 1.0 - tail]))
        out[name] = entry
    return out
