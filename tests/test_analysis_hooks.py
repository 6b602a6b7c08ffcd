"""Hooks and caching on tiny GPT-2 and Llama models: caches equal manual computations, padding does
not change results, hooks never linger or stay silent, PEFT models and disk stores work."""

from __future__ import annotations

import pytest
import torch

from mechrl.analysis.cache import extract_activations, run_with_cache, select_positions
from mechrl.analysis.hooks import hooks, resolve_site, unwrap
from mechrl.analysis.store import ActivationStore
from mechrl.config import LoraConfig
from mechrl.models.adapters import add_lora

TEXTS = ["RED 3 BLUE 4", "GREEN 1", "RED 3 BLUE 4 GREEN 5 YELLOW 6 RED 7", "BLUE 9 BLUE 2 RED"]


def paths(model):
    """Per-architecture module paths the tests compute with by hand."""
    if model.config.model_type == "gpt2":
        return {"blocks": model.transformer.h, "ln2": "transformer.h.{L}.ln_2", "o": lambda L: model.transformer.h[L].attn.c_proj,
                "mlp": lambda L: model.transformer.h[L].mlp, "final": lambda x: model.transformer.ln_f(x)}
    return {"blocks": model.model.layers, "ln2": "model.layers.{L}.post_attention_layernorm",
            "o": lambda L: model.model.layers[L].self_attn.o_proj, "mlp": lambda L: model.model.layers[L].mlp,
            "final": lambda x: model.model.norm(x)}


@pytest.fixture
def batch(cards_tok):
    return cards_tok(TEXTS, return_tensors="pt", padding=True)


def test_left_padding_is_in_the_batch(batch):
    mask = batch["attention_mask"]
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all(), "fixture should be left-padded"


def test_cache_equals_manual_computation(tiny_model, batch):
    model, p = tiny_model.eval(), paths(tiny_model)
    names = [f"{a}.{L}" for a in ("resid_pre", "resid_post", "attn_out", "mlp_out", "heads") for L in (0, 1)]
    names += [p["ln2"].format(L=1), "head_out.1.2"]
    out, cache = run_with_cache(model, batch, names)
    B, T = batch["input_ids"].shape
    H = model.config.num_attention_heads if model.config.model_type == "llama" else model.config.n_head
    D = model.config.hidden_size
    assert cache["heads.1"].shape == (B, T, H, D // H)
    with torch.no_grad():
        # mlp_out is the MLP applied to its (hooked) input, the post-attention norm's output
        torch.testing.assert_close(p["mlp"](1)(cache[p["ln2"].format(L=1)]), cache["mlp_out.1"])
        for L in (0, 1):
            # head outputs through the output projection reassemble the attention output
            torch.testing.assert_close(p["o"](L)(cache[f"heads.{L}"].reshape(B, T, D)), cache[f"attn_out.{L}"])
            # the residual stream is the sum of what the block writes
            torch.testing.assert_close(cache[f"resid_pre.{L}"] + cache[f"attn_out.{L}"] + cache[f"mlp_out.{L}"],
                                       cache[f"resid_post.{L}"])
        torch.testing.assert_close(cache["resid_post.0"], cache["resid_pre.1"])
        torch.testing.assert_close(cache["head_out.1.2"], cache["heads.1"][:, :, 2])
        # the last block's output through the final norm and unembedding gives the logits
        torch.testing.assert_close(model.lm_head(p["final"](cache["resid_post.1"])), out.logits)


def test_batched_equals_one_by_one_with_left_padding(tiny_model, cards_tok, batch):
    model = tiny_model.eval()
    names = ["resid_post.0", "resid_post.1", "heads.1", "mlp_out.0"]
    out, cache = run_with_cache(model, batch, names)
    mask = batch["attention_mask"].bool()
    for i, text in enumerate(TEXTS):
        one = cards_tok([text], return_tensors="pt")
        o1, c1 = run_with_cache(model, one, names)
        assert one["input_ids"].shape[1] == mask[i].sum()
        torch.testing.assert_close(out.logits[i][mask[i]], o1.logits[0], atol=1e-5, rtol=1e-4)
        for n in names:
            torch.testing.assert_close(cache[n][i][mask[i]], c1[n][0], atol=1e-5, rtol=1e-4)
    # the last prompt token, addressed from the end, is the same whatever the padding
    last = select_positions(cache["resid_post.1"], batch["attention_mask"], [-1, 0])
    for i, text in enumerate(TEXTS):
        _, c1 = run_with_cache(model, cards_tok([text], return_tensors="pt"), ["resid_post.1"])
        torch.testing.assert_close(last[i, 0], c1["resid_post.1"][0, -1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(last[i, 1], c1["resid_post.1"][0, 0], atol=1e-5, rtol=1e-4)


def test_select_positions_same_for_left_and_right_padding(cards_tok):
    left = cards_tok(TEXTS, return_tensors="pt", padding=True)
    cards_tok.padding_side = "right"
    try:
        right = cards_tok(TEXTS, return_tensors="pt", padding=True)
    finally:
        cards_tok.padding_side = "left"
    pick = [-1, -2, 0, 1]
    a = select_positions(left["input_ids"][..., None], left["attention_mask"], pick)
    b = select_positions(right["input_ids"][..., None], right["attention_mask"], pick)
    assert torch.equal(a, b)
    with pytest.raises(IndexError, match="outside row 0.s 4 real tokens"):  # the first row has 4 tokens
        select_positions(left["input_ids"], left["attention_mask"], [-6])


def test_identity_hooks_leave_logits_bit_identical(tiny_model, batch):
    """Hooks that return their input (a copy, so a replacement really happens) at every kind of site
    change nothing: the logits are bit-identical to a run without hooks."""
    model = tiny_model.eval()
    clean, _ = run_with_cache(model, batch, [])
    sites = ["resid_pre.0", "attn_out.0", "mlp_out.1", "heads.1", "head_out.0.2", "resid_post.1"]
    with hooks(model, {s: (lambda x: x.clone()) for s in sites}) as fired:
        out, _ = run_with_cache(model, batch, [])
    assert all(fired[s] >= 1 for s in sites)
    assert torch.equal(out.logits, clean.logits)


def test_replacing_hook_ablates(tiny_model, batch):
    model = tiny_model.eval()
    with hooks(model, {"mlp_out.1": torch.zeros_like}) as fired:
        out, cache = run_with_cache(model, batch, ["resid_pre.1", "attn_out.1", "resid_post.1"])
    assert fired["mlp_out.1"] == 1
    torch.testing.assert_close(cache["resid_pre.1"] + cache["attn_out.1"], cache["resid_post.1"])
    clean, _ = run_with_cache(model, batch, [])
    assert not torch.allclose(out.logits, clean.logits)
    # zeroing one head changes exactly that head's slice of the cached head outputs
    with hooks(model, {"head_out.0.1": torch.zeros_like}):
        _, c = run_with_cache(model, batch, ["heads.0"])
    _, c0 = run_with_cache(model, batch, ["heads.0"])
    assert torch.count_nonzero(c["heads.0"][:, :, 1]) == 0
    torch.testing.assert_close(c["heads.0"][:, :, [0, 2, 3]], c0["heads.0"][:, :, [0, 2, 3]])


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_after_exception(tiny_model, batch):
    model = tiny_model.eval()
    before = _n_hooks(model)

    def boom(x):
        raise ValueError("inside hook")

    with pytest.raises(ValueError, match="inside hook"):
        with hooks(model, {"resid_post.0": boom, "heads.1": lambda x: None}):
            model(**batch)
    assert _n_hooks(model) == before
    with pytest.raises(ZeroDivisionError):
        with hooks(model, {"resid_post.0": lambda x: None}):
            1 / 0
    assert _n_hooks(model) == before


def test_unknown_name_lists_close_names(tiny_model):
    prefix = "transformer.h" if tiny_model.config.model_type == "gpt2" else "model.layers"
    with pytest.raises(KeyError, match=rf"{prefix}\.0\.mlp"):
        resolve_site(tiny_model, f"{prefix}.0.mlpp")
    with pytest.raises(KeyError, match="resid_post.1"):
        resolve_site(tiny_model, "resid_post.7")  # only 2 layers
    with pytest.raises(KeyError, match="head_out"):
        resolve_site(tiny_model, "head_out.0.4")  # only 4 heads
    before = _n_hooks(tiny_model)
    with pytest.raises(KeyError):  # a bad name among good ones installs nothing
        with hooks(tiny_model, {"resid_post.0": lambda x: None, "nope": lambda x: None}):
            pass
    assert _n_hooks(tiny_model) == before


def test_hook_that_never_fired_raises(tiny_model, cards_tok):
    with pytest.raises(RuntimeError, match=r"never fired.*resid_post\.1|resid_post\.1.*never fired"):
        with hooks(tiny_model, {"resid_post.1": lambda x: None}):
            tiny_model.get_input_embeddings()(torch.tensor([[1, 2]]))  # runs no block
    assert _n_hooks(tiny_model) == 0


def test_hook_with_wrong_shape_raises(tiny_model, batch):
    with pytest.raises(ValueError, match="mlp_out.0.*shape"):
        with hooks(tiny_model, {"mlp_out.0": lambda x: x[:, :1]}):
            tiny_model(**batch)


def test_peft_model(tiny_model, batch):
    model = tiny_model.eval()
    names = ["resid_post.1", "heads.0", "attn_out.0"]
    _, base_cache = run_with_cache(model, batch, names)
    peft = add_lora(model, LoraConfig(rank=4)).eval()
    assert unwrap(peft) is model
    with torch.no_grad():  # LoRA B starts at zero; make the adapter change the function
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    out, cache = run_with_cache(peft, batch, names + ["base_model.model." + resolve_site(model, "mlp_out.1").module_path])
    assert not torch.allclose(cache["resid_post.1"], base_cache["resid_post.1"])  # the adapter is seen
    with peft.disable_adapter():
        _, off = run_with_cache(peft, batch, names)
    for n in names:
        torch.testing.assert_close(off[n], base_cache[n])
    torch.testing.assert_close(model.lm_head(paths(model)["final"](cache["resid_post.1"])), out.logits)


@pytest.mark.parametrize("positions", [(-1, -2), None])
def test_disk_round_trip_equals_memory(tiny_model, cards_tok, tmp_path, positions):
    texts = TEXTS * 3
    names = ["resid_post.0", "heads.1"]
    mem = extract_activations(tiny_model, cards_tok, texts, names, positions=positions, batch_size=5, progress=False)
    store = extract_activations(tiny_model, cards_tok, texts, names, positions=positions, batch_size=5,
                                out_dir=tmp_path / "acts", shard_rows=7, progress=False)
    assert isinstance(store, ActivationStore)
    reopened = ActivationStore(tmp_path / "acts")
    n = len(texts) if positions is not None else int(cards_tok(texts, return_tensors="pt", padding=True)["attention_mask"].sum())
    assert len(reopened) == n and len(reopened.index["shards"]) == -(-n // 7)
    shards = list(reopened)
    assert all(len(s["resid_post.0"]) <= 7 for s in shards)
    for k, v in mem.items():
        assert torch.equal(reopened.load(k), v), k
    batches = list(reopened.iter_batches("resid_post.0", 5))  # batches cross the 7-row shard boundaries
    assert [len(b) for b in batches] == [5] * (n // 5) + ([n % 5] if n % 5 else [])
    assert torch.equal(torch.cat(batches), mem["resid_post.0"])
    if positions is not None:
        assert mem["heads.1"].shape[:3] == (len(texts), 2, 4)
        _, c = run_with_cache(tiny_model, cards_tok([texts[2]], return_tensors="pt"), ["resid_post.0"])
        torch.testing.assert_close(mem["resid_post.0"][2, 0], c["resid_post.0"][0, -1], atol=1e-5, rtol=1e-4)
    else:  # token rows: index tensors say which text and position each row is
        _, c = run_with_cache(tiny_model, cards_tok([texts[2]], return_tensors="pt"), ["resid_post.0"])
        rows = mem["_example"] == 2
        assert torch.equal(mem["_position"][rows], torch.arange(c["resid_post.0"].shape[1]))
        torch.testing.assert_close(mem["resid_post.0"][rows], c["resid_post.0"][0], atol=1e-5, rtol=1e-4)
    with pytest.raises(FileExistsError):
        extract_activations(tiny_model, cards_tok, texts, names, positions=positions, out_dir=tmp_path / "acts", progress=False)


def test_cache_with_grad_backpropagates(tiny_model, batch):
    out, cache = run_with_cache(tiny_model, batch, ["resid_post.0", "heads.1"], grad=True)
    assert cache["resid_post.0"].requires_grad
    cache["resid_post.0"].retain_grad()
    out.logits[:, -1].sum().backward()
    assert cache["resid_post.0"].grad is not None and cache["resid_post.0"].grad.abs().sum() > 0
    _, no_grad = run_with_cache(tiny_model, batch, ["resid_post.0"])
    assert not no_grad["resid_post.0"].requires_grad


def test_stop_early_caches_the_same_and_skips_later_layers(tiny_model, batch):
    """`stop_early` ends the forward after the last requested site: same cache, later layers never run."""
    names = ["resid_post.0", "heads.0"]
    full_out, full = run_with_cache(tiny_model, batch, names)
    ran = []
    last_block = unwrap(tiny_model).transformer.h[-1] if hasattr(unwrap(tiny_model), "transformer") \
        else unwrap(tiny_model).model.layers[-1]
    handles = [m.register_forward_hook(lambda *a, m=m: ran.append(m)) for m in (last_block, tiny_model.lm_head)]
    try:
        out, early = run_with_cache(tiny_model, batch, names, stop_early=True)
    finally:
        for h in handles:
            h.remove()
    assert out is None and full_out is not None
    assert ran == []  # neither the last block nor the unembedding ran
    assert early.keys() == full.keys()
    for n in names:
        assert torch.equal(early[n], full[n])
    with pytest.raises(ValueError, match="stop_early"):
        run_with_cache(tiny_model, batch, names, grad=True, stop_early=True)
