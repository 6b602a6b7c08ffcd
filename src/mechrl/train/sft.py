"""Supervised fine-tuning with TRL's SFTTrainer, evaluated on every split at every checkpoint.

The dataset is prompt/completion pairs, so SFTTrainer puts the loss on completion tokens only
(the answer, plus the EOS it appends). Two callbacks connect the trainer to the run directory:
metrics go to metrics.jsonl under `train/`, and each save becomes `checkpoints/step-N/`
(renamed from the trainer's `checkpoint-N` once complete, so a half-written checkpoint is never
mistaken for one) and is evaluated on every split into `eval/step-N.json`.

A run killed at any point resumes from its last `step-N` with optimizer, scheduler and RNG state.

Under `accelerate launch` SFTTrainer runs data-parallel (`train.batch_size` is per process). Only
the main process (`state.is_world_process_zero`) logs, renames and evaluates; the trainer itself
still writes each process's RNG state (`rng_state_<rank>.pth`) into the checkpoint, which resuming
needs, and every process waits for the rename before it goes on.

    mechrl sft recipes/cards-sft.yaml train.lr=3e-4 seed=7
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from mechrl.config import SFTRunConfig
from mechrl.evaluate import evaluate, flat_metrics
from mechrl.models.loading import load_model, load_pretrained
from mechrl.runs.report import write_run_report
from mechrl.runs.rundir import RunDir
from mechrl.tasks import build_task

log = logging.getLogger(__name__)

_TRAINER_DIR = "_trainer"  # where SFTTrainer writes checkpoint-N before it is renamed


class _RunCallback(TrainerCallback):
    """Forward logs to metrics.jsonl; turn each save into an evaluated `step-N` checkpoint."""

    def __init__(self, run: RunDir, cfg: SFTRunConfig, task, tokenizer):
        self.run, self.cfg, self.task, self.tok = run, cfg, task, tokenizer
        self.t_start = time.perf_counter()
        self.train_time = 0.0  # seconds spent training (evaluation excluded)
        self._t_last = None

    def on_step_begin(self, args, state, control, **kw):
        self._t_last = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self._t_last is not None:
            self.train_time += time.perf_counter() - self._t_last

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero:
            return
        logs = dict(logs or {})
        if "loss" not in logs:  # the end-of-training summary (train_runtime, ...) is not a step log
            return
        if not math.isfinite(logs["loss"]):
            raise FloatingPointError(f"SFT loss is {logs['loss']} at step {state.global_step}")
        metrics = {f"train/{k}": v for k, v in logs.items() if isinstance(v, (int, float))}
        metrics["train/time_s"] = self.train_time
        self.run.log_metrics(state.global_step, metrics)

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
        dst = self.run.checkpoint_path(step)
        if dst.exists():
            shutil.rmtree(dst)
        src.rename(dst)
        final = step >= state.max_steps
        n = self.cfg.eval.n_final if final else self.cfg.eval.n_per_split
        if args.world_size > 1:
            # the live model may be sharded (FSDP) and its forward then needs every process: evaluate
            # the saved checkpoint instead, which also checks that it loads
            model, _ = load_pretrained(dst, dtype=self.cfg.model.dtype, device=str(args.device))
        result = evaluate(model, self.tok, self.task, n=n, batch_size=self.cfg.eval.batch_size,
                          max_new_tokens=self.cfg.eval.max_new_tokens, progress=False)
        result["step"], result["checkpoint"] = step, str(dst)
        self.run.write_eval(step, {k: v for k, v in result.items() if k != "samples"})
        self.run.log_metrics(step, flat_metrics(result))
        self.run.log_samples(_pick_samples(result["samples"], self.cfg.eval.n_samples, step))
        acc = {s: round(r["accuracy"], 3) for s, r in result["splits"].items()}
        log.info("step %d: checkpoint %s; accuracy %s", step, dst.name, acc)


def _wait_for_everyone() -> None:
    """A barrier across the processes of a multi-process launch; nothing in one process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _pick_samples(samples: list[dict], per_split: int, step: int) -> list[dict]:
    seen: dict[str, int] = {}
    out = []
    for s in samples:
        if seen.get(s["split"], 0) < per_split:
            seen[s["split"]] = seen.get(s["split"], 0) + 1
            out.append({"step": step, **s})
    return out


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
        disable_tqdm=False,
        save_only_model=False,
    )


def run_sft(cfg: SFTRunConfig, run: RunDir, *, model=None, tokenizer=None, task=None) -> Path:
    """Train, checkpoint and evaluate; returns the final checkpoint's path. Resumes when `run`
    already holds checkpoints of this config."""
    main = not run.readonly  # rank 0 of a multi-process launch, or the only process
    handler = run.attach_log() if main else None
    try:
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
        if latest is not None and latest[0] >= cfg.train.max_steps and run.finished:
            log.info("already finished: %s", latest[1])
            return latest[1]
        trainer_dir = run.checkpoints_dir / _TRAINER_DIR
        if main and trainer_dir.exists():  # leftovers of a killed save: never complete checkpoints
            shutil.rmtree(trainer_dir)
        resume = None
        if latest is not None:
            step, path = latest
            if not (path / "trainer_state.json").exists():
                raise RuntimeError(f"{path} has no trainer_state.json: cannot resume SFT from it")
            if main:
                run.truncate_after(step)
            resume = str(path)
            log.info("resuming from %s", path)
        if main:
            run.set_status("running", kind="sft")

        train = task.datasets["train"].select_columns(["prompt", "completion"])
        callback = _RunCallback(run, cfg, task, tokenizer)
        trainer = SFTTrainer(model=model, args=trl_args(cfg, trainer_dir, device), train_dataset=train,
                             processing_class=tokenizer, callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        _wait_for_everyone()
        final = run.checkpoint_path(cfg.train.max_steps)
        if not final.exists():
            raise RuntimeError(f"SFT finished without its final checkpoint {final}")
        if main:
            if trainer_dir.exists():
                shutil.rmtree(trainer_dir)
            run.set_status("finished", kind="sft", final_checkpoint=str(final), train_time_s=callback.train_time)
            write_run_report(run.path)
        return final
    finally:
        run.close()
        if handler is not None:
            logging.getLogger("mechrl").removeHandler(handler)
            handler.close()
