"""Supervised fine-tuning with TRL's SFTTrainer, evaluated on every split at every checkpoint.

The dataset is prompt/completion pairs, so SFTTrainer puts the loss on completion tokens only
(the answer, plus the EOS it appends). Two callbacks connect the trainer to the run directory:
metrics go to metrics.jsonl under `train/`, and each save becomes `checkpoints/step-N/`
(renamed from the trainer's `checkpoint-N` once complete, so a half-written checkpoint is never
mistaken for one) and is evaluated on every split into `eval/step-N.json`.

A run killed at any point resumes from its last `step-N` with optimizer, scheduler and RNG state,
the records logged after that step dropped (all of them when there is no `step-N` yet), the
checkpoint's evaluation redone if the kill came before it completed, and the running totals
(`train/num_tokens`, `train/time_s`) continued. `eval/step-N.json` is written last, so it marks an
evaluation whose metrics and samples are all logged. A checkpoint missing any part resuming needs
(weights, optimizer, scheduler, trainer state, RNG) is refused with a line naming the file.

Under `accelerate launch` SFTTrainer runs data-parallel (`train.batch_size` is per process). Only
the main process (`state.is_world_process_zero`) logs, renames and evaluates; the trainer itself
still writes each process's RNG state (`rng_state_<rank>.pth`) into the checkpoint, which resuming
needs, and every process waits for the rename before it goes on.

    mechrl sft recipes/cards-sft.yaml train.lr=3e-4 seed=7
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import ProgressCallback, TrainerCallback, set_seed
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from mechrl.config import SFTRunConfig, config_to_yaml
from mechrl.errors import TrainingDiverged
from mechrl.evaluate import evaluate, flat_metrics, outcome_strings, pick_samples
from mechrl.models.loading import CheckpointError, load_model, load_pretrained
from mechrl.runs.rundir import CHECKPOINT_TASK_FILE, RunDir, atomic_write_json, atomic_write_text
from mechrl.tasks import build_task
from mechrl.train.compute import TOTAL_KEY, crossed, sft_token_passes

log = logging.getLogger(__name__)

_TRAINER_DIR = "_trainer"  # where SFTTrainer writes checkpoint-N before it is renamed


#: mechrl's own resume state in each `step-N` (beside the trainer's files): running totals.
PROGRESS_FILE = "mechrl_progress.json"


def check_resumable(path: Path) -> None:
    """Raise `CheckpointError` naming what is missing unless SFT can resume from `path` exactly:
    without the optimizer or scheduler state, the trainer would resume silently with fresh ones."""
    need = ["trainer_state.json", "optimizer.pt", "scheduler.pt", "config.json"]
    missing = [f for f in need if not (path / f).is_file()]
    if not any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        missing.append("model.safetensors")
    if not list(path.glob("rng_state*.pth")):
        missing.append("rng_state.pth")
    if missing:
        raise CheckpointError(f"{path} cannot be resumed from: missing {', '.join(missing)}; delete this "
                              "checkpoint to resume from the previous one, or use --force to start over")


class _RunCallback(TrainerCallback):
    """Forward logs to metrics.jsonl; turn each save into an evaluated `step-N` checkpoint."""

    def __init__(self, run: RunDir, cfg: SFTRunConfig, task, tokenizer, progress: dict | None = None):
        self.run, self.cfg, self.task, self.tok = run, cfg, task, tokenizer
        self.train_time = float((progress or {}).get("train_time_s", 0.0))  # s training (evaluation excluded)
        self._t_last = None
        self.bar = None
        self._passes = None  # running token-passes at the last step end (set when training begins)

    def on_step_begin(self, args, state, control, **kw):
        self._t_last = time.perf_counter()

    def on_train_begin(self, args, state, control, **kw):
        self._passes = sft_token_passes(state.num_input_tokens_seen)  # restored from the checkpoint on resume
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="sft", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kw):
        if self._t_last is not None:
            self.train_time += time.perf_counter() - self._t_last
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
        # the trainer has counted this step's tokens; a compute mark first reached now saves (and so evaluates) here
        passes = sft_token_passes(state.num_input_tokens_seen)
        marks = crossed(self._passes, passes, self.cfg.train.checkpoint_at_compute)
        if marks:
            control.should_save = True
            log.info("step %d: %s %d reached %s; checkpointing", state.global_step, TOTAL_KEY, passes, marks)
        self._passes = passes

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero:
            return
        logs = dict(logs or {})
        if "loss" not in logs:  # the end-of-training summary (train_runtime, ...) is not a step log
            return
        bad = {k: v for k, v in logs.items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:
            raise TrainingDiverged(f"SFT diverged at step {state.global_step}: {bad} (train.lr="
                                   f"{self.cfg.train.lr:g}; a lower one may help)")
        # TRL's own `num_tokens` restarts at 0 on resume; the trainer state's count is checkpointed
        logs.pop("num_tokens", None)
        logs["num_tokens"] = logs.pop("num_input_tokens_seen", state.num_input_tokens_seen)
        metrics = {f"train/{k}": v for k, v in logs.items() if isinstance(v, (int, float))}
        metrics["train/time_s"] = self.train_time
        metrics[TOTAL_KEY] = sft_token_passes(state.num_input_tokens_seen)
        self.run.log_metrics(state.global_step, metrics)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    def on_save(self, args, state, control, model=None, **kw):
        _wait_for_everyone()  # every process has written its part of checkpoint-N (its RNG state)
        if state.is_world_process_zero:
            self._publish(args, state, model)
        _wait_for_everyone()  # step-N exists before anyone goes on

    def _publish(self, args, state, model) -> None:
        """Rename checkpoint-N to step-N, evaluate it and log the result (main process only)."""
        step = state.global_step
        src = Path(args.output_dir) / f"checkpoint-{step}"
        if not src.is_dir():
            raise RuntimeError(f"SFTTrainer reported a save at step {step} but {src} does not exist")
        # mechrl's part of the checkpoint goes in before the rename: a step-N is always complete
        atomic_write_json(src / PROGRESS_FILE, {"step": step, "train_time_s": self.train_time,
                                                "token_passes": sft_token_passes(state.num_input_tokens_seen),
                                                "num_tokens": state.num_input_tokens_seen})
        atomic_write_text(src / CHECKPOINT_TASK_FILE, config_to_yaml(self.cfg.task))
        dst = self.run.checkpoint_path(step)
        if dst.exists():
            shutil.rmtree(dst)
        src.rename(dst)
        if args.world_size > 1:
            # the live model may be sharded (FSDP) and its forward then needs every process: evaluate
            # the saved checkpoint instead, which also checks that it loads
            model, _ = load_pretrained(dst, dtype=self.cfg.model.dtype, device=str(args.device))
        self.evaluate(model, step, dst, final=step >= state.max_steps, num_tokens=state.num_input_tokens_seen)

    def evaluate(self, model, step: int, checkpoint: Path, *, final: bool, num_tokens: int) -> None:
        """Evaluate every split; metrics and samples are logged before eval/step-N.json is written, so
        the file marks a complete evaluation (a resumed run redoes one without it). The file carries
        the checkpoint's running compute and each example's correctness."""
        n = self.cfg.eval.n_final if final else self.cfg.eval.n_per_split
        result = evaluate(model, self.tok, self.task, n=n, batch_size=self.cfg.eval.batch_size,
                          max_new_tokens=self.cfg.eval.max_new_tokens, progress=False)
        result["step"], result["checkpoint"] = step, str(checkpoint)
        result["compute"] = {"token_passes": sft_token_passes(num_tokens), "num_tokens": int(num_tokens)}
        result["correct"] = outcome_strings(result["samples"])
        self.run.log_metrics(step, flat_metrics(result))
        self.run.log_samples(pick_samples(result["samples"], self.cfg.eval.n_samples, step))
        self.run.write_eval(step, {k: v for k, v in result.items() if k != "samples"})
        acc = {s: round(r["accuracy"], 3) for s, r in result["splits"].items()}
        log.info("step %d: checkpoint %s; accuracy %s", step, checkpoint.name, acc)


def _wait_for_everyone() -> None:
    """A barrier across the processes of a multi-process launch; nothing in one process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def trl_args(cfg: SFTRunConfig, output_dir: Path, device: torch.device) -> TRLSFTConfig:
    t = cfg.train
    schedule = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}[t.lr_schedule]
    return TRLSFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        max_steps=t.max_steps,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=schedule,
        lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio} if t.lr_schedule == "cosine" else None,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.log_every,
        save_strategy="steps",
        save_steps=t.eval_every,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        use_cpu=device.type == "cpu",
        bf16=cfg.model.dtype == "bfloat16" and device.type == "cuda",
        fp16=False,
        dataloader_num_workers=0,
        completion_only_loss=True,
        max_length=None,
        dataset_num_proc=None,
        remove_unused_columns=True,
        # TRL defaults to activation checkpointing (recomputing every forward in the backward): a tiny
        # model gains no memory worth the time; naming the new option also avoids the old name's warning
        activation_checkpointing=False,
        disable_tqdm=False,  # the trainer's own bar is replaced by _RunCallback's (no printed log dicts)
        include_num_input_tokens_seen="non_padding",  # checkpointed in trainer_state.json: continues on resume
        save_only_model=False,
    )


def run_sft(cfg: SFTRunConfig, run: RunDir, *, model=None, tokenizer=None, task=None) -> Path:
    """Train, checkpoint and evaluate; returns the final checkpoint's path. Resumes when `run`
    already holds checkpoints of this config (see the module docstring). Any failure leaves
    status.json "failed" with the reason."""
    main = not run.readonly  # rank 0 of a multi-process launch, or the only process
    handler = run.attach_log() if main else None
    try:
        with run.failure_status("sft"):
            return _run_sft(cfg, run, main, model=model, tokenizer=tokenizer, task=task)
    finally:
        run.close()
        if handler is not None:
            logging.getLogger("mechrl").removeHandler(handler)
            handler.close()


def _is_eval_record(path: Path, record: dict) -> bool:
    """A record of a checkpoint's evaluation: its samples, or its `eval/...` metrics."""
    return path.name == "samples.jsonl" or any(k.startswith("eval/") for k in record)


def _run_sft(cfg: SFTRunConfig, run: RunDir, main: bool, *, model, tokenizer, task) -> Path:
    set_seed(cfg.seed)
    task = task or build_task(cfg.task)
    if model is None:
        model, tokenizer = load_model(cfg.model, task, seed=cfg.seed)
    elif tokenizer is None:
        raise ValueError("run_sft: a model was given without its tokenizer")
    device = next(model.parameters()).device
    n_params = sum(p.numel() for p in model.parameters())
    log.info("SFT %s: %s with %.2fM parameters on %s", run.path.name, type(model).__name__, n_params / 1e6, device)

    latest = run.latest_checkpoint()
    max_steps = cfg.train.max_steps
    if latest is not None and latest[0] > max_steps:
        raise CheckpointError(f"{latest[1]} is past train.max_steps={max_steps}; the run's config says otherwise")
    if latest is not None and latest[0] == max_steps and run.finished and (run.eval_dir / f"step-{max_steps}.json").is_file():
        if main and run.needs_finish:  # killed while writing the report
            run.finish("sft", **_final_status(latest[1]))
        log.info("already finished: %s", latest[1])
        return latest[1]
    trainer_dir = run.checkpoints_dir / _TRAINER_DIR
    if main and trainer_dir.exists():  # leftovers of a killed save: never complete checkpoints
        shutil.rmtree(trainer_dir)
    resume, progress, unevaluated = None, None, None
    if latest is not None:
        step, path = latest
        check_resumable(path)
        progress = _read_progress(path)
        if not (run.eval_dir / f"step-{step}.json").is_file():
            unevaluated = (step, path)  # killed between the checkpoint and the end of its evaluation
        resume = str(path)
        log.info("resuming from %s", path)
    if main:
        if latest is None:
            run.truncate_after(None)  # nothing complete to resume from: the run starts over
        else:
            step = latest[0]
            run.truncate_after(step, also=lambda p, r: unevaluated is not None and r.get("step") == step
                               and _is_eval_record(p, r))
        run.set_status("running", kind="sft")

    callback = _RunCallback(run, cfg, task, tokenizer, progress)
    if unevaluated is not None and main:
        step, path = unevaluated
        ckpt_model, _ = load_pretrained(path, dtype=cfg.model.dtype, device=str(device))
        callback.evaluate(ckpt_model, step, path, final=step >= max_steps, num_tokens=progress["num_tokens"])
        del ckpt_model
    _wait_for_everyone()
    if latest is None or latest[0] < max_steps:
        train = task.datasets["train"].select_columns(["prompt", "completion"])
        trainer = SFTTrainer(model=model, args=trl_args(cfg, trainer_dir, device), train_dataset=train,
                             processing_class=tokenizer, callbacks=[callback])
        trainer.remove_callback(ProgressCallback)  # it prints every log dict; _RunCallback has the bar
        trainer.train(resume_from_checkpoint=resume)
        _wait_for_everyone()
    final = run.checkpoint_path(max_steps)
    if not final.exists():
        raise RuntimeError(f"SFT finished without its final checkpoint {final}")
    if main:
        if trainer_dir.exists():
            shutil.rmtree(trainer_dir)
        run.finish("sft", **_final_status(final))
    return final


def _read_progress(path: Path) -> dict:
    f = path / PROGRESS_FILE
    if not f.is_file():
        raise CheckpointError(f"{path}: no {PROGRESS_FILE} (a checkpoint of an older mechrl?); its running "
                              "totals cannot be continued. Use --force to start over")
    return json.loads(f.read_text())


def _final_status(final: Path) -> dict:
    progress = _read_progress(final)
    return {"final_checkpoint": str(final), "train_time_s": progress["train_time_s"],
            "token_passes": sft_token_passes(progress["num_tokens"])}
