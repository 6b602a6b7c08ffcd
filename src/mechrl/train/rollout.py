"""Batched sampling with a KV cache: the fast path of evaluation and of the RL loops.

`generate(model, tok, prompts, ...)` left-pads the prompts (or takes them already tokenized as
`prompt_ids`/`prompt_mask`, e.g. from `encode_prompts`), runs each distinct prompt once, then decodes
one token per step from the cache until every row has emitted EOS (or a stop string) or
`max_new_tokens` is reached. It returns token ids, per-token
log-probs under the sampling distribution, and masks. Greedy decoding (`temperature=0`) gives the
same tokens as `model.generate(do_sample=False)` (a test holds it to that).

Why it is fast at small sizes, where a decode step is mostly fixed costs (measured on the benchmark
batch, a 1.6M-parameter Llama, 16 prompts x 8 completions x 32 tokens, CPU; bench/README.md):
- Sampling draws one uniform per row and inverts the CDF, an exact sample of the same distribution
  as `torch.multinomial`, whose CPU kernel draws an exponential variate per vocabulary entry (30%
  of the old sampler's time). The CDF is taken in two levels (block sums, then one block), since a
  cumsum along a 4096-entry row is sequential and slow on CPU (-7%).
- Prompts repeated in the batch (a GRPO group: each prompt G times) are prefilled once and their
  cache rows copied, so prefill costs 1/G (-24%); it computes logits for the last position only.
- The KV cache is a `StaticCache` sized prompt + `max_new_tokens`: no concatenation per step (-5%).
- On CPU, decoding uses eager attention: PyTorch's CPU sdpa kernel is slow for one query (-10%).
- The attention mask is allocated once, in the 4-D form the kernel takes, and one column opens per
  step; positions are precomputed. No gain measured on CPU, but on GPU it skips the model's
  per-step mask building, which syncs with the host; `done.all()` is checked every 8 steps there.
Not kept: `torch.inference_mode` (within noise, and its tensors cannot be saved for backward).
On CUDA the decode step runs as one CUDA graph replay (`decode_graph.py`: the same step as a
fixed-shape function over static buffers, captured once per shape); the host loop below stays the
CPU path and the reference the captured step is tested against.

Left out: beam search, repetition penalties, batching prompts of very different lengths by bucket.

Shapes: B prompts, P prompt length (left-padded), T generated length, V vocabulary, L = P + T.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase, StaticCache
from transformers.cache_utils import StaticLayer

from mechrl.errors import TrainingDiverged

if TYPE_CHECKING:
    from mechrl.train.decode_graph import DecodeStats


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    completion_ids: torch.Tensor  # (B, T) pad after the end of each completion
    completion_mask: torch.Tensor  # (B, T) 1 on generated tokens up to and including EOS
    logprobs: torch.Tensor  # (B, T) log-prob of each sampled token under the sampling distribution
    texts: list[str]  # decoded completions, up to EOS / stop string, special tokens removed
    decode: DecodeStats | None = None  # how the decode steps ran (mode, steps, host checks, capture time)

    @property
    def lengths(self) -> torch.Tensor:  # (B,)
        return self.completion_mask.sum(1)


def encode_prompts(tok: PreTrainedTokenizerBase, prompts: list[str],
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, P), left-padded, no special tokens added: what `generate` takes as
    `prompt_ids`/`prompt_mask`. Tokenize once and repeat rows to sample several completions per prompt."""
    if not prompts:
        raise ValueError("encode_prompts: no prompts")
    enc = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt", padding_side="left")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from (B, V) float logits; returns (tokens (B,), their log-probs (B,)).
    `temperature=0` is greedy (log-prob under the unscaled distribution). Otherwise the
    distribution is softmax(logits / temperature), restricted to the top-k entries and then to the
    smallest prefix (by probability) with mass >= top_p, and renormalised."""
    if temperature == 0.0:
        tokens = logits.argmax(-1)  # (B,)
        lp = logits.gather(-1, tokens[:, None]).squeeze(-1) - logits.logsumexp(-1)
        return tokens, lp
    if temperature != 1.0:
        logits = logits / temperature
    V = logits.size(-1)
    idx = None  # (B, K) vocabulary ids of the candidate columns, None when all V are candidates
    if top_k is not None and 0 < top_k < V:
        logits, idx = logits.topk(top_k, dim=-1)  # sorted, descending
    if top_p is not None and top_p < 1.0:
        if idx is None:
            logits, idx = logits.sort(dim=-1, descending=True)
        probs = logits.softmax(-1)
        remove = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix with mass >= top_p
        logits = logits.masked_fill(remove, float("-inf"))
    probs = logits.softmax(-1)  # (B, K)
    col = _inverse_cdf(probs, generator)  # (B, 1)
    lp = probs.gather(-1, col).log().squeeze(-1)  # sampled entries have probability > 0
    tokens = (col if idx is None else idx.gather(-1, col)).squeeze(-1)
    return tokens, lp


def _below(x: torch.Tensor) -> torch.Tensor:
    """The largest float below `x` (elementwise)."""
    return torch.nextafter(x, torch.zeros_like(x))


def _inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None, block: int = 64) -> torch.Tensor:
    """One index per row of `probs` (B, K) (non-negative, not necessarily normalised), drawn with
    probability proportional to its entry, from a single uniform per row. Two levels (which block of
    `block` columns, then which column in it) so that only (B, K / block) and (B, block) cumulative
    sums are taken: a cumsum over the whole vocabulary is sequential along it and slow on CPU. The
    draw is clamped below each level's total, so a zero-probability entry is never returned."""
    B, K = probs.shape
    g_device = generator.device if generator is not None else probs.device
    u = torch.rand(B, 1, device=g_device, dtype=probs.dtype, generator=generator).to(probs.device)  # (B, 1)
    if K <= 2 * block:
        cdf = probs.cumsum(-1)  # (B, K)
        x = torch.minimum(u * cdf[:, -1:], _below(cdf[:, -1:]))
        return torch.searchsorted(cdf, x, right=True).clamp_(max=K - 1)  # the clamp only matters for NaN rows
    nb = -(-K // block)
    padded = probs if nb * block == K else F.pad(probs, (0, nb * block - K))  # zeros at the end
    blocks = padded.view(B, nb, block)  # (B, nb, block)
    outer = blocks.sum(-1).cumsum(-1)  # (B, nb)
    x = torch.minimum(u * outer[:, -1:], _below(outer[:, -1:]))
    b = torch.searchsorted(outer, x, right=True).clamp_(max=nb - 1)  # (B, 1) a block with positive mass
    inner = blocks[torch.arange(B, device=probs.device), b.squeeze(-1)].cumsum(-1)  # (B, block)
    start = torch.where(b > 0, outer.gather(-1, (b - 1).clamp(min=0)), torch.zeros_like(x))
    r = torch.minimum((x - start).clamp(min=0), _below(inner[:, -1:]))
    return (b * block + torch.searchsorted(inner, r, right=True)).clamp_(max=K - 1)


def _accepts(model: torch.nn.Module, name: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _validate_prompt_tensors(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"generate: prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} "
                         "must be the same (B, P) shape")
    if prompt_ids.size(0) == 0:
        raise ValueError("generate: no prompts")
    if prompt_ids.size(1) == 0 or not bool((prompt_mask.sum(1) > 0).all()):
        raise ValueError("generate: an empty prompt (no tokens)")
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("generate: prompts must be left-padded (prompt_mask[:, -1] must be all 1)")


def generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str] | None = None, *,
             max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             stop_strings: tuple[str, ...] = (), generator: torch.Generator | None = None,
             prompt_ids: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None,
             check_every: int | None = None, attn_implementation: str | None = None,
             decode: str = "auto") -> Rollout:
    """Sample completions for `prompts` (strings), or for `prompt_ids`/`prompt_mask` ((B, P),
    left-padded, e.g. from `encode_prompts`; the mask defaults to all ones). `temperature=0` is
    greedy. `generator` (on the model's device) makes sampling reproducible. `check_every`: decode
    steps between checks that every row has ended (a host sync on GPU); default 1 on CPU, 8 on GPU.
    `attn_implementation`: the attention kernel to sample with ("eager", "sdpa", ...; the model's
    setting is restored afterwards). Default: "eager" on CPU when the model is set to "sdpa" (PyTorch's
    CPU sdpa kernel is slow for a single query: 11% of the benchmark's time), else the model's own.
    `decode`: how the decode steps run (`decode_graph.DECODE_MODES`): "auto" (the default) runs the
    host loop (on CUDA too, for now: `decode_graph.AUTO_ON_CUDA`); "eager" the host loop;
    "static" the fixed-shape step without capture; "graph" requires the capture. All give the same
    tokens (`Rollout.decode` says which ran and what it cost).

    The model is used as it is, in train or eval mode: call `model.eval()` first if it has dropout."""
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"generate: top_k must be >= 0 (0 or None: off), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    if (prompts is None) == (prompt_ids is None):
        raise ValueError("generate: pass either prompts (strings) or prompt_ids (+ prompt_mask), not both")
    device = next(model.parameters()).device
    if prompts is not None:
        prompt_ids, prompt_mask = encode_prompts(tok, prompts, device)
    else:
        prompt_mask = torch.ones_like(prompt_ids) if prompt_mask is None else prompt_mask
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    _validate_prompt_tensors(prompt_ids, prompt_mask)
    if check_every is None:
        check_every = 1 if device.type == "cpu" else 8
    if check_every < 1:
        raise ValueError(f"generate: check_every must be >= 1, got {check_every}")
    from mechrl.train.decode_graph import DECODE_MODES, run_decode  # imports this module

    if decode not in DECODE_MODES:
        raise ValueError(f"generate: decode must be one of {DECODE_MODES}, got {decode!r}")
    impl = getattr(model.config, "_attn_implementation", None)
    if (attn_implementation is None and device.type == "cpu" and impl == "sdpa"
            and getattr(model, "_can_set_attn_implementation", lambda: False)()):
        attn_implementation = "eager"
    switch = attn_implementation not in (None, impl)
    try:
        if switch:
            model.set_attn_implementation(attn_implementation)
            if model.config._attn_implementation != attn_implementation:  # e.g. a model that cannot switch
                raise ValueError(f"generate: could not set attn_implementation={attn_implementation!r} on "
                                 f"{type(model).__name__}; pass attn_implementation={impl!r}")
        with torch.no_grad():
            ids, mask, logprobs, stats = run_decode(
                model, tok, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                top_k=top_k, top_p=top_p, stop_strings=stop_strings, generator=generator, check_every=check_every,
                mode=decode)
    finally:
        if switch:
            model.set_attn_implementation(impl)
    if not bool(torch.isfinite(logprobs).all()):
        raise TrainingDiverged("generate: the model produced non-finite logits (NaN or inf); if it is being "
                               "trained, training diverged (a lower train.lr may help)")
    if stop_strings:
        _cut_at_stop(tok, ids, mask, logprobs, stop_strings, tok.pad_token_id)
    width = int(mask.any(0).nonzero().max()) + 1  # drop trailing columns where no row is live
    ids, mask, logprobs = ids[:, :width], mask[:, :width], logprobs[:, :width]
    texts = decode_completions(tok, ids, mask, stop_strings)
    return Rollout(prompt_ids, prompt_mask, ids, mask, logprobs, texts, stats)


class KVCache(StaticCache):
    """A `StaticCache` that stores every layer's keys and values in one dtype, `dtype` (None: as they come).

    Under autocast a layer's keys and values can arrive in different dtypes: Llama's rotary embedding
    multiplies bf16 keys by float32 cos/sin and returns float32 keys, while the values stay bf16. A
    StaticCache allocates both in the first key's dtype and writes in place (`index_copy_`), which
    refuses the other. Here both are cast to the autocast dtype, the precision attention reads them
    in under autocast anyway."""

    def __init__(self, *args, dtype: torch.dtype | None = None, host_position: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.kv_dtype = dtype
        self.host_position = host_position  # False: a step that must not read the device (a captured one)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write (B, H, n, D) keys and values at the layer's next n columns; returns the whole (B, H, L, D)
        buffers. On CPU, with `host_position`, the write position is read on the host (free there) and
        the columns are written as one slice copy, faster than StaticCache's `index_copy_` at decode
        shapes; otherwise StaticCache's own update runs (it keeps the position on the device, as a
        captured step needs)."""
        if self.kv_dtype is not None:
            key_states, value_states = key_states.to(self.kv_dtype), value_states.to(self.kv_dtype)
        layer = self.layers[layer_idx]
        if (not self.host_position or key_states.device.type != "cpu" or type(layer) is not StaticLayer
                or self.offloading):
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        n, start = key_states.shape[-2], int(layer.cumulative_length)
        if start + n > layer.max_cache_len:
            raise IndexError(f"KVCache layer {layer_idx}: writing {n} columns at {start} overflows its "
                             f"{layer.max_cache_len}")
        layer.keys[:, :, start:start + n].copy_(key_states)
        layer.values[:, :, start:start + n].copy_(value_states)
        layer.cumulative_length.add_(n)
        return layer.keys, layer.values


def kv_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype a `KVCache` stores in on `device`: autocast's when it is on there, else None (as computed)."""
    t = device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else None


def prefill(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
            cache_len: int) -> tuple[StaticCache, torch.Tensor, torch.Tensor | None]:
    """Each distinct prompt through the model once, into a fresh `StaticCache` of `cache_len` columns.
    Returns (cache of the U distinct prompts, next-token logits (U, V) float32, inverse): `inverse`
    (B,) maps row i of the batch to its distinct prompt, None when no prompt repeats (U = B, same order)."""
    P = prompt_ids.size(1)
    uniq, inverse = torch.unique(torch.cat([prompt_ids, prompt_mask], 1), dim=0, return_inverse=True)
    repeated = uniq.size(0) < prompt_ids.size(0)
    u_ids, u_mask = (uniq[:, :P], uniq[:, P:]) if repeated else (prompt_ids, prompt_mask)  # (U, P)
    u_pos = (u_mask.cumsum(1) - 1).clamp(min=0)  # positions count real tokens only
    cache = KVCache(config=model.config, max_cache_len=cache_len, dtype=kv_dtype(prompt_ids.device))
    kw = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=u_ids, attention_mask=u_mask, position_ids=u_pos, past_key_values=cache, use_cache=True,
                **kw)
    return cache, out.logits[:, -1, :].float(), (inverse if repeated else None)


def decode_mask(model: PreTrainedModel, cache: StaticCache, prompt_mask: torch.Tensor,
                cache_len: int) -> tuple[torch.Tensor, bool | float | int]:
    """The attention mask over the whole cache (`cache_len` columns, the prompt's `prompt_mask` in the
    first P), in the form the model's attention kernel takes, and the value that opens a column.
    sdpa: 4-D bool; eager: 4-D additive; other kernels (flash, flex), or caches with sliding-window
    layers (the model then builds a mask per layer type): 2-D, which the model turns into its own."""
    B, P = prompt_mask.shape
    device = prompt_mask.device
    impl = getattr(model.config, "_attn_implementation", None)
    if any(type(layer) is not StaticLayer for layer in cache.layers):
        impl = None  # sliding-window or other special layers: the model builds its masks per layer type
    if impl == "sdpa":  # the 4-D mask the kernel takes, so the model skips building one per step
        attn = torch.zeros(B, 1, 1, cache_len, dtype=torch.bool, device=device)
        attn[:, 0, 0, :P] = prompt_mask.bool()
        return attn, True
    if impl == "eager":  # additive
        dtype = next(model.parameters()).dtype
        attn = torch.full((B, 1, 1, cache_len), torch.finfo(dtype).min, dtype=dtype, device=device)
        attn[:, 0, 0, :P].masked_fill_(prompt_mask.bool(), 0.0)
        return attn, 0.0
    attn = torch.zeros(B, cache_len, dtype=prompt_mask.dtype, device=device)
    attn[:, :P] = prompt_mask
    return attn, 1


def _sample_loop(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt_ids: torch.Tensor,
                 prompt_mask: torch.Tensor, *, max_new_tokens: int, temperature: float, top_k: int | None,
                 top_p: float | None, stop_strings: tuple[str, ...], generator: torch.Generator | None,
                 check_every: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The prefill and the decode loop (`decode="eager"`); returns completion (ids, mask, logprobs),
    each (B, steps run), and the number of end checks that read a device value on the host."""
    eos, pad = tok.eos_token_id, tok.pad_token_id
    device = prompt_ids.device
    B, P = prompt_ids.shape
    T = max_new_tokens
    L = P + T

    # --- prefill: each distinct prompt once, then its cache rows copied to the rows that repeat it
    cache, logits, inverse = prefill(model, prompt_ids, prompt_mask, L)  # logits (U, V)
    if inverse is not None:  # uniq[inverse[i]] is row i
        cache.reorder_cache(inverse)
        logits = logits[inverse]  # (B, V)

    # --- decode state, allocated once. The mask covers the whole cache (L columns); column P + t
    # opens when generated token t enters the cache.
    attn, open_value = decode_mask(model, cache, prompt_mask, L)
    positions = prompt_mask.sum(1, keepdim=True) + torch.arange(T, device=device)  # (B, T) of generated tokens
    completion_ids = torch.full((B, T), pad, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, T, dtype=torch.float32, device=device)
    completion_mask = torch.zeros(B, T, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    pad_t = torch.full((B,), pad, dtype=torch.long, device=device)
    checks = 0
    for t in range(T):
        tokens, lp = _sample(logits, temperature, top_k, top_p, generator)
        live = ~done
        tokens = torch.where(live, tokens, pad_t)
        completion_ids[:, t] = tokens
        logprobs[:, t] = lp.masked_fill(done, 0.0)
        completion_mask[:, t] = live
        done = done | (tokens == eos)
        if stop_strings and t % 4 == 3:  # early exit only; `_cut_at_stop` finds the exact end afterwards
            done = done | _hit_stop(tok, completion_ids[:, :t + 1], completion_mask[:, :t + 1], stop_strings)
        if t == T - 1:
            break
        if (t + 1) % check_every == 0:
            checks += 1
            if bool(done.all()):
                break
        attn[..., P + t] = open_value
        out = model(input_ids=tokens[:, None], attention_mask=attn, position_ids=positions[:, t:t + 1],
                    past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1, :].float()  # (B, V)
    return completion_ids[:, :t + 1], completion_mask[:, :t + 1], logprobs[:, :t + 1], checks


def _hit_stop(tok, ids: torch.Tensor, mask: torch.Tensor, stop_strings) -> torch.Tensor:
    texts = decode_completions(tok, ids, mask, ())
    return torch.tensor([any(s in t for s in stop_strings) for t in texts], device=ids.device)


def _cut_at_stop(tok, ids: torch.Tensor, mask: torch.Tensor, logprobs: torch.Tensor, stop_strings, pad: int) -> None:
    """In place: for rows whose text holds a stop string, end the completion at the token that
    completes the first one (mask 0, ids pad, log-prob 0 after it)."""
    texts = decode_completions(tok, ids, mask, ())
    for i, text in enumerate(texts):
        if not any(s in text for s in stop_strings):
            continue
        row = ids[i].tolist()
        lo, hi = 1, int(mask[i].sum())  # the shortest prefix whose text holds a stop string lies in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in tok.decode(row[:mid], skip_special_tokens=True) for s in stop_strings):
                hi = mid
            else:
                lo = mid + 1
        mask[i, lo:] = 0
        ids[i, lo:] = pad
        logprobs[i, lo:] = 0.0


def decode_completions(tok: PreTrainedTokenizerBase, ids: torch.Tensor, mask: torch.Tensor,
                       stop_strings: tuple[str, ...] = ()) -> list[str]:
    """Text of each completion up to (excluding) EOS and the first stop string."""
    eos = tok.eos_token_id
    rows = [[t for t, k in zip(row, m) if k and t != eos] for row, m in zip(ids.tolist(), mask.tolist())]
    out = []
    for text in tok.batch_decode(rows, skip_special_tokens=True):
        for s in stop_strings:
            if s in text:
                text = text[: text.index(s)]
        out.append(text)
    return out


def completion_logprobs(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                        completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                        temperature: float = 1.0, share_prompts: bool = True, logprob_fn=None) -> torch.Tensor:
    """Per-token log-probs (B, T) of `completion_ids` given the prompts, with gradients.

    With `share_prompts` (the default) and rows that repeat a prompt (a GRPO group), each distinct
    prompt goes through the model once and its KV cache rows are copied (broadcast over a group of
    contiguous rows, else `index_select`; either way gradients from every completion of the group
    flow back into the one prompt pass); the completions then run on that cache. The result and its
    gradients equal one full pass over prompt + completion (a test holds both to 1e-5), at
    (U x P + B x T) positions instead of B x (P + T) for U distinct prompts. Logits are computed for
    completion predictions only; the last completion token is never fed (nothing is predicted from
    it); the log-probs of the first completion token (from the prompt pass) and of the rest are
    joined, not their logits (no (B, T, V) copy). `logprob_fn(logits, ids, temperature)`: the head
    from logits to log-probs of the rest (default `token_logprobs`; e.g. the compiled one of
    `fast_update`)."""
    B, T = completion_ids.shape
    mask = torch.cat([prompt_mask, completion_mask], 1)  # (B, P+T)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    P = prompt_ids.size(1)
    uniq, inverse = (torch.unique(torch.cat([prompt_ids, prompt_mask], 1), dim=0, return_inverse=True)
                     if share_prompts else (None, None))
    if uniq is None or uniq.size(0) == B or not _accepts(model, "past_key_values"):
        ids = torch.cat([prompt_ids, completion_ids], 1)  # (B, P+T)
        kw = {"logits_to_keep": T + 1} if _accepts(model, "logits_to_keep") else {}
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **kw).logits
        logits = logits[:, -(T + 1):-1, :]  # predictions for completion tokens, (B, T, V)
    else:
        groups = _contiguous_groups(inverse)
        if groups is not None:  # run the prompts in batch order: row b's prompt is prompt row b // (B / U)
            uniq, inverse = uniq[groups], None
        u_ids, u_mask = uniq[:, :P], uniq[:, P:]  # (U, P)
        cache = DynamicCache(config=model.config)
        kw = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        out = model(input_ids=u_ids, attention_mask=u_mask, position_ids=(u_mask.cumsum(1) - 1).clamp(min=0),
                    past_key_values=cache, use_cache=True, **kw)
        first = _prompt_rows(out.logits[:, -1:, :], inverse, B)  # (B, 1, V): prediction of completion token 0
        # token 0's log-probs by the plain head: a (B, 1, V) slice, and a length-1 shape would make a
        # compiled head (`logprob_fn`) compile a second time
        first_logp = token_logprobs(first, completion_ids[:, :1], temperature)  # (B, 1)
        if T == 1:
            return first_logp
        for layer in out.past_key_values.layers:  # (U, H, P, D) -> (B, H, P, D)
            layer.keys, layer.values = _prompt_rows(layer.keys, inverse, B), _prompt_rows(layer.values, inverse, B)
        rest = model(input_ids=completion_ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids[:, P:-1],
                     past_key_values=out.past_key_values, use_cache=True).logits  # (B, T-1, V)
        # the two parts' log-probs are joined, not their logits: no (B, T, V) copy
        return torch.cat([first_logp, (logprob_fn or token_logprobs)(rest, completion_ids[:, 1:], temperature)], 1)
    return (logprob_fn or token_logprobs)(logits, completion_ids, temperature)


def _contiguous_groups(inverse: torch.Tensor) -> torch.Tensor | None:
    """For `inverse` (B,) mapping rows to U distinct prompts: when the rows come in contiguous groups of
    one size B / U, each group one prompt (a GRPO batch), the prompt index of each group (U,); else None."""
    B, U = inverse.numel(), int(inverse.max()) + 1
    if B % U:
        return None
    grouped = inverse.view(U, B // U)
    first = grouped[:, 0]
    if not bool((grouped == first[:, None]).all()) or first.unique().numel() != U:
        return None
    return first


def _prompt_rows(x: torch.Tensor, inverse: torch.Tensor | None, B: int) -> torch.Tensor:
    """Row b of the result is prompt row `inverse[b]` of `x` (U, ...) -> (B, ...), differentiably. With
    `inverse` None, prompt row u fills rows u*G .. u*G+G-1 (G = B / U): a broadcast, whose backward
    sums each group; `index_select`'s backward scatters instead, several times slower on CPU."""
    if inverse is not None:
        return x.index_select(0, inverse)
    U = x.size(0)
    return x[:, None].expand(U, B // U, *x.shape[1:]).reshape(B, *x.shape[1:])


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs (B, T), float32, of tokens `ids` (B, T) under softmax(logits / temperature), logits (B, T, V)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return _TokenLogprobs.apply(logits, ids)


class _TokenLogprobs(torch.autograd.Function):
    """log_softmax(x)[ids] over the last dimension, x (..., V), ids (...), with a backward that turns the
    saved log-softmax into the gradient in place: dL/dx = g * (onehot(ids) - softmax(x)), one pass of
    exp and one of scaling over the (..., V) tensor, where autograd's gather + log-softmax backward
    allocates a zero (..., V) tensor, scatters into it and writes a third. Same values (tests: 1e-6)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        lsm = torch.log_softmax(x, -1)
        ctx.save_for_backward(lsm, ids)
        return lsm.gather(-1, ids[..., None]).squeeze(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        lsm, ids = ctx.saved_tensors  # a second backward (retain_graph) finds lsm modified and raises
        grad = lsm.exp_().mul_(g.neg()[..., None])  # -g * softmax(x)
        return grad.scatter_add_(-1, ids[..., None], g[..., None]), None
