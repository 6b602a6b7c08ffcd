"""Batched sampling with a KV cache: the fast path of evaluation and of the RL loops.

`generate(model, tok, prompts, ...)` left-pads the prompts (or takes them already tokenized), runs
each distinct prompt once, then decodes one token per step from the cache until every row has
emitted EOS (or a stop string) or `max_new_tokens` is reached. It returns token ids, per-token
log-probs under the sampling distribution, and masks. Greedy decoding (`temperature=0`) gives the
same tokens as `model.generate(do_sample=False)` (a test holds it to that).

Why it is fast at small sizes, where a decode step costs Python and kernel overhead rather than
arithmetic (each was measured; see bench/README.md):
- Prompts repeated in the batch (a GRPO group: each prompt G times) are prefilled once and their
  KV cache rows copied, so prefill costs 1/G; the prefill computes logits for the last position only.
- The KV cache is a `StaticCache` sized prompt + `max_new_tokens`: no concatenation per step.
- The attention mask is built once, in the 4-D form the attention kernel takes, and opened one column
  per step in place, so the model skips its per-step mask construction; positions are precomputed.
- Sampling draws one uniform per row and inverts the CDF (`searchsorted` on the cumulative
  probabilities), an exact sample of the same distribution as `torch.multinomial`, whose CPU
  kernel draws an exponential variate for every vocabulary entry (it was 30% of the time).
- On CUDA, `done.all()` (a host sync) is checked every few steps only.

Left out: beam search, repetition penalties, batching prompts of very different lengths by bucket.

Shapes: B prompts, P prompt length (left-padded), T generated length, V vocabulary, L = P + T.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase, StaticCache

_X = os.environ.get("MECHRL_ROLLOUT_X", "")  # experiment knobs, removed before commit


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    completion_ids: torch.Tensor  # (B, T) pad after the end of each completion
    completion_mask: torch.Tensor  # (B, T) 1 on generated tokens up to and including EOS
    logprobs: torch.Tensor  # (B, T) log-prob of each sampled token under the sampling distribution
    texts: list[str]  # decoded completions, up to EOS / stop string, special tokens removed

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
    logp = logits.log_softmax(-1)  # (B, K)
    # inverse-CDF sampling: one uniform per row, first column whose cumulative probability exceeds it
    cdf = logp.exp().cumsum(-1)  # (B, K)
    u = torch.rand(cdf.size(0), 1, device=cdf.device, dtype=cdf.dtype, generator=generator) * cdf[:, -1:]
    col = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1)  # (B, 1)
    lp = logp.gather(-1, col).squeeze(-1)
    tokens = (col if idx is None else idx.gather(-1, col)).squeeze(-1)
    return tokens, lp


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


@torch.no_grad()
def generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str] | None = None, *,
             max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             stop_strings: tuple[str, ...] = (), generator: torch.Generator | None = None,
             prompt_ids: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None,
             check_every: int | None = None) -> Rollout:
    """Sample completions for `prompts` (strings), or for `prompt_ids`/`prompt_mask` ((B, P),
    left-padded, e.g. from `encode_prompts`). `temperature=0` is greedy. `generator` (on the
    model's device) makes sampling reproducible. `check_every`: decode steps between checks that
    every row has ended (a host sync on GPU); default 1 on CPU, 8 on GPU."""
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    if (prompts is None) == (prompt_ids is None):
        raise ValueError("generate: pass either prompts (strings) or prompt_ids (+ prompt_mask), not both")
    if prompts is not None:
        prompt_ids, prompt_mask = encode_prompts(tok, prompts, device)
    else:
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt_ids)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    _validate_prompt_tensors(prompt_ids, prompt_mask)
    if check_every is None:
        check_every = 1 if device.type == "cpu" else 8
    eos, pad = tok.eos_token_id, tok.pad_token_id
    B, P = prompt_ids.shape
    T = max_new_tokens
    L = P + T

    # --- prefill: each distinct prompt once, then its cache rows copied to the rows that repeat it
    uniq, inverse = torch.unique(torch.cat([prompt_ids, prompt_mask], 1), dim=0, return_inverse=True)
    repeated = uniq.size(0) < B and "nodedupe" not in _X
    u_ids, u_mask = (uniq[:, :P], uniq[:, P:]) if repeated else (prompt_ids, prompt_mask)  # (U, P)
    u_pos = (u_mask.cumsum(1) - 1).clamp(min=0)  # positions count real tokens only
    static = "dynamic" not in _X
    cache = StaticCache(config=model.config, max_cache_len=L) if static else DynamicCache()
    kw = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") and "keepall" not in _X else {}
    out = model(input_ids=u_ids, attention_mask=u_mask, position_ids=u_pos, past_key_values=cache, use_cache=True,
                **kw)
    logits = out.logits[:, -1, :].float()  # (U, V)
    if repeated:  # uniq[inverse[i]] is row i
        cache.reorder_cache(inverse)
        logits = logits[inverse]  # (B, V)

    # --- decode state, allocated once
    impl = getattr(model.config, "_attn_implementation", None)
    if static and impl in ("sdpa", "eager") and "mask2d" not in _X:
        # the 4-D mask the attention kernel takes: bool for sdpa, additive float for eager
        if impl == "sdpa":
            attn = torch.zeros(B, 1, 1, L, dtype=torch.bool, device=device)
            attn[:, 0, 0, :P] = prompt_mask.bool()
            open_value = True
        else:
            dtype = next(model.parameters()).dtype
            attn = torch.full((B, 1, 1, L), torch.finfo(dtype).min, dtype=dtype, device=device)
            attn[:, 0, 0, :P].masked_fill_(prompt_mask.bool(), 0.0)
            open_value = 0.0
    else:
        attn = torch.zeros(B, L, dtype=prompt_mask.dtype, device=device)
        attn[:, :P] = prompt_mask
        open_value = 1
    positions = prompt_mask.sum(1, keepdim=True) + torch.arange(T, device=device)  # (B, T) of generated tokens
    completion_ids = torch.full((B, T), pad, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, T, dtype=torch.float32, device=device)
    completion_mask = torch.zeros(B, T, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    pad_t = torch.full((B,), pad, dtype=torch.long, device=device)
    steps = T
    for t in range(T):
        tokens, lp = _sample(logits, temperature, top_k, top_p, generator)
        live = ~done
        tokens = torch.where(live, tokens, pad_t)
        completion_ids[:, t] = tokens
        logprobs[:, t] = lp.masked_fill(done, 0.0)
        completion_mask[:, t] = live
        done = done | (tokens == eos)
        if stop_strings and t % 4 == 3:
            done = done | _hit_stop(tok, completion_ids[:, :t + 1], completion_mask[:, :t + 1], stop_strings)
        if t == T - 1 or ((t + 1) % check_every == 0 and bool(done.all())):
            steps = t + 1
            break
        if attn.ndim == 4:
            attn[:, :, :, P + t] = open_value
        else:
            attn[:, P + t] = open_value
        cur = attn if static else attn[:, :P + t + 1]
        out = model(input_ids=tokens[:, None], attention_mask=cur, position_ids=positions[:, t:t + 1],
                    past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1, :].float()  # (B, V)

    completion_ids, completion_mask, logprobs = completion_ids[:, :steps], completion_mask[:, :steps], logprobs[:, :steps]
    if stop_strings:
        _cut_at_stop(tok, completion_ids, completion_mask, logprobs, stop_strings, pad)
    width = int(completion_mask.any(0).nonzero().max()) + 1  # drop trailing columns where no row is live
    completion_ids, completion_mask, logprobs = completion_ids[:, :width], completion_mask[:, :width], logprobs[:, :width]
    texts = decode_completions(tok, completion_ids, completion_mask, stop_strings)
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, logprobs, texts)


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
                        temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs (B, T) of `completion_ids` given the prompts, with gradients. The logits
    are computed for the completion positions only (not the prompt's)."""
    ids = torch.cat([prompt_ids, completion_ids], 1)  # (B, P+T)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    T = completion_ids.size(1)
    kw = {"logits_to_keep": T + 1} if _accepts(model, "logits_to_keep") else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **kw).logits
    logits = logits[:, -(T + 1):-1, :].float()  # predictions for completion tokens, (B, T, V)
    if temperature != 1.0:
        logits = logits / temperature
    return torch.gather(F.log_softmax(logits, -1), 2, completion_ids[..., None]).squeeze(-1)
