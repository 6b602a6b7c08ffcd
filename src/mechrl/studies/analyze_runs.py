"""`mechrl analyze`: find the checkpoints of a run or a study directory, check they share one task,
and run the sft-vs-rl analysis (`sft_vs_rl_analysis.analyze`) on them with a report.

    analyze_dir("runs/demo")                     # a study: sft/ and grpo/ final checkpoints
    analyze_dir("runs/cards-sft_s0", checkpoint="step-1100")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mechrl.studies.sft_vs_rl_analysis import PRESETS, WHATS, analyze, parse_what


def task_of_run(run_dir: Path):
    """The task a run trained on, built from its config.yaml (as `mechrl eval` does)."""
    import yaml

    from mechrl.config import build_task_config
    from mechrl.tasks import build_task

    cfg_path = Path(run_dir) / "config.yaml"
    data = (yaml.safe_load(cfg_path.read_text()) or {}).get("task")
    if not data:
        raise ValueError(f"{cfg_path} has no task section")
    return build_task(build_task_config(data, source=str(cfg_path)))


def final_checkpoint(run_dir: Path, checkpoint: str | None = None) -> Path:
    """`checkpoints/<checkpoint>` of a run, or its final checkpoint (the run must have finished)."""
    from mechrl.errors import UserError
    from mechrl.runs.rundir import RunDir

    run = RunDir(run_dir)
    if checkpoint is not None:
        path = run.checkpoints_dir / checkpoint
        if not (path / "config.json").is_file():
            have = ", ".join(p.name for _, p in run.checkpoints()) or "none"
            raise UserError(f"{run_dir}: no checkpoint {checkpoint!r} (checkpoints: {have})")
        return path
    st = run.status()
    if st.get("status") != "finished" or not st.get("final_checkpoint"):
        raise UserError(f"{run_dir}: run is not finished (status {st.get('status')!r}); "
                        "name a checkpoint with --checkpoint step-N")
    path = Path(st["final_checkpoint"])
    if not (path / "config.json").is_file():
        raise UserError(f"{run_dir}: final checkpoint {path} is missing")
    return path


STUDY_PHASES = ("sft", "grpo")


def resolve_target(target: str | Path, checkpoint: str | None = None) -> tuple[dict[str, Path], list[Path]]:
    """A study dir (with sft/ and grpo/ runs) or a run dir -> ({name: checkpoint}, [run dirs])."""
    from mechrl.errors import UserError

    target = Path(target)
    if not target.is_dir():
        raise UserError(f"{target} is not a directory")
    if all((target / ph / "config.yaml").is_file() for ph in STUDY_PHASES):
        if checkpoint is not None:
            raise UserError(f"{target} is a study (sft/ and grpo/); --checkpoint applies to a single run")
        runs = [target / ph for ph in STUDY_PHASES]
        return {ph: final_checkpoint(target / ph) for ph in STUDY_PHASES}, runs
    if (target / "config.yaml").is_file():
        ck = final_checkpoint(target, checkpoint)
        return {ck.name if checkpoint else "final": ck}, [target]
    raise UserError(f"{target} is neither a run directory (config.yaml) nor a study directory "
                    f"(sft/ and grpo/ runs)")


def analyze_dir(target: str | Path, what: Sequence[str] = WHATS, *, out: str | Path | None = None,
                preset: str = "tiny", checkpoint: str | None = None) -> dict:
    """`mechrl analyze`: analyze a run's or a study's final checkpoints and write `<out>/analysis/report.html`."""
    from mechrl.errors import UserError
    from mechrl.runs.report import build_report

    if preset not in PRESETS:
        raise UserError(f"unknown analysis preset {preset!r}; presets: {', '.join(PRESETS)}")
    what = parse_what(list(what))
    ckpts, runs = resolve_target(target, checkpoint)
    task = task_of_run(runs[-1])
    for r in runs[:-1]:
        other = task_of_run(r)
        if other.cfg != task.cfg:
            raise UserError(f"{r} and {runs[-1]} were trained on different task configs; analyze them one by one")
    out = Path(out) if out is not None else Path(target)
    result = analyze(ckpts, task, what, out=out, preset=preset)
    report = out / "analysis" / "report.html"
    build_report(runs, report, extra_sections=result["sections"],
                 title=f"Analysis of {target} ({', '.join(what)}; {preset} preset)")
    result["report"] = str(report)
    return result
