"""The report of the coverage design of reward-hacking-routing: the question and its answer first (one
figure: deployed hack rate against detector coverage per method, with intervals; one table of the
curves), then the routed variants at coverage 0.5, then the runs (seed 0 at coverage 0.5 of each
method) with their configuration differences in the appendix."""

from __future__ import annotations

import io
from pathlib import Path

from mechrl.runs.report import Figure, Section, Table, build_report

STYLE = {"routed": ("C3", "s"), "filter": ("C0", "o"), "penalty": ("C2", "^"), "lora": ("C7", None)}


def _ci(d: dict) -> str:
    return f"[{d['lo']:.3f}, {d['hi']:.3f}]"


def coverage_figure(summary: dict) -> Figure:
    """Two panels against coverage: the deployed policy's hack rate and task reward, per method
    (routed: retain-only, its both-adapters hack dotted); plain LoRA, which has no detector, as a band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    for k, key in enumerate(("hack", "task")):
        ax = fig.add_subplot(1, 2, k + 1)
        for method, rows in summary["coverage_curve"].items():
            color, marker = STYLE.get(method, ("C4", "x"))
            if method == "lora":
                v = rows[0][key]
                ax.axhspan(v["lo"], v["hi"], color=color, alpha=0.2)
                ax.axhline(v["mean"], color=color, ls="--", label="plain LoRA (no detector)")
                continue
            x = [r["coverage"] for r in rows]
            y = [r[key] for r in rows]
            label = f"{method} ({rows[0]['mode']})"
            ax.errorbar(x, [v["mean"] for v in y], yerr=[[v["mean"] - v["lo"] for v in y], [v["hi"] - v["mean"] for v in y]],
                        color=color, marker=marker, capsize=3, label=label)
            if method == "routed" and key == "hack":
                b = [r["both"]["hack"]["mean"] for r in rows]
                ax.plot(x, b, color=color, ls=":", marker=marker, alpha=0.6, label="routed (both adapters)")
        ax.set_xlabel("detector coverage (share of hacks reported)")
        ax.set_ylabel("hack rate (says 'happy')" if key == "hack" else f"task ({summary['measures']['task']})")
        ax.set_ylim(-0.03, 1.03)
        ax.invert_xaxis()
        if k == 0:
            ax.legend(fontsize=7)
    fig.suptitle("Deployed policy against detector coverage (mean over seeds, 95% two-level bootstrap)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return Figure(buf.getvalue(), "hack rate and task reward of each method's deployed policy against the detector's "
                                  "coverage (routed: forget adapter removed; dotted: with it)")


def curve_table(summary: dict) -> Table:
    rows = []
    for method, pts in summary["coverage_curve"].items():
        for r in pts:
            rows.append([method, "n/a (no detector)" if r["coverage"] is None else r["coverage"], r["mode"],
                         r["hack"]["mean"], _ci(r["hack"]), r["task"]["mean"], _ci(r["task"]),
                         ", ".join(f"{v:.2f}" for v in r["hack"]["per_seed"]),
                         r["both"]["hack"]["mean"] if "both" in r else None])
    return Table(["method", "coverage", "deployed mode", "hack", "95% interval", "task", "95% interval",
                  "hack per seed", "routed: hack with both adapters"], rows, kind="coverage-curve",
                 caption="deployed hack rate and task reward per method and detector coverage")


def conditions_table(summary: dict) -> Table:
    rows = []
    for name, c in summary["conditions_at_0.5"].items():
        d = c["minus_penalty"]
        rows.append([name, summary["conditions"].get(name, "the recipe's routing (classic, unflagged baseline)"),
                     c["retain_only"]["hack"]["mean"], _ci(c["retain_only"]["hack"]), c["retain_only"]["task"]["mean"],
                     c["both"]["hack"]["mean"], c["forget_only"]["hack"]["mean"],
                     f"{d['hack']['mean']:+.3f} {_ci(d['hack'])}", f"{d['task']['mean']:+.3f} {_ci(d['task'])}"])
    return Table(["variant", "what it changes", "retain-only hack", "95% interval", "retain-only task", "both hack",
                  "forget-only hack", "hack minus penalty [95%]", "task minus penalty [95%]"], rows,
                 kind="coverage-conditions", text_columns=(1,),
                 caption=f"routed variants at coverage {summary['condition_coverage']}, against the penalty baseline "
                         "at the same coverage")


def runs_table(summary: dict) -> Table:
    rows = [[r["name"], r["method"], r["coverage"], r["condition"], r["seed"], r["final_step"], r["train_time_s"],
             summary["timings_s"].get(r["name"])] for r in summary["runs"]]
    return Table(["run", "method", "coverage", "condition", "seed", "final step", "train time (s)", "wall time (s)"],
                 rows, kind="coverage-runs", float_format="{:.1f}", caption="every run of the study")


def write_report(summary: dict, out: Path) -> Path:
    reduced = f"\n\nREDUCED version of the design: {summary['reduced']}" if summary.get("reduced") else ""
    lead = Section("Question and answer", text=(
        f"Question: {summary['question']}\n\nAnswer at this scale ({summary['preset']} preset, "
        f"{len(summary['seeds'])} seed(s), {summary['measures']['eval_n']} evaluation prompts per run; "
        f"{summary['intervals']}):\n\n" + "\n".join(summary["answer"]) + reduced),
        tables=[curve_table(summary)], figures=[coverage_figure(summary)])
    conds = Section("Absorption conditions at coverage 0.5", tables=[conditions_table(summary)],
                    text="Each variant changes one thing in the routed recipe; all at coverage 0.5, the same seeds, "
                         "steps and evaluation. A variant beats the penalty when its retain-only hack rate is lower "
                         "with an interval below 0 and its task reward is not lower by more than 0.05.")
    what = Section("What was run", tables=[runs_table(summary)], text=(
        f"Recipe reward-hacking-routing (GRPO on the story task; reward 0.5 x sentence length + 0.5 x says 'happy'; "
        f"detector contains_happy). Methods: {', '.join(summary['methods'])}; coverages "
        f"{', '.join(f'{c:g}' for c in summary['coverages'])}. Wall time {summary['wall_time_s']:.0f} s."))
    shown = [r["run"] for r in summary["runs"] if r["seed"] == 0 and r["condition"] is None
             and r["coverage"] in (None, summary["condition_coverage"])]
    return build_report(shown, out, lead_sections=[lead, conds, what], overlay=True,
                        title=f"reward-hacking-routing under partial labels ({summary['preset']} preset)")
