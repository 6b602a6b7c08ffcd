"""SAEs on mechrl activations: SAELens training, metrics, splicing, save/load, feature statistics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mechrl.analysis.cache import extract_activations
from mechrl.analysis.sae import (
    SAESpec, activation_batches, completion_batch, completion_loss, fit_card_sae, load_sae, reconstruction_stats,
    sae_metrics, save_sae, splice_loss, task_texts, train_sae,
)
from mechrl.analysis.sae_features import (
    CLASSES, IdOodCriterion, card_feature_table, card_groups, classify_id_ood, feature_table, group_stats,
    plot_feature_table, save_feature_table,
)
from mechrl.analysis.store import ActivationWriter


@pytest.fixture(autouse=True)
def _one_thread():
    """SAE steps are tiny matmuls: one intra-op thread is faster than two fighting over a loaded CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sparse_data(n: int, d: int = 32, m: int = 48, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (n, d), atoms (m, d)): rows are exact k-sparse combinations of m unit-norm atoms (coefficients in
    [0.5, 1.5])."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(m, d, generator=g)
    atoms = atoms / atoms.norm(dim=-1, keepdim=True)  # (m, d)
    idx = torch.rand(n, m, generator=g).argsort(-1)[:, :k]  # (n, k) distinct atoms per row
    coef = torch.zeros(n, m).scatter_(1, idx, torch.rand(n, k, generator=g) + 0.5)
    return coef @ atoms, atoms


def identity_sae(d: int, scale: float = 1.0):
    """A real SAELens StandardSAE computing scale * x exactly: latents relu(x), relu(-x); decoder [I; -I]."""
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=2 * d, apply_b_dec_to_input=False))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))  # (d, 2d)
        sae.W_dec.copy_(torch.cat([eye, -eye], 0) * scale)  # (2d, d)
        sae.b_enc.zero_(), sae.b_dec.zero_()
    return sae.eval()


# ------------------------------------------------------------------------------------ training

def test_topk_recovers_a_known_sparse_dictionary():
    """3-sparse rows over 48 atoms in 32 dims: a TopK SAE (k=3, 64 latents) reconstructs held-out rows with
    FVU < 0.08 and L0 = k, and >= 90% of the true atoms have a decoder row at cosine > 0.9."""
    data, atoms = sparse_data(8192 + 2048)
    train, held = data[:8192], data[8192:]  # one dictionary; the last 2048 rows are held out
    spec = SAESpec(site="synthetic", architecture="topk", d_sae=64, k=3, lr=1e-2, steps=600, batch_size=256,
                   dead_feature_window=50)
    sae = train_sae(train, spec)
    m = sae_metrics(sae, held)
    assert m["l0"] == pytest.approx(3.0, abs=1e-6)  # TopK: exactly k active latents per row
    assert m["fvu"] < 0.08, m
    assert m["n_rows"] == 2048 and m["d_sae"] == 64
    dec = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)  # (64, 32)
    best_cos = (atoms @ dec.T).max(-1).values  # (48,) each atom's closest decoder direction
    assert (best_cos > 0.9).float().mean() >= 0.9, best_cos


def test_standard_sae_trains_and_l1_buys_sparsity():
    """The L1 SAE learns (FVU well below 1) and a larger L1 coefficient gives fewer active latents."""
    data, _ = sparse_data(4096 + 1024)
    train, held = data[:4096], data[4096:]
    base = dict(site="synthetic", architecture="standard", d_sae=64, lr=4e-3, steps=300, batch_size=256)
    weak = sae_metrics(train_sae(train, SAESpec(l1_coefficient=1e-3, **base)), held)
    strong = sae_metrics(train_sae(train, SAESpec(l1_coefficient=3e-1, **base)), held)
    assert weak["fvu"] < 0.3, weak
    assert strong["l0"] < weak["l0"], (weak, strong)


def test_input_normalisation_is_folded_into_the_saved_weights(tmp_path):
    """normalize="expected_average_only_in" trains on rescaled inputs; the trained (and saved) SAE still takes
    raw activations: FVU on raw rows 50x larger than unit scale stays low, before and after a round trip."""
    data, _ = sparse_data(4096 + 1024)
    data = data * 50.0
    spec = SAESpec(site="synthetic", architecture="topk", d_sae=64, k=3, lr=1e-2, steps=300, batch_size=256,
                   dead_feature_window=50, normalize="expected_average_only_in")
    sae = train_sae(data[:4096], spec)
    m = sae_metrics(sae, data[4096:])
    assert m["fvu"] < 0.2, m
    loaded, _ = load_sae(save_sae(sae, tmp_path / "sae", spec, m))
    assert sae_metrics(loaded, data[4096:])["fvu"] == pytest.approx(m["fvu"], rel=1e-5)


def test_activation_batches_cover_every_row_each_epoch(tmp_path):
    x = torch.arange(40, dtype=torch.float32)[:, None].expand(40, 3).contiguous()  # row i is (i, i, i)
    it = activation_batches(x, 8, seed=1)
    epoch = torch.cat([next(it) for _ in range(5)])
    assert sorted(epoch[:, 0].tolist()) == list(range(40))
    assert not torch.equal(epoch[:, 0], torch.arange(40.0))  # shuffled
    w = ActivationWriter(tmp_path / "acts", shard_rows=15)  # shards of 15 do not align with batches of 8
    w.add({"s": x[:25]}), w.add({"s": x[25:]})
    it = activation_batches(w.close(), 8, site="s", seed=1)
    epoch = torch.cat([next(it) for _ in range(5)])
    assert sorted(epoch[:, 0].tolist()) == list(range(40))
    assert next(it).shape == (8, 3)  # endless: the next epoch starts


def test_spec_validates():
    with pytest.raises(ValueError, match="architecture"):
        SAESpec(site="x", architecture="jumprelu")
    with pytest.raises(ValueError, match="k="):
        train_sae(torch.randn(64, 4), SAESpec(site="x", d_sae=4, k=5, steps=1, batch_size=8))


# ------------------------------------------------------------------------------------- metrics

def test_reconstruction_stats_by_hand():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # mean (2, 1); total variance 1+1+1+1 = 4
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 2.0]])  # squared error 1
    z = torch.tensor([[0.0, 2.0, 0.0], [1.0, 3.0, 0.0]])  # L0: 1 and 2; latent 2 never fires
    m = reconstruction_stats(x, x_hat, z)
    assert m["fvu"] == pytest.approx(0.25)
    assert m["mse"] == pytest.approx(0.25)  # 1 / 4 entries
    assert m["l0"] == pytest.approx(1.5)
    assert m["n_dead"] == 1 and m["dead_fraction"] == pytest.approx(1 / 3) and m["dead_window_rows"] == 2


def test_sae_metrics_of_identity_and_zero():
    x = torch.randn(100, 6)
    assert sae_metrics(identity_sae(6), x)["fvu"] < 1e-12
    assert sae_metrics(identity_sae(6, scale=0.0), x)["fvu"] == pytest.approx(float((x ** 2).sum() / ((x - x.mean(0)) ** 2).sum()))


# ------------------------------------------------------------------------------------ splicing

def test_completion_batch_labels_only_the_completion(cards_tok):
    b = completion_batch(cards_tok, ["RED 3", "BLUE 4 5"], [" = 3", " = 9"])
    p0 = cards_tok("RED 3", add_special_tokens=False)["input_ids"]
    c0 = cards_tok(" = 3", add_special_tokens=False)["input_ids"]
    ids, labels = b["input_ids"][0], b["labels"][0]
    n = len(p0) + len(c0) + 1
    assert ids[:n].tolist() == p0 + c0 + [cards_tok.eos_token_id]
    # position t predicts token t+1: exactly the completion tokens and EOS are scored
    assert labels[len(p0) - 1:n - 1].tolist() == c0 + [cards_tok.eos_token_id]
    assert (labels[:len(p0) - 1] == -100).all() and (labels[n - 1:] == -100).all()
    assert int((b["labels"] != -100).sum()) == len(c0) + 1 + len(cards_tok(" = 9", add_special_tokens=False)["input_ids"]) + 1


def test_completion_loss_matches_unbatched(tiny_model, cards_tok, cards_task):
    prompts, comps = task_texts(cards_task, "val", 6)
    batched, n = completion_loss(tiny_model, cards_tok, prompts, comps, batch_size=4)
    singles = [completion_loss(tiny_model, cards_tok, [p], [c]) for p, c in zip(prompts, comps)]
    assert n == sum(k for _, k in singles)
    assert batched == pytest.approx(sum(l * k for l, k in singles) / n, abs=1e-5)  # padding changes nothing


def fit_briefly(model, tok, task, steps: int = 30):
    """A few Adam steps on gold completions, so the model's loss depends on its internals (a random one barely does)."""
    prompts, comps = task_texts(task, "train", 256)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for i in range(steps):
        sl = slice(32 * (i % 8), 32 * (i % 8 + 1))
        b = completion_batch(tok, prompts[sl], comps[sl])
        labels = b.pop("labels")
        logits = model(**b).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad(), loss.backward(), opt.step()
    return model.eval()


def test_splicing_identity_changes_nothing_and_zero_changes_a_lot(tiny_model, cards_tok, cards_task):
    """An exact-identity SAE spliced in leaves the loss unchanged (< 1e-5); an all-zero SAE equals zero-ablation,
    and on the residual stream it raises the loss by > 0.05 nats (a briefly trained model depends on it)."""
    model = fit_briefly(tiny_model, cards_tok, cards_task)
    prompts, comps = task_texts(cards_task, "val", 16)
    d = model.config.hidden_size
    for site in ("resid_post.0", "resid_post.1", "mlp_out.1"):
        same = splice_loss(model, cards_tok, identity_sae(d), site, prompts, comps)
        assert abs(same["delta"]) < 1e-5, same
        zero = splice_loss(model, cards_tok, identity_sae(d, scale=0.0), site, prompts, comps)
        assert zero["spliced"] == pytest.approx(zero["zero_ablation"], abs=1e-5)  # a zero SAE is zero-ablation
        assert zero["clean"] == same["clean"] and same["n_tokens"] == zero["n_tokens"] > 16
        if site.startswith("resid"):
            assert zero["delta"] > 0.05, zero
            assert same["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
            assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-3)


# ---------------------------------------------------------------------------------- save / load

@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_save_load_round_trip(tmp_path, arch):
    from sae_lens import SAE

    data, _ = sparse_data(2048)
    spec = SAESpec(site="resid_post.1", architecture=arch, d_sae=48, k=4, l1_coefficient=0.01, steps=40, batch_size=128)
    sae = train_sae(data, spec)
    m = sae_metrics(sae, data[:256])
    path = save_sae(sae, tmp_path / "sae", spec, m)
    assert (path / "cfg.json").is_file() and (path / "sae_weights.safetensors").is_file()
    plain = SAE.load_from_disk(path)  # SAELens alone reads it
    loaded, record = load_sae(path)
    with torch.no_grad():
        z = sae.encode(data[:256])
        assert torch.equal(plain.encode(data[:256]), z)
        assert torch.equal(loaded.encode(data[:256]), z)
        assert torch.allclose(loaded.decode(z), sae.decode(z), atol=1e-6)
    assert record["spec"]["architecture"] == arch and record["metrics"]["fvu"] == m["fvu"]
    assert plain.cfg.metadata.hook_name == "resid_post.1"


# ------------------------------------------------------------------------------- feature stats

def test_classify_id_ood_on_a_hand_made_table():
    # one case per rule, boundaries included (a ratio of exactly 2 or 0.2 is inside the rule)
    crit = IdOodCriterion()
    cases = {(0.30, 0.05): "id_specific", (0.30, 0.07): "other", (0.30, 0.15): "ood_stable", (0.30, 0.14): "other",
             (0.02, 0.30): "ood_specific", (0.005, 0.004): "rare", (0.01, 0.02): "ood_stable",
             (0.04, 0.0): "other",  # 0 <= 0.2 * 0.04 but 0.04 < 0.05: not frequent enough to be ID-specific
             (0.0, 0.0): "rare", (0.10, 0.07): "ood_stable", (0.10, 0.21): "other"}
    f_id = np.array([k[0] for k in cases])
    f_ood = np.array([k[1] for k in cases])
    assert classify_id_ood(f_id, f_ood, crit).tolist() == list(cases.values())
    with pytest.raises(ValueError, match="frequencies"):
        classify_id_ood(np.array([1.5]), np.array([0.1]))


def test_card_groups_and_group_stats_by_hand():
    exs = [
        {"family": "count_above", "cards_colors": ["RED", "RED"], "cards_values": [1, 2], "n_cards": 2, "score": 0},
        {"family": "count_above", "cards_colors": ["BLUE"], "cards_values": [8], "n_cards": 1, "score": 3},
        {"family": "color_sum_diff", "cards_colors": ["RED", "BLUE"], "cards_values": [5, 9], "n_cards": 5, "score": -4},
    ]
    g = card_groups(exs)
    assert g["family=count_above"].tolist() == [True, True, False]
    assert g["has_RED"].tolist() == [True, False, True] and g["has_BLUE"].tolist() == [False, True, True]
    assert g["max_value=0-3"].tolist() == [True, False, False] and g["max_value=7-9"].tolist() == [False, True, True]
    assert g["n_cards=5-6"].tolist() == [False, False, True]
    assert g["score<0"].tolist() == [False, False, True] and "max_value=4-6" not in g
    values = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0]])  # (examples, features)
    s = group_stats(values, {"family=count_above": g["family=count_above"]})["family=count_above"]
    assert s["freq"].tolist() == [1.0, 0.5] and s["mean"].tolist() == [2.0, 1.0]
    assert s["freq_rest"].tolist() == [0.0, 1.0] and s["selectivity"].tolist() == [1.0, -0.5]


def test_feature_table_by_hand(tmp_path):
    id_vals = torch.tensor([[1.0, 1.0, 0.0]] * 10 + [[1.0, 0.0, 0.0]] * 10)  # freq_id: 1.0, 0.5, 0.0
    ood_vals = torch.tensor([[0.0, 1.0, 0.0]] * 10)  # freq_ood: 0.0, 1.0, 0.0
    groups = {"first_half": np.arange(20) < 10}
    t = feature_table({"id": id_vals, "ood": ood_vals}, groups, top=3)
    assert t["classes"]["ood"] == ["id_specific", "ood_stable", "rare"]
    assert t["class_counts"]["ood"]["id_specific"] == 1 and sum(t["class_counts"]["ood"].values()) == 3
    assert list(t["class_counts"]["ood"]) == list(CLASSES)
    assert [r["feature"] for r in t["top_by_frequency"]] == [0, 1, 2]
    top = t["top_by_selectivity"][0]
    assert top["feature"] == 1 and top["best_group"] == "first_half" and top["selectivity"] == 1.0
    save_feature_table(t, tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["criterion"]["specific_min_freq"] == 0.05
    png = plot_feature_table(t, tmp_path / "t.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "t.png").stat().st_size == len(png)


# ----------------------------------------------------------------------------------- end to end

def test_card_sae_end_to_end(tiny_model, cards_tok, cards_task, tmp_path):
    """Tiny card model: extract -> train (TopK, from a store on disk) -> metrics + splice -> save -> features."""
    spec = SAESpec(site="resid_post.1", architecture="topk", expansion=2, k=4, steps=60, batch_size=128, lr=3e-3)
    res = fit_card_sae(tiny_model, cards_tok, cards_task, spec, n_train=120, n_eval=40, store_dir=tmp_path / "acts",
                       out_dir=tmp_path / "sae")
    m, s = res["metrics"], res["splice"]
    d = tiny_model.config.hidden_size
    assert m["d_sae"] == 2 * d and m["l0"] == pytest.approx(4.0) and 0 <= m["n_dead"] <= 2 * d
    assert 0 <= m["fvu"] < 1.0, m  # better than predicting the mean
    assert all(math.isfinite(s[k]) for k in ("clean", "spliced", "zero_ablation"))
    assert s["delta"] == pytest.approx(s["spliced"] - s["clean"])
    loaded, record = load_sae(res["path"])
    assert record["metrics"]["splice"]["clean"] == s["clean"]
    # held-out activations encode identically after the round trip
    texts = [p + c for p, c in zip(*task_texts(cards_task, "val", 8))]
    x = extract_activations(tiny_model, cards_tok, texts, ["resid_post.1"], positions=None, progress=False)["resid_post.1"]
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), res["sae"].encode(x))

    table = card_feature_table(tiny_model, cards_tok, cards_task, loaded, "resid_post.1", n_examples=30, top=5)
    assert table["ood_splits"] == [s for s in cards_task.eval_splits if s != "test"]
    assert all(sum(c.values()) == 2 * d for c in table["class_counts"].values())
    assert any(g.startswith("family=") for g in table["groups"]) and len(table["top_by_frequency"]) == 5
    json.dumps(table, allow_nan=False)
    plot_feature_table(table, tmp_path / "features.png")
    # every prompt token (max over positions) is at least as active as the last one alone
    all_tok = card_feature_table(tiny_model, cards_tok, cards_task, loaded, "resid_post.1", n_examples=30,
                                 ood_splits=["ood_colors"], positions=None)
    assert all(a >= b for a, b in zip(all_tok["freq"]["test"], table["freq"]["test"]))
