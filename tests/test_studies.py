"""`mechrl study <name>`: every registered study runs end to end at its smoke preset from one
command and writes summary.json and a report that leads with its question and answer."""

from __future__ import annotations

import json

import pytest

from mechrl.cli import main
from mechrl.studies.registry import STUDIES


def test_registry_and_unknown_study(capsys):
    assert {"sft-vs-rl", "reward-hacking-routing"} <= set(STUDIES)
    assert all(s.presets for s in STUDIES.values())
    assert main(["study", "reward-hacking-routin"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'reward-hacking-routing'" in err and "Traceback" not in err
    assert main(["study", "sft-vs-rl", "--preset", "huge"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["study"])  # a study name is required


def test_reward_hacking_routing_study_smoke(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["study", "reward-hacking-routing", "--preset", "smoke", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["summary"] == str(out / "summary.json")
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"routed", "lora", "filter", "penalty", "early_stop"}
    assert set(summary["arms"]["routed"]["0"]["modes"]) == {"both", "retain_only", "forget_only"}
    for arm in ("lora", "filter", "penalty", "early_stop"):
        assert set(summary["arms"][arm]["0"]["modes"]) == {"policy"}
    for arm, modes in summary["over_seeds"].items():
        for v in modes.values():
            assert 0.0 <= v["hack"]["mean"] <= 1.0 and v["hack"]["n"] == 1
    html = (out / "report.html").read_text()
    assert html.index("Question and answer") < html.index("Final evaluation") < html.index("Appendix")
    # a second call resumes: every run is finished, nothing is trained again
    assert main(["study", "reward-hacking-routing", "--preset", "smoke", "--out", str(out)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["over_seeds"] == summary["over_seeds"]
