"""GRPO step time: mechrl's GRPO loop vs TRL's GRPOTrainer, same model, batch and settings, one process.

Both train the same random Llama (`--shape`: tiny, SimpleStories-1.25M's shape, `common.tiny_llama`;
or qwen05b, Qwen2.5-0.5B's body with a 4096 vocabulary) from the same weights on the same 16 prompts x
8 generations x 32 new tokens (by default), with the same reward (a text-level function of the
completion), learning rate, `beta` and `loss_type="grpo"`, in the same precision (`--dtype`: fp32, or
bf16 autocast with float32 weights: mechrl's `train.dtype=bf16`, TRL's `bf16=True`). The two are
interleaved step by step in one process (a TRL step, then a mechrl step, from a TRL callback), so a
change in the machine's load falls on both alike. The first `--warmup` steps of each are timed apart
(they hold the one-time costs: mechrl's decode-graph captures and any compilation, TRL's own); the
JSON records the median seconds per step of each of the `--steps` timed ones, `speedup` = TRL time /
mechrl time, mechrl's time per phase (generate / reward / update), its graph captures and compilations.

mechrl's speed options (`--decode`, `--adamw`, `--compile-logprobs`) are its `train.*` settings; their
defaults are mechrl's (auto: the captured decode step and fused AdamW on CUDA, the host loop and
PyTorch's AdamW on CPU).

    .venv/bin/python bench/grpo_vs_trl.py                        # CPU, writes bench/results/grpo_vs_trl.json
    .venv/bin/python bench/grpo_vs_trl.py --device cuda --prompts 32 --generations 16 --new-tokens 64 \\
        --name grpo_vs_trl_cuda_tiny_fp32
    .venv/bin/python bench/grpo_vs_trl.py --device cuda --shape qwen05b --prompts 8 --generations 8 \\
        --new-tokens 128 --dtype bf16 --name grpo_vs_trl_cuda_qwen05b_bf16
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS, SHAPE_NAMES, SHAPES, bench_model, bench_tokenizer, prompt_batch, prompt_texts, write_result,
)


def bench_reward(prompts, completions, examples=None, **kw) -> list[float]:
    """Share of completion words whose id is even: cheap, and varied within a group."""
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(int(w[1:]) % 2 == 0 for w in words if w[1:].isdigit()) / max(len(words), 1))
    return out


def mechrl_stepper(model_dir: Path, tok, prompts: list[str], args, device: str):
    """A function that runs and times one mechrl GRPO step (seconds), on its own copy of the model;
    it appends each step's time per phase to `phases` (its attribute)."""
    from mechrl.config import GRPOConfig, GRPORunConfig, RewardSpec
    from mechrl.envs import EnvItem, StepResult, TextEnv
    from mechrl.models.loading import load_pretrained
    from mechrl.models.adapters import frozen_copy
    from mechrl.rewards import build_reward, register_reward
    from mechrl.runs.rundir import RunDir
    from mechrl.train.fast_update import build_adamw
    from mechrl.train.grpo import GRPOHooks, grpo_step
    from mechrl.train.rlcommon import RLState, Timer, warmup_constant

    register_reward("bench_even_words")(bench_reward)
    reward = build_reward([RewardSpec(name="bench_even_words")])

    class PromptEnv(TextEnv):
        """The fixed prompt list, cycled; the benchmark reward."""

        def __init__(self):
            self.reward, self.i = reward, 0

        def reset(self, n):
            items = [EnvItem(prompts[(self.i + k) % len(prompts)], {}) for k in range(n)]
            self.i += n
            return items

        def step(self, items, completions):
            return StepResult(self.reward([it.prompt for it in items], completions, [it.example for it in items]),
                              [{} for _ in items])

        def state_dict(self):
            return {"i": self.i}

        def load_state_dict(self, state):
            self.i = state["i"]

    cfg = GRPORunConfig(name="bench", train=GRPOConfig(
        lr=args.lr, prompts_per_step=args.prompts, num_generations=args.generations, max_new_tokens=args.new_tokens,
        beta=args.beta, loss_type="grpo", temperature=1.0, max_steps=args.warmup + args.steps, dtype=args.dtype,
        decode=args.decode, adamw=args.adamw, compile_logprobs=args.compile_logprobs, adam_beta1=0.9,
        adam_beta2=0.999, weight_decay=0.0))
    model, _ = load_pretrained(model_dir, device=device)
    model.train()
    opt = build_adamw([p for p in model.parameters() if p.requires_grad], cfg.train, device)
    ref = frozen_copy(model) if args.beta > 0 else None
    st = RLState(cfg, RunDir(tempfile.mkdtemp(prefix="mechrl-bench-")), None, PromptEnv(), model, ref, tok, opt,
                 warmup_constant(opt, 0), torch.Generator(device=device).manual_seed(0), torch.device(device))
    hooks = GRPOHooks()
    phases = []

    def step() -> float:
        _sync(device)
        timer = Timer()
        t0 = time.perf_counter()
        _, batch = grpo_step(st, hooks, timer)
        _sync(device)
        took = time.perf_counter() - t0
        phases.append({**{k: round(v, 5) for k, v in timer.totals.items()},
                       "decode_mode": batch.decode.mode if batch.decode else None,
                       "decode_capture_s": round(batch.decode.capture_s, 5) if batch.decode else 0.0})
        return took

    step.phases = phases
    step.model = model
    return step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(model_dir: Path, tok, prompts: list[str], args, device: str) -> dict:
    """Every step's time of mechrl and of TRL (warm-up steps first), mechrl's phases, and its decode and
    compile totals: TRL's trainer runs its loop, and after each of its steps a callback runs one
    mechrl step."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    mechrl_step = mechrl_stepper(model_dir, tok, prompts, args, device)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.mechrl_times, self.t0 = [], [], None

        def on_step_begin(self, a, state, control, **kw):
            _sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            _sync(device)
            self.times.append(time.perf_counter() - self.t0)
            self.mechrl_times.append(mechrl_step())

    n_steps = args.warmup + args.steps
    data = Dataset.from_dict({"prompt": prompts * n_steps})
    B = args.prompts * args.generations
    targs = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=B,
        num_generations=args.generations, max_completion_length=args.new_tokens, learning_rate=args.lr,
        beta=args.beta, loss_type="grpo", scale_rewards="group", temperature=1.0, max_steps=n_steps,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        use_cpu=device == "cpu", bf16=args.dtype == "bf16", fp16=False, report_to="none", save_strategy="no",
        logging_steps=1,
        disable_tqdm=True, seed=0, dataloader_num_workers=0, shuffle_dataset=False,
        # TRL's default recomputes every forward in the backward (activation checkpointing); mechrl does
        # not, so the same work is timed only with it off
        activation_checkpointing=False,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=bench_reward, args=targs, train_dataset=data,
                          processing_class=tok, callbacks=[timer])
    trainer.train()
    if len(timer.times) != n_steps or len(timer.mechrl_times) != n_steps:
        raise RuntimeError(f"TRL ran {len(timer.times)} steps and mechrl {len(timer.mechrl_times)}, expected {n_steps}")
    from mechrl.train.decode_graph import decode_totals
    from mechrl.train.fast_update import compile_stats

    return {"mechrl": timer.mechrl_times, "trl": timer.times, "phases": mechrl_step.phases,
            "decode": decode_totals(mechrl_step.model), "compile": compile_stats()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast with float32 weights, both (CUDA only)")
    p.add_argument("--decode", choices=["auto", "eager", "static", "graph"], default="auto",
                   help="mechrl's train.decode")
    p.add_argument("--adamw", choices=["auto", "for-loop", "foreach", "fused"], default="auto",
                   help="mechrl's train.adamw")
    p.add_argument("--compile-logprobs", action="store_true", help="mechrl's train.compile_logprobs")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--name", default="grpo_vs_trl")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the result JSON")
    args = p.parse_args()
    if args.dtype == "bf16" and not args.device.startswith("cuda"):
        p.error("--dtype bf16 runs on CUDA only (bf16 autocast on CPU is slower than fp32, for both)")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()

    tok = bench_tokenizer()
    ids, mask = prompt_batch(args.prompts, 1, seed=0)
    prompts = prompt_texts(ids, mask)
    model_dir = Path(tempfile.mkdtemp(prefix="bench-llama-"))
    model = bench_model(args.shape, "cpu")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    del model

    runs = time_interleaved(model_dir, tok, prompts, args, args.device)
    w = args.warmup
    mech, trl_times = runs["mechrl"][w:], runs["trl"][w:]
    m, t = statistics.median(mech), statistics.median(trl_times)
    phases = runs["phases"][w:]
    result = {
        "mechrl_s_per_step": m, "trl_s_per_step": t, "speedup": t / m,
        "mechrl_times_s": mech, "trl_times_s": trl_times,
        "warmup_times_s": {"mechrl": runs["mechrl"][:w], "trl": runs["trl"][:w]},
        "mechrl_phases_median_s": {k: statistics.median([ph[k] for ph in phases])
                                   for k in phases[0] if isinstance(phases[0][k], float) and k != "decode_capture_s"},
        "mechrl_phases": runs["phases"],
        "mechrl_decode": runs["decode"], "mechrl_compile": runs["compile"],
        "config": {"model": SHAPE_NAMES[args.shape], "shape": args.shape, "model_config": SHAPES[args.shape],
                   "parameters": n_params, "dtype": args.dtype,
                   "prompts": args.prompts, "generations": args.generations, "new_tokens": args.new_tokens,
                   "lr": args.lr, "beta": args.beta, "loss_type": "grpo", "warmup_steps": args.warmup,
                   "trl_activation_checkpointing": False,
                   "timed_steps": args.steps, "torch_threads": torch.get_num_threads(),
                   "mechrl_train": {"decode": args.decode, "adamw": args.adamw,
                                    "compile_logprobs": args.compile_logprobs},
                   "order": "interleaved: each TRL step is followed by one mechrl step"},
    }
    path = write_result(args.name, result, device=args.device, out_dir=args.out)
    print(f"{args.shape} {args.dtype}: mechrl {m:.3f} s/step, TRL {t:.3f} s/step, speedup {t / m:.2f}x "
          f"(mechrl phases {result['mechrl_phases_median_s']}, decode {runs['decode']}) -> {path}")


if __name__ == "__main__":
    main()
