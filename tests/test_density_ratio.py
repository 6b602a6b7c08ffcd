"""Density-ratio KL: the cross-fitted estimate against the closed form for Gaussians, zero for equal samples,
the online (RL) form, and the firing-rate monitor."""

from __future__ import annotations

import numpy as np
import pytest

from mechrl.control.density_ratio import DensityRatioConfig, OnlineDensityRatio, crossfit_kl, firing_rate_kl, gaussian_kl


@pytest.mark.parametrize("d, kl", [(2, 0.1), (4, 0.5), (8, 1.0), (3, 2.0)])
def test_density_ratio_kl_matches_the_gaussian_closed_form(d, kl):
    rng = np.random.default_rng(d)
    direction = rng.normal(size=d)
    mu = direction / np.linalg.norm(direction) * np.sqrt(2 * kl)  # equal covariances: KL = |mu|^2 / 2
    A = rng.normal(size=(d, d)) * 0.3 + np.eye(d)
    cov = A @ A.T
    L = np.linalg.cholesky(cov)
    mu_c = L @ mu  # mean shift in the covariance's metric, so that KL is still `kl`
    want = gaussian_kl(mu_c, cov, np.zeros(d), cov)
    assert abs(want - kl) < 1e-9
    p = rng.normal(size=(20000, d)) @ L.T + mu_c
    q = rng.normal(size=(20000, d)) @ L.T
    est, r, models = crossfit_kl(p, q, DensityRatioConfig())
    assert abs(est / want - 1) < 0.10, (est, want)
    assert r.shape == (20000,) and len(models) == 2


def test_quadratic_features_recover_a_variance_change():
    rng = np.random.default_rng(0)
    scale = np.array([1.6, 0.7, 1.0])
    want = gaussian_kl(np.zeros(3), np.diag(scale ** 2), np.zeros(3), np.eye(3))
    assert 0.1 < want < 2
    p, q = rng.normal(size=(20000, 3)) * scale, rng.normal(size=(20000, 3))
    est, _, _ = crossfit_kl(p, q, DensityRatioConfig(features="quadratic"))
    assert abs(est / want - 1) < 0.10, (est, want)


def test_equal_samples_give_zero_kl_and_ratios():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 5))
    est, r, _ = crossfit_kl(x, x.copy(), DensityRatioConfig())
    assert abs(est) < 1e-4 and np.abs(r).max() < 1e-3
    # independent samples of one distribution: close to zero, never the biased in-sample value
    est2, _, _ = crossfit_kl(rng.normal(size=(4000, 5)), rng.normal(size=(4000, 5)), DensityRatioConfig())
    assert abs(est2) < 0.02


def test_logits_are_clipped():
    rng = np.random.default_rng(2)
    p, q = rng.normal(size=(2000, 2)) + 50.0, rng.normal(size=(2000, 2))  # perfectly separable
    _, r, _ = crossfit_kl(p, q, DensityRatioConfig(clip=3.0))
    assert np.allclose(r, 3.0)  # log(n_p / n_q) = 0 here


def test_online_ratio_refits_every_k_calls_and_scores_new_batches_out_of_sample():
    rng = np.random.default_rng(3)
    human = rng.normal(size=(3000, 4))
    online = OnlineDensityRatio(human, DensityRatioConfig(refresh_every=3, buffer_size=600))
    shifted = lambda: rng.normal(size=(200, 4)) + np.array([1.0, 0, 0, 0])  # noqa: E731  KL = 0.5
    means = []
    for call in range(7):
        models_before = online.models
        r = online(shifted())
        refit = call % 3 == 0
        assert (online.models is not models_before) == refit
        assert r.shape == (200,)
        means.append(r.mean())
    assert len(online.buffer) == 600 and online.last_kl is not None
    assert abs(np.mean(means) - 0.5) < 0.15
    with pytest.raises(ValueError, match="exceeds buffer_size"):
        online(rng.normal(size=(601, 4)))
    with pytest.raises(ValueError, match="3 dims, human samples 4"):
        online(rng.normal(size=(10, 3)))


def test_firing_rate_kl():
    p = np.array([[1, 0], [1, 0], [1, 1], [0, 1]], bool)
    q = np.array([[1, 0], [0, 0], [1, 1], [0, 1]], bool)
    kl = firing_rate_kl(p, q, smoothing=0.0)
    a, b = 0.75, 0.5
    assert kl[0] == pytest.approx(a * np.log(a / b) + (1 - a) * np.log((1 - a) / (1 - b)))
    assert kl[1] == pytest.approx(0.0)
    assert np.isfinite(firing_rate_kl(np.ones((3, 1), bool), np.zeros((3, 1), bool))).all()  # smoothing keeps it finite
