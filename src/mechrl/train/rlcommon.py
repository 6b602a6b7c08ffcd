"""Plumbing shared by mechrl's RL loops (GRPO, PPO): building the policy, the reference, the
optimizer and scheduler, resuming, evaluating at checkpoints, and logging samples. The algorithms
themselves live in `grpo.py` and `ppo.py`; the math in `losses.py`.

Under `accelerate launch` the loops run as N data-parallel processes (`distributed.py` gives the
semantics): each rank draws its share of the global prompt batch (`draw_prompts`), gradients are
averaged over ranks, and only rank 0 evaluates and writes the run directory while the others wait.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mechrl.config import EarlyStopConfig, RLRunConfig
from mechrl.envs import EnvItem, TextEnv, build_env
from mechrl.errors import TrainingDiverged, UserError
from mechrl.evaluate import evaluate, flat_metrics, outcome_strings, pick_samples
from mechrl.models.adapters import add_lora, frozen_copy, trainable_parameters
from mechrl.models.dual_lora import dual_lora_modules
from mechrl.models.loading import load_model, load_pretrained
from mechrl.runs.rundir import RunDir
from mechrl.tasks import build_task
from mechrl.tasks.base import Task
from mechrl.train.checkpoint import clear_partial, load_checkpoint, save_checkpoint
from mechrl.train.compute import STEP_KEY, TOTAL_KEY, crossed
from mechrl.train.distributed import Dist, env_world_size, sampling_seed
from mechrl.train.fast_update import build_adamw

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
    dist: Dist | None = None  # the run's processes; None: one process on `device`

    def __post_init__(self):
        if self.dist is None:
            self.dist = Dist.single(self.device)

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
    with the policy), such as PPO's value head.

    Launched as several processes, every rank builds the same state (rank 0's parameters are
    broadcast, as DDP does) with its own sampling generator, and all ranks resume from the same
    checkpoint; only rank 0 touches the run directory."""
    dist = Dist.launch(cfg.model.device) if env_world_size() > 1 else None
    task = task or build_task(cfg.task)
    t = cfg.train
    if dist is not None:
        dist.share(t.prompts_per_step, "train.prompts_per_step")  # raises unless it divides
        if run.readonly == dist.is_main:
            raise RuntimeError(f"rank {dist.rank}: RunDir.readonly={run.readonly} (only rank 0 may write)")
    if not run.readonly:
        clear_partial(run)
    if dist is not None:
        dist.barrier()  # rank 0 has created (or cleaned) the run directory
    latest = run.latest_checkpoint()
    if model is None:
        model, tokenizer = load_model(cfg.model, task, seed=cfg.seed)
    elif tokenizer is None:
        raise ValueError("setup_rl: a model was given without its tokenizer")
    if dist is not None:
        model.to(dist.device)
    device = next(model.parameters()).device
    dist = dist or Dist.single(device)
    ref = frozen_copy(model) if need_ref and t.lora is None else None
    if latest is not None and t.lora is None and not dual_lora_modules(model):
        # full fine-tuning resumes from the checkpoint's weights; the reference stays the initial model
        # (LoRA and dual LoRA runs keep the base as built and reload their adapters in load_checkpoint)
        model, _ = load_pretrained(latest[1], dtype=cfg.model.dtype, device=str(device))
    policy = add_lora(model, t.lora) if t.lora is not None else model
    policy.train()
    modules = make_modules(policy) if make_modules is not None else {}
    dist.broadcast_parameters([m for m in (policy, ref, *modules.values()) if m is not None])
    params = trainable_parameters(policy) + [p for m in modules.values() for p in m.parameters()]
    optimizer = build_adamw(params, t, device)  # train.adamw: fused on CUDA by default
    scheduler = warmup_constant(optimizer, t.warmup_steps)
    generator = torch.Generator(device=device).manual_seed(sampling_seed(cfg.seed, dist.rank))
    env_cfg = cfg.env if cfg.env.seed is not None else cfg.env.model_copy(update={"seed": cfg.seed})
    env = build_env(task, cfg.reward, env_cfg)
    state = RLState(cfg, run, task, env, policy, ref, tokenizer, optimizer, scheduler, generator, device,
                    modules=modules, dist=dist)
    if latest is not None:
        step, path = latest
        state_file = path / "resume" / "state.json"
        saved_world = json.loads(state_file.read_text()).get("world_size", 1) if state_file.is_file() else dist.world
        if saved_world != dist.world:
            raise UserError(f"{path} was saved by a run of {saved_world} processes; resume it with the same "
                            f"number (this launch has {dist.world}): sampling streams are per process")
        saved = load_checkpoint(path, policy=policy, optimizer=optimizer, scheduler=scheduler, generator=generator,
                                modules=modules, rank=dist.rank)
        if saved["step"] != step:
            raise RuntimeError(f"{path}: state.json says step {saved['step']}, the folder name says {step}")
        env.load_state_dict(saved["env"])
        state.extra = saved.get("extra", {})
        if dist.is_main:
            run.truncate_after(step)
        state.start_step = step
        log.info("resuming %s from %s", run.path.name, path)
    elif dist.is_main:
        run.truncate_after(None)  # nothing complete to resume from: the run starts over
    return state


def draw_prompts(st: RLState) -> list[EnvItem]:
    """This rank's share of the step's `prompts_per_step` prompts. Every rank draws the whole global
    batch from its copy of the environment (the copies hold the same stream, so they stay equal)
    and keeps its contiguous slice: the union over ranks is what one process would draw."""
    items = st.env.reset(st.cfg.train.prompts_per_step)
    return items[st.dist.share(len(items), "train.prompts_per_step")]


def checkpoint(st: RLState, step: int) -> Path:
    """Save a checkpoint (rank 0 writes it, with every rank's sampling-generator state); collective."""
    states = st.dist.gather_object(st.generator.get_state())  # [rank 0's, rank 1's, ...]
    path = st.run.checkpoint_path(step)
    if st.dist.is_main:
        path = save_checkpoint(st.run, step, policy=st.policy, tokenizer=st.tokenizer, optimizer=st.optimizer,
                               scheduler=st.scheduler, generator=st.generator,
                               state={"env": st.env.state_dict(), "extra": st.extra, "world_size": st.dist.world},
                               modules=st.modules, rank_generator_states=states[1:], task_config=st.cfg.task)
    st.dist.barrier()  # nobody goes on (or resumes) before the checkpoint is complete
    return path


def evaluate_and_log(st: RLState, step: int, *, final: bool) -> dict | None:
    """Greedy evaluation of every split (rank 0 only): metrics to metrics.jsonl, `eval.n_samples`
    completions per split to samples.jsonl, then eval/step-N.json. Tasks with no notion of a
    correct answer (stories: `task.judges_answers` false) are not evaluated; None then."""
    cfg = st.cfg
    if not st.task.judges_answers:
        return None
    n = cfg.eval.n_final if final else cfg.eval.n_per_split
    result = evaluate(st.policy, st.tokenizer, st.task, n=n, batch_size=cfg.eval.batch_size,
                      max_new_tokens=cfg.eval.max_new_tokens, progress=False)
    result["step"] = step
    result["compute"] = {"token_passes": st.extra.get(COMPUTE_EXTRA, 0.0)}
    result["correct"] = outcome_strings(result["samples"])
    st.run.log_metrics(step, flat_metrics(result))
    st.run.log_samples(pick_samples(result["samples"], cfg.eval.n_samples, step))
    st.run.write_eval(step, {k: v for k, v in result.items() if k != "samples"})
    acc = {s: round(r["accuracy"], 3) for s, r in result["splits"].items()}
    log.info("step %d: eval accuracy %s", step, acc)
    return result


CPU_LOGITS_BYTES = 32 * 2**20
"""On CPU, with `train.micro_batch_size` unset, the most float32 logits one micro-batch of an update
holds (bytes): the largest tensors of a forward and backward then stay at tens of megabytes, which
the allocator reuses and the caches hold better than the hundreds a whole batch can take
(`docs/speed.md`, "CPU")."""
_LOGGED_MICRO_BATCHES: set[int] = set()


def update_micro_batch(st: RLState, rows: int, length: int, group: int = 1) -> int | None:
    """Rows per forward and backward of an update over `rows` sequences of `length` completion tokens:
    `train.micro_batch_size` when set. Unset: the whole batch on an accelerator (fewer, larger
    kernels), and on CPU whole groups of `group` rows (a GRPO group shares its prompt pass) whose
    (rows, length, vocabulary) float32 logits fit in `CPU_LOGITS_BYTES`, at least one group. The
    gradient does not depend on it (losses are normalised by the whole batch's counts)."""
    t = st.cfg.train
    if t.micro_batch_size is not None:
        return t.micro_batch_size
    if st.device.type != "cpu":
        return None
    vocab = st.policy.config.get_text_config().vocab_size
    per_group = group * max(length, 1) * vocab * 4
    size = max(1, CPU_LOGITS_BYTES // per_group) * group
    if size >= rows:
        return None
    if size not in _LOGGED_MICRO_BATCHES:  # once per size and process
        _LOGGED_MICRO_BATCHES.add(size)
        log.info("update micro-batches of %d rows (CPU: float32 logits of at most %d MiB each; "
                 "train.micro_batch_size sets it)", size, CPU_LOGITS_BYTES // 2**20)
    return size


def micro_batches(n: int, size: int | None) -> list[slice]:
    """Slices covering range(n) in chunks of `size` (one chunk when None)."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def check_finite(metrics: dict[str, float], where: str) -> None:
    """Raise `TrainingDiverged` (one line for the user, the run marked failed) on a NaN or inf metric."""
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise TrainingDiverged(f"{where}: non-finite values {bad}; training diverged (a lower train.lr may help)")


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


#: Key of the running compute total in the checkpointed extras (`compute/token_passes`).
COMPUTE_EXTRA = "token_passes"

#: One step of an RL algorithm: (state, timer, step) -> (metrics, sample records, generated tokens).
#: The metrics must hold the step's token-passes (`compute.STEP_KEY`); the loop adds the running total.
StepFn = Callable[[RLState, Timer, int], tuple[dict[str, float], list[dict], int]]


class EarlyStopper:
    """`train.early_stop`: the moving average of a logged metric against a threshold. Its window
    lives in the run's checkpointed extras, so a resumed run decides as an uninterrupted one would."""

    def __init__(self, cfg: EarlyStopConfig, extra: dict):
        self.cfg = cfg
        self.extra = extra

    def check(self, step: int, metrics: dict[str, float]) -> dict | None:
        """Record this step's value; returns the stop record when the run should stop here."""
        c = self.cfg
        if c.metric not in metrics:
            close = difflib.get_close_matches(c.metric, list(metrics), n=5, cutoff=0.4)
            raise UserError(f"train.early_stop.metric: {c.metric!r} is not logged at step {step} (it must be "
                            f"logged every step); close: {close or sorted(metrics)[:8]}")
        window = self.extra.setdefault("early_stop_window", [])
        window.append(float(metrics[c.metric]))
        del window[:-c.window]
        if len(window) < c.window or step < c.min_steps:
            return None
        avg = sum(window) / len(window)
        crossed = (c.above is not None and avg > c.above) or (c.below is not None and avg < c.below)
        if not crossed:
            return None
        return {"step": step, "metric": c.metric, "moving_average": avg, "window": c.window,
                "above": c.above, "below": c.below}


def run_rl(cfg: RLRunConfig, run: RunDir, kind: str, step_fn: StepFn, *, need_ref: bool, model=None,
           tokenizer=None, task: Task | None = None, make_modules=None) -> Path:
    """The outer loop every RL algorithm shares: set up or resume, evaluate the starting point,
    run `step_fn` for each step, log metrics and samples, evaluate and checkpoint on schedule.
    Returns the final checkpoint. In a multi-process launch every rank runs this loop; rank 0
    alone logs, evaluates and writes (the others wait for it at the checkpoint's barrier). Any
    failure leaves status.json "failed" with the reason."""
    handler = None if run.readonly else run.attach_log()
    try:
        with run.failure_status(kind):
            return _run_rl(cfg, run, kind, step_fn, need_ref=need_ref, model=model, tokenizer=tokenizer,
                           task=task, make_modules=make_modules)
    finally:
        run.close()
        if handler is not None:
            logging.getLogger("mechrl").removeHandler(handler)
            handler.close()


def _run_rl(cfg: RLRunConfig, run: RunDir, kind: str, step_fn: StepFn, *, need_ref: bool, model, tokenizer,
            task, make_modules) -> Path:
    t = cfg.train
    torch.manual_seed(cfg.seed)
    st = setup_rl(cfg, run, need_ref=need_ref, model=model, tokenizer=tokenizer, task=task,
                  make_modules=make_modules)
    main = st.dist.is_main
    if st.start_step >= t.max_steps or "stopped_early" in st.extra:
        final_path = run.checkpoint_path(st.start_step)
        if main and run.needs_finish:  # killed after the final checkpoint, before the run was marked finished
            _finish(st, kind, final_path)
        log.info("already finished: %s", final_path)
        return final_path
    stopper = EarlyStopper(t.early_stop, st.extra) if t.early_stop is not None else None
    if st.start_step > 0 and COMPUTE_EXTRA not in st.extra:
        raise UserError(f"{run.path}: its last checkpoint (step {st.start_step}) has no running compute total "
                        f"({TOTAL_KEY}; written by mechrl since compute accounting); resuming would restart the "
                        "count at 0. Use --force to start over")
    if main:
        run.set_status("running", kind=kind)
        log.info("%s %s: %s (%d processes)", kind.upper(), run.path.name, t.model_dump_json(), st.dist.world)
        if st.start_step == 0:
            evaluate_and_log(st, 0, final=False)  # the starting point, for comparison
    timer = Timer()
    bar = tqdm(range(st.start_step + 1, t.max_steps + 1), desc=kind, initial=st.start_step, total=t.max_steps,
               disable=not main, dynamic_ncols=True)
    for step in bar:
        timer.totals.clear()
        # metrics come back reduced over ranks; samples are this rank's; n_tokens its own count
        metrics, samples, n_tokens = step_fn(st, timer, step)
        n_tokens = int(st.dist.sum(n_tokens).item())
        if STEP_KEY not in metrics:
            raise RuntimeError(f"{kind} step {step}: the step function reported no {STEP_KEY!r} (its token-passes, "
                               "mechrl.train.compute); every RL loop counts its compute")
        before = st.extra.get(COMPUTE_EXTRA, 0.0)
        st.extra[COMPUTE_EXTRA] = after = before + float(metrics[STEP_KEY])  # saved with checkpoints
        metrics[TOTAL_KEY] = after
        marks = crossed(before, after, t.checkpoint_at_compute)  # budgets first reached at this step
        if t.max_token_passes is not None:  # a run stopped by compute: its progress is compute, not steps
            bar.set_postfix(compute=f"{after / t.max_token_passes:.1%}", refresh=False)
        step_s = sum(timer.totals.values())  # this rank's; ranks meet at every gradient all-reduce
        metrics.update({f"time/{k}_s": v for k, v in timer.totals.items()})
        metrics["time/step_s"] = step_s
        metrics["throughput/tokens_per_s"] = n_tokens / max(step_s, 1e-9)
        st.extra["train_time_s"] = st.extra.get("train_time_s", 0.0) + step_s  # saved with checkpoints
        stop = stopper.check(step, metrics) if stopper is not None else None
        if stop is None and t.max_token_passes is not None and after >= t.max_token_passes:
            stop = {"step": step, "metric": TOTAL_KEY, "value": after, "max_token_passes": t.max_token_passes}
        if stop is not None:
            st.extra["stopped_early"] = stop  # saved with this step's checkpoint: a rerun stays stopped
        final = step == t.max_steps or stop is not None
        if main and (step % t.log_every == 0 or final):
            run.log_metrics(step, metrics)
        if main and step % t.sample_every == 0 and t.n_samples:
            run.log_samples(samples[:t.n_samples])
        # evaluate before checkpointing: a kill between the two redoes the step's evaluation
        if main and (step % t.eval_every == 0 or final or marks):
            evaluate_and_log(st, step, final=final)
        if step % t.save_every == 0 or step % t.eval_every == 0 or final or marks:
            checkpoint(st, step)  # collective: the other ranks wait here for rank 0's evaluation
        if marks:
            log.info("step %d: %s %.4g reached %s; checkpointed and evaluated", step, TOTAL_KEY, after, marks)
        if stop is not None:
            if "max_token_passes" in stop:
                log.info("compute budget reached at step %d: %s %.4g >= %g", step, TOTAL_KEY, after,
                         t.max_token_passes)
            else:
                log.warning("early stop at step %d: the %d-step mean of %s is %.4g (%s %g)", step, stop["window"],
                            stop["metric"], stop["moving_average"], "above" if stop["above"] is not None else "below",
                            stop["above"] if stop["above"] is not None else stop["below"])
            break
    last = st.extra["stopped_early"]["step"] if "stopped_early" in st.extra else t.max_steps
    final_path = run.checkpoint_path(last)
    if main:
        _finish(st, kind, final_path)
    return final_path


def _finish(st: RLState, kind: str, final_path: Path) -> None:
    st.run.finish(kind, final_checkpoint=str(final_path), train_time_s=st.extra.get("train_time_s", 0.0),
                  stopped_early=st.extra.get("stopped_early"), token_passes=st.extra.get(COMPUTE_EXTRA, 0.0))
