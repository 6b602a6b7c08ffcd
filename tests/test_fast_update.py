"""The update's speed options (`fast_update`) on CPU: AdamW's implementations give the same update,
the compiled log-prob head gives the same log-probs and gradients and compiles once across shapes,
and bf16 is refused on CPU in one line (its GPU behaviour: tests/test_gpu_speed.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import arch_zoo as zoo
from mechrl.config import ConfigError, GRPOConfig
from mechrl.runs.rundir import RunDir
from mechrl.train import grpo
from mechrl.train.fast_update import (CompiledLogprobs, PrecisionError, adamw_options, autocast, build_adamw,
                                      check_dtype)
from mechrl.train.grpo import GRPOHooks, Timer, policy_update, rollout, run_grpo
from mechrl.train.rlcommon import setup_rl
from mechrl.train.rollout import completion_logprobs, generate, token_logprobs
from test_grpo import _cfg

PROMPTS = ["RED", "Cards : RED the story", "score is", "the BLUE story is GREEN"]


@pytest.fixture(scope="module")
def tok():
    return zoo.tokenizer()


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_adamw_implementations_give_the_plain_update(tok, impl):
    """Five steps of each implementation from the same weights and gradients: parameters within 1e-6
    of the plain for-loop AdamW's (weight decay on, so every term of the update is exercised)."""
    base = zoo.build("llama", tok)
    models = {name: copy.deepcopy(base).train() for name in ("for-loop", impl)}
    opts = {name: build_adamw(m.parameters(), GRPOConfig(lr=1e-2, weight_decay=0.1, adamw=name), "cpu")
            for name, m in models.items()}
    ids = tok(PROMPTS, add_special_tokens=False, padding=True, return_tensors="pt", padding_side="left")
    for step in range(5):
        for name, m in models.items():
            opts[name].zero_grad()
            logits = m(**ids).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1), ids["input_ids"][:, 1:].flatten()).backward()
            opts[name].step()
    a, b = (dict(models[n].named_parameters()) for n in ("for-loop", impl))
    moved = max(float((a[n] - base.get_parameter(n)).detach().abs().max()) for n in a)
    assert moved > 1e-3, "the optimiser did not move the weights"
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=1e-6, rtol=0, msg=lambda s: f"{n}: {s}")


def test_adamw_auto_keeps_the_cpu_default():
    assert adamw_options("auto", "cpu") == {}  # PyTorch's own choice on CPU: nothing changes there
    assert adamw_options("auto", "cuda") == {"fused": True}
    assert adamw_options("for-loop", "cuda") == {"foreach": False, "fused": False}
    opt = build_adamw([torch.nn.Parameter(torch.zeros(2))], GRPOConfig(), "cpu")
    assert not opt.defaults["fused"] and not opt.defaults["foreach"]
    with pytest.raises(ValueError, match="adamw"):
        adamw_options("fast", "cpu")


def head_case(head, shapes, temperature, device="cpu"):
    """Log-probs and logit gradients of `head` vs `token_logprobs` over several (B, T) shapes."""
    g = torch.Generator().manual_seed(0)
    V = 37
    for B, T in shapes:
        full = (torch.randn(B, T + 2, V, generator=g) * 3).to(device).requires_grad_(True)
        logits = full[:, 1:-1]  # a view, as the model's logits of the completion are
        ids = torch.randint(0, V, (B, T), generator=g).to(device)
        w = torch.randn(B, T, generator=g).to(device)
        ref = token_logprobs(logits, ids, temperature)
        (g_ref,) = torch.autograd.grad((ref * w).sum(), full)
        out = head(logits, ids, temperature)
        (g_out,) = torch.autograd.grad((out * w).sum(), full)
        assert out.dtype == torch.float32 and out.shape == (B, T)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(g_out, g_ref, atol=1e-6, rtol=0)


def test_compiled_head_equals_the_reference_and_compiles_once():
    """Traced by dynamo (the eager backend: the same graph capture and guards, no code generation),
    the head gives the reference log-probs and gradients, and three batch/length shapes share one
    compilation (both leading dimensions are dynamic)."""
    torch._dynamo.reset()
    head = CompiledLogprobs(backend="eager")
    head_case(head, [(2, 3), (4, 5), (3, 8)], temperature=0.7)
    assert head.compiles == 1 and head.calls == 3 and head.compile_s > 0
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        head(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


@pytest.mark.slow
def test_compiled_head_with_inductor():
    """The real thing on CPU (C++ code generation: slow on a small machine)."""
    torch._dynamo.reset()
    head = CompiledLogprobs()
    head_case(head, [(2, 3), (4, 5), (3, 8)], temperature=1.0)
    assert head.compiles == 1


def test_grpo_update_with_the_compiled_head(tmp_path, monkeypatch):
    """`train.compile_logprobs` changes the head of the update, not its gradients."""
    head = CompiledLogprobs(backend="eager")
    monkeypatch.setattr(grpo, "compiled_logprobs", lambda: head)
    torch._dynamo.reset()
    grads = {}
    for compiled in (False, True):
        cfg, name = _cfg(tmp_path / str(compiled), f"train.compile_logprobs={compiled}", "train.beta=0.05")
        st = setup_rl(cfg, RunDir.start(cfg, name), need_ref=True)
        batch = rollout(st, Timer())
        assert batch.decode is not None and batch.decode.mode == "eager"  # auto on CPU: the host loop
        batch.advantages = torch.linspace(-1, 1, batch.advantages.numel())
        policy_update(st, batch, GRPOHooks())
        grads[compiled] = {n: p.grad.clone() for n, p in st.policy.named_parameters() if p.grad is not None}
    assert head.calls >= 2 and head.compiles >= 1  # the policy's pass and the reference's
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], atol=1e-6, rtol=1e-5)


def test_bf16_is_refused_on_cpu_in_one_line(tmp_path):
    with pytest.raises(PrecisionError, match="CUDA only") as e:
        check_dtype("bf16", "cpu")
    assert "\n" not in str(e.value)
    check_dtype("bf16", "cuda")  # allowed there (nothing runs here)
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    cfg, name = _cfg(tmp_path, "train.dtype=bf16", "model.device=cpu")
    with pytest.raises(PrecisionError, match="train.dtype=fp32"):
        run_grpo(cfg, RunDir.start(cfg, name))
    with pytest.raises(ConfigError, match="model.dtype=float32"):
        _cfg(tmp_path, "train.dtype=bf16", "model.dtype=bfloat16")


def test_log_probs_are_reduced_in_float32_under_autocast(tok):
    """What bf16 training relies on: the model's bf16 logits become float32 before the log-softmax."""
    model = zoo.build("llama", tok)
    roll = generate(model, tok, PROMPTS, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.cat([roll.prompt_ids, roll.completion_ids], 1)).logits
        lp = completion_logprobs(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    assert logits.dtype == torch.bfloat16 and lp.dtype == torch.float32
    T = roll.completion_ids.size(1)
    ref = F.log_softmax(logits[:, -T - 1:-1].float(), -1).gather(2, roll.completion_ids[..., None]).squeeze(-1)
    assert torch.equal(token_logprobs(logits[:, -T - 1:-1], roll.completion_ids), ref)


def test_autocast_contexts_keep_no_stale_weight_copies():
    """bf16 autocast without its weight-cast cache: a captured decode step then casts the current
    weights at every replay (PyTorch's CUDA-graph notes: `cache_enabled=False`)."""
    from mechrl.train.decode_graph import _uncached_autocast

    ctx = autocast("bf16", "cuda")  # built here without running (on a CPU-only machine it disables itself)
    assert ctx.fast_dtype == torch.bfloat16 and ctx._cache_enabled is False
    assert isinstance(_uncached_autocast(torch.device("cpu")), type(autocast("fp32", "cpu")))  # autocast off: none
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's caching context
        assert torch.is_autocast_cache_enabled()
        with _uncached_autocast(torch.device("cpu")):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert not torch.is_autocast_cache_enabled()
