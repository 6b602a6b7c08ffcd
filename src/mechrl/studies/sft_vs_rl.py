"""Study 1, sft-vs-rl (seed 000): SFT a small GPT-2 on the card game, then RL (GRPO) from the SFT
checkpoint; every ID and OOD split is evaluated at every checkpoint of both phases, and accuracy
and format errors are summarised per split and rule family for each phase.

`mechrl demo` runs it at its tiny preset and writes `<out>/summary.json`:

    {"phases": {"sft":  {"run": ..., "checkpoint": ..., "step": ..., "train_time_s": ...,
                         "splits": {"test": {"accuracy", "format_error_rate", "n", "groups": {...}}, ...}},
                "grpo": {... the same for the RL phase}},
     "wall_time_s": ...}
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from mechrl.config import load_config
from mechrl.evaluate import format_table
from mechrl.runs.rundir import RunDir, atomic_write_json
from mechrl.train.grpo import run_grpo
from mechrl.train.sft import run_sft

log = logging.getLogger(__name__)


def _phase_summary(run: RunDir, checkpoint: Path) -> dict:
    step = int(checkpoint.name.split("-")[1])
    result = json.loads((run.eval_dir / f"step-{step}.json").read_text())
    return {"run": str(run.path), "checkpoint": str(checkpoint), "step": step,
            "train_time_s": run.status().get("train_time_s"), "splits": result["splits"]}


def run_demo(out: Path, preset: str = "tiny", force: bool = False) -> dict:
    """SFT then GRPO at the given preset into `out/sft` and `out/grpo`; print and save the
    per-split table of each phase. Re-running resumes whatever is unfinished."""
    t0 = time.perf_counter()
    out = Path(out)
    sft_cfg, _ = load_config("cards-sft", [f"preset={preset}", f"out_dir={out}"], kind="sft")
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
    summary["wall_time_s"] = time.perf_counter() - t0
    atomic_write_json(out / "summary.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    """The per-split tables of each phase, then accuracy per split and phase."""
    sft, rl = summary["phases"]["sft"], summary["phases"]["grpo"]
    return "\n".join([
        format_table({"splits": sft["splits"]}, title=f"SFT ({sft['step']} steps, {sft['train_time_s']:.0f} s of training)"),
        format_table({"splits": rl["splits"]}, title=f"GRPO from SFT ({rl['step']} steps)"),
        format_phases(summary)])


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
