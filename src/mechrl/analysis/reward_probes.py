"""Reward probes on dictionary codes: can a linear read-out of a text's SAE or crosscoder latents predict the reward
the text gets, and which latents carry it?

A text's feature vector is the mean of its tokens' codes (every latent, (H,)). Two probes, through
`mechrl.analysis.probes.probe` (texts split 60/20/20 into train / val / test by a seed; strength chosen on val):

    ridge      R² of the reward itself on the test texts
    logistic   accuracy of "reward above the median of the train texts" on the test texts (majority baseline given)

Which latents carry the reward: per latent, the Pearson correlation of its text feature with the reward, and its
ridge coefficient (train texts, the strength chosen above) times the feature's standard deviation (the change in
predicted reward per standard deviation of the latent); the top ones by |coefficient| are listed.

    res = reward_probe(text_features(codes, corpus.example, len(texts)), rewards)
    res["ridge_r2"], res["logistic_accuracy"], res["top_latents"][:5]
"""

from __future__ import annotations

import numpy as np
import torch

from mechrl.analysis.probes import probe, ridge_fit, split_indices

RIDGE_ALPHAS = tuple(10.0 ** k for k in range(-3, 4))


def text_features(codes: torch.Tensor, example: torch.Tensor, n_texts: int) -> torch.Tensor:
    """(N, H) token codes and (N,) text index -> (n_texts, H) mean code per text."""
    assert codes.dim() == 2 and example.shape == (codes.shape[0],), \
        f"codes {tuple(codes.shape)} and example {tuple(example.shape)} do not match"
    counts = torch.bincount(example, minlength=n_texts).double()
    if (counts == 0).any():
        raise ValueError(f"text_features: texts {(counts == 0).nonzero().flatten().tolist()[:5]} have no token rows")
    sums = torch.zeros(n_texts, codes.shape[1], dtype=torch.float64)
    for i in range(0, len(codes), 8192):  # chunked: no float64 copy of every token's code
        sums.index_add_(0, example[i:i + 8192], codes[i:i + 8192].double())
    return sums / counts[:, None]


def reward_probe(features: torch.Tensor, rewards, *, seed: int = 0, n_top: int = 10) -> dict:
    """Ridge and logistic probes of the reward from (n, H) text features; the latents that carry it."""
    y = np.asarray(rewards, dtype=np.float64)
    X = features.double()
    assert X.dim() == 2 and len(y) == len(X), f"features {tuple(X.shape)} vs {len(y)} rewards"
    if not np.isfinite(y).all():
        raise ValueError("reward_probe: rewards must be finite")
    if not bool((X.std(0) > 0).any()):
        raise ValueError(f"reward_probe: all {X.shape[1]} latents are constant over the {len(X)} texts (dead codes?)")
    acts = {"id": X[:, None, None, :]}  # (n, L=1, P=1, H)
    # strengths from 1e-3 of the mean eigenvalue up: with more latents than texts the centred design is rank
    # deficient, and the smallest default strengths (1e-6) leave its null space unregularised
    ridge = probe(acts, {"id": y}, "ridge", seed=seed, label="reward", strengths=RIDGE_ALPHAS)
    split = split_indices(len(y), seed=seed)
    median = float(np.median(y[split["train"].numpy()]))
    labels = ["high" if v > median else "low" for v in y]
    logistic = probe({"id": X[:, None, None, :].float()}, {"id": labels}, "logistic", seed=seed, label="reward>median")
    rec = lambda res, dist: next(r for r in res["records"] if r["distribution"] == dist)  # noqa: E731
    r_test, l_test = rec(ridge, "id_test"), rec(logistic, "id_test")
    # which latents: correlation, and standardised ridge coefficients at the chosen strength on the train texts
    Xs = (X - X.mean(0)) / X.std(0).clamp(min=1e-12)
    yt = torch.as_tensor(y)
    corr = ((Xs * ((yt - yt.mean()) / yt.std().clamp(min=1e-12))[:, None]).sum(0) / (len(y) - 1))  # (H,)
    alive = X.std(0) > 0
    tr = split["train"]
    fit = ridge_fit(X[tr][None], yt[tr], torch.tensor([r_test["strength"]]))  # the absolute λ the probe chose
    coef = fit.W[0, 0, :, 0] * X[tr].std(0)  # (H,) per standard deviation of each latent
    coef = torch.where(alive, coef, torch.zeros_like(coef))
    order = torch.argsort(coef.abs(), descending=True)[:n_top]
    top = [{"latent": int(j), "coef": float(coef[j]), "corr": float(corr[j])} for j in order.tolist() if alive[j]]
    return {"n_texts": len(y), "ridge_r2": r_test["value"], "ridge_r2_val": rec(ridge, "id_val")["value"],
            "logistic_accuracy": l_test["value"], "majority_baseline": l_test.get("majority_baseline"),
            "median_reward": median, "n_latents_alive": int(alive.sum()), "top_latents": top,
            "top_by_corr": [{"latent": int(j), "corr": float(corr[j])}
                            for j in torch.argsort(corr.nan_to_num(0.0).abs(), descending=True)[:n_top].tolist()]}
