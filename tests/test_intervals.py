"""The two-level bootstrap the studies quote: exact cases, the normal approximation for one seed,
the seed level, pairing by example, and loud errors."""

from __future__ import annotations

import numpy as np
import pytest

from mechrl.studies.intervals import outcomes_array, two_level_interval


def test_degenerate_outcomes_give_point_intervals():
    ones = np.ones((3, 50))
    assert two_level_interval([ones], [1.0]) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    a = (rng.random((1, 80)) < 0.4).astype(float)
    assert two_level_interval([a, a], [1.0, -1.0]) == (0.0, 0.0, 0.0)  # paired by example: identical arms differ by 0
    # with two seeds per arm the seeds are drawn independently for each arm (separate runs): not 0
    two = (rng.random((2, 80)) < 0.4).astype(float)
    point, lo, hi = two_level_interval([two, two], [1.0, -1.0])
    assert point == 0.0 and lo < 0 < hi


def test_one_seed_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    n, p = 2000, 0.3
    a = (rng.random((1, n)) < p).astype(float)
    point, lo, hi = two_level_interval([a], [1.0], n_boot=4000)
    se = np.sqrt(point * (1 - point) / n)
    assert point == pytest.approx(a.mean())
    assert lo == pytest.approx(point - 1.96 * se, abs=0.004) and hi == pytest.approx(point + 1.96 * se, abs=0.004)


def test_the_seed_level_widens_the_interval():
    # two seeds, one always wrong and one always right: resampling seeds gives 0, 0.5 or 1
    a = np.stack([np.zeros(100), np.ones(100)])
    point, lo, hi = two_level_interval([a], [1.0])
    assert (point, lo, hi) == (0.5, 0.0, 1.0)


def test_pairing_by_example_keeps_a_small_difference_tight():
    rng = np.random.default_rng(2)
    b = (rng.random((1, 500)) < 0.5).astype(float)
    a = b.copy()
    a[0, np.flatnonzero(b[0] == 0)[:5]] = 1  # five examples flipped to correct
    point, lo, hi = two_level_interval([a, b], [1.0, -1.0])
    assert point == pytest.approx(5 / 500)
    assert 0 < lo <= point <= hi <= 10 / 500 + 1e-12  # unpaired, the interval would be about +-0.06


def test_errors_are_loud():
    with pytest.raises(ValueError, match="same n"):
        two_level_interval([np.ones((2, 5)), np.ones((2, 6))], [1.0, -1.0])
    with pytest.raises(ValueError, match="groups"):
        two_level_interval([np.ones((2, 5))], [1.0, -1.0])
    with pytest.raises(ValueError, match="non-finite"):
        two_level_interval([np.array([[np.nan, 1.0]])], [1.0])
    assert outcomes_array(["101", "001"]).tolist() == [[1, 0, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="different lengths"):
        outcomes_array(["10", "101"])
    with pytest.raises(ValueError, match="only 0 and 1"):
        outcomes_array(["1x1"])
