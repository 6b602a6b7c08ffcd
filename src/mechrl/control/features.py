"""Finding the features of a SARM-form reward model that carry a known bias, and testing them causally.

Evidence per latent i (w: head weights, z: latents at the end token):

    attribution difference   w_i * (mean z_i(chosen) - mean z_i(rejected)) over preference pairs: how much of
                             the preference margin the latent carries
    hack correlation         Pearson correlation of z_i with the ground-truth hack (positive-word count) over
                             corpus texts, and with each hack word's presence
    bias contribution        w_i * (mean z_i | text has the hack) - w_i * (mean z_i | it has not): the reward
                             the latent adds to a hacking text

Selection (`select_features`): latents with w_i > 0 and hack correlation >= `min_corr`, ranked by bias
contribution; with the causal check (default), only those whose clamp to 0 raises the RM's accuracy on
probe pairs where bias and quality disagree; the first `max_features`. Each gets a threshold tau_i, the `tau_quantile` quantile of z_i on
texts without the hack (so it fires on at most that share of clean texts, and at 0 it means "active").

Then, for the report and `selected_features.json`: each feature's top-activating texts with the words
that drive it marked (occlusion: the drop in its end-token activation when the word is deleted), its
logit-lens tokens (decoder direction through the
trunk's unembedding, when it has one), causal clamping probes (clamp to 0: change in score and in
preference accuracy on held-out pairs) and best-of-N reranking (`best_of_n`).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from pydantic import Field

from mechrl.config import Strict
from mechrl.control.sarm import SAEReward
from mechrl.tasks.stories.preferences import GroundTruth, preference_accuracies

__all__ = ["SelectionConfig", "feature_evidence", "select_features", "top_activating", "logit_lens",
           "clamp_probe", "best_of_n", "pick_best"]


class SelectionConfig(Strict):
    min_corr: float = Field(0.3, ge=-1, le=1)
    max_features: int = Field(3, ge=1)
    causal_check: bool = True
    """Keep only candidates whose clamp to 0 makes the RM agree more with true quality on the probe pairs
    where the bias and quality disagree (the causal probe of the seeds' phase 2)."""
    max_candidates: int = Field(8, ge=1)
    """Candidates (by bias contribution) the causal check probes."""
    tau_quantile: float = Field(0.9, ge=0, le=1)
    n_kl_features: int = Field(32, ge=1)
    """Latents the density-ratio KL compares: the selected ones, then the largest by |w_i| x mean z_i."""


def _corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column of x (n, m) with y (n,); 0 where a column or y is constant."""
    xc, yc = x - x.mean(0), y - y.mean()
    den = np.sqrt((xc ** 2).sum(0) * (yc ** 2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc[:, None]).sum(0) / den
    return np.where(den > 0, r, 0.0)


def feature_evidence(sarm: SAEReward, pairs: Sequence[dict], corpus: tuple[Sequence[str], Sequence[str]],
                     truth: GroundTruth) -> dict[str, np.ndarray]:
    """Per-latent evidence arrays (each (d_sae,)): head weight, attribution difference on `pairs`, hack
    correlation, per-word correlations, firing rates and mean activations with / without the hack, bias
    contribution, mean attribution; plus the corpus latents `z` (n, d_sae) and hack counts."""
    P = [p["prompt"] for p in pairs]
    zc = sarm.latents(P, [p["chosen"] for p in pairs]).cpu().numpy()
    zr = sarm.latents(P, [p["rejected"] for p in pairs]).cpu().numpy()
    w = sarm.head.cpu().numpy()
    prompts, texts = list(corpus[0]), list(corpus[1])
    z = sarm.latents(prompts, texts).cpu().numpy()  # (n, d_sae)
    hack = np.array(truth.hack_counts(texts), dtype=np.float64)  # (n,)
    has = hack > 0
    if has.all() or (~has).all():
        raise ValueError("feature_evidence: the corpus needs texts with and without the hack")
    words = {wd: _corr(z, np.array(v, dtype=np.float64)) for wd, v in truth.word_hits(texts).items()}
    mean_h, mean_c = z[has].mean(0), z[~has].mean(0)
    return {
        "head_weight": w, "attr_diff": w * (zc.mean(0) - zr.mean(0)), "hack_corr": _corr(z, hack),
        "word_corr": words, "fire_hack": (z[has] > 0).mean(0), "fire_clean": (z[~has] > 0).mean(0),
        "mean_hack": mean_h, "mean_clean": mean_c, "bias_contribution": w * (mean_h - mean_c),
        "mean_attribution": w * z.mean(0), "z": z, "hack": hack,
    }


def _rank(values: np.ndarray) -> np.ndarray:
    """1-based rank of each entry when sorted descending (rank 1 = largest)."""
    order = np.argsort(-values, kind="stable")
    ranks = np.empty(len(values), dtype=int)
    ranks[order] = np.arange(1, len(values) + 1)
    return ranks


def select_features(ev: dict, cfg: SelectionConfig, probe: Callable[[int], float] | None = None) -> dict:
    """The selected latents with their thresholds and evidence, and the latents the KL term compares.

    Candidates: w_i > 0 and hack correlation >= `min_corr`, ordered by bias contribution. With
    `causal_check`, `probe(i)` (the gain in conflict-pair accuracy when latent i is clamped to 0) is measured
    for the first `max_candidates`, and only those with a positive gain are kept."""
    w, corr, contrib = ev["head_weight"], ev["hack_corr"], ev["bias_contribution"]
    cand = np.nonzero((w > 0) & (corr >= cfg.min_corr))[0]
    ordered = cand[np.argsort(-contrib[cand], kind="stable")].tolist()
    probed = []
    if cfg.causal_check:
        if probe is None:
            raise ValueError("select_features: causal_check needs a probe function")
        for i in ordered[:cfg.max_candidates]:
            gain = float(probe(i))
            probed.append({"index": int(i), "conflict_accuracy_gain": gain, "kept": gain > 0})
        ordered = [p["index"] for p in probed if p["kept"]]
    chosen = ordered[:cfg.max_features]
    z, clean = ev["z"], ev["hack"] == 0
    rank_attr, rank_corr, rank_contrib = _rank(ev["attr_diff"]), _rank(corr), _rank(contrib)
    feats = []
    for i in chosen:
        tau = float(max(0.0, np.quantile(z[clean, i], cfg.tau_quantile)))
        feats.append({
            "index": int(i), "tau": tau, "head_weight": float(w[i]), "hack_corr": float(corr[i]),
            "word_corr": {k: float(v[i]) for k, v in ev["word_corr"].items()},
            "bias_contribution": float(contrib[i]), "attr_diff": float(ev["attr_diff"][i]),
            "fire_rate_hack": float(ev["fire_hack"][i]), "fire_rate_clean": float(ev["fire_clean"][i]),
            "above_tau_hack": float((z[~clean, i] > tau).mean()), "above_tau_clean": float((z[clean, i] > tau).mean()),
            "rank_attr_diff": int(rank_attr[i]), "rank_hack_corr": int(rank_corr[i]),
            "rank_bias_contribution": int(rank_contrib[i]),
        })
    importance = np.abs(ev["mean_attribution"])
    rest = [int(i) for i in np.argsort(-importance, kind="stable") if i not in chosen and importance[i] > 0]
    kl = (chosen + rest)[:cfg.n_kl_features]
    top = lambda v, n=10: [{"index": int(i), "value": float(v[i])} for i in np.argsort(-v, kind="stable")[:n]]  # noqa: E731
    return {"features": feats, "kl_indices": kl, "criteria": cfg.model_dump(mode="json"),
            "n_candidates": int(len(cand)), "causal_check": probed, "top_by_attr_diff": top(ev["attr_diff"]),
            "top_by_hack_corr": top(corr), "top_by_bias_contribution": top(contrib)}


@torch.no_grad()
def top_activating(sarm: SAEReward, feature: int, prompts: Sequence[str], texts: Sequence[str], *, n: int = 5,
                   mark_fraction: float = 0.5) -> list[dict]:
    """The `n` texts with the largest end-token activation of `feature`, with the completion's words marked
    `[[word]]` where deleting that word lowers the activation by at least `mark_fraction` of the largest drop
    (occlusion: the SAE reads the last token only, so a word's share is measured by removing it)."""
    feature = sarm.check_index(feature)
    z = sarm.latents(list(prompts), list(texts))[:, feature].cpu()
    out = []
    for j in torch.argsort(z, descending=True)[:n].tolist():
        words = texts[j].split(" ")  # words and punctuation (a completion's leading space gives a first "")
        ks = [k for k, w in enumerate(words) if w]
        variants = [" ".join(words[:k] + words[k + 1:]) for k in ks]
        drops = dict(zip(ks, (z[j] - sarm.latents([prompts[j]] * len(variants), variants)[:, feature].cpu()).tolist()))
        top_drop = max(drops.values(), default=0.0)
        marked = [f"[[{w}]]" if top_drop > 0 and drops.get(k, 0.0) >= mark_fraction * top_drop else w
                  for k, w in enumerate(words)]
        out.append({"text_index": j, "activation": float(z[j]), "prompt": prompts[j], "completion": texts[j],
                    "marked": " ".join(marked), "word_drops": {words[k]: round(d, 4) for k, d in drops.items()}})
    return out


def _unembedding(trunk) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(W_U (V, D), final norm weight (D,) or None) of the trunk; W_U None when it has none."""
    out = trunk.get_output_embeddings() if hasattr(trunk, "get_output_embeddings") else None
    W = out.weight if out is not None else None
    if W is None and getattr(trunk.config, "tie_word_embeddings", False) and hasattr(trunk, "get_input_embeddings"):
        W = trunk.get_input_embeddings().weight
    norm = None
    for path in ("model.norm.weight", "transformer.ln_f.weight"):
        obj = trunk
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            norm = obj
            break
        except AttributeError:
            continue
    return W, norm


@torch.no_grad()
def logit_lens(sarm: SAEReward, feature: int, k: int = 10) -> list[str] | None:
    """The `k` tokens whose unembedding aligns most with the feature's decoder direction (through the final
    norm's scale); None when the trunk has no unembedding (a cut or untied model)."""
    feature = sarm.check_index(feature)
    W, norm = _unembedding(sarm.trunk)
    if W is None:
        return None
    d = sarm.W_dec[feature].float().to(W.device)  # (D,)
    if norm is not None:
        d = d * norm.float()
    logits = W.float() @ d  # (V,)
    ids = torch.topk(logits, k).indices.tolist()
    return sarm.tokenizer.convert_ids_to_tokens(ids)


def clamp_probe(sarm: SAEReward, held_out: Sequence[dict], truth: GroundTruth, *,
                set: dict[int, float] | None = None, scale: dict[int, float] | None = None) -> dict:
    """Preference accuracies on `held_out` pairs and mean scores, without and with the clamp."""
    P = [p["prompt"] for p in held_out]
    C, R = [p["chosen"] for p in held_out], [p["rejected"] for p in held_out]

    def measure() -> dict:
        sc, sr = sarm.score(P, C), sarm.score(P, R)
        acc = preference_accuracies(held_out, sc.tolist(), sr.tolist(), truth)
        return {"accuracy": acc, "mean_score": float(torch.cat([sc, sr]).mean())}

    before = measure()
    with sarm.clamp(set=set, scale=scale):
        after = measure()
    return {"set": {str(k): v for k, v in (set or {}).items()}, "scale": {str(k): v for k, v in (scale or {}).items()},
            "before": before, "after": after, "score_change": after["mean_score"] - before["mean_score"]}


def pick_best(scores: Sequence[Sequence[float]]) -> list[int]:
    """Per prompt, the index of the highest-scoring candidate (the first on ties)."""
    out = []
    for i, s in enumerate(scores):
        if len(s) == 0:
            raise ValueError(f"pick_best: prompt {i} has no candidates")
        if any(not math.isfinite(float(v)) for v in s):
            raise ValueError(f"pick_best: prompt {i} has a non-finite score")
        out.append(max(range(len(s)), key=lambda j: (float(s[j]), -j)))
    return out


def best_of_n(prompts: Sequence[str], candidates: Sequence[Sequence[str]],
              scorer: Callable[[list[str], list[str]], Sequence[float]]) -> list[str]:
    """For each prompt, the candidate completion with the highest `scorer(prompts, completions)` score."""
    if len(prompts) != len(candidates):
        raise ValueError(f"best_of_n: {len(prompts)} prompts, {len(candidates)} candidate lists")
    flat_p = [p for p, cs in zip(prompts, candidates) for _ in cs]
    flat_c = [c for cs in candidates for c in cs]
    s = list(scorer(flat_p, flat_c))
    if len(s) != len(flat_c):
        raise ValueError(f"best_of_n: the scorer returned {len(s)} scores for {len(flat_c)} completions")
    scores, k = [], 0
    for cs in candidates:
        scores.append([float(v) for v in s[k:k + len(cs)]])
        k += len(cs)
    return [cs[j] for cs, j in zip(candidates, pick_best(scores))]
