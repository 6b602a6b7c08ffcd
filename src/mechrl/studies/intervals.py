"""Intervals over seeds and evaluation examples: the two-level bootstrap the studies quote.

A study evaluates each run on the same examples (the first n of each split), so an arm's result is an
(S, n) array of per-example outcomes (S seeds, 1 = correct) and arms are paired by example. A
statistic is a weighted sum of arm means, e.g. one arm's accuracy ([A], [1]), its change from the
start ([A, start], [1, -1]) or the difference of two arms ([A, B], [1, -1]). Each bootstrap
replicate resamples the examples once (the same indices for every arm: the pairing is kept) and,
independently for each arm, its seeds; the interval is the percentile interval of the replicates.
With one seed the seed level is fixed and only the example level varies.

    point, lo, hi = two_level_interval([A, start], [1.0, -1.0])  # change from the start, 95%

Why both levels: examples give the evaluation's sampling error, seeds the training's. With 3 seeds
the seed level is coarse (27 distinct seed draws per arm); the per-seed values are reported too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def two_level_interval(groups: Sequence[np.ndarray], weights: Sequence[float], *, n_boot: int = N_BOOT,
                       level: float = LEVEL, seed: int = 0) -> tuple[float, float, float]:
    """(point, lo, hi) of sum_i weights[i] * mean(groups[i]), each group an (S_i, n) array of outcomes
    over S_i seeds and the same n examples; see the module docstring."""
    if len(groups) != len(weights) or not groups:
        raise ValueError(f"two_level_interval: {len(groups)} groups, {len(weights)} weights")
    arrs = [np.asarray(g, dtype=np.float64) for g in groups]
    n = arrs[0].shape[1] if arrs[0].ndim == 2 else -1
    for i, a in enumerate(arrs):
        if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] != n or n < 1:
            raise ValueError(f"two_level_interval: group {i} has shape {a.shape}; every group must be (seeds >= 1, "
                             f"n) with the same n >= 1 examples (first group: n={n})")
        if not np.isfinite(a).all():
            raise ValueError(f"two_level_interval: group {i} holds non-finite outcomes")
    if not 0 < level < 1:
        raise ValueError(f"two_level_interval: level must be in (0, 1), got {level}")
    point = float(sum(w * a.mean() for w, a in zip(weights, arrs)))
    rng = np.random.default_rng(seed)
    ex = rng.integers(0, n, size=(n_boot, n))  # (R, n) examples, shared by every group
    stat = np.zeros(n_boot)
    for w, a in zip(weights, arrs):
        s = rng.integers(0, a.shape[0], size=(n_boot, a.shape[0]))  # (R, S) this group's seeds
        per_seed_means = np.take_along_axis(a[s], ex[:, None, :].repeat(a.shape[0], 1), axis=2).mean(2)  # (R, S)
        stat += w * per_seed_means.mean(1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stat, [alpha, 1 - alpha])
    return point, float(lo), float(hi)


def outcomes_array(strings: Sequence[str]) -> np.ndarray:
    """(S, n) 0/1 array from S outcome strings ("0110...", `evaluate.outcome_strings`) of equal length."""
    if not strings:
        raise ValueError("outcomes_array: no outcome strings")
    lengths = {len(s) for s in strings}
    if len(lengths) != 1:
        raise ValueError(f"outcomes_array: outcome strings of different lengths {sorted(lengths)}; the runs were "
                         "evaluated on different numbers of examples")
    bad = {c for s in strings for c in s} - {"0", "1"}
    if bad:
        raise ValueError(f"outcomes_array: characters {sorted(bad)} in outcome strings (only 0 and 1)")
    return np.array([[c == "1" for c in s] for s in strings], dtype=np.float64)
