"""Head and MLP ablation on tiny GPT-2 and Llama models: ablations equal hand computations, mean
ablation from one reference prompt equals patching from it, dead components have zero importance,
the only live head is the most important, Jaccard and top-k on hand examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechrl.analysis.ablation import (
    ablation_hooks, ablation_importance, compare_top_k, components, encode_examples, importance_by_split, jaccard,
    layer_profile, parse_component, reference_means, teacher_forced_scores, top_k,
)
from mechrl.analysis.cache import prepare_batch, run_with_cache
from mechrl.analysis.hooks import hooks

H = 4  # heads of the conftest tiny model


def o_proj(model, layer):
    """The attention output projection of `layer` as a (B, T, D) -> (B, T, D) function and its per-head
    input columns as a weight view (so tests can zero a head's output)."""
    if model.config.model_type == "gpt2":
        m = model.transformer.h[layer].attn.c_proj  # Conv1D: weight (in, out)
        return m, lambda h, dh: m.weight[h * dh:(h + 1) * dh, :]
    m = model.model.layers[layer].self_attn.o_proj  # Linear: weight (out, in)
    return m, lambda h, dh: m.weight[:, h * dh:(h + 1) * dh]


def mlp_out_weights(model, layer):
    if model.config.model_type == "gpt2":
        return [model.transformer.h[layer].mlp.c_proj.weight, model.transformer.h[layer].mlp.c_proj.bias]
    return [model.model.layers[layer].mlp.down_proj.weight]


@pytest.fixture(scope="module")
def examples(cards_task):
    return [dict(r) for r in cards_task.datasets["test"].select(range(8))]


def test_component_names(tiny_model):
    names = components(tiny_model)
    assert names[:H + 1] == ["L0H0", "L0H1", "L0H2", "L0H3", "L0MLP"] and len(names) == 2 * (H + 1)
    assert parse_component("L1H3", tiny_model) == ("heads.1", 1, 3)
    assert parse_component("L0MLP") == ("mlp_out.0", 0, None)
    for bad in ("L2H0", "L0H4"):
        with pytest.raises(ValueError, match="outside the model"):
            parse_component(bad, tiny_model)
    with pytest.raises(ValueError, match="bad component name"):
        parse_component("layer0.head1")


def test_zero_head_ablation_equals_hand_computation(tiny_model, cards_tok, examples):
    model = tiny_model.eval()
    enc = encode_examples(cards_tok, examples[:3])
    batch = prepare_batch(enc)
    B, T = enc["input_ids"].shape
    _, clean = run_with_cache(model, batch, ["heads.1"])
    heads = clean["heads.1"].clone()  # (B, T, H, d_head)
    heads[:, :, 2] = 0
    proj, _ = o_proj(model, 1)
    with torch.no_grad():
        by_hand = proj(heads.reshape(B, T, -1))  # the attention output with head 2 silenced
    fns = ablation_hooks(model, ["L1H2"], "zero", enc["attention_mask"])
    with hooks(model, fns):
        _, abl = run_with_cache(model, batch, ["attn_out.1"])
    torch.testing.assert_close(abl["attn_out.1"], by_hand)
    # and the whole forward pass with that attention output equals the ablated forward pass
    with torch.no_grad(), hooks(model, fns):
        logits_abl = model(**batch).logits
    with torch.no_grad(), hooks(model, {"attn_out.1": lambda x: by_hand}):
        logits_hand = model(**batch).logits
    torch.testing.assert_close(logits_abl, logits_hand)
    # zero-ablating an MLP zeroes mlp_out
    with hooks(model, ablation_hooks(model, ["L0MLP"], "zero", enc["attention_mask"])):
        _, abl = run_with_cache(model, batch, ["mlp_out.0"])
    assert torch.equal(abl["mlp_out.0"], torch.zeros_like(abl["mlp_out.0"]))


def test_mean_ablation_from_one_prompt_equals_patching_from_it(tiny_model, cards_tok, examples):
    model = tiny_model.eval()
    p, q = examples[0]["prompt"], examples[1]["prompt"]
    ids_p = cards_tok(p, add_special_tokens=False, return_tensors="pt")
    ids_q = cards_tok(q, add_special_tokens=False, return_tensors="pt")
    n = min(ids_p["input_ids"].shape[1], ids_q["input_ids"].shape[1])
    q_batch = prepare_batch({"input_ids": ids_q["input_ids"][:, :n]})
    _, ref = run_with_cache(model, ids_p, ["heads.0", "mlp_out.1"])
    means = reference_means(model, cards_tok, [p], ["heads.0", "mlp_out.1"], per_position=True)
    torch.testing.assert_close(means["heads.0"], ref["heads.0"][0])  # (P, H, d_head): one prompt = itself

    def patch(x):
        x = x.clone()
        x[:, :, 1] = ref["heads.0"][:, :n, 1]
        return x

    for comps, fns in ((["L0H1"], {"heads.0": patch}), (["L1MLP"], {"mlp_out.1": lambda x: ref["mlp_out.1"][:, :n]})):
        with torch.no_grad(), hooks(model, ablation_hooks(model, comps, "mean_pos", q_batch["attention_mask"], means)):
            ablated = model(**q_batch).logits
        with torch.no_grad(), hooks(model, fns):
            patched = model(**q_batch).logits
        torch.testing.assert_close(ablated, patched)
    # position-free means average over the prompt's tokens
    flat = reference_means(model, cards_tok, [p], ["heads.0"], per_position=False)
    torch.testing.assert_close(flat["heads.0"], ref["heads.0"][0].mean(0))
    # a position the reference never reaches raises instead of inventing a value
    long_batch = prepare_batch(cards_tok([p + " RED 3 RED 4"], add_special_tokens=False, return_tensors="pt"))
    with pytest.raises(ValueError, match="only reaches position"):
        with torch.no_grad(), hooks(model, ablation_hooks(model, ["L0H1"], "mean_pos", long_batch["attention_mask"], means)):
            model(**long_batch)


def test_ablating_nothing_changes_nothing(tiny_model, cards_tok, examples):
    model = tiny_model.eval()
    assert ablation_hooks(model, [], "zero", torch.ones(1, 3, dtype=torch.long)) == {}
    # mean ablation whose reference is the evaluated text itself replaces each value by itself
    ex = examples[:1]
    text = ex[0]["prompt"] + ex[0]["completion"]
    assert cards_tok(text, add_special_tokens=False)["input_ids"] == encode_examples(cards_tok, ex, add_eos=False)["input_ids"][0].tolist()
    res = ablation_importance(model, cards_tok, ex, mode="mean_pos", reference=[text], add_eos=False,
                              names=["L0H0", "L1H3", "L1MLP"])
    for c in ("L0H0", "L1H3", "L1MLP"):
        assert res["ablated"][c] == pytest.approx(res["base"], abs=1e-5)
    assert np.isnan(res["heads"][0, 1]) and not np.isnan(res["heads"][1, 3])
    base = teacher_forced_scores(model, cards_tok, ex, add_eos=False)
    np.testing.assert_allclose(base["logprob"], res["base"]["logprob"], rtol=1e-6)


def test_dead_components_have_zero_importance(tiny_model, cards_tok, examples):
    model = tiny_model.eval()
    dh = model.config.hidden_size // H
    with torch.no_grad():
        o_proj(model, 0)[1](1, dh).zero_()  # head L0H1 writes nothing
        for w in mlp_out_weights(model, 1):  # L1MLP writes nothing
            w.zero_()
    for mode, ref in (("zero", None), ("mean", [e["prompt"] for e in examples])):
        res = ablation_importance(model, cards_tok, examples, mode=mode, reference=ref, metric="logprob")
        assert res["importance"]["L0H1"] == 0.0 and res["importance"]["L1MLP"] == 0.0
        assert res["ablated"]["L0H1"] == res["base"] and res["ablated"]["L1MLP"] == res["base"]
        assert abs(res["importance"]["L0H0"]) > 0  # live heads do change the log-probability


def greedy_examples(model, tok, prompts, n_new=4):
    """Examples whose gold completion is the model's own greedy continuation (teacher-forced accuracy 1).
    Prompts whose continuation has a special token or does not re-tokenize to the same ids are left out."""
    out = []
    for p in prompts:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        new = []
        for _ in range(n_new):
            with torch.no_grad():
                new.append(int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
        completion = "".join(tok.decode([t]) for t in new)
        if not set(new) & set(tok.all_special_ids) and tok(completion, add_special_tokens=False)["input_ids"] == new:
            out.append({"prompt": p, "completion": completion})
    assert len(out) >= 2, f"only {len(out)} usable greedy continuations"
    return out


def test_the_only_live_head_is_the_most_important(tiny_model, cards_tok, examples):
    model = tiny_model.eval()
    dh = model.config.hidden_size // H
    with torch.no_grad():
        for layer in (0, 1):
            for h in range(H):
                if (layer, h) != (0, 2):
                    o_proj(model, layer)[1](h, dh).zero_()
            for w in mlp_out_weights(model, layer):
                w.zero_()
        o_proj(model, 0)[1](2, dh).mul_(100.0)  # loud enough to outweigh the token's own embedding
    gold = greedy_examples(model, cards_tok, [e["prompt"] for e in examples])
    res = ablation_importance(model, cards_tok, gold, mode="zero", add_eos=False)
    assert res["base"]["token_acc"] == 1.0, "gold completions should be the model's own argmax"
    heads = res["heads"]  # (L, H)
    assert np.unravel_index(np.argmax(heads), heads.shape) == (0, 2)
    assert heads[0, 2] > 0.2
    assert (np.delete(heads.ravel(), 2) == 0).all() and (res["mlp"] == 0).all()
    assert top_k(res, 1) == {"L0H2"}


def test_jaccard_top_k_and_profiles_by_hand():
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)
    assert np.isnan(jaccard(set(), set())) and jaccard({"a"}, set()) == 0.0 and jaccard({"x", "y"}, {"y", "x"}) == 1.0
    sft = {"importance": {"L0H0": 0.5, "L0H1": 0.1, "L0MLP": 0.3, "L1H0": 0.0, "L1H1": 0.2, "L1MLP": 0.4},
           "heads": np.array([[0.5, 0.1], [0.0, 0.2]]), "mlp": np.array([0.3, 0.4])}
    rl = {"importance": {"L0H0": 0.1, "L0H1": 0.6, "L0MLP": 0.3, "L1H0": 0.0, "L1H1": 0.2, "L1MLP": 0.5}}
    assert top_k(sft, 2) == {"L0H0", "L1MLP"} and top_k(rl, 2) == {"L0H1", "L1MLP"}
    assert top_k({"importance": {"b": 1.0, "a": 1.0, "c": 0.0}}, 1) == {"a", "b"}  # a tie is kept whole
    assert top_k({"importance": {"b": 1.0, "a": 0.0, "c": 0.0}}, 3) == {"b"}  # zero importance is no importance
    assert top_k(sft, 6) == {"L0H0", "L0H1", "L0MLP", "L1H1", "L1MLP"}  # L1H0 (0.0) left out
    cmp = compare_top_k({"test": sft, "ood": sft}, {"test": rl}, ks=(1, 2, 3, 7))
    assert cmp == {"test": {1: 0.0, 2: pytest.approx(1 / 3), 3: pytest.approx(2 / 4)}}
    prof = layer_profile(sft, "sum")
    np.testing.assert_allclose(prof["heads"], [0.6, 0.2])
    np.testing.assert_allclose(prof["all"], [0.9, 0.6])
    np.testing.assert_allclose(layer_profile(sft, "max")["all"], [0.5, 0.4])
    with pytest.raises(ValueError, match="k=9"):
        top_k(sft, 9)


def test_importance_by_split_same_model_overlaps_fully(tiny_model, cards_tok, cards_task):
    model = tiny_model.eval()
    splits = {s: [dict(r) for r in cards_task.datasets[s].select(range(3))] for s in ("test", "ood_colors")}
    a = importance_by_split(model, cards_tok, splits, metric="logprob", names=["L0H0", "L0H1", "L1MLP"])
    assert set(a) == {"test", "ood_colors"} and a["test"]["n_examples"] == 3
    assert a["test"]["importance"] != a["ood_colors"]["importance"]
    assert compare_top_k(a, a, ks=(1, 2)) == {"test": {1: 1.0, 2: 1.0}, "ood_colors": {1: 1.0, 2: 1.0}}


def test_plots_are_labelled_pngs(tmp_path):
    from mechrl.analysis.plots import head_heatmap, importance_heatmap, jaccard_bar, patching_heatmap, save_png

    resid = np.array([[0.0, np.nan, 0.2, 1.0], [0.0, 0.1, -0.3, 1.0]])
    patch_res = {"resid": {"scores": resid}, "positions": [-4, -3, -2, -1], "metric": "logit_diff",
                 "method": "exact", "kept": [0, 1, 2]}
    imp = {"heads": np.array([[0.5, 0.1], [0.0, np.nan]]), "mlp": np.array([0.3, 0.4]), "metric": "token_acc",
           "mode": "zero", "n_examples": 8}
    figs = {"resid": patching_heatmap(patch_res), "heads": head_heatmap(imp["heads"], title="heads", label="score"),
            "importance": importance_heatmap(imp), "jaccard": jaccard_bar({"test": {1: 0.0, 3: 0.5}, "ood": {1: 1.0}})}
    for name, fig in figs.items():
        main = fig.axes[0]
        assert main.get_xlabel() and main.get_ylabel() and main.get_title(), name
        if name != "jaccard":
            assert len(fig.axes) == 2 and fig.axes[1].get_ylabel(), f"{name}: colorbar with a label"
        path = save_png(fig, tmp_path / "figs" / f"{name}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "3 pairs" in figs["resid"].axes[0].get_title()
    assert [t.get_text() for t in figs["importance"].axes[0].get_xticklabels()] == ["0", "1", "MLP"]
    with pytest.raises(ValueError, match="nothing to plot"):
        jaccard_bar({})


def mlp_down(model, layer):
    """The MLP's output projection of `layer` (input: the neurons, (B, T, d_mlp))."""
    if model.config.model_type == "gpt2":
        return model.transformer.h[layer].mlp.c_proj
    return model.model.layers[layer].mlp.down_proj


def test_neuron_names_and_site(tiny_model, cards_tok, examples):
    from mechrl.analysis.ablation import mlp_width, neurons

    d_mlp = mlp_width(tiny_model)
    assert d_mlp == mlp_down(tiny_model, 0).weight.shape[1 if tiny_model.config.model_type != "gpt2" else 0]
    assert parse_component("L1N5", tiny_model) == ("mlp_post.1", 1, 5)
    with pytest.raises(ValueError, match="outside the model"):
        parse_component(f"L0N{d_mlp}", tiny_model)
    assert neurons(tiny_model, layers=[1])[:2] == ["L1N0", "L1N1"] and len(neurons(tiny_model)) == 2 * d_mlp
    assert len(components(tiny_model, neurons=True)) == 2 * (H + 1 + d_mlp)
    # the site is the input of the MLP's output projection: projecting it gives mlp_out
    model = tiny_model.eval()
    batch = prepare_batch(encode_examples(cards_tok, examples[:3]))
    _, cache = run_with_cache(model, batch, ["mlp_post.0", "mlp_out.0"])
    assert cache["mlp_post.0"].shape[-1] == d_mlp
    with torch.no_grad():
        torch.testing.assert_close(mlp_down(model, 0)(cache["mlp_post.0"]), cache["mlp_out.0"])


def test_zero_neuron_ablation_equals_hand_computation(tiny_model, cards_tok, examples):
    model = tiny_model.eval()
    enc = encode_examples(cards_tok, examples[:3])
    batch = prepare_batch(enc)
    _, clean = run_with_cache(model, batch, ["mlp_post.1"])
    h = clean["mlp_post.1"].clone()  # (B, T, d_mlp)
    h[:, :, [3, 7]] = 0
    with torch.no_grad():
        by_hand = mlp_down(model, 1)(h)  # the MLP output with neurons 3 and 7 silenced
    with hooks(model, ablation_hooks(model, ["L1N3", "L1N7"], "zero", enc["attention_mask"])):
        _, abl = run_with_cache(model, batch, ["mlp_out.1"])
    torch.testing.assert_close(abl["mlp_out.1"], by_hand)


def test_dead_neuron_has_zero_importance_and_arrays_hold_neurons(tiny_model, cards_tok, examples):
    import copy

    model = copy.deepcopy(tiny_model).eval()
    down = mlp_down(model, 0)
    with torch.no_grad():  # neuron 2's outgoing weights are zero: ablating it cannot change anything
        if model.config.model_type == "gpt2":
            down.weight[2, :] = 0  # Conv1D: weight (in, out)
        else:
            down.weight[:, 2] = 0  # Linear: weight (out, in)
    res = ablation_importance(model, cards_tok, examples[:4], names=["L0N2", "L0N5", "L1MLP"])
    assert res["importance"]["L0N2"] == 0.0
    assert res["neurons"].shape == (2, res["neurons"].shape[1])
    assert res["neurons"][0, 2] == 0.0 and res["neurons"][0, 5] == res["importance"]["L0N5"]
    assert np.isnan(res["neurons"][1]).all() and res["mlp"][1] == res["importance"]["L1MLP"]
    assert "neurons" not in ablation_importance(model, cards_tok, examples[:2], names=["L0MLP"])
