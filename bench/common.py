"""Shared pieces of mechrl's benchmarks: the model and batch they time, timing, and the result file.

- `tiny_llama()`: a random Llama shaped like SimpleStories-1.25M (4 layers, hidden 128, 4 heads,
  intermediate 512, vocab 4096, tied embeddings; 1.57M parameters). `bench_model(shape)`: the model
  of a `--shape` (`SHAPES`): "tiny" is that one, "qwen05b" a Llama with Qwen2.5-0.5B's body (24
  layers, hidden 896, 14 query / 2 key-value heads, intermediate 4864, tied embeddings) and the
  same 4096-entry vocabulary: 361.5M parameters.
- `bench_tokenizer()`: a word-level tokenizer over the same 4096 ids (`[UNK]` 0, `[EOS]` 1,
  `[PAD]` 2, then `w3`..`w4095`), built locally, for code that needs a tokenizer (mechrl's sampler
  decodes texts; TRL takes text prompts).
- `prompt_batch()`: random prompts of varied lengths, left-padded, each repeated G times in a row
  (the layout of a GRPO batch). No tokenizer involved.
- `time_interleaved()`: warm-up calls (timed apart: the first holds any compilation or graph
  capture), then several interleaved timed rounds; median (CUDA synchronised).
- `describe_device()`, `versions()`, `write_result()`: what every result JSON records.

Run benchmarks from the repository root (`python bench/<name>.py`); see bench/README.md.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# SimpleStories-1.25M's shape (its tokenizer also has EOS at id 1)
TINY_LLAMA = dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=512, vocab_size=4096, tie_word_embeddings=True)
# Qwen2.5-0.5B's body (its rope base and norm epsilon too) as a Llama, on the benchmark vocabulary
QWEN05B_LLAMA = dict(num_hidden_layers=24, hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                     intermediate_size=4864, vocab_size=4096, tie_word_embeddings=True, rope_theta=1e6,
                     rms_norm_eps=1e-6)
SHAPES = {"tiny": TINY_LLAMA, "qwen05b": QWEN05B_LLAMA}
SHAPE_NAMES = {"tiny": "tiny Llama (SimpleStories-1.25M shape)",
               "qwen05b": "Llama with Qwen2.5-0.5B's body (24 layers, d 896, GQA 14/2), vocab 4096"}
UNK_ID, EOS_ID, PAD_ID = 0, 1, 2


def tiny_llama(device: str | torch.device = "cpu", seed: int = 0, **overrides):
    """The benchmark model: a random-weight Llama shaped like SimpleStories-1.25M, in eval mode."""
    return bench_model("tiny", device, seed, **overrides)


def bench_model(shape: str, device: str | torch.device = "cpu", seed: int = 0, **overrides):
    """The random-weight Llama of `shape` (`SHAPES`: "tiny" or "qwen05b"), in eval mode, float32."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {sorted(SHAPES)}")
    config = LlamaConfig(**{**SHAPES[shape], **overrides}, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
                         pad_token_id=PAD_ID)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    return model.to(device).eval()


def bench_tokenizer(vocab_size: int = TINY_LLAMA["vocab_size"]):
    """A tokenizer whose ids are exactly 0..vocab_size-1: `[UNK]`, `[EOS]`, `[PAD]`, `w3`, `w4`, ...
    Text is whitespace-separated words; decoding joins tokens with spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": UNK_ID, "[EOS]": EOS_ID, "[PAD]": PAD_ID}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", pad_token="[PAD]",
                                   padding_side="left", clean_up_tokenization_spaces=False)
    assert len(fast) == vocab_size and fast.eos_token_id == EOS_ID and fast.pad_token_id == PAD_ID
    return fast


def prompt_batch(n_prompts: int, generations: int, *, min_len: int = 8, max_len: int = 24,
                 vocab_size: int = TINY_LLAMA["vocab_size"], seed: int = 0,
                 device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of lengths in [min_len, max_len], left-padded with PAD, each repeated
    `generations` times in a row. Returns (ids, mask), both (n_prompts * generations, max length).
    Prompt tokens avoid the special ids, so no prompt contains EOS."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n_prompts,), generator=g)
    lengths[0] = max_len  # the padded width is max_len exactly, whatever the seed
    P = max_len
    ids = torch.full((n_prompts, P), PAD_ID, dtype=torch.long)
    mask = torch.zeros(n_prompts, P, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        ids[i, P - n:] = torch.randint(3, vocab_size, (n,), generator=g)
        mask[i, P - n:] = 1
    ids = ids.repeat_interleave(generations, 0)
    mask = mask.repeat_interleave(generations, 0)
    return ids.to(device), mask.to(device)


def prompt_texts(ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """The prompts of `prompt_batch` as text for `bench_tokenizer` (for APIs that take strings)."""
    return [" ".join(f"w{t}" for t, m in zip(row, mrow) if m) for row, mrow in zip(ids.tolist(), mask.tolist())]


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 2, repeats: int = 5,
                     device: str | torch.device = "cpu") -> dict[str, dict]:
    """Time each of `fns` (name -> no-argument call): `warmup` calls each (timed apart: the first holds
    any one-time cost, compilation or graph capture), then `repeats` rounds in which each is called
    once, timed. Interleaving the rounds spreads any drift in machine load over all of them alike.
    Returns name -> {"median_s", "min_s", "times_s", "warmup_s"}; on CUDA the device is synchronised
    around each timed call."""
    cuda = torch.device(device).type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    warm: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        for _ in range(warmup):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            warm[name].append(time.perf_counter() - t0)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "times_s": ts, "warmup_s": warm[name]}
            for name, ts in times.items()}


def describe_device(device: str | torch.device) -> str:
    """GPU name for CUDA devices, else the CPU model name and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} torch threads)"


def versions() -> dict[str, str]:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out


def write_result(name: str, result: dict, *, device: str | torch.device, out_dir: Path = RESULTS) -> Path:
    """Write `result` plus device, versions and date to `out_dir/<name>.json`; returns the path."""
    payload = {"benchmark": name, **result, "device": describe_device(device), "versions": versions(),
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
