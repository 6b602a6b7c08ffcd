"""Crosscoder training speed: mechrl's BatchTopK crosscoder vs a single-model SAE of the same width on the existing
SAE code (`mechrl.analysis.sae.train_sae`, SAELens's `SAETrainer`, TopK), on the rlhf-diffing study's activations.

Activations: with `--study DIR` (an output folder of `mechrl study rlhf-diffing`), the study's corpus texts through
the base story model and the policy's final checkpoint at the study's crosscoder site: (N, 2, D) for the crosscoder,
the base half (N, D) for the SAE. Without it, the same corpus recipe is not available, so the benchmark says so in
its result (`activations`: "synthetic") and uses grammar stories through the pretrained story model and a copy
with weights perturbed by 1% noise.

Contenders (same width `--dict-size`, k, lr, batch in tokens, steps; each builds and trains from scratch per call):
    crosscoder   `mechrl.analysis.crosscoder.train_crosscoder` on (N, 2, D): twice the matrix work per token
    sae          `mechrl.analysis.sae.train_sae(architecture="topk")` on (N, D)
`ratio` = crosscoder tokens/s / sae tokens/s; the bar is >= 0.5 (matched efficiency: a crosscoder reads and
writes two models' activations per token).

    .venv/bin/python bench/crosscoder.py --study runs/study-rlhf-diffing-tiny
Writes bench/results/crosscoder.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import time_interleaved, write_result  # noqa: E402


def study_activations(study: Path) -> tuple[torch.Tensor, dict]:
    from mechrl.analysis.crosscoder import paired_activations
    from mechrl.models.loading import load_pretrained

    summary = json.loads((study / "summary.json").read_text())
    corpus = json.loads((study / "analysis" / "corpus.json").read_text())
    site = summary["site"]
    from mechrl.config import ModelConfig
    from mechrl.models.loading import load_model

    base, tok = load_model(ModelConfig(builtin="stories", device="cpu"))
    policy, _ = load_pretrained(summary["runs"]["policy"]["final"], device="cpu")
    acts = paired_activations([base.eval(), policy.eval()], tok, corpus["texts"], site)
    return acts["x"], {"activations": "study", "study": str(study), "site": site, "n_texts": len(corpus["texts"])}


def synthetic_activations(n_texts: int) -> tuple[torch.Tensor, dict]:
    import copy

    from mechrl.analysis.crosscoder import paired_activations
    from mechrl.config import ModelConfig, StoriesTaskConfig
    from mechrl.models.loading import load_model
    from mechrl.tasks import build_task

    base, tok = load_model(ModelConfig(builtin="stories", device="cpu"))
    other = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * p.std() * torch.randn(p.shape, generator=g))
    task = build_task(StoriesTaskConfig(n_train=n_texts, n_val=10, n_test=10))
    texts = list(task.datasets["train"]["story"])
    site = "resid_post.2"
    acts = paired_activations([base.eval(), other.eval()], tok, texts, site)
    return acts["x"], {"activations": "synthetic", "site": site, "n_texts": len(texts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", type=Path, help="an rlhf-diffing study output folder (its activations are used)")
    ap.add_argument("--n-texts", type=int, default=1000, help="stories for the synthetic pair (without --study)")
    ap.add_argument("--dict-size", type=int, default=1024)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1024, help="tokens per step")
    ap.add_argument("--steps", type=int, default=100, help="training steps per timed call")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from mechrl.analysis.crosscoder import CrosscoderSpec, train_crosscoder
    from mechrl.analysis.sae import SAESpec, train_sae

    x, source = study_activations(args.study) if args.study else synthetic_activations(args.n_texts)
    x = x.float().contiguous()
    base = x[:, 0].contiguous()
    cc_spec = CrosscoderSpec(site=source["site"], dict_size=args.dict_size, k=args.k, steps=args.steps,
                             batch_size=args.batch, lr=args.lr, warmup_steps=0)
    sae_spec = SAESpec(site=source["site"], architecture="topk", d_sae=args.dict_size, k=args.k, steps=args.steps,
                       batch_size=args.batch, lr=args.lr)
    timings = time_interleaved({"crosscoder": lambda: train_crosscoder(x, cc_spec),
                                "sae": lambda: train_sae(base, sae_spec)},
                               warmup=args.warmup, repeats=args.repeats)
    tokens = args.steps * args.batch
    tps = {k: tokens / v["median_s"] for k, v in timings.items()}
    result = {"crosscoder_tokens_per_s": tps["crosscoder"], "sae_tokens_per_s": tps["sae"],
              "ratio": tps["crosscoder"] / tps["sae"], "bar": 0.5, "meets_bar": tps["crosscoder"] / tps["sae"] >= 0.5,
              "config": {**vars(args), "study": str(args.study) if args.study else None, "out": None},
              "data": {**source, "n_tokens": int(len(x)), "d_in": int(x.shape[-1])},
              "tokens_per_call": tokens, "timings": timings}
    path = write_result("crosscoder", result, device="cpu", **({"out_dir": args.out} if args.out else {}))
    print(json.dumps({k: result[k] for k in ("crosscoder_tokens_per_s", "sae_tokens_per_s", "ratio", "meets_bar")}))
    print(path)


if __name__ == "__main__":
    main()
