"""GRPO: group-relative policy optimisation, top to bottom.

Each step:
  1. draw `prompts_per_step` prompts from the environment and sample `num_generations`
     completions of each with mechrl's KV-cache sampler (B = prompts x generations sequences,
     the G completions of a prompt contiguous);
  2. score them with the configured rewards (each component logged on its own);
  3. advantages relative to the group: (r - mean_group) / (std + eps) (`losses.group_advantages`);
  4. `num_iterations` optimiser updates on that batch with the clipped token-level objective of
     `losses.grpo_loss` ("grpo", "dapo" or "dr_grpo"), plus `beta` x KL to the reference model;
     gradients accumulate over micro-batches, normalised so that the result does not depend on
     the micro-batch size.

Each step's compute is counted in token-passes (`compute.py`: sampling 1 x, each no-grad pass 1 x,
each update 3 x, a group's rows sharing their prompt's pass) and logged as `compute/step_token_passes`.

The loss matches TRL's GRPOTrainer on the same batch (tests hold it to 1e-5). Under `accelerate
launch` each of N processes takes prompts_per_step / N whole groups, and the gradients are averaged
over processes with normalisers chosen so that the update equals one process's on the global batch
(`distributed.py`; tests/test_distributed.py holds it to that). What is left out:
vLLM, sequence-level importance sampling, and the many loss variants TRL carries.

Speed (docs/speed.md): on CUDA the sampler replays a captured decode step (`train.decode`,
`decode_graph.py`); `train.dtype` (bf16 autocast around every forward pass, fp32 master weights),
`train.adamw` and `train.compile_logprobs` are the update's options (`fast_update.py`). On CPU the
defaults leave the step as it was.

Old log-probs: with one iteration the ratio is exactly 1 (old = current, detached), as in TRL;
with more, they come from one no-grad forward pass before the first update.

Where later methods plug in (`GRPOHooks`): `before_step` runs before sampling; `on_batch` sees each scored batch and may attach
per-sample labels (e.g. a reward-hacking detector's flags) or change advantages; `logprobs` computes
the policy's log-probs of a micro-batch and is where per-sample gradient masks enter (e.g.
gradient routing between two adapters, `routing.py`); `partition` picks the micro-batches (e.g.
homogeneous ones for such masks); `after_step` runs after each update (e.g. a periodic evaluation).
The loop itself stays as it is.

    mechrl grpo recipes/cards-grpo.yaml model.path=runs/cards-sft_s0/checkpoints/step-2000
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mechrl.config import GRPORunConfig
from mechrl.envs import StepResult
from mechrl.errors import TrainingDiverged
from mechrl.runs.rundir import RunDir
from mechrl.models.loading import resolve_device
from mechrl.train.decode_graph import DecodeStats
from mechrl.train.fast_update import autocast, check_dtype, compiled_logprobs
from mechrl.train.compute import STEP_KEY, ComputeCounter, pass_tokens
from mechrl.train.losses import group_advantages, grpo_loss
from mechrl.train.rlcommon import (
    RLState, Timer, check_finite, draw_prompts, micro_batches, run_rl, scalars, update_micro_batch,
)
from mechrl.train.rollout import completion_logprobs, encode_prompts, generate

log = logging.getLogger(__name__)


@dataclass
class GRPOBatch:
    """One generation batch. B = prompts x generations, P prompt length, T completion length."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, T)
    completion_mask: torch.Tensor  # (B, T) 1 on generated tokens up to and including EOS
    rewards: torch.Tensor  # (B,) total reward
    advantages: torch.Tensor  # (B,) or (B, T)
    texts: list[str]
    prompts: list[str]
    result: StepResult  # reward components and per-sample infos from the environment
    sampler_logp: torch.Tensor  # (B, T) log-probs of the sampled tokens under the sampling distribution
    old_logp: torch.Tensor | None = None  # (B, T); None: the ratio is 1 (one iteration)
    ref_logp: torch.Tensor | None = None  # (B, T); set when beta > 0
    labels: dict[str, torch.Tensor] = field(default_factory=dict)  # per-sample labels from hooks, (B,)
    examples: list[dict] = field(default_factory=list)  # the environment's example of each sample
    keep: torch.Tensor | None = None  # (B,) bool: the rows the loss uses (None: all); filtering drops rows
    decode: DecodeStats | None = None  # how the sampler's decode steps ran (graph replays, capture time)
    compute: ComputeCounter = field(default_factory=ComputeCounter)  # this step's token-passes (`compute.py`)

    def pass_tokens(self, rows: slice | torch.Tensor | None = None) -> int:
        """Real tokens of one pass over `rows` (a group's rows share their prompt's pass)."""
        return pass_tokens(self.prompt_ids, self.prompt_mask, self.completion_mask, rows)

    def loss_rows(self) -> torch.Tensor:
        """Indices (n,) of the rows the policy loss uses, on the CPU."""
        B = self.rewards.numel()
        if self.keep is None:
            return torch.arange(B)
        if self.keep.shape != (B,) or self.keep.dtype != torch.bool:
            raise ValueError(f"GRPOBatch.keep must be a bool tensor of shape ({B},), got "
                             f"{tuple(self.keep.shape)} {self.keep.dtype}")
        return self.keep.cpu().nonzero().flatten()


class GRPOHooks:
    """Extension points; the default does nothing special."""

    def before_step(self, st: RLState, step: int) -> None:
        """Called at the start of each step, before sampling (e.g. to switch an adapter off from
        some step on). A resumed run calls it again for its first step, so state set here must
        follow from `step` alone."""

    def on_batch(self, st: RLState, batch: GRPOBatch) -> dict[str, float]:
        """Called after scoring, before any forward pass. May set `batch.labels` or change
        `batch.advantages`. Returns metrics to log (namespaced keys)."""
        return {}

    def partition(self, st: RLState, batch: GRPOBatch, size: int | None) -> list[slice | torch.Tensor]:
        """The micro-batches of an update: slices or index tensors covering each of the batch's loss
        rows (`batch.loss_rows()`, all rows unless a hook set `batch.keep`) once, at most `size` each.
        Default: contiguous chunks. Routing uses it for homogeneous micro-batches."""
        if batch.keep is None:
            return micro_batches(batch.rewards.numel(), size)
        rows = batch.loss_rows()
        return [rows[s] for s in micro_batches(rows.numel(), size)] if rows.numel() else []

    def logprobs(self, st: RLState, batch: GRPOBatch, mb: slice | torch.Tensor) -> torch.Tensor:
        """Per-token log-probs (len(mb), T) of the policy on micro-batch `mb`, with gradients. Runs
        inside the update's autocast context (`train.dtype`); returns float32."""
        return completion_logprobs(st.policy, batch.prompt_ids[mb], batch.prompt_mask[mb],
                                   batch.completion_ids[mb], batch.completion_mask[mb],
                                   temperature=st.cfg.train.temperature, logprob_fn=_logprob_head(st))

    def after_step(self, st: RLState, step: int, batch: GRPOBatch) -> dict[str, float]:
        """Called after each step's update (e.g. a periodic evaluation). Returns metrics to log."""
        return {}


def _logprob_head(st: RLState):
    """The head from logits to log-probs: the compiled one with `train.compile_logprobs`, else the default."""
    return compiled_logprobs() if st.cfg.train.compile_logprobs else None


@torch.no_grad()
def _logprobs_no_grad(st: RLState, model, batch: GRPOBatch, size: int | None) -> torch.Tensor:
    t = st.cfg.train
    parts = []
    with autocast(t.dtype, st.device):
        for mb in micro_batches(batch.prompt_ids.size(0), size):
            parts.append(completion_logprobs(model, batch.prompt_ids[mb], batch.prompt_mask[mb], batch.completion_ids[mb],
                                             batch.completion_mask[mb], temperature=t.temperature,
                                             logprob_fn=_logprob_head(st)))
            batch.compute.forward(batch.pass_tokens(mb))
    return torch.cat(parts, 0)


def rollout(st: RLState, timer: Timer) -> GRPOBatch:
    """Sample, score and compute advantages for one step's batch (this process's share of it)."""
    t = st.cfg.train
    G = t.num_generations
    items = draw_prompts(st)
    group_items = [it for it in items for _ in range(G)]  # the G completions of a prompt are contiguous
    prompts = [it.prompt for it in group_items]
    with timer("generate"):
        ids, mask = encode_prompts(st.tokenizer, [it.prompt for it in items], st.device)  # each prompt once
        with autocast(t.dtype, st.device):
            roll = generate(st.policy, st.tokenizer, prompt_ids=ids.repeat_interleave(G, 0),
                            prompt_mask=mask.repeat_interleave(G, 0), max_new_tokens=t.max_new_tokens,
                            temperature=t.temperature, top_k=t.top_k, top_p=t.top_p, generator=st.generator,
                            decode=t.decode)
    with timer("reward"):
        result = st.env.step(group_items, roll.texts)
    rewards = result.rewards.total.to(st.device, torch.float32)  # (B,)
    advantages, _ = group_advantages(rewards, G, t.scale_rewards)
    batch = GRPOBatch(roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask, rewards,
                      advantages, roll.texts, prompts, result, roll.logprobs,
                      examples=[it.example for it in group_items], decode=roll.decode)
    batch.compute.forward(batch.pass_tokens())  # sampling: each distinct prompt prefilled once
    return batch


def policy_update(st: RLState, batch: GRPOBatch, hooks: GRPOHooks,
                  micro_batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """`num_iterations` optimiser updates on one batch; returns (loss, grad_norm, loss metrics).
    Gradients accumulate over micro-batches; the losses are normalised by the whole batch's
    sequence and token counts, so the update does not depend on `micro_batch_size`.

    With N processes, `batch` is this process's share and the gradients are averaged over
    processes, so each normaliser is (global count) / N: the local sequence count B (the shares are
    equal) and the all-reduced token count / N. The returned loss and metrics are this process's;
    their mean over processes is the global batch's."""
    t = st.cfg.train
    rows = batch.loss_rows()  # (n,) the rows the loss uses: all, unless a hook dropped some (filtering)
    B = rows.numel()
    mask = batch.completion_mask.float()  # (B_all, T)
    world = st.dist.world
    if batch.keep is not None and world > 1:
        raise RuntimeError("GRPO: dropping rows from the loss (batch.keep) runs in one process only; the "
                           "processes' shares would no longer be equal")
    n_tokens = st.dist.sum(mask.sum()) / world if world > 1 else int(mask[rows.to(mask.device)].sum().item())
    # old and reference log-probs, fixed for the whole step
    if t.num_iterations > 1:
        batch.old_logp = _logprobs_no_grad(st, st.policy, batch, micro_batch_size)
    if t.beta > 0:
        with st.reference_context():
            batch.ref_logp = _logprobs_no_grad(st, st.ref_model, batch, micro_batch_size)

    params = [p for p in st.policy.parameters() if p.requires_grad]
    loss_metrics: dict[str, torch.Tensor] = {}
    if B == 0:  # every sample was dropped: nothing to learn from this batch, no optimiser step
        st.scheduler.step()
        return torch.zeros((), device=st.device), torch.zeros((), device=st.device), loss_metrics
    for _ in range(t.num_iterations):
        st.optimizer.zero_grad(set_to_none=True)
        total_loss = torch.zeros((), device=st.device)
        parts = hooks.partition(st, batch, micro_batch_size)
        B_all = batch.rewards.numel()
        seen = torch.zeros(B_all, dtype=torch.long)
        for mb in parts:  # index_add_ counts a row repeated within one index tensor
            idx = torch.arange(B_all)[mb] if isinstance(mb, slice) else mb.cpu()
            seen.index_add_(0, idx, torch.ones_like(idx))
        want = torch.zeros(B_all, dtype=torch.long).index_fill_(0, rows, 1)
        if not torch.equal(seen, want):
            raise RuntimeError(f"GRPO: the micro-batches of {type(hooks).__name__}.partition must cover each of the "
                               f"{B} loss rows exactly once and no dropped row; rows covered wrongly: "
                               f"{(seen != want).nonzero().flatten().tolist()[:10]}")
        for mb in parts:
            with autocast(t.dtype, st.device):  # forward only; the loss and backward stay outside
                logp = hooks.logprobs(st, batch, mb)  # (b, T), float32
            batch.compute.train(batch.pass_tokens(mb))
            old = logp.detach() if batch.old_logp is None else batch.old_logp[mb]
            ref = None if batch.ref_logp is None else batch.ref_logp[mb]
            loss, m = grpo_loss(logp, old, batch.advantages[mb], mask[mb], loss_type=t.loss_type,
                                epsilon_low=t.epsilon_low, epsilon_high=t.epsilon_high, beta=t.beta,
                                ref_logp=ref, kl_bias_correction=t.kl_bias_correction, max_completion_length=t.max_new_tokens,
                                total_sequences=B, total_tokens=n_tokens)
            loss.backward()
            total_loss = total_loss + loss.detach()
            w = _rows(mb, B_all) / (B * t.num_iterations)  # metrics averaged by share of sequences
            for k, v in m.items():
                loss_metrics[k] = loss_metrics.get(k, 0.0) + w * v.detach()
        st.dist.average_gradients(params)  # the global batch's gradient on every process
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"GRPO: gradient norm is {grad_norm.item()} (loss {total_loss.item()}); training "
                                   f"diverged (train.lr={t.lr:g}; a lower one may help)")
        st.optimizer.step()
    st.scheduler.step()
    return total_loss, grad_norm, loss_metrics


def _rows(mb: slice | torch.Tensor, n: int) -> int:
    """Rows a micro-batch (slice or index tensor) selects from a batch of `n`."""
    return len(range(*mb.indices(n))) if isinstance(mb, slice) else mb.numel()


def grpo_step(st: RLState, hooks: GRPOHooks, timer: Timer) -> tuple[dict[str, float], GRPOBatch]:
    """One GRPO step: rollout, scoring, `num_iterations` updates. Returns (metrics, batch)."""
    t = st.cfg.train
    # ALGO LOGIC
    batch = rollout(st, timer)
    hook_metrics = hooks.on_batch(st, batch)
    with timer("update"):
        size = update_micro_batch(st, batch.rewards.numel(), batch.completion_ids.size(1), t.num_generations)
        total_loss, grad_norm, loss_metrics = policy_update(st, batch, hooks, size)
    mask = batch.completion_mask.float()  # (B, T)
    d = st.dist  # with N processes the metrics are of the global batch: per-sample values gathered
    n_tokens = d.sum(mask.sum())

    # TRY NOT TO MODIFY: logging
    rewards = d.gather(batch.rewards)  # (B_global,), whole groups in rank order
    lengths = d.gather(batch.completion_mask.sum(1).float())  # (B_global,)
    eos = st.tokenizer.eos_token_id
    ended = d.gather(((batch.completion_ids == eos) & batch.completion_mask.bool()).any(1).float())
    metrics = {
        "reward/mean": rewards.mean(), "reward/std": rewards.std(),
        "reward/frac_reward_zero_std": _frac_zero_std(rewards, t.num_generations),
        "policy/loss": d.mean(total_loss), "policy/grad_norm": grad_norm, "policy/lr": st.scheduler.get_last_lr()[0],
        # a Monte Carlo estimate of the sampling distribution's entropy: the mean surprisal of its samples
        "policy/entropy": -d.sum((batch.sampler_logp * mask).sum()) / n_tokens.clamp(min=1),
        "completions/mean_length": lengths.mean(), "completions/max_length": lengths.max(),
        "completions/min_length": lengths.min(), "completions/clipped_frac": 1.0 - ended.mean(),
        STEP_KEY: d.sum(batch.compute.total),
    }
    for name, v in batch.result.rewards.components.items():
        v = d.gather(v.float().to(st.device))
        metrics[f"reward/{name}/mean"] = v.mean()
        metrics[f"reward/{name}/std"] = v.std()
    # loss metrics: means by share of sequences, over micro-batches and then over (equal) processes
    metrics.update({f"policy/{k}": d.mean(v) for k, v in loss_metrics.items()})
    infos = batch.result.infos
    if infos and "correct" in infos[0]:
        flags = d.gather(torch.tensor([[bool(i["correct"]), bool(i["format_error"])] for i in infos],
                                      dtype=torch.float64, device=st.device))  # (B_global, 2)
        metrics["env/accuracy"] = flags[:, 0].mean()
        metrics["env/format_error_rate"] = flags[:, 1].mean()
    hook_metrics = d.mean_metrics(hook_metrics)
    out = scalars(metrics)
    out.update(hook_metrics)
    check_finite(out, f"GRPO step metrics of {st.run.path.name}")
    return out, batch


def _frac_zero_std(rewards: torch.Tensor, G: int) -> torch.Tensor:
    return (rewards.view(-1, G).std(1) < 1e-8).float().mean()


def _samples(step: int, batch: GRPOBatch, n: int) -> list[dict]:
    """The first `n` completions of the batch with their rewards, advantages and infos."""
    out = []
    for i in range(min(n, len(batch.texts))):
        rec = {"step": step, "prompt": batch.prompts[i], "completion": batch.texts[i],
               "reward": float(batch.rewards[i]), "advantage": float(batch.advantages[i].float().mean())}
        rec.update({f"reward/{k}": float(v[i]) for k, v in batch.result.rewards.components.items()})
        rec.update({k: v for k, v in batch.result.infos[i].items() if isinstance(v, (str, int, float, bool, type(None)))})
        out.append(rec)
    return out


def _step(hooks: GRPOHooks):
    def step_fn(st: RLState, timer: Timer, step: int):
        hooks.before_step(st, step)
        metrics, batch = grpo_step(st, hooks, timer)
        metrics.update(hooks.after_step(st, step, batch))
        return metrics, _samples(step, batch, st.cfg.train.n_samples), int(batch.completion_mask.sum())
    return step_fn


def run_grpo(cfg: GRPORunConfig, run: RunDir, *, model=None, tokenizer=None, task=None,
             hooks: GRPOHooks | None = None) -> Path:
    """Train with GRPO, checkpoint, evaluate; returns the final checkpoint. Resumes when `run`
    already holds checkpoints of this config. The variants that build on this loop (gradient
    routing, the detector baselines) pass their hooks; `mechrl.train.runners.train` picks the right
    runner for a config."""
    if hooks is None and (cfg.routing.enabled or cfg.mitigation.detector is not None):
        raise ValueError("run_grpo: this config enables routing or a mitigation detector, which plain GRPO "
                         "would ignore; run it with mechrl.train.runners.train(cfg, run)")
    if model is None:  # a given model's device is checked at the first step (autocast)
        check_dtype(cfg.train.dtype, resolve_device(cfg.model.device))
    return run_rl(cfg, run, "grpo", _step(hooks or GRPOHooks()), need_ref=cfg.train.beta > 0, model=model,
                  tokenizer=tokenizer, task=task)
