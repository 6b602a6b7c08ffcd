"""The batched sampler against references: HF `generate` (greedy), a full forward pass (log-probs),
the softmax it samples from (frequencies), and the contract its callers rely on (masks, pad, stops)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from mechrl.train.rollout import (
    _contiguous_groups, _inverse_cdf, completion_logprobs, encode_prompts, generate, token_logprobs,
)

# prompts of different lengths (1 to 9 tokens with the cards tokenizer), so the batch is left-padded
PROMPTS = ["RED", "Cards : RED 3 BLUE 5", "Question : sum", "BLUE 7 GREEN 2 RED 9 =", "how many"]


@pytest.fixture
def model(tiny_model):
    return tiny_model.eval()


def _gqa_llama(tok) -> torch.nn.Module:
    """A Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return AutoModelForCausalLM.from_config(config).eval()


def _end_some_rows_with_eos(model, tok, prompts, steps: int = 3) -> None:
    """Make EOS win wherever the token that greedy decoding picks for row 0 at `steps` would:
    its output-embedding row becomes that token's, slightly scaled up. EOS is never fed back in
    (prompts hold none; ended rows feed pad), so nothing else changes."""
    roll = generate(model, tok, prompts, max_new_tokens=steps + 1, temperature=0.0)
    j = int(roll.completion_ids[0, steps])
    with torch.no_grad():
        w = model.get_output_embeddings().weight
        w[tok.eos_token_id] = w[j] * 1.01


def _check_contract(roll, tok):
    """Masks are 1 up to and including the first EOS and 0 after; ids are pad and log-probs 0 after."""
    eos, pad = tok.eos_token_id, tok.pad_token_id
    for ids, mask, lp in zip(roll.completion_ids.tolist(), roll.completion_mask.tolist(), roll.logprobs.tolist()):
        n = ids.index(eos) + 1 if eos in ids else len(ids)
        assert mask == [1] * n + [0] * (len(ids) - n)
        assert ids[n:] == [pad] * (len(ids) - n)
        assert all(x == 0.0 for x in lp[n:]) and all(x < 0.0 for x in lp[:n])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_matches_hf_generate(model, cards_tok, attn):
    _end_some_rows_with_eos(model, cards_tok, PROMPTS)
    roll = generate(model, cards_tok, PROMPTS, max_new_tokens=12, temperature=0.0, attn_implementation=attn)
    enc = cards_tok(PROMPTS, add_special_tokens=False, padding=True, return_tensors="pt", padding_side="left")
    ref = model.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=cards_tok.pad_token_id,
                         eos_token_id=cards_tok.eos_token_id)[:, enc["input_ids"].size(1):]
    assert roll.lengths.min() < 12, "no row ended with EOS: the test would not check the end handling"
    assert roll.lengths[0] <= 4
    assert torch.equal(roll.completion_ids, ref)
    assert torch.equal(roll.prompt_ids, enc["input_ids"])
    _check_contract(roll, cards_tok)
    assert model.config._attn_implementation == "sdpa", "generate must restore the attention implementation"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logprobs_match_full_forward(model, cards_tok, temperature, attn):
    prompts = [p for p in PROMPTS for _ in range(3)]  # repeated prompts: the prefill runs each once
    g = torch.Generator().manual_seed(0)
    roll = generate(model, cards_tok, prompts, max_new_tokens=10, temperature=temperature, generator=g,
                    attn_implementation=attn)
    ref = completion_logprobs(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask,
                              temperature=temperature, share_prompts=False)
    m = roll.completion_mask.bool()
    torch.testing.assert_close(roll.logprobs[m], ref[m], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gqa_llama_logprobs_and_greedy(cards_tok, attn):
    model = _gqa_llama(cards_tok)
    g = torch.Generator().manual_seed(0)
    roll = generate(model, cards_tok, PROMPTS * 2, max_new_tokens=8, generator=g, attn_implementation=attn)
    ref = completion_logprobs(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask,
                              share_prompts=False)
    m = roll.completion_mask.bool()
    torch.testing.assert_close(roll.logprobs[m], ref[m], atol=1e-5, rtol=0)
    greedy = generate(model, cards_tok, PROMPTS, max_new_tokens=8, temperature=0.0, attn_implementation=attn)
    enc = cards_tok(PROMPTS, add_special_tokens=False, padding=True, return_tensors="pt", padding_side="left")
    hf = model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=cards_tok.pad_token_id,
                        eos_token_id=cards_tok.eos_token_id)[:, enc["input_ids"].size(1):]
    assert torch.equal(greedy.completion_ids, hf)


def test_masks_end_at_first_eos(model, cards_tok):
    # near-uniform sampling over 170 tokens for 64 steps: about a third of the rows emit EOS
    g = torch.Generator().manual_seed(0)
    roll = generate(model, cards_tok, PROMPTS * 12, max_new_tokens=64, temperature=20.0, generator=g)
    lengths = roll.lengths
    assert 0 < int((lengths < 64).sum()) < len(lengths), "need rows that ended and rows that did not"
    assert roll.completion_ids.size(1) == 64
    _check_contract(roll, cards_tok)
    for text, ids, n in zip(roll.texts, roll.completion_ids.tolist(), lengths.tolist()):
        assert text == cards_tok.decode([t for t in ids[:n] if t != cards_tok.eos_token_id], skip_special_tokens=True)
        assert cards_tok.eos_token not in text


def test_width_is_trimmed_when_every_row_ends(model, cards_tok):
    _end_some_rows_with_eos(model, cards_tok, PROMPTS[:1], steps=2)
    a = generate(model, cards_tok, PROMPTS[:1] * 3, max_new_tokens=20, temperature=0.0)
    b = generate(model, cards_tok, PROMPTS[:1] * 3, max_new_tokens=20, temperature=0.0, check_every=8)
    assert a.completion_ids.size(1) <= 3
    for x, y in [(a.completion_ids, b.completion_ids), (a.completion_mask, b.completion_mask),
                 (a.logprobs, b.logprobs)]:
        assert torch.equal(x, y)


def test_top_k_1_is_greedy(model, cards_tok):
    greedy = generate(model, cards_tok, PROMPTS, max_new_tokens=10, temperature=0.0)
    g = torch.Generator().manual_seed(3)
    top1 = generate(model, cards_tok, PROMPTS, max_new_tokens=10, temperature=0.8, top_k=1, generator=g)
    assert torch.equal(greedy.completion_ids, top1.completion_ids)
    assert torch.allclose(top1.logprobs, torch.zeros_like(top1.logprobs))  # the only candidate: log 1


def test_same_seed_same_samples(model, cards_tok):
    def run(seed, **kw):
        kw = kw or {"prompts": PROMPTS * 2}
        return generate(model, cards_tok, max_new_tokens=10, generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert a.texts == b.texts
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # the tokenized entry point samples the same tokens
    ids, mask = encode_prompts(cards_tok, PROMPTS * 2)
    d = run(7, prompt_ids=ids, prompt_mask=mask)
    assert torch.equal(a.completion_ids, d.completion_ids) and a.texts == d.texts


def test_stop_strings_cut_text_and_mask(model, cards_tok):
    kw = dict(max_new_tokens=16, temperature=1.5)
    full = generate(model, cards_tok, PROMPTS * 4, generator=torch.Generator().manual_seed(0), **kw)
    stop = full.texts[0][3:6]  # a piece of row 0's text that is not at its very start
    assert stop.strip(), full.texts[0]
    cut = generate(model, cards_tok, PROMPTS * 4, generator=torch.Generator().manual_seed(0), stop_strings=(stop,),
                   **kw)
    n_hit = 0
    for i, (text, new) in enumerate(zip(full.texts, cut.texts)):
        if stop in text:
            n_hit += 1
            assert new == text[: text.index(stop)]
            # the completion ends at the token that completes the stop string
            ids = cut.completion_ids[i, : int(cut.lengths[i])].tolist()
            assert stop in cards_tok.decode(ids) and stop not in cards_tok.decode(ids[:-1])
            assert ids == full.completion_ids[i, : len(ids)].tolist()
        else:
            assert new == text
    assert n_hit >= 1
    assert bool((cut.lengths <= full.lengths).all())


def test_invalid_arguments_raise(model, cards_tok):
    with pytest.raises(ValueError, match="no prompts"):
        generate(model, cards_tok, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, cards_tok, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, cards_tok, ["RED", ""], max_new_tokens=4)
    ids, mask = encode_prompts(cards_tok, PROMPTS)
    with pytest.raises(ValueError, match="not both"):
        generate(model, cards_tok, PROMPTS, prompt_ids=ids, prompt_mask=mask, max_new_tokens=4)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, cards_tok, prompt_ids=ids.flip(1), prompt_mask=mask.flip(1), max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, cards_tok, PROMPTS, max_new_tokens=4, top_p=0.0)


def test_first_token_frequencies_follow_softmax(model, cards_tok):
    """Over many samples of one prompt, each first token's frequency is within 5 standard errors
    of its probability under the (scaled, filtered) distribution; filtered-out tokens never appear."""
    prompt = "Cards : RED 3 BLUE 5"
    ids, mask = encode_prompts(cards_tok, [prompt])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[0, -1].float()  # (V,)
    n = 20_000
    for temperature, top_k, top_p in [(1.0, None, None), (0.05, 8, None), (0.05, None, 0.6)]:
        scaled = logits / temperature
        if top_k is not None:
            scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[-1], float("-inf"))
        if top_p is not None:
            p_sorted, order = scaled.softmax(-1).sort(descending=True)
            keep = order[(p_sorted.cumsum(-1) - p_sorted) <= top_p]
            scaled = torch.full_like(scaled, float("-inf")).index_fill(0, keep, 0.0) + scaled
        p = scaled.softmax(-1)
        roll = generate(model, cards_tok, prompt_ids=ids.expand(n, -1), prompt_mask=mask.expand(n, -1),
                        max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
                        generator=torch.Generator().manual_seed(0))
        freq = torch.bincount(roll.completion_ids[:, 0], minlength=p.numel()).float() / n
        se = (p * (1 - p) / n).sqrt()
        assert bool(((freq - p).abs() <= 5 * se + 1e-4).all()), (temperature, top_k, top_p)
        assert float(freq[p == 0].sum()) == 0.0
        torch.testing.assert_close(roll.logprobs[:, 0], p.log()[roll.completion_ids[:, 0]], atol=1e-5, rtol=0)


def test_inverse_cdf_block_path():
    """The two-level sampler on a vocabulary that is not a multiple of its block size, with zeros."""
    g = torch.Generator().manual_seed(0)
    K, n = 300, 40_000
    logits = torch.randn(K, generator=g) * 2
    logits[::7] = float("-inf")
    p = logits.softmax(-1)
    idx = _inverse_cdf(p.expand(n, K).contiguous(), g).squeeze(-1)
    freq = torch.bincount(idx, minlength=K).float() / n
    assert int(idx.max()) < K and float(freq[p == 0].sum()) == 0.0
    assert bool(((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-4).all())


def test_completion_logprobs_has_gradients(model, cards_tok):
    roll = generate(model, cards_tok, PROMPTS, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    lp = completion_logprobs(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    assert lp.shape == roll.completion_ids.shape and lp.requires_grad
    (lp * roll.completion_mask).sum().backward()
    assert model.get_input_embeddings().weight.grad is not None


def _logprobs_and_grads(model, roll, share: bool, temperature: float = 1.0):
    model.zero_grad(set_to_none=True)
    lp = completion_logprobs(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask,
                             temperature=temperature, share_prompts=share)
    w = torch.linspace(-1.0, 1.0, lp.numel()).view_as(lp)  # a weighting that reaches every token differently
    (lp * roll.completion_mask * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), grads


@pytest.mark.parametrize("lora,order", [(False, "groups"), (True, "groups"), (False, "shuffled"), (False, "uneven")])
def test_shared_prompt_pass_equals_full_pass(tiny_model, cards_tok, lora, order):
    """Each distinct prompt once + copied cache rows gives the same log-probs and gradients as
    B full passes over prompt + completion, including rows that ended early (masked tails): for rows
    in contiguous groups of one size (broadcast cache rows), shuffled rows and groups of unequal
    sizes (`index_select`)."""
    model = tiny_model.train()
    if lora:
        from mechrl.config import LoraConfig
        from mechrl.models.adapters import add_lora

        model = add_lora(model, LoraConfig(rank=4, alpha=8.0))
        with torch.no_grad():  # LoRA B starts at zero; make the adapters contribute
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    prompts = [p for p in PROMPTS for _ in range(4)]  # groups of 4, as in GRPO
    if order == "uneven":
        prompts = prompts[:-1]
    roll = generate(model, cards_tok, prompts, max_new_tokens=9, generator=torch.Generator().manual_seed(0))
    if order == "shuffled":
        perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(1))
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
            setattr(roll, name, getattr(roll, name)[perm])
    groups = _contiguous_groups(torch.unique(torch.cat([roll.prompt_ids, roll.prompt_mask], 1), dim=0,
                                             return_inverse=True)[1])
    assert (groups is not None) == (order == "groups")  # each order takes the path it is meant to test
    for i in range(1, len(prompts), 3):  # rows that ended early: mask 0 and pad after their end
        end = 1 + i % 8
        roll.completion_mask[i, end:] = 0
        roll.completion_ids[i, end:] = cards_tok.pad_token_id
    full, g_full = _logprobs_and_grads(model, roll, share=False, temperature=0.8)
    shared, g_shared = _logprobs_and_grads(model, roll, share=True, temperature=0.8)
    m = roll.completion_mask.bool()
    torch.testing.assert_close(shared[m], full[m], atol=1e-5, rtol=0)
    assert g_full.keys() == g_shared.keys() and len(g_full) > 0
    for n in g_full:
        torch.testing.assert_close(g_shared[n], g_full[n], atol=1e-5, rtol=1e-4, msg=lambda s: f"{n}: {s}")


def test_shared_prompt_pass_single_token_completions(model, cards_tok):
    prompts = [p for p in PROMPTS for _ in range(2)]
    roll = generate(model, cards_tok, prompts, max_new_tokens=1, generator=torch.Generator().manual_seed(0))
    assert roll.completion_ids.size(1) == 1
    full, _ = _logprobs_and_grads(model, roll, share=False)
    shared, _ = _logprobs_and_grads(model, roll, share=True)
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_autograd_of_log_softmax(temperature):
    """`token_logprobs`'s own backward (the saved log-softmax turned into the gradient in place) gives
    autograd's values and gradients for gather(log_softmax(x / t)), including a token repeated in a row."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 50, generator=g) * 4).requires_grad_()
    ids = torch.randint(0, 50, (3, 5), generator=g)
    ids[0, 1] = ids[0, 0]
    w = torch.randn(3, 5, generator=g)
    ref = torch.log_softmax(x / temperature, -1).gather(2, ids[..., None]).squeeze(-1)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), x)
    out = token_logprobs(x, ids, temperature)
    (grad,) = torch.autograd.grad((out * w).sum(), x)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


def test_token_logprobs_second_backward_raises():
    """The backward consumes its saved log-softmax: a second backward through the same graph is an error,
    not a wrong gradient."""
    x = torch.randn(2, 3, 7, requires_grad=True)
    out = token_logprobs(x, torch.zeros(2, 3, dtype=torch.long))
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_sampling_under_bf16_autocast(model, cards_tok):
    """Under bf16 autocast (`train.dtype: bf16`) the sampler runs: Llama's keys leave the rotary embedding
    in float32 while its values stay bf16, and the static cache stores both in bf16. The sampled
    tokens' log-probs match a float32 pass over the same tokens to bf16 precision."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        roll = generate(model, cards_tok, PROMPTS, max_new_tokens=6, generator=g)
    with torch.no_grad():
        ref = completion_logprobs(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    m = roll.completion_mask.bool()
    assert m.sum() >= len(PROMPTS)
    err = (roll.logprobs[m] - ref[m]).abs()
    assert err.max() < 0.1, err.max()
