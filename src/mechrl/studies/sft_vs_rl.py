"""Study 1, sft-vs-rl (seed 000): SFT a small GPT-2 on the card game, then RL (GRPO) from the SFT
checkpoint; every ID and OOD split is evaluated at every checkpoint of both phases, and accuracy
and format errors are summarised per split and rule family for each phase.

`mechrl demo` runs it at its tiny preset and writes `<out>/report.html` (both runs compared, with
the per-phase table below) and `<out>/summary.json`:

    {"phases": {"sft":  {"run": ..., "checkpoint": ..., "step": ..., "train_time_s": ...,
                         "splits": {"test": {"accuracy", "format_error_rate", "n", "groups": {...}}, ...}},
                "grpo": {... the same for the RL phase}},
     "analysis": {"preset", "dir", "what", "wall_time_s", "sft": {headline numbers}, "grpo": {...},
                  "jaccard_top10": {"sft|grpo": {split: Jaccard of the top-10 ablated components}}},
     "wall_time_s": ...}
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from mechrl.config import load_config
from mechrl.evaluate import format_table
from mechrl.runs.report import Section, Table, build_report
from mechrl.runs.rundir import RunDir, atomic_write_json
from mechrl.train.grpo import run_grpo
from mechrl.train.sft import run_sft

log = logging.getLogger(__name__)


def _phase_summary(run: RunDir, checkpoint: Path) -> dict:
    step = int(checkpoint.name.split("-")[1])
    result = json.loads((run.eval_dir / f"step-{step}.json").read_text())
    return {"run": str(run.path), "checkpoint": str(checkpoint), "step": step,
            "train_time_s": run.status().get("train_time_s"), "splits": result["splits"]}


def run_demo(out: Path, preset: str = "tiny", force: bool = False, analysis: bool = True, seed: int = 0) -> dict:
    """SFT then GRPO at the given preset into `out/sft` and `out/grpo`; print and save the
    per-split table of each phase. Re-running resumes whatever is unfinished. With `analysis`, both
    final checkpoints are then analysed (`sft_vs_rl_analysis`, its smoke preset for the smoke demo,
    else its tiny one) into `out/analysis`, and the headline numbers go into summary.json. `seed` seeds
    both phases (model initialisation, data order, sampling); the task's data is the same for every seed."""
    t0 = time.perf_counter()
    out = Path(out)
    sft_cfg, _ = load_config("cards-sft", [f"preset={preset}", f"out_dir={out}", f"seed={seed}"], kind="sft")
    sft_run = RunDir.start(sft_cfg, "sft", force=force)
    sft_final = run_sft(sft_cfg, sft_run)

    # RL starts from the SFT checkpoint, on exactly the SFT run's task (same tokenizer and splits)
    rl_cfg, _ = load_config("cards-grpo", [f"preset={preset}", f"out_dir={out}", f"model.path={sft_final}",
                                           f"seed={sft_cfg.seed}"], kind="grpo")
    rl_cfg = rl_cfg.model_copy(update={"task": sft_cfg.task})
    rl_run = RunDir.start(rl_cfg, "grpo", force=force)
    rl_final = run_grpo(rl_cfg, rl_run)

    summary = {"preset": preset, "phases": {"sft": _phase_summary(sft_run, sft_final),
                                            "grpo": _phase_summary(rl_run, rl_final)}}
    sections = [phases_section(summary)]
    if analysis:
        from mechrl.studies.sft_vs_rl_analysis import analyze
        from mechrl.tasks import build_task

        a_preset = "smoke" if preset == "smoke" else "tiny"
        t1 = time.perf_counter()
        res = analyze({"sft": sft_final, "grpo": rl_final}, build_task(sft_cfg.task), out=out, preset=a_preset)
        summary["analysis"] = {"preset": a_preset, "dir": str(out / "analysis"), "what": res["what"],
                               "wall_time_s": time.perf_counter() - t1, **res["headline"]}
        sections += res["sections"]
    summary["wall_time_s"] = time.perf_counter() - t0
    atomic_write_json(out / "summary.json", summary)
    build_report([sft_run.path, rl_run.path], out / "report.html", lead_sections=sections[:1],
                 extra_sections=sections[1:], overlay=False,
                 title=f"sft-vs-rl study ({preset} preset): SFT, then GRPO from its final checkpoint")
    return summary


def run_study(out: Path, *, preset: str = "tiny", seeds: int = 1, force: bool = False) -> dict:
    """`mechrl study sft-vs-rl`. Presets `smoke` and `full` run the matched-compute design
    (`sft_vs_rl_matched`: one SFT start, more SFT vs GRPO vs GRPO seeing OOD, at compute budgets).
    Preset `tiny` is the demo, once per seed (0..seeds-1): one seed writes into `out` itself (as
    `mechrl demo`); several write `out/seed-K/` each, and `out/summary.json` holds every seed's summary
    and, per phase and split, the accuracy's mean, min and max over seeds."""
    from mechrl.studies.sft_vs_rl_matched import PRESETS as MATCHED, run_matched

    if preset in MATCHED:
        return run_matched(Path(out), preset=preset, seeds=seeds, force=force)
    out = Path(out)
    if seeds == 1:
        return run_demo(out, preset=preset, force=force, seed=0)
    per_seed = {k: run_demo(out / f"seed-{k}", preset=preset, force=force, seed=k) for k in range(seeds)}
    first = per_seed[0]
    spread: dict = {}
    for phase in first["phases"]:
        for split in first["phases"][phase]["splits"]:
            accs = [s["phases"][phase]["splits"][split]["accuracy"] for s in per_seed.values()]
            spread.setdefault(phase, {})[split] = {"mean": sum(accs) / len(accs), "min": min(accs),
                                                   "max": max(accs), "n_seeds": len(accs)}
    summary = {"preset": preset, "seeds": {str(k): s for k, s in per_seed.items()}, "accuracy_over_seeds": spread}
    atomic_write_json(out / "summary.json", summary)
    runs = [Path(s["phases"][p]["run"]) for s in per_seed.values() for p in s["phases"]]
    rows = [[phase, split, v["mean"], v["min"], v["max"], v["n_seeds"]]
            for phase, splits in spread.items() for split, v in splits.items()]
    build_report(runs, out / "report.html", title=f"sft-vs-rl study ({preset} preset, {seeds} seeds)",
                 extra_sections=[Section("Accuracy over seeds", text="Final evaluation of each phase, over seeds "
                                         "(each seed's own report is in seed-K/report.html).",
                                         tables=[Table(["phase", "split", "mean", "min", "max", "seeds"], rows,
                                                       kind="seeds")])])
    return summary


def phases_section(summary: dict) -> Section:
    """The study's own report section: accuracy and format-error rate per split and rule family
    (rows) at each phase's final checkpoint (columns)."""
    phases = summary["phases"]
    columns = ["split", "rule family"]
    for p, ph in phases.items():
        columns += [f"{p} accuracy @{ph['step']}", f"{p} format err"]
    first = next(iter(phases.values()))
    rows = []
    for split, r in first["splits"].items():
        for group in [None, *r["groups"]]:
            row = [split, "all" if group is None else group]
            for ph in phases.values():
                x = ph["splits"][split] if group is None else ph["splits"][split]["groups"][group]
                row += [x["accuracy"], x["format_error_rate"]]
            rows.append(row)
    runs = ", ".join(f"{p}: {ph['run']}" for p, ph in phases.items())
    first, last = list(phases)[0], list(phases)[-1]
    moved = [f"{split} {phases[first]['splits'][split]['accuracy']:.3f} -> {phases[last]['splits'][split]['accuracy']:.3f}"
             for split in phases[first]["splits"]]
    text = ("Question: after SFT on the ID rules, what does RL (GRPO from the SFT checkpoint) change on the ID "
            "split and on each OOD shift? "
            f"Answer at this preset ({first} -> {last}, accuracy at each phase's final checkpoint): {'; '.join(moved)}. "
            "This preset runs a short RL phase after a long SFT one; it is not a matched-compute comparison.\n\n"
            f"Runs: {runs}. Each phase's own report follows; the hyperparameters that differ are in the appendix.")
    return Section("Question and answer", text=text,
                   tables=[Table(columns, rows, kind="phases", caption="accuracy per split, rule family and phase")])


def format_summary(summary: dict) -> str:
    """The per-split tables of each phase, then accuracy per split and phase."""
    sft, rl = summary["phases"]["sft"], summary["phases"]["grpo"]
    parts = [format_table({"splits": sft["splits"]}, title=f"SFT ({sft['step']} steps, {sft['train_time_s']:.0f} s of training)"),
             format_table({"splits": rl["splits"]}, title=f"GRPO from SFT ({rl['step']} steps)"),
             format_phases(summary)]
    if "analysis" in summary:
        from mechrl.studies.sft_vs_rl_analysis import format_headline

        a = summary["analysis"]
        parts.append(f"== analysis ({a['preset']} preset, {a['wall_time_s']:.0f} s; {a['dir']}) ==\n"
                     + format_headline({k: a[k] for k in ("sft", "grpo", "jaccard_top10", "top10_sizes") if k in a}))
    return "\n".join(parts)


def format_phases(summary: dict) -> str:
    """Accuracy per split (rows) and phase (columns)."""
    phases = list(summary["phases"])
    splits = list(summary["phases"][phases[0]]["splits"])
    rows = [["split", *phases]] + [[s, *(f"{summary['phases'][p]['splits'][s]['accuracy']:.3f}" for p in phases)]
                                   for s in splits]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["== accuracy per phase =="]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
