"""Caching activations: one batch (`run_with_cache`) or a whole dataset (`extract_activations`).

Padding never changes a result: batched caches equal one-by-one caches. Two things make that so:

  - `position_ids` are derived from the attention mask (cumsum(mask) - 1), so a left-padded row's
    first real token sits at position 0 (GPT-2 otherwise counts padding as positions);
  - positions are addressed relative to each row's real tokens: -1 is the last real token
    (the last prompt token), -2 the one before it, 0 the first real token. Padding on either side
    does not move them.

    out, cache = run_with_cache(model, tok(["a b", "c"], return_tensors="pt", padding=True), ["resid_post.0"])
    acts = extract_activations(model, tok, prompts, ["resid_post.0", "resid_post.1"], positions=[-1])
    acts["resid_post.1"].shape  # (N, 1, D)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from mechrl.analysis.hooks import hooks
from mechrl.analysis.store import ActivationStore, ActivationWriter


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B, T) positions counting real tokens from 0; padding gets 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prepare_batch(batch: Mapping[str, torch.Tensor], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """A model-ready batch: input_ids, attention_mask (all ones when absent) and mask-derived position_ids."""
    if "input_ids" not in batch:
        raise KeyError(f"batch needs input_ids; it has {sorted(batch)}")
    ids = batch["input_ids"]
    assert ids.dim() == 2, f"input_ids must be (B, T), got shape {tuple(ids.shape)}"
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    assert mask.shape == ids.shape, f"attention_mask {tuple(mask.shape)} != input_ids {tuple(ids.shape)}"
    if (mask.sum(-1) == 0).any():
        raise ValueError("a row of the batch has no real tokens (attention_mask all zero)")
    pos = batch.get("position_ids")
    pos = position_ids_from_mask(mask) if pos is None else pos
    out = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


class _CacheComplete(Exception):
    """Raised by the last site's hook to end a forward pass whose output is not needed."""


def run_with_cache(model: nn.Module, batch: Mapping[str, torch.Tensor], names: Sequence[str], *,
                   grad: bool = False, stop_early: bool = False) -> tuple[object, dict[str, torch.Tensor]]:
    """Run `model` on `batch` and return (output, cache: site name -> tensor).

    Tensors are as the sites see them ((B, T, D); heads (B, T, H, d_head)). With `grad=False` the pass
    runs under `torch.no_grad()` and the cache holds detached tensors. With `stop_early` the forward
    pass ends as soon as every site has fired (the layers after the deepest site never run) and the
    output is None: extraction of early layers then costs only those layers.
    """
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate site names in {list(names)}")
    if stop_early and grad:
        raise ValueError("run_with_cache: stop_early=True ends the forward pass, so there is no output to "
                         "differentiate; use grad=False")
    cache: dict[str, torch.Tensor] = {}

    def saver(name):
        def fn(x):
            if name in cache:  # a module called twice per forward would make the cache ambiguous
                raise RuntimeError(f"site {name!r} fired twice in one forward pass")
            cache[name] = x if grad else x.detach()
            if stop_early and len(cache) == len(names):
                raise _CacheComplete()
        return fn

    device = next(model.parameters()).device
    output = None
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        with hooks(model, {n: saver(n) for n in names}):
            try:
                output = model(**prepare_batch(batch, device))
            except _CacheComplete:
                pass
    if stop_early and len(cache) != len(names):
        raise RuntimeError(f"run_with_cache: sites {sorted(set(names) - set(cache))} never fired")
    return output, cache


def select_positions(x: torch.Tensor, attention_mask: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """(B, T, ...) -> (B, P, ...): the given positions of each row, relative to its real tokens.

    Negative positions count from the last real token (-1 = last), non-negative from the first real
    token (0 = first). A position outside a row's real tokens raises.
    """
    B, T = attention_mask.shape
    assert x.shape[:2] == (B, T), f"activations {tuple(x.shape)} do not match the mask {(B, T)}"
    mask = attention_mask.bool().to(x.device)
    first = mask.float().argmax(-1)  # (B,) index of the first real token
    last = T - 1 - mask.flip(-1).float().argmax(-1)  # (B,) index of the last real token
    n_real = mask.sum(-1)
    if not torch.equal(n_real, last - first + 1):
        raise ValueError("attention_mask has holes (padding between real tokens); positions are ambiguous")
    rel = torch.tensor(list(positions), device=x.device)  # (P,)
    idx = torch.where(rel < 0, last[:, None] + 1 + rel[None], first[:, None] + rel[None])  # (B, P)
    bad = (idx < first[:, None]) | (idx > last[:, None])
    if bad.any():
        row = int(bad.any(-1).nonzero()[0])
        raise IndexError(f"positions {list(positions)} fall outside row {row}'s {int(n_real[row])} real tokens")
    gather = idx.reshape(B, -1, *([1] * (x.dim() - 2))).expand(B, len(positions), *x.shape[2:])
    return x.gather(1, gather)


def extract_activations(model: nn.Module, tokenizer, texts: Sequence[str], names: Sequence[str], *,
                        positions: Sequence[int] | None = (-1,), batch_size: int = 32,
                        out_dir: str | Path | None = None, shard_rows: int = 4096,
                        dtype: torch.dtype = torch.float32, progress: bool = True, add_special_tokens: bool = False,
                        ) -> dict[str, torch.Tensor] | ActivationStore:
    """Activations of `names` over a dataset of texts, streamed in batches.

    `positions` given: rows are examples, tensors (N, P, ...), positions relative to each row's
    real tokens (see `select_positions`). `positions=None`: rows are tokens, every real token of
    every text, with two extra int64 tensors `_example` (the text's index) and `_position` (the
    token's position from 0).

    With `out_dir` the rows go to disk in safetensors shards of `shard_rows` rows (for datasets
    larger than memory) and an `ActivationStore` over them is returned; otherwise a dict of tensors.
    Texts are tokenized as mechrl's rollouts tokenize prompts (`add_special_tokens=False`), so the
    model sees the token sequence it was trained and sampled on.
    """
    if not texts:
        raise ValueError("extract_activations: no texts")
    if any(n.startswith("_") for n in names):
        raise ValueError(f"site names must not start with '_' (reserved for index tensors): {list(names)}")
    writer = None
    if out_dir is not None:
        meta = {"positions": None if positions is None else list(positions), "sites": list(names), "n_texts": len(texts)}
        writer = ActivationWriter(out_dir, shard_rows=shard_rows, meta=meta)
    chunks: dict[str, list[torch.Tensor]] = {}
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="activations", disable=not progress):
            batch = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                              add_special_tokens=add_special_tokens)
            _, cache = run_with_cache(model, batch, names, stop_early=True)  # no layer after the last site runs
            mask = batch["attention_mask"]
            if positions is not None:
                rows = {n: select_positions(cache[n], mask, positions).to("cpu", dtype) for n in names}
            else:
                keep = mask.bool()  # (B, T)
                rows = {n: cache[n][keep.to(cache[n].device)].to("cpu", dtype) for n in names}
                ex = torch.arange(start, start + len(mask))[:, None].expand_as(mask)
                rows["_example"] = ex[keep]
                rows["_position"] = position_ids_from_mask(mask)[keep]
            if writer is not None:
                writer.add(rows)
            else:
                for k, v in rows.items():
                    chunks.setdefault(k, []).append(v)
    finally:
        model.train(was_training)
    if writer is not None:
        return writer.close()
    return {k: torch.cat(v) for k, v in chunks.items()}
