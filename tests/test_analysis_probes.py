"""Probes: closed-form ridge against scikit-learn, planted signals recovered at the planted layer
only, logistic probes at ~1 on separable data and at chance on shuffled labels, and a tiny card
model end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from mechrl.studies.card_probes import label_kind, probe_card_label
from mechrl.analysis.probes import probe, r2_score, ridge_fit, split_indices


def records(result, **where):
    return [r for r in result["records"] if all(r[k] == v for k, v in where.items())]


@pytest.mark.parametrize("n,d", [(80, 12), (20, 40)])  # primal (D <= N) and dual (D > N) solves
def test_ridge_matches_sklearn(n, d):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, n, d, generator=g, dtype=torch.float64) * 2 + 1  # 3 groups, off-centre
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    lambdas = torch.tensor([0.01, 1.0, 30.0])
    fit = ridge_fit(X, y, lambdas)
    pred = fit.predict(X)  # (S, G, N, K)
    for s, lam in enumerate(lambdas.tolist()):
        for grp in range(3):
            ref = Ridge(alpha=lam, fit_intercept=True, solver="svd").fit(X[grp].numpy(), y.numpy())
            np.testing.assert_allclose(fit.W[s, grp].numpy(), ref.coef_.T, rtol=1e-6, atol=1e-8)
            np.testing.assert_allclose(fit.b[s, grp].numpy(), ref.intercept_, rtol=1e-6, atol=1e-8)
            np.testing.assert_allclose(pred[s, grp].numpy(), ref.predict(X[grp].numpy()), rtol=1e-6, atol=1e-8)


def test_r2_matches_definition():
    y = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64)
    assert float(r2_score(y, y)) == 1.0
    assert float(r2_score(y, torch.full_like(y, 2.5))) == 0.0
    with pytest.raises(ValueError, match="constant"):
        r2_score(torch.ones(4, 1), torch.zeros(4, 1))


def test_split_is_seeded_disjoint_and_complete():
    a, b, c = split_indices(50, seed=3), split_indices(50, seed=3), split_indices(50, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["train"], c["train"])
    assert sorted(torch.cat(list(a.values())).tolist()) == list(range(50))


def planted(n, w, layers=4, positions=2, at=(2, 1), seed=0, scale=1.0, shift=0.0):
    """(N, L, P, D) noise with a label linear (weights `w`) in the activations at (layer, position) `at` only."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, layers, positions, len(w), generator=g) * scale + shift
    return x, x[:, at[0], at[1]] @ w  # (N, L, P, D), (N,)


def test_planted_linear_signal_is_recovered_at_its_layer_only():
    w = torch.randn(16, generator=torch.Generator().manual_seed(7))
    x_id, y_id = planted(400, w, seed=0)
    x_ood, y_ood = planted(200, w, seed=1, scale=3.0, shift=1.0)  # same map, shifted activations
    res = probe({"id": x_id, "shift": x_ood}, {"id": y_id.tolist(), "shift": y_ood.tolist()}, "ridge",
                positions=[-2, -1], layers=[0, 1, 2, 3], label="planted")
    json.dumps(res)  # tidy and JSON-ready
    assert res["distributions"] == ["id_val", "id_test", "shift"]
    assert res["n"] == {"id_train": 240, "id_val": 80, "id_test": 80, "shift": 200}
    for dist in res["distributions"]:
        hit = records(res, layer=2, position=-1, distribution=dist)
        assert len(hit) == 1 and hit[0]["value"] > 0.999, (dist, hit)
        others = [r["value"] for r in records(res, distribution=dist) if (r["layer"], r["position"]) != (2, -1)]
        assert len(others) == 7 and max(others) < 0.1, (dist, others)


def test_logistic_separable_is_near_one_and_shuffled_is_chance():
    g = torch.Generator().manual_seed(0)
    n, d = 600, 8
    x = torch.randn(n, 3, 1, d, generator=g)
    centres = torch.randn(3, d, generator=g) * 4
    cls = torch.randint(0, 3, (n,), generator=g)
    x[:, 1, 0] += centres[cls]  # three well-separated classes at layer 1 only
    names = np.array(["RED", "BLUE", "GREEN"])[cls.numpy()].tolist()
    res = probe({"id": x}, {"id": names}, "logistic", label="colour")
    json.dumps(res)
    assert res["metric"] == "accuracy"
    assert records(res, layer=1, distribution="id_test")[0]["value"] > 0.97
    for layer in (0, 2):  # no signal: chance is ~1/3
        assert records(res, layer=layer, distribution="id_test")[0]["value"] < 0.5
    shuffled = np.random.default_rng(0).permutation(names).tolist()
    res_s = probe({"id": x}, {"id": shuffled}, "logistic")
    for r in records(res_s, distribution="id_test"):
        assert r["value"] < 0.5 and abs(r["majority_baseline"] - 1 / 3) < 0.15


def test_logistic_unseen_ood_class_counts_as_wrong():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 1, 1, 4, generator=g)
    y = ["a" if v > 0 else "b" for v in x[:, 0, 0, 0].tolist()]
    x_ood = torch.randn(50, 1, 1, 4, generator=g)
    res = probe({"id": x, "ood": x_ood}, {"id": y, "ood": ["c"] * 50}, "logistic")
    r = records(res, distribution="ood")[0]
    assert r["value"] == 0.0 and r["unseen_class_frac"] == 1.0


def test_probe_checks_its_inputs():
    x = torch.randn(30, 2, 1, 4)
    with pytest.raises(KeyError, match="labels for"):
        probe({"id": x, "ood": x}, {"id": list(range(30))}, "ridge")
    with pytest.raises(ValueError, match="30 examples"):
        probe({"id": x}, {"id": list(range(29))}, "ridge")
    with pytest.raises(ValueError, match="single class"):
        probe({"id": x}, {"id": ["a"] * 30}, "logistic")
    with pytest.raises(KeyError, match="sum_<COLOUR>"):
        label_kind("mask_a")


def test_card_model_end_to_end(cards_task, cards_tok, tiny_model):
    res = probe_card_label(tiny_model.eval(), cards_tok, cards_task, "total", positions=(-1, -2), n_examples=60,
                           splits=["ood_length", "ood_colors"])
    json.dumps(res)
    assert res["sites"] == ["resid_post.0", "resid_post.1"] and res["positions"] == [-1, -2]
    assert res["distributions"] == ["id_val", "id_test", "ood_length", "ood_colors"]
    assert len(res["records"]) == 2 * 2 * 4
    assert all(np.isfinite(r["value"]) and r["metric"] == "r2" for r in res["records"])
    cls = probe_card_label(tiny_model.eval(), cards_tok, cards_task, "big", n_examples=60, splits=["ood_paraphrase"])
    assert cls["metric"] == "accuracy" and all(0 <= r["value"] <= 1 for r in cls["records"])


def test_constant_ood_target_is_reported_undefined():
    w = torch.randn(8, generator=torch.Generator().manual_seed(0))
    x, y = planted(100, w, layers=1, positions=1, at=(0, 0))
    res = probe({"id": x, "ood": x[:20]}, {"id": y.tolist(), "ood": [0.0] * 20}, "ridge")
    r = records(res, distribution="ood")[0]
    assert r["value"] is None and "constant" in r["undefined"]
    assert records(res, distribution="id_test")[0]["value"] > 0.99
    json.dumps(res, allow_nan=False)
