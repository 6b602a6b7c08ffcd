"""The summaries of the two study designs on synthetic results (no training): sft-vs-rl at matched
compute (budget points, intervals per split and family, the answer) and reward-hacking-routing
under partial labels (coverage curves, variants against the penalty, the verdict)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from mechrl.studies import reward_hacking_coverage as cov
from mechrl.studies import sft_vs_rl_matched as svr


# ----------------------------------------------------------------------------------------------- sft-vs-rl

def _eval_file(run, step, passes, correct):
    (run / "eval").mkdir(parents=True, exist_ok=True)
    splits = {s: {"accuracy": c.count("1") / len(c), "format_error_rate": 0.0, "n": len(c),
                  "groups": {"a": {"accuracy": 0.0}}} for s, c in correct.items()}
    (run / "eval" / f"step-{step}.json").write_text(json.dumps(
        {"step": step, "splits": splits, "compute": {"token_passes": passes}, "correct": correct}))


def test_budget_points_take_the_checkpoint_that_first_reached_each_budget(tmp_path):
    run = tmp_path / "r"
    for step, passes in ((0, 0), (3, 90), (4, 120), (8, 240), (9, 270)):
        _eval_file(run, step, passes, {"test": "10"})
    pts = svr.budget_points(run, (100, 120, 250))
    assert [(p["budget"], p["step"], p["token_passes"]) for p in pts] == [(100, 4, 120), (120, 4, 120), (250, 9, 270)]
    with pytest.raises(RuntimeError, match="no evaluated checkpoint reached the budget 300"):
        svr.budget_points(run, (300,))


class _Task:
    group_key = "family"

    def __init__(self, families):
        self.datasets = {s: Dataset.from_dict({"family": f}) for s, f in families.items()}


def _pt(budget, passes, correct):
    return {"budget": budget, "step": 1, "token_passes": passes, "correct": correct,
            "splits": {s: {"accuracy": c.count("1") / len(c)} for s, c in correct.items()}}


def test_summarise_and_answer_on_hand_made_outcomes():
    fam = ["x", "x", "y", "y"]
    task = _Task({"test": fam, "ood_colors": fam})
    start = {"correct": {"test": "1000", "ood_colors": "0000"},
             "splits": {"test": {"accuracy": 0.25}, "ood_colors": {"accuracy": 0.0}}}
    points = {  # arm -> seeds -> budgets
        "sft": [[_pt(10, 11, {"test": "1100", "ood_colors": "0000"})],
                [_pt(10, 12, {"test": "1100", "ood_colors": "0000"})]],
        "grpo": [[_pt(10, 15, {"test": "1111", "ood_colors": "1111"})],
                 [_pt(10, 14, {"test": "1111", "ood_colors": "1111"})]],
    }
    over, diffs = svr.summarise(start, points, task, n_boot=200)
    s = over["sft"][0]
    assert s["token_passes"] == [11, 12]
    assert s["splits"]["test"]["accuracy"]["mean"] == pytest.approx(0.5)
    assert s["splits"]["test"]["delta_vs_start"]["mean"] == pytest.approx(0.25)
    assert s["splits"]["test"]["groups"]["x"]["accuracy"]["mean"] == pytest.approx(1.0)  # rows 0, 1 of family x
    assert s["splits"]["test"]["groups"]["y"]["delta_vs_start"]["mean"] == pytest.approx(0.0)
    g = over["grpo"][0]["splits"]["ood_colors"]
    assert (g["accuracy"]["mean"], g["accuracy"]["lo"], g["accuracy"]["hi"]) == (1.0, 1.0, 1.0)
    d = diffs["grpo-sft"][0]["splits"]["ood_colors"]
    assert (d["mean"], d["lo"], d["hi"]) == (1.0, 1.0, 1.0)
    assert set(diffs) == {"grpo-sft"}  # pairs whose arms both ran
    summary = {"start": start, "over_seeds": over, "arm_differences": diffs,
               "arms": {"sft": {"sees": []}, "grpo": {"sees": ["ood_colors"]}}}
    lines = svr.answer_lines(summary)
    assert lines[1].startswith("ood_colors (seen in training by grpo): start 0.000")
    assert "grpo +1.000 [+1.000, +1.000]*" in lines[1] and "grpo - sft +1.000 [+1.000, +1.000]*" in lines[1]


def test_matched_configs_budgets_and_bounds(tmp_path):
    p = svr.PRESETS["smoke"]
    start = svr.start_config(p, tmp_path)
    assert start.train.eval_every == start.train.max_steps and start.eval.n_final == p.n_eval
    sft = svr.sft_arm_config(p, tmp_path, 1, tmp_path / "ckpt", start.task, passes_per_step=1000.0)
    assert sft.train.checkpoint_at_compute == list(p.budgets) and sft.seed == 1
    assert sft.train.max_steps == int(np.ceil(p.sft_margin * p.budgets[-1] / 1000.0))
    g = svr.grpo_arm_config(p, tmp_path, 0, tmp_path / "ckpt", start.task, ood=True)
    assert g.train.max_token_passes == p.budgets[-1] and g.env.ood_fraction == p.ood_fraction
    rows = g.train.prompts_per_step * g.train.num_generations
    assert g.train.max_steps * 4 * rows >= p.budgets[-1]  # each step costs at least 4 passes per row
    assert svr.grpo_arm_config(p, tmp_path, 0, tmp_path / "c", start.task, ood=False).env.ood_fraction == 0
    hi = svr.grpo_arm_config(p, tmp_path, 0, tmp_path / "c", start.task, ood=False, lr=p.sft["train.lr"])
    assert hi.train.lr == p.sft["train.lr"] != g.train.lr
    assert set(svr.PRESETS) == {"smoke", "full"} and svr.PRESETS["full"].seeds == 3


# ----------------------------------------------------------------------------------------------- coverage

def _result(method, coverage, condition, seed, hack, task=0.5, n=20):
    ev = {"retain_only": None} if method == "routed" else {"policy": None}
    modes = ("both", "retain_only", "forget_only") if method == "routed" else ("policy",)
    ev = {m: {cov.HACK: [1.0] * int(hack * n) + [0.0] * (n - int(hack * n)), cov.TASK: [task] * n} for m in modes}
    return {"method": method, "coverage": coverage, "condition": condition, "seed": seed, "eval": ev}


def test_coverage_summary_compares_the_deployed_policies():
    results = []
    for seed in (0, 1):
        results.append(_result("lora", None, None, seed, 0.9))
        for c in cov.COVERAGES:
            results.append(_result("routed", c, None, seed, 0.6 if c < 1 else 0.05))
            results.append(_result("filter", c, None, seed, 0.8))
            results.append(_result("penalty", c, None, seed, 0.3))
        for name in cov.conditions(100):
            results.append(_result("routed", 0.5, name, seed, 0.0 if name == "big_forget" else 0.7, task=0.6))
    s = cov.summarise(results, 100)
    assert [r["coverage"] for r in s["coverage_curve"]["routed"]] == list(cov.COVERAGES)
    assert s["coverage_curve"]["lora"][0]["coverage"] is None and s["coverage_curve"]["lora"][0]["mode"] == "policy"
    assert s["coverage_curve"]["routed"][0]["mode"] == "retain_only"
    assert s["routed_minus_penalty"]["0.5"]["hack"]["mean"] == pytest.approx(0.3)
    assert s["routed_minus_penalty"]["1"]["hack"]["mean"] == pytest.approx(-0.25)
    bf = s["conditions_at_0.5"]["big_forget"]["minus_penalty"]
    assert bf["hack"]["mean"] == pytest.approx(-0.3) and bf["task"]["mean"] == pytest.approx(0.1)
    verdict = cov.answer_lines({**s})[0]
    assert "at coverage 0.5 (hack interval below 0, task not more than 0.05 worse): big_forget;" in verdict
    assert verdict.endswith("coverages < 1 where plain routing beats it: none")


def test_coverage_jobs_and_configs(tmp_path):
    jobs = cov.jobs("coverage", 2)
    names = [j["name"] for j in jobs]
    assert len(jobs) == 2 * (1 + 3 * len(cov.COVERAGES) + len(cov.conditions(100))) and len(set(names)) == len(names)
    routed = cov.run_config("routed", "coverage", 1, tmp_path, coverage=0.25)
    assert routed.routing.detector.coverage == 0.25 and routed.routing.eval_n == 128 and routed.seed == 1
    pen = cov.run_config("penalty", "coverage", 0, tmp_path, coverage=0.75)
    assert pen.mitigation.detector.coverage == 0.75 and pen.mitigation.method == "penalty" and not pen.routing.enabled
    with pytest.raises(ValueError, match="no detector"):
        cov.run_config("lora", "coverage", 0, tmp_path, coverage=0.5)
    c = cov.conditions(100)
    late = cov.run_config("routed", "coverage", 0, tmp_path, coverage=0.5, extra=c["forget_ablated_last_quarter"][1])
    assert late.routing.ablate_forget_from == 76
    front = cov.run_config("routed", "coverage", 0, tmp_path, coverage=0.5, extra=c["frontloaded_labels"][1])
    assert front.routing.detector.full_coverage_steps == 25 and front.routing.detector.coverage == 0.5


def test_recipe_presets_name_the_study_conditions():
    """`mechrl grpo reward-hacking-routing preset=<condition>` is the study's run of that condition (seed
    aside): the recipe's presets equal the study's overrides at coverage 0.5 for its 100 steps."""
    from mechrl.config import load_config

    for name, (_, overrides) in cov.conditions(100).items():
        cfg, _ = load_config("reward-hacking-routing", [f"preset={name}"], kind="grpo")
        study = cov.run_config("routed", "coverage", 0, Path("runs"), coverage=0.5, extra=overrides)
        assert cfg.routing.model_dump() == study.routing.model_copy(
            update={"eval_every": cfg.routing.eval_every, "eval_n": cfg.routing.eval_n}).model_dump(), name
    half, _ = load_config("reward-hacking-routing", ["preset=half_coverage"], kind="grpo")
    assert half.routing.detector.coverage == 0.5
