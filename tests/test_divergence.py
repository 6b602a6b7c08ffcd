"""Divergence between checkpoints: CKA's invariances, parameter norms against a hand computation, and a model
fine-tuned at one layer only, whose divergence must single out that layer."""

from __future__ import annotations

import copy

import pytest
import torch

from mechrl.analysis.cache import run_with_cache
from mechrl.analysis.divergence import (
    activation_divergence, divergence, divergence_figure, linear_cka, logit_lens, parameter_divergence,
    top_divergent_layers,
)
from mechrl.config import TinyModelConfig
from mechrl.models.loading import build_tiny_model



@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TEXTS = ["RED 3 BLUE 5 GREEN 7", "BLUE 2 RED 9 RED 1 YELLOW 4", "GREEN 8 = 8", "RED 1 2 3 4 5 6 7 8 9",
         "YELLOW 3 BLUE 3 RED 3", "1 + 2 = 3 ; 4 - 1 = 3"] * 3


def test_cka_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 32, generator=g, dtype=torch.float64) @ torch.randn(32, 32, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))  # an orthogonal map
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-10)  # isotropic scale and offset
    noise = torch.randn(2000, 32, generator=g, dtype=torch.float64)
    assert linear_cka(x, noise) < 0.05  # independent: ~D/N plus the anisotropy of x
    assert linear_cka(x, x + 0.5 * x.std() * noise) < 1.0
    with pytest.raises(ValueError, match="constant"):
        linear_cka(x, torch.ones(2000, 4))


def _model(tok, arch, n_layer=3, seed=0):
    return build_tiny_model(TinyModelConfig(arch=arch, n_layer=n_layer, d_model=32, n_head=4), tok, seed=seed)


def test_parameter_divergence_matches_a_hand_computation(cards_tok):
    base = _model(cards_tok, "llama")
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.add_(0.1)  # (32, 128): ||Δ|| = 0.1 * sqrt(32 * 128)
        other.model.layers[2].self_attn.q_proj.weight.mul_(2.0)  # ||Δ|| = ||W||
    d = parameter_divergence(base, other)
    l0, l1, l2 = d["layers"]
    assert l0["block_abs"] == 0 and l0["block_rel"] == 0
    assert l1["mlp_abs"] == pytest.approx(0.1 * (32 * 128) ** 0.5, rel=1e-6) and l1["attn_abs"] == 0
    assert l1["block_abs"] == pytest.approx(l1["mlp_abs"], rel=1e-12)
    mlp_norm = sum(p.detach().double().pow(2).sum() for p in base.model.layers[1].mlp.parameters()) ** 0.5
    assert l1["mlp_rel"] == pytest.approx(l1["mlp_abs"] / float(mlp_norm), rel=1e-6)
    q = base.model.layers[2].self_attn.q_proj.weight
    assert l2["attn_abs"] == pytest.approx(float(q.detach().double().norm()), rel=1e-6) and l2["mlp_abs"] == 0
    assert d["outside"]["abs"] == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("k", [0, 2])
def test_finetuning_one_layer_makes_it_the_top_divergent_layer(cards_tok, arch, k):
    base = _model(cards_tok, arch)
    tuned = copy.deepcopy(base)
    blocks = tuned.model.layers if arch == "llama" else tuned.transformer.h
    for p in tuned.parameters():
        p.requires_grad_(False)
    params = list(blocks[k].parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=3e-3)
    batch = cards_tok(TEXTS, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(20):
        loss = tuned(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    div = divergence(base, tuned, cards_tok, TEXTS)
    assert top_divergent_layers(div, 1) == [k]
    assert top_divergent_layers(div, 1, by="param_block_abs") == [k]
    recs = div["layers"]
    for r in recs:
        if r["layer"] != k:
            assert r["param_block_abs"] == 0.0
    # activations before layer k are untouched; at layer k they move
    for r in recs[:k]:
        assert r["resid_cka"] == pytest.approx(1.0, abs=1e-9) and r["resid_diff_norm"] == 0.0 and r["lens_kl"] < 1e-9
    assert recs[k]["resid_diff_norm"] > 0 and recs[k]["mlp_diff_norm"] > 0 and recs[k]["lens_kl"] > 0
    assert top_divergent_layers(div, 1, by="mlp_rel_diff")[0] >= k
    assert divergence_figure({"tuned": div}, {"tuned": [k]}).startswith(b"\x89PNG")


def test_identical_models_do_not_diverge_and_lens_is_the_real_output(cards_tok):
    base = _model(cards_tok, "llama")
    a = activation_divergence(base, copy.deepcopy(base), cards_tok, TEXTS[:4])
    for r in a["layers"]:
        assert r["resid_cka"] == pytest.approx(1.0, abs=1e-9) and r["lens_kl"] == pytest.approx(0.0, abs=1e-7)
        assert r["resid_cosine"] == pytest.approx(1.0, abs=1e-6)
    # the lens at the last layer is the model's own next-token distribution
    batch = cards_tok(TEXTS[:1], return_tensors="pt", add_special_tokens=False)
    last = f"resid_post.{base.config.num_hidden_layers - 1}"
    out, cache = run_with_cache(base, batch, [last])
    torch.testing.assert_close(logit_lens(base, cache[last][0]), torch.log_softmax(out.logits[0].float(), -1),
                               atol=1e-5, rtol=1e-5)


def test_rank_errors(cards_tok):
    div = {"layers": [{"layer": 0, "param_block_rel": 0.1}, {"layer": 1, "param_block_rel": 0.3}]}
    assert top_divergent_layers(div, 2) == [1, 0]
    with pytest.raises(ValueError, match="unknown measure"):
        top_divergent_layers(div, 1, by="nope")
    with pytest.raises(ValueError, match="k=3"):
        top_divergent_layers(div, 3)
    other = _model(cards_tok, "llama", n_layer=2)
    with pytest.raises(ValueError, match="different parameters"):
        parameter_divergence(_model(cards_tok, "llama"), other)
