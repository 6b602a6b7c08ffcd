"""Ablation of attention heads, MLPs and MLP neurons: importance per component, top-k sets, Jaccard overlap.

A component is named `L{l}H{h}` (head h of block l: its slice of `heads.{l}`, the input of the output
projection), `L{l}MLP` (`mlp_out.{l}`) or `L{l}N{n}` (neuron n of block l's MLP: its slice of
`mlp_post.{l}`, the MLP's hidden activation before its output projection). Ablating replaces the
component's output with

    zero       0
    mean       its mean over every real token of a reference set of prompts (one vector per component)
    mean_pos   its mean over the reference set per position, positions counted from each row's first
               real token (prompts share their opening, so position p means the same token slot);
               evaluating a position no reference row reaches raises

Importance of a component on a set of examples = the unablated score minus the ablated score, for
teacher-forced metrics over the gold completion (prompt + completion + EOS in one pass):

    token_acc  fraction of completion tokens whose argmax is the gold token (the default)
    exact      1 when every completion token is argmax-correct (teacher-forced exact match)
    logprob    summed log-probability of the gold completion

    imp = ablation_importance(model, tok, examples, mode="mean", reference=prompts)
    imp["heads"]  # (L, H) importance;  imp["mlp"]  # (L,)
    jaccard(top_k(imp_sft, 5), top_k(imp_rl, 5))
    imp = ablation_importance(model, tok, examples, names=neurons(model, layers=[0]))
    imp["neurons"]  # (L, d_mlp) importance, NaN where not evaluated

Neurons are opt-in (`components(..., neurons=True)` or `neurons(...)`): one forward pass per neuron.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from mechrl.analysis import arch
from mechrl.analysis.cache import extract_activations, position_ids_from_mask, prepare_batch
from mechrl.analysis.hooks import _n_heads, hooks, n_layers

Mode = Literal["zero", "mean", "mean_pos"]
METRICS = ("token_acc", "exact", "logprob")
_NAME = re.compile(r"^L(\d+)(?:H(\d+)|(MLP)|N(\d+))$")


def mlp_width(model: nn.Module) -> int:
    """Neurons per MLP (d_mlp): the input width of the MLP's output projection (`analysis.arch`)."""
    return arch.mlp_width(model)


def neurons(model: nn.Module, layers: Sequence[int] | None = None) -> list[str]:
    """`L{l}N{n}` for every neuron of the given layers' MLPs (default: every layer)."""
    layers = range(n_layers(model)) if layers is None else layers
    return [f"L{layer}N{n}" for layer in layers for n in range(mlp_width(model))]


def components(model: nn.Module, *, heads: bool = True, mlps: bool = True, neurons: bool = False) -> list[str]:
    """Every component name of `model`, block by block (heads first in each block, then the MLP,
    then, with `neurons`, each MLP neuron)."""
    L, H = n_layers(model), _n_heads(model)
    width = mlp_width(model) if neurons else 0
    out = []
    for layer in range(L):
        out += [f"L{layer}H{h}" for h in range(H)] if heads else []
        out += [f"L{layer}MLP"] if mlps else []
        out += [f"L{layer}N{n}" for n in range(width)]
    return out


def parse_component(name: str, model: nn.Module | None = None) -> tuple[str, int, int | None]:
    """(site, layer, index): `L3H2` -> ("heads.3", 3, 2); `L1MLP` -> ("mlp_out.1", 1, None);
    `L0N17` -> ("mlp_post.0", 0, 17). Checks ranges when `model` is given."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"bad component name {name!r}: expected L<layer>H<head>, L<layer>MLP or L<layer>N<neuron>")
    layer = int(m.group(1))
    if m.group(3):
        site, index = f"mlp_out.{layer}", None
    elif m.group(4) is not None:
        site, index = f"mlp_post.{layer}", int(m.group(4))
    else:
        site, index = f"heads.{layer}", int(m.group(2))
    if model is not None:
        L = n_layers(model)
        bound = None if index is None else (mlp_width(model) if site.startswith("mlp_post") else _n_heads(model))
        if layer >= L or (bound is not None and index >= bound):
            raise ValueError(f"component {name!r} is outside the model ({L} layers, {_n_heads(model)} heads, "
                             f"{mlp_width(model)} MLP neurons)")
    return site, layer, index


# ----------------------------------------------------------------------------------------------
# Mean activations of a reference set
# ----------------------------------------------------------------------------------------------

def reference_means(model: nn.Module, tokenizer, texts: Sequence[str], names: Sequence[str], *,
                    per_position: bool, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Site -> mean activation over the reference texts' real tokens.

    per_position=False: (*feature) (heads: (H, d_head); mlp_out: (D,)). per_position=True:
    (P, *feature), P = the longest reference text, NaN where no text reaches a position.
    """
    acts = extract_activations(model, tokenizer, list(texts), list(names), positions=None,
                               batch_size=batch_size, progress=False)
    pos = acts["_position"]  # (N_tok,)
    out = {}
    for n in names:
        x = acts[n].double()  # (N_tok, *feature)
        if not per_position:
            out[n] = x.mean(0).float()
            continue
        P = int(pos.max()) + 1
        sums = torch.zeros(P, *x.shape[1:], dtype=torch.float64).index_add_(0, pos, x)
        counts = torch.bincount(pos, minlength=P).double()  # (P,)
        mean = sums / counts.reshape(P, *([1] * (x.dim() - 1)))
        out[n] = mean.float()  # 0/0 = NaN where no reference text reaches
    return out


# ----------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------

def ablation_hooks(model: nn.Module, names: Sequence[str], mode: Mode, attention_mask: torch.Tensor,
                   means: Mapping[str, torch.Tensor] | None = None) -> dict:
    """Site -> hook replacing the named components' outputs, for one batch with `attention_mask` (B, T).

    Components on the same site share one hook. `means` comes from `reference_means` (with
    per_position matching `mode`); zero ablation needs none.
    """
    by_site: dict[str, list[int | None]] = {}
    for c in names:
        site, _, head = parse_component(c, model)
        by_site.setdefault(site, []).append(head)
    if mode not in ("zero", "mean", "mean_pos"):
        raise ValueError(f"unknown ablation mode {mode!r}; known: zero, mean, mean_pos")
    if mode != "zero":
        missing = [s for s in by_site if means is None or s not in means]
        if missing:
            raise ValueError(f"{mode} ablation needs reference means for {missing}")
    pos = position_ids_from_mask(attention_mask)  # (B, T)
    real = attention_mask.bool()

    def value(site: str, x: torch.Tensor) -> torch.Tensor:
        """(B, T, *feature) replacement values for every position of `site`."""
        if mode == "zero":
            return torch.zeros_like(x)
        m = means[site].to(x.device, x.dtype)
        if mode == "mean":
            assert m.shape == x.shape[2:], f"{site}: mean shape {tuple(m.shape)} != activation {tuple(x.shape[2:])}"
            return m.expand_as(x)
        assert m.shape[1:] == x.shape[2:], f"{site}: mean shape {tuple(m.shape)} != activation {tuple(x.shape[2:])}"
        p = pos.to(x.device)
        too_far = real.to(x.device) & (p >= m.shape[0])
        if too_far.any():
            raise ValueError(f"{site}: mean_pos ablation at position {int(p[too_far].max())}, but the reference "
                             f"set only reaches position {m.shape[0] - 1}")
        v = m[p.clamp(max=m.shape[0] - 1)]  # (B, T, *feature)
        if torch.isnan(v[real.to(x.device)]).any():
            raise ValueError(f"{site}: mean_pos ablation at a position no reference text reaches")
        return torch.nan_to_num(v)  # padding positions may index unreached slots: they never matter

    def make(site: str, heads_here: list[int | None]):
        def fn(x):
            v = value(site, x)
            if heads_here == [None]:
                return v
            assert None not in heads_here, f"{site}: a whole-MLP component on a heads or neuron site"
            x = x.clone()
            x[:, :, heads_here] = v[:, :, heads_here]  # heads (B, T, H, d_head); neurons (B, T, d_mlp)
            return x
        return fn

    return {site: make(site, sorted(set(hs), key=lambda h: -1 if h is None else h)) for site, hs in by_site.items()}


# ----------------------------------------------------------------------------------------------
# Teacher-forced scores
# ----------------------------------------------------------------------------------------------

def encode_examples(tokenizer, examples: Sequence[Mapping], *, add_eos: bool = True) -> dict[str, torch.Tensor]:
    """Left-padded prompt + completion (+ EOS) ids with `target` (B, T): the gold next token where it
    is a completion token, -100 elsewhere (so target[:, t] is predicted by logits[:, t])."""
    if not examples:
        raise ValueError("no examples to score")
    rows, targets = [], []
    for i, ex in enumerate(examples):
        p = tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(ex["completion"], add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if add_eos else [])
        if not p or not c:
            raise ValueError(f"example {i}: empty prompt or completion")
        ids = p + c
        rows.append(ids)
        targets.append([-100] * (len(p) - 1) + c + [-100])  # logits at t predict ids[t + 1]
    T = max(len(r) for r in rows)
    B = len(rows)
    out = {"input_ids": torch.full((B, T), tokenizer.pad_token_id, dtype=torch.long),
           "attention_mask": torch.zeros((B, T), dtype=torch.long), "target": torch.full((B, T), -100, dtype=torch.long)}
    for j, (r, t) in enumerate(zip(rows, targets)):
        out["input_ids"][j, T - len(r):] = torch.tensor(r)
        out["attention_mask"][j, T - len(r):] = 1
        out["target"][j, T - len(t):] = torch.tensor(t)
    return out


def teacher_forced_scores(model: nn.Module, tokenizer, examples: Sequence[Mapping], *,
                          ablate: Sequence[str] = (), mode: Mode = "zero", means: Mapping | None = None,
                          batch_size: int = 32, add_eos: bool = True) -> dict[str, np.ndarray]:
    """Per example (N,) token_acc, exact and logprob of the gold completion, with `ablate` ablated."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    try:
        for start in range(0, len(examples), batch_size):
            enc = encode_examples(tokenizer, examples[start:start + batch_size], add_eos=add_eos)
            fns = ablation_hooks(model, ablate, mode, enc["attention_mask"], means) if ablate else {}
            with torch.no_grad(), hooks(model, fns):
                logits = model(**prepare_batch(enc, device)).logits.float()  # (B, T, V)
            tgt = enc["target"].to(device)  # (B, T)
            on = tgt != -100
            logp = logits.log_softmax(-1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]  # (B, T)
            right = (logits.argmax(-1) == tgt) & on
            n_tok = on.sum(-1)
            parts["token_acc"].append((right.sum(-1) / n_tok).cpu().numpy())
            parts["exact"].append((right.sum(-1) == n_tok).float().cpu().numpy())
            parts["logprob"].append((logp * on).sum(-1).cpu().numpy())
    finally:
        model.train(was_training)
    return {m: np.concatenate(v).astype(np.float64) for m, v in parts.items()}


# ----------------------------------------------------------------------------------------------
# Importance
# ----------------------------------------------------------------------------------------------

def ablation_importance(model: nn.Module, tokenizer, examples: Sequence[Mapping], *, mode: Mode = "zero",
                        reference: Sequence[str] | None = None, names: Sequence[str] | None = None,
                        metric: str = "token_acc", batch_size: int = 32, add_eos: bool = True) -> dict:
    """Importance of each component (default: every head and MLP), one ablation at a time.

    Returns {"base": {metric: mean}, "ablated": {component: {metric: mean}}, "importance": {component:
    base - ablated for `metric`}, "heads": (L, H), "mlp": (L,) importance arrays (NaN for components
    not evaluated), "neurons": (L, d_mlp) when any neuron was evaluated, "mode", "metric",
    "n_examples"}.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown ablation metric {metric!r}; known: {METRICS}")
    names = components(model) if names is None else list(names)
    means = None
    if mode != "zero":
        if not reference:
            raise ValueError(f"{mode} ablation needs a reference set of prompts")
        sites = sorted({parse_component(c, model)[0] for c in names})
        means = reference_means(model, tokenizer, reference, sites, per_position=mode == "mean_pos",
                                batch_size=batch_size)
    base_scores = teacher_forced_scores(model, tokenizer, examples, batch_size=batch_size, add_eos=add_eos)
    base = {m: float(v.mean()) for m, v in base_scores.items()}
    L, H = n_layers(model), _n_heads(model)
    heads, mlp = np.full((L, H), np.nan), np.full(L, np.nan)
    neuron = None  # (L, d_mlp), only when a neuron is evaluated
    ablated, importance = {}, {}
    for c in names:
        s = teacher_forced_scores(model, tokenizer, examples, ablate=[c], mode=mode, means=means,
                                  batch_size=batch_size, add_eos=add_eos)
        ablated[c] = {m: float(v.mean()) for m, v in s.items()}
        importance[c] = base[metric] - ablated[c][metric]
        site, layer, index = parse_component(c)
        if index is None:
            mlp[layer] = importance[c]
        elif site.startswith("mlp_post"):
            if neuron is None:
                neuron = np.full((L, mlp_width(model)), np.nan)
            neuron[layer, index] = importance[c]
        else:
            heads[layer, index] = importance[c]
    out = {"mode": mode, "metric": metric, "n_examples": len(examples), "base": base, "ablated": ablated,
           "importance": importance, "heads": heads, "mlp": mlp}
    if neuron is not None:
        out["neurons"] = neuron
    return out


def importance_by_split(model: nn.Module, tokenizer, splits: Mapping[str, Sequence[Mapping]], **kw) -> dict[str, dict]:
    """`ablation_importance` on each split's examples (split -> result)."""
    return {name: ablation_importance(model, tokenizer, exs, **kw) for name, exs in splits.items()}


#: Importance at or below this is no importance: a component whose ablation moves the metric by
#: less than this is never in a top-k set, however many components share that value.
MIN_IMPORTANCE = 1e-9


def top_k(result: Mapping, k: int, *, min_importance: float = MIN_IMPORTANCE) -> set[str]:
    """The k most important components, ties kept together: every component whose importance is at
    least the k-th largest value (so a tie at the boundary makes the set larger than k) and above
    `min_importance` (so the set may also be smaller than k). Breaking ties by name would fill two
    checkpoints' sets with the same zero-importance components and inflate their overlap."""
    imp = result["importance"]
    if k < 1 or k > len(imp):
        raise ValueError(f"top_k: k={k} but {len(imp)} components were evaluated")
    kth = sorted(imp.values(), reverse=True)[k - 1]
    return {c for c, v in imp.items() if v >= kth - 1e-12 and v > min_importance}


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b|; NaN when both are empty (no component matters in either: overlap undefined)."""
    a, b = set(a), set(b)
    return float("nan") if not a and not b else len(a & b) / len(a | b)


def compare_top_k(a: Mapping[str, Mapping], b: Mapping[str, Mapping], ks: Sequence[int] = (1, 3, 5, 10)) -> dict:
    """Per split shared by two checkpoints' `importance_by_split` results: {split: {k: Jaccard}} of
    their `top_k` sets (k larger than the component count is skipped; NaN where neither checkpoint
    has a component above `MIN_IMPORTANCE`). `top_k_sizes` gives the sets' sizes beside it."""
    shared = [s for s in a if s in b]
    if not shared:
        raise ValueError(f"no split in common: {list(a)} vs {list(b)}")
    return {s: {int(k): jaccard(top_k(a[s], k), top_k(b[s], k)) for k in ks if k <= len(a[s]["importance"])}
            for s in shared}


def top_k_sizes(results: Mapping[str, Mapping], ks: Sequence[int] = (1, 3, 5, 10)) -> dict:
    """{split: {k: size of top_k}} for one checkpoint's `importance_by_split`: a size above k is a tie
    at the boundary, below k means fewer than k components matter at all."""
    return {s: {int(k): len(top_k(r, k)) for k in ks if k <= len(r["importance"])} for s, r in results.items()}


def layer_profile(result: Mapping, reduce: Literal["sum", "max"] = "sum") -> dict[str, np.ndarray]:
    """Per-layer importance: heads reduced over heads (L,), MLPs (L,), and both together (L,)."""
    if reduce not in ("sum", "max"):
        raise ValueError(f"unknown reduction {reduce!r}; known: sum, max")
    heads, mlp = np.asarray(result["heads"], float), np.asarray(result["mlp"], float)
    f = np.nansum if reduce == "sum" else np.nanmax
    with np.errstate(invalid="ignore"):
        both = np.concatenate([heads, mlp[:, None]], 1)
        return {"heads": f(heads, 1), "mlp": mlp, "all": f(both, 1)}
