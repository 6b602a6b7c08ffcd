"""The rlhf-diffing study: its recipes load and validate (the control differs from the policy only in its reward),
bad keys are errors, and (slow) the smoke preset runs end to end, writing summary.json and report.html, and a
rerun resumes without retraining."""

from __future__ import annotations

import json

import pytest

from mechrl.config import ConfigError, load_config
from mechrl.studies.registry import STUDIES, get_study
from mechrl.studies.rlhf_diffing_config import load_study_config


def test_study_is_registered_and_its_recipe_loads():
    spec = get_study("rlhf-diffing")
    assert spec.presets == ("tiny", "smoke") and "rlhf-diffing" in STUDIES
    cfg = load_study_config(preset="smoke")
    assert cfg.preset == "smoke" and cfg.rl_preset == "smoke" and cfg.crosscoder.steps == 60
    tiny = load_study_config(preset="tiny")
    assert tiny.rl_recipe == "sentiment-grpo" and tiny.crosscoder.site == "auto"
    assert [r.name for r in tiny.control_reward] == ["no_signal", "vader"]
    over = load_study_config(preset="tiny", overrides=["crosscoder.k=4", "rl_recipe=sentiment-ppo"])
    assert over.crosscoder.k == 4 and over.rl_recipe == "sentiment-ppo"


def test_study_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'crosscoder.steps'"):
        load_study_config(overrides=["crosscoder.stepz=3"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_study_config(preset="huge")
    with pytest.raises(ConfigError, match="rank_by"):
        load_study_config(overrides=["divergence.rank_by=nope"])
    with pytest.raises(ConfigError, match="kind: study"):
        load_study_config("sentiment-grpo")


@pytest.mark.parametrize("recipe", ["sentiment-grpo", "sentiment-ppo"])
def test_sentiment_recipes_and_their_control(recipe):
    cfg, name = load_config(recipe)
    assert [r.name for r in cfg.reward] == ["vader"] and cfg.model.builtin == "stories"
    assert cfg.train.lora is None  # full fine-tuning: diffing looks at every weight
    ctl, ctl_name = load_config(recipe, ["preset=control"])
    assert [(r.name, r.weight) for r in ctl.reward] == [("no_signal", 1.0), ("vader", 0.0)]
    a, b = cfg.model_dump(), ctl.model_dump()
    diff = {k for k in a if a[k] != b[k]}
    assert diff == {"reward", "preset"}  # the same recipe in everything else
    smoke, _ = load_config(recipe, ["preset=smoke"])
    assert smoke.model.builtin == "stories-fast"


@pytest.mark.slow
def test_smoke_study_end_to_end(tmp_path):
    from mechrl.studies.registry import run_study

    out = tmp_path / "study"
    summary = run_study("rlhf-diffing", out, preset="smoke")
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["bar"] == summary["bar"]
    for key in ("reward_rises", "positive_latent_in_top5", "exclusive_policy", "exclusive_control"):
        assert key in summary["bar"]
    assert summary["divergence"]["top_layers"] and set(summary["mmcs"]) == {str(x) for x in summary["divergence"]["top_layers"]}
    assert [r["step"] for r in summary["along"]] == [2, 4]
    assert summary["corpus"]["sources"] == {"story": 40, "base": 24, "policy": 24, "control": 24}
    html = (out / "report.html").read_text()
    assert html.index("Question and answer") < html.index("Exclusive latents") < html.index("The RL runs")
    for f in ("corpus.json", "divergence.json", "paired_saes.json", "descriptions.json", "reward_probes.json",
              "crosscoders/policy/crosscoder.safetensors", "crosscoders/control/table.json"):
        assert (out / "analysis" / f).is_file(), f
    before = (out / "analysis" / "crosscoders" / "policy" / "crosscoder.safetensors").stat().st_mtime_ns
    again = run_study("rlhf-diffing", out, preset="smoke")  # resumes: nothing retrained
    assert (out / "analysis" / "crosscoders" / "policy" / "crosscoder.safetensors").stat().st_mtime_ns == before
    assert again["bar"] == summary["bar"] and again["mmcs"] == json.loads(json.dumps(summary["mmcs"]))
