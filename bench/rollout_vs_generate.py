"""Tokens/s of mechrl's sampler (`mechrl.train.rollout.generate`) vs Hugging Face `model.generate`.

All contenders sample the same left-padded batch (random prompts of varied length, each repeated G
times as in a GRPO step) from the same random Llama (`--shape`: tiny, SimpleStories-1.25M's shape, or
qwen05b, Qwen2.5-0.5B's body with a 4096 vocabulary), at temperature 1 with no top-k/top-p, for
exactly `--new-tokens` steps: `model.generate` gets `min_new_tokens` so EOS cannot end it early;
mechrl's rows may sample EOS (probability ~1/4096 per token) but the batch still runs every step
while any row is live, so every contender decodes B x new-tokens positions. Tokens/s counts those.
Each contender's first call is timed alone (it holds any compilation or graph capture: `first_call_s`,
and `one_time_s` = first call - median); after warm-up calls, the contenders are timed in interleaved
rounds; the median is reported. A reference contender that fails on its first call (e.g. no compiler
for transformers' compiled generate) is reported in `failed_contenders` and left out.

Contenders (`--contenders`; default: mechrl,generate on CPU; all four on CUDA):
- mechrl: `generate(decode="auto")`: one CUDA graph replay per decode step on CUDA, the host loop on CPU
- mechrl_eager: `generate(decode="eager")`: the host loop (what mechrl ran on CUDA before)
- generate: `model.generate` with its dynamic cache
- generate_static: `model.generate(cache_implementation="static")` (transformers compiles the decode
  step on CUDA)

`--dtype bf16` runs every contender under `torch.autocast("cuda", torch.bfloat16)` (float32 weights, as
mechrl's `train.dtype: bf16`); CUDA only.

    python bench/rollout_vs_generate.py                      # CPU, 16 prompts x 8 generations x 32 tokens
    python bench/rollout_vs_generate.py --device cuda --prompts 32 --generations 16 --new-tokens 64 \\
        --name rollout_vs_generate_cuda_tiny_fp32

Writes bench/results/<name>.json (see bench/README.md for the fields).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS, SHAPE_NAMES, SHAPES, bench_model, bench_tokenizer, describe_device, prompt_batch, time_interleaved,
    write_result,
)

from mechrl.train.decode_graph import decode_totals  # noqa: E402
from mechrl.train.fast_update import autocast  # noqa: E402
from mechrl.train.rollout import generate  # noqa: E402

CONTENDERS = ("mechrl", "mechrl_eager", "generate", "generate_static")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, CUDA only")
    ap.add_argument("--contenders", default=None, help=f"comma-separated subset of {','.join(CONTENDERS)}")
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts")
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt (rows repeating it)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="calls of each before timing, after its first call (all timed apart)")
    ap.add_argument("--min-prompt-len", type=int, default=8)
    ap.add_argument("--max-prompt-len", type=int, default=24)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the result JSON")
    ap.add_argument("--name", default="rollout_vs_generate", help="result file name (without .json)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    names = (args.contenders.split(",") if args.contenders else
             list(CONTENDERS) if cuda else ["mechrl", "generate"])
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown or "mechrl" not in names:
        ap.error(f"--contenders: unknown {unknown}; choose from {CONTENDERS}, mechrl included")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    amp = lambda: autocast(args.dtype, device)  # noqa: E731  (raises in one line for bf16 on CPU)
    amp()

    model = bench_model(args.shape, device)
    tok = bench_tokenizer()
    ids, mask = prompt_batch(args.prompts, args.generations, min_len=args.min_prompt_len,
                             max_len=args.max_prompt_len, device=device)
    B, T = ids.size(0), args.new_tokens
    gen = torch.Generator(device=device).manual_seed(0)
    lengths, decode_modes = [], set()

    def mechrl(decode):
        def call():
            with amp():
                roll = generate(model, tok, prompt_ids=ids, prompt_mask=mask, max_new_tokens=T, temperature=1.0,
                                generator=gen, decode=decode)
            assert roll.completion_ids.size(1) == T, "every row ended early: the token count would be wrong"
            lengths.append(float(roll.lengths.float().mean()))
            decode_modes.add((decode, roll.decode.mode, roll.decode.fallback))
        return call

    def hf(**extra):
        def call():
            with torch.no_grad(), amp():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                     top_p=1.0, max_new_tokens=T, min_new_tokens=T, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id, **extra)
            assert out.size(1) == ids.size(1) + T
        return call

    fns = {"mechrl": mechrl("auto"), "mechrl_eager": mechrl("eager"), "generate": hf(),
           "generate_static": hf(cache_implementation="static")}
    torch.manual_seed(0)  # model.generate samples from the global RNG
    # each contender's first call alone: it holds the one-time costs (graph capture, compilation). A
    # reference contender that fails there is reported (JSON and stderr) and left out; mechrl may not fail.
    first, failed = {}, {}
    for n in names:
        t0 = time.perf_counter()
        try:
            fns[n]()
        except Exception as e:
            if n.startswith("mechrl"):
                raise
            failed[n] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            print(f"contender {n} failed on its first call, left out: {failed[n]}", file=sys.stderr)
            continue
        if cuda:
            torch.cuda.synchronize(device)
        first[n] = time.perf_counter() - t0
    timings = time_interleaved({n: fns[n] for n in first}, warmup=args.warmup, repeats=args.repeats, device=device)
    n_tokens = B * T
    per = {}
    for n, t in timings.items():
        per[n] = {"tokens_per_s": round(n_tokens / t["median_s"], 1),
                  "ms_per_decode_step": round(t["median_s"] / T * 1e3, 4), "median_s": round(t["median_s"], 5),
                  "first_call_s": round(first[n], 5), "one_time_s": round(max(first[n] - t["median_s"], 0.0), 5)}
    speedups = {f"mechrl_vs_{n}": round(per[n]["median_s"] / per["mechrl"]["median_s"], 3)
                for n in per if n != "mechrl"}
    result = {
        "mechrl_tokens_per_s": per["mechrl"]["tokens_per_s"],
        "contenders": per,
        "failed_contenders": failed,
        "speedups": speedups,
        "mechrl_decode": {"modes": sorted([list(m) for m in decode_modes], key=str), **decode_totals(model)},
        "config": {
            "model": {"shape": args.shape, "description": SHAPE_NAMES[args.shape], "arch": "llama",
                      **SHAPES[args.shape], "n_params": sum(p.numel() for p in model.parameters())},
            "prompts": args.prompts, "generations": args.generations, "batch": B, "new_tokens": T,
            "prompt_len": [args.min_prompt_len, args.max_prompt_len], "padded_prompt_len": ids.size(1),
            "temperature": 1.0, "top_k": None, "top_p": None, "repeats": args.repeats, "warmup": args.warmup,
            "dtype": args.dtype, "torch_threads": torch.get_num_threads(), "device": str(device),
            "attn_implementation": model.config._attn_implementation, "contenders": names,
        },
        "tokens_per_call": n_tokens,
        "mechrl_mean_completion_len": round(sum(lengths) / len(lengths), 2),
        "timings": {name: {k: (round(v, 5) if isinstance(v, float) else [round(x, 5) for x in v])
                           for k, v in t.items()} for name, t in timings.items()},
    }
    if "generate" in per:  # the fields earlier results carry
        result["generate_tokens_per_s"] = per["generate"]["tokens_per_s"]
        result["speedup"] = round(per["generate"]["median_s"] / per["mechrl"]["median_s"], 2)
    path = write_result(args.name, result, device=device, out_dir=args.out)
    print(f"{describe_device(device)}: {args.shape} {args.dtype}, B={B} ({args.prompts} prompts x {args.generations}), "
          f"{T} new tokens")
    for n, r in per.items():
        print(f"  {n:16s} {r['tokens_per_s']:10.0f} tokens/s  {r['ms_per_decode_step']:8.3f} ms/step  "
              f"(first call {r['first_call_s']:.2f} s)")
    print(f"  speedups {speedups}   -> {path}")
    return result


if __name__ == "__main__":
    main()
