"""KL(p || q) between two sample sets by density-ratio estimation with a logistic classifier.

A classifier trained to tell p samples (label 1) from q samples (label 0) has logit

    l(z) = log p(z) / q(z) + log(n_p / n_q)          (the second term: the class sizes of its training set)

so r(z) = l(z) - log(n_p / n_q) estimates the log density ratio and KL(p || q) = E_p[r(z)]. Two things keep
the estimate honest:

  - cross-fitting: the samples are split into `n_folds` folds; each p sample's r comes from the classifier
    trained on the other folds, never from one that saw it (an in-sample estimate is biased upwards);
  - clipping: logits are clipped to [-clip, clip], so a few separable samples cannot dominate the mean.

The classifier is scikit-learn's `LogisticRegression` on the latents (`features="linear"`, exact for two
Gaussians with one covariance) or on latents and their squares (`"quadratic"`). `OnlineDensityRatio`
is the RL form: a buffer of recent policy samples against a fixed set of human samples, refitted every
`refresh_every` calls; between refits, new samples are scored by the fold classifiers' mean (they were
trained on none of them).

    kl, r = crossfit_kl(p_samples, q_samples, DensityRatioConfig())      # r: (n_p,) out-of-fold log ratios
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from mechrl.config import Strict

__all__ = ["DensityRatioConfig", "crossfit_kl", "OnlineDensityRatio", "firing_rate_kl", "gaussian_kl"]


class DensityRatioConfig(Strict):
    n_folds: int = Field(2, ge=2)
    clip: float = Field(10.0, gt=0)
    """Logits are clipped to [-clip, clip] before the class-prior correction."""
    C: float = Field(1.0, gt=0)
    """Inverse L2 regularisation of the logistic classifier (scikit-learn's C)."""
    features: str = Field("linear", pattern="^(linear|quadratic)$")
    max_iter: int = Field(1000, ge=1)
    refresh_every: int = Field(5, ge=1)
    """OnlineDensityRatio: refit the classifiers every this many calls (the first call always fits)."""
    buffer_size: int = Field(1024, ge=2)
    """OnlineDensityRatio: policy samples kept (the most recent)."""
    seed: int = 0


def _features(x: np.ndarray, kind: str) -> np.ndarray:
    return np.concatenate([x, x * x], 1) if kind == "quadratic" else x


def _fit(p: np.ndarray, q: np.ndarray, cfg: DensityRatioConfig):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = _features(np.concatenate([p, q]), cfg.features)
    y = np.concatenate([np.ones(len(p)), np.zeros(len(q))])
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter).fit(scaler.transform(x), y)
    return scaler, clf, math.log(len(p) / len(q))


def _log_ratio(model, x: np.ndarray, cfg: DensityRatioConfig) -> np.ndarray:
    scaler, clf, prior = model
    logit = clf.decision_function(scaler.transform(_features(x, cfg.features)))
    return np.clip(logit, -cfg.clip, cfg.clip) - prior


def _folds(n: int, k: int, seed: int) -> np.ndarray:
    """(n,) fold id of each sample, balanced, in an order drawn from `seed` (two sets of one size get the same
    assignment, so identical sets give identical training sets and a ratio of exactly 1)."""
    return np.random.default_rng(seed).permutation(np.arange(n) % k)


def _check(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a (n, d) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: non-finite values")
    return x


def crossfit_kl(p: np.ndarray, q: np.ndarray, cfg: DensityRatioConfig) -> tuple[float, np.ndarray, list]:
    """(KL(p || q) estimate, out-of-fold log ratios (n_p,), the fold classifiers) from samples p (n_p, d) and
    q (n_q, d). Each fold's classifier trains on the other folds of both sets."""
    p, q = _check(p, "p samples"), _check(q, "q samples")
    if p.shape[1] != q.shape[1]:
        raise ValueError(f"p samples have {p.shape[1]} dims, q samples {q.shape[1]}")
    k = cfg.n_folds
    if min(len(p), len(q)) < k:
        raise ValueError(f"crossfit_kl: need at least n_folds={k} samples of each set, got {len(p)} and {len(q)}")
    fp, fq = _folds(len(p), k, cfg.seed), _folds(len(q), k, cfg.seed)
    r = np.empty(len(p))
    models = []
    for f in range(k):
        m = _fit(p[fp != f], q[fq != f], cfg)
        r[fp == f] = _log_ratio(m, p[fp == f], cfg)
        models.append(m)
    return float(r.mean()), r, models


def gaussian_kl(mu_p: np.ndarray, cov_p: np.ndarray, mu_q: np.ndarray, cov_q: np.ndarray) -> float:
    """Closed-form KL(N(mu_p, cov_p) || N(mu_q, cov_q)) in nats."""
    d = len(mu_p)
    inv_q = np.linalg.inv(cov_q)
    diff = mu_q - mu_p
    _, logdet_p = np.linalg.slogdet(cov_p)
    _, logdet_q = np.linalg.slogdet(cov_q)
    return 0.5 * float(np.trace(inv_q @ cov_p) + diff @ inv_q @ diff - d + logdet_q - logdet_p)


def firing_rate_kl(p_fire: np.ndarray, q_fire: np.ndarray, smoothing: float = 0.5) -> np.ndarray:
    """Per-feature KL between Bernoulli firing rates: p_fire (n_p, m) and q_fire (n_q, m) bool arrays ->
    (m,) KL(Bern(p_i) || Bern(q_i)) in nats, each rate smoothed as (count + s) / (n + 2s) so that a
    feature never seen firing gives a finite value."""
    p_fire, q_fire = np.asarray(p_fire, bool), np.asarray(q_fire, bool)
    if p_fire.ndim != 2 or q_fire.ndim != 2 or p_fire.shape[1] != q_fire.shape[1]:
        raise ValueError(f"firing_rate_kl: shapes {p_fire.shape} and {q_fire.shape}; need (n, m) and (n', m)")
    a = (p_fire.sum(0) + smoothing) / (len(p_fire) + 2 * smoothing)
    b = (q_fire.sum(0) + smoothing) / (len(q_fire) + 2 * smoothing)
    return a * np.log(a / b) + (1 - a) * np.log((1 - a) / (1 - b))


@dataclass
class OnlineDensityRatio:
    """Log ratios log p_policy(z) / p_human(z) of each new batch of policy samples (see the module docstring).

    `human` (n_h, d) is fixed; each call adds the batch to the policy buffer. On a refit call (the first and
    then every `refresh_every`-th) the fold classifiers are trained on the buffer, and the batch gets its
    out-of-fold ratios; on other calls the mean of the fold classifiers' ratios (trained before the batch
    existed). `last_kl` is the cross-fitted KL estimate of the last refit."""

    human: np.ndarray
    cfg: DensityRatioConfig

    def __post_init__(self):
        self.human = _check(self.human, "human samples")
        self.buffer = np.zeros((0, self.human.shape[1]))
        self.models: list = []
        self.calls = 0
        self.last_kl: float | None = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = _check(batch, "policy samples")
        if batch.shape[1] != self.human.shape[1]:
            raise ValueError(f"policy samples have {batch.shape[1]} dims, human samples {self.human.shape[1]}")
        if len(batch) > self.cfg.buffer_size:
            raise ValueError(f"a batch of {len(batch)} policy samples exceeds buffer_size={self.cfg.buffer_size}")
        self.buffer = np.concatenate([self.buffer, batch])[-self.cfg.buffer_size:]
        refit = self.calls % self.cfg.refresh_every == 0
        self.calls += 1
        if refit:
            cfg = self.cfg.model_copy(update={"seed": self.cfg.seed + self.calls})
            self.last_kl, r, self.models = crossfit_kl(self.buffer, self.human, cfg)
            return r[-len(batch):]  # the batch is the buffer's tail
        return np.mean([_log_ratio(m, batch, self.cfg) for m in self.models], 0)
