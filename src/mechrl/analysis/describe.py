"""Offline descriptions of dictionary latents (SAE features or crosscoder latents): what a latent fires on, what it
writes, a cheap explanation and how good that explanation is.

Everything works on a latent's activations over the token rows of a corpus (`TokenCorpus`: the texts, and for each
activation row its text, position and token, as `extract_activations(positions=None)` produces them), with the
texts split into a describing part and a held-out part:

    contexts      the top-activating tokens (one per text), each with a window of its text; active tokens are
                  marked [tok], the top one [[tok]]
    histogram     of the non-zero activations (and how many rows are zero)
    lens          the decoder direction through the unembedding (final-norm gain applied): the tokens it promotes
                  most and least (direct logit effect, no further layers)
    explanation   token lookup: the `n_tokens` tokens with the highest mean activation on the describing texts (a token
                  must occur `min_count` times); its prediction for a row is that token's mean activation, 0 for any
                  other token
    score         Pearson correlation of the explanation's prediction with the real activation over the held-out
                  texts' rows (1: the latent is exactly a token detector; 0: the tokens say nothing). Undefined
                  (None, with the reason) when either side is constant on the held-out rows
    reward        how often the latent fires (on any token of a text) on the high-reward texts (top quantile of the
                  texts' rewards) and on the low-reward ones (bottom quantile)

An LLM description through an OpenAI-compatible endpoint (optional) lives in `llm_describe.py` and is scored
the same way.

    corpus = TokenCorpus.build(tok, texts, acts["_example"], acts["_position"], rewards=r)
    desc = describe_latents(codes, corpus, [12, 40], model=policy, directions=W_dec, tokenizer=tok)
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mechrl.analysis.arch import final_norm
from mechrl.analysis.hooks import unwrap


@dataclass(frozen=True)
class DescribeSpec:
    n_contexts: int = 6
    before: int = 8
    """tokens shown before the activating token"""
    after: int = 3
    n_lens: int = 10
    n_tokens: int = 5
    """tokens in the token-lookup explanation"""
    min_count: int = 3
    bins: int = 20
    reward_quantile: float = 0.25

    def __post_init__(self):
        if not 0 < self.reward_quantile <= 0.5:
            raise ValueError(f"DescribeSpec.reward_quantile must be in (0, 0.5], got {self.reward_quantile}")
        for name in ("n_contexts", "n_lens", "n_tokens", "min_count", "bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"DescribeSpec.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TokenCorpus:
    """The token rows of `texts` (row i is token `position[i]` of text `example[i]`), split by text into
    describing and held-out texts, with optional per-text rewards."""

    texts: list[str]
    tokens: list[list[str]]  # per text, its tokens as strings
    example: torch.Tensor  # (N,) long
    position: torch.Tensor  # (N,) long
    input_ids: torch.Tensor  # (N,) long
    held_out: torch.Tensor  # (n_texts,) bool
    rewards: torch.Tensor | None = None  # (n_texts,) float64
    offsets: torch.Tensor | None = None  # (n_texts,) the row of each text's first token

    @classmethod
    def build(cls, tokenizer, texts: Sequence[str], example: torch.Tensor, position: torch.Tensor, *,
              held_out: torch.Tensor | None = None, held_out_fraction: float = 0.2, seed: int = 0,
              rewards: Sequence[float] | torch.Tensor | None = None) -> "TokenCorpus":
        """Rows must come text by text, positions 0.. in order (as `extract_activations(positions=None)` writes)."""
        texts = list(texts)
        enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
        lengths = torch.tensor([len(e) for e in enc])
        want_ex = torch.repeat_interleave(torch.arange(len(texts)), lengths)
        want_pos = torch.cat([torch.arange(n) for n in lengths.tolist()])
        if not (torch.equal(example.long(), want_ex) and torch.equal(position.long(), want_pos)):
            raise ValueError("TokenCorpus: rows are not every token of every text in order (text by text, "
                             "positions from 0); pass extract_activations(positions=None)'s _example and _position")
        vocab: dict[int, str] = {}
        tokens = [[vocab.setdefault(i, tokenizer.decode([i])) for i in e] for e in enc]
        if held_out is None:
            g = torch.Generator().manual_seed(seed)
            held_out = torch.zeros(len(texts), dtype=torch.bool)
            n_held = max(1, int(round(held_out_fraction * len(texts))))
            held_out[torch.randperm(len(texts), generator=g)[:n_held]] = True
        assert held_out.shape == (len(texts),) and held_out.dtype == torch.bool, "held_out must be (n_texts,) bool"
        r = None
        if rewards is not None:
            r = torch.as_tensor(rewards, dtype=torch.float64)
            if r.shape != (len(texts),) or not torch.isfinite(r).all():
                raise ValueError(f"TokenCorpus: rewards must be {len(texts)} finite numbers, got shape {tuple(r.shape)}")
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        ids = torch.tensor([i for e in enc for i in e], dtype=torch.long)
        return cls(texts, tokens, example.long(), position.long(), ids, held_out, r, offsets)

    def held_rows(self) -> torch.Tensor:
        """(N,) bool: rows of held-out texts."""
        return self.held_out[self.example]


# ------------------------------------------------------------------------------------------------ parts

def top_contexts(acts: torch.Tensor, corpus: TokenCorpus, spec: DescribeSpec = DescribeSpec()) -> list[dict]:
    """The top-activating rows, at most one per text, each with its marked context window."""
    order = torch.argsort(acts, descending=True, stable=True)
    out, seen = [], set()
    for i in order.tolist():
        a = float(acts[i])
        if a <= 0 or len(out) >= spec.n_contexts:
            break
        t = int(corpus.example[i])
        if t in seen:
            continue
        seen.add(t)
        p = int(corpus.position[i])
        toks = corpus.tokens[t]
        lo, hi = max(0, p - spec.before), min(len(toks), p + spec.after + 1)
        base = int(corpus.offsets[t])
        parts = []
        for q in range(lo, hi):
            tok = toks[q]
            if q == p:
                parts.append(f"[[{tok}]]")
            elif float(acts[base + q]) > 0:
                parts.append(f"[{tok}]")
            else:
                parts.append(tok)
        out.append({"text": t, "position": p, "activation": a, "token": toks[p],
                    "next_token": toks[p + 1] if p + 1 < len(toks) else None, "context": "".join(parts)})
    return out


def histogram(acts: torch.Tensor, bins: int = 20) -> dict:
    """Counts of the non-zero activations in `bins` equal bins, and the number of zero rows."""
    nz = acts[acts != 0].double()
    if len(nz) == 0:
        return {"edges": [], "counts": [], "n_zero": int(len(acts)), "n_nonzero": 0}
    lo, hi = float(nz.min()), float(nz.max())
    hi = hi if hi > lo else lo + 1e-6
    counts = torch.histc(nz, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "n_zero": int((acts == 0).sum()),
            "n_nonzero": int(len(nz))}


@torch.no_grad()
def lens_logits(model: nn.Module, direction: torch.Tensor) -> torch.Tensor:
    """(V,) the unembedding of `direction` (D,) after the final norm's gain (and centring, for a LayerNorm)."""
    norm = final_norm(model)
    d = direction.detach().double().cpu()
    if isinstance(norm, nn.LayerNorm):
        d = d - d.mean()
    w = getattr(norm, "weight", None)
    if w is not None:
        d = d * w.detach().double().cpu()
    head = unwrap(model).get_output_embeddings().weight.detach().double().cpu()  # (V, D)
    return head @ d


def lens_tokens(model: nn.Module, direction: torch.Tensor, tokenizer, n: int = 10,
                allowed_ids: torch.Tensor | None = None) -> dict:
    """The `n` tokens the direction promotes most ("top") and least ("bottom"), among `allowed_ids` (default all)."""
    logits = lens_logits(model, direction)
    ids = torch.arange(len(logits)) if allowed_ids is None else torch.as_tensor(allowed_ids).long().unique()
    vals = logits[ids]
    n = min(n, len(ids))
    top = vals.topk(n)
    bot = (-vals).topk(n)
    fmt = lambda v, i: [{"token": tokenizer.decode([int(ids[j])]), "logit": float(x)} for x, j in zip(v.tolist(), i.tolist())]  # noqa: E731
    return {"top": fmt(top.values, top.indices), "bottom": fmt(-bot.values, bot.indices)}


def pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson correlation of two (N,) vectors; None when either is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = x.norm() * y.norm()
    return None if den == 0 else float((x * y).sum() / den)


def token_lookup(acts: torch.Tensor, corpus: TokenCorpus, spec: DescribeSpec = DescribeSpec()) -> dict:
    """The token-lookup explanation fitted on the describing texts and its score on the held-out texts."""
    held = corpus.held_rows()
    fit, ids = acts[~held].double(), corpus.input_ids[~held]
    V = int(corpus.input_ids.max()) + 1
    count = torch.bincount(ids, minlength=V).double()
    total = torch.zeros(V, dtype=torch.float64).index_add_(0, ids, fit)
    mean = torch.where(count >= spec.min_count, total / count.clamp(min=1), torch.zeros_like(total))
    top = mean.topk(min(spec.n_tokens, V))
    keep = [(int(i), float(m)) for i, m in zip(top.indices.tolist(), top.values.tolist()) if m > 0]
    table = torch.zeros(V, dtype=torch.float64)
    for i, m in keep:
        table[i] = m
    pred = table[corpus.input_ids[held]]
    real = acts[held].double()
    score = pearson(pred, real)
    rec = {"tokens": [{"token": _token_str(corpus, i), "id": i, "mean_act": m, "count": int(count[i])} for i, m in keep],
           "score": score, "n_held_rows": int(held.sum())}
    if score is None:
        rec["undefined"] = ("the latent never fires on the held-out texts" if float(real.abs().sum()) == 0 else
                            "no explanation token occurs in the held-out texts (or none was found)")
    return rec


def _token_str(corpus: TokenCorpus, token_id: int) -> str:
    row = int((corpus.input_ids == token_id).nonzero()[0, 0])
    return corpus.tokens[int(corpus.example[row])][int(corpus.position[row])]


def reward_firing(acts: torch.Tensor, corpus: TokenCorpus, quantile: float = 0.25) -> dict | None:
    """Fraction of high-reward texts (reward >= the upper quantile) and low-reward texts (<= the lower quantile)
    on which the latent fires at least once; None without rewards."""
    if corpus.rewards is None:
        return None
    r = corpus.rewards
    hi_t, lo_t = float(torch.quantile(r, 1 - quantile)), float(torch.quantile(r, quantile))
    fires = torch.zeros(len(corpus.texts), dtype=torch.bool)
    fires[corpus.example[acts > 0]] = True
    high, low = r >= hi_t, r <= lo_t
    return {"high": float(fires[high].double().mean()), "low": float(fires[low].double().mean()),
            "n_high": int(high.sum()), "n_low": int(low.sum()), "high_threshold": hi_t, "low_threshold": lo_t,
            "quantile": quantile}


def describe_latents(codes: torch.Tensor, corpus: TokenCorpus, latents: Sequence[int], *, model: nn.Module | None = None,
                     directions: torch.Tensor | None = None, tokenizer=None, allowed_ids: torch.Tensor | None = None,
                     spec: DescribeSpec = DescribeSpec()) -> list[dict]:
    """One description per latent (see the module docstring). `codes` (N, H) over the corpus rows; `directions`
    (H, D) decoder rows for the logit lens of `model` (skipped when either is None)."""
    assert codes.dim() == 2 and codes.shape[0] == len(corpus.example), \
        f"codes {tuple(codes.shape)} do not match the corpus's {len(corpus.example)} rows"
    out = []
    for j in latents:
        if not 0 <= j < codes.shape[1]:
            raise IndexError(f"describe_latents: latent {j} out of range [0, {codes.shape[1]})")
        a = codes[:, j].float()
        rec = {"latent": int(j), "freq": float((a > 0).double().mean()), "max_act": float(a.max()),
               "contexts": top_contexts(a, corpus, spec), "histogram": histogram(a, spec.bins),
               "explanation": token_lookup(a, corpus, spec), "reward": reward_firing(a, corpus, spec.reward_quantile)}
        if model is not None and directions is not None:
            if tokenizer is None:
                raise ValueError("describe_latents: the logit lens needs the tokenizer")
            rec["lens"] = lens_tokens(model, directions[j], tokenizer, spec.n_lens, allowed_ids)
        out.append(rec)
    return out


def histograms_figure(descriptions: Sequence[dict], title: str = "") -> bytes:
    """Small multiples: each latent's histogram of non-zero activations."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(1, len(descriptions))
    cols = min(5, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.6 * cols, 2.0 * rows), dpi=90)
    FigureCanvasAgg(fig)
    for i, d in enumerate(descriptions):
        ax = fig.add_subplot(rows, cols, i + 1)
        h = d["histogram"]
        if h["counts"]:
            e = h["edges"]
            ax.bar(e[:-1], h["counts"], width=[b - a for a, b in zip(e[:-1], e[1:])], align="edge", color="C0")
        ax.set_title(f"latent {d['latent']} ({h['n_nonzero']} active)", fontsize=7)
        ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def spec_dict(spec: DescribeSpec) -> dict:
    return asdict(spec)
