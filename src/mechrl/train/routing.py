"""Gradient routing in GRPO, and the routing evaluation.

The policy carries two LoRA adapters (`mechrl.models.dual_lora`): retain and forget. Each step a
detector flags the samples it takes for reward hacking (with optional coverage and label noise,
`mechrl.rewards.detectors`), and the update routes their gradients:

  mode       flagged samples update   unflagged samples update
  classic    forget only              retain and forget
  exclusive  forget only              retain only

Phases (`routing.start_step`, `routing.ablate_forget_from`): before `start_step` (a warm-up) the
labels are logged but not used, and every sample updates both adapters; from `ablate_forget_from`
on the forget adapter is switched off for sampling and updates, the retain adapter trains alone and
flagged samples are dropped from the loss. `routing/phase` logs which: 0 warm-up, 1 routed, 2 forget
ablated. Known-good labels (`routing.good_label_fraction`): a share of the truly clean samples is
trained with the forget adapter off, updating the retain adapter alone.

Masks need homogeneous micro-batches: `RoutingHooks.partition` splits the batch into flagged and
unflagged index sets (each cut to the update's micro-batch size, `rlcommon.update_micro_batch`), and
`RoutingHooks.logprobs` runs each with the blocked adapter's parameters detached
(`dual_lora.block_gradients`: forward values are unchanged and gradients still flow through the
blocked branch to earlier layers). The GRPO loss is normalised by the whole batch's sequence and
token counts whatever the partition, so with no adapter blocked the update is exactly the unrouted
one (tests/test_routing.py holds it to 1e-6).

The evaluation (`evaluate_routing`) samples completions with both adapters (1, 1), retain only
(1, 0) and forget only (0, 1), and reports each reward component on its own, diversity (unique
fraction, mean pairwise Jaccard similarity of word sets) and a degeneracy flag. Successful routing:
retain-only keeps the task reward of both and loses the hack; forget-only keeps the hack.

    mechrl grpo reward-hacking-routing preset=smoke
    mechrl eval-routing runs/reward-hacking-routing-smoke_s0/checkpoints/step-2 --n 32
"""

from __future__ import annotations

import itertools
import logging
import random
from pathlib import Path
from typing import Sequence

import torch
import yaml

from mechrl.config import GRPORunConfig, RewardSpec, RoutingConfig, build_config
from mechrl.errors import UserError
from mechrl.models.dual_lora import (add_dual_lora, block_gradients, dual_lora_modules, load_dual_lora,
                                     scales, set_scales)
from mechrl.rewards.registry import Reward, build_reward
from mechrl.runs.rundir import RunDir, atomic_write_json
from mechrl.tasks import build_task
from mechrl.train.checkpoint import DUAL_LORA_FILE
from mechrl.train.detect import DetectorHooks
from mechrl.train.grpo import GRPOBatch, run_grpo
from mechrl.train.losses import kept_group_advantages
from mechrl.train.rlcommon import RLState, micro_batches
from mechrl.train.rollout import encode_prompts, generate

log = logging.getLogger(__name__)

#: Routing phases (`routing/phase`): a warm-up without routing, routed training, forget adapter ablated.
PHASE_WARMUP, PHASE_ROUTED, PHASE_ABLATED = 0, 1, 2
#: Adapter modes of the evaluation: name -> (retain scale, forget scale).
MODES: dict[str, tuple[float, float]] = {"both": (1.0, 1.0), "retain_only": (1.0, 0.0), "forget_only": (0.0, 1.0)}
#: Degeneracy thresholds: mean pairwise Jaccard above this, or unique fraction below that.
DEGENERATE_JACCARD = 0.7
DEGENERATE_UNIQUE = 0.5


# ----------------------------------------------------------------------------------------------
# Routed updates
# ----------------------------------------------------------------------------------------------

class RoutingHooks(DetectorHooks):
    """GRPO hooks that label each batch with a detector and route gradients between the adapters."""

    prefix = "routing"

    def __init__(self, cfg: GRPORunConfig):
        r = cfg.routing
        if not r.enabled or r.detector is None:
            raise ValueError("RoutingHooks: routing.enabled with a routing.detector is required")
        super().__init__(r.detector, run_seed=cfg.seed, single_process_reason="gradient routing")
        self.cfg = cfg
        self.routing: RoutingConfig = r
        self.eval_rewards = eval_reward_components(cfg)
        self.phase = PHASE_ROUTED

    # -- phases --------------------------------------------------------------------------------------
    def before_step(self, st: RLState, step: int) -> None:
        """Set this step's phase; from `ablate_forget_from` on, the forget adapter is off (scale 0)."""
        super().before_step(st, step)
        r = self.routing
        if r.ablate_forget_from is not None and step >= r.ablate_forget_from:
            self.phase = PHASE_ABLATED
            set_scales(st.policy, retain=1.0, forget=0.0)
        else:
            self.phase = PHASE_WARMUP if step < r.start_step else PHASE_ROUTED
            set_scales(st.policy, retain=1.0, forget=1.0)

    # -- labels ------------------------------------------------------------------------------------
    def on_batch(self, st: RLState, batch: GRPOBatch) -> dict[str, float]:
        _check_policy(st.policy)
        metrics = self.label(st, batch)
        metrics["routing/phase"] = float(self.phase)
        t = self.cfg.train
        if self.phase == PHASE_WARMUP:  # labels logged, not used: unrouted training
            batch.labels["flagged"] = torch.zeros_like(batch.labels["flagged"])
            return metrics
        unflagged = ~batch.labels["flagged"]
        if self.routing.good_label_fraction > 0:
            batch.labels["good"] = self.good_labels(batch)
            metrics["routing/good_frac"] = batch.labels["good"].float().mean().item()
        if self.phase == PHASE_ABLATED:  # flagged samples could only update the switched-off adapter
            batch.keep = unflagged
            batch.advantages = kept_group_advantages(batch.rewards, unflagged, t.num_generations, t.scale_rewards)
            metrics["routing/kept_frac"] = unflagged.float().mean().item()
        elif self.routing.unflagged_baseline:
            own = kept_group_advantages(batch.rewards, unflagged, t.num_generations, t.scale_rewards)  # (B,)
            batch.advantages = torch.where(unflagged, own, batch.advantages)
        return metrics

    def good_labels(self, batch: GRPOBatch) -> torch.Tensor:
        """(B,) bool: each sample the detector calls clean (raw) and that is not reported flagged is
        labelled known-good with probability `good_label_fraction`, from a generator seeded by the run's
        seed and the step (so a resumed run draws the same labels)."""
        if self.step is None:
            raise RuntimeError("routing: known-good labels are drawn per step, and before_step was not called")
        rng = random.Random(f"mechrl-good-labels-{self.cfg.seed}-{self.step}")
        draws = torch.tensor([rng.random() for _ in range(batch.rewards.numel())], device=batch.rewards.device)
        clean = ~batch.labels["hack"] & ~batch.labels["flagged"]
        return clean & (draws < self.routing.good_label_fraction)

    # -- micro-batches and masks -----------------------------------------------------------------
    def partition(self, st: RLState, batch: GRPOBatch, size: int | None) -> list[torch.Tensor]:
        """Index tensors covering the loss rows once, each of one kind (unflagged, known-good, flagged,
        in that order), at most `size` long. With the forget adapter ablated only the unflagged rows
        remain."""
        flagged = batch.labels["flagged"]
        good = batch.labels.get("good", torch.zeros_like(flagged))
        groups = [(~flagged & ~good).nonzero().flatten(), good.nonzero().flatten()]
        if self.phase != PHASE_ABLATED:
            groups.append(flagged.nonzero().flatten())
        out = []
        for idx in groups:
            out += [idx[s] for s in micro_batches(idx.numel(), size)] if idx.numel() else []
        assert sum(i.numel() for i in out) == batch.loss_rows().numel(), "partition does not cover the loss rows"
        return out

    def blocked(self, flagged: bool) -> tuple[bool, bool]:
        """(retain blocked, forget blocked) for a micro-batch of flagged or unflagged samples."""
        if self.phase == PHASE_WARMUP:
            return False, False
        if flagged:
            return True, False
        return False, self.routing.mode == "exclusive"

    def logprobs(self, st: RLState, batch: GRPOBatch, mb) -> torch.Tensor:
        flags = batch.labels["flagged"][mb]
        good = batch.labels.get("good", torch.zeros_like(batch.labels["flagged"]))[mb]
        for name, f in (("flagged", flags), ("known-good", good)):
            if f.numel() == 0 or bool(f.any()) != bool(f.all()):
                raise RuntimeError(f"routing: micro-batch of {f.numel()} samples mixes {name} and other samples "
                                   f"({int(f.sum())} {name}); masks need homogeneous micro-batches")
        if bool(good[0]):  # known-good: the retain adapter alone, as deployed
            with scales(st.policy, retain=1.0, forget=0.0):
                return super().logprobs(st, batch, mb)
        retain, forget = self.blocked(bool(flags[0]))
        with block_gradients(st.policy, retain=retain, forget=forget):
            return super().logprobs(st, batch, mb)

    # -- evaluation in the loop ------------------------------------------------------------------
    def after_step(self, st: RLState, step: int, batch: GRPOBatch) -> dict[str, float]:
        """Routing evaluation every `routing.eval_every` steps and at the last: written to
        eval/routing-step-N.json, samples to samples.jsonl; returns `routing_eval/<mode>/<key>`."""
        if not (step % self.routing.eval_every == 0 or step == self.cfg.train.max_steps):
            return {}
        prompts, examples = eval_prompts(st.task, self.routing.eval_n)
        was_training = st.policy.training
        st.policy.eval()
        try:
            result = evaluate_routing(st.policy, st.tokenizer, prompts, examples, self.eval_rewards,
                                      **eval_sampling(self.cfg))
        finally:
            st.policy.train(was_training)
        result["step"] = step
        if st.dist.is_main:
            atomic_write_json(st.run.eval_dir / f"routing-step-{step}.json", result)
            st.run.log_samples([{"step": step, "kind": "routing_eval", "routing_mode": mode, "prompt": p,
                                 "completion": c}
                                for mode, r in result["modes"].items()
                                for p, c in zip(prompts[:self.cfg.train.n_samples], r["samples"])])
        log.info("step %d routing eval: %s", step, summary_line(result))
        return routing_metrics(result)


def _check_policy(policy: torch.nn.Module) -> None:
    """Routing needs a dual LoRA policy whose only trainable parameters are the adapters."""
    mods = dual_lora_modules(policy)
    if not mods:
        raise ValueError("gradient routing needs a policy with dual LoRA adapters (add_dual_lora); "
                         "full fine-tuning cannot be routed")
    adapter_ids = {id(p) for m in mods.values() for w in ("retain", "forget") for p in m.factors(w)}
    other = [n for n, p in policy.named_parameters() if p.requires_grad and id(p) not in adapter_ids]
    if other:
        raise ValueError(f"gradient routing: parameters outside the dual LoRA adapters are trainable "
                         f"({other[:3]}...); full fine-tuning cannot be routed")


def run_routed_grpo(cfg: GRPORunConfig, run: RunDir, *, model=None, tokenizer=None, task=None) -> Path:
    """GRPO with gradient routing: the model (from the config unless given) gets dual LoRA adapters,
    `RoutingHooks` label and route each batch. Returns the final checkpoint. A run with checkpoints
    resumes from the last: the base is rebuilt from the config and the adapters, optimizer, RNG
    and detector states come back from the checkpoint."""
    from mechrl.models.loading import load_model

    r = cfg.routing
    if not r.enabled:
        raise ValueError("run_routed_grpo: routing.enabled is false")
    task = task or build_task(cfg.task)
    if model is None:
        model, tokenizer = load_model(cfg.model, task, seed=cfg.seed)
    elif tokenizer is None:
        raise ValueError("run_routed_grpo: a model was given without its tokenizer")
    if not dual_lora_modules(model):  # seeded: the same seed gives the same adapters in any process
        add_dual_lora(model, r.target_modules, r.retain_rank, r.retain_alpha, r.forget_rank, r.forget_alpha,
                      seed=cfg.seed)
    _check_policy(model)
    return run_grpo(cfg, run, model=model, tokenizer=tokenizer, task=task, hooks=RoutingHooks(cfg))


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def eval_reward_components(cfg: GRPORunConfig) -> dict[str, Reward]:
    """name -> one-component reward (weight 1) for each `routing.eval_rewards` entry; empty: the
    run's reward components, each on its own."""
    specs = cfg.routing.eval_rewards or [s.model_copy(update={"weight": 1.0}) for s in cfg.reward]
    return {s.name: build_reward([RewardSpec(name=s.name, params=s.params)]) for s in specs}


def eval_prompts(task, n: int) -> tuple[list[str], list[dict]]:
    """The first `n` prompts of the task's first evaluated split (the same every time), with examples."""
    split = task.eval_splits[0]
    ds = task.datasets[split]
    if len(ds) < 1:
        raise ValueError(f"routing eval: split {split!r} is empty")
    rows = [dict(ds[i]) for i in range(min(n, len(ds)))]
    rows = list(itertools.islice(itertools.cycle(rows), n))  # fewer examples than n: reuse them in order
    return [r["prompt"] for r in rows], rows


def diversity(texts: Sequence[str]) -> dict[str, float | bool]:
    """Unique fraction, mean pairwise Jaccard similarity of lower-cased word sets, and the
    degeneracy flag (Jaccard > 0.7 or unique < 0.5). These thresholds miss some template
    collapse: read the samples too."""
    n = len(texts)
    if n < 2:
        raise ValueError(f"diversity needs at least 2 samples, got {n}")
    unique = len(set(texts)) / n
    sets = [frozenset(t.lower().split()) for t in texts]
    sims = [len(a & b) / len(a | b) if (a | b) else 1.0 for a, b in itertools.combinations(sets, 2)]
    jac = sum(sims) / len(sims)
    return {"unique_frac": unique, "mean_jaccard": jac,
            "degenerate": bool(jac > DEGENERATE_JACCARD or unique < DEGENERATE_UNIQUE)}


def eval_sampling(cfg: GRPORunConfig) -> dict:
    """How the routing evaluation samples: as training does (max_new_tokens, temperature, top_k,
    top_p), in batches of `eval.batch_size`, from its own generator (`routing.eval_seed`)."""
    t = cfg.train
    return dict(max_new_tokens=t.max_new_tokens, temperature=t.temperature, top_k=t.top_k, top_p=t.top_p,
                seed=cfg.routing.eval_seed, batch_size=cfg.eval.batch_size)


@torch.no_grad()
def sample_and_score(model, tokenizer, prompts: list[str], examples: list[dict], rewards: dict[str, Reward], *,
                     max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                     seed: int = 0, batch_size: int = 64) -> dict:
    """One completion per prompt from `model` as it is, sampled with a generator seeded by `seed`, and
    scored: {rewards: {component: mean}, unique_frac, mean_jaccard, degenerate, samples}. The
    routing evaluation runs it once per adapter mode; a plain policy (a baseline) is evaluated with
    it directly, so every method is measured the same way."""
    if len(prompts) != len(examples):
        raise ValueError(f"sample_and_score: {len(prompts)} prompts, {len(examples)} examples")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    texts = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(tokenizer, prompts[i:i + batch_size], device)
        roll = generate(model, tokenizer, prompt_ids=ids, prompt_mask=mask, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
        texts += roll.texts
    comps = {name: float(reward(prompts, texts, examples).total.float().mean()) for name, reward in rewards.items()}
    return {"rewards": comps, **diversity(texts), "samples": texts}


def evaluate_routing(model, tokenizer, prompts: list[str], examples: list[dict], rewards: dict[str, Reward],
                     **sampling) -> dict:
    """`sample_and_score` in each adapter mode (`MODES`), each from the same seeded random stream.
    Returns {n, thresholds, modes: {mode: {scales, rewards: {component: mean}, unique_frac,
    mean_jaccard, degenerate, samples}}}."""
    out = {"n": len(prompts), "thresholds": {"degenerate_if_jaccard_above": DEGENERATE_JACCARD,
                                             "degenerate_if_unique_below": DEGENERATE_UNIQUE}, "modes": {}}
    for mode, (s_r, s_f) in MODES.items():
        with scales(model, retain=s_r, forget=s_f):
            out["modes"][mode] = {"scales": [s_r, s_f], **sample_and_score(model, tokenizer, prompts, examples,
                                                                           rewards, **sampling)}
    return out


def routing_metrics(result: dict) -> dict[str, float]:
    """`routing_eval/<mode>/<component>` and the diversity numbers, as floats."""
    m = {}
    for mode, r in result["modes"].items():
        for name, v in r["rewards"].items():
            m[f"routing_eval/{mode}/{name}"] = v
        for k in ("unique_frac", "mean_jaccard", "degenerate"):
            m[f"routing_eval/{mode}/{k}"] = float(r[k])
    return m


def summary_line(result: dict) -> str:
    return "; ".join(f"{mode}: " + ", ".join(f"{k}={v:.3f}" for k, v in r["rewards"].items())
                     + f", unique={r['unique_frac']:.2f}, jaccard={r['mean_jaccard']:.2f}"
                     + (" DEGENERATE" if r["degenerate"] else "")
                     for mode, r in result["modes"].items())


def evaluate_routing_checkpoint(checkpoint: str | Path, n: int | None = None) -> dict:
    """Post-hoc routing evaluation of a routed run's checkpoint: the run's base model (from its
    config.yaml) with the dual LoRA adapters saved in the checkpoint (ranks detected on load)."""
    from mechrl.models.loading import load_model

    ckpt = Path(checkpoint)
    weights = ckpt / DUAL_LORA_FILE
    if not weights.is_file():
        raise UserError(f"{ckpt}: no {DUAL_LORA_FILE} (not a checkpoint of a routed GRPO run)")
    config = ckpt.parent.parent / "config.yaml"  # <run>/checkpoints/step-N
    if not config.is_file():
        raise UserError(f"{ckpt}: the run's config {config} is missing")
    data = yaml.safe_load(config.read_text())
    if not isinstance(data, dict) or data.get("kind") != "grpo":
        raise UserError(f"{config}: not the config of a GRPO run")
    # the saved config is final (preset and overrides applied): validate it as it is, no preset re-applied
    data["preset"] = None
    cfg, _ = build_config(data, source=str(config), kind="grpo")
    assert isinstance(cfg, GRPORunConfig)
    if not cfg.routing.enabled:
        raise UserError(f"{config}: routing is not enabled in this run's config")
    task = build_task(cfg.task)
    model, tok = load_model(cfg.model, task, seed=cfg.seed)
    info = load_dual_lora(model, weights)
    model.eval()
    prompts, examples = eval_prompts(task, n or cfg.routing.eval_n)
    result = evaluate_routing(model, tok, prompts, examples, eval_reward_components(cfg), **eval_sampling(cfg))
    result.update(checkpoint=str(ckpt), adapters=info)
    return result
