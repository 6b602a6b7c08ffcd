"""Reward probes on codes: a reward that is a linear function of two latents is recovered (R² near 1, those two
latents on top), a reward unrelated to the codes is not; text features are per-text means."""

from __future__ import annotations

import pytest
import torch

from mechrl.analysis.reward_probes import reward_probe, text_features


def test_text_features_are_means():
    codes = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    feats = text_features(codes, torch.tensor([0, 0, 1]), 2)
    torch.testing.assert_close(feats, torch.tensor([[2.0, 1.0], [5.0, 5.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="no token rows"):
        text_features(codes, torch.tensor([0, 0, 2]), 3)


def test_probe_finds_the_latents_that_carry_the_reward():
    g = torch.Generator().manual_seed(0)
    feats = torch.relu(torch.randn(400, 32, generator=g))
    feats[:, 31] = 0.0  # a dead latent
    reward = 2.0 * feats[:, 3] - 1.0 * feats[:, 17] + 0.05 * torch.randn(400, generator=g)
    res = reward_probe(feats, reward.tolist(), n_top=4)
    assert res["ridge_r2"] > 0.95 and res["logistic_accuracy"] > 0.75  # 80 test texts, half near the median
    assert {r["latent"] for r in res["top_latents"][:2]} == {3, 17}
    top = {r["latent"]: r for r in res["top_latents"]}
    assert top[3]["coef"] > 0 > top[17]["coef"] and top[3]["corr"] > 0.5
    assert res["n_latents_alive"] == 31 and all(r["latent"] != 31 for r in res["top_latents"])
    noise = reward_probe(feats, torch.randn(400, generator=g).tolist())
    assert noise["ridge_r2"] < 0.1 and noise["logistic_accuracy"] < 0.7
