"""Gradient routing in GRPO: the gradient-blocking switch, homogeneous micro-batches, the routed
gradients against unrouted references, the routing evaluation, and the smoke recipe end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dual_lora_helpers import randomise_b
from mechrl.cli import main
from mechrl.config import ConfigError, RewardSpec, TinyModelConfig, load_config
from mechrl.models.dual_lora import (add_dual_lora, adapter_parameters, block_gradients, dual_lora_modules,
                                     merged_dual_lora, scales)
from mechrl.models.loading import build_tiny_model, load_pretrained
from mechrl.rewards.registry import build_reward
from mechrl.runs.rundir import RunDir, read_jsonl
from mechrl.train.grpo import GRPOHooks, Timer, policy_update, rollout
from mechrl.train.losses import grpo_loss
from mechrl.train.rlcommon import setup_rl
from mechrl.train.routing import RoutingHooks, _check_policy, diversity, evaluate_routing

TOY = ["task.n_train=200", "task.n_val=20", "task.n_test=20", "task.n_ood=20", "model.tiny.d_model=32",
       "model.tiny.n_layer=1", "model.tiny.arch=llama", "reward=[{name: contains_word, params: {word: RED}}]",
       "train.max_new_tokens=8", "train.prompts_per_step=3", "train.num_generations=4", "train.eval_every=1000",
       "train.save_every=1000", "eval.n_per_split=4", "eval.n_final=4", "eval.max_new_tokens=4",
       "train.max_grad_norm=1e9", "train.beta=0.05", "routing.enabled=true",
       "routing.detector={name: contains_word, params: {word: RED}}"]


def _tiny_dual(tok, arch="llama"):
    model = build_tiny_model(TinyModelConfig(arch=arch, n_layer=2, d_model=32, n_head=4), tok, seed=0)
    add_dual_lora(model, None, retain_rank=2, retain_alpha=4, forget_rank=3, forget_alpha=6)
    randomise_b(model, 0.3)
    return model


# ----------------------------------------------------------------------------------------------
# The switch
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_block_gradients_keeps_forward_and_blocks_only_that_adapter(cards_tok, arch):
    model = _tiny_dual(cards_tok, arch)
    ids = torch.randint(3, 30, (2, 7))

    def run(**block):
        model.zero_grad(set_to_none=True)
        if block:
            with block_gradients(model, **block):
                logits = model(ids).logits
        else:
            logits = model(ids).logits
        (logits.float() ** 2).mean().backward()
        return logits.detach(), {w: [None if p.grad is None else p.grad.clone() for p in adapter_parameters(model, w)]
                                 for w in ("retain", "forget")}

    ref_logits, ref = run()
    assert all(g is not None and g.abs().sum() > 0 for w in ref for g in ref[w])
    for blocked, other in (("retain", "forget"), ("forget", "retain")):
        logits, g = run(retain=blocked == "retain", forget=blocked == "forget")
        torch.testing.assert_close(logits, ref_logits, atol=0, rtol=0)  # forward unchanged
        assert all(x is None for x in g[blocked]), f"{blocked} got gradients while blocked"
        for a, b in zip(g[other], ref[other]):  # the other adapter's gradient is exactly the unblocked one
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    assert all(m.blocked == frozenset() for m in dual_lora_modules(model).values())  # restored after


def test_merged_copy_equals_the_dual_lora_forward(cards_tok):
    model = _tiny_dual(cards_tok)
    ids = torch.randint(3, 30, (2, 5))
    with torch.no_grad():
        for r, f in ((1.0, 1.0), (1.0, 0.0)):
            with scales(model, r, f):
                merged = merged_dual_lora(model)
                assert not dual_lora_modules(merged)
                torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Routed updates
# ----------------------------------------------------------------------------------------------

def _state(tmp_path, cards_tok, *extra):
    cfg, name = load_config("cards-grpo", [f"out_dir={tmp_path}", *TOY, *extra], kind="grpo")
    model = _tiny_dual(cards_tok)
    st = setup_rl(cfg, RunDir.start(cfg, name), need_ref=True, model=model, tokenizer=cards_tok)
    batch = rollout(st, Timer())
    batch.advantages = torch.randn_like(batch.advantages)
    B = batch.rewards.numel()
    # a fixed, mixed labelling (the toy detector would flag almost nothing)
    batch.labels["flagged"] = torch.tensor([i % 3 == 1 for i in range(B)])
    return st, batch


def _update_grads(st, batch, hooks, size, init):
    st.policy.load_state_dict(init)
    st.optimizer.state.clear()
    policy_update(st, batch, hooks, micro_batch_size=size)
    return {n: p.grad.clone() for n, p in st.policy.named_parameters() if p.grad is not None}


class _OpenHooks(RoutingHooks):
    """Routed partition, no adapter blocked."""

    def blocked(self, flagged):
        return False, False


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_routing_with_open_masks_equals_the_unrouted_update(tmp_path, cards_tok, loss_type):
    st, batch = _state(tmp_path, cards_tok, f"train.loss_type={loss_type}")
    init = {k: v.clone() for k, v in st.policy.state_dict().items()}
    ref = _update_grads(st, batch, GRPOHooks(), None, init)
    assert len(ref) == 4 * len(dual_lora_modules(st.policy))  # A and B of both adapters on every layer
    for size in (None, 2):
        got = _update_grads(st, batch, _OpenHooks(st.cfg), size, init)
        assert got.keys() == ref.keys()
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5, msg=f"{n} (micro-batch {size})")


def _subset_grads(st, batch, idx, init) -> dict[str, torch.Tensor]:
    """The unrouted gradient of the samples `idx` alone, normalised by the whole batch's counts."""
    st.policy.load_state_dict(init)
    st.policy.zero_grad(set_to_none=True)
    t = st.cfg.train
    mask = batch.completion_mask.float()
    logp = GRPOHooks().logprobs(st, batch, idx)
    loss, _ = grpo_loss(logp, logp.detach(), batch.advantages[idx], mask[idx], loss_type=t.loss_type,
                        epsilon_low=t.epsilon_low, epsilon_high=t.epsilon_high, beta=t.beta,
                        ref_logp=batch.ref_logp[idx], kl_bias_correction=t.kl_bias_correction,
                        max_completion_length=t.max_new_tokens, total_sequences=batch.rewards.numel(),
                        total_tokens=int(mask.sum().item()))
    loss.backward()
    return {n: p.grad.clone() for n, p in st.policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["classic", "exclusive"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_routed_gradients_come_from_the_samples_the_mode_says(tmp_path, cards_tok, mode, loss_type):
    st, batch = _state(tmp_path, cards_tok, f"routing.mode={mode}", f"train.loss_type={loss_type}")
    init = {k: v.clone() for k, v in st.policy.state_dict().items()}
    routed = _update_grads(st, batch, RoutingHooks(st.cfg), 2, init)  # also sets batch.ref_logp
    flagged = batch.labels["flagged"]
    assert 0 < flagged.sum() < flagged.numel()
    every = torch.arange(flagged.numel())
    unflagged_only = _subset_grads(st, batch, (~flagged).nonzero().flatten(), init)
    forget_source = _subset_grads(st, batch, every if mode == "classic" else flagged.nonzero().flatten(), init)
    n_checked = 0
    for n, g in routed.items():
        ref = unflagged_only[n] if "_retain" in n else forget_source[n]
        assert ref.abs().sum() > 0
        torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-5, msg=n)
        n_checked += 1
    assert n_checked == 4 * len(dual_lora_modules(st.policy))
    # and routing really changed something: the unrouted retain gradient differs
    full = _subset_grads(st, batch, every, init)
    assert any(not torch.allclose(full[n], routed[n], atol=1e-5) for n in routed if "_retain" in n)


def test_partition_is_homogeneous_and_covers_the_batch(tmp_path, cards_tok):
    st, batch = _state(tmp_path, cards_tok)
    hooks = RoutingHooks(st.cfg)
    flagged = batch.labels["flagged"]
    for size in (None, 1, 3):
        parts = hooks.partition(st, batch, size)
        seen = torch.cat(parts)
        assert sorted(seen.tolist()) == list(range(flagged.numel()))  # each sample exactly once
        for idx in parts:
            assert 0 < idx.numel() <= (size or flagged.numel())
            assert flagged[idx].all() or not flagged[idx].any()
    with pytest.raises(RuntimeError, match="homogeneous"):
        hooks.logprobs(st, batch, torch.tensor([0, 1]))  # sample 1 is flagged, sample 0 is not


def test_on_batch_labels_with_the_detector(tmp_path, cards_tok):
    st, batch = _state(tmp_path, cards_tok, "routing.detector={name: contains_word, params: {word: the}}")
    batch.texts = ["the cat", "a dog", "The end", "none"] * (len(batch.texts) // 4)
    metrics = RoutingHooks(st.cfg).on_batch(st, batch)
    assert batch.labels["flagged"].tolist() == [True, False, True, False] * (len(batch.texts) // 4)
    assert metrics["routing/flag_rate"] == 0.5 and metrics["routing/true_hack_rate"] == 0.5
    assert metrics["routing/flag_recall"] == 1.0 and metrics["routing/flag_precision"] == 1.0
    # nothing flagged and no true hack: recall and precision are undefined, so they are not logged as 0
    batch.texts = ["a dog"] * len(batch.texts)
    metrics = RoutingHooks(st.cfg).on_batch(st, batch)
    assert metrics["routing/flag_rate"] == 0.0
    assert "routing/flag_recall" not in metrics and "routing/flag_precision" not in metrics


def test_config_and_policy_checks(tmp_path, cards_tok):
    with pytest.raises(ConfigError, match="routing.detector"):
        load_config("cards-grpo", ["routing.enabled=true"], kind="grpo")
    with pytest.raises(ConfigError, match="remove train.lora"):
        load_config("cards-grpo", ["routing.enabled=true", "routing.detector={name: contains_happy}",
                                   "train.lora={rank: 2}"], kind="grpo")
    full = build_tiny_model(TinyModelConfig(arch="llama", n_layer=1, d_model=32, n_head=4), cards_tok)
    with pytest.raises(ValueError, match="full fine-tuning cannot be routed"):
        _check_policy(full)
    dual = _tiny_dual(cards_tok)
    dual.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="outside the dual LoRA adapters"):
        _check_policy(dual)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def test_diversity_on_hand_made_samples():
    d = diversity(["a b", "a b", "c d", "a c"])
    # pairs: (ab,ab)=1, (ab,cd)=0, (ab,ac)=1/3, (ab,cd)=0, (ab,ac)=1/3, (cd,ac)=1/3 -> 2/6
    assert d["unique_frac"] == 0.75
    assert d["mean_jaccard"] == pytest.approx(2 / 6)
    assert d["degenerate"] is False
    same = diversity(["x y"] * 4)
    assert (same["unique_frac"], same["mean_jaccard"], same["degenerate"]) == (0.25, 1.0, True)
    # all distinct but 8 of 10 words shared: Jaccard 0.8 > 0.7
    templ = diversity(["a b c d e f g h i", "a b c d e f g h j", "a b c d e f g h k"])
    assert templ["unique_frac"] == 1.0 and templ["mean_jaccard"] == pytest.approx(0.8) and templ["degenerate"]
    # Jaccard (6 pairs of 1, 4 of 0) = 0.6, but unique 0.4 < 0.5
    rep = diversity(["a", "a", "a", "a", "b"])
    assert rep["mean_jaccard"] == pytest.approx(0.6) and rep["unique_frac"] == 0.4 and rep["degenerate"]


def test_evaluation_modes_change_the_forward(cards_task, cards_tok):
    model = _tiny_dual(cards_tok)
    model.eval()
    prompts = [cards_task.datasets["test"][i]["prompt"] for i in range(6)]
    examples = [dict(cards_task.datasets["test"][i]) for i in range(6)]
    rewards = {"red": build_reward([RewardSpec(name="contains_word", params={"word": "RED"})])}
    ids = torch.randint(3, 30, (1, 6))
    with torch.no_grad():
        logits = {mode: None for mode in ("both", "forget_only")}
        with scales(model, 1, 1):
            logits["both"] = model(ids).logits
        with scales(model, 0, 1):
            logits["forget_only"] = model(ids).logits
    assert not torch.allclose(logits["both"], logits["forget_only"], atol=1e-3)
    out = evaluate_routing(model, cards_tok, prompts, examples, rewards, max_new_tokens=6, seed=3)
    assert set(out["modes"]) == {"both", "retain_only", "forget_only"}
    assert out["modes"]["retain_only"]["scales"] == [1.0, 0.0]
    texts = {m: r["samples"] for m, r in out["modes"].items()}
    assert texts["both"] != texts["forget_only"] and texts["both"] != texts["retain_only"]
    # with both adapters at zero the three modes are the same model and, same seed, the same samples
    with torch.no_grad():
        for m in dual_lora_modules(model).values():
            m.lora_B_retain.zero_()
            m.lora_B_forget.zero_()
    out0 = evaluate_routing(model, cards_tok, prompts, examples, rewards, max_new_tokens=6, seed=3)
    assert out0["modes"]["both"]["samples"] == out0["modes"]["forget_only"]["samples"] == out0["modes"]["retain_only"]["samples"]


# ----------------------------------------------------------------------------------------------
# The recipe end to end, and eval-routing on its checkpoint
# ----------------------------------------------------------------------------------------------

def test_smoke_recipe_end_to_end_and_eval_routing(tmp_path, capsys):
    assert main(["grpo", "reward-hacking-routing", "preset=smoke", f"out_dir={tmp_path}"]) == 0
    run = tmp_path / "reward-hacking-routing-smoke_s0"
    ckpt = run / "checkpoints" / "step-2"
    assert (ckpt / "dual_lora.safetensors").is_file()
    metrics = read_jsonl(run / "metrics.jsonl")
    steps = [m for m in metrics if "routing/flag_rate" in m]
    assert [m["step"] for m in steps] == [1, 2]
    evals = [m for m in metrics if "routing_eval/retain_only/happy_binary" in m]
    assert [m["step"] for m in evals] == [1, 2]
    for step in (1, 2):
        res = json.loads((run / "eval" / f"routing-step-{step}.json").read_text())
        assert {m: len(r["samples"]) for m, r in res["modes"].items()} == {"both": 8, "retain_only": 8, "forget_only": 8}
        assert set(res["modes"]["both"]["rewards"]) == {"sentence_length_10_smooth", "happy_binary"}
    assert any(s.get("kind") == "routing_eval" for s in read_jsonl(run / "samples.jsonl"))
    # the checkpoint's plain model is the policy with both adapters merged
    saved = load_file(str(ckpt / "dual_lora.safetensors"))
    assert any("lora_B_forget" in k and v.abs().sum() > 0 for k, v in saved.items())  # trained
    plain, _ = load_pretrained(ckpt, device="cpu")
    assert not dual_lora_modules(plain)

    out = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["eval-routing", str(ckpt), "--n", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "retain_only:" in printed and "forget_only:" in printed
    res = json.loads(out.read_text())
    assert res["adapters"]["ranks"] == {"retain": 4, "forget": 4}
    # the loaded adapters are the trained ones: same prompts, same seed, so the same samples and
    # numbers as the in-loop evaluation after the last step
    final = json.loads((run / "eval" / "routing-step-2.json").read_text())
    for mode in ("both", "retain_only", "forget_only"):
        assert res["modes"][mode]["samples"] == final["modes"][mode]["samples"]
        assert res["modes"][mode]["rewards"] == final["modes"][mode]["rewards"]


def test_unflagged_baseline_recentres_only_the_unflagged_samples(tmp_path, cards_tok):
    from mechrl.train.losses import kept_group_advantages

    st, batch = _state(tmp_path, cards_tok, "routing.unflagged_baseline=true",
                       "routing.detector={name: contains_word, params: {word: the}}")
    G = st.cfg.train.num_generations
    batch.texts = ["the cat", "a dog", "The end", "none"] * (len(batch.texts) // 4)
    batch.rewards = torch.arange(batch.rewards.numel(), dtype=torch.float32) % 5
    whole = batch.advantages = kept_group_advantages(batch.rewards, torch.ones_like(batch.rewards, dtype=torch.bool), G)
    RoutingHooks(st.cfg).on_batch(st, batch)
    flagged = batch.labels["flagged"]
    assert 0 < flagged.sum() < flagged.numel()
    torch.testing.assert_close(batch.advantages[flagged], whole[flagged])
    own = kept_group_advantages(batch.rewards, ~flagged, G)
    torch.testing.assert_close(batch.advantages[~flagged], own[~flagged])
    assert not torch.allclose(own[~flagged], whole[~flagged])
