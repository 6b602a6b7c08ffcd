"""The RL losses (`mechrl.train.losses`): GRPO against TRL's own `_compute_loss` on the same batch
and model (loss and every parameter gradient to 1e-5, with and without gradient accumulation),
advantages and PPO pieces on hand-worked numbers and reference loops, and the errors."""

from __future__ import annotations

import pytest
import torch

from mechrl.models.loading import prepare_tokenizer
from mechrl.models.tokenizer import build_word_tokenizer
from mechrl.train.losses import (entropy_from_logits, gae, group_advantages, grpo_loss, kl_k3, masked_mean,
                                 masked_whiten, ppo_policy_loss, ppo_value_loss)
from mechrl.train.rollout import completion_logprobs

LOSS_TYPES = ["grpo", "dapo", "dr_grpo"]

# ---------------------------------------------------------------------------------------------
# GRPO against TRL

P, T = 3, 5  # prompt and completion lengths
N_PROMPTS, G = 2, 3  # B = 6 sequences
LENGTHS = [5, 3, 1, 4, 2, 5]  # ragged completions (right padding)
MAX_COMPLETION_LENGTH = T + 2  # differs from T, so dr_grpo must use the argument, not the batch width


def _zero_reward(completions, **kwargs):
    return [0.0] * len(completions)


def _trl_trainer(tmp_path, loss_type: str, beta: float, accumulation: int, kl_correction: bool = True):
    """A TRL GRPOTrainer on a tiny random Llama, set up as its training loop would be mid-step."""
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tok = prepare_tokenizer(build_word_tokenizer(["a", "b", "c"], (".",)))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                      bos_token_id=tok.eos_token_id)
    # saved and passed by path: with beta > 0 TRL loads its reference model from the same path
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "init")
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none",
                          activation_checkpointing=False,
                          per_device_train_batch_size=N_PROMPTS * G // accumulation,
                          gradient_accumulation_steps=accumulation, num_generations=G,
                          max_completion_length=MAX_COMPLETION_LENGTH, loss_type=loss_type, beta=beta,
                          epsilon=0.2, epsilon_high=0.28, temperature=1.0, use_bias_correction_kl=kl_correction)
    data = Dataset.from_dict({"prompt": ["a b", "b c"]})
    trainer = trl.GRPOTrainer(model=str(tmp_path / "init"), reward_funcs=_zero_reward, args=args,
                              train_dataset=data, processing_class=tok)
    trainer.model.train()  # "train" mode: TRL divides by the accumulation steps
    trainer.current_gradient_accumulation_steps = accumulation  # set by Trainer's loop, which we skip
    assert args.steps_per_generation == accumulation  # TRL's default; the dapo normaliser depends on it
    return trainer


def _batch(model, beta: float) -> dict[str, torch.Tensor]:
    """A hand-built `inputs` dict for `_compute_loss`, old log-probs perturbed so that both clip
    sides are active. No left padding in the prompts: mechrl's forward pass numbers positions from
    the attention mask, HF's default from 0, so with left padding the log-probs themselves (not the
    loss) would differ; that is `rollout.completion_logprobs`'s business, not this module's."""
    g = torch.Generator().manual_seed(1)
    B = N_PROMPTS * G
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    completion_mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()  # (B, T)
    completion_ids = torch.randint(3, vocab, (B, T), generator=g).masked_fill(completion_mask == 0, 2)
    with torch.no_grad():
        logp = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9, -0.3]),
        "old_per_token_logps": logp + 0.6 * torch.randn(B, T, generator=g),
        "num_items_in_batch": completion_mask.sum(),
    }
    if beta > 0:
        inputs["ref_per_token_logps"] = logp + 0.5 * torch.randn(B, T, generator=g)
    return inputs


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _mechrl_loss(model, inputs, rows: slice, loss_type: str, beta: float, **kw):
    logp = completion_logprobs(model, inputs["prompt_ids"][rows], inputs["prompt_mask"][rows],
                               inputs["completion_ids"][rows], inputs["completion_mask"][rows])
    ref = inputs["ref_per_token_logps"][rows] if beta > 0 else None
    return grpo_loss(logp, inputs["old_per_token_logps"][rows], inputs["advantages"][rows],
                     inputs["completion_mask"][rows], loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
                     beta=beta, ref_logp=ref, max_completion_length=MAX_COMPLETION_LENGTH, **kw)


def _assert_same(trl_loss, trl_grads, loss, grads):
    torch.testing.assert_close(loss, trl_loss, atol=1e-5, rtol=0)
    assert trl_grads.keys() == grads.keys() and len(grads) > 0
    for n in trl_grads:
        torch.testing.assert_close(grads[n], trl_grads[n], atol=1e-5, rtol=0, msg=f"gradient of {n}")


# TRL 1.16 weights the KL term by the importance ratio by default (`use_bias_correction_kl=True`)
@pytest.mark.parametrize("beta,kl_correction", [(0.0, True), (0.04, True), (0.04, False)])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_equals_trl(tmp_path, loss_type, beta, kl_correction):
    trainer = _trl_trainer(tmp_path, loss_type, beta, accumulation=1, kl_correction=kl_correction)
    model = trainer.model
    inputs = _batch(model, beta)

    trl_loss = trainer._compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = _grads(model)

    loss, metrics = _mechrl_loss(model, inputs, slice(None), loss_type, beta, kl_bias_correction=kl_correction)
    loss.backward()
    _assert_same(trl_loss.detach(), trl_grads, loss.detach(), _grads(model))

    # the batch exercises both clip sides, and the metrics are what TRL logged for it
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
    for key in ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"] + (["kl"] if beta else []):
        assert metrics[key].item() == pytest.approx(logged[key], abs=1e-6), key
        assert not metrics[key].requires_grad
    assert ("kl" in metrics) == (beta > 0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_with_accumulation_equals_trl(tmp_path, loss_type):
    """TRL with 2 accumulation steps of 3 sequences vs mechrl's micro-batches with the step totals."""
    beta = 0.04
    trainer = _trl_trainer(tmp_path, loss_type, beta, accumulation=2)
    model = trainer.model
    inputs = _batch(model, beta)
    halves = [slice(0, 3), slice(3, 6)]

    trl_loss = 0.0
    for rows in halves:
        part = {k: (v if k == "num_items_in_batch" else v[rows]) for k, v in inputs.items()}
        loss = trainer._compute_loss(model, part)
        loss.backward()
        trl_loss = trl_loss + loss.detach()
    trl_grads = _grads(model)

    total = 0.0
    n_tokens = int(inputs["completion_mask"].sum())
    for rows in halves:
        loss, _ = _mechrl_loss(model, inputs, rows, loss_type, beta, total_sequences=6, total_tokens=n_tokens)
        loss.backward()
        total = total + loss.detach()
    _assert_same(trl_loss, trl_grads, total, _grads(model))


# ---------------------------------------------------------------------------------------------
# GRPO: advantages, micro-batch invariance, errors


def test_group_advantages_hand_worked():
    # group 1: [1, 2, 3] mean 2, std 1; group 2: [5, 5, 5] std 0
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv, m = group_advantages(r, 3, "group")
    torch.testing.assert_close(adv, torch.tensor([-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(m["reward_std"], torch.tensor(0.5))
    torch.testing.assert_close(m["frac_reward_zero_std"], torch.tensor(0.5))

    adv, m = group_advantages(r, 3, "none")
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(m["frac_reward_zero_std"], torch.tensor(0.5))

    # batch std of r: mean 3.5, squared deviations 6.25+2.25+0.25+3*2.25 = 15.5, /5 -> 3.1
    adv, m = group_advantages(r, 3, "batch")
    s = 3.1 ** 0.5 + 1e-4
    torch.testing.assert_close(adv, torch.tensor([-1 / s, 0.0, 1 / s, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(m["frac_reward_zero_std"], torch.tensor(0.0))  # TRL: from the batch std
    torch.testing.assert_close(m["reward_std"], torch.tensor(0.5))


def test_group_advantages_group_of_one_and_errors():
    adv, m = group_advantages(torch.tensor([1.0, 4.0]), 1)
    torch.testing.assert_close(adv, torch.zeros(2))
    assert m["frac_reward_zero_std"] == 1.0
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(torch.zeros(6), 3, "std")
    with pytest.raises(ValueError, match=r"\(B,\)"):
        group_advantages(torch.zeros(2, 3), 3)


def _random_batch(B=8, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()  # (B, T)
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + 0.4 * torch.randn(B, T, generator=g)
    ref = logp + 0.4 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_grpo_micro_batches_sum_to_full_batch(loss_type, per_token_adv):
    logp0, old, ref, adv, mask = _random_batch()
    if per_token_adv:
        adv = adv[:, None] + 0.1 * torch.randn_like(logp0)  # (B, T)
    kw = dict(loss_type=loss_type, beta=0.05, epsilon_high=0.28, max_completion_length=9)

    logp = logp0.clone().requires_grad_()
    full, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref, **kw)
    full.backward()
    full_grad = logp.grad.clone()

    logp = logp0.clone().requires_grad_()
    total = 0.0
    for rows in [slice(0, 1), slice(1, 4), slice(4, 8)]:  # uneven micro-batches
        loss, _ = grpo_loss(logp[rows], old[rows], adv[rows], mask[rows], ref_logp=ref[rows],
                            total_sequences=8, total_tokens=int(mask.sum()), **kw)
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, full.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logp.grad, full_grad, atol=1e-7, rtol=1e-6)
    assert full_grad.abs().sum() > 0 and (full_grad[mask == 0] == 0).all()


def test_grpo_loss_on_policy_hand_case():
    """ratio 1, beta 0: the loss is minus the aggregated advantage, per loss type."""
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([2.0, -1.0])
    expect = {"grpo": -(2.0 - 1.0) / 2,  # mean of per-sequence means
              "dapo": -(2.0 * 2 - 1.0) / 3,  # mean over the 3 tokens
              "dr_grpo": -(2.0 * 2 - 1.0) / (2 * 4)}  # sum / (B * max_completion_length)
    for lt, v in expect.items():
        loss, m = grpo_loss(logp, logp, adv, mask, loss_type=lt, max_completion_length=4)
        assert loss.item() == pytest.approx(v), lt
        assert m["ratio_mean"].item() == pytest.approx(1.0) and m["clip_ratio/region_mean"] == 0


def test_grpo_loss_clip_hand_case():
    """Two-sided clip with eps_low 0.2, eps_high 0.28 on one token each (dapo = plain token mean):
    r=1.25, A=+1 inside the high bound (would be clipped at 0.2): -1.25
    r=1.5,  A=+1 clipped high:                                     -1.28
    r=0.7,  A=-1 clipped low:                                       0.8
    r=0.7,  A=+1 pessimistic side, unclipped:                      -0.7"""
    ratio = torch.tensor([[1.25], [1.5], [0.7], [0.7]])
    logp = ratio.log().requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    loss, m = grpo_loss(logp, torch.zeros(4, 1), adv, torch.ones(4, 1), loss_type="dapo", epsilon_low=0.2,
                        epsilon_high=0.28)
    assert loss.item() == pytest.approx((-1.25 - 1.28 + 0.8 - 0.7) / 4)
    assert m["clip_ratio/high_mean"].item() == pytest.approx(0.25)
    assert m["clip_ratio/low_mean"].item() == pytest.approx(0.25)
    assert m["clip_ratio/region_mean"].item() == pytest.approx(0.5)
    assert m["ratio_mean"].item() == pytest.approx((1.25 + 1.5 + 0.7 + 0.7) / 4)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.25 / 4], [0.0], [0.0], [-0.7 / 4]]))
    # epsilon_high defaults to epsilon_low: now r=1.25 is clipped too
    loss, m = grpo_loss(logp, torch.zeros(4, 1), adv, torch.ones(4, 1), loss_type="dapo", epsilon_low=0.2)
    assert loss.item() == pytest.approx((-1.2 - 1.2 + 0.8 - 0.7) / 4)
    assert m["clip_ratio/high_mean"].item() == pytest.approx(0.5)


def test_grpo_loss_errors():
    logp, old, ref, adv, mask = _random_batch()
    with pytest.raises(ValueError, match="old_logp has shape"):
        grpo_loss(logp, old[:, :-1], adv, mask, loss_type="grpo")
    with pytest.raises(ValueError, match="mask has shape"):
        grpo_loss(logp, old, adv, mask[:-1], loss_type="grpo")
    with pytest.raises(ValueError, match="advantages has shape"):
        grpo_loss(logp, old, adv[:-1], mask, loss_type="grpo")
    with pytest.raises(ValueError, match="ref_logp has shape"):
        grpo_loss(logp, old, adv, mask, loss_type="grpo", beta=0.1, ref_logp=ref[:-1])
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(logp, old, adv, mask, loss_type="grpo", beta=0.1)
    with pytest.raises(ValueError, match="grpo, dapo, dr_grpo"):
        grpo_loss(logp, old, adv, mask, loss_type="bnpo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logp, old, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="total_sequences"):
        grpo_loss(logp, old, adv, mask, loss_type="grpo", total_sequences=3)


# ---------------------------------------------------------------------------------------------
# PPO pieces


def _gae_reference(rewards, values, mask, gamma, lam):
    """One completion at a time, plain Python floats: the textbook recursion."""
    adv = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        n = int(mask[i].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[i, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[i, t].item() + gamma * next_v - values[i, t].item()
            last = delta + gamma * lam * last
            adv[i, t] = last
    return adv, (adv + values) * mask


def test_gae_matches_reference_loop():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 9
    lengths = torch.tensor([9, 1, 4, 7, 2, 5])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)  # junk at padding too: must be ignored
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma=0.97, lam=0.9)
    ref_adv, ref_ret = _gae_reference(rewards, values, mask.double(), 0.97, 0.9)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    assert (adv[mask == 0] == 0).all()


def test_gae_lambda_one_is_reward_to_go():
    g = torch.Generator().manual_seed(1)
    mask = (torch.arange(6)[None] < torch.tensor([6, 3, 1])[:, None]).float()
    rewards = torch.randn(3, 6, generator=g) * mask
    adv, ret = gae(rewards, torch.zeros(3, 6), mask, gamma=1.0, lam=1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1) * mask
    torch.testing.assert_close(adv, to_go)
    torch.testing.assert_close(ret, to_go)


def test_gae_rejects_left_padding_and_bad_shapes():
    mask = torch.tensor([[0, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        gae(torch.zeros(1, 3), torch.zeros(1, 3), mask, 1.0, 1.0)
    with pytest.raises(ValueError, match="values has shape"):
        gae(torch.zeros(1, 3), torch.zeros(1, 4), torch.ones(1, 3), 1.0, 1.0)


def test_ppo_policy_loss_ratio_one():
    logp, _, _, _, mask = _random_batch()
    adv = torch.randn_like(logp)
    loss, m = ppo_policy_loss(logp, logp, adv, mask, clip_range=0.2)
    torch.testing.assert_close(loss, -masked_mean(adv, mask))
    assert m["clipfrac"] == 0 and m["approx_kl"].abs() < 1e-7 and m["ratio_mean"].item() == pytest.approx(1.0)


def test_ppo_policy_loss_clipping_hand_case():
    # ratios 1.5, 0.5, 1.5, 0.5 with advantages +1, +1, -1, -1, clip 0.2:
    #   r=1.5, A=+1: max(-1.5, -1.2) = -1.2, clipped (no gradient)
    #   r=0.5, A=+1: max(-0.5, -0.8) = -0.5, unclipped (pessimistic side)
    #   r=1.5, A=-1: max(1.5, 1.2)  = 1.5, unclipped
    #   r=0.5, A=-1: max(0.5, 0.8)  = 0.8, clipped (no gradient)
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, m = ppo_policy_loss(logp, old, adv, torch.ones(1, 4), clip_range=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert m["clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    # d/dlogp of -A r / 4 = -A r / 4 on unclipped tokens, 0 on clipped ones
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5 / 4, 1.5 / 4, 0.0]]))
    # approx_kl = mean((r - 1) - log r)
    r = torch.tensor([1.5, 0.5, 1.5, 0.5])
    assert m["approx_kl"].item() == pytest.approx(((r - 1) - r.log()).mean().item(), rel=1e-5)
    # padding does not count
    loss2, _ = ppo_policy_loss(logp.detach(), old, adv, torch.tensor([[1, 1, 0, 0]]), clip_range=0.2)
    assert loss2.item() == pytest.approx((-1.2 - 0.5) / 2)


def test_ppo_losses_micro_batches_with_total_tokens():
    logp0, old, _, _, mask = _random_batch()
    adv = torch.randn_like(logp0)
    n = int(mask.sum())
    full, _ = ppo_policy_loss(logp0, old, adv, mask, 0.2)
    parts = sum(ppo_policy_loss(logp0[s], old[s], adv[s], mask[s], 0.2, total_tokens=n)[0]
                for s in [slice(0, 3), slice(3, 8)])
    torch.testing.assert_close(parts, full)
    ret = torch.randn_like(logp0)
    full, _ = ppo_value_loss(logp0, old, ret, mask, 0.2)
    parts = sum(ppo_value_loss(logp0[s], old[s], ret[s], mask[s], 0.2, total_tokens=n)[0]
                for s in [slice(0, 3), slice(3, 8)])
    torch.testing.assert_close(parts, full)


def test_ppo_value_loss_hand_case():
    # old 0, clip 0.5, returns 2, 2, -1:
    #   V=1:   err 1,    clipped V 0.5 -> err 2.25: max 2.25, clipped term larger
    #   V=3:   err 1,    clipped V 0.5 -> err 2.25: max 2.25, clipped term larger
    #   V=0.2: err 1.44, clipped V 0.2 -> same:     max 1.44, not clipped
    values = torch.tensor([[1.0, 3.0, 0.2]])
    old = torch.zeros(1, 3)
    ret = torch.tensor([[2.0, 2.0, -1.0]])
    mask = torch.ones(1, 3)
    loss, m = ppo_value_loss(values, old, ret, mask, clip_range_value=0.5)
    assert loss.item() == pytest.approx(0.5 * (2.25 + 2.25 + 1.44) / 3)
    assert m["value_clipfrac"].item() == pytest.approx(2 / 3)
    loss, m = ppo_value_loss(values, old, ret, mask)
    assert loss.item() == pytest.approx(0.5 * (1 + 1 + 1.44) / 3)
    assert m["value_clipfrac"] == 0
    with pytest.raises(ValueError, match="returns has shape"):
        ppo_value_loss(values, old, ret[:, :2], mask)


def test_entropy_from_logits_matches_categorical():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=g) * 5
    logits[0, 0, :3] = float("-inf")  # filtered tokens
    logits[1, 1] += 1e4  # large logits: no overflow, no loss of precision
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits)[2], expected[2])  # ordinary rows, float32
    # Categorical loses precision at 1e4 in float32 (it subtracts logsumexp from the logits), so the
    # exact reference for every row is Categorical in float64 on the same values
    expected = torch.distributions.Categorical(logits=logits.double()).entropy().float()
    torch.testing.assert_close(entropy_from_logits(logits), expected)
    x = logits.clone().requires_grad_()
    entropy_from_logits(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_masked_mean_whiten_and_k3():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    w = masked_whiten(x, mask)
    real = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(w[mask == 1], (real - 2.5) / (real.var() + 1e-8).sqrt())  # unbiased var
    assert (w[mask == 0] == 0).all()
    w = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(w[mask == 1], (real - 2.5) / (real.var() + 1e-8).sqrt() + 2.5)
    # k3 is >= 0, 0 on equal log-probs, and its mean under the policy approximates KL
    assert kl_k3(torch.zeros(3), torch.zeros(3)).abs().max() == 0
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    exact = (p * (p / q).log()).sum()
    torch.testing.assert_close((p * kl_k3(p.log(), q.log())).sum(), exact)
