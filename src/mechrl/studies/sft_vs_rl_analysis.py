"""The analysis half of the sft-vs-rl study: probes, patching, ablation and SAEs on each checkpoint, compared.

`analyze(checkpoints, task, what, out, preset)` loads each checkpoint (name -> model folder, e.g.
{"sft": ..., "grpo": ...}) and runs the chosen analyses on the card game:

    probes    ridge (R²) / logistic (accuracy) probes per layer x position (last prompt tokens) for a few
              labels, trained on ID train prompts, scored on ID test and every OOD split
    patching  exact activation patching (resid layer x position, heads layer x head, MLPs) and attribution
              patching on rule pairs (same cards, another rule; logit_diff) and ID -> OOD-colour pairs
              (same hand and rule, OOD colours; logprob of the ID answer token)
    ablation  mean ablation of every head and MLP on ID test and each OOD split: importance heatmaps,
              per-layer profiles, top-k sets and, across checkpoints, their Jaccard overlap
    sae       one TopK SAE per checkpoint on the last block's resid_post: FVU, L0, dead latents, ΔLM loss
              with the SAE spliced in, and the ID-specific vs OOD-stable feature table

Files: `<out>/analysis/<checkpoint name>/<what>.json` and PNGs beside them; comparisons across checkpoints
in `<out>/analysis/compare.json` (+ PNGs). The returned dict holds per-checkpoint results, the comparison,
`headline` numbers (for a study's summary.json) and `sections` (report `Section`s).

Sizes come from a preset: `smoke` (seconds, for tests), `tiny` (the demo: about a minute on 2 cores),
`full` (a closer look).
"""

from __future__ import annotations

import gc
import io
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mechrl.runs.report import Figure, Section, Table
from mechrl.runs.rundir import atomic_write_json

log = logging.getLogger(__name__)

WHATS = ("probes", "patching", "ablation", "sae")


@dataclass(frozen=True)
class AnalysisPreset:
    """How much of each analysis to run."""

    probe_examples: int  # per split (ID pool from train, each OOD split)
    probe_labels: tuple[str, ...]
    probe_positions: tuple[int, ...]  # from the end of the prompt (-1 = last prompt token)
    pairs: int  # per pair kind
    ablation_examples: int  # per split
    ablation_splits: int  # OOD splits besides ID test (the first ones of the task's order)
    sae_steps: int
    sae_train_examples: int
    sae_eval_examples: int
    feature_examples: int
    top_ks: tuple[int, ...] = (1, 3, 5, 10)


PRESETS = {
    "smoke": AnalysisPreset(probe_examples=40, probe_labels=("family", "score"), probe_positions=(-1,), pairs=4,
                            ablation_examples=8, ablation_splits=1, sae_steps=20, sae_train_examples=16,
                            sae_eval_examples=8, feature_examples=16),
    "tiny": AnalysisPreset(probe_examples=200, probe_labels=("family", "score", "total", "sum_RED"),
                           probe_positions=(-1, -2), pairs=16, ablation_examples=64, ablation_splits=5, sae_steps=300,
                           sae_train_examples=200, sae_eval_examples=100, feature_examples=200),
    "full": AnalysisPreset(probe_examples=1000, probe_labels=("family", "score", "total", "sum_RED", "sum_BLUE"),
                           probe_positions=(-1, -2, -3), pairs=64, ablation_examples=300, ablation_splits=5,
                           sae_steps=2000, sae_train_examples=2000, sae_eval_examples=500, feature_examples=500),
}


def parse_what(items: str | Iterable[str]) -> tuple[str, ...]:
    """"probes,sae" or ["probes", "sae"] -> ("probes", "sae") in canonical order; unknown items raise."""
    from mechrl.errors import UserError

    names = [w.strip() for w in (items.split(",") if isinstance(items, str) else items) if w.strip()]
    unknown = [w for w in names if w not in WHATS]
    if unknown or not names:
        raise UserError(f"unknown analysis {unknown or names!r}; choose from {', '.join(WHATS)}")
    return tuple(w for w in WHATS if w in names)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _write_png(png: bytes, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def _json(obj, path: Path) -> Path:
    from mechrl.analysis.patching import to_jsonable

    atomic_write_json(path, to_jsonable(obj))
    return path


# ----------------------------------------------------------------------------------------------- probes

def run_probes(model, tok, task, p: AnalysisPreset) -> dict:
    """label -> `probe_card_label` result (records per layer x position x distribution)."""
    from mechrl.studies.card_probes import probe_card_label

    return {label: probe_card_label(model, tok, task, label, positions=p.probe_positions,
                                    n_examples=p.probe_examples) for label in p.probe_labels}


def probe_curve(result: Mapping, distribution: str, position: int) -> list[float | None]:
    """(L,) probe scores of one distribution at one position, layer by layer."""
    by_layer = {r["layer"]: r["value"] for r in result["records"]
                if r["distribution"] == distribution and r["position"] == position}
    return [by_layer[layer] for layer in result["layers"]]


def probes_figure(per_ckpt: Mapping[str, Mapping[str, dict]], position: int) -> bytes:
    """One panel per label: score per layer, one line per checkpoint (colour) and distribution (style)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    labels = list(next(iter(per_ckpt.values())))
    fig = MplFigure(figsize=(4.2 * len(labels), 3.4), dpi=90)
    FigureCanvasAgg(fig)
    styles = ["-", "--", ":", "-.", (0, (1, 3)), (0, (5, 1)), (0, (3, 1, 1, 1))]
    for i, label in enumerate(labels):
        ax = fig.add_subplot(1, len(labels), i + 1)
        for c, (name, results) in enumerate(per_ckpt.items()):
            res = results[label]
            dists = [d for d in res["distributions"] if d != "id_val"]
            for j, d in enumerate(dists):
                ys = [np.nan if v is None else v for v in probe_curve(res, d, position)]
                ax.plot(res["layers"], ys, color=f"C{c}", linestyle=styles[j % len(styles)], marker="o", ms=3,
                        label=f"{name} {d}")
        ax.set_xticks(res["layers"])
        ax.set_xlabel("layer (resid_post)")
        ax.set_ylabel(res["metric"])
        ax.set_ylim(-0.05 if res["metric"] == "accuracy" else -1.0, 1.05)
        ax.set_title(f"{label} @ position {position}", fontsize=9)
        if i == len(labels) - 1:
            ax.legend(fontsize=5, loc="lower left", ncol=max(1, len(per_ckpt)))
    fig.tight_layout()
    return _png(fig)


def best_probe_layers(results: Mapping[str, dict], distribution: str = "id_test") -> dict[str, dict]:
    """label -> {"layer", "position", "value", "metric"} of the best ID-test probe."""
    out = {}
    for label, res in results.items():
        recs = [r for r in res["records"] if r["distribution"] == distribution and r["value"] is not None]
        if not recs:
            raise ValueError(f"probe {label!r}: no defined {distribution} score")
        best = max(recs, key=lambda r: (r["value"], -r["layer"]))
        out[label] = {"layer": best["layer"], "position": best["position"], "value": best["value"],
                      "metric": res["metric"]}
    return out


# --------------------------------------------------------------------------------------------- patching

def run_patching(model, tok, task, p: AnalysisPreset) -> dict:
    """pair kind -> {"exact", "attribution", "pairs"} (or {"skipped": why} when no pair has a gap)."""
    from mechrl.studies.card_pairs import ood_pairs, rule_pairs
    from mechrl.analysis.patching import (activation_patching, attribution_patching, baseline_metrics,
                                          tokenize_pairs)

    cfg = task.cfg
    kinds = {"rule": (lambda: rule_pairs(cfg, tok, p.pairs), "logit_diff")}
    if len(cfg.ood_colors) >= len(cfg.id_colors):
        kinds["ood_colors"] = (lambda: ood_pairs(cfg, tok, p.pairs, "ood_colors"), "logprob")
    out = {}
    for kind, (make, metric) in kinds.items():
        pairs, counts = make()
        pb = tokenize_pairs(pairs, tok)
        clean, corrupt = baseline_metrics(model, pb, metric)
        gap = (clean - corrupt).abs()
        if float(gap.max()) < 1e-3:
            # a model that cannot tell the two prompts apart: nothing to normalise patching against
            log.warning("patching %s pairs: every |clean - corrupted| %s < 1e-3; skipped", kind, metric)
            out[kind] = {"skipped": f"every pair has |clean - corrupted| {metric} < 1e-3", "pairs": counts}
            continue
        out[kind] = {"metric": metric, "pairs": counts,
                     "exact": activation_patching(model, pb, metric=metric),
                     "attribution": attribution_patching(model, pb, metric=metric)}
    return out


def patching_figures(name: str, result: Mapping) -> list[tuple[str, bytes, str]]:
    """(file name, PNG, caption) per pair kind: resid layer x position, heads layer x head."""
    from mechrl.analysis.plots import head_heatmap, patching_heatmap

    figs = []
    for kind, r in result.items():
        if "skipped" in r:
            continue
        ex = r["exact"]
        figs.append((f"patching_{kind}_resid.png", _png(patching_heatmap(ex, title=f"{name}: {kind} pairs, resid")),
                     f"{name}: exact resid patching on {kind} pairs ({r['metric']}; 1 = clean)"))
        figs.append((f"patching_{kind}_heads.png",
                     _png(head_heatmap(ex["heads"]["scores"], title=f"{name}: {kind} pairs, heads",
                                       label=f"normalised {r['metric']}")),
                     f"{name}: exact per-head patching on {kind} pairs"))
    return figs


def attribution_agreement(r: Mapping) -> float | None:
    """Pearson correlation of attribution vs exact patching over the per-head scores (None if undefined)."""
    a = np.asarray(r["attribution"]["heads"]["scores"], float).ravel()
    e = np.asarray(r["exact"]["heads"]["scores"], float).ravel()
    ok = np.isfinite(a) & np.isfinite(e)
    if ok.sum() < 3 or a[ok].std() == 0 or e[ok].std() == 0:
        return None
    return float(np.corrcoef(a[ok], e[ok])[0, 1])


# --------------------------------------------------------------------------------------------- ablation

def ablation_splits(task, p: AnalysisPreset) -> list[str]:
    return ["test", *[s for s in task.eval_splits if s != "test"][:p.ablation_splits]]


def run_ablation(model, tok, task, p: AnalysisPreset) -> dict:
    """split -> `ablation_importance` (mean ablation, reference = ID train prompts), plus layer profiles."""
    from mechrl.analysis.ablation import importance_by_split, layer_profile

    data = task.datasets
    splits = {s: data[s].select(range(min(p.ablation_examples, len(data[s])))).to_list()
              for s in ablation_splits(task, p)}
    reference = list(data["train"].select(range(min(4 * p.ablation_examples, len(data["train"]))))["prompt"])
    res = importance_by_split(model, tok, splits, mode="mean", reference=reference)
    for r in res.values():
        r["profile"] = layer_profile(r)
    return res


def profile_figure(per_ckpt: Mapping[str, Mapping[str, dict]]) -> bytes:
    """Per-layer importance (heads summed + MLP), one panel per split, one line per checkpoint."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    splits = list(next(iter(per_ckpt.values())))
    fig = MplFigure(figsize=(3.2 * len(splits), 3.0), dpi=90)
    FigureCanvasAgg(fig)
    for i, s in enumerate(splits):
        ax = fig.add_subplot(1, len(splits), i + 1)
        for c, (name, res) in enumerate(per_ckpt.items()):
            prof = res[s]["profile"]
            ax.plot(range(len(prof["all"])), prof["heads"], color=f"C{c}", marker="o", ms=3, label=f"{name} heads")
            ax.plot(range(len(prof["all"])), prof["mlp"], color=f"C{c}", linestyle="--", marker="s", ms=3,
                    label=f"{name} MLP")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xticks(range(len(prof["all"])))
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("layer")
        if i == 0:
            ax.set_ylabel("importance (drop in token acc.)")
            ax.legend(fontsize=6)
    fig.tight_layout()
    return _png(fig)


# -------------------------------------------------------------------------------------------------- sae

def run_sae(model, tok, task, p: AnalysisPreset, out_dir: Path) -> dict:
    """One TopK SAE on the last block's resid_post: metrics, splice, feature table (class counts)."""
    from mechrl.analysis.hooks import n_layers
    from mechrl.analysis.sae import SAESpec, fit_card_sae
    from mechrl.analysis.sae_features import CLASSES, card_feature_table, plot_feature_table, save_feature_table

    site = f"resid_post.{n_layers(model) - 1}"
    spec = SAESpec(site=site, architecture="topk", expansion=4, k=8, steps=p.sae_steps,
                   batch_size=256, lr=1e-3, dead_feature_window=max(1, p.sae_steps // 2))
    fit = fit_card_sae(model, tok, task, spec, n_train=p.sae_train_examples, n_eval=p.sae_eval_examples,
                       out_dir=out_dir / "sae")
    table = card_feature_table(model, tok, task, fit["sae"], site, n_examples=p.feature_examples, top=20)
    save_feature_table(table, out_dir / "sae_features.json")
    png = plot_feature_table(table, out_dir / "sae_features.png")
    counts = {split: {c: int(np.sum(np.asarray(table["classes"][split]) == c)) for c in CLASSES}
              for split in table["ood_splits"]}
    return {"site": site, "spec": {k: v for k, v in vars(spec).items()}, "metrics": fit["metrics"],
            "splice": fit["splice"], "path": str(fit["path"]), "feature_classes": counts,
            "features_file": str(out_dir / "sae_features.json"), "_png": png}


# --------------------------------------------------------------------------------------------- driver

def _load(path: Path):
    from mechrl.models.loading import load_pretrained

    model, tok = load_pretrained(path, device="cpu")
    model.eval()
    return model, tok


def analyze(checkpoints: Mapping[str, str | Path], task, what: Iterable[str] = WHATS, *, out: str | Path,
            preset: str = "tiny") -> dict:
    """Run `what` on every checkpoint (name -> model folder) and compare them; see the module docstring.

    Returns {"preset", "what", "checkpoints": {name: {what: result}}, "compare": {...}, "headline": {...},
    "timing_s": {...}, "sections": [Section, ...]}.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown analysis preset {preset!r}; known: {list(PRESETS)}")
    if not checkpoints:
        raise ValueError("analyze: no checkpoints given")
    what = parse_what(list(what))
    p = PRESETS[preset]
    root = Path(out) / "analysis"
    results: dict[str, dict] = {}
    timing: dict[str, float] = {}
    figures: dict[str, list[Figure]] = {w: [] for w in what}
    for name, path in checkpoints.items():
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"analyze: checkpoint {name!r} at {path} is not a model folder (no config.json)")
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        model, tok = _load(path)
        results[name] = {}
        torch.manual_seed(0)
        for w in what:
            t0 = time.perf_counter()
            log.info("analyze %s: %s (%s preset)", name, w, preset)
            if w == "probes":
                r = run_probes(model, tok, task, p)
            elif w == "patching":
                r = run_patching(model, tok, task, p)
                for fname, png, cap in patching_figures(name, r):
                    figures[w].append(Figure(png, cap))
                    _write_png(png, d / fname)
            elif w == "ablation":
                from mechrl.analysis.plots import importance_heatmap

                r = run_ablation(model, tok, task, p)
                for split, res in r.items():
                    png = _png(importance_heatmap(res, title=f"{name}: {split}"))
                    _write_png(png, d / f"ablation_{split}.png")
                    if split == "test":
                        figures[w].append(Figure(png, f"{name}: head / MLP mean-ablation importance on ID test"))
            else:
                r = run_sae(model, tok, task, p, d)
                figures[w].append(Figure(r.pop("_png"), f"{name}: SAE features at {r['site']}, ID test vs each "
                                                         "OOD split (left) and by label group"))
            if w == "probes":
                r = {"labels": r}
            _json({"checkpoint": str(path), "preset": preset, w: r}, d / f"{w}.json")
            results[name][w] = r
            timing[f"{name}/{w}"] = time.perf_counter() - t0
        del model
        gc.collect()

    compare = _compare(results, what, p, root, figures)
    headline = _headline(results, compare, what)
    _json({"compare": compare, "headline": headline, "timing_s": timing, "preset": preset,
           "checkpoints": {n: str(c) for n, c in checkpoints.items()}}, root / "compare.json")
    sections = _sections(results, compare, headline, figures, what, preset)
    return {"preset": preset, "what": list(what), "checkpoints": results, "compare": compare, "headline": headline,
            "timing_s": timing, "sections": sections}


def _compare(results: Mapping[str, dict], what, p: AnalysisPreset, root: Path, figures: dict) -> dict:
    """Cross-checkpoint comparisons: probe curves (plot), ablation top-k Jaccard per split and pair of checkpoints."""
    from mechrl.analysis.ablation import compare_top_k, top_k, top_k_sizes
    from mechrl.analysis.plots import jaccard_bar

    names = list(results)
    compare: dict = {}
    if "probes" in what:
        per = {n: results[n]["probes"]["labels"] for n in names}
        for pos in p.probe_positions[:1]:
            png = probes_figure(per, pos)
            _write_png(png, root / f"probes_pos{-pos}.png")
            figures["probes"].append(Figure(png, f"probe score per layer at position {pos} (accuracy for categories, "
                                                 "R² for numbers): colour = checkpoint, line style = distribution"))
    if "ablation" in what:
        per = {n: results[n]["ablation"] for n in names}
        png = profile_figure(per)
        _write_png(png, root / "ablation_profiles.png")
        figures["ablation"].append(Figure(png, "per-layer importance (heads summed, MLP), per split and checkpoint"))
        # top-k sets keep ties together and leave out components whose ablation changes nothing
        compare["ablation_top_k"] = {n: {s: sorted(top_k(r, min(10, len(r["importance"]))))
                                          for s, r in per[n].items()} for n in names}
        compare["top_k_sizes"] = {n: top_k_sizes(per[n], p.top_ks) for n in names}
        pairs = {}
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                pairs[f"{a}|{b}"] = compare_top_k(per[a], per[b], p.top_ks)
                png = _png(jaccard_bar(pairs[f"{a}|{b}"], labels=(a, b),
                                       title=f"Top-k ablation importance overlap, {a} vs {b}"))
                _write_png(png, root / f"jaccard_{a}_{b}.png")
                figures["ablation"].append(Figure(png, f"Jaccard overlap of the top-k most important heads/MLPs, "
                                                       f"{a} vs {b}, per split"))
        compare["jaccard"] = pairs
        # within each checkpoint: does ID test use the same components as each OOD split?
        compare["jaccard_id_vs_ood"] = {
            n: {s: compare_top_k({"x": per[n]["test"]}, {"x": per[n][s]}, p.top_ks)["x"]
                for s in per[n] if s != "test"} for n in names}
    return compare


def _headline(results: Mapping[str, dict], compare: Mapping, what) -> dict:
    """A few numbers per checkpoint for summary.json: best probe layers, patching peaks, ablation bases, SAE FVU."""
    head: dict = {}
    for n, r in results.items():
        h: dict = {}
        if "probes" in r:
            h["best_probe"] = best_probe_layers(r["probes"]["labels"])
        if "patching" in r:
            h["patching"] = {}
            for kind, pr in r["patching"].items():
                if "skipped" in pr:
                    h["patching"][kind] = {"skipped": pr["skipped"]}
                    continue
                heads = np.asarray(pr["exact"]["heads"]["scores"], float)
                li, hi = np.unravel_index(np.nanargmax(heads), heads.shape)
                h["patching"][kind] = {"top_head": f"L{li}H{hi}", "top_head_score": float(heads[li, hi]),
                                       "n_pairs": len(pr["exact"]["kept"]),
                                       "attribution_vs_exact_r": attribution_agreement(pr)}
        if "ablation" in r:
            h["ablation"] = {s: {"base_token_acc": v["base"]["token_acc"],
                                 "top_component": max(v["importance"], key=lambda c: (v["importance"][c], c))}
                             for s, v in r["ablation"].items()}
        if "sae" in r:
            m = r["sae"]["metrics"]
            h["sae"] = {"site": r["sae"]["site"], "fvu": m["fvu"], "l0": m["l0"], "n_dead": m["n_dead"],
                        "d_sae": m["d_sae"], "delta_lm_loss": r["sae"]["splice"]["delta"]}
        head[n] = h
    if "jaccard" in compare:  # None: no component above zero importance in either checkpoint
        head["jaccard_top10"] = {pair: {s: _none_if_nan(v.get(10, v[max(v)])) for s, v in by_split.items()}
                                 for pair, by_split in compare["jaccard"].items()}
        head["top10_sizes"] = {n: {s: v.get(10, v[max(v)]) for s, v in by_split.items()}
                               for n, by_split in compare["top_k_sizes"].items()}
    return head


def _none_if_nan(v: float) -> float | None:
    return None if isinstance(v, float) and math.isnan(v) else v


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}" if isinstance(v, float) else str(v)


def _sections(results, compare, headline, figures, what, preset) -> list[Section]:
    names = [n for n in results]
    subs = []
    if "probes" in what:
        rows = []
        for n in names:
            for label, b in headline[n]["best_probe"].items():
                res = results[n]["probes"]["labels"][label]
                oods = [d for d in res["distributions"] if d not in ("id_val", "id_test")]
                at = {d: next((r["value"] for r in res["records"] if r["distribution"] == d
                               and r["layer"] == b["layer"] and r["position"] == b["position"]), None) for d in oods}
                rows.append([n, label, b["metric"], b["layer"], b["position"], b["value"], *[at[d] for d in oods]])
        oods = [d for d in results[names[0]]["probes"]["labels"][next(iter(headline[names[0]]["best_probe"]))][
            "distributions"] if d not in ("id_val", "id_test")]
        subs.append(Section("Probes", text="Linear probes on the residual stream, trained on ID train prompts. "
                            "The table gives each label's best layer on ID test and the same probe's score on each "
                            "OOD split (null where the label is constant there).",
                            tables=[Table(["checkpoint", "label", "metric", "layer", "position", "id_test", *oods],
                                          rows, kind="analysis-probes")],
                            figures=figures["probes"]))
    if "patching" in what:
        rows = [[n, kind, *(["skipped", None, None, None] if "skipped" in v else
                            [v["top_head"], v["top_head_score"], v["n_pairs"], v["attribution_vs_exact_r"]])]
                for n in names for kind, v in headline[n]["patching"].items()]
        subs.append(Section("Activation patching", text="Rule pairs (same cards, another rule; logit difference) "
                            "and ID -> OOD-colour pairs (log-probability of the ID answer token). Scores are "
                            "normalised: 1 = clean behaviour restored, 0 = corrupted.",
                            tables=[Table(["checkpoint", "pairs", "top head", "score", "pairs kept",
                                           "attribution vs exact (r, heads)"], rows, kind="analysis-patching")],
                            figures=figures["patching"]))
    if "ablation" in what:
        rows = []
        for n in names:
            for s, v in headline[n]["ablation"].items():
                rows.append([n, s, v["base_token_acc"], v["top_component"],
                             ", ".join(compare["ablation_top_k"][n][s][:10])])
        tables = [Table(["checkpoint", "split", "token acc.", "most important", "top-10 set"], rows,
                        kind="analysis-ablation")]
        if compare.get("jaccard"):
            jrows = [[pair.replace("|", " vs "), s, *[v.get(k) for k in sorted({k for x in by.values() for k in x})]]
                     for pair, by in compare["jaccard"].items() for s, v in by.items()]
            ks = sorted({k for by in compare["jaccard"].values() for x in by.values() for k in x})
            tables.append(Table(["checkpoints", "split", *[f"top-{k}" for k in ks]], jrows, kind="analysis-jaccard",
                                caption="Jaccard overlap of the top-k most important components"))
        subs.append(Section("Ablation", text="Mean ablation (reference: ID train prompts) of every head and MLP; "
                            "importance = drop in teacher-forced token accuracy of the gold completion.",
                            tables=tables, figures=figures["ablation"]))
    if "sae" in what:
        rows = [[n, h["sae"]["site"], h["sae"]["fvu"], h["sae"]["l0"], f"{h['sae']['n_dead']}/{h['sae']['d_sae']}",
                 h["sae"]["delta_lm_loss"]] for n, h in ((n, headline[n]) for n in names)]
        crow = [[n, s, *[c[k] for k in ("id_specific", "ood_stable", "ood_specific", "rare", "other")]]
                for n in names for s, c in results[n]["sae"]["feature_classes"].items()]
        subs.append(Section("Sparse autoencoders", text="One TopK SAE per checkpoint; FVU, L0 and dead latents on "
                            "held-out ID text, ΔLM loss with the SAE spliced in at every position.",
                            tables=[Table(["checkpoint", "site", "FVU", "L0", "dead", "Δ LM loss"], rows,
                                          kind="analysis-sae"),
                                    Table(["checkpoint", "OOD split", "ID-specific", "OOD-stable", "OOD-specific",
                                           "rare", "other"], crow, kind="analysis-sae-features",
                                          caption="SAE features by ID vs OOD activation frequency")],
                            figures=figures["sae"]))
    return [Section(f"Interpretability analysis ({preset} preset: {', '.join(names)})",
                    text="Files: analysis/<checkpoint>/<analysis>.json and PNGs; comparisons in analysis/compare.json.",
                    subsections=subs)]


def format_headline(headline: Mapping) -> str:
    """A few lines for the terminal."""
    lines = []
    for n, h in headline.items():
        if n == "jaccard_top10":
            for pair, by in h.items():
                lines.append(f"Jaccard top-10 {pair.replace('|', ' vs ')}: "
                             + ", ".join(f"{s} {_fmt(v)}" for s, v in by.items()))
            continue
        if n == "top10_sizes":
            for ck, by in h.items():
                lines.append(f"top-10 set sizes {ck} (ties kept, zero importance left out): "
                             + ", ".join(f"{s} {v}" for s, v in by.items()))
            continue
        parts = []
        for label, b in h.get("best_probe", {}).items():
            parts.append(f"{label} L{b['layer']} {b['metric']} {b['value']:.2f}")
        if "sae" in h:
            parts.append(f"SAE FVU {h['sae']['fvu']:.3f} L0 {h['sae']['l0']:.1f} ΔLM {h['sae']['delta_lm_loss']:+.3f}")
        for kind, v in h.get("patching", {}).items():
            parts.append(f"patch {kind}: " + (v["skipped"] if "skipped" in v else
                                              f"{v['top_head']} {v['top_head_score']:.2f}"))
        if "ablation" in h:
            parts.append("ablation top " + ", ".join(f"{s}:{v['top_component']}" for s, v in h["ablation"].items()))
        lines.append(f"{n}: " + "; ".join(parts))
    return "\n".join(lines)
