"""Where mechrl's CPU GRPO step goes: torch's profiler over timed steps of `bench/grpo_vs_trl.py`'s batch.

    .venv/bin/python bench/profile_grpo_step.py [--threads 1] [--steps 2] [--rows 25]

Builds the benchmark's random tiny Llama and prompts (`bench/common.py`), runs mechrl's GRPO step
(`grpo_vs_trl.mechrl_stepper`: sampling, scoring, update) twice to warm up, times four steps (median
and phases printed), then profiles `--steps` more and prints the operators by self CPU time. CPU only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_model, bench_tokenizer, prompt_batch, prompt_texts  # noqa: E402
import grpo_vs_trl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--steps", type=int, default=2, help="profiled steps")
    ap.add_argument("--rows", type=int, default=25, help="operators listed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    tok = bench_tokenizer()
    ids, mask = prompt_batch(16, 1, seed=0)
    prompts = prompt_texts(ids, mask)
    model_dir = Path(tempfile.mkdtemp(prefix="bench-llama-"))
    bench_model("tiny", "cpu").save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    bench_args = types.SimpleNamespace(lr=1e-5, prompts=16, generations=8, new_tokens=32, beta=0.0, warmup=2,
                                       steps=4, dtype="fp32", decode="auto", adamw="auto", compile_logprobs=False)
    step = grpo_vs_trl.mechrl_stepper(model_dir, tok, prompts, bench_args, "cpu")
    for _ in range(2):
        step()
    times = [step() for _ in range(4)]
    print(f"{args.threads} thread(s): median {statistics.median(times):.3f} s/step; last step's phases "
          f"{ {k: v for k, v in step.phases[-1].items() if isinstance(v, float)} }")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
