"""Tokens/s of mechrl's sampler (`mechrl.train.rollout.generate`) vs Hugging Face `model.generate`.

Both sample the same left-padded batch (random prompts of varied length, each repeated G times as in
a GRPO step) from the same tiny Llama (shaped like SimpleStories-1.25M), at temperature 1 with no
top-k/top-p, for exactly `--new-tokens` steps: `model.generate` gets `min_new_tokens` so EOS cannot
end it early; mechrl's rows may sample EOS (probability ~1/4096 per token) but the batch still runs
every step while any row is live, so both decode B x new-tokens positions. Tokens/s counts those.
After warm-up calls, the two are timed in interleaved rounds; the median is reported.

    python bench/rollout_vs_generate.py                      # CPU, 16 prompts x 8 generations x 32 tokens
    python bench/rollout_vs_generate.py --device cuda --repeats 10

Writes bench/results/rollout_vs_generate.json (see bench/README.md for the fields).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS, TINY_LLAMA, bench_tokenizer, describe_device, prompt_batch, time_interleaved, tiny_llama, write_result,
)

from mechrl.train.rollout import generate  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts")
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt (rows repeating it)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls of each before timing")
    ap.add_argument("--min-prompt-len", type=int, default=8)
    ap.add_argument("--max-prompt-len", type=int, default=24)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the result JSON")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model = tiny_llama(device)
    tok = bench_tokenizer()
    ids, mask = prompt_batch(args.prompts, args.generations, min_len=args.min_prompt_len,
                             max_len=args.max_prompt_len, device=device)
    B, T = ids.size(0), args.new_tokens
    gen = torch.Generator(device=device).manual_seed(0)
    lengths = []

    def mechrl_call():
        roll = generate(model, tok, prompt_ids=ids, prompt_mask=mask, max_new_tokens=T, temperature=1.0,
                        generator=gen)
        assert roll.completion_ids.size(1) == T, "every row ended early: the token count would be wrong"
        lengths.append(float(roll.lengths.float().mean()))

    def hf_call():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=T, min_new_tokens=T, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        assert out.size(1) == ids.size(1) + T

    torch.manual_seed(0)  # model.generate samples from the global RNG
    timings = time_interleaved({"mechrl": mechrl_call, "generate": hf_call}, warmup=args.warmup,
                               repeats=args.repeats, device=device)
    n_tokens = B * T
    mechrl_tps = n_tokens / timings["mechrl"]["median_s"]
    hf_tps = n_tokens / timings["generate"]["median_s"]
    result = {
        "mechrl_tokens_per_s": round(mechrl_tps, 1),
        "generate_tokens_per_s": round(hf_tps, 1),
        "speedup": round(mechrl_tps / hf_tps, 2),
        "config": {
            "model": {"arch": "llama", **TINY_LLAMA, "n_params": sum(p.numel() for p in model.parameters())},
            "prompts": args.prompts, "generations": args.generations, "batch": B, "new_tokens": T,
            "prompt_len": [args.min_prompt_len, args.max_prompt_len], "padded_prompt_len": ids.size(1),
            "temperature": 1.0, "top_k": None, "top_p": None, "repeats": args.repeats, "warmup": args.warmup,
            "torch_threads": torch.get_num_threads(), "device": str(device),
            "attn_implementation": model.config._attn_implementation,
        },
        "tokens_per_call": n_tokens,
        "mechrl_mean_completion_len": round(sum(lengths) / len(lengths), 2),
        "timings": {name: {k: (round(v, 5) if isinstance(v, float) else [round(x, 5) for x in v])
                           for k, v in t.items()} for name, t in timings.items()},
    }
    path = write_result("rollout_vs_generate", result, device=device, out_dir=args.out)
    print(f"{describe_device(device)}: B={B} ({args.prompts} prompts x {args.generations}), {T} new tokens")
    print(f"  mechrl   {mechrl_tps:9.0f} tokens/s  (median {timings['mechrl']['median_s'] * 1e3:.1f} ms)")
    print(f"  generate {hf_tps:9.0f} tokens/s  (median {timings['generate']['median_s'] * 1e3:.1f} ms)")
    print(f"  speedup  {mechrl_tps / hf_tps:.2f}x   -> {path}")
    return result


if __name__ == "__main__":
    main()
