"""GPU-speed paths on a CUDA device (`make test-gpu`; skipped without one): the captured decode step
against the same step run eagerly and against `model.generate`, captures surviving batch-size and
adapter-scale changes, host syncs inside the decode loop counted, the fallback for a model that cannot
be captured, bf16 GRPO steps, fused AdamW, and the compiled log-prob head.

Equality of the graph path is checked against `decode="static"` with the same cache length (the same
kernels on the same values: greedy and seeded sampled tokens identical, log-probs to 1e-5 in fp32),
and against the host loop, whose cache is a few columns shorter (greedy tokens identical)."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

import arch_zoo as zoo
from decode_helpers import host_reads_in_decode_loop
from dual_lora_helpers import randomise_b
from mechrl.config import GRPOConfig, LoraConfig
from mechrl.models.adapters import add_lora
from mechrl.models.dual_lora import add_dual_lora, set_scales
from mechrl.runs.rundir import RunDir
from mechrl.train import decode_graph
from mechrl.train.decode_graph import CACHE_BUCKET, DecodeGraphError, decode_totals, run_decode
from mechrl.train.fast_update import CompiledLogprobs, autocast, build_adamw
from mechrl.train.grpo import GRPOHooks, Timer, policy_update, rollout
from mechrl.train.rlcommon import setup_rl
from mechrl.train.rollout import encode_prompts, generate
from test_fast_update import head_case
from test_grpo import _cfg

pytestmark = pytest.mark.gpu

CUDA = "cuda"
FAMILIES = ["gpt2", "llama", "qwen2", "qwen3", "mistral", "phi3", "gpt_neox"]
PROMPTS = ["RED", "Cards : RED the story", "score is", "the BLUE story is GREEN"]
SAMPLING = [dict(temperature=0.0, top_k=None, top_p=None), dict(temperature=1.0, top_k=None, top_p=None),
            dict(temperature=0.7, top_k=5, top_p=0.9)]


@pytest.fixture(scope="module")
def tok():
    return zoo.tokenizer()


@pytest.fixture(autouse=True)
def _fresh_runners():
    decode_graph.clear_runners()
    yield
    decode_graph.clear_runners()


def _decode(model, tok, ids, mask, mode, *, seed=0, new_tokens=12, check_every=8, bucket=CACHE_BUCKET, **sampling):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    kw = {**SAMPLING[0], **sampling}
    with torch.no_grad():
        return run_decode(model, tok, ids, mask, max_new_tokens=new_tokens, stop_strings=(), generator=g,
                          check_every=check_every, mode=mode, cache_bucket=bucket, **kw)


def _assert_graph_equals_static(model, tok, ids, mask, **kw):
    g_ids, g_mask, g_lp, g_stats = _decode(model, tok, ids, mask, "graph", **kw)
    s_ids, s_mask, s_lp, s_stats = _decode(model, tok, ids, mask, "static", **kw)
    assert g_stats.mode == "graph" and g_stats.replays == g_stats.steps - 1 and s_stats.mode == "static"
    assert torch.equal(g_ids, s_ids) and torch.equal(g_mask, s_mask)
    torch.testing.assert_close(g_lp, s_lp, atol=1e-5, rtol=0)
    return g_ids, g_lp, g_stats


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_replay_equals_the_eager_step(family, tok):
    model = zoo.build(family, tok).to(CUDA)
    ids, mask = encode_prompts(tok, [p for p in PROMPTS for _ in range(3)], CUDA)
    for sampling in SAMPLING:
        _, _, first = _assert_graph_equals_static(model, tok, ids, mask, **sampling)
        assert first.captured and first.capture_s > 0
        _, _, again = _assert_graph_equals_static(model, tok, ids, mask, seed=1, **sampling)
        assert not again.captured  # replayed from the cache: same shape, same state
    # greedy: the host loop's tokens, and model.generate's
    greedy = _decode(model, tok, ids, mask, "graph")[0]
    host = _decode(model, tok, ids, mask, "eager")[0]
    assert torch.equal(greedy, host)
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, ids.size(1):]
    assert torch.equal(greedy, ref[:, :greedy.size(1)])


def test_generate_on_cuda_uses_the_graph_and_returns_copies(tok):
    model = zoo.build("llama", tok).to(CUDA)
    g = torch.Generator(device=CUDA).manual_seed(0)
    first = generate(model, tok, PROMPTS * 4, max_new_tokens=10, generator=g, decode="graph")
    assert first.decode.mode == "graph" and first.decode.fallback is None
    kept = first.completion_ids.clone(), first.logprobs.clone()
    second = generate(model, tok, PROMPTS[::-1] * 4, max_new_tokens=10, generator=g, decode="graph")  # a replay
    assert not second.decode.captured and decode_totals(model)["captures"] == 1
    assert torch.equal(first.completion_ids, kept[0]) and torch.equal(first.logprobs, kept[1])


def test_capture_survives_batch_size_changes(tok):
    model = zoo.build("llama", tok).to(CUDA)
    for n in (2, 3, 2):
        ids, mask = encode_prompts(tok, PROMPTS * n, CUDA)
        _assert_graph_equals_static(model, tok, ids, mask, temperature=1.0)
    assert decode_totals(model)["captures"] == 2  # batch 8 and 12; batch 8 again replays its graph


def test_capture_survives_lora_scale_changes(tok):
    policy = add_lora(zoo.build("llama", tok), LoraConfig(rank=4, alpha=8.0)).to(CUDA)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    ids, mask = encode_prompts(tok, PROMPTS * 2, CUDA)
    out = {}
    for scale in (1.0, 0.0, 2.0, 1.0):
        for m in policy.modules():
            if isinstance(m, LoraLayer):
                m.set_scale("default", scale)
        out.setdefault(scale, []).append(_assert_graph_equals_static(model=policy, tok=tok, ids=ids, mask=mask,
                                                                     temperature=1.0)[1])
    assert not torch.equal(out[1.0][0], out[0.0][0])
    assert torch.equal(out[1.0][0], out[1.0][1])
    assert decode_totals(policy)["captures"] == 3


def test_capture_survives_dual_lora_scale_changes(tok):
    model = add_dual_lora(zoo.build("qwen2", tok), None, retain_rank=4, retain_alpha=8, forget_rank=2,
                          forget_alpha=8, seed=0)
    randomise_b(model, 0.3)
    model.to(CUDA)
    ids, mask = encode_prompts(tok, PROMPTS * 2, CUDA)
    out = []
    for retain, forget in [(1.0, 1.0), (1.0, 0.0), (0.5, 2.0)]:
        set_scales(model, retain, forget)
        out.append(_assert_graph_equals_static(model, tok, ids, mask, temperature=1.0)[1])
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])
    assert decode_totals(model)["captures"] == 3


def test_host_syncs_only_at_the_end_checks(tok, monkeypatch):
    """33 tokens, a check every 8 steps: 4 host syncs in the decode loop (CUDA's sync debug mode warns
    on each; fewer only if every row ended at a check), the same reads at the aten level, none inside
    replays."""
    model = zoo.build("llama", tok).to(CUDA)
    ids, mask = encode_prompts(tok, PROMPTS * 4, CUDA)
    _decode(model, tok, ids, mask, "graph", new_tokens=33, temperature=1.0)  # capture outside the count
    decode = decode_graph.DecodeRunner.decode
    syncs = []

    def counted(self, *a, **kw):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = decode(self, *a, **kw)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))
        return out

    monkeypatch.setattr(decode_graph.DecodeRunner, "decode", counted)
    with host_reads_in_decode_loop(monkeypatch) as reads:
        _, _, _, stats = _decode(model, tok, ids, mask, "graph", new_tokens=33, temperature=1.0)
    expected = 4 if stats.steps == 33 else stats.steps // 8  # an early end stops at a check
    assert stats.host_checks == expected >= 1 and stats.replays == stats.steps - 1
    assert len(syncs) == expected, syncs
    assert reads["loop"] == ["aten._local_scalar_dense"] * expected and reads["step"] == []


def test_auto_runs_the_host_loop_on_cuda_and_graph_names_what_blocks_a_capture(tok, caplog):
    """decode=auto runs the host loop on CUDA for now (`AUTO_ON_CUDA`, one info line per model); decode=graph
    on a model that cannot be captured raises, naming why."""
    from mechrl.train.decode_graph import AUTO_ON_CUDA

    model = zoo.build("mistral_sliding", tok).to(CUDA)
    g = torch.Generator(device=CUDA)
    with caplog.at_level(logging.INFO, logger="mechrl.train.decode_graph"):
        a = generate(model, tok, PROMPTS, max_new_tokens=8, generator=g.manual_seed(0))
        b = generate(model, tok, PROMPTS, max_new_tokens=8, generator=g.manual_seed(0), decode="eager")
        generate(model, tok, PROMPTS, max_new_tokens=8, generator=g.manual_seed(0))
    lines = [r for r in caplog.records if "not captured" in r.getMessage()]
    assert len(lines) == 1 and "opt-in" in lines[0].getMessage()
    assert a.decode.mode == "eager" and a.decode.fallback == AUTO_ON_CUDA
    assert torch.equal(a.completion_ids, b.completion_ids)
    with pytest.raises(DecodeGraphError, match="sliding windows"):
        generate(model, tok, PROMPTS, max_new_tokens=8, decode="graph")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_grpo_step_on_cuda(tmp_path, dtype):
    """A GRPO step with the graph sampler, in fp32 and in bf16 autocast: master weights and optimiser
    state stay float32, log-probs are float32, every trainable parameter moves."""
    cfg, name = _cfg(tmp_path, f"train.dtype={dtype}", "model.device=cuda", "train.decode=graph")
    st = setup_rl(cfg, RunDir.start(cfg, name), need_ref=False)
    before = {n: p.detach().clone() for n, p in st.policy.named_parameters() if p.requires_grad}
    batch = rollout(st, Timer())
    assert batch.decode.mode == "graph"
    assert batch.sampler_logp.dtype == torch.float32 and bool(torch.isfinite(batch.sampler_logp).all())
    batch.advantages = torch.randn_like(batch.advantages)
    loss, grad_norm, _ = policy_update(st, batch, GRPOHooks())
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
    for n, p in st.policy.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and not torch.equal(p, before[n]), n
    for state in st.optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32
    assert st.optimizer.defaults["fused"]  # train.adamw=auto on CUDA
    # the weights moved under the graph the rollout captured: a replay reads them now (in bf16 it casts
    # them afresh), so it still equals the step run eagerly
    t = cfg.train
    with autocast(dtype, CUDA):
        _, _, stats = _assert_graph_equals_static(st.policy, st.tokenizer, batch.prompt_ids, batch.prompt_mask,
                                                  temperature=t.temperature, top_k=t.top_k, top_p=t.top_p,
                                                  new_tokens=t.max_new_tokens)
    assert not stats.captured, "the rollout's graph was not the one replayed"


def test_fused_adamw_on_cuda_equals_the_plain_one(tok):
    base = zoo.build("llama", tok).to(CUDA)
    models = {name: copy.deepcopy(base).train() for name in ("for-loop", "fused", "foreach")}
    opts = {n: build_adamw(m.parameters(), GRPOConfig(lr=1e-2, weight_decay=0.1, adamw=n), CUDA)
            for n, m in models.items()}
    ids = tok(PROMPTS, add_special_tokens=False, padding=True, return_tensors="pt", padding_side="left").to(CUDA)
    for _ in range(5):
        for n, m in models.items():
            opts[n].zero_grad()
            logits = m(**ids).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1), ids["input_ids"][:, 1:].flatten()).backward()
            opts[n].step()
    ref = dict(models["for-loop"].named_parameters())
    for impl in ("fused", "foreach"):
        for n, p in models[impl].named_parameters():
            torch.testing.assert_close(p, ref[n], atol=1e-6, rtol=0, msg=lambda s: f"{impl} {n}: {s}")


def test_compiled_head_on_cuda():
    torch._dynamo.reset()
    head = CompiledLogprobs()
    head_case(head, [(2, 3), (4, 5), (3, 8)], temperature=0.8, device=CUDA)
    assert head.compiles == 1 and head.compile_s > 0
