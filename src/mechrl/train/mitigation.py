"""Reward-hacking baselines for gradient routing, on one policy with the same detector.

Gradient routing (`routing.py`) sends the gradients of the samples a detector flags to a forget
adapter that is removed at evaluation. The controlled comparison uses the same detector (same
coverage and label noise) in the simpler ways a practitioner would:

  method    what a flagged sample does to the update
  filter    nothing: it is dropped from the loss, and its group's advantage mean and std come
            from the unflagged samples only (as if it had never been sampled,
            `losses.kept_group_advantages`)
  penalty   its total reward loses `mitigation.penalty` before the group advantages are computed
  none      nothing; the labels are only logged (`detector/flag_rate`), e.g. for early stopping

Early stopping (`train.early_stop`, in `rlcommon.run_rl`) is the fourth baseline: stop when the
flag rate (or the hack reward) rises. Plain LoRA with rank = retain + forget rank is the fifth:
`train.lora` without routing. `recipes/reward-hacking-routing.yaml` runs them side by side.

    mechrl grpo recipes/reward-hacking-routing.yaml preset=filter
"""

from __future__ import annotations

import logging
from pathlib import Path

from mechrl.config import GRPORunConfig
from mechrl.runs.rundir import RunDir
from mechrl.train.detect import DetectorHooks
from mechrl.train.grpo import GRPOBatch, run_grpo
from mechrl.train.losses import group_advantages, kept_group_advantages
from mechrl.train.rlcommon import RLState

log = logging.getLogger(__name__)


class MitigationHooks(DetectorHooks):
    """Labels each batch with `mitigation.detector` (metrics under `detector/`) and filters or
    penalises the flagged samples."""

    def __init__(self, cfg: GRPORunConfig):
        m = cfg.mitigation
        if m.detector is None:
            raise ValueError("MitigationHooks: mitigation.detector is required")
        if cfg.routing.enabled:
            raise ValueError("MitigationHooks: routing is enabled; the baselines run without it")
        super().__init__(m.detector, run_seed=cfg.seed, single_process_reason=f"mitigation.method={m.method}")
        self.cfg = cfg
        self.method = m.method
        self.penalty = m.penalty

    def on_batch(self, st: RLState, batch: GRPOBatch) -> dict[str, float]:
        metrics = self.label(st, batch)
        flagged = batch.labels["flagged"]  # (B,) bool
        t = self.cfg.train
        if self.method == "penalty":
            batch.rewards = batch.rewards - self.penalty * flagged.to(batch.rewards.dtype)
            batch.advantages, _ = group_advantages(batch.rewards, t.num_generations, t.scale_rewards)
            metrics["detector/penalised_frac"] = flagged.float().mean().item()
        elif self.method == "filter":
            batch.keep = ~flagged
            batch.advantages = kept_group_advantages(batch.rewards, batch.keep, t.num_generations,
                                                     t.scale_rewards)
            metrics["detector/kept_frac"] = batch.keep.float().mean().item()
        elif self.method != "none":
            raise ValueError(f"mitigation: unknown method {self.method!r}")
        return metrics


def run_mitigated_grpo(cfg: GRPORunConfig, run: RunDir, *, model=None, tokenizer=None, task=None) -> Path:
    """GRPO with a detector baseline (`mitigation`); returns the final checkpoint."""
    return run_grpo(cfg, run, model=model, tokenizer=tokenizer, task=task, hooks=MitigationHooks(cfg))
