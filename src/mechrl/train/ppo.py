"""PPO for language models (RLHF style), top to bottom.

Each step:
  1. draw `prompts_per_step` prompts, sample one completion each (mechrl's KV-cache sampler);
  2. score them with the configured rewards (a sequence-level score per completion);
  3. one no-grad pass for the old log-probs and values, and the reference log-probs;
  4. per-token rewards: -kl_coef * (logp_old - logp_ref) at every token, plus the score at the
     completion's last token; GAE (gamma, lam) gives advantages and returns per token;
  5. `ppo_epochs` passes over `num_minibatches` minibatches: clipped policy loss + vf_coef x
     clipped value loss - ent_coef x entropy (`losses.py`).

The value function is a linear head on the policy's last hidden state (the trunk is shared, as in
TRL's former `AutoModelForCausalLMWithValueHead`); with LoRA the head and the adapters train.
The reference is the initial policy: LoRA with adapters disabled, or a frozen copy.
Left out: adaptive KL control, reward whitening, separate critic networks.

Under `accelerate launch` each of N processes takes prompts_per_step / N prompts and shuffles them
into its share of each minibatch; gradients are averaged over processes with token normalisers
all-reduced, and advantages are whitened with the global batch's statistics (`distributed.py`).

    mechrl ppo recipes/cards-ppo.yaml model.path=runs/cards-sft_s0/checkpoints/step-2000
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mechrl.config import PPORunConfig
from mechrl.envs import StepResult
from mechrl.errors import TrainingDiverged
from mechrl.runs.rundir import RunDir
from mechrl.train.losses import entropy_from_logits, gae, masked_whiten, ppo_policy_loss, ppo_value_loss
from mechrl.train.rlcommon import (
    RLState, Timer, check_finite, draw_prompts, micro_batches, run_rl, scalars, update_micro_batch,
)
from mechrl.train.compute import STEP_KEY, ComputeCounter, pass_tokens
from mechrl.train.rollout import generate

log = logging.getLogger(__name__)


class ValueHead(torch.nn.Module):
    """V(s_t) = w . h_t + b on the policy's final hidden state h_t (B, T, D) -> (B, T)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.proj.weight)  # start from V = 0: no spurious advantages at step 1
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden).squeeze(-1)


def make_value_head(policy) -> dict[str, torch.nn.Module]:
    hidden = policy.config.hidden_size
    device = next(policy.parameters()).device
    return {"value_head": ValueHead(hidden).to(device)}


@dataclass
class PPOBatch:
    """B completions (one per prompt), P prompt length, T completion length."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, T)
    completion_mask: torch.Tensor  # (B, T)
    scores: torch.Tensor  # (B,) sequence-level reward
    texts: list[str]
    prompts: list[str]
    result: StepResult


def forward(st: RLState, batch: PPOBatch, mb: slice, *, temperature: float, model=None,
            with_values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log-probs (b, T), values (b, T) and entropies (b, T) of the completion tokens of `mb`."""
    model = model if model is not None else st.policy
    ids = torch.cat([batch.prompt_ids[mb], batch.completion_ids[mb]], 1)  # (b, P+T)
    att = torch.cat([batch.prompt_mask[mb], batch.completion_mask[mb]], 1)
    pos = (att.cumsum(1) - 1).clamp(min=0)  # positions count real tokens (left padding)
    out = model(input_ids=ids, attention_mask=att, position_ids=pos, output_hidden_states=with_values)
    P = batch.prompt_ids.size(1)
    logits = out.logits[:, P - 1:-1, :].float() / temperature  # predictions of completion tokens, (b, T, V)
    logp = torch.gather(F.log_softmax(logits, -1), 2, batch.completion_ids[mb][..., None]).squeeze(-1)
    values = None
    if with_values:
        hidden = out.hidden_states[-1][:, P - 1:-1, :].float()  # state before each completion token, (b, T, D)
        values = st.modules["value_head"](hidden)
    return logp, values, entropy_from_logits(logits)


def rollout(st: RLState, timer: Timer) -> PPOBatch:
    t = st.cfg.train
    items = draw_prompts(st)  # this process's share
    prompts = [it.prompt for it in items]
    with timer("generate"):
        roll = generate(st.policy, st.tokenizer, prompts, max_new_tokens=t.max_new_tokens,
                        temperature=t.temperature, top_k=t.top_k, top_p=t.top_p, generator=st.generator,
                        decode=t.decode)
    with timer("reward"):
        result = st.env.step(items, roll.texts)
    scores = result.rewards.total.to(st.device, torch.float32)
    return PPOBatch(roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask, scores,
                    roll.texts, prompts, result)


def ppo_step(st: RLState, timer: Timer) -> tuple[dict[str, float], PPOBatch]:
    t = st.cfg.train
    batch = rollout(st, timer)
    B = batch.scores.numel()
    mask = batch.completion_mask.float()  # (B, T)
    compute = ComputeCounter()  # token-passes of this step (`compute.py`); `forward` runs every row in full

    def rows_tokens(rows) -> int:
        return pass_tokens(batch.prompt_ids, batch.prompt_mask, batch.completion_mask, rows, share_prompts=False)

    compute.forward(pass_tokens(batch.prompt_ids, batch.prompt_mask, batch.completion_mask))  # sampling

    size = update_micro_batch(st, B, batch.completion_ids.size(1))  # rows per forward / backward
    with timer("update"):
        # ALGO LOGIC: old log-probs and values, reference log-probs (no grad, fixed for the step)
        with torch.no_grad():
            parts = [forward(st, batch, mb, temperature=t.temperature) for mb in micro_batches(B, size)]
            compute.forward(rows_tokens(None))
            old_logp = torch.cat([p[0] for p in parts])  # (B, T)
            old_values = torch.cat([p[1] for p in parts])  # (B, T)
            if t.kl_coef > 0:
                with st.reference_context():
                    ref_logp = torch.cat([forward(st, batch, mb, temperature=t.temperature, model=st.ref_model,
                                                  with_values=False)[0]
                                          for mb in micro_batches(B, size)])
                compute.forward(rows_tokens(None))
            else:
                ref_logp = old_logp
            # per-token rewards: KL penalty everywhere, the score at the last real token
            kl = (old_logp - ref_logp) * mask  # (B, T)
            rewards = -t.kl_coef * kl
            last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) index of each completion's last token
            rewards[torch.arange(B), last] += batch.scores
            advantages, returns = gae(rewards, old_values * mask, mask, t.gamma, t.lam)
            if t.whiten_advantages:
                advantages = _whiten(st, advantages, mask)

        world = st.dist.world
        mb_size = max(1, B // t.num_minibatches)
        agg: dict[str, torch.Tensor] = {}
        n_updates = 0
        params = [p for g in st.optimizer.param_groups for p in g["params"]]
        for _ in range(t.ppo_epochs):
            order = torch.randperm(B, generator=st.generator, device=st.device)  # (B,) minibatch order
            for start in range(0, B, mb_size):
                idx = order[start:start + mb_size]
                st.optimizer.zero_grad(set_to_none=True)
                # the minibatch's token count; with N processes the global count / N (gradients are averaged)
                mb_tokens = int(mask[idx].sum().item()) if world == 1 else st.dist.sum(mask[idx].sum()) / world
                loss_total = torch.zeros((), device=st.device)
                for sub in micro_batches(idx.numel(), size):
                    rows = idx[sub]
                    sub_batch = _select(batch, rows)
                    logp, values, entropy = forward(st, sub_batch, slice(None), temperature=t.temperature)
                    compute.train(rows_tokens(rows))
                    m = mask[rows]
                    pg_loss, pg_m = ppo_policy_loss(logp, old_logp[rows], advantages[rows], m, t.clip_range,
                                                    total_tokens=mb_tokens)
                    vf_loss, vf_m = ppo_value_loss(values, old_values[rows], returns[rows], m, t.clip_range_value,
                                                   total_tokens=mb_tokens)
                    ent = (entropy * m).sum() / (max(mb_tokens, 1) if world == 1 else mb_tokens.clamp(min=1))
                    loss = pg_loss + t.vf_coef * vf_loss - t.ent_coef * ent
                    loss.backward()
                    loss_total = loss_total + loss.detach()
                    # the losses are normalised by the minibatch's token count: their micro-batch parts
                    # add up to the minibatch's value; the other metrics are micro-batch means, weighted
                    w = rows.numel() / idx.numel()
                    for k, v in {"entropy": ent, "policy_loss": pg_loss, "value_loss": vf_loss}.items():
                        agg[k] = agg.get(k, 0.0) + v.detach()
                    for k, v in {**pg_m, **vf_m}.items():
                        agg[k] = agg.get(k, 0.0) + w * v.detach()
                st.dist.average_gradients(params)  # the global minibatch's gradient on every process
                grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    raise TrainingDiverged(f"PPO: gradient norm is {grad_norm.item()} (loss {loss_total.item()}); training "
                                           f"diverged (train.lr={t.lr:g}; a lower one may help)")
                st.optimizer.step()
                n_updates += 1
        st.scheduler.step()

    # TRY NOT TO MODIFY: logging (with N processes, of the global batch: per-sample values gathered)
    d = st.dist
    scores = d.gather(batch.scores)  # (B_global,)
    kl_seq = d.gather(kl.sum(1))  # (B_global,)
    lengths = d.gather(batch.completion_mask.sum(1).float())
    n_tok = d.sum(mask.sum()).clamp(min=1)
    metrics = {
        "reward/mean": scores.mean(), "reward/std": scores.std() if scores.numel() > 1 else torch.zeros(()),
        "objective/kl": kl_seq.mean(), "objective/rlhf_reward": (scores - t.kl_coef * kl_seq).mean(),
        "policy/grad_norm": grad_norm, "policy/lr": st.scheduler.get_last_lr()[0],
        "value/mean": d.sum((old_values * mask).sum()) / n_tok, "value/returns_mean": d.sum((returns * mask).sum()) / n_tok,
        "completions/mean_length": lengths.mean(), "completions/max_length": lengths.max(),
        "completions/min_length": lengths.min(),
        STEP_KEY: d.sum(compute.total),
    }
    metrics.update({(f"value/{k}" if k.startswith("value") else f"policy/{k}"): d.mean(v / n_updates)
                    for k, v in agg.items()})
    for name, v in batch.result.rewards.components.items():
        metrics[f"reward/{name}/mean"] = d.gather(v.float().to(st.device)).mean()
    infos = batch.result.infos
    if infos and "correct" in infos[0]:
        flags = d.gather(torch.tensor([[bool(i["correct"]), bool(i["format_error"])] for i in infos],
                                      dtype=torch.float64, device=st.device))  # (B_global, 2)
        metrics["env/accuracy"] = flags[:, 0].mean()
        metrics["env/format_error_rate"] = flags[:, 1].mean()
    out = scalars(metrics)
    check_finite(out, f"PPO step metrics of {st.run.path.name}")
    return out, batch


def _whiten(st: RLState, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`masked_whiten` with the mean and variance of the global batch (all processes)."""
    if st.dist.world == 1:
        return masked_whiten(x, mask)
    d = st.dist
    m = mask.to(x.dtype)
    n = d.sum(m.sum())
    mean = d.sum((x * m).sum()) / n.clamp(min=1.0)
    var = d.sum((((x - mean) ** 2) * m).sum()) / n.clamp(min=1.0)
    var = var * n / (n - 1).clamp(min=1.0)  # Bessel's correction, as masked_whiten
    return (x - mean) * torch.rsqrt(var + 1e-8) * m


def _select(batch: PPOBatch, rows: torch.Tensor) -> PPOBatch:
    r = rows.tolist()
    return PPOBatch(batch.prompt_ids[rows], batch.prompt_mask[rows], batch.completion_ids[rows],
                    batch.completion_mask[rows], batch.scores[rows], [batch.texts[i] for i in r],
                    [batch.prompts[i] for i in r], batch.result)


def _step_fn(st: RLState, timer: Timer, step: int):
    metrics, batch = ppo_step(st, timer)
    samples = [{"step": step, "prompt": batch.prompts[i], "completion": batch.texts[i],
                "reward": float(batch.scores[i]), **_plain(batch.result.infos[i])}
               for i in range(min(st.cfg.train.n_samples, len(batch.texts)))]
    return metrics, samples, int(batch.completion_mask.sum())


def _plain(info: dict) -> dict:
    return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, type(None)))}


def run_ppo(cfg: PPORunConfig, run: RunDir, *, model=None, tokenizer=None, task=None) -> Path:
    """Train with PPO, checkpoint, evaluate; returns the final checkpoint. Resumes when `run`
    already holds checkpoints of this config."""
    return run_rl(cfg, run, "ppo", _step_fn, need_ref=cfg.train.kl_coef > 0, model=model, tokenizer=tokenizer,
                  task=task, make_modules=make_value_head)
