"""Paired SAEs: MMCS of a dictionary with itself and with a permuted copy is 1, a random one far lower; unmatched
features; the paired pipeline on two tiny models (SAELens SAEs, saved, reloaded on a rerun)."""

from __future__ import annotations

import copy

import pytest
import torch

from mechrl.analysis.diffing import max_cosine, mmcs, mmcs_figure, paired_saes, unit_rows
from mechrl.analysis.sae import SAESpec


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _dict(n=64, d=32, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_mmcs_self_permuted_and_random():
    a = _dict()
    assert mmcs(a, a)["mmcs"] == pytest.approx(1.0, abs=1e-12)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    scaled = a[perm] * torch.rand(64, 1, generator=torch.Generator().manual_seed(2)).add(0.5)  # norms do not matter
    res = mmcs(a, scaled)
    assert res["mmcs"] == pytest.approx(1.0, abs=1e-12)
    inv = torch.argsort(perm)
    assert [res["match"][i] for i in range(64)] == inv.tolist()  # each row found its own copy
    assert res["unmatched"] == []
    rnd = mmcs(a, _dict(seed=3))["mmcs"]
    assert rnd < 0.6  # 64 random directions in 32 dims: the best of 64 cosines is ~0.4
    # hand-checkable: a = {e0, e1}, b = {e0, (e1 + e2)/sqrt(2)} -> max cosines 1 and 1/sqrt(2)
    e = torch.eye(3)
    res = mmcs(e[:2], torch.stack([e[0], (e[1] + e[2]) / 2 ** 0.5]))
    assert res["per_feature"] == pytest.approx({0: 1.0, 1: 2 ** -0.5}) and res["mmcs"] == pytest.approx((1 + 2 ** -0.5) / 2)
    assert res["unmatched"] == []  # 0.707 >= 0.7
    assert mmcs(e[:2], torch.stack([e[0], (e[1] + e[2]) / 2 ** 0.5]), threshold=0.75)["unmatched"] == [1]


def test_mmcs_alive_masks_and_errors():
    a, b = _dict(), _dict(seed=5)
    b[:10] = a[:10]
    alive = torch.zeros(64, dtype=torch.bool)
    alive[:10] = True
    assert mmcs(a, b, alive_a=alive)["mmcs"] == pytest.approx(1.0)
    assert mmcs(a, b, alive_a=alive)["n_alive_a"] == 10
    with pytest.raises(ValueError, match="no alive"):
        mmcs(a, b, alive_a=torch.zeros(64, dtype=torch.bool))
    with pytest.raises(ValueError, match="zero"):
        unit_rows(torch.zeros(2, 3))
    with pytest.raises(AssertionError, match="width"):
        max_cosine(a, _dict(d=16))


def test_paired_saes_on_tiny_models(cards_tok, tmp_path):
    """Base vs an identical copy vs a perturbed copy at one MLP output: the SAEs train (SAELens), each comparison
    is reported both ways, and a rerun reloads the saved SAEs (same numbers, nothing retrained)."""
    from mechrl.config import TinyModelConfig
    from mechrl.models.loading import build_tiny_model

    base = build_tiny_model(TinyModelConfig(arch="llama", n_layer=2, d_model=32, n_head=4), cards_tok, seed=0)
    pert = copy.deepcopy(base)
    with torch.no_grad():
        pert.model.layers[1].mlp.down_proj.weight.add_(0.05 * torch.randn_like(pert.model.layers[1].mlp.down_proj.weight))
    texts = [f"RED {i % 10} BLUE {(3 * i) % 10} GREEN {(7 * i) % 10} = {i % 7}" for i in range(120)]
    spec = SAESpec(site="", architecture="topk", d_sae=64, k=4, steps=60, batch_size=128, lr=3e-3)
    models = {"base": base, "same": copy.deepcopy(base), "pert": pert}
    res = paired_saes(models, cards_tok, texts[:100], texts[100:], [1], spec, tmp_path, seed_control=True)
    rec = res["layers"]["1"]
    assert set(rec["saes"]) == {"base", "same", "pert", "base_seed1"}
    assert rec["mmcs"]["same->base"] == pytest.approx(1.0, abs=1e-6)  # identical model, same seed: the same SAE
    assert rec["mmcs"]["base->same"] == pytest.approx(1.0, abs=1e-6)
    for key in ("pert->base", "base->pert", "base_seed1->base"):
        assert 0 < rec["mmcs"][key] < 1.0
    assert (tmp_path / "mlp_out.1" / "pert" / "cfg.json").is_file()
    again = paired_saes(models, cards_tok, texts[:100], texts[100:], [1], spec, tmp_path, seed_control=True)
    assert again["layers"]["1"]["mmcs"] == rec["mmcs"]
    assert mmcs_figure(res).startswith(b"\x89PNG")
    with pytest.raises(KeyError, match="reference"):
        paired_saes(models, cards_tok, texts, texts, [1], spec, tmp_path, reference="nope")
