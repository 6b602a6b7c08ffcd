"""The math of mechrl's RL loops, as pure functions: tensors in, `(loss, metrics)` out.

GRPO (`grpo.py`) uses `group_advantages` and `grpo_loss`; PPO (`ppo.py`) uses `gae`,
`masked_whiten`, `ppo_policy_loss`, `ppo_value_loss` and `entropy_from_logits`. Nothing here
knows about models, tokenizers or optimisers, so each function can be checked against a
reference on hand-made tensors (tests/test_losses.py holds `grpo_loss` to TRL 1.16's
`GRPOTrainer._compute_loss`, loss and every parameter gradient to 1e-5).

Metrics are dicts of detached 0-d tensors (no `.item()`, so no device sync), keyed without a
namespace (`kl`, `clip_ratio/low_mean`); the loop adds `policy/` and friends.

Shapes: B sequences, T completion tokens (right-padded), V vocabulary. `mask` is 1 on real
completion tokens and 0 on padding; any dtype (bool, long, float) is accepted.

Gradient accumulation: a loss takes `total_sequences` / `total_tokens`, the counts over the whole
optimisation step (all micro-batches). With them, each micro-batch's loss is normalised so that
the SUM of the micro-batch losses (and so of their gradients) equals the full-batch loss exactly,
whatever the micro-batch size. Without them, a batch is normalised by its own counts.

Simplifications against TRL: token-level importance sampling only (no GSPO sequence level), no
vLLM importance-sampling correction, no entropy masking or bonus, no `delta` clamp, and only the
"grpo", "dapo" and "dr_grpo" aggregations. Rewards are assumed finite (TRL's NaN handling for
unscorable completions is left out: a NaN reward gives NaN advantages for its group).

    adv, m = group_advantages(rewards, group_size=8)                   # (B,)
    loss, m = grpo_loss(logp, old_logp, adv, mask, loss_type="dapo")    # logp (B, T) with grad
"""

from __future__ import annotations

import torch

GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
REWARD_SCALES = ("group", "batch", "none")
ADV_EPS = 1e-4  # TRL adds this to the std before dividing (not 1e-8): zero-std groups get advantage 0


# ---------------------------------------------------------------------------------------------
# helpers


def _check_shapes(where: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Raise if any of `others` (None skipped) has a shape other than `ref`'s, naming both."""
    for name, t in others.items():
        if t is not None and t.shape != ref.shape:
            raise ValueError(f"{where}: {name} has shape {tuple(t.shape)} but {ref_name} has shape "
                             f"{tuple(ref.shape)}; they must match")


def _check_2d(where: str, name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{where}: {name} must be (B, T), got shape {tuple(t.shape)}")


def _per_token_advantages(where: str, advantages: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """(B,) or (B, T) advantages -> broadcastable against (B, T): (B, 1) or (B, T)."""
    if advantages.dim() == 1:
        if advantages.shape[0] != logp.shape[0]:
            raise ValueError(f"{where}: advantages has shape {tuple(advantages.shape)} but logp has "
                             f"{logp.shape[0]} sequences (shape {tuple(logp.shape)})")
        return advantages.unsqueeze(1)  # (B, 1)
    _check_shapes(where, "logp", logp, advantages=advantages)
    return advantages  # (B, T)


def _divide(x: torch.Tensor, denom: int | float | torch.Tensor) -> torch.Tensor:
    """x / max(denom, 1), without a device sync when `denom` is a tensor."""
    if isinstance(denom, torch.Tensor):
        return x / denom.to(x.dtype).clamp(min=1.0)
    return x / max(float(denom), 1.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1 (0 when the mask is empty). 0-d tensor."""
    _check_shapes("masked_mean", "x", x, mask=mask)
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked positions, as TRL's `masked_whiten` (unbiased variance,
    1e-8 inside the square root). With `shift_mean=False` the mean is added back (only the scale
    changes). Masked-out positions are set to 0 (TRL leaves them at an arbitrary value)."""
    _check_shapes("masked_whiten", "x", x, mask=mask)
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n.clamp(min=1.0)
    var = (((x - mean) ** 2) * m).sum() / n.clamp(min=1.0)
    var = var * n / (n - 1).clamp(min=1.0)  # Bessel's correction, as TRL's masked_var(unbiased=True)
    white = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        white = white + mean
    return white * m


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || ref) from samples of the policy:
    exp(ref - logp) - (ref - logp) - 1. Unbiased, always >= 0 (Schulman's "Approximating KL")."""
    _check_shapes("kl_k3", "logp", logp, ref_logp=ref_logp)
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last axis: (B, T, V) -> (B, T).
    Via log_softmax (no overflow for large logits); -inf logits (filtered tokens) contribute 0,
    with finite gradients. Pass float32 logits for a precise value."""
    logp = torch.log_softmax(logits, dim=-1)  # (B, T, V)
    p = logp.exp()
    logp = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))  # p = 0 there: 0 * log 0 = 0
    return -(p * logp).sum(-1)


# ---------------------------------------------------------------------------------------------
# GRPO


def group_advantages(rewards: torch.Tensor, group_size: int,
                     scale: str = "group") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Group-relative advantages, exactly as TRL 1.16's GRPOTrainer ("sum_then_normalize"):

        A_i = (r_i - mean of r over i's group) / (std + 1e-4)

    rewards: (B,) with B = n_prompts * group_size, the completions of one prompt contiguous.
    `scale`: "group" divides by the group's std, "batch" by the std of the whole batch, "none"
    not at all (Dr. GRPO). Stds are unbiased (Bessel), as TRL's `nanstd`; a group of one has std 0.

    Metrics: `reward_std`, the mean over groups of the group std (TRL's own `reward_std` is the
    std over the whole batch); `frac_reward_zero_std`, the fraction of completions whose scaling
    std is ~0, as TRL logs it (so with scale="batch" it is 0 or 1, from the batch std).
    """
    if scale not in REWARD_SCALES:
        raise ValueError(f"group_advantages: unknown scale {scale!r}; valid: {', '.join(REWARD_SCALES)}")
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be (B,), got shape {tuple(rewards.shape)}")
    B = rewards.shape[0]
    if group_size < 1 or B % group_size != 0:
        raise ValueError(f"group_advantages: {B} rewards do not split into groups of {group_size} "
                         "(B must be n_prompts * group_size, each prompt's completions contiguous)")
    grouped = rewards.view(-1, group_size)  # (n_prompts, G)
    mean = grouped.mean(1).repeat_interleave(group_size)  # (B,)
    if group_size > 1:
        group_std = grouped.std(1, correction=1)  # (n_prompts,)
    else:
        group_std = torch.zeros(B // group_size, dtype=rewards.dtype, device=rewards.device)
    if scale == "batch":
        std = (rewards.std(correction=1) if B > 1 else torch.zeros((), dtype=rewards.dtype,
                                                                     device=rewards.device)).expand(B)  # (B,)
    else:
        std = group_std.repeat_interleave(group_size)  # (B,); for "none" only used for the metric
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + ADV_EPS)
    is_std_zero = torch.isclose(std, torch.zeros_like(std))  # (B,), TRL's test
    metrics = {"reward_std": group_std.mean().detach(), "frac_reward_zero_std": is_std_zero.float().mean()}
    return advantages, metrics


def kept_group_advantages(rewards: torch.Tensor, keep: torch.Tensor, group_size: int,
                          scale: str = "group") -> torch.Tensor:
    """`group_advantages` as if the dropped samples had never been generated: each group's mean and
    std come from its kept rows only (filtering a detector's flagged samples must not let them set
    the baseline of the others). Dropped rows get advantage 0 (they are left out of the loss).

    rewards, keep: (B,) with B = n_prompts * group_size; keep is bool. A group with one kept row
    has std 0 (advantage 0), as a group of one does in `group_advantages`. With every row kept this
    equals `group_advantages` (tests hold it)."""
    if scale not in REWARD_SCALES:
        raise ValueError(f"kept_group_advantages: unknown scale {scale!r}; valid: {', '.join(REWARD_SCALES)}")
    if rewards.dim() != 1 or keep.shape != rewards.shape or keep.dtype != torch.bool:
        raise ValueError(f"kept_group_advantages: rewards (B,) and a bool keep (B,) are needed, got "
                         f"{tuple(rewards.shape)} and {tuple(keep.shape)} {keep.dtype}")
    B = rewards.shape[0]
    if group_size < 1 or B % group_size != 0:
        raise ValueError(f"kept_group_advantages: {B} rewards do not split into groups of {group_size}")
    k = keep.to(rewards.dtype).view(-1, group_size)  # (n_prompts, G)
    r = rewards.view(-1, group_size) * k
    count = k.sum(1)  # (n_prompts,)
    mean = r.sum(1) / count.clamp(min=1)
    dev = (rewards.view(-1, group_size) - mean[:, None]) * k  # (n_prompts, G), 0 on dropped rows
    group_std = torch.where(count > 1, ((dev ** 2).sum(1) / (count - 1).clamp(min=1)).sqrt(),
                            torch.zeros_like(count))
    if scale == "batch":
        n = int(keep.sum())
        kept = rewards[keep]
        std = (kept.std(correction=1) if n > 1 else torch.zeros((), dtype=rewards.dtype,
                                                                device=rewards.device)).expand(B)
    else:
        std = group_std.repeat_interleave(group_size)  # (B,)
    adv = dev.flatten()
    if scale != "none":
        adv = adv / (std + ADV_EPS)
    return adv * keep.to(rewards.dtype)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              loss_type: str, epsilon_low: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
              ref_logp: torch.Tensor | None = None, kl_bias_correction: bool = True,
              max_completion_length: int | None = None, total_sequences: int | torch.Tensor | None = None,
              total_tokens: int | torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO objective with token-level importance ratios, as TRL 1.16's
    `GRPOTrainer._compute_loss`:

        r_t = exp(logp - old_logp)
        l_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A) + beta * r_t * k3(logp, ref_logp)

    aggregated by `loss_type` (why three: they weight long and short completions differently):
      "grpo":    mean over sequences of each sequence's token mean   (sum_i mean_t l / total_sequences)
      "dapo":    mean over all tokens of the step                    (sum l / total_tokens)
      "dr_grpo": sum / (sequences * max_completion_length), a constant normaliser (no length bias)

    logp: (B, T) with grad; old_logp, ref_logp, mask: (B, T); advantages: (B,) or (B, T).
    `total_sequences` / `total_tokens` are the counts over the whole optimisation step, for
    gradient accumulation (module docstring); None means this batch's own counts, which gives
    TRL's loss without accumulation. `epsilon_high=None` means `epsilon_low` (TRL's default).

    `kl_bias_correction` (TRL's `use_bias_correction_kl`, on by default in TRL 1.16): the KL term
    is weighted by the importance ratio r_t (with its gradient), which makes its gradient the
    unbiased gradient of KL(pi || ref) when the tokens were sampled from the old policy
    (DeepSeek-V3.2). It changes the gradient even on-policy, where r_t = 1 but d r_t = d logp.
    False gives the plain beta * k3 of the GRPO paper.

    Metrics (masked means over this batch's tokens): `clip_ratio/low_mean` (ratio below 1-eps
    with A < 0), `clip_ratio/high_mean` (above 1+eps with A > 0), `clip_ratio/region_mean`,
    `ratio_mean`, and `kl` when beta > 0 (of the KL term as it enters the loss, so ratio-weighted
    under `kl_bias_correction`, as TRL logs it).
    """
    where = "grpo_loss"
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"{where}: unknown loss_type {loss_type!r}; valid: {', '.join(GRPO_LOSS_TYPES)}")
    _check_2d(where, "logp", logp)
    _check_shapes(where, "logp", logp, old_logp=old_logp, mask=mask, ref_logp=ref_logp)
    adv = _per_token_advantages(where, advantages, logp)  # (B, 1) or (B, T)
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"{where}: beta={beta} needs ref_logp (the reference model's log-probs)")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError(f"{where}: loss_type='dr_grpo' needs max_completion_length (its constant normaliser)")
    if isinstance(total_sequences, int) and total_sequences < logp.shape[0]:
        raise ValueError(f"{where}: total_sequences={total_sequences} is less than this batch's "
                         f"{logp.shape[0]} sequences")
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)  # (B, T)

    ratio = torch.exp(logp - old_logp)  # (B, T)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)  # (B, T)
    if beta != 0.0:
        kl = kl_k3(logp, ref_logp)  # (B, T)
        if kl_bias_correction:
            kl = kl * ratio
        per_token = per_token + beta * kl

    B = logp.shape[0]
    if loss_type == "grpo":
        seq_mean = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,)
        loss = _divide(seq_mean.sum(), B if total_sequences is None else total_sequences)
    elif loss_type == "dapo":
        loss = _divide((per_token * mask).sum(), mask.sum() if total_tokens is None else total_tokens)
    else:  # dr_grpo
        n_seq = B if total_sequences is None else total_sequences
        loss = _divide((per_token * mask).sum(), n_seq * max_completion_length)

    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(logp.dtype)  # (B, T)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(logp.dtype)
        metrics = {
            "clip_ratio/low_mean": masked_mean(low, mask),
            "clip_ratio/high_mean": masked_mean(high, mask),
            "clip_ratio/region_mean": masked_mean(torch.maximum(low, high), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
        if beta != 0.0:
            metrics["kl"] = masked_mean(kl, mask)
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# PPO


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the tokens of each completion.

        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}

    rewards, values, mask: (B, T), mask right-padded (1s then 0s). The completion ends at its last
    real token: the value after it is 0 (terminal) and nothing flows back from the padding, so
    whatever rewards/values hold at padded positions is ignored. Returns (advantages, returns),
    both (B, T) and 0 at padding; returns = advantages + values (the value targets).
    A reversed loop over T, vectorised over B. One device sync (the right-padding check).
    """
    where = "gae"
    _check_2d(where, "rewards", rewards)
    _check_shapes(where, "rewards", rewards, values=values, mask=mask)
    m = mask.to(rewards.dtype)  # (B, T)
    if (m[:, 1:] > m[:, :-1]).any():
        raise ValueError(f"{where}: mask must be right-padded (1s then 0s in every row); "
                         "a left-padded or gapped mask would let padding leak into the advantages")
    B, T = rewards.shape
    values = values * m  # (B, T)
    adv = torch.zeros_like(rewards)  # (B, T)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)  # A_{t+1}, (B,)
    for t in reversed(range(T)):
        # m[:, t+1] = 0 marks the end of a completion: no bootstrap value, no carried advantage
        cont = m[:, t + 1] if t + 1 < T else torch.zeros_like(last)  # (B,)
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)  # 0 at padding (masked above)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * cont * last
        adv[:, t] = last
    adv = adv * m
    return adv, (adv + values) * m


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_range: float,
                    total_tokens: int | torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate per token, masked mean (cleanrl / TRL's old PPOTrainer):

        loss = mean_t max(-A r_t, -A clip(r_t, 1 - c, 1 + c)),   r_t = exp(logp - old_logp)

    logp: (B, T) with grad; old_logp, mask: (B, T); advantages: (B, T) or (B,).
    `total_tokens`: the token count of the whole minibatch when accumulating micro-batches
    (the micro-batch losses then sum to the minibatch loss); None = this batch's own count.
    Metrics: `clipfrac` (tokens where the clipped term is the larger), `approx_kl`
    ((r - 1) - log r, k3 from the old policy, masked mean), `ratio_mean`.
    """
    where = "ppo_policy_loss"
    _check_2d(where, "logp", logp)
    _check_shapes(where, "logp", logp, old_logp=old_logp, mask=mask)
    adv = _per_token_advantages(where, advantages, logp)  # (B, 1) or (B, T)
    m = mask.to(logp.dtype)  # (B, T)
    log_ratio = logp - old_logp  # (B, T)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    per_token = torch.max(pg1, pg2)  # (B, T)
    loss = _divide((per_token * m).sum(), m.sum() if total_tokens is None else total_tokens)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((pg2 > pg1).to(logp.dtype), m),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return loss, metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range_value: float | None = None,
                   total_tokens: int | torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Value loss 0.5 * masked mean of max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old,
    -c, c) (cleanrl / TRL's old PPOTrainer): the value head may not move a prediction by more than
    c per update in the direction that lowers the loss. `clip_range_value=None`: plain 0.5 MSE.
    values (with grad), old_values, returns, mask: (B, T). `total_tokens` as in `ppo_policy_loss`.
    Metric: `value_clipfrac` (tokens where the clipped error is the larger; 0 without clipping).
    """
    where = "ppo_value_loss"
    _check_2d(where, "values", values)
    _check_shapes(where, "values", values, old_values=old_values, returns=returns, mask=mask)
    m = mask.to(values.dtype)  # (B, T)
    err = (values - returns) ** 2  # (B, T)
    if clip_range_value is not None:
        v_clip = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
        err_clip = (v_clip - returns) ** 2
        per_token = torch.max(err, err_clip)
        clipped = (err_clip > err).to(values.dtype)
    else:
        per_token = err
        clipped = torch.zeros_like(err)
    loss = 0.5 * _divide((per_token * m).sum(), m.sum() if total_tokens is None else total_tokens)
    with torch.no_grad():
        metrics = {"value_clipfrac": masked_mean(clipped.detach(), m)}
    return loss, metrics
