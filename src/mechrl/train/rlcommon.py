"""Plumbing shared by mechrl's RL loops (GRPO, PPO): building the policy, the reference, the
optimizer and scheduler, resuming, evaluating at checkpoints, and logging samples. The algorithms
themselves live in `grpo.py` and `ppo.py`; the math in `losses.py`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mechrl.config import RLRunConfig
from mechrl.envs import TextEnv, build_env
from mechrl.evaluate import evaluate, flat_metrics
from mechrl.models.adapters import add_lora, frozen_copy, trainable_parameters
from mechrl.models.loading import load_model, load_pretrained
from mechrl.runs.rundir import RunDir
from mechrl.tasks import build_task
from mechrl.tasks.base import Task
from mechrl.train.checkpoint import clear_partial, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


@dataclass
class RLState:
    """What an RL loop holds: the policy and everything it needs, built by `setup_rl`."""

    cfg: RLRunConfig
    run: RunDir
    task: Task
    env: TextEnv
    policy: PreTrainedModel  # a PeftModel when training LoRA
    ref: PreTrainedModel | None  # frozen copy (full fine-tuning with a KL term); None otherwise
    tokenizer: PreTrainedTokenizerBase
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator  # the sampling RNG (saved in checkpoints)
    device: torch.device
    start_step: int = 0
    extra: dict = field(default_factory=dict)  # JSON state saved with checkpoints (e.g. train time)
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # extra trained modules (value head)

    @property
    def uses_lora(self) -> bool:
        return self.cfg.train.lora is not None

    def reference_context(self):
        """Context in which `self.ref_model` computes reference log-probs (adapters off for LoRA)."""
        if self.uses_lora:
            return self.policy.disable_adapter()
        return _nullcontext()

    @property
    def ref_model(self) -> PreTrainedModel:
        if self.uses_lora:
            return self.policy
        if self.ref is None:
            raise RuntimeError("no reference model was built (beta / kl_coef is 0)")
        return self.ref


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def warmup_constant(optimizer: torch.optim.Optimizer, warmup_steps: int):
    """Linear warm-up from 0, then constant (the usual RL schedule)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)


def setup_rl(cfg: RLRunConfig, run: RunDir, *, need_ref: bool, model=None, tokenizer=None,
             task: Task | None = None, make_modules=None) -> RLState:
    """Build (or resume) everything an RL loop needs. The policy starts from `cfg.model.path`
    (e.g. an SFT checkpoint) or a tiny model; when the run has checkpoints it resumes from the last.
    `make_modules(policy) -> {name: module}` adds trained modules (optimised and checkpointed
    with the policy), such as PPO's value head."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # several processes would each sample, update and write the same run directory
        raise NotImplementedError(f"mechrl's RL loops run in one process; this one is part of {world} "
                                  "(accelerate launch / torchrun). Use one GPU per run and Ray for sweeps.")
    task = task or build_task(cfg.task)
    t = cfg.train
    clear_partial(run)
    latest = run.latest_checkpoint()
    if model is None:
        model, tokenizer = load_model(cfg.model, task, seed=cfg.seed)
    elif tokenizer is None:
        raise ValueError("setup_rl: a model was given without its tokenizer")
    device = next(model.parameters()).device
    ref = frozen_copy(model) if need_ref and t.lora is None else None
    if latest is not None and t.lora is None:
        # full fine-tuning resumes from the checkpoint's weights; the reference stays the initial model
        model, _ = load_pretrained(latest[1], dtype=cfg.model.dtype, device=str(device))
    policy = add_lora(model, t.lora) if t.lora is not None else model
    policy.train()
    modules = make_modules(policy) if make_modules is not None else {}
    params = trainable_parameters(policy) + [p for m in modules.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.weight_decay)
    scheduler = warmup_constant(optimizer, t.warmup_steps)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    env_cfg = cfg.env if cfg.env.seed is not None else cfg.env.model_copy(update={"seed": cfg.seed})
    env = build_env(task, cfg.reward, env_cfg)
    state = RLState(cfg, run, task, env, policy, ref, tokenizer, optimizer, scheduler, generator, device,
                    modules=modules)
    if latest is not None:
        step, path = latest
        saved = load_checkpoint(path, policy=policy, optimizer=optimizer, scheduler=scheduler, generator=generator,
                                modules=modules)
        if saved["step"] != step:
            raise RuntimeError(f"{path}: state.json says step {saved['step']}, the folder name says {step}")
        env.load_state_dict(saved["env"])
        state.extra = saved.get("extra", {})
        run.truncate_after(step)
        state.start_step = step
        log.info("resuming %s from %s", run.path.name, path)
    return state


def checkpoint(st: RLState, step: int) -> Path:
    return save_checkpoint(st.run, step, policy=st.policy, tokenizer=st.tokenizer, optimizer=st.optimizer,
                           scheduler=st.scheduler, generator=st.generator,
                           state={"env": st.env.state_dict(), "extra": st.extra}, modules=st.modules)


def evaluate_and_log(st: RLState, step: int, *, final: bool) -> dict:
    """Greedy evaluation of every split; written to eval/step-N.json and metrics.jsonl."""
    cfg = st.cfg
    n = cfg.eval.n_final if final else cfg.eval.n_per_split
    result = evaluate(st.policy, st.tokenizer, st.task, n=n, batch_size=cfg.eval.batch_size,
                      max_new_tokens=cfg.eval.max_new_tokens, progress=False)
    result["step"] = step
    st.run.write_eval(step, {k: v for k, v in result.items() if k != "samples"})
    st.run.log_metrics(step, flat_metrics(result))
    acc = {s: round(r["accuracy"], 3) for s, r in result["splits"].items()}
    log.info("step %d: eval accuracy %s", step, acc)
    return result


def micro_batches(n: int, size: int | None) -> list[slice]:
    """Slices covering range(n) in chunks of `size` (one chunk when None)."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def check_finite(metrics: dict[str, float], where: str) -> None:
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise FloatingPointError(f"{where}: non-finite values {bad}")


def scalars(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Detached tensors / numbers -> floats, keys under `prefix/` when given."""
    pre = f"{prefix}/" if prefix else ""
    return {f"{pre}{k}": float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}


class Timer:
    """Accumulates wall time per phase: `with timer("generate"): ...`."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.totals[name] = timer.totals.get(name, 0.0) + time.perf_counter() - self.t0
                return False

        return _Phase()


#: One step of an RL algorithm: (state, timer, step) -> (metrics, sample records, generated tokens).
StepFn = Callable[[RLState, Timer, int], tuple[dict[str, float], list[dict], int]]


def run_rl(cfg: RLRunConfig, run: RunDir, kind: str, step_fn: StepFn, *, need_ref: bool, model=None,
           tokenizer=None, task: Task | None = None, make_modules=None) -> Path:
    """The outer loop every RL algorithm shares: set up or resume, evaluate the starting point,
    run `step_fn` for each step, log metrics and samples, evaluate and checkpoint on schedule.
    Returns the final checkpoint."""
    handler = run.attach_log()
    try:
        t = cfg.train
        torch.manual_seed(cfg.seed)
        st = setup_rl(cfg, run, need_ref=need_ref, model=model, tokenizer=tokenizer, task=task,
                      make_modules=make_modules)
        if st.start_step >= t.max_steps:
            log.info("already finished: %s", run.checkpoint_path(st.start_step))
            return run.checkpoint_path(st.start_step)
        run.set_status("running", kind=kind)
        log.info("%s %s: %s", kind.upper(), run.path.name, t.model_dump_json())
        if st.start_step == 0:
            evaluate_and_log(st, 0, final=False)  # the starting point, for comparison
        timer = Timer()
        for step in tqdm(range(st.start_step + 1, t.max_steps + 1), desc=kind, initial=st.start_step,
                         total=t.max_steps):
            timer.totals.clear()
            metrics, samples, n_tokens = step_fn(st, timer, step)
            step_s = sum(timer.totals.values())
            metrics.update({f"time/{k}_s": v for k, v in timer.totals.items()})
            metrics["time/step_s"] = step_s
            metrics["throughput/tokens_per_s"] = n_tokens / max(step_s, 1e-9)
            st.extra["train_time_s"] = st.extra.get("train_time_s", 0.0) + step_s  # saved with checkpoints
            if step % t.log_every == 0 or step == t.max_steps:
                run.log_metrics(step, metrics)
            if step % t.sample_every == 0 and t.n_samples:
                run.log_samples(samples[:t.n_samples])
            final = step == t.max_steps
            # evaluate before checkpointing: a kill between the two redoes the step's evaluation
            if step % t.eval_every == 0 or final:
                evaluate_and_log(st, step, final=final)
            if step % t.save_every == 0 or step % t.eval_every == 0 or final:
                checkpoint(st, step)
        final_path = run.checkpoint_path(t.max_steps)
        run.set_status("finished", kind=kind, final_checkpoint=str(final_path),
                       train_time_s=st.extra.get("train_time_s", 0.0))
        return final_path
    finally:
        run.close()
        logging.getLogger("mechrl").removeHandler(handler)
        handler.close()
