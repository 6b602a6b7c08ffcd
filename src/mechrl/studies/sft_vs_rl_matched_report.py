"""The report of the matched-compute sft-vs-rl study: question and answer first (accuracy per split
against compute per arm, with intervals; the change from the start at each budget), then what was
run, then each rule family, the analysis of the final checkpoints, and the runs themselves with
their configuration differences in an appendix. Every curve shares one x-axis: token-passes."""

from __future__ import annotations

import io
from pathlib import Path

from mechrl.runs.report import Figure, Section, Table, build_report

ARM_STYLE = {"sft": ("C0", "o"), "grpo": ("C3", "s"), "grpo_ood": ("C2", "^"), "grpo_sftlr": ("C1", "D")}


def _ci(d: dict) -> str:
    return f"[{d['lo']:.3f}, {d['hi']:.3f}]"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def curves_figure(summary: dict) -> Figure:
    """One panel per split: accuracy (mean over seeds, 95% band) against compute per arm; the start
    as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    splits = list(summary["start"]["splits"])
    cols = 3
    rows = -(-len(splits) // cols)
    fig = MplFigure(figsize=(4.3 * cols, 3.3 * rows))
    FigureCanvasAgg(fig)
    for i, s in enumerate(splits):
        ax = fig.add_subplot(rows, cols, i + 1)
        for arm, pts in summary["over_seeds"].items():
            color, marker = ARM_STYLE.get(arm, ("C7", "x"))
            x = [sum(p["token_passes"]) / len(p["token_passes"]) for p in pts]  # mean compute of the points
            acc = [p["splits"][s]["accuracy"] for p in pts]
            seen = " (sees it)" if s in summary["arms"][arm]["sees"] else ""
            ax.plot(x, [a["mean"] for a in acc], color=color, marker=marker, label=f"{arm}{seen}")
            ax.fill_between(x, [a["lo"] for a in acc], [a["hi"] for a in acc], color=color, alpha=0.15)
        ax.axhline(summary["start"]["splits"][s]["accuracy"], color="k", ls="--", lw=1, label="SFT start")
        ax.set_xscale("log")
        seen = [arm for arm, spec in summary["arms"].items() if s in spec["sees"]]
        ax.set_title(s + (f" ({', '.join(seen)} trains on it)" if seen else ""), fontsize=10)
        ax.set_xlabel("training compute from the start (token-passes)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return Figure(_png(fig), "Accuracy per split against training compute from the shared SFT start (log x): "
                             "mean over seeds with a 95% two-level bootstrap band; dashed: the start. Each point "
                             "is the checkpoint whose compute first reached a budget (x = its mean compute).")


def headline_table(summary: dict) -> Table:
    rows = []
    budgets = summary["budgets"]
    for s, st in summary["start"]["splits"].items():
        rows.append([s, "start", 0, st["accuracy"], "", None, "", ""])
        for arm, pts in summary["over_seeds"].items():
            for b, pt in zip(budgets, pts):
                e = pt["splits"][s]
                d = e["delta_vs_start"]
                rows.append([s, arm + (" (sees)" if s in summary["arms"][arm]["sees"] else ""), b,
                             e["accuracy"]["mean"], _ci(e["accuracy"]), d["mean"], _ci(d),
                             ", ".join(f"{v:.3f}" for v in e["per_seed"])])
    return Table(["split", "arm", "budget (token-passes)", "accuracy", "95% interval", "change from start",
                  "95% interval", "per seed"], rows, kind="matched-headline", float_format="{:.3f}",
                 caption="accuracy per split, arm and compute budget (mean over seeds) and its change from the SFT start")


def differences_table(summary: dict) -> Table:
    rows = []
    for pair, pts in summary["arm_differences"].items():
        for b, pt in zip(summary["budgets"], pts):
            for s, d in pt["splits"].items():
                excl = "yes" if not d["lo"] <= 0 <= d["hi"] else "no"
                rows.append([pair.replace("-", " - "), b, s, d["mean"], _ci(d), excl])
    return Table(["arms", "budget (token-passes)", "split", "difference", "95% interval", "excludes 0"], rows,
                 kind="matched-differences", caption="accuracy differences between arms at matched compute")


def families_table(summary: dict) -> Table:
    """At the largest budget: accuracy and change from the start per split and rule family."""
    rows = []
    for s, st in summary["start"]["splits"].items():
        for g, acc0 in st["groups"].items():
            row = [s, g, acc0]
            for arm, pts in summary["over_seeds"].items():
                e = pts[-1]["splits"][s]["groups"][g]
                row += [e["accuracy"]["mean"], f"{e['delta_vs_start']['mean']:+.3f} {_ci(e['delta_vs_start'])}"]
            rows.append(row)
    cols = ["split", "rule family", "start"]
    for arm in summary["over_seeds"]:
        cols += [f"{arm} accuracy", f"{arm} change [95%]"]
    return Table(cols, rows, kind="matched-families",
                 caption=f"per rule family at the largest budget ({summary['budgets'][-1]:g} token-passes)")


def runs_table(summary: dict) -> Table:
    rows = [["start", 0, summary["start"]["run"], summary["start"]["steps"], summary["start"]["token_passes"],
             summary["start"]["train_time_s"], ""]]
    for arm, spec in summary["arms"].items():
        for r, pts in zip(spec["runs"], summary["points"][arm]):
            rows.append([arm, r["seed"], r["run"], r["final_step"], r["token_passes"], r["train_time_s"],
                         ", ".join(f"{p['step']} ({p['token_passes']:.3g})" for p in pts)])
    return Table(["arm", "seed", "run", "final step", "token-passes", "train time (s)",
                  "step (compute) of each budget's point"], rows, kind="matched-runs", float_format="{:.1f}",
                 caption="every run of the study")


def lead_section(summary: dict) -> Section:
    reduced = (f"\n\nREDUCED version of the design: {summary['reduced']}" if summary.get("reduced") else "")
    text = (f"Question: {summary['question']}\n\n"
            f"Answer at this scale ({summary['preset']} preset, {len(summary['seeds'])} seed(s)), at the largest "
            f"budget ({summary['budgets'][-1]:g} token-passes, {summary['budgets'][-1] / summary['start']['token_passes']:.2f}x "
            f"the start's own SFT compute): change of accuracy from the SFT start per arm, and differences between "
            f"arms, with {summary['intervals']}.\n\n" + "\n".join(summary["answer"]) + reduced)
    return Section("Question and answer", text=text, tables=[headline_table(summary), differences_table(summary)],
                   figures=[curves_figure(summary)])


def what_section(summary: dict) -> Section:
    c = summary["preset_config"]
    arms = "; ".join(f"{a}: {s['label']}" + (f" (sees {', '.join(s['sees'])})" if s["sees"] else "")
                     for a, s in summary["arms"].items())
    text = (f"Start: cards-sft for {summary['start']['steps']} steps ({summary['start']['token_passes']:.3g} "
            f"token-passes), one checkpoint shared by every arm and seed. Arms: {arms}. Budgets "
            f"{', '.join(f'{b:g}' for b in summary['budgets'])} token-passes ({summary['compute_unit']}). "
            f"Each arm is one run per seed, checkpointed and evaluated where its running compute first reached "
            f"each budget; every evaluation uses the first {c['n_eval']} examples of each split (greedy). "
            f"SFT continuation overrides: {c['sft']}; GRPO overrides: {c['grpo']} (recipe cards-grpo otherwise); "
            f"OOD share of grpo_ood: {c['ood_fraction']} from {', '.join(c['ood_splits'])}. Seeds vary the "
            f"continuations (data order, sampling, prompts), not the start. Wall time: "
            f"{summary['wall_time_s']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in summary['timings_s'].items())}).")
    return Section("What was run", text=text, tables=[runs_table(summary)])


def write_report(summary: dict, out: Path, analysis_sections: list[Section]) -> Path:
    """Lead with the answer; then what was run, the families and the analysis; then the runs (the start
    and seed 0 of each arm) and their configuration differences in the appendix (build_report's)."""
    runs = [summary["start"]["run"]] + [summary["arms"][a]["runs"][0]["run"] for a in summary["arms"]]
    lead = [lead_section(summary), what_section(summary), Section("Per rule family", tables=[families_table(summary)]),
            *analysis_sections]
    return build_report(runs, out, lead_sections=lead, overlay=False,
                        title=f"sft-vs-rl at matched compute ({summary['preset']} preset)")
