"""Paired SAEs, the published model-diffing method (Marks et al. 2023, "Interpreting Learned Feedback Patterns in
LLMs", arXiv 2310.08164): an SAE per model on the same site (the MLP output of the most divergent layers) and the
same texts, compared by their dictionaries.

    max cosine   for feature i of dictionary A: max_j cos(a_i, b_j) over the features j of B (decoder rows)
    MMCS(A→B)    the mean of that over A's features: 1 when every A feature has an exact counterpart in B
    unmatched    A's features whose max cosine is below `threshold` (default 0.7): directions A has and B lacks

Only features that fire on the held-out tokens ("alive") take part on either side: a dead feature's direction is
whatever its initialisation left. MMCS is not symmetric, so both directions are reported. A second SAE on the
base model with another seed gives the scale: the MMCS two SAEs of one model reach by chance of training.

The SAEs are SAELens SAEs trained by `mechrl.analysis.sae.train_sae` and saved in SAELens's format.

    res = paired_saes({"base": base, "policy": policy}, tok, train_texts, held_texts, layers=[3, 2],
                      spec=SAESpec(site="", architecture="topk", expansion=8, k=8, steps=1000), out_dir=out)
    res["layers"]["3"]["mmcs"]["policy->base"]
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from mechrl.analysis.cache import extract_activations
from mechrl.analysis.sae import SAESpec, encode, load_sae, sae_metrics, save_sae, train_sae

log = logging.getLogger(__name__)


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    """(F, D) -> (F, D) rows scaled to unit norm; a zero row is an error (it has no direction)."""
    assert w.dim() == 2, f"a dictionary is (F, D), got {tuple(w.shape)}"
    n = w.double().norm(dim=-1, keepdim=True)
    if (n == 0).any():
        raise ValueError(f"dictionary rows {(n[:, 0] == 0).nonzero().flatten().tolist()[:10]} are zero")
    return w.double() / n


def max_cosine(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of a (F_a, D): the largest cosine with any row of b (F_b, D), and that row's index."""
    assert a.shape[-1] == b.shape[-1], f"dictionaries of width {a.shape[-1]} and {b.shape[-1]} cannot be compared"
    if len(b) == 0:
        raise ValueError("max_cosine: the second dictionary has no rows")
    sims = unit_rows(a) @ unit_rows(b).T  # (F_a, F_b)
    return sims.max(-1)


def mmcs(a: torch.Tensor, b: torch.Tensor, *, alive_a: torch.Tensor | None = None, alive_b: torch.Tensor | None = None,
         threshold: float = 0.7) -> dict:
    """Mean max cosine similarity of dictionary a's rows against b's (alive rows only), per-feature values and
    the unmatched features of a (max cosine < `threshold`). Feature indices are a's and b's own."""
    ia = torch.arange(len(a)) if alive_a is None else alive_a.nonzero().flatten()
    ib = torch.arange(len(b)) if alive_b is None else alive_b.nonzero().flatten()
    if len(ia) == 0 or len(ib) == 0:
        raise ValueError(f"mmcs: no alive features ({len(ia)} in A, {len(ib)} in B)")
    vals, idx = max_cosine(a[ia], b[ib])
    per = {int(i): float(v) for i, v in zip(ia.tolist(), vals.tolist())}
    return {"mmcs": float(vals.mean()), "n_alive_a": len(ia), "n_alive_b": len(ib), "threshold": threshold,
            "per_feature": per, "match": {int(i): int(m) for i, m in zip(ia.tolist(), ib[idx].tolist())},
            "unmatched": sorted((f for f, v in per.items() if v < threshold), key=per.get)}  # least matched first


def sae_directions(sae) -> torch.Tensor:
    """(d_sae, d_in) decoder rows of a SAELens SAE."""
    return sae.W_dec.detach().float().cpu()


@torch.no_grad()
def alive_features(sae, x: torch.Tensor) -> torch.Tensor:
    """(d_sae,) bool: the features that fire on at least one row of x (N, D)."""
    return (encode(sae, x.float()) > 0).any(0).cpu()


def paired_saes(models: Mapping[str, nn.Module], tokenizer, train_texts: Sequence[str], held_texts: Sequence[str],
                layers: Sequence[int], spec: SAESpec, out_dir: str | Path, *, reference: str = "base",
                site_kind: str = "mlp_out", seed_control: bool = True, threshold: float = 0.7,
                batch_size: int = 32) -> dict:
    """Train an SAE per model (and, with `seed_control`, a second one on `reference` with seed + 1) at
    `{site_kind}.{layer}` for each layer on every token of `train_texts`; measure each on `held_texts`; compare
    every other model's dictionary with the reference's both ways. SAEs already saved under
    `out_dir/<site>/<name>` are loaded instead of retrained (a rerun resumes). JSON-ready result per layer."""
    if reference not in models:
        raise KeyError(f"paired_saes: reference {reference!r} is not among the models {list(models)}")
    out_dir = Path(out_dir)
    result: dict = {"reference": reference, "threshold": threshold, "site_kind": site_kind, "layers": {},
                    "spec": dataclasses.asdict(spec)}
    sites = [f"{site_kind}.{layer}" for layer in layers]
    train_acts = {n: extract_activations(m, tokenizer, train_texts, sites, positions=None, batch_size=batch_size,
                                         progress=False) for n, m in models.items()}
    held_acts = {n: extract_activations(m, tokenizer, held_texts, sites, positions=None, batch_size=batch_size,
                                        progress=False) for n, m in models.items()}
    for layer, site in zip(layers, sites):
        saes, rec = {}, {"site": site, "saes": {}, "mmcs": {}, "unmatched": {}}
        jobs = [(n, n, spec.seed) for n in models]
        if seed_control:
            jobs.append((f"{reference}_seed{spec.seed + 1}", reference, spec.seed + 1))
        for name, model_name, seed in jobs:
            path = out_dir / site / name
            if (path / "mechrl_sae.json").is_file():
                sae, record = load_sae(path)
                metrics = record["metrics"]
            else:
                s = dataclasses.replace(spec, site=site, seed=seed)
                sae = train_sae(train_acts[model_name][site], s)
                metrics = sae_metrics(sae, held_acts[model_name][site])
                save_sae(sae, path, s, metrics)
            log.info("SAE %s %s: fvu %.3f, l0 %.1f, dead %d", site, name, metrics["fvu"], metrics["l0"],
                     metrics["n_dead"])
            saes[name] = (sae, alive_features(sae, held_acts[model_name][site]))
            rec["saes"][name] = {"path": str(path), "model": model_name, "seed": seed, "metrics": metrics}
        ref_sae, ref_alive = saes[reference]
        for name, (sae, alive) in saes.items():
            if name == reference:
                continue
            fwd = mmcs(sae_directions(sae), sae_directions(ref_sae), alive_a=alive, alive_b=ref_alive,
                       threshold=threshold)
            bwd = mmcs(sae_directions(ref_sae), sae_directions(sae), alive_a=ref_alive, alive_b=alive,
                       threshold=threshold)
            rec["mmcs"][f"{name}->{reference}"] = fwd["mmcs"]
            rec["mmcs"][f"{reference}->{name}"] = bwd["mmcs"]
            rec["unmatched"][f"{name}->{reference}"] = fwd["unmatched"]
            rec["unmatched"][f"{reference}->{name}"] = bwd["unmatched"]
            rec.setdefault("per_feature", {})[f"{name}->{reference}"] = fwd["per_feature"]
            rec.setdefault("per_feature", {})[f"{reference}->{name}"] = bwd["per_feature"]
        result["layers"][str(layer)] = rec
    return result


def mmcs_figure(result: Mapping[str, dict]) -> bytes:
    """PNG: per layer, the distribution of per-feature max cosines for each comparison (histograms)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = list(result["layers"])
    fig = Figure(figsize=(4.2 * len(layers), 3.2), dpi=90)
    FigureCanvasAgg(fig)
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(1, len(layers), i + 1)
        rec = result["layers"][layer]
        for c, (pair, per) in enumerate(rec.get("per_feature", {}).items()):
            ax.hist(list(per.values()), bins=30, range=(0, 1), histtype="step", color=f"C{c}",
                    label=f"{pair} (MMCS {rec['mmcs'][pair]:.3f})")
        ax.axvline(result["threshold"], color="black", linewidth=0.8, linestyle="--")
        ax.set_xlabel("max cosine with the other dictionary", fontsize=8)
        ax.set_ylabel("features", fontsize=8)
        ax.set_title(rec["site"], fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
