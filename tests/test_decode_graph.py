"""The fixed-shape decode step (`decode_graph`) on CPU, against the host loop it replaces on CUDA.

What CPU can show of a step that is captured in a CUDA graph on a GPU: run eagerly (`decode="static"`)
it samples exactly the host loop's tokens and log-probs (greedy and seeded sampling, every family the
GPU path serves, PEFT LoRA and dual LoRA with scales changed between calls); inside the loop the only
host reads are the every-k-steps end checks (recorded at the aten level, where a read that would sync
a GPU shows up as `_local_scalar_dense` / `nonzero`); its buffers are reused, never returned. The
replay itself is tested on a GPU (tests/test_gpu_speed.py)."""

from __future__ import annotations

import logging

import pytest
import torch

import arch_zoo as zoo
from decode_helpers import host_reads_in_decode_loop
from dual_lora_helpers import randomise_b
from peft.tuners.lora import LoraLayer

from mechrl.config import LoraConfig
from mechrl.models.adapters import add_lora
from mechrl.models.dual_lora import add_dual_lora, set_scales
from mechrl.models.loading import prepare_tokenizer
from mechrl.models.tokenizer import build_word_tokenizer
from mechrl.train import decode_graph
from mechrl.train.decode_graph import DecodeGraphError, capture_blocked, run_decode, step_blocker
from mechrl.train.rollout import encode_prompts, generate

# the families the GPU path serves (issue 15), plus GPT-J; prompts of 1 to 5 words, repeated (a GRPO group)
FAMILIES = ["gpt2", "llama", "qwen2", "qwen3", "mistral", "phi3", "gpt_neox", "gptj"]
PROMPTS = ["RED", "Cards : RED the story", "score is", "the BLUE story is GREEN"]


@pytest.fixture(scope="module")
def tok():
    return zoo.tokenizer()


@pytest.fixture(autouse=True)
def _fresh_runners():
    decode_graph.clear_runners()
    yield
    decode_graph.clear_runners()


def _both(model, tok, prompts, **kw):
    """(host loop, static step) rollouts of the same call, each from a fresh generator with seed 5."""
    out = []
    for mode in ("eager", "static"):
        g = torch.Generator().manual_seed(5)
        out.append(generate(model, tok, prompts, generator=g, decode=mode, **kw))
    return out


def _assert_same(a, b):
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.logprobs, b.logprobs)  # bit for bit: the same kernels on the same values
    assert a.texts == b.texts


@pytest.mark.parametrize("family", FAMILIES)
def test_static_step_equals_host_loop(family, tok, monkeypatch):
    model = zoo.build(family, tok)
    prompts = [p for p in PROMPTS for _ in range(3)]
    with host_reads_in_decode_loop(monkeypatch) as reads:
        cases = [dict(temperature=0.0), dict(temperature=0.7, top_k=5, top_p=0.9)]
        if model.config._attn_implementation == "sdpa":  # CPU decodes with eager attention; the GPU keeps sdpa
            cases.append(dict(temperature=1.0, attn_implementation="sdpa"))
        for kw in cases:
            eager, static = _both(model, tok, prompts, max_new_tokens=9, check_every=4, **kw)
            _assert_same(eager, static)
            assert static.decode.mode == "static" and eager.decode.mode == "eager"
            assert static.decode.host_checks == eager.decode.host_checks == 2  # after steps 4 and 8
    # inside the loop, the end checks are the only host reads; inside the step there are none
    assert reads["step"] == []
    assert reads["loop"] == ["aten._local_scalar_dense"] * (2 * len(cases))
    # greedy is model.generate's
    enc = tok(PROMPTS, add_special_tokens=False, padding=True, return_tensors="pt", padding_side="left")
    ref = model.generate(**enc, do_sample=False, max_new_tokens=9, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)[:, enc["input_ids"].size(1):]
    greedy = generate(model, tok, PROMPTS, max_new_tokens=9, temperature=0.0, decode="static")
    assert torch.equal(greedy.completion_ids, ref[:, :greedy.completion_ids.size(1)])


def test_rows_that_end_and_stop_strings():
    """Rows ending with EOS at different steps, and stop strings, end the same way on both paths; on a
    vocabulary of 300, where the sampler takes its two-level CDF path (more than 128 entries)."""
    words = [a + b for a in "abcdefghijklmnopqrstuvwxyz" for b in "abcdefghijklmnopqrstuvwxyz"][:300]
    tok = prepare_tokenizer(build_word_tokenizer(words, ()))
    model = zoo.build("llama", tok, seed=2)
    assert len(tok) > 2 * 64
    prompts = [" ".join(words[(7 * i + j) % 300] for j in range(1 + i % 4)) for i in range(8)] * 3
    first = generate(model, tok, prompts, max_new_tokens=24, generator=torch.Generator().manual_seed(5))
    counts = torch.bincount(first.completion_ids.flatten(), minlength=len(tok))
    counts[: 3] = 0  # special tokens
    with torch.no_grad():  # EOS as likely as the most sampled token: some rows end within 24 tokens
        w = model.get_output_embeddings().weight
        w[tok.eos_token_id] = w[int(counts.argmax())]
    eager, static = _both(model, tok, prompts, max_new_tokens=24, temperature=1.0)
    lengths = static.lengths
    assert 0 < int((lengths < 24).sum()) < len(prompts), "need rows that ended and rows that did not"
    _assert_same(eager, static)
    stop = next(t for t in static.texts if len(t.split()) > 4).split()[2]  # a word some row samples
    eager, static = _both(model, tok, prompts, max_new_tokens=24, temperature=1.0, stop_strings=(stop,))
    assert any(stop in t for t in eager.texts) is False and int((static.lengths < eager.lengths.max()).sum()) > 0
    _assert_same(eager, static)


def test_lora_policy_with_scales_changed_between_calls(tok):
    model = zoo.build("llama", tok)
    policy = add_lora(model, LoraConfig(rank=4, alpha=8.0))
    with torch.no_grad():  # LoRA B starts at zero; make the adapters matter
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    prompts = PROMPTS * 2
    seen = []
    for scale in (1.0, 0.0, 2.5):
        for m in policy.modules():
            if isinstance(m, LoraLayer):
                m.set_scale("default", scale)  # PEFT's runtime scale: alpha / r times this
        eager, static = _both(policy, tok, prompts, max_new_tokens=8)
        _assert_same(eager, static)
        seen.append(static.logprobs)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2]), "the scale changed nothing"
    assert decode_graph.decode_totals(policy)["runners"] == 3  # one per adapter state: a graph bakes it in
    with policy.disable_adapter():  # adapters off (the reference policy): again a new state
        eager, static = _both(policy, tok, prompts, max_new_tokens=8)
        _assert_same(eager, static)
    assert decode_graph.decode_totals(policy)["runners"] == 4
    assert not torch.equal(static.logprobs, seen[0])


def test_dual_lora_policy_with_scales_changed_between_calls(tok):
    model = add_dual_lora(zoo.build("qwen2", tok), None, retain_rank=4, retain_alpha=8, forget_rank=2,
                          forget_alpha=8, seed=0)
    randomise_b(model, 0.3)
    prompts = PROMPTS * 2
    results = {}
    for retain, forget in [(1.0, 1.0), (1.0, 0.0), (0.5, 2.0), (1.0, 1.0)]:
        set_scales(model, retain, forget)
        eager, static = _both(model, tok, prompts, max_new_tokens=8)
        _assert_same(eager, static)
        results.setdefault((retain, forget), []).append(static)
    assert not torch.equal(results[(1.0, 1.0)][0].logprobs, results[(1.0, 0.0)][0].logprobs)
    assert torch.equal(results[(1.0, 1.0)][0].logprobs, results[(1.0, 1.0)][1].logprobs)  # back: same samples
    assert decode_graph.decode_totals(model)["runners"] == 3  # (1, 1) found again, not rebuilt


def test_runner_reuse_and_outputs_are_copies(tok):
    """A second call of the same shape reuses the runner (its buffers) and leaves the first call's
    results as they were: what generate returns is never a buffer the next call writes."""
    model = zoo.build("llama", tok)
    ids, mask = encode_prompts(tok, PROMPTS)
    first = generate(model, tok, prompt_ids=ids, prompt_mask=mask, max_new_tokens=6, decode="static",
                     generator=torch.Generator().manual_seed(0))
    kept = (first.completion_ids.clone(), first.logprobs.clone(), first.completion_mask.clone())
    second = generate(model, tok, prompt_ids=ids.flip(0), prompt_mask=mask.flip(0), max_new_tokens=6,
                      decode="static", generator=torch.Generator().manual_seed(1))
    assert decode_graph.decode_totals(model)["runners"] == 1
    assert torch.equal(first.completion_ids, kept[0]) and torch.equal(first.logprobs, kept[1])
    assert torch.equal(first.completion_mask, kept[2])
    assert not torch.equal(first.logprobs, second.logprobs)
    # the weights moved (an optimiser step updates them in place): the same runner reads the new ones
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1.5)
    third, ref = _both(model, tok, PROMPTS, max_new_tokens=6)
    _assert_same(third, ref)
    assert decode_graph.decode_totals(model)["runners"] == 1


def test_bucketed_cache_gives_the_host_loops_samples(tok):
    """The graph path rounds the cache length up (extra columns masked): greedy tokens and sampled
    tokens stay the host loop's, log-probs agree to float rounding."""
    model = zoo.build("llama", tok)
    ids, mask = encode_prompts(tok, PROMPTS * 3)
    kw = dict(max_new_tokens=7, temperature=1.0, top_k=None, top_p=None, stop_strings=(), check_every=8)
    with torch.no_grad():
        a = run_decode(model, tok, ids, mask, generator=torch.Generator().manual_seed(0), mode="eager", **kw)
        b = run_decode(model, tok, ids, mask, generator=torch.Generator().manual_seed(0), mode="static",
                       cache_bucket=32, **kw)
    assert b[3].cache_len == 32 and a[3].cache_len == ids.size(1) + 7
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.testing.assert_close(a[2], b[2], atol=1e-5, rtol=0)


def test_every_row_ending_stops_at_the_next_check(tok):
    model = zoo.build("llama", tok)
    prompts = PROMPTS[:1] * 4
    j = int(generate(model, tok, prompts, max_new_tokens=1, temperature=0.0).completion_ids[0, 0])
    with torch.no_grad():  # EOS beats the greedy first token: every row ends at its first token
        w = model.get_output_embeddings().weight
        w[tok.eos_token_id] = w[j] * 1.01
    roll = generate(model, tok, prompts, max_new_tokens=40, temperature=0.0, decode="static", check_every=8)
    assert roll.decode.steps == 8 and roll.decode.host_checks == 1  # ran to the first check, then stopped
    assert roll.completion_ids.size(1) == 1 and bool((roll.completion_ids == tok.eos_token_id).all())


def test_modes_on_cpu(tok, caplog):
    model = zoo.build("llama", tok)
    with caplog.at_level(logging.INFO, logger="mechrl.train.decode_graph"):
        for _ in range(2):
            roll = generate(model, tok, PROMPTS, max_new_tokens=4, temperature=0.0)
            assert roll.decode.mode == "eager" and "CUDA graphs need CUDA" in roll.decode.fallback
    lines = [r for r in caplog.records if "not captured" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO  # auto: the host loop is the CPU path, said once
    assert decode_graph.decode_totals(model)["runners"] == 0
    with pytest.raises(DecodeGraphError, match="CUDA graphs need CUDA"):
        generate(model, tok, PROMPTS, max_new_tokens=4, decode="graph")
    with pytest.raises(ValueError, match="decode must be one of"):
        generate(model, tok, PROMPTS, max_new_tokens=4, decode="fast")
    assert "CUDA" in capture_blocked(model)


def test_what_keeps_a_step_from_capture(tok):
    assert step_blocker(zoo.build("llama", tok)) is None
    sliding = zoo.build("mistral_sliding", tok)
    assert "sliding windows" in step_blocker(sliding)
    with pytest.raises(ValueError, match="plain StaticLayers"):
        generate(sliding, tok, PROMPTS, max_new_tokens=4, decode="static")
    assert generate(sliding, tok, PROMPTS, max_new_tokens=4, decode="auto").decode.mode == "eager"
    flash = zoo.build("llama", tok)
    flash.config._attn_implementation = "flash_attention_2"  # only read, never run
    assert "builds its masks on the host" in step_blocker(flash)


def test_the_callers_generator_advances_as_in_the_host_loop(tok):
    """The runner draws from its own generator, lent the caller's state and handing it back: the
    caller's stream ends where the host loop leaves it, so consecutive calls continue one stream."""
    model = zoo.build("llama", tok)
    streams = {}
    for mode in ("eager", "static"):
        g = torch.Generator().manual_seed(11)
        rolls = [generate(model, tok, PROMPTS * 2, max_new_tokens=6, generator=g, decode=mode) for _ in range(2)]
        streams[mode] = (rolls, g.get_state())
    (eager, g_eager), (static, g_static) = streams["eager"], streams["static"]
    assert torch.equal(g_eager, g_static)
    for a, b in zip(eager, static):
        _assert_same(a, b)
    assert not torch.equal(static[0].completion_ids, static[1].completion_ids)  # the stream moved on


def test_static_mode_never_replays_a_graph(tok):
    """A runner shared by the graph and static modes (same key): "static" runs the step eagerly even
    when the runner holds a graph, so that comparing the two on a GPU compares replay with eager."""
    model = zoo.build("llama", tok)
    generate(model, tok, PROMPTS, max_new_tokens=5, decode="static")
    (runner,) = decode_graph._REGISTRY[model].runners.values()

    class Tripwire:
        def replay(self):
            raise AssertionError("static mode replayed the graph")

    runner.graph = Tripwire()
    roll = generate(model, tok, PROMPTS, max_new_tokens=5, decode="static")
    assert roll.decode.mode == "static" and roll.decode.replays == 0 and roll.decode.steps == 5
    runner.t.zero_()  # (a spent runner; only the dispatch is checked here)
    with pytest.raises(AssertionError, match="replayed"):
        runner.decode(model, 8, replay=True)


def test_a_bare_cuda_device_is_the_same_as_its_current_index():
    """A generator made with device="cuda" reports `cuda`; the model's parameters report `cuda:0`. They
    are one device: comparing them as unequal kept every decode step from being captured on a GPU."""
    from mechrl.train.decode_graph import canonical_device, same_device

    # the captured-step cache is keyed by the generator's device as a string: one key for both spellings
    assert str(canonical_device("cuda")) == str(canonical_device(torch.device("cuda", 0))) == "cuda:0"
    assert same_device(torch.device("cuda"), torch.device("cuda:0"))
    assert same_device(torch.device("cpu"), torch.device("cpu"))
    assert not same_device(torch.device("cuda:1"), torch.device("cuda:0"))
    assert not same_device(torch.device("cpu"), torch.device("cuda:0"))
