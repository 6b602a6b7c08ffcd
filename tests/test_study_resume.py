"""Both study designs end to end at their smoke presets, from the command line: the report leads with
the question and answer; and a study process killed with SIGKILL in the middle of a run, then rerun
with the same command, writes the same results as an uninterrupted one. Slow (minutes each):
`pytest -m slow tests/test_study_resume.py`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

EXE = os.path.join(os.path.dirname(sys.executable), "mechrl")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
RESULTS = Path(__file__).resolve().parent.parent / "results"


def _checkpoint(run: str, step: int):
    def cond(out: Path) -> bool:
        return (out / "runs" / run / "checkpoints" / f"step-{step}").is_dir()
    return cond


CASES = {
    # name: (command, kill when, summary parts that must be equal, committed full-size result to match keys with)
    "sft-vs-rl": (["study", "sft-vs-rl", "--preset", "smoke"], _checkpoint("grpo_s0", 4),
                  ["budgets", "points", "over_seeds", "arm_differences", "answer"], "sft-vs-rl-full"),
    "reward-hacking-routing": (["study", "reward-hacking-routing", "--preset", "coverage-smoke"],
                               _checkpoint("routed_c0.5_s0", 2),
                               ["coverage_curve", "conditions_at_0.5", "routed_minus_penalty", "answer"],
                               "reward-hacking-routing-coverage"),
}


SCHEMA = {"sft-vs-rl": ["start", "arms", "compute_unit"], "reward-hacking-routing": ["runs", "measures", "conditions"]}


def _run(args: list[str], out: Path) -> None:
    r = subprocess.run([EXE, *args, "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["summary"] == str(out / "summary.json")


def _kill_when(args: list[str], out: Path, condition) -> str:
    proc = subprocess.Popen([EXE, *args, "--out", str(out)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            if condition(out):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return "killed"
            time.sleep(0.01)
        return "finished first"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _keys(x, prefix=""):
    """Every key path of a JSON value (list entries under [])."""
    if isinstance(x, dict):
        return {p for k, v in x.items() for p in {f"{prefix}.{k}"} | _keys(v, f"{prefix}.{k}")}
    if isinstance(x, list):
        return set().union(*(_keys(v, f"{prefix}[]") for v in x)) if x else set()
    return set()


@pytest.mark.parametrize("study", list(CASES))
def test_killed_study_resumes_to_the_same_results(tmp_path, study):
    args, condition, parts, full = CASES[study]
    _run(args, tmp_path / "reference")
    ref = json.loads((tmp_path / "reference" / "summary.json").read_text())
    html = (tmp_path / "reference" / "report.html").read_text()
    assert html.index("Question and answer") < html.index("What was run") < html.index("Appendix")
    assert _kill_when(args, tmp_path / "killed", condition) == "killed"
    assert not (tmp_path / "killed" / "summary.json").exists()
    _run(args, tmp_path / "killed")
    got = json.loads((tmp_path / "killed" / "summary.json").read_text())
    for part in parts:
        assert got[part] == ref[part], f"{study}: summary[{part!r}] differs after a kill and a rerun"
    # the full-size result committed in results/ has the same top-level keys and, in every structured
    # part (arms, splits, families, budgets, coverages, modes), the same key paths; free-form parts
    # (timings per run, the preset's overrides, the analysis preset's labels) may differ
    committed = RESULTS / full / "summary.json"
    if committed.is_file():
        big = json.loads(committed.read_text())
        assert set(big) == set(ref)
        for part in parts + SCHEMA[study]:
            if part != "answer":
                assert _keys(big[part]) == _keys(ref[part]), f"{study}: key paths of {part!r} differ from {committed}"
