"""The feature-control study: its recipe and presets, the arms' reward lists, and (slow) the smoke preset end to end."""

from __future__ import annotations

import json

import pytest

from mechrl.errors import UserError
from mechrl.studies.feature_control import ARMS, arm_config, arm_rewards, load_study_config
from mechrl.studies.registry import get_study

SEL = {"features": [{"index": 5, "tau": 0.25, "alpha": 1.5}, {"index": 9, "tau": 0.0, "alpha": 0.5}],
       "kl_indices": [5, 9, 1], "beta": 0.3}


def test_recipe_presets_load_and_differ_only_in_size():
    tiny, smoke = load_study_config(preset="tiny"), load_study_config(preset="smoke")
    assert tiny.arms == list(ARMS) and smoke.arms == list(ARMS)
    assert tiny.rl["train"]["max_steps"] > smoke.rl["train"]["max_steps"]
    assert smoke.rl["model"]["builtin"] == "stories-fast" and tiny.rl["model"]["builtin"] == "stories"
    assert get_study("feature-control").presets == ("tiny", "smoke")


def test_recipe_errors_are_one_line_user_errors():
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        load_study_config(preset="huge")
    with pytest.raises(UserError, match="sarm.kk") as e:
        load_study_config(preset="tiny", overrides={"sarm.kk": 3})
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="arms"):
        load_study_config(preset="tiny", overrides={"arms": ["rm_only", "rm_only"]})
    with pytest.raises(UserError, match="train.lrr"):
        load_study_config(preset="tiny", overrides={"rl.train.lrr": 1.0})


def test_each_arm_optimises_its_terms_and_logs_the_same_monitors(tmp_path):
    cfg = load_study_config(preset="smoke")
    weights = {}
    for arm in ARMS:
        rewards = arm_rewards(arm, "S", SEL, "H", cfg)
        weights[arm] = {r["name"]: r.get("weight", 1.0) for r in rewards}
    names = {arm: set(w) for arm, w in weights.items()}
    assert all(n == names["rm_only"] for n in names.values())  # every arm logs every term
    assert {"feature_fires_5", "feature_fires_9", "rm_score", "positive_word_any", "sentence_length_10_smooth",
            "latent_firing_kl"} <= names["rm_only"]
    optimised = {arm: {n for n, w in ws.items() if w != 0} for arm, ws in weights.items()}
    assert optimised["rm_only"] == optimised["head_edit"] == optimised["text_detector"] == {"sarm_score"}
    assert optimised["feature_penalty"] == {"sarm_score", "feature_penalty"}
    assert optimised["penalty_kl"] == {"sarm_score", "feature_penalty", "latent_kl"}
    assert weights["penalty_kl"]["latent_kl"] == 0.3
    head = {arm: next(r for r in arm_rewards(arm, "S", SEL, "H", cfg) if r["name"] == "sarm_score")["params"]
            for arm in ARMS}
    assert head["head_edit"]["head_zero"] == [5, 9] and "head_zero" not in head["rm_only"]
    pen = next(r for r in arm_rewards("feature_penalty", "S", SEL, "H", cfg) if r["name"] == "feature_penalty")
    assert pen["params"] == {"sarm": "S", "features": [5, 9], "taus": [0.25, 0.0], "alphas": [1.5, 0.5]}
    # the text detector: the same total penalty, applied by a detector of the positive words
    rc = arm_config(cfg, "text_detector", 1, tmp_path, SEL)
    assert rc.mitigation.method == "penalty" and rc.mitigation.penalty == 2.0 and rc.seed == 1
    assert rc.mitigation.detector.params["words"] == cfg.data.positive_words
    assert arm_config(cfg, "rm_only", 0, tmp_path, SEL).mitigation.detector is None


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 80 s on an idle 2-core machine; far more on a busy one
def test_smoke_preset_end_to_end(tmp_path):
    from mechrl.cli import main

    out = tmp_path / "fc"
    assert main(["study", "feature-control", "--preset", "smoke", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["arms"]) == set(ARMS)
    for arm, a in s["arms"].items():
        assert a["final"]["hack_rate"]["n"] == 1
        assert "reward/positive_word_any/mean" in a["series"]
    html = (out / "report.html").read_text()
    assert html.index("Question and answer") < html.index("Over steps") < html.index("Evasion check")
    assert (out / "selected_features.json").is_file()
    # a rerun reuses every stage and run
    assert main(["study", "feature-control", "--preset", "smoke", "--out", str(out)]) == 0


def test_bar_check_by_hand():
    from mechrl.studies.feature_control_report import bar_check

    def arm(h, q):
        return {"final": {"hack_rate": {"mean": h}, "quality": {"mean": q}}}

    arms = {"rm_only": arm(0.8, 0.5), "feature_penalty": arm(0.4, 0.45), "head_edit": arm(0.41, 0.6),
            "penalty_kl": arm(0.2, 0.44)}
    bar = bar_check(arms, {"hack_rate": 0.3})
    assert bar["baseline_learns_hack"] is True
    assert bar["feature_penalty"]["meets_bar"] is True  # halved exactly, quality x0.9
    assert bar["head_edit"]["halves_hack"] is False and bar["head_edit"]["meets_bar"] is False
    assert bar["penalty_kl"]["keeps_quality"] is False
    # a baseline that does not rise to 0.5 fails the bar for every arm
    weak = bar_check({"rm_only": arm(0.45, 0.5), "feature_penalty": arm(0.1, 0.5)}, {"hack_rate": 0.3})
    assert weak["baseline_learns_hack"] is False and weak["feature_penalty"]["meets_bar"] is False


def test_conditional_firing_rates():
    import torch

    from mechrl.studies.feature_control import _conditional

    fires = torch.tensor([True, False, True, True, False])
    hack = [True, True, False, True, False]
    got = _conditional(fires, hack)
    assert got == pytest.approx({"rate": 0.6, "given_hack": 2 / 3, "given_no_hack": 0.5})
    assert _conditional(fires, [False] * 5)["given_hack"] is None
