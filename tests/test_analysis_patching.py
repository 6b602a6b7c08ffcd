"""Activation and attribution patching on tiny GPT-2 and Llama models with card-game pairs.

Exact patching is checked against invariants that hold for any causal model (patching the last block
at the last position restores the clean metric; positions before the first differing token carry
nothing; the embedding at an unchanged token carries nothing) and against a single hand-written hook.
Attribution patching must equal exact patching where the metric is linear in the activation (the
final norm's output: logit_diff = (W_clean - W_corrupt) . x) and correlate with it elsewhere
(threshold: Pearson r > 0.8 on per-pair resid, head and MLP effects).
"""

from __future__ import annotations

import json

import numpy as np
from scipy.stats import spearmanr
import pytest
import torch

from mechrl.studies.card_pairs import ood_pairs, rule_pairs
from mechrl.analysis.cache import prepare_batch, run_with_cache
from mechrl.analysis.hooks import hooks
from mechrl.analysis.patching import (
    PromptPair, activation_patching, answer_metric, attribute_sites, attribution_patching, baseline_metrics,
    keep_pairs, patch_site, to_jsonable, tokenize_pairs,
)

N_PAIRS = 4


@pytest.fixture(scope="module")
def pairs(small_cards_cfg, cards_tok):
    return rule_pairs(small_cards_cfg, cards_tok, N_PAIRS, seed=1)


@pytest.fixture
def pb(pairs, cards_tok):
    return tokenize_pairs(pairs[0], cards_tok)


def final_norm(model) -> str:
    return "transformer.ln_f" if model.config.model_type == "gpt2" else "model.norm"


def test_rule_pairs_align_and_differ(pairs, cards_tok, small_cards_cfg):
    ps, counts = pairs
    assert counts["kept"] == N_PAIRS and counts["drawn"] >= N_PAIRS
    assert "skipped_no_other_rule" in counts  # parity rules have no in-family alternative
    pb = tokenize_pairs(ps, cards_tok)
    assert pb.n == N_PAIRS
    for i, p in enumerate(ps):
        assert p.meta["clean"]["answer"] != p.meta["corrupt"]["answer"]
        assert p.meta["clean"]["cards"] == p.meta["corrupt"]["cards"]
        assert p.meta["clean"]["rule"]["family"] == p.meta["corrupt"]["rule"]["family"]
        assert p.meta["clean"]["rule"] != p.meta["corrupt"]["rule"]
        # equal lengths: both sides have the same real positions, and only rule words differ
        assert torch.equal(pb.clean["attention_mask"][i], pb.corrupt["attention_mask"][i])
        diff_words = {cards_tok.decode([int(t)]).strip() for t in pb.corrupt["input_ids"][i][pb.differs[i]]}
        assert diff_words and diff_words <= set(small_cards_cfg.id_colors) | {str(k) for k in small_cards_cfg.thresholds}
        # the teacher-forced prefix is the completions' shared part, then the two tokens differ
        n_prompt = len(cards_tok(p.clean_prompt, add_special_tokens=False)["input_ids"])
        prefix = pb.clean["input_ids"][i][pb.clean["attention_mask"][i].bool()][n_prompt:].tolist()
        cc = cards_tok(p.clean_completion, add_special_tokens=False)["input_ids"]
        ck = cards_tok(p.corrupt_completion, add_special_tokens=False)["input_ids"]
        assert cc[:len(prefix)] == ck[:len(prefix)] == prefix
        assert int(pb.clean_token[i]) == cc[len(prefix)] != ck[len(prefix)] == int(pb.corrupt_token[i])


def test_hand_built_pair_matches_a_hand_written_hook(tiny_model, cards_tok):
    model = tiny_model.eval()
    rule = "Rule: the score is the sum of {} cards minus the sum of {} cards .\nCards: RED 3 , BLUE 5 .\nAnswer:"
    pair = PromptPair(rule.format("RED", "BLUE"), rule.format("BLUE", "RED"), " RED 3 = 3 ; BLUE 5 = 5 ; 3 - 5 = -2",
                      " BLUE 5 = 5 ; RED 3 = 3 ; 5 - 3 = 2")
    pb = tokenize_pairs([pair], cards_tok)
    assert pb.differs.sum() == 2  # the two colour words
    ids = cards_tok
    assert pb.clean_token.tolist() == ids(" RED", add_special_tokens=False)["input_ids"]
    assert pb.corrupt_token.tolist() == ids(" BLUE", add_special_tokens=False)["input_ids"]
    _, clean = run_with_cache(model, pb.clean, ["resid_post.0"])
    got = patch_site(model, pb, "resid_post.0", "position")  # (1, T)
    first = int(pb.differs[0].nonzero()[0])
    for t in (first, first + 1, pb.length - 1):
        def put(x, t=t):
            x = x.clone()
            x[:, t] = clean["resid_post.0"][:, t]
            return x
        with torch.no_grad(), hooks(model, {"resid_post.0": put}):
            logits = model(**prepare_batch(pb.corrupt)).logits
        by_hand = logits[0, -1, pb.clean_token[0]] - logits[0, -1, pb.corrupt_token[0]]
        torch.testing.assert_close(got[0, t], by_hand.float(), rtol=1e-5, atol=1e-5)


def test_patching_invariants(tiny_model, pb):
    model = tiny_model.eval()
    L = model.config.num_hidden_layers
    clean_m, corr_m = baseline_metrics(model, pb)
    res = activation_patching(model, pb, min_gap=0.0)
    assert res["n_dropped"] == 0 and res["method"] == "exact"
    torch.testing.assert_close(torch.tensor(res["clean"]), clean_m)
    resid = res["resid"]["per_pair"]  # (N, L, T)
    assert resid.shape == (N_PAIRS, L, pb.length) and res["heads"]["per_pair"].shape == (N_PAIRS, L, 4)
    assert res["mlp"]["per_pair"].shape == (N_PAIRS, L)
    # the last block's output at the last position decides the metric: full recovery ...
    np.testing.assert_allclose(resid[:, L - 1, -1], 1.0, atol=1e-4)
    # ... and at every other position it cannot reach the last position's logits at all
    np.testing.assert_array_equal(np.nan_to_num(resid[:, L - 1, :-1]), 0.0)
    # patching every position of the last block's output restores the clean metric exactly
    full = patch_site(model, pb, f"resid_post.{L - 1}", "all")[:, 0]
    torch.testing.assert_close(full, clean_m, rtol=1e-5, atol=1e-5)
    # causal order: before the first differing token the two runs are identical, so patching does nothing
    for i in range(N_PAIRS):
        first = int(pb.differs[i].nonzero()[0])
        real = pb.aligned[i].nonzero()[:, 0]
        before = [int(t) for t in real if t < first]
        assert before, "the pair should share an opening"
        np.testing.assert_array_equal(resid[i][:, before], 0.0)
        assert np.isnan(resid[i][:, ~pb.aligned[i].numpy()]).all()  # padding is never patched
    # the embedding layer (resid_pre.0) at an unchanged token carries nothing, whatever comes after
    emb = patch_site(model, pb, "resid_pre.0", "position") - corr_m[:, None]  # (N, T)
    same = pb.aligned & ~pb.differs
    assert torch.equal(emb[same], torch.zeros_like(emb[same]))
    assert (emb[pb.differs].abs() > 0).all()
    # patching nothing (the corrupted run's own activations) gives 0
    _, corr_cache = run_with_cache(model, pb.corrupt, ["heads.0"])
    none = patch_site(model, pb, "heads.0", "head", clean_act=corr_cache["heads.0"])
    torch.testing.assert_close(none, corr_m[:, None].expand_as(none), rtol=0, atol=0)


def test_small_gaps_are_dropped_and_counted(tiny_model, pb):
    model = tiny_model.train()  # patching runs in eval mode and gives the training mode back
    clean_m, corr_m = baseline_metrics(model, pb)
    gaps = (clean_m - corr_m).abs().sort().values
    cut = float((gaps[1] + gaps[2]) / 2)  # drops exactly two pairs
    res = activation_patching(model, pb, what=("mlp",), min_gap=cut)
    assert model.training
    torch.testing.assert_close(baseline_metrics(model.eval(), pb)[0], clean_m)
    assert res["n_dropped"] == 2 and res["n_pairs"] == N_PAIRS and len(res["kept"]) == 2
    assert res["mlp"]["per_pair"].shape == (2, model.config.num_hidden_layers) and "resid" not in res
    with pytest.raises(ValueError, match="every one of the 4 pairs"):
        keep_pairs(clean_m, corr_m, float(gaps[-1]) + 1.0)
    with pytest.raises(ValueError, match="unknown patch groupings"):
        attribute_sites(model, pb, {"mlp_out.0": "layer"})
    with pytest.raises(ValueError, match="unknown patching kinds"):
        activation_patching(model, pb, what=("attn",))
    with pytest.raises(ValueError, match="logit_diff needs different"):
        answer_metric(torch.zeros(2, 3, 5), torch.tensor([1, 2]), torch.tensor([1, 3]), "logit_diff")


def test_attribution_equals_exact_where_the_metric_is_linear(tiny_model, pb):
    model = tiny_model.eval()
    site = final_norm(model)  # its output meets only the (bias-free) unembedding
    _, corr_m = baseline_metrics(model, pb)
    exact = patch_site(model, pb, site, "position") - corr_m[:, None]  # (N, T)
    approx = attribute_sites(model, pb, {site: "position"})[site]
    real = pb.aligned
    torch.testing.assert_close(approx[real], exact[real], rtol=1e-4, atol=1e-5)
    assert (exact[:, -1].abs() > 1e-4).all()  # the equality is not 0 == 0


def test_attribution_correlates_with_exact(tiny_model, pb):
    model = tiny_model.eval()
    ex = activation_patching(model, pb, min_gap=0.0)
    at = attribution_patching(model, pb, min_gap=0.0)
    assert at["method"] == "attribution" and at["kept"] == ex["kept"]
    for kind in ("resid", "heads", "mlp"):
        a, b = ex[kind]["per_pair"].ravel(), at[kind]["per_pair"].ravel()
        assert np.array_equal(np.isnan(a), np.isnan(b)), kind
        ok = ~np.isnan(a)
        r = np.corrcoef(a[ok], b[ok])[0, 1]
        assert r > 0.8, f"{kind}: attribution vs exact Pearson r = {r:.3f}"
        # the ranking of components (mean effect over pairs) agrees too
        ea, eb = np.nanmean(ex[kind]["per_pair"], 0).ravel(), np.nanmean(at[kind]["per_pair"], 0).ravel()
        keep = ~np.isnan(ea)
        rho = spearmanr(ea[keep], eb[keep]).statistic
        assert rho >= 0.8, f"{kind}: attribution vs exact Spearman rho over components = {rho:.3f}"


def test_ood_pairs_and_end_alignment(tiny_model, cards_tok, small_cards_cfg):
    model = tiny_model.eval()
    colours, counts = ood_pairs(small_cards_cfg, cards_tok, 3, "ood_colors", families=["color_sum_diff"])
    assert counts["kept"] == 3
    for p in colours:
        assert p.meta["clean"]["answer"] == p.meta["corrupt"]["answer"]
        assert not set(p.corrupt_prompt.split()) & set(small_cards_cfg.id_colors)
    pbc = tokenize_pairs(colours, cards_tok)
    assert torch.equal(pbc.clean["attention_mask"], pbc.corrupt["attention_mask"])
    assert not torch.equal(pbc.clean_token, pbc.corrupt_token)  # worked answers name the colours
    res = activation_patching(model, pbc, what=("mlp",), min_gap=0.0)
    L = model.config.num_hidden_layers
    per = res["mlp"]["per_pair"]  # (N, L)
    assert per.shape == (3, L) and np.isfinite(per).all() and "resid" not in res
    # the reported score is the gap-weighted mean of the per-pair scores, and the median is beside it
    gap = np.asarray(res["clean"]) - np.asarray(res["corrupt"])
    np.testing.assert_allclose(res["mlp"]["scores"], (per * np.abs(gap)[:, None]).sum(0) / np.abs(gap).sum(), rtol=1e-9)
    np.testing.assert_allclose(res["mlp"]["median"], np.median(per, 0))
    assert res["aggregate"].startswith("gap-weighted mean")

    para, _ = ood_pairs(small_cards_cfg, cards_tok, 3, "ood_paraphrase")
    pbp = tokenize_pairs(para, cards_tok)
    assert torch.equal(pbp.clean_token, pbp.corrupt_token)  # same gold completion
    lens_c, lens_k = pbp.clean["attention_mask"].sum(1), pbp.corrupt["attention_mask"].sum(1)
    assert (lens_c != lens_k).any(), "paraphrases should exercise end alignment"
    assert torch.equal(pbp.aligned.sum(1), torch.minimum(lens_c, lens_k))
    with pytest.raises(ValueError, match="logprob"):
        activation_patching(model, pbp)
    res = activation_patching(model, pbp, what=("resid",), metric="logprob", min_gap=0.0)
    L = model.config.num_hidden_layers
    np.testing.assert_allclose(res["resid"]["per_pair"][:, L - 1, -1], 1.0, atol=1e-4)
    assert np.isnan(res["resid"]["per_pair"][~np.broadcast_to(pbp.aligned.numpy()[:, None], res["resid"]["per_pair"].shape)]).all()
    text = json.dumps(to_jsonable(res))  # NaN -> null, arrays -> lists
    assert "NaN" not in text and json.loads(text)["resid"]["scores"][0][0] is None
