"""Reward components read from a frozen SARM-form reward model, for RL with feature control:

    R_total = R_RM - sum_i alpha_i * 1[z_i > tau_i] - beta * KL(z_policy || z_human)

Every z is the FROZEN reward model's SAE latents on the policy's text (prompt + completion, scored as the
RM was trained): never the policy's own activations, never a gradient through the RM or the SAE. Each
term is its own registered reward component, so each is logged per step (`reward/<name>/mean`) and they
compose by weight in the recipe's `reward:` list, with GRPO and PPO alike:

    sarm_score        R_RM = w . z, optionally with latents clamped or head weights zeroed / scaled first
    feature_penalty   -sum_i alpha_i * 1[z_i > tau_i]                              (weight 1: alphas inside)
    latent_kl         -r(z), r the cross-fitted density-ratio estimate of log p_policy(z) / p_human(z) on the
                      buffer's latents (`density_ratio.OnlineDensityRatio`); its batch mean is -KL(policy ||
                      human), so weight beta gives -beta * KL. Per sample, so that it moves GRPO's
                      group-relative advantages (a batch constant would not).
    rm_score          monitor (weight 0): w . z as the reward model was trained (no clamp, no edit), so arms
                      whose optimised score is edited still log the same RM score
    latent_firing_kl  monitor (weight 0): sum over the buffer's latents of KL(Bern(policy firing rate) ||
                      Bern(human firing rate)), the same value for every sample of the batch
    feature_fires_<i> monitor (weight 0): 1[z_i > tau] for latent i (its batch mean is its firing rate)

`sarm_score`, `feature_penalty` and `latent_kl` are stateful rewards (`register_reward_factory`): built once
per run, `latent_kl` with its own buffer. Loaded reward models are shared by path (they are frozen), and
the latents of the last batch are cached, so all components of a step run the RM once.

    reward:
      - {name: sarm_score, params: {sarm: runs/fc/sarm}}
      - {name: feature_penalty, params: {sarm: runs/fc/sarm, features: [12, 40], taus: [0.0, 0.5], alphas: 1.0}}
      - {name: latent_kl, weight: 0.1, params: {sarm: runs/fc/sarm, human: runs/fc/human_latents.safetensors}}

The density-ratio state (policy buffer, classifiers) is not checkpointed: a resumed run refits it from
the batches it sees after resuming.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mechrl.config import ConfigError
from mechrl.control.density_ratio import DensityRatioConfig, OnlineDensityRatio, firing_rate_kl
from mechrl.control.sarm import FeatureIndexError, SAEReward
from mechrl.rewards.registry import register_reward, register_reward_factory, register_reward_pattern

__all__ = ["load_cached", "penalty_values", "check_penalty", "build_human_buffer", "load_human_buffer"]

_LOADED: dict[tuple, SAEReward] = {}


def load_cached(path: str | Path, device: str = "cpu") -> SAEReward:
    """The SAEReward at `path`, loaded once per process (keyed by path and the folder's modification time,
    so a rewritten folder is loaded again)."""
    p = Path(path).expanduser().resolve()
    marker = p / "sarm.json" if (p / "sarm.json").is_file() else p / "config.json"
    if not marker.is_file():
        raise ConfigError(f"sarm: {path} is not a SAEReward folder (no sarm.json or config.json)")
    key = (str(p), marker.stat().st_mtime_ns, device)
    if key not in _LOADED:
        _LOADED[key] = SAEReward.load(p, device=device)
    return _LOADED[key]


def check_penalty(sarm: SAEReward, features: Sequence[int], taus: Sequence[float] | float,
                  alphas: Sequence[float] | float) -> tuple[list[int], list[float], list[float]]:
    """Validated (indices, taus, alphas): one tau and alpha per feature (a single number applies to all),
    indices in range, taus finite, alphas finite and >= 0. Problems raise one-line errors."""
    idx = [sarm.check_index(i, "penalised feature") for i in features]
    if not idx:
        raise ConfigError("feature_penalty: no features to penalise")
    if len(set(idx)) != len(idx):
        raise ConfigError(f"feature_penalty: a feature is listed twice: {idx}")

    def per_feature(v, name: str) -> list[float]:
        vals = [v] * len(idx) if isinstance(v, (int, float)) and not isinstance(v, bool) else list(v)
        if len(vals) != len(idx):
            raise ConfigError(f"feature_penalty: {len(vals)} {name} for {len(idx)} features; give one per feature "
                              "or a single number")
        for f, x in zip(idx, vals):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise ConfigError(f"feature_penalty: {name[:-1]} of feature {f} must be a finite number, got {x!r}")
        return [float(x) for x in vals]

    t, a = per_feature(taus, "taus"), per_feature(alphas, "alphas")
    bad = [(f, x) for f, x in zip(idx, a) if x < 0]
    if bad:
        raise ConfigError(f"feature_penalty: alpha of feature {bad[0][0]} is {bad[0][1]}; alphas must be >= 0 "
                          "(a negative alpha would reward the feature)")
    return idx, t, a


def penalty_values(z: torch.Tensor, indices: Sequence[int], taus: Sequence[float],
                   alphas: Sequence[float]) -> torch.Tensor:
    """-sum_i alpha_i * 1[z_i > tau_i] for latents z (B, d_sae) -> (B,)."""
    idx = torch.as_tensor(list(indices), dtype=torch.long, device=z.device)
    fires = z[:, idx] > torch.as_tensor(list(taus), dtype=z.dtype, device=z.device)  # (B, m)
    return -(fires.to(z.dtype) * torch.as_tensor(list(alphas), dtype=z.dtype, device=z.device)).sum(1)


# ----------------------------------------------------------------------------------------------
# The human latent buffer
# ----------------------------------------------------------------------------------------------

def build_human_buffer(sarm: SAEReward, prompts: Sequence[str], texts: Sequence[str], indices: Sequence[int],
                       path: str | Path) -> Path:
    """Save the latents `indices` of human texts (prompts + texts, e.g. corpus stories or demonstrations) as a
    safetensors file {"latents": (N, m), "indices": (m,)} that `latent_kl` reads."""
    from safetensors.torch import save_file

    idx = [sarm.check_index(i, "human buffer") for i in indices]
    if not idx:
        raise ValueError("build_human_buffer: no latent indices")
    z = sarm.raw_latents(list(prompts), list(texts))[:, idx].float().cpu().contiguous()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": z, "indices": torch.tensor(idx, dtype=torch.long)}, str(p))
    return p


def load_human_buffer(path: str | Path, d_sae: int) -> tuple[np.ndarray, list[int]]:
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"latent_kl: human buffer {path} does not exist (build it with build_human_buffer)")
    t = load_file(str(p))
    if set(t) != {"latents", "indices"}:
        raise ConfigError(f"latent_kl: {path} holds {sorted(t)}; expected 'latents' and 'indices'")
    idx = t["indices"].tolist()
    if t["latents"].dim() != 2 or t["latents"].shape[1] != len(idx):
        raise ConfigError(f"latent_kl: {path}: latents {tuple(t['latents'].shape)} do not match {len(idx)} indices")
    if any(not 0 <= i < d_sae for i in idx):
        raise FeatureIndexError(f"latent_kl: {path} names latents outside 0..{d_sae - 1}")
    return t["latents"].double().numpy(), idx


# ----------------------------------------------------------------------------------------------
# Registered reward components
# ----------------------------------------------------------------------------------------------

def _int_keys(d: dict | None, what: str) -> dict[int, float]:
    out = {}
    for k, v in (d or {}).items():
        try:
            out[int(k)] = v
        except (TypeError, ValueError):
            raise FeatureIndexError(f"{what}: feature index must be an integer, got {k!r}") from None
    return out


@register_reward_factory("sarm_score")
def sarm_score(sarm: str, clamp_set: dict | None = None, clamp_scale: dict | None = None,
               head_zero: list[int] | None = None, head_scale: dict | None = None, device: str = "cpu"):
    """R_RM = w . z of the SAEReward at `sarm`, after clamping latents (`clamp_set` {i: value}, `clamp_scale`
    {i: factor}) and editing head weights (`head_zero` [i, ...], `head_scale` {i: factor}) when given."""
    model = load_cached(sarm, device)
    cset, cscale = _int_keys(clamp_set, "sarm_score.clamp_set"), _int_keys(clamp_scale, "sarm_score.clamp_scale")
    hscale = _int_keys(head_scale, "sarm_score.head_scale")
    zero = list(head_zero or [])
    with model.clamp(set=cset, scale=cscale), model.edit_head(zero=zero, scale=hscale):
        pass  # validates every index and value now, before training starts

    def fn(prompts: list[str], completions: list[str], examples: list[dict]) -> list[float]:
        z = model.raw_latents(prompts, completions)
        with model.clamp(set=cset, scale=cscale), model.edit_head(zero=zero, scale=hscale):
            return model.score_latents(model.apply_clamps(z)).tolist()

    return fn


@register_reward_factory("feature_penalty")
def feature_penalty(sarm: str, features: list[int], taus: list[float] | float = 0.0,
                    alphas: list[float] | float = 1.0, device: str = "cpu"):
    """-sum_i alpha_i * 1[z_i > tau_i] over the penalised `features` (unclamped latents of the frozen RM)."""
    model = load_cached(sarm, device)
    idx, t, a = check_penalty(model, features, taus, alphas)

    def fn(prompts: list[str], completions: list[str], examples: list[dict]) -> list[float]:
        return penalty_values(model.raw_latents(prompts, completions), idx, t, a).tolist()

    return fn


@register_reward_factory("latent_kl")
def latent_kl(sarm: str, human: str, n_folds: int = 2, clip: float = 10.0, C: float = 1.0,
              features: str = "linear", refresh_every: int = 5, buffer_size: int = 1024, seed: int = 0,
              device: str = "cpu"):
    """-log p_policy(z) / p_human(z) per sample on the human buffer's latents (see the module docstring)."""
    model = load_cached(sarm, device)
    hz, idx = load_human_buffer(human, model.d_sae)
    cfg = DensityRatioConfig(n_folds=n_folds, clip=clip, C=C, features=features, refresh_every=refresh_every,
                             buffer_size=buffer_size, seed=seed)
    ratio = OnlineDensityRatio(hz, cfg)

    def fn(prompts: list[str], completions: list[str], examples: list[dict]) -> list[float]:
        z = model.raw_latents(prompts, completions)[:, idx].double().cpu().numpy()
        return (-ratio(z)).tolist()

    return fn


@register_reward_factory("latent_firing_kl")
def latent_firing_kl(sarm: str, human: str, device: str = "cpu"):
    """Monitor: sum over the buffer's latents of the Bernoulli KL between the batch's and the human texts'
    firing rates (z > 0), the same value for every sample."""
    model = load_cached(sarm, device)
    hz, idx = load_human_buffer(human, model.d_sae)
    human_fire = hz > 0

    def fn(prompts: list[str], completions: list[str], examples: list[dict]) -> list[float]:
        z = model.raw_latents(prompts, completions)[:, idx].cpu().numpy()
        kl = float(firing_rate_kl(z > 0, human_fire).sum())
        return [kl] * len(completions)

    return fn


@register_reward("rm_score")
def rm_score(prompts: list[str], completions: list[str], examples: list[dict], sarm: str,
             device: str = "cpu") -> list[float]:
    """w . z of the SAEReward at `sarm` as trained (no clamp, no head edit): a monitor."""
    model = load_cached(sarm, device)
    return model.score_latents(model.raw_latents(prompts, completions)).tolist()


@register_reward_pattern(r"feature_fires_(\d+)", example="feature_fires_12")
def _feature_fires(match: re.Match):
    """`feature_fires_<i>`: 1[z_i > tau] of latent i of the SAEReward at `sarm` (a monitor: weight 0)."""
    i = int(match.group(1))

    def fn(prompts: list[str], completions: list[str], examples: list[dict], sarm: str, tau: float = 0.0,
           device: str = "cpu") -> list[float]:
        model = load_cached(sarm, device)
        j = model.check_index(i, "feature_fires")
        if not math.isfinite(tau):
            raise ConfigError(f"feature_fires_{i}: tau must be finite, got {tau}")
        return (model.raw_latents(prompts, completions)[:, j] > tau).float().tolist()

    fn.__name__ = fn.__qualname__ = match.group(0)
    return fn
