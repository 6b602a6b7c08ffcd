"""Study 1 at matched compute (seed 000, after Chu et al. 2025, "SFT memorizes, RL generalizes"): from
one SFT checkpoint, does more SFT or RL move the OOD splits, at the same training compute?

    start     cards-sft trained to a modest ID accuracy (one checkpoint, shared by every arm and seed)
    sft       more SFT on the ID training data, from the start
    grpo      GRPO on fresh ID prompts (reward: the answer is correct), from the start
    grpo_ood  GRPO with a share of prompts from OOD shifts (`env.ood_fraction`): it SEES those shifts,
              so on them it is not a test of generalisation (the summary lists them under `sees`)
    grpo_sftlr  GRPO on ID prompts at the SFT continuation's learning rate: whether the comparison
              depends on RL's learning rate (the recipe's is 4x lower)

Compute is counted in token-passes (`mechrl.train.compute`: a token forward = 1, backward = 2, RL's
sampling and no-grad passes included). Each arm is ONE run per seed that checkpoints at the first
step whose running compute reaches each budget (`train.checkpoint_at_compute`; GRPO stops at the
last one, `train.max_token_passes`; SFT runs a few steps past it) and evaluates every split there on
the same first `n_eval` examples. The arms' points therefore sit at compute >= each budget, within
one step of it (the summary gives each point's exact compute). Intervals: two-level bootstrap over
seeds and examples (`intervals.py`); the start is one checkpoint, so the change from it is paired
by example.

Then the final checkpoints of seed 0 and the start are analysed (`sft_vs_rl_analysis.analyze`:
probes, patching, ablation top-k Jaccard between every pair, SAE ID-specific vs OOD-stable features).

    mechrl study sft-vs-rl --preset smoke   # minutes: the whole design, tiny sizes
    mechrl study sft-vs-rl --preset full    # the study (3 seeds; see docs/studies-science.md for timings)

Files: `<out>/start/` (the SFT start run), `<out>/runs/<arm>_s<seed>/` (ordinary run directories: a
killed study resumes each where it stopped), `<out>/analysis/`, `<out>/summary.json`, `<out>/report.html`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mechrl.config import GRPORunConfig, SFTRunConfig, load_config
from mechrl.errors import UserError
from mechrl.runs.rundir import RunDir, atomic_write_json
from mechrl.studies.intervals import outcomes_array, two_level_interval
from mechrl.train.compute import TRAIN

log = logging.getLogger(__name__)

ARMS: dict[str, str] = {
    "sft": "more SFT on the ID training data",
    "grpo": "GRPO on fresh ID prompts (reward: correct answer), the cards-grpo recipe's learning rate",
    "grpo_ood": "GRPO with a share of prompts from OOD shifts (sees them)",
    "grpo_sftlr": "GRPO on fresh ID prompts at the SFT continuation's learning rate (a sensitivity arm)",
}
#: Differences between arms reported with intervals: (a, b) means a - b.
PAIRS = (("grpo", "sft"), ("grpo_ood", "sft"), ("grpo_ood", "grpo"), ("grpo_sftlr", "sft"), ("grpo_sftlr", "grpo"))


@dataclass(frozen=True)
class MatchedPreset:
    """The sizes of one run of the matched-compute design (every field lands in summary.json)."""

    task: dict  # cards task overrides shared by every run
    start: dict  # cards-sft overrides of the shared start (besides the task)
    sft: dict  # cards-sft overrides of the SFT continuation
    grpo: dict  # cards-grpo overrides of both GRPO arms
    ood_fraction: float
    ood_splits: tuple[str, ...]
    budgets: tuple[float, ...]  # token-passes, increasing
    n_eval: int  # examples per split at every evaluated point (the same first n for every run)
    analysis: str | None  # `sft_vs_rl_analysis` preset for the final checkpoints; None: none
    seeds: int  # default number of seeds
    sft_margin: float = 1.1  # SFT max_steps = margin x last budget / the start's compute per step
    reduced: str | None = None  # why this preset is a reduced version of the design (None: it is not)
    model: dict = field(default_factory=dict)


PRESETS: dict[str, MatchedPreset] = {
    "smoke": MatchedPreset(
        task={"n_train": 2000, "n_val": 50, "n_test": 100, "n_ood": 100},
        start={"train.max_steps": 20, "train.warmup_steps": 5, "train.log_every": 5},
        sft={"train.lr": 2.0e-4, "train.lr_schedule": "constant", "train.warmup_steps": 2, "train.log_every": 2},
        grpo={"train.prompts_per_step": 4, "train.num_generations": 4, "train.save_every": 4, "train.sample_every": 2},
        ood_fraction=0.25, ood_splits=("ood_composition",), budgets=(5e3, 1e4, 2e4, 4e4), n_eval=16,
        analysis="smoke", seeds=1),
    "full": MatchedPreset(
        task={},
        start={"train.max_steps": 800, "train.log_every": 50},
        sft={"train.lr": 2.0e-4, "train.lr_schedule": "constant", "train.warmup_steps": 20, "train.log_every": 20},
        grpo={"train.save_every": 25, "train.sample_every": 25},
        ood_fraction=0.25, ood_splits=("ood_composition",), budgets=(4e5, 8e5, 1.6e6, 3.2e6), n_eval=500,
        analysis="tiny", seeds=3),
}


# ----------------------------------------------------------------------------------------------- configs

def _common(p: MatchedPreset, out_dir: Path, seed: int) -> dict:
    ov = {f"task.{k}": v for k, v in p.task.items()}
    ov.update({f"model.{k}": v for k, v in p.model.items()})
    ov.update({"out_dir": str(out_dir), "seed": seed, "eval.n_per_split": p.n_eval, "eval.n_final": p.n_eval})
    return ov


def start_config(p: MatchedPreset, out: Path) -> SFTRunConfig:
    """The shared start: cards-sft with the preset's steps, evaluated at its end on `n_eval` examples."""
    ov = _common(p, out, 0)
    ov.update(p.start)
    ov["train.eval_every"] = ov["train.max_steps"]
    cfg, _ = load_config("cards-sft", ov, kind="sft")
    assert isinstance(cfg, SFTRunConfig)
    return cfg


def sft_arm_config(p: MatchedPreset, out: Path, seed: int, start: Path, task, passes_per_step: float) -> SFTRunConfig:
    """More SFT from the start: checkpoints at every budget, max_steps a margin past the last one."""
    steps = math.ceil(p.sft_margin * p.budgets[-1] / passes_per_step)
    ov = _common(p, out / "runs", seed)
    ov.update(p.sft)
    ov.update({"model.path": str(start), "train.max_steps": steps, "train.eval_every": steps,
               "train.checkpoint_at_compute": list(p.budgets)})
    cfg, _ = load_config("cards-sft", ov, kind="sft")
    return cfg.model_copy(update={"task": task})


def grpo_arm_config(p: MatchedPreset, out: Path, seed: int, start: Path, task, ood: bool,
                    lr: float | None = None) -> GRPORunConfig:
    """GRPO from the start, stopping at the last budget. max_steps is only a bound: each step costs at
    least 4 token-passes per sequence (one sampled token, forward and backward), so the budget is
    always reached first."""
    ov = _common(p, out / "runs", seed)
    ov.update(p.grpo)
    cfg0, _ = load_config("cards-grpo", {**ov}, kind="grpo")
    rows = cfg0.train.prompts_per_step * cfg0.train.num_generations
    bound = math.ceil(p.budgets[-1] / ((1 + TRAIN) * rows))
    ov.update({"model.path": str(start), "train.max_steps": bound, "train.eval_every": bound,
               "train.checkpoint_at_compute": list(p.budgets), "train.max_token_passes": p.budgets[-1]})
    if ood:
        ov.update({"env.ood_fraction": p.ood_fraction, "env.ood_splits": list(p.ood_splits)})
    if lr is not None:
        ov["train.lr"] = lr
    cfg, _ = load_config("cards-grpo", ov, kind="grpo")
    return cfg.model_copy(update={"task": task})


# ----------------------------------------------------------------------------------------------- points

def _evals(run: Path) -> list[dict]:
    """Every eval/step-N.json of a run, by step."""
    files = sorted((run / "eval").glob("step-*.json"), key=lambda f: int(f.stem.split("-")[1]))
    out = []
    for f in files:
        d = json.loads(f.read_text())
        for key in ("compute", "correct"):
            if key not in d:
                raise UserError(f"{f}: no {key!r} (an evaluation of an older mechrl?); rerun the study with --force")
        out.append(d)
    return out


def _point(d: dict) -> dict:
    return {"step": d["step"], "token_passes": d["compute"]["token_passes"],
            "splits": {s: {"accuracy": r["accuracy"], "format_error_rate": r["format_error_rate"], "n": r["n"],
                           "groups": {g: gr["accuracy"] for g, gr in r["groups"].items()}}
                       for s, r in d["splits"].items()},
            "correct": d["correct"]}


def budget_points(run: Path, budgets: tuple[float, ...]) -> list[dict]:
    """Per budget, the evaluation of the checkpoint whose compute first reached it (the earliest
    evaluated step with compute >= budget). Raises when a budget was never reached."""
    evals = _evals(run)
    out = []
    for b in budgets:
        at = [d for d in evals if d["compute"]["token_passes"] >= b]
        if not at:
            reached = max((d["compute"]["token_passes"] for d in evals), default=0)
            raise RuntimeError(f"{run}: no evaluated checkpoint reached the budget {b:g} token-passes (the run "
                               f"reached {reached:g}); its max_steps is too small for the budget")
        out.append({"budget": b, **_point(min(at, key=lambda d: d["step"]))})
    return out


# ----------------------------------------------------------------------------------------------- stats

def _arrays(points_by_seed: list[dict], split: str, members: np.ndarray | None) -> np.ndarray:
    a = outcomes_array([pt["correct"][split] for pt in points_by_seed])  # (S, n)
    return a if members is None else a[:, members]


def summarise(start: dict, points: dict[str, list[list[dict]]], task, n_boot: int) -> tuple[list, dict]:
    """Intervals per arm, budget, split and rule family; differences between arms.

    `points[arm]` is a list over seeds of `budget_points` lists. Returns (over_seeds, differences):
    over_seeds[arm][i] = {budget, token_passes (per seed), splits: {split: {accuracy, delta_vs_start,
    per_seed, groups: {family: {accuracy, delta_vs_start, n}}}}}; differences["a-b"][i] =
    {budget, splits: {split: {mean, lo, hi, groups: {family: {mean, lo, hi}}}}}."""
    def iv(groups, weights, seed):
        m, lo, hi = two_level_interval(groups, weights, n_boot=n_boot, seed=seed)
        return {"mean": m, "lo": lo, "hi": hi}

    splits = list(start["correct"])
    members = {}  # split -> {family: column indices}
    for s in splits:
        fam = [str(x) for x in task.datasets[s].select(range(len(start["correct"][s])))[task.group_key]]
        members[s] = {g: np.array([i for i, f in enumerate(fam) if f == g]) for g in sorted(set(fam))}
    over: dict = {}
    for arm, per_seed in points.items():
        rows = []
        for i, b in enumerate(per_seed[0]):
            pts = [seed_pts[i] for seed_pts in per_seed]
            row = {"budget": b["budget"], "token_passes": [pt["token_passes"] for pt in pts],
                   "steps": [pt["step"] for pt in pts], "splits": {}}
            for k, s in enumerate(splits):
                A, S0 = _arrays(pts, s, None), _arrays([start], s, None)
                entry = {"accuracy": iv([A], [1.0], k), "delta_vs_start": iv([A, S0], [1.0, -1.0], k),
                         "per_seed": [pt["splits"][s]["accuracy"] for pt in pts], "groups": {}}
                for g, cols in members[s].items():
                    Ag, Sg = A[:, cols], S0[:, cols]
                    entry["groups"][g] = {"accuracy": iv([Ag], [1.0], k), "delta_vs_start": iv([Ag, Sg], [1.0, -1.0], k),
                                          "n": int(cols.size)}
                row["splits"][s] = entry
            rows.append(row)
        over[arm] = rows
    diffs: dict = {}
    for a, b in PAIRS:
        if a not in points or b not in points:
            continue
        rows = []
        for i in range(len(points[a][0])):
            pa, pb = [sp[i] for sp in points[a]], [sp[i] for sp in points[b]]
            row = {"budget": pa[0]["budget"], "splits": {}}
            for k, s in enumerate(splits):
                A, B = _arrays(pa, s, None), _arrays(pb, s, None)
                entry = iv([A, B], [1.0, -1.0], 100 + k)
                entry["groups"] = {g: iv([A[:, c], B[:, c]], [1.0, -1.0], 100 + k) for g, c in members[s].items()}
                row["splits"][s] = entry
            rows.append(row)
        diffs[f"{a}-{b}"] = rows
    return over, diffs


def answer_lines(summary: dict) -> list[str]:
    """One line per split at the largest budget: each arm's change from the start and the arms'
    differences, with 95% intervals, and whether the interval excludes zero."""
    last = -1
    lines = []
    for s in summary["start"]["splits"]:
        parts = []
        for arm, rows in summary["over_seeds"].items():
            d = rows[last]["splits"][s]["delta_vs_start"]
            parts.append(f"{arm} {_signed(d)}")
        for pair, rows in summary["arm_differences"].items():
            parts.append(f"{pair.replace('-', ' - ')} {_signed(rows[last]['splits'][s])}")
        seen = [a for a, spec in summary["arms"].items() if s in spec["sees"]]
        note = f" (seen in training by {', '.join(seen)})" if seen else ""
        lines.append(f"{s}{note}: start {summary['start']['splits'][s]['accuracy']:.3f}; " + "; ".join(parts))
    return lines


def inside_differences(res: dict) -> dict:
    """From `analyze`'s result, what the summary keeps beside its headline: each checkpoint's SAE feature
    classes per OOD split (ID-specific, OOD-stable, ...) and its probes' scores on every distribution
    at the layer and position that are best on ID test."""
    out: dict = {"sae_feature_classes": {}, "probe_scores_at_best_id_layer": {}}
    for name, r in res["checkpoints"].items():
        if "sae" in r:
            out["sae_feature_classes"][name] = r["sae"]["feature_classes"]
        if "probes" in r:
            best = res["headline"][name]["best_probe"]
            out["probe_scores_at_best_id_layer"][name] = {
                label: {rec["distribution"]: rec["value"] for rec in pr["records"]
                        if rec["layer"] == best[label]["layer"] and rec["position"] == best[label]["position"]}
                for label, pr in r["probes"]["labels"].items()}
    return out


def _signed(d: dict) -> str:
    mark = "" if d["lo"] <= 0 <= d["hi"] else "*"
    return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]{mark}"


# ----------------------------------------------------------------------------------------------- driver

def _train(cfg, name: str, force: bool) -> tuple[RunDir, Path]:
    from mechrl.train.runners import train

    run = RunDir.start(cfg, name, force=force)
    return run, train(cfg, run)


def run_matched(out: Path, *, preset: str, seeds: int | None = None, force: bool = False) -> dict:
    """The matched-compute design at `preset` (see the module docstring); writes summary.json and
    report.html into `out` and returns the summary. Rerunning resumes: finished runs are not trained
    again, an interrupted one continues from its last checkpoint."""
    import torch

    from mechrl.tasks import build_task

    if preset not in PRESETS:
        raise UserError(f"sft-vs-rl: unknown matched-compute preset {preset!r}; presets: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    seeds = p.seeds if seeds is None else seeds
    if seeds < 1:
        raise UserError(f"sft-vs-rl: --seeds must be >= 1, got {seeds}")
    t0 = time.perf_counter()
    out = Path(out)
    torch.set_num_threads(1)  # a shared 2-core machine: one thread per run is the fastest per core
    timings: dict[str, float] = {}

    log.info("sft-vs-rl (%s): the shared SFT start", preset)
    t1 = time.perf_counter()
    start_cfg = start_config(p, out)
    start_run, start_final = _train(start_cfg, "start", force)
    timings["start"] = time.perf_counter() - t1
    start_eval = _point(json.loads((start_run.eval_dir / f"{start_final.name}.json").read_text()))
    start_steps = int(start_final.name.split("-")[1])
    passes_per_step = start_eval["token_passes"] / start_steps
    task_cfg = start_cfg.task
    task = build_task(task_cfg)

    points: dict[str, list[list[dict]]] = {arm: [] for arm in ARMS}
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    jobs = [(arm, seed) for seed in range(seeds) for arm in ARMS]
    for i, (arm, seed) in enumerate(jobs, 1):
        if arm == "sft":
            cfg = sft_arm_config(p, out, seed, start_final, task_cfg, passes_per_step)
        else:
            cfg = grpo_arm_config(p, out, seed, start_final, task_cfg, ood=arm == "grpo_ood",
                                  lr=p.sft["train.lr"] if arm == "grpo_sftlr" else None)
        log.info("sft-vs-rl (%s): run %d/%d, %s seed %d", preset, i, len(jobs), arm, seed)
        t1 = time.perf_counter()
        run, final = _train(cfg, f"{arm}_s{seed}", force)
        timings[f"{arm}_s{seed}"] = time.perf_counter() - t1
        status = run.status()
        points[arm].append(budget_points(run.path, p.budgets))
        runs[arm].append({"seed": seed, "run": str(run.path), "final_checkpoint": str(final),
                          "final_step": int(final.name.split("-")[1]), "token_passes": status.get("token_passes"),
                          "train_time_s": status.get("train_time_s")})

    t1 = time.perf_counter()
    over, diffs = summarise(start_eval, points, task, n_boot=2000)
    summary = {
        "study": "sft-vs-rl", "design": "matched-compute", "preset": preset, "seeds": list(range(seeds)),
        "reduced": p.reduced,
        "question": "From one SFT checkpoint, at matched training compute, which continuation moves which "
                    "OOD split, and by how much: more SFT, GRPO on ID prompts, or GRPO that also sees a share "
                    "of OOD prompts?",
        "compute_unit": "token-passes: a token forward = 1, backward = 2; RL sampling (prefill of each distinct "
                        "prompt + each generated token) and no-grad passes included; evaluation excluded "
                        "(mechrl.train.compute)",
        "budgets": list(p.budgets),
        "preset_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(p).items()},
        "arms": {arm: {"label": label, "sees": list(p.ood_splits) if arm == "grpo_ood" else [],
                       "runs": runs[arm]} for arm, label in ARMS.items()},
        "start": {"run": str(start_run.path), "checkpoint": str(start_final), "steps": start_steps,
                  "token_passes": start_eval["token_passes"], "train_time_s": start_run.status().get("train_time_s"),
                  "splits": start_eval["splits"]},
        "points": {arm: [[{k: v for k, v in pt.items() if k != "correct"} for pt in seed_pts]
                         for seed_pts in per_seed] for arm, per_seed in points.items()},
        "over_seeds": over, "arm_differences": diffs,
        "intervals": "95% percentile intervals of a two-level bootstrap (2000 replicates): seeds resampled per "
                     "arm, examples resampled jointly (paired); * marks an interval that excludes 0",
    }
    summary["answer"] = answer_lines(summary)
    timings["summary"] = time.perf_counter() - t1

    sections = []
    if p.analysis is not None:
        from mechrl.studies.sft_vs_rl_analysis import analyze

        t1 = time.perf_counter()
        ckpts = {"start": start_final, **{arm: Path(runs[arm][0]["final_checkpoint"]) for arm in ARMS}}
        log.info("sft-vs-rl (%s): analysing the final checkpoints of seed 0 and the start", preset)
        res = analyze(ckpts, task, out=out, preset=p.analysis)
        summary["analysis"] = {"preset": p.analysis, "dir": str(out / "analysis"), "what": res["what"],
                               "checkpoints": {k: str(v) for k, v in ckpts.items()}, **res["headline"],
                               **inside_differences(res)}
        sections = res["sections"]
        timings["analysis"] = time.perf_counter() - t1
    else:
        summary["analysis"] = None
    summary["timings_s"] = timings
    summary["wall_time_s"] = time.perf_counter() - t0
    atomic_write_json(out / "summary.json", summary)

    from mechrl.studies.sft_vs_rl_matched_report import write_report

    write_report(summary, out / "report.html", sections)
    return summary
