"""BatchTopK crosscoders: no exclusive latents between identical models, a planted model-only direction found as
exclusive, latent scaling against a hand computation and flagging a manufactured exclusive latent, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from mechrl.analysis.crosscoder import (
    Crosscoder, CrosscoderSpec, ExclusivityCriterion, classify, crosscoder_metrics, latent_scaling, latent_table,
    load_crosscoder, paired_activations, relative_norms, save_crosscoder, top_exclusive, train_crosscoder,
)

N_TRAIN, N_HELD = 10240, 2048


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sparse_data(n: int, d: int = 32, m: int = 48, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (n, d), atoms (m, d)): exact k-sparse combinations of m unit atoms, coefficients in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(m, d, generator=g)
    atoms = atoms / atoms.norm(dim=-1, keepdim=True)
    idx = torch.rand(n, m, generator=g).argsort(-1)[:, :k]
    coef = torch.zeros(n, m).scatter_(1, idx, torch.rand(n, k, generator=g) + 0.5)
    return coef @ atoms, atoms


def _spec(**kw) -> CrosscoderSpec:
    base = dict(site="synthetic", dict_size=64, k=4, steps=600, batch_size=256, lr=1e-2, dead_steps=50)
    return CrosscoderSpec(**{**base, **kw})


@pytest.mark.parametrize("shared_init", [True, False])
def test_identical_models_give_no_exclusive_latents(shared_init):
    """Both 'models' produce the same activations: every latent that fires is shared. Tolerance: with independent
    decoder initialisation (shared_init=False) no latent that fires may end up exclusive either, and every firing
    latent's Δ lies within 0.1 of 0.5."""
    x, atoms = sparse_data(N_TRAIN + N_HELD)
    pair = torch.stack([x, x], 1)  # (N, 2, D)
    cc, log = train_crosscoder(pair[:N_TRAIN], _spec(shared_init=shared_init))
    table = latent_table(cc, pair[N_TRAIN:])
    assert table["counts"]["other_only"] == 0 and table["counts"]["base_only"] == 0, table["counts"]
    firing = [r for r in table["latents"] if r["class"] != "dead"]
    assert len(firing) >= 40
    assert max(abs(r["rel_norm"] - 0.5) for r in firing) <= 0.1
    m = crosscoder_metrics(cc, pair[N_TRAIN:])
    assert m["fvu"][0] < 0.12 and m["fvu"][1] < 0.12, m  # it does reconstruct (a TopK SAE reaches ~0.05 here)
    assert log["history"][-1]["fvu"] < log["history"][0]["fvu"] / 10


def test_planted_direction_in_one_model_is_found_exclusive():
    """Model 1 = model 0 plus a direction v on 5% of tokens: one latent is other-only (Δ >= 0.9) with its model-1
    decoder along v (cos > 0.95), and it passes the latent-scaling check; nothing else is exclusive."""
    n = N_TRAIN + N_HELD
    x, _ = sparse_data(n)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(32, generator=g)
    v = v / v.norm()
    c = (torch.rand(n, generator=g) < 0.05).float() * (torch.rand(n, generator=g) + 0.5)  # (n,)
    pair = torch.stack([x, x + c[:, None] * v], 1)
    cc, _ = train_crosscoder(pair[:N_TRAIN], _spec(shared_init=False))
    table = latent_table(cc, pair[N_TRAIN:], models=("base", "planted"))
    assert table["counts"]["other_only"] == 1 and table["counts"]["base_only"] == 0, table["counts"]
    (top,) = top_exclusive(table, 5)
    d1 = cc.W_dec[top["latent"], 1].detach()
    assert float(torch.nn.functional.cosine_similarity(d1, v, dim=0)) > 0.95
    assert top["rel_norm"] >= 0.9 and top["scaling_ok"] and abs(top["nu_error"]) < 0.2
    assert top["freq"] == pytest.approx(0.05, abs=0.02)  # it fires where v was planted


def _hand_crosscoder() -> Crosscoder:
    """D=2, H=2: latent 0 reads model 1's first coordinate and decodes to (1, 0) in model 1 only; latent 1 reads
    model 0's second coordinate and decodes to (0.5, 1) in model 0 and (0, 1) in model 1. Scale 1, zero biases."""
    cc = Crosscoder(2, 2, 2, k=1)
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_enc[1, 0, 0] = 1.0
        cc.W_enc[0, 1, 1] = 1.0
        cc.W_dec.copy_(torch.tensor([[[0.0, 0.0], [1.0, 0.0]], [[0.5, 1.0], [0.0, 1.0]]]))  # (H, M, D)
        cc.b_enc.zero_(), cc.b_dec.zero_()
        cc.threshold.fill_(0.0)
    return cc.eval()


X0 = torch.tensor([[0.5, 1.0], [0.0, 2.0], [1.0, 0.0]])  # base rows
X1 = torch.tensor([[2.0, 1.0], [1.0, 2.0], [0.0, 0.0]])  # other rows


def test_latent_scaling_matches_a_hand_computation():
    """Latent 0: f = (2, 1, 0), d = (1, 0), Σf² = 5. Reconstructions x̂⁰ = f₁·(0.5, 1) = (0.5,1), (1,2), (0,0) and
    x̂¹ = (2,1), (1,2), (0,0).
      error, base:  x⁰ - x̂⁰ = (0,0), (-1,0), (1,0) -> Σ f (y·d) = -1      -> β = -1/5
      error, other: x¹ - x̂¹ + f d = (2,0), (1,0), (0,0) -> Σ f (y·d) = 5  -> β = 1
      recon, base:  x̂⁰·d = 0.5, 1, 0 -> Σ f (y·d) = 2                     -> β = 2/5
      recon, other: x̂¹·d = 2, 1, 0 -> Σ f (y·d) = 5                        -> β = 1
    so ν_ε = -0.2 and ν_r = 0.4."""
    cc = _hand_crosscoder()
    pair = torch.stack([X0, X1], 1)
    ls = latent_scaling(cc, pair, [0], toward=1)
    torch.testing.assert_close(ls["beta_error"][0], torch.tensor([-0.2, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ls["beta_recon"][0], torch.tensor([0.4, 1.0], dtype=torch.float64))
    assert float(ls["nu_error"][0]) == pytest.approx(-0.2) and float(ls["nu_recon"][0]) == pytest.approx(0.4)
    assert int(ls["n_active"][0]) == 2
    # invariant to the units: activations x 3 with the scale buffer x 3 give the same betas
    cc3 = _hand_crosscoder()
    cc3.scale.fill_(3.0)
    ls3 = latent_scaling(cc3, 3 * pair, [0], toward=1)
    torch.testing.assert_close(ls3["beta_error"], ls["beta_error"])
    torch.testing.assert_close(ls3["beta_recon"], ls["beta_recon"])
    # Δ of the hand crosscoder: latent 0 only in model 1 (1.0); latent 1 norms 1.118 vs 1 -> ½((1 - 1.118)/1.118 + 1)
    rel = relative_norms(cc)
    assert float(rel[0]) == 1.0 and float(rel[1]) == pytest.approx(0.5 * ((1 - 1.25 ** 0.5) / 1.25 ** 0.5 + 1))


def test_latent_scaling_flags_a_manufactured_exclusive_latent():
    """Train on identical models, then zero one firing latent's base decoder: it now looks other-only (Δ = 1), but
    the base activations still hold its direction, so ν_ε is near 1 and the check fails (complete shrinkage)."""
    x, _ = sparse_data(N_TRAIN + N_HELD)
    pair = torch.stack([x, x], 1)
    cc, _ = train_crosscoder(pair[:N_TRAIN], _spec())
    table = latent_table(cc, pair[N_TRAIN:])
    j = max((r for r in table["latents"] if r["class"] == "shared"), key=lambda r: r["freq"])["latent"]
    with torch.no_grad():
        cc.W_dec[j, 0].zero_()
    table = latent_table(cc, pair[N_TRAIN:])
    row = table["latents"][j]
    assert row["class"] == "other_only" and row["rel_norm"] == 1.0
    assert row["nu_error"] > 0.7 and not row["scaling_ok"]
    assert top_exclusive(table, 5) == [] and top_exclusive(table, 5, require_scaling=False)[0]["latent"] == j


def test_classify_thresholds_and_dead():
    crit = ExclusivityCriterion()
    rel = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.75, 0.9, 1.0, 1.0], dtype=torch.float64)  # as relative_norms gives
    freq = torch.tensor([0.1] * 7 + [0.0])
    assert classify(rel, freq, crit) == ["base_only", "base_only", "between", "shared", "between", "other_only",
                                         "other_only", "dead"]
    with pytest.raises(ValueError, match="ExclusivityCriterion"):
        ExclusivityCriterion(base_only_max=0.5)


def test_save_load_roundtrip_and_errors(tmp_path):
    x, _ = sparse_data(2048 + 512)
    pair = torch.stack([x, 1.5 * x], 1)
    spec = _spec(steps=50)
    cc, _ = train_crosscoder(pair[:2048], spec)
    path = save_crosscoder(cc, tmp_path / "cc", spec, models=("base", "policy"), metrics={"fvu": [0.1, 0.2]})
    record = json.loads((path / "crosscoder.json").read_text())
    assert record["format"] == "mechrl-crosscoder/1" and record["models"] == ["base", "policy"]
    loaded, rec = load_crosscoder(path)
    assert rec["spec"]["site"] == "synthetic" and float(loaded.threshold) == float(cc.threshold) >= 0
    torch.testing.assert_close(loaded.encode(pair[2048:]), cc.encode(pair[2048:]))
    torch.testing.assert_close(loaded(pair[2048:]), cc(pair[2048:]))
    with pytest.raises(FileNotFoundError, match="crosscoder"):
        load_crosscoder(tmp_path)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_crosscoder(pair[:10], spec)
    with pytest.raises(ValueError, match="NaN"):
        train_crosscoder(torch.full((512, 2, 32), float("nan")), _spec(batch_size=256))
    with pytest.raises(AssertionError, match="crosscoder input"):
        cc.encode(torch.zeros(3, 2, 31))
    with pytest.raises(IndexError, match="latent indices"):
        latent_scaling(cc, pair[:10], [64])
    with pytest.raises(RuntimeError, match="threshold"):
        Crosscoder(2, 4, 8, k=2).encode(torch.zeros(1, 2, 4))


def test_paired_activations_rows_align(cards_tok):
    from mechrl.config import TinyModelConfig
    from mechrl.models.loading import build_tiny_model

    a = build_tiny_model(TinyModelConfig(arch="llama", n_layer=2, d_model=32, n_head=4), cards_tok, seed=0)
    b = build_tiny_model(TinyModelConfig(arch="llama", n_layer=2, d_model=32, n_head=4), cards_tok, seed=1)
    texts = ["RED 3 BLUE 5", "GREEN 8 = 8 ; RED 1"]
    out = paired_activations([a, b], cards_tok, texts, "resid_post.1")
    n_tok = sum(len(cards_tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert out["x"].shape == (n_tok, 2, 32)
    assert out["input_ids"].tolist() == [i for t in texts for i in cards_tok(t, add_special_tokens=False)["input_ids"]]
    assert not torch.equal(out["x"][:, 0], out["x"][:, 1])
