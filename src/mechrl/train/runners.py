"""Which training loop a run config asks for: the one place that knows every variant.

The loops do not know their variants (GRPO does not know gradient routing or the detector
baselines, which build on it): the caller picks the runner from the config here.

    from mechrl.train.runners import train
    final_checkpoint = train(cfg, RunDir.start(cfg, name))
"""

from __future__ import annotations

from pathlib import Path

from mechrl.config import GRPORunConfig, PPORunConfig, RunConfig, SFTRunConfig
from mechrl.runs.rundir import RunDir


def train(cfg: RunConfig, run: RunDir, **kw) -> Path:
    """Run (or resume) the training `cfg` describes into `run`; returns the final checkpoint."""
    if isinstance(cfg, SFTRunConfig):
        from mechrl.train.sft import run_sft

        return run_sft(cfg, run, **kw)
    if isinstance(cfg, PPORunConfig):
        from mechrl.train.ppo import run_ppo

        return run_ppo(cfg, run, **kw)
    if isinstance(cfg, GRPORunConfig):
        if cfg.routing.enabled:
            from mechrl.train.routing import run_routed_grpo

            return run_routed_grpo(cfg, run, **kw)
        if cfg.mitigation.detector is not None:
            from mechrl.train.mitigation import run_mitigated_grpo

            return run_mitigated_grpo(cfg, run, **kw)
        from mechrl.train.grpo import run_grpo

        return run_grpo(cfg, run, **kw)
    raise ValueError(f"no training loop for a config of kind {cfg.kind!r}")
