"""The rlhf-diffing study's report: question and answer first (headline table and divergence figure), the exclusive
latents of policy vs base next to those of control vs base, what was run, then the detail (divergence, paired SAEs,
crosscoders, reward probes, along the run), the two runs' training curves, and the configs in an appendix.

Every number comes from `summary.json` or the analysis files next to it (`analysis/*.json`)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from mechrl.runs.report import Figure, Section, Table
from mechrl.runs.report.build import comparison_sections, load_run, run_sections
from mechrl.runs.report.html import render_page
from mechrl.runs.rundir import atomic_write_text

PAIRS = ("policy", "control")


def _ci(r: dict) -> str:
    return f"{r['mean']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] (n={r['n']})"


def _f(v, fmt="{:.3f}") -> str:
    return "—" if v is None else fmt.format(v)


def headline(summary: dict) -> Section:
    b, rw = summary["bar"], summary["reward"]
    mm = summary["mmcs"]
    rows = [["mean reward of samples: base", _ci(rw["base"])],
            ["mean reward of samples: policy", _ci(rw["policy"])],
            ["mean reward of samples: control", _ci(rw["control"])],
            ["policy − base (same prompts)", _ci(rw["policy_minus_base"])],
            ["control − base (same prompts)", _ci(rw["control_minus_base"])]]
    for p in PAIRS:
        t = summary["runs"][p]["train_reward"]
        rows.append([f"{p} run: {t['metric']}, first → last {t['window']} steps", f"{t['first']:.3f} → {t['last']:.3f}"])
    rows += [["other-only crosscoder latents passing latent scaling: policy pair", b["exclusive_policy"]],
             ["other-only crosscoder latents passing latent scaling: control pair", b["exclusive_control"]],
             ["other-only latents before the scaling check: policy / control",
              f"{b['exclusive_policy_any_scaling']} / {b['exclusive_control_any_scaling']}"],
             ["top-5 policy-exclusive latents dominated by positive words",
              f"{sum(1 for r in summary['exclusive']['policy'][:5] if r['positive_dominated'])} of {b['n_top5_passing_scaling']}"],
             ["highest Δ among firing latents: policy / control",
              f"{_f(b['max_rel_norm']['policy'])} / {_f(b['max_rel_norm']['control'])}"],
             ["top-5 policy latents by Δ (any class) dominated by positive words",
              f"{sum(1 for r in summary['highest_rel_norm']['policy'][:5] if r['positive_dominated'])} of "
              f"{len(summary['highest_rel_norm']['policy'][:5])}"],
             ["top divergent layers (policy; control)",
              f"{summary['divergence']['top_layers']}; {summary['divergence']['top_layers_control']} "
              f"(by {summary['divergence']['rank_by']})"]]
    for layer, m in mm.items():
        rows.append([f"MMCS at mlp_out.{layer}", ", ".join(f"{k} {v:.3f}" for k, v in m.items())])
    answer = (f"Reward: the policy's samples score {rw['policy_minus_base']['mean']:+.3f} against the base's on the same "
              f"prompts (95% bootstrap interval [{rw['policy_minus_base']['lo']:.3f}, {rw['policy_minus_base']['hi']:.3f}]; "
              f"rises: {b['reward_rises']}). Crosscoders at {summary['site']}: {b['exclusive_policy']} policy-only "
              f"latents pass the latent-scaling check, against {b['exclusive_control']} for the control run "
              f"(at most a quarter: {b['control_at_most_quarter']}). Among the top {b['n_top5_passing_scaling']} "
              f"policy-only latents, one dominated by positive-sentiment words: {b['positive_latent_in_top5']} "
              f"(dominated: more than half of its top-activating tokens or of its top logit-lens tokens are positive "
              f"words of VADER's lexicon; base rate among corpus tokens "
              f"{_f(summary['positive_base_rate']['tokens'])}).")
    from mechrl.analysis.divergence import divergence_figure

    div = summary["divergence"]
    fig = divergence_figure({p: {"layers": div["per_layer"][p]} for p in PAIRS},
                            {"policy": div["top_layers"], "control": div["top_layers_control"]})
    return Section("Question and answer", text=f"{summary['question']}\n\n{answer}",
                   tables=[Table(["measure", "value"], rows, kind="headline", caption="the study's answer")],
                   figures=[Figure(fig, "divergence per layer, base vs policy (C0) and base vs control (C1); "
                                        "stars: top layers")])


def _latent_rows(recs: list[dict]) -> list[list]:
    rows = []
    for r in recs:
        t = r["table"]
        rows.append([r["latent"], t["rel_norm"], t["freq"], t.get("nu_error"), t.get("nu_recon"),
                     " | ".join(c["context"] for c in r["contexts"][:3]),
                     " ".join(x["token"] for x in r.get("lens", {}).get("top", [])[:6]),
                     " ".join(x["token"] for x in r["explanation"]["tokens"]), r["explanation"]["score"],
                     None if r["reward"] is None else f"{r['reward']['high']:.2f} / {r['reward']['low']:.2f}",
                     r["positive"]["context_share"], r["positive"]["lens_share"],
                     (r.get("llm") or {}).get("description", "")])
    return rows


LATENT_COLS = ["latent", "Δ norm", "freq", "ν_ε", "ν_r", "top contexts ([[ ]]: top token)", "logit lens (top)",
               "explanation tokens", "expl. score", "fires high / low reward", "pos. share ctx", "pos. share lens",
               "LLM description"]


SUMMARY_COLS = ["latent", "Δ norm", "freq", "ν_ε", "ν_r", "top contexts", "logit lens (top)", "explanation tokens",
                "expl. score", "pos. share ctx", "pos. share lens"]


def _summary_row(x: dict) -> list:
    """A row of SUMMARY_COLS from a latent summary (`rlhf_diffing._latent_summary`)."""
    return [x["latent"], x["rel_norm"], x["freq"], x["nu_error"], x["nu_recon"], " | ".join(x["contexts"]),
            " ".join(x["lens_top"]), " ".join(x["explanation"]), x["explanation_score"], x["positive_context_share"],
            x["positive_lens_share"]]


def exclusive_section(desc: dict) -> Section:
    subs = []
    for p in PAIRS:
        d = desc["pairs"][p]
        tables = [Table(LATENT_COLS, _latent_rows(d["passing"]), kind=f"exclusive-{p}", text_columns=(5, 6, 7, 12),
                        caption=f"top {p}-only latents (Δ ≥ threshold) that pass the latent-scaling check")]
        if d.get("nearest"):
            tables.append(Table(LATENT_COLS, _latent_rows(d["nearest"]), kind=f"nearest-{p}", text_columns=(5, 6, 7, 12),
                                caption=f"the {p} pair's firing latents with the highest Δ, whatever their class (the "
                                        "ν columns are filled for exclusive latents only)"))
        if d["failing"]:
            tables.append(Table(LATENT_COLS, _latent_rows(d["failing"]), kind=f"exclusive-{p}-failing",
                                text_columns=(5, 6, 7, 12),
                                caption=f"top {p}-only latents that FAIL the latent-scaling check (shrinkage artefacts)"))
        figs = []
        if d["passing"]:
            from mechrl.analysis.describe import histograms_figure

            figs.append(Figure(histograms_figure(d["passing"]), f"activation histograms of the {p}-only latents"))
        subs.append(Section(f"{p} vs base", tables=tables, figures=figs))
    return Section("Exclusive latents: policy vs base, next to control vs base",
                   text="Crosscoder latents whose decoder lives (almost) only in the second model. The same thresholds "
                        "for both pairs. Contexts mark the top-activating token [[so]] and other active tokens [so].",
                   subsections=subs)


def runs_section(summary: dict, cfg) -> Section:
    rows = [[p, r["run"], r["kind"], json.dumps(r["reward"]), r["final"]] for p, r in summary["runs"].items()]
    c = summary["corpus"]
    text = (f"Corpus: {c['n_texts']} texts ({', '.join(f'{k}: {v}' for k, v in c['sources'].items())}), "
            f"{c['n_held_out']} held out from SAE and crosscoder training (their metrics, latent tables and "
            f"explanation scores come from the held-out texts). Paired SAEs: SAELens TopK, expansion "
            f"{cfg.sae.expansion}, k {cfg.sae.k}, {cfg.sae.steps} steps. Crosscoders: BatchTopK at {summary['site']}, "
            f"expansion {cfg.crosscoder.expansion}, k {cfg.crosscoder.k}, {cfg.crosscoder.steps} steps. "
            f"Study wall time {summary.get('wall_time_s', 0):.0f} s.")
    return Section("What was run", text=text, tables=[Table(["pair", "run", "kind", "reward", "final checkpoint"], rows,
                                                            kind="runs", text_columns=(1, 3, 4))])


def divergence_section(summary: dict) -> Section:
    keys = ["param_block_rel", "param_attn_rel", "param_mlp_rel", "resid_cka", "mlp_cka", "resid_rel_diff",
            "mlp_rel_diff", "resid_cosine", "lens_kl"]
    rows = [[p, r["layer"], *[r[k] for k in keys]] for p in PAIRS for r in summary["divergence"]["per_layer"][p]]
    return Section("Divergence per layer", tables=[Table(["pair", "layer", *keys], rows, kind="divergence",
                                                         float_format="{:.4g}")])


def saes_section(summary: dict, analysis: Path, desc: dict) -> Section:
    from mechrl.analysis.diffing import mmcs_figure

    saes = json.loads((analysis / "paired_saes.json").read_text())
    rows = [[layer, name, m["fvu"], m["l0"], m["n_dead"], m["d_sae"]]
            for layer, by in summary["sae_metrics"].items() for name, m in by.items()]
    mrows = [[layer, k, v, len(saes["layers"][layer]["unmatched"][k])]
             for layer, m in summary["mmcs"].items() for k, v in m.items()]
    feats = desc["sae_unmatched"]["features"]
    frows = [[f["latent"], f["max_cosine_to_base"], f["freq"], " | ".join(c["context"] for c in f["contexts"][:3]),
              " ".join(x["token"] for x in f.get("lens", {}).get("top", [])[:6]),
              " ".join(x["token"] for x in f["explanation"]["tokens"]), f["explanation"]["score"],
              f["positive"]["context_share"], f["positive"]["lens_share"]] for f in feats]
    return Section("Paired SAEs (the published method)",
                   text=f"SAEs on the MLP outputs of the top divergent layers, one per model, same texts. MMCS A->B: "
                        f"mean over A's alive features of the max cosine with B's; unmatched: max cosine < "
                        f"{saes['threshold']}. base_seed1 is a second base SAE: the MMCS of two SAEs of one model.",
                   tables=[Table(["layer", "SAE", "FVU", "L0", "dead", "width"], rows, kind="sae-metrics"),
                           Table(["layer", "comparison", "MMCS", "unmatched"], mrows, kind="mmcs"),
                           Table(["feature", "max cos to base", "freq", "top contexts", "logit lens", "explanation",
                                  "expl. score", "pos. share ctx", "pos. share lens"], frows, kind="sae-unmatched",
                                 text_columns=(3, 4, 5),
                                 caption=f"the least-matched policy SAE features at {desc['sae_unmatched']['site']}")],
                   figures=[Figure(mmcs_figure(saes), "per-feature max cosine, per layer and comparison")])


def crosscoder_section(summary: dict, analysis: Path) -> Section:
    from mechrl.analysis.crosscoder import CLASSES

    rows = []
    tables = {}
    for p in PAIRS:
        t = json.loads((analysis / "crosscoders" / p / "table.json").read_text())
        tables[p] = t
        m = t["metrics"]
        rows.append([p, *[t["counts"][c] for c in CLASSES], t["exclusive_passing_scaling"]["other_only"],
                     t["exclusive_passing_scaling"]["base_only"], m["fvu"][0], m["fvu"][1], m["l0"],
                     t.get("tokens_per_s")])
    vrows = []
    for name, v in (summary.get("crosscoder_variants") or {}).items():
        for p in PAIRS:
            r = v[p]
            vrows.append([name, json.dumps({k: x for k, x in v["settings"].items() if x is not None and k != "name"}),
                          v["site"], p, r["counts"]["other_only"], r["exclusive_passing_scaling"]["other_only"],
                          r["counts"]["base_only"], max((x["rel_norm"] for x in r["nearest"]), default=None),
                          r["fvu"][0], r["fvu"][1],
                          f"{sum(1 for x in r['top_exclusive'][:5] if x['positive_dominated'])} of "
                          f"{len(r['top_exclusive'][:5])}"])
    vt = [Table(["variant", "changed", "site", "pair", "other-only", "passing scaling", "base-only", "max Δ", "FVU base",
                 "FVU other", "top-5 passing: positive-dominated"], vrows, kind="crosscoder-variants", text_columns=(1,),
                caption="sensitivity checks: both pairs retrained with the settings changed")] if vrows else []
    subs = []
    for name, v in (summary.get("crosscoder_variants") or {}).items():
        srows = [[p, *_summary_row(x)] for p in PAIRS for x in v[p]["top_exclusive"]]
        if srows:
            subs.append(Section(f"Variant {name}: exclusive latents passing the scaling check",
                                tables=[Table(["pair", *SUMMARY_COLS], srows, kind=f"variant-{name}",
                                              text_columns=(6, 7, 8))]))
    return Section("Crosscoders", text=f"BatchTopK crosscoders at {summary['site']}; classes by the relative decoder "
                                       f"norm Δ; exclusive latents then checked by latent scaling "
                                       f"(criterion: {json.dumps(tables['policy']['criterion'])}).",
                   tables=[Table(["pair", *CLASSES, "other-only passing", "base-only passing", "FVU base", "FVU other",
                                  "L0", "train tokens/s"], rows, kind="crosscoders"), *vt], subsections=subs,
                   figures=[Figure(_crosscoder_figure(tables), "left: Δ per latent (firing latents); right: latent-"
                                                               "scaling ratios of the exclusive latents")])


def _crosscoder_figure(tables: dict) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(10, 3.2), dpi=90)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for c, (p, t) in enumerate(tables.items()):
        rel = [r["rel_norm"] for r in t["latents"] if r["class"] != "dead"]
        ax1.hist(rel, bins=40, range=(0, 1), histtype="step", color=f"C{c}", label=p)
        ex = [r for r in t["latents"] if r.get("nu_error") is not None and r.get("nu_recon") is not None]
        ax2.scatter([r["nu_error"] for r in ex], [r["nu_recon"] for r in ex], s=10, color=f"C{c}", label=p)
    crit = tables["policy"]["criterion"]
    for v in (crit["base_only_max"], crit["other_only_min"]):
        ax1.axvline(v, color="black", linestyle="--", linewidth=0.7)
    ax1.set_yscale("log")
    ax1.set_xlabel("Δ = relative decoder norm (0 base-only, 1 other-only)", fontsize=8)
    ax2.axvline(crit["max_nu_error"], color="black", linestyle="--", linewidth=0.7)
    ax2.axhline(crit["max_nu_recon"], color="black", linestyle="--", linewidth=0.7)
    ax2.set_xlabel("ν_ε (error ratio)", fontsize=8)
    ax2.set_ylabel("ν_r (reconstruction ratio)", fontsize=8)
    for a in (ax1, ax2):
        a.legend(fontsize=7)
        a.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def probes_section(analysis: Path) -> Section:
    probes = json.loads((analysis / "reward_probes.json").read_text())
    rows = [[k, v["ridge_r2"], v["logistic_accuracy"], v["majority_baseline"], v["n_texts"],
             ", ".join(f"{t['latent']} ({t['coef']:+.3f})" for t in v["top_latents"][:5])] for k, v in probes.items()]
    return Section("Reward probes", text="Linear probes from a text's mean latent code to its reward: ridge R² and "
                                         "accuracy of above/below the median, on held-out test texts (60/20/20 split).",
                   tables=[Table(["codes", "ridge R²", "accuracy", "majority", "texts", "top latents (coef per sd)"], rows,
                                 kind="reward-probes", text_columns=(5,))])


def along_section(summary: dict) -> Section | None:
    recs = summary.get("along")
    if not recs:
        return None
    from mechrl.studies.rlhf_diffing_along import along_figure

    rows = [[r["step"], max(r["param_block_rel"]), r["lens_kl"][-1], r["mmcs_ckpt_to_base"], r["mmcs_base_to_ckpt"],
             r["counts"]["other_only"], r["other_only_passing_scaling"]] for r in recs]
    return Section("Along the run", text="Base vs each saved checkpoint of the policy run (reduced SAE and crosscoder "
                                         "budgets, the same for every checkpoint).",
                   tables=[Table(["step", "max rel. weight change", "output KL", "MMCS ckpt->base", "MMCS base->ckpt",
                                  "other-only", "passing scaling"], rows, kind="along")],
                   figures=[Figure(along_figure(recs), "diffing measures along the policy run")])


def write_report(summary: dict, cfg, run_dirs: list[Path], out: Path, analysis: Path) -> Path:
    desc = json.loads((analysis / "descriptions.json").read_text())
    runs = {f"{p}: {Path(d).name}": load_run(d) for p, d in zip(PAIRS, run_dirs)}
    sections = [headline(summary), exclusive_section(desc), runs_section(summary, cfg), divergence_section(summary),
                saes_section(summary, analysis, desc), crosscoder_section(summary, analysis), probes_section(analysis)]
    along = along_section(summary)
    if along is not None:
        sections.append(along)
    sections.append(Section("The RL runs", subsections=comparison_sections(runs)))
    sections += [Section(f"Run {name}", subsections=run_sections(r)) for name, r in runs.items()]
    import yaml

    sections.append(Section("Appendix: study configuration",
                            tables=[Table(["config"], [[yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)]],
                                          kind="config", text_columns=(0,))]))
    intro = (f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by mechrl study rlhf-diffing "
             f"(preset {summary['preset']}); numbers from {out.parent / 'summary.json'} and {analysis}.")
    atomic_write_text(out, render_page(f"rlhf-diffing study ({summary['preset']} preset)", sections, intro))
    return out
