"""How far two checkpoints of one architecture are apart, layer by layer: in their weights and in their activations.

Parameter divergence (`parameter_divergence`), per block L and per part of it:

    abs  = || θ_other - θ_base ||₂            (Frobenius norm over every tensor of the part, flattened together)
    rel  = abs / || θ_base ||₂
    parts: block (everything under the block, norms included), attn (the attention module), mlp (the MLP module)

plus the tensors outside the blocks (embeddings, final norm, unembedding) as one `outside` group.

Activation divergence (`activation_divergence`), on the same texts through both models (every real token), per
layer and site (`resid_post.L`, `mlp_out.L`; rows are tokens, a = base, b = other):

    cka          linear CKA of the (N, D) token matrices (Kornblith et al. 2019): ||A_cᵀB_c||²_F / (||A_cᵀA_c||_F ||B_cᵀB_c||_F)
                 with column-centred A_c, B_c. 1 for identical representations and under any orthogonal map
                 (and isotropic scaling) of one of them; near 0 for unrelated ones.
    diff_norm    mean over tokens of ||b - a||
    rel_diff     diff_norm / mean over tokens of ||a||
    cosine       mean over tokens of cos(a, b)

and through the logit lens (each model's own final norm and unembedding applied to its `resid_post.L`):

    lens_kl      mean over tokens of KL(p_base,L || p_other,L) in nats (at the last layer: the models' real
                 next-token distributions)

`top_divergent_layers` ranks layers by one of these (default: relative parameter change of the whole block, the
published method's criterion); `divergence_figure` draws them all.

    div = divergence(base, policy, tok, texts)
    top_divergent_layers(div, k=2)      # e.g. [3, 2]
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import torch
from torch import nn

from mechrl.analysis.cache import extract_activations
from mechrl.analysis.arch import block_parts, final_norm, n_layers, unwrap

log = logging.getLogger(__name__)

PARTS = ("block", "attn", "mlp")
#: Measures `top_divergent_layers` can rank by.
RANK_BY = ("param_block_rel", "param_attn_rel", "param_mlp_rel", "param_block_abs", "lens_kl",
           "resid_rel_diff", "mlp_rel_diff", "resid_cka", "mlp_cka")


def _check_same_shape(base: nn.Module, other: nn.Module) -> tuple[dict, dict]:
    pa = dict(unwrap(base).named_parameters())
    pb = dict(unwrap(other).named_parameters())
    if set(pa) != set(pb):
        diff = sorted(set(pa) ^ set(pb))[:5]
        raise ValueError(f"divergence: the two models have different parameters (e.g. {diff}); diff checkpoints of "
                         "one architecture")
    bad = [n for n in pa if pa[n].shape != pb[n].shape]
    if bad:
        raise ValueError(f"divergence: parameter shapes differ at {bad[:5]}")
    return pa, pb


# ------------------------------------------------------------------------------------------- parameters

@torch.no_grad()
def parameter_divergence(base: nn.Module, other: nn.Module) -> dict:
    """Per layer and part (block / attn / mlp): absolute and relative norm of the weight difference (see the
    module docstring); `outside` holds the tensors outside the blocks. Tied tensors count once."""
    pa, pb = _check_same_shape(base, other)
    parts = block_parts(base)  # every architecture mechrl knows (`analysis.arch`), or a user site map
    prefix = parts["blocks"] + "."
    L = n_layers(base)
    sq_diff = {(layer, part): 0.0 for layer in range(L) for part in PARTS}
    sq_base = dict.fromkeys(sq_diff, 0.0)
    out_diff = out_base = 0.0
    n_params = dict.fromkeys(sq_diff, 0)
    for name, a in pa.items():
        b = pb[name]
        d2 = float((b.double() - a.double()).pow(2).sum())
        a2 = float(a.double().pow(2).sum())
        if name.startswith(prefix):
            layer, rest = name[len(prefix):].split(".", 1)
            layer = int(layer)
            keys = [(layer, "block")]
            if rest.startswith(parts["attn"] + "."):
                keys.append((layer, "attn"))
            elif rest.startswith(parts["mlp"] + "."):
                keys.append((layer, "mlp"))
            for k in keys:
                sq_diff[k] += d2
                sq_base[k] += a2
                n_params[k] += a.numel()
        else:
            out_diff += d2
            out_base += a2
    layers = []
    for layer in range(L):
        rec = {"layer": layer}
        for part in PARTS:
            if n_params[(layer, part)] == 0:
                raise RuntimeError(f"divergence: no parameters found for layer {layer}'s {part} "
                                   f"(looked under {prefix}{layer}.{parts.get(part, '')})")
            ab = sq_diff[(layer, part)] ** 0.5
            rec[f"{part}_abs"] = ab
            rec[f"{part}_rel"] = ab / max(sq_base[(layer, part)] ** 0.5, 1e-30)
            rec[f"{part}_n_params"] = n_params[(layer, part)]
        layers.append(rec)
    return {"layers": layers,
            "outside": {"abs": out_diff ** 0.5, "rel": out_diff ** 0.5 / max(out_base ** 0.5, 1e-30)}}


# ------------------------------------------------------------------------------------------ activations

def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA of two (N, D_a), (N, D_b) representations of the same N items (float64 inside)."""
    assert a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[0], \
        f"CKA needs (N, D) matrices over the same rows, got {tuple(a.shape)} and {tuple(b.shape)}"
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    cross = (a.T @ b).pow(2).sum()
    norm = (a.T @ a).norm() * (b.T @ b).norm()
    if norm == 0:
        raise ValueError("CKA is undefined: one representation is constant over the rows")
    return float(cross / norm)


@torch.no_grad()
def logit_lens(model: nn.Module, resid: torch.Tensor) -> torch.Tensor:
    """(N, D) residual-stream rows -> (N, V) log-probabilities through the model's final norm and unembedding."""
    base = unwrap(model)
    head = base.get_output_embeddings()
    dev = head.weight.device
    logits = head(final_norm(model)(resid.to(dev, head.weight.dtype))).float()
    return torch.log_softmax(logits, -1).cpu()


def _kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """(N, V) log-probabilities -> (N,) KL(p || q)."""
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def activation_divergence(base: nn.Module, other: nn.Module, tokenizer, texts: Sequence[str], *,
                          batch_size: int = 32, lens_chunk: int = 2048) -> dict:
    """Per layer: CKA, mean difference norm (absolute and relative) and mean cosine of `resid_post` and `mlp_out`
    activations on every real token of `texts`, and the logit-lens KL (see the module docstring)."""
    _check_same_shape(base, other)
    L = n_layers(base)
    sites = [f"{s}.{layer}" for layer in range(L) for s in ("resid_post", "mlp_out")]
    acts_a = extract_activations(base, tokenizer, texts, sites, positions=None, batch_size=batch_size, progress=False)
    acts_b = extract_activations(other, tokenizer, texts, sites, positions=None, batch_size=batch_size, progress=False)
    assert torch.equal(acts_a["_example"], acts_b["_example"]), "the two models saw different token rows"
    layers = []
    for layer in range(L):
        rec = {"layer": layer}
        for kind, short in (("resid_post", "resid"), ("mlp_out", "mlp")):
            a, b = acts_a[f"{kind}.{layer}"].double(), acts_b[f"{kind}.{layer}"].double()  # (N, D)
            diff = (b - a).norm(dim=-1)  # (N,)
            rec[f"{short}_cka"] = linear_cka(a, b)
            rec[f"{short}_diff_norm"] = float(diff.mean())
            rec[f"{short}_rel_diff"] = float(diff.mean() / a.norm(dim=-1).mean().clamp(min=1e-30))
            rec[f"{short}_cosine"] = float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
        ra, rb = acts_a[f"resid_post.{layer}"], acts_b[f"resid_post.{layer}"]
        kl = torch.cat([_kl_rows(logit_lens(base, ra[i:i + lens_chunk]), logit_lens(other, rb[i:i + lens_chunk]))
                        for i in range(0, len(ra), lens_chunk)])
        rec["lens_kl"] = float(kl.mean())
        layers.append(rec)
    return {"layers": layers, "n_tokens": int(len(acts_a["_example"])), "n_texts": len(texts)}


def divergence(base: nn.Module, other: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 32) -> dict:
    """Parameter and activation divergence, merged per layer: {"layers": [{layer, param_*, resid_*, mlp_*,
    lens_kl}], "outside": ..., "n_tokens", "n_texts"}."""
    p = parameter_divergence(base, other)
    a = activation_divergence(base, other, tokenizer, texts, batch_size=batch_size)
    layers = []
    for pr, ar in zip(p["layers"], a["layers"], strict=True):
        rec = {"layer": pr["layer"]}
        rec.update({f"param_{k}": v for k, v in pr.items() if k != "layer"})
        rec.update({k: v for k, v in ar.items() if k != "layer"})
        layers.append(rec)
    return {"layers": layers, "param_outside": p["outside"], "n_tokens": a["n_tokens"], "n_texts": a["n_texts"]}


def top_divergent_layers(div: dict, k: int, by: str = "param_block_rel") -> list[int]:
    """The `k` layers that diverge most by measure `by` (a CKA ranks lowest-first), most divergent first."""
    if by not in RANK_BY:
        raise ValueError(f"top_divergent_layers: unknown measure {by!r}; choose from {RANK_BY}")
    recs = div["layers"]
    if not 1 <= k <= len(recs):
        raise ValueError(f"top_divergent_layers: k={k} must be in [1, {len(recs)}]")
    if by not in recs[0]:
        raise KeyError(f"top_divergent_layers: {by!r} is not in these records (has {sorted(recs[0])})")
    sign = 1.0 if by.endswith("_cka") else -1.0  # low CKA = divergent
    order = sorted(recs, key=lambda r: (sign * r[by], r["layer"]))
    return [r["layer"] for r in order[:k]]


# ----------------------------------------------------------------------------------------------- figure

def divergence_figure(divs: dict[str, dict], top: dict[str, list[int]] | None = None) -> bytes:
    """One PNG: per-layer relative parameter change (block / attn / MLP), activation CKA and relative difference,
    and logit-lens KL; one colour per pair (`divs`: pair name -> `divergence` result). Top layers are starred."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 3.4), dpi=90)
    FigureCanvasAgg(fig)
    panels = [("relative parameter change", [("param_block_rel", "-"), ("param_attn_rel", "--"),
                                             ("param_mlp_rel", ":")], True),
              ("activation CKA (1 = same)", [("resid_cka", "-"), ("mlp_cka", "--")], False),
              ("relative activation difference", [("resid_rel_diff", "-"), ("mlp_rel_diff", "--")], True),
              ("logit-lens KL (nats)", [("lens_kl", "-")], True)]
    for i, (title, keys, logy) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for c, (pair, div) in enumerate(divs.items()):
            xs = [r["layer"] for r in div["layers"]]
            for key, style in keys:
                ys = [r[key] for r in div["layers"]]
                ax.plot(xs, ys, color=f"C{c}", linestyle=style, marker="o", ms=3, label=f"{pair} {key}")
            for layer in (top or {}).get(pair, []):
                y = next(r[keys[0][0]] for r in div["layers"] if r["layer"] == layer)
                ax.plot([layer], [y], marker="*", ms=11, color=f"C{c}", linestyle="none")
        if logy and all(r[k] > 0 for d in divs.values() for r in d["layers"] for k, _ in keys):
            ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xlabel("layer")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=5)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
