"""Analysis throughput: mechrl's activation extraction vs TransformerLens, mechrl's SAE training vs SAELens's runner.

Two pairs, on the same random tiny model (`--arch llama`: `common.tiny_llama`; `--arch gpt2`: a GPT-2 of the
same shape) and the same random token dataset (`--seqs` sequences x `--seq-len` tokens, no padding, ids that
avoid the special tokens, so every contender sees exactly the same tokens):

1. Extraction (tokens/s). The residual stream after every block (`resid_post.{L}` in mechrl, TransformerLens's
   `blocks.{L}.hook_resid_post`), every token, batches of `--batch` sequences, collected on the CPU as one
   (tokens, d_model) float32 tensor per site. Contenders:
     mechrl_extract        `extract_activations(model, tok, texts, sites, positions=None)` (texts in: includes
                           tokenizing, and keeps `_example` / `_position` index tensors)
     mechrl_run_with_cache `mechrl.analysis.cache.run_with_cache` per batch of token ids
     tl_filtered           `bridge.run_with_cache(ids, names_filter=[...])` per batch (`to_transformer_lens`)
     tl_all                the same without `names_filter` (TransformerLens caches every hook; context only)
   `ratio` = mechrl_extract / tl_filtered. Before timing, mechrl's and TransformerLens's activations are
   compared and the script raises unless they are allclose.
   Memory: the bytes each contender returns (sum of tensor nbytes), mechrl's for 1 site vs every site and for
   the last position only, and the peak RSS growth of one call measured in a fresh subprocess per contender
   (the kernel's high-water mark `VmHWM`, reset just before the call through /proc/self/clear_refs).

2. SAE training (training tokens/s). A TopK SAE on `blocks.{L}.hook_resid_post` of the middle layer, same
   d_sae, k, lr (cosine to lr/10), batch size in tokens, training tokens and context size, from the token
   dataset to a trained SAE. Contenders:
     mechrl   `extract_activations` of the dataset (one pass) + `mechrl.analysis.sae.train_sae` (SAELens's
              `SAETrainer` fed from memory)
     saelens  SAELens's `LanguageModelSAETrainingRunner(cfg, override_model=bridge, override_dataset=<tokens>)`
              `.run()`: its ActivationsStore runs the model (stopping after the hooked block) to fill and
              refill a shuffling buffer while training; wandb, evals, checkpoints and output files off
   Both timings include building the trainer and every model forward pass. The model tokens each one
   forwarded are counted (a hook on the embedding) and reported next to the training tokens.
   `ratio` = mechrl / saelens. Each SAE's FVU on held-out activations is reported as a sanity check.

    .venv/bin/python bench/analysis.py                    # CPU, ~1-2 min on 2 cores
    .venv/bin/python bench/analysis.py --arch gpt2 --threads 2 --repeats 7

Writes bench/results/analysis.json (see bench/README.md for the fields).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network; fail rather than fetch
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    EOS_ID, PAD_ID, RESULTS, TINY_LLAMA, bench_tokenizer, describe_device, time_interleaved, tiny_llama,
    write_result,
)

from mechrl.analysis.cache import extract_activations, run_with_cache  # noqa: E402

ARCHS = ("llama", "gpt2")
RSS_CONTENDERS = ("mechrl_extract", "tl_filtered", "mechrl_extract_1site")
ATOL = 1e-5  # float32, same modules: measured 0 (Llama)
MMAP_THRESHOLD = 1 << 17  # bytes: glibc's default starting value, here held fixed in the RSS probes


# ------------------------------------------------------------------------------------------- setup

def tiny_gpt2(device: str | torch.device = "cpu", seed: int = 0, n_positions: int = 1024):
    """A random GPT-2 with tiny_llama's width, depth, heads and vocabulary, in eval mode."""
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(n_layer=TINY_LLAMA["num_hidden_layers"], n_embd=TINY_LLAMA["hidden_size"],
                        n_head=TINY_LLAMA["num_attention_heads"], n_inner=TINY_LLAMA["intermediate_size"],
                        vocab_size=TINY_LLAMA["vocab_size"], n_positions=n_positions, bos_token_id=EOS_ID,
                        eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(device).eval()


def build_model(arch: str, device: torch.device, seq_len: int):
    if arch == "llama":
        return tiny_llama(device)
    if arch == "gpt2":
        return tiny_gpt2(device, n_positions=max(1024, seq_len))
    raise ValueError(f"--arch must be one of {ARCHS}, got {arch!r}")


def token_data(n_seqs: int, seq_len: int, vocab_size: int = TINY_LLAMA["vocab_size"], seed: int = 0) -> torch.Tensor:
    """(n_seqs, seq_len) random ids in [3, vocab): no special tokens, so no padding and no EOS anywhere."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (n_seqs, seq_len), generator=g)


def texts_of(ids: torch.Tensor) -> list[str]:
    """The ids as `bench_tokenizer` text (it maps `w{i}` back to id i)."""
    return [" ".join(f"w{t}" for t in row) for row in ids.tolist()]


def embedding(model) -> torch.nn.Embedding:
    """The token embedding (an `nn.Embedding` over the vocabulary; inside a TransformerBridge's wrapper too):
    its input is every token the model forwards."""
    vocab = model.config.vocab_size
    embs = [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings == vocab]
    assert len(embs) == 1, f"{type(model).__name__}: expected one token embedding of {vocab} rows, found {len(embs)}"
    return embs[0]


class TokenCounter:
    """Counts token ids entering `model`'s embedding while active (`with counter:`)."""

    def __init__(self, model):
        self.emb, self.n, self.handle = embedding(model), 0, None

    def __enter__(self):
        self.n = 0
        self.handle = self.emb.register_forward_hook(self._count)
        return self

    def _count(self, module, args, output):
        self.n += args[0].numel()

    def __exit__(self, *exc):
        self.handle.remove()


def nbytes(tensors) -> int:
    """Bytes held by `tensors` (an iterable), counting a shared storage once."""
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


# -------------------------------------------------------------------------------------- extraction

def extraction_contenders(model, tok, bridge, ids: torch.Tensor, layers: list[int], batch: int) -> dict:
    """name -> no-argument call returning {site: (tokens, D) CPU float32 tensor}, for the same work.

    Keys are mechrl site names (`resid_post.{L}`); TransformerLens's results are renamed to them."""
    sites = [f"resid_post.{L}" for L in layers]
    tl_names = {f"blocks.{L}.hook_resid_post": f"resid_post.{L}" for L in layers}
    texts = texts_of(ids)
    device = next(model.parameters()).device
    batches = ids.split(batch)

    def mechrl_extract():
        return extract_activations(model, tok, texts, sites, positions=None, batch_size=batch, progress=False)

    def mechrl_rwc():
        chunks = {s: [] for s in sites}
        for b in batches:
            _, cache = run_with_cache(model, {"input_ids": b}, sites)
            for s in sites:
                chunks[s].append(cache[s].flatten(0, 1).cpu())
        return {s: torch.cat(v) for s, v in chunks.items()}

    def tl(filtered: bool):
        def call():
            chunks = {s: [] for s in sites}
            with torch.no_grad():
                for b in batches:
                    b = b.to(device)
                    if filtered:
                        _, cache = bridge.run_with_cache(b, names_filter=list(tl_names))
                    else:
                        _, cache = bridge.run_with_cache(b)
                    for name, s in tl_names.items():
                        chunks[s].append(cache[name].flatten(0, 1).cpu())
            return {s: torch.cat(v) for s, v in chunks.items()}
        return call

    return {"mechrl_extract": mechrl_extract, "mechrl_run_with_cache": mechrl_rwc, "tl_filtered": tl(True),
            "tl_all": tl(False)}


def check_equal(results: dict[str, dict[str, torch.Tensor]], reference: str = "tl_filtered") -> float:
    """Raise unless every contender's activations equal the reference's (allclose); returns the max |diff|."""
    ref = results[reference]
    worst = 0.0
    for name, acts in results.items():
        for site, want in ref.items():
            got = acts.get(site)
            if got is None or got.shape != want.shape:
                raise AssertionError(f"{name}: site {site} has shape {None if got is None else tuple(got.shape)}, "
                                     f"{reference} has {tuple(want.shape)}")
            diff = float((got - want).abs().max())
            if not torch.allclose(got, want, atol=ATOL, rtol=ATOL):
                raise AssertionError(f"{name} and {reference} disagree at {site}: max |diff| {diff:.3g} "
                                     f"(atol {ATOL:g}); the two are not doing the same work")
            worst = max(worst, diff)
    return worst


def full_cache_bytes(bridge, ids: torch.Tensor) -> tuple[int, int]:
    """(bytes, hook count) of TransformerLens's unfiltered cache of one batch."""
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids.to(bridge.cfg.device))
    return nbytes(cache.values()), len(cache)


def rss_growth(contender: str, args) -> dict:
    """CPU memory of one call of `contender` in this process, after all setup and one warm-up call.

    `peak_growth_bytes`: the kernel's high-water mark (reset through `/proc/self/clear_refs` just before the
    call) minus the RSS before it: what the call keeps plus its largest transient (one batch's forward pass,
    logits included). `rss_growth_bytes`: RSS after the call, its result still held, minus RSS before: what
    it keeps. Meaningful in a fresh process with a fixed mmap threshold (see `rss_in_subprocess`)."""
    model, tok, bridge, ids, layers = setup_extraction(args, need_bridge=contender.startswith("tl"))
    fns = extraction_contenders(model, tok, bridge, ids, layers if not contender.endswith("_1site") else layers[:1],
                                args.batch)
    fn = fns[contender.removesuffix("_1site")]
    fn()  # warm: first-call allocations (thread pools, kernels) are not the contender's per-call memory
    import gc

    gc.collect()
    before = _status()
    Path("/proc/self/clear_refs").write_text("5")
    reset = _status()
    if reset["VmHWM"] > reset["VmRSS"] + 1024:  # kB; the reset did not take
        raise RuntimeError(f"resetting the peak RSS through /proc/self/clear_refs failed: {reset}")
    kept = fn()
    after = _status()
    return {"contender": contender, "peak_growth_bytes": (after["VmHWM"] - before["VmRSS"]) * 1024,
            "rss_growth_bytes": (after["VmRSS"] - before["VmRSS"]) * 1024, "returned_bytes": nbytes(kept.values())}


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) for k in ("VmRSS", "VmHWM")}


def rss_in_subprocess(contender: str, argv: list[str]) -> dict:
    """Run `rss_growth` for `contender` in a fresh interpreter (same options) and return its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--rss-probe", contender]
    # a fixed mmap threshold: glibc then maps every large tensor on its own and unmaps it when freed, instead of
    # raising the threshold and keeping freed tensors' pages in the heap (which makes RSS lag behind what is held)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS probe {contender} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"RSS probe {contender} printed no result:\n{proc.stdout[-2000:]}"
    return json.loads(lines[-1])


def models(args, need_bridge: bool = True):
    """(model, tokenizer, bridge): mechrl's model, and a TransformerBridge over the same weights
    (`to_transformer_lens` wraps a copy, so mechrl is timed on the plain HF model)."""
    from mechrl.analysis.tl import to_transformer_lens

    device = torch.device(args.device)
    model = build_model(args.arch, device, args.seq_len)
    tok = bench_tokenizer()
    bridge = to_transformer_lens(model, tok) if need_bridge else None
    return model, tok, bridge


def setup_extraction(args, need_bridge: bool = True):
    model, tok, bridge = models(args, need_bridge)
    ids = token_data(args.seqs, args.seq_len)
    layers = list(range(model.config.num_hidden_layers))
    return model, tok, bridge, ids, layers


def bench_extraction(args, argv: list[str]) -> dict:
    model, tok, bridge, ids, layers = setup_extraction(args)
    fns = extraction_contenders(model, tok, bridge, ids, layers, args.batch)
    first = {name: fn() for name, fn in fns.items()}
    max_diff = check_equal(first)
    timings = time_interleaved(fns, warmup=args.warmup, repeats=args.repeats, device=args.device)
    n_tokens = ids.numel()
    tps = {name: n_tokens / t["median_s"] for name, t in timings.items()}

    one_site = extract_activations(model, tok, texts_of(ids), ["resid_post.0"], positions=None,
                                   batch_size=args.batch, progress=False)
    last_pos = extract_activations(model, tok, texts_of(ids), [f"resid_post.{L}" for L in layers], positions=[-1],
                                   batch_size=args.batch, progress=False)
    full_bytes, full_hooks = full_cache_bytes(bridge, ids[:args.batch])
    memory = {
        "returned_bytes": {name: nbytes(acts.values()) for name, acts in first.items()},
        "mechrl_extract_1_site_bytes": nbytes(one_site.values()),
        "mechrl_extract_all_sites_bytes": nbytes(first["mechrl_extract"].values()),
        "mechrl_extract_last_position_all_sites_bytes": nbytes(last_pos.values()),
        "tl_unfiltered_cache_bytes_per_batch": full_bytes, "tl_unfiltered_cache_hooks": full_hooks,
        "tl_filtered_cache_bytes_per_batch": nbytes(first["tl_filtered"].values()) // len(ids.split(args.batch)),
    }
    if args.rss:
        memory["peak_rss"] = {c: rss_in_subprocess(c, argv) for c in RSS_CONTENDERS}
    return {
        "tokens": n_tokens, "sites": [f"resid_post.{L}" for L in layers],
        "tl_hooks": [f"blocks.{L}.hook_resid_post" for L in layers], "max_abs_diff_vs_tl": max_diff,
        "tokens_per_s": {name: round(v, 1) for name, v in tps.items()},
        "ratio": round(tps["mechrl_extract"] / tps["tl_filtered"], 3),
        "ratio_run_with_cache": round(tps["mechrl_run_with_cache"] / tps["tl_filtered"], 3),
        "ratio_vs_tl_all": round(tps["mechrl_extract"] / tps["tl_all"], 3),
        "memory": memory, "timings": _round_timings(timings),
    }


# ------------------------------------------------------------------------------------------------ SAE

def bench_sae(args) -> dict:
    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig

    from mechrl.analysis.sae import SAESpec, sae_metrics, train_sae

    device = torch.device(args.device)
    model, tok, bridge = models(args)
    L = model.config.num_hidden_layers // 2 if args.sae_layer is None else args.sae_layer
    site, hook = f"resid_post.{L}", f"blocks.{L}.hook_resid_post"
    if args.sae_tokens % args.seq_len or args.sae_tokens % args.sae_batch:
        raise SystemExit(f"--sae-tokens ({args.sae_tokens}) must be a multiple of --seq-len and --sae-batch")
    steps = args.sae_tokens // args.sae_batch
    ids = token_data(args.sae_tokens // args.seq_len, args.seq_len, seed=1)
    texts = texts_of(ids)
    d_model = model.config.hidden_size
    d_sae = args.expansion * d_model
    lr_end = args.lr / 10
    spec = SAESpec(site=site, architecture="topk", d_sae=d_sae, k=args.k, lr=args.lr, lr_end=lr_end, steps=steps,
                   batch_size=args.sae_batch, seed=0, device=str(device))
    dataset = Dataset.from_dict({"tokens": ids.tolist()})

    def mechrl_call():
        acts = extract_activations(model, tok, texts, [site], positions=None, batch_size=args.batch,
                                   progress=False)[site]
        return train_sae(acts, spec)

    def runner_cfg():
        return LanguageModelSAERunnerConfig(
            sae=TopKTrainingSAEConfig(d_in=d_model, d_sae=d_sae, k=args.k, normalize_activations="none",
                                      device=str(device)),
            model_name=f"tiny-{args.arch}-local", hook_name=hook, dataset_path="in-memory-tokens",
            is_dataset_tokenized=True, streaming=False, context_size=args.seq_len, prepend_bos=False,
            sequence_separator_token=None, training_tokens=args.sae_tokens, train_batch_size_tokens=args.sae_batch,
            store_batch_size_prompts=args.batch, n_batches_in_buffer=args.buffer_batches,
            lr=args.lr, lr_end=lr_end, lr_scheduler_name="cosineannealing", lr_warm_up_steps=0,
            dead_feature_window=spec.dead_feature_window, feature_sampling_window=steps,
            device=str(device), act_store_device=str(device), seed=0, logger=LoggingConfig(log_to_wandb=False),
            n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False, output_path=None, verbose=False,
            n_eval_batches=0,
        )

    def saelens_call():
        runner = LanguageModelSAETrainingRunner(runner_cfg(), override_dataset=dataset, override_model=bridge)
        return runner.run()

    counts, saes = {}, {}
    for name, fn, m in (("mechrl", mechrl_call, model), ("saelens", saelens_call, bridge.original_model)):
        with TokenCounter(m) as c:
            saes[name] = fn()
        counts[name] = c.n
    # where mechrl's time goes (one more call, in two timed halves; for reading the ratio, not for the ratio).
    # These two calls and the counting calls above also warm both contenders up before the timed rounds.
    t0 = time.perf_counter()
    acts = extract_activations(model, tok, texts, [site], positions=None, batch_size=args.batch, progress=False)[site]
    t1 = time.perf_counter()
    train_sae(acts, spec)
    breakdown = {"extract_s": round(t1 - t0, 4), "train_sae_s": round(time.perf_counter() - t1, 4)}
    timings = time_interleaved({"mechrl": mechrl_call, "saelens": saelens_call}, warmup=max(args.warmup - 1, 0),
                               repeats=args.sae_repeats, device=args.device)
    tps = {name: args.sae_tokens / t["median_s"] for name, t in timings.items()}
    held = extract_activations(model, tok, texts_of(token_data(16, args.seq_len, seed=2)), [site], positions=None,
                               batch_size=args.batch, progress=False)[site]
    quality = {}
    for name, sae in saes.items():
        m = sae_metrics(sae.eval(), held)
        quality[name] = {"fvu": round(m["fvu"], 4), "l0": round(m["l0"], 2), "n_dead": m["n_dead"]}
    return {
        "site": site, "tl_hook": hook, "training_tokens": args.sae_tokens, "steps": steps,
        "sae": {"architecture": "topk", "d_in": d_model, "d_sae": d_sae, "k": args.k, "lr": args.lr, "lr_end": lr_end,
                "lr_scheduler": "cosineannealing", "batch_size_tokens": args.sae_batch, "context_size": args.seq_len,
                "normalize_activations": "none"},
        "saelens_runner": {"store_batch_size_prompts": args.batch, "n_batches_in_buffer": args.buffer_batches,
                           "prefetch_llm_batches": False, "model": "TransformerBridge (to_transformer_lens)"},
        "model_tokens_forwarded": counts, "mechrl_breakdown": breakdown,
        "training_tokens_per_s": {name: round(v, 1) for name, v in tps.items()},
        "ratio": round(tps["mechrl"] / tps["saelens"], 3),
        "held_out": {"tokens": int(held.shape[0]), **quality},
        "timings": _round_timings(timings),
    }


# ----------------------------------------------------------------------------------------------- main

def _round_timings(timings: dict) -> dict:
    return {name: {k: (round(v, 5) if isinstance(v, float) else [round(x, 5) for x in v]) for k, v in t.items()}
            for name, t in timings.items()}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    ap.add_argument("--arch", choices=ARCHS, default="llama", help="tiny model: llama (default) or gpt2")
    ap.add_argument("--seqs", type=int, default=64, help="extraction: sequences in the dataset")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (also the SAE context size)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per forward pass (both pairs)")
    ap.add_argument("--repeats", type=int, default=5, help="extraction: timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls of each before timing")
    ap.add_argument("--no-rss", dest="rss", action="store_false", help="skip the peak-RSS subprocesses")
    ap.add_argument("--sae-tokens", type=int, default=32768, help="SAE: training tokens (= dataset tokens)")
    ap.add_argument("--sae-batch", type=int, default=256, help="SAE: batch size in tokens")
    ap.add_argument("--sae-layer", type=int, default=None, help="SAE: layer L of blocks.L.hook_resid_post "
                    "(default: the middle one)")
    ap.add_argument("--expansion", type=int, default=4, help="SAE: d_sae = expansion x d_model")
    ap.add_argument("--k", type=int, default=8, help="SAE: TopK's active latents")
    ap.add_argument("--lr", type=float, default=1e-3, help="SAE: learning rate (cosine to lr/10)")
    ap.add_argument("--buffer-batches", type=int, default=8,
                    help="SAELens runner: n_batches_in_buffer (its shuffling buffer, in store batches)")
    ap.add_argument("--sae-repeats", type=int, default=3, help="SAE: timed rounds (median reported)")
    ap.add_argument("--skip", choices=("extraction", "sae"), default=None, help="leave one pair out")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the result JSON")
    ap.add_argument("--name", default="analysis", help="result file name (without .json)")
    ap.add_argument("--rss-probe", default=None, choices=RSS_CONTENDERS, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.rss_probe is not None:  # child process of rss_in_subprocess
        result = rss_growth(args.rss_probe, args)
        print(json.dumps(result))
        return result
    if args.seqs % args.batch:
        raise SystemExit(f"--seqs ({args.seqs}) must be a multiple of --batch ({args.batch}): equal batches")
    from importlib.metadata import version

    device = torch.device(args.device)
    result: dict = {
        "config": {
            "arch": args.arch, "model": {**TINY_LLAMA, "max_positions": None if args.arch == "llama" else
                                         max(1024, args.seq_len)},
            "seqs": args.seqs, "seq_len": args.seq_len, "batch": args.batch, "padding": False,
            "repeats": args.repeats, "sae_repeats": args.sae_repeats, "warmup": args.warmup,
            "torch_threads": torch.get_num_threads(), "device": str(device),
        },
        "library_versions": {"transformer_lens": version("transformer-lens"), "sae_lens": version("sae-lens"),
                             "datasets": version("datasets")},
    }
    if args.skip != "extraction":  # the RSS children rebuild the same model and data from the same options
        result["extraction"] = bench_extraction(args, argv)
    if args.skip != "sae":
        result["sae_training"] = bench_sae(args)
    path = write_result(args.name, result, device=device, out_dir=args.out)
    print(f"{describe_device(device)}: {args.arch}, {args.seqs} x {args.seq_len} tokens, batch {args.batch}")
    if "extraction" in result:
        ex = result["extraction"]
        for name, v in ex["tokens_per_s"].items():
            print(f"  extraction {name:22s} {v:10.0f} tokens/s")
        print(f"  extraction ratio mechrl / TL (filtered) {ex['ratio']:.2f}x")
        mem = ex["memory"]
        print(f"  kept: mechrl 1 site {mem['mechrl_extract_1_site_bytes']:,} B, all sites "
              f"{mem['mechrl_extract_all_sites_bytes']:,} B, TL filtered {mem['returned_bytes']['tl_filtered']:,} B")
        for c, r in mem.get("peak_rss", {}).items():
            print(f"  RSS growth {c:22s} kept {r['rss_growth_bytes'] / 2**20:6.1f} MiB, "
                  f"peak {r['peak_growth_bytes'] / 2**20:6.1f} MiB")
    if "sae_training" in result:
        sae = result["sae_training"]
        for name, v in sae["training_tokens_per_s"].items():
            print(f"  SAE training {name:8s} {v:10.0f} training tokens/s "
                  f"({sae['model_tokens_forwarded'][name]} model tokens forwarded)")
        print(f"  SAE ratio mechrl / SAELens runner {sae['ratio']:.2f}x")
    print(f"  -> {path}")
    return result


if __name__ == "__main__":
    main()
