"""Activation patching and attribution patching on clean/corrupted prompt pairs.

A pair is two prompts that should be answered differently (or the same prompt in two distributions)
plus each one's gold completion. Patching asks which activations carry the difference: run the
corrupted prompt, replace one site's activation with the clean run's, and see how far the answer
moves back towards the clean answer.

Metric (at the last input token):

    logit_diff   logit(clean token) - logit(corrupted token)
    logprob      log p(clean token)          (pairs whose completions agree: ID vs OOD phrasing)
    prob         p(clean token)

The tokens compared are the first tokens where the two gold completions differ; the completions'
shared prefix is teacher-forced after each prompt, so with worked answers the metric is taken where
the answers first diverge. When the completions are identical nothing is teacher-forced and both
tokens are the completion's first token (use `logprob`/`prob`).

Scores are normalised per pair, 1 = clean, 0 = corrupted:  (patched - corrupted) / (clean - corrupted).
Pairs with |clean - corrupted| < `min_gap` are dropped and counted; all dropped raises. A site's
score over pairs is the gap-weighted mean of the per-pair scores,
    sum_i sign(gap_i) (patched_i - corrupted_i) / sum_i |gap_i|,
so a pair whose clean and corrupted runs barely differ (a tiny denominator) weighs as little as its
gap; a plain mean of ratios lets such pairs dominate. The per-pair median is reported beside it.

Alignment: rows are left-padded to one length, so positions are counted from the end (-1 = the last
input token). Pairs whose prompts tokenize to the same length (what `mechrl.studies.card_pairs` builds for rule
pairs) align at every position; otherwise the two prompts align from the end, and only positions that
are real tokens in both runs are patched (others score NaN per position and are never patched).

    pb = tokenize_pairs(pairs, tok)
    exact = activation_patching(model, pb)             # resid (L, T), heads (L, H), mlp (L,)
    approx = attribution_patching(model, pb)           # the same from one forward + backward

Attribution patching is the first-order estimate  (clean_act - corr_act) . d metric / d act  at the
corrupted run, summed over the patched positions (and features). It is exact where the metric is
linear in the activation (the final norm's output feeding the unembedding: logit_diff is linear there).
It tracks exact patching well for residual-stream positions and heads, and poorly for whole-MLP
patches with large effects on trained models (an MLP that flips the answer is far from linear): check
attribution maps against `activation_patching` on a subset before trusting them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from mechrl.analysis.cache import prepare_batch, run_with_cache
from mechrl.analysis.hooks import hooks, n_layers, resolve_site

Metric = Literal["logit_diff", "logprob", "prob"]
By = Literal["position", "head", "all"]  # one patch per position, per head (all positions), or one for all


@dataclass(frozen=True)
class PromptPair:
    """Clean and corrupted prompts with their gold completions (completions with a leading space)."""

    clean_prompt: str
    corrupt_prompt: str
    clean_completion: str
    corrupt_completion: str
    meta: Mapping | None = None


@dataclass
class PairBatch:
    """N pairs as left-padded token tensors; both sides share one length T."""

    clean: dict[str, torch.Tensor]  # input_ids, attention_mask: (N, T)
    corrupt: dict[str, torch.Tensor]  # (N, T)
    clean_token: torch.Tensor  # (N,) token the clean answer continues with
    corrupt_token: torch.Tensor  # (N,) token the corrupted answer continues with
    meta: list

    @property
    def n(self) -> int:
        return int(self.clean_token.shape[0])

    @property
    def length(self) -> int:
        return int(self.clean["input_ids"].shape[1])

    @property
    def aligned(self) -> torch.Tensor:
        """(N, T) positions that are real tokens in both runs: the only ones patched."""
        return self.clean["attention_mask"].bool() & self.corrupt["attention_mask"].bool()

    @property
    def differs(self) -> torch.Tensor:
        """(N, T) aligned positions whose tokens differ between the runs."""
        return self.aligned & (self.clean["input_ids"] != self.corrupt["input_ids"])

    def select(self, idx: Sequence[int]) -> "PairBatch":
        idx_t = torch.as_tensor(list(idx), dtype=torch.long)
        return PairBatch({k: v[idx_t] for k, v in self.clean.items()}, {k: v[idx_t] for k, v in self.corrupt.items()},
                         self.clean_token[idx_t], self.corrupt_token[idx_t], [self.meta[i] for i in idx_t.tolist()])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pairs(pairs: Sequence[PromptPair], tokenizer, *, add_eos: bool = True) -> PairBatch:
    """Token ids of each pair: prompt + the completions' shared prefix, and the first differing tokens.

    Prompts and completions are tokenized separately without special tokens (as rollouts and SFT see
    them); EOS ends each completion when `add_eos`, so a completion that is a prefix of the other still
    has a differing token.
    """
    if not pairs:
        raise ValueError("tokenize_pairs: no pairs")
    pad = tokenizer.pad_token_id
    assert pad is not None, "tokenizer has no pad token (use mechrl.models.loading.prepare_tokenizer)"
    rows_c, rows_k, tok_c, tok_k = [], [], [], []
    for i, p in enumerate(pairs):
        enc = tokenizer([p.clean_prompt, p.corrupt_prompt, p.clean_completion, p.corrupt_completion],
                        add_special_tokens=False)["input_ids"]
        pc, pk, cc, ck = (list(x) for x in enc)
        if add_eos:
            cc, ck = cc + [tokenizer.eos_token_id], ck + [tokenizer.eos_token_id]
        if not cc or not ck:
            raise ValueError(f"pair {i}: empty completion")
        if cc == ck:  # same answer: nothing to teacher-force, both tokens are its first token
            prefix, tc, tk = [], cc[0], ck[0]
        else:
            s = _common_prefix(cc, ck)
            assert s < len(cc) and s < len(ck), f"pair {i}: completions differ but one is a prefix of the other"
            prefix, tc, tk = cc[:s], cc[s], ck[s]
        rows_c.append(pc + prefix)
        rows_k.append(pk + prefix)
        tok_c.append(tc)
        tok_k.append(tk)
    T = max(len(r) for r in rows_c + rows_k)

    def pad_left(rows):
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, T - len(r):] = torch.tensor(r)
            mask[j, T - len(r):] = 1
        return {"input_ids": ids, "attention_mask": mask}

    return PairBatch(pad_left(rows_c), pad_left(rows_k), torch.tensor(tok_c), torch.tensor(tok_k),
                     [dict(p.meta or {}) for p in pairs])


# ----------------------------------------------------------------------------------------------
# Metric
# ----------------------------------------------------------------------------------------------

def answer_metric(logits: torch.Tensor, clean_token: torch.Tensor, corrupt_token: torch.Tensor,
                  metric: Metric) -> torch.Tensor:
    """(N, T, V) logits -> (N,) metric at the last position (rows are left-padded: -1 is the last real token)."""
    last = logits[:, -1].float()  # (N, V)
    c = last.gather(1, clean_token[:, None].to(last.device))[:, 0]
    if metric == "logit_diff":
        if bool((clean_token == corrupt_token).any()):
            raise ValueError("logit_diff needs different clean and corrupted tokens; some pairs have identical "
                             "completions: use metric='logprob' or 'prob'")
        return c - last.gather(1, corrupt_token[:, None].to(last.device))[:, 0]
    if metric == "logprob":
        return c - last.logsumexp(-1)
    if metric == "prob":
        return (c - last.logsumexp(-1)).exp()
    raise ValueError(f"unknown metric {metric!r}; known: logit_diff, logprob, prob")


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode (no dropout: patched and unpatched runs must be deterministic), restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _forward_metric(model: nn.Module, inputs: Mapping[str, torch.Tensor], pb: PairBatch, metric: Metric,
                    fns: Mapping | None = None) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad(), evaluating(model), hooks(model, dict(fns or {})):
        logits = model(**prepare_batch(inputs, device)).logits
    return answer_metric(logits, pb.clean_token, pb.corrupt_token, metric).cpu()


def baseline_metrics(model: nn.Module, pb: PairBatch, metric: Metric = "logit_diff") -> tuple[torch.Tensor, torch.Tensor]:
    """(clean (N,), corrupted (N,)) metric values without patching."""
    return _forward_metric(model, pb.clean, pb, metric), _forward_metric(model, pb.corrupt, pb, metric)


# ----------------------------------------------------------------------------------------------
# Exact patching
# ----------------------------------------------------------------------------------------------

def _patch_masks(pb: PairBatch, site_shape: tuple[int, ...], by: By) -> torch.Tensor:
    """(J, N, T[, H]) bool: which entries of the site each of the J patches replaces."""
    aligned = pb.aligned  # (N, T)
    N, T = aligned.shape
    if by == "position":
        eye = torch.eye(T, dtype=torch.bool)  # (J=T, T)
        return eye[:, None, :] & aligned[None]  # (T, N, T)
    if by == "head":
        assert len(site_shape) == 4, f"by='head' needs a (B, T, H, d_head) site, got shape {site_shape}"
        H = site_shape[2]
        eye = torch.eye(H, dtype=torch.bool)  # (J=H, H)
        return aligned[None, :, :, None] & eye[:, None, None, :]  # (H, N, T, H)
    if by == "all":
        return aligned[None]  # (1, N, T)
    raise ValueError(f"unknown patch grouping {by!r}; known: position, head, all")


def patch_site(model: nn.Module, pb: PairBatch, site: str, by: By, *, metric: Metric = "logit_diff",
               clean_act: torch.Tensor | None = None, max_rows: int = 256) -> torch.Tensor:
    """(N, J) metric of the corrupted run with the clean activation patched into `site`.

    `by="position"`: J = T, patch j replaces position j (all features; every head for heads sites).
    `by="head"`: J = H, patch j replaces head j at every aligned position. `by="all"`: J = 1, every
    aligned position. Patches are batched: up to `max_rows` rows (copies of the corrupted batch) per pass.
    """
    if clean_act is None:
        with evaluating(model):
            _, cache = run_with_cache(model, pb.clean, [site])
        clean_act = cache[site]
    clean_act = clean_act.detach()
    masks = _patch_masks(pb, tuple(clean_act.shape), by)  # (J, N, T[, H])
    J, N = masks.shape[:2]
    per = max(1, max_rows // N)  # patches per forward pass
    out = []
    for j0 in range(0, J, per):
        m = masks[j0:j0 + per]  # (P, N, T[, H])
        P = m.shape[0]
        rows = m.reshape(P * N, *m.shape[2:])  # (P*N, T[, H]) patch-major
        src = clean_act.repeat(P, *([1] * (clean_act.dim() - 1)))  # (P*N, T, ...)
        where = rows.reshape(*rows.shape, *([1] * (src.dim() - rows.dim()))).to(src.device)

        def patch(x, src=src, where=where):
            assert x.shape == src.shape, f"{site}: activation {tuple(x.shape)} != clean {tuple(src.shape)}"
            return torch.where(where, src.to(x.dtype), x)

        inputs = {k: v.repeat(P, 1) for k, v in pb.corrupt.items()}
        sub = PairBatch(pb.clean, inputs, pb.clean_token.repeat(P), pb.corrupt_token.repeat(P), [])
        vals = _forward_metric(model, inputs, sub, metric, {site: patch})  # (P*N,)
        out.append(vals.reshape(P, N))
    return torch.cat(out).T  # (N, J)


# ----------------------------------------------------------------------------------------------
# Attribution patching
# ----------------------------------------------------------------------------------------------

def attribute_sites(model: nn.Module, pb: PairBatch, sites: Mapping[str, By], *,
                    metric: Metric = "logit_diff") -> dict[str, torch.Tensor]:
    """Per site, (N, J) first-order estimates of (patched - corrupted) metric, J as in `patch_site`.

    One clean forward (cache) and one corrupted forward + backward. The gradient with respect to each
    site's activation is read off a zero tensor added to it (the graph stays whole, so gradients
    through later sites are the full gradients). Non-aligned positions contribute nothing (and are
    NaN for `by="position"`).
    """
    names = list(sites)
    bad = {n: by for n, by in sites.items() if by not in ("position", "head", "all")}
    if bad:
        raise ValueError(f"unknown patch groupings {bad}; known: position, head, all")
    with evaluating(model):
        _, clean = run_with_cache(model, pb.clean, names)
        deltas = {n: torch.zeros_like(clean[n], dtype=torch.float32, requires_grad=True) for n in names}
        corr: dict[str, torch.Tensor] = {}

        def adder(name):
            def fn(x):
                if name in corr:
                    raise RuntimeError(f"site {name!r} fired twice in one forward pass")
                corr[name] = x.detach()
                return x + deltas[name].to(x.dtype)
            return fn

        device = next(model.parameters()).device
        with torch.enable_grad(), hooks(model, {n: adder(n) for n in names}):
            logits = model(**prepare_batch(pb.corrupt, device)).logits
            m = answer_metric(logits, pb.clean_token, pb.corrupt_token, metric)  # (N,)
            # rows are independent, so d(sum)/d(row's activation) is that row's own gradient
            grads = torch.autograd.grad(m.sum(), [deltas[n] for n in names])
    aligned = pb.aligned  # (N, T)
    out = {}
    for n, g in zip(names, grads):
        diff = (clean[n].float() - corr[n].float()).cpu()
        g = g.cpu()
        if sites[n] == "head":
            assert diff.dim() == 4, f"{n}: by='head' needs a (B, T, H, d_head) site, got {tuple(diff.shape)}"
            per = (diff * g).sum(-1) * aligned[..., None]  # (N, T, H)
            out[n] = per.sum(1)  # (N, H)
            continue
        per = (diff * g).reshape(diff.shape[0], diff.shape[1], -1).sum(-1)  # (N, T)
        if sites[n] == "position":
            out[n] = per.masked_fill(~aligned, float("nan"))  # (N, T)
        else:  # "all"
            out[n] = (per * aligned).sum(1, keepdim=True)  # (N, 1)
    return out


# ----------------------------------------------------------------------------------------------
# The standard sweep: resid per layer x position, heads per layer x head, MLP per layer
# ----------------------------------------------------------------------------------------------

def standard_sites(model: nn.Module, what: Sequence[str] = ("resid", "heads", "mlp")) -> dict[str, list[tuple[str, By]]]:
    """kind -> [(site, grouping)] per layer: resid_post.{L} by position, heads.{L} by head, mlp_out.{L} once."""
    L = n_layers(model)
    table = {"resid": [(f"resid_post.{i}", "position") for i in range(L)],
             "heads": [(f"heads.{i}", "head") for i in range(L)],
             "mlp": [(f"mlp_out.{i}", "all") for i in range(L)]}
    unknown = [w for w in what if w not in table]
    if unknown:
        raise ValueError(f"unknown patching kinds {unknown}; known: {list(table)}")
    for w in what:
        for s, _ in table[w]:
            resolve_site(model, s)  # fail before any forward pass
    return {w: table[w] for w in what}


def keep_pairs(clean: torch.Tensor, corrupt: torch.Tensor, min_gap: float) -> list[int]:
    """Indices of pairs with |clean - corrupted| >= min_gap; raises when none is left."""
    gap = (clean - corrupt).abs()
    keep = [i for i in range(len(gap)) if float(gap[i]) >= min_gap]
    if not keep:
        raise ValueError(f"every one of the {len(gap)} pairs has |clean - corrupted| < {min_gap} "
                         f"(largest gap {float(gap.max()):.3g}): nothing to normalise against")
    return keep


def _sweep(model: nn.Module, pb: PairBatch, what: Sequence[str], metric: Metric, min_gap: float,
           estimate) -> dict:
    """Shared body of exact and attribution patching: baselines, dropping, normalising, result dict."""
    sites = standard_sites(model, what)
    clean_m, corr_m = baseline_metrics(model, pb, metric)
    keep = keep_pairs(clean_m, corr_m, min_gap)
    sub = pb.select(keep)
    c, k = clean_m[keep], corr_m[keep]
    gap = (c - k)[:, None]  # (N, 1)
    deltas = estimate(sub, sites, k)  # site -> (N, J) patched - corrupted
    T = pb.length
    result = {"metric": metric, "min_gap": min_gap, "n_pairs": pb.n, "n_dropped": pb.n - len(keep), "kept": keep,
              "clean": c.tolist(), "corrupt": k.tolist(), "positions": list(range(-T, 0))}
    for kind, entries in sites.items():
        delta = torch.stack([deltas[s] for s, _ in entries], dim=1)  # (N, L, J) patched - corrupted
        if kind == "mlp":
            delta = delta[..., 0]  # (N, L)
        g = gap.view(-1, *([1] * (delta.dim() - 1))).double().numpy()  # (N, 1, ...)
        d = delta.double().numpy()
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero gap (min_gap=0) gives inf/NaN ratios
            per_pair = d / g
        result[kind] = {"sites": [s for s, _ in entries], "scores": weighted_scores(d, g),
                        "median": _nanmedian(per_pair), "per_pair": per_pair}
    result["aggregate"] = "gap-weighted mean: sum_i sign(gap_i)(patched_i - corrupted_i) / sum_i |gap_i|"
    return result


def weighted_scores(delta: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """The gap-weighted mean over pairs (axis 0) of the per-pair scores delta / gap: sum sign(gap)
    delta / sum |gap| over the pairs where delta is not NaN (NaN where no pair is)."""
    ok = ~np.isnan(delta)
    num = np.where(ok, np.sign(gap) * np.nan_to_num(delta), 0.0).sum(0)
    den = np.where(ok, np.abs(gap), 0.0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok.any(0), num / np.where(den > 0, den, 1.0), np.nan)


def _nanmedian(x: np.ndarray) -> np.ndarray:
    out = np.full(x.shape[1:], np.nan)
    ok = ~np.isnan(x).all(0)
    out[ok] = np.nanmedian(x[:, ok], axis=0)
    return out


def activation_patching(model: nn.Module, pb: PairBatch, *, what: Sequence[str] = ("resid", "heads", "mlp"),
                        metric: Metric = "logit_diff", min_gap: float = 1e-3, max_rows: int = 256) -> dict:
    """Exact clean -> corrupted patching for every layer: resid (L, T), heads (L, H), mlp (L,).

    `result[kind]["scores"]` are means over kept pairs of normalised scores (1 = clean, 0 = corrupted),
    `["per_pair"]` the (N_kept, ...) per-pair scores; `positions` label the resid columns (from the end).
    """
    def exact(sub, sites, k):
        names = [s for entries in sites.values() for s, _ in entries]
        _, clean = run_with_cache(model, sub.clean, names)
        out = {}
        for entries in sites.values():
            for s, by in entries:
                out[s] = patch_site(model, sub, s, by, metric=metric, clean_act=clean[s], max_rows=max_rows) - k[:, None]
                if by == "position":
                    out[s] = out[s].masked_fill(~sub.aligned, float("nan"))
        return out

    with evaluating(model):
        result = _sweep(model, pb, what, metric, min_gap, exact)
    result["method"] = "exact"
    return result


def attribution_patching(model: nn.Module, pb: PairBatch, *, what: Sequence[str] = ("resid", "heads", "mlp"),
                         metric: Metric = "logit_diff", min_gap: float = 1e-3) -> dict:
    """`activation_patching`'s result, estimated from one forward + backward (see `attribute_sites`)."""
    def approx(sub, sites, k):
        return attribute_sites(model, sub, {s: by for entries in sites.values() for s, by in entries}, metric=metric)

    with evaluating(model):
        result = _sweep(model, pb, what, metric, min_gap, approx)
    result["method"] = "attribution"
    return result


def to_jsonable(obj):
    """Arrays and tensors to nested lists (NaN -> None), recursively through dicts and lists."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    return obj
