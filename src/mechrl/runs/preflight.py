"""Checks a run's config can start, made before anything is written or loaded.

A run fails early on what it can know from its config: an output folder it cannot write, a model
path that is neither a local model folder nor a hub name the user allowed, a reward or detector
that is not registered or gets wrong parameters. `mechrl sft|grpo|ppo` call `preflight` before they
create the run directory, and `mechrl sweep` calls it for every trial before the first one starts,
so a typo in one trial costs nothing.
"""

from __future__ import annotations

from mechrl.config import GRPORunConfig, RLRunConfig, RunConfig
from mechrl.models.loading import resolve_model_path
from mechrl.runs.rundir import check_writable_dir


def preflight(cfg: RunConfig) -> None:
    """Raise a `UserError` for the first problem found (see the module docstring)."""
    check_writable_dir(cfg.out_dir, "out_dir")
    if cfg.model.path is not None:
        resolve_model_path(cfg.model.path, allow_hub=cfg.model.allow_hub)
    if isinstance(cfg, RLRunConfig):
        from mechrl.rewards import build_reward  # local: importing it registers every built-in reward

        build_reward(cfg.reward)
        if isinstance(cfg, GRPORunConfig):
            for spec in cfg.routing.eval_rewards:
                build_reward([spec])
            from mechrl.rewards.detectors import build_detector

            for det in (cfg.routing.detector, cfg.mitigation.detector):
                if det is not None:
                    build_detector(det, run_seed=cfg.seed)  # the name is registered, the parameters fit
