"""Kill real `mechrl sft` and `mechrl grpo` processes with SIGKILL at 10 moments each, rerun the same
command, and check the run directory as if nothing had happened: one record per logged step, an eval
file for every evaluated checkpoint, the final step equal to max_steps, status "finished",
report.html written, and final weights equal to an uninterrupted run's.

Three moments are chosen by what is on disk (before the first checkpoint; between a checkpoint and
the end of its evaluation; while the final report is written), the other seven at random points of
the run: a random delay (0 to 1 s) after a random step's metrics appear, so that the moments fall
inside the run however loaded the machine is. Slow (minutes): `make test-slow` or `pytest -m slow tests/test_random_kills.py`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mechrl.runs.rundir import RunDir, read_jsonl
from test_run_integrity import GRPO, SFT, check_complete

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

EXE = os.path.join(os.path.dirname(sys.executable), "mechrl")
ARGS = {"sft": ["sft", "cards-sft", *SFT, "train.max_steps=40"],
        "grpo": ["grpo", "cards-grpo", *GRPO, "train.max_steps=12", "train.save_every=3", "train.eval_every=6"]}
MAX_STEPS = {"sft": 40, "grpo": 12}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _run_dir(out: Path) -> RunDir | None:
    dirs = [p for p in out.iterdir() if p.is_dir()] if out.exists() else []
    return RunDir(dirs[0]) if dirs else None


def _before_first_checkpoint(out: Path) -> bool:
    run = _run_dir(out)
    return run is not None and run.metrics_path.exists() and run.metrics_path.stat().st_size > 0 \
        and not run.checkpoints()


def _between_checkpoint_and_eval(out: Path) -> bool:
    run = _run_dir(out)
    if run is None:
        return False
    for step, _ in run.checkpoints():
        if not (run.eval_dir / f"step-{step}.json").exists():
            return True
    # GRPO evaluates before it checkpoints: there the window is an eval file without its checkpoint
    steps = {s for s, _ in run.checkpoints()}
    evals = [int(p.stem.split("-")[1]) for p in run.eval_dir.glob("step-*.json")] if run.eval_dir.exists() else []
    return any(e > 0 and e not in steps for e in evals)


def _during_final_report(out: Path) -> bool:
    run = _run_dir(out)
    return run is not None and run.status_path.exists() and run.finished and not (run.path / "report.html").exists()


def _after_step(step: int):
    """A condition: the run has logged a record of `step` (or later)."""
    def cond(out: Path) -> bool:
        run = _run_dir(out)
        if run is None or not run.metrics_path.exists():
            return False
        text = run.metrics_path.read_text()
        return any(json.loads(line).get("step", -1) >= step for line in text.splitlines()[-3:] if line.endswith("}"))
    return cond


def _kill_when(args: list[str], out: Path, *, condition, delay_s: float = 0.0) -> str:
    """Start the command, SIGKILL it `delay_s` after `condition(out)` first holds; returns what
    happened ("killed" or "finished first")."""
    proc = subprocess.Popen([EXE, *args, f"out_dir={out}"], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    fire_at = None
    try:
        while proc.poll() is None:
            if fire_at is None and condition(out):
                fire_at = time.monotonic() + delay_s
            if fire_at is not None and time.monotonic() >= fire_at:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return "killed"
            time.sleep(0.002)
        return "finished first"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _final_weights(run: RunDir, kind: str) -> dict[str, torch.Tensor]:
    return load_file(str(run.checkpoint_path(MAX_STEPS[kind]) / "model.safetensors"))


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_ten_random_kills_lose_and_duplicate_nothing(tmp_path, kind):
    args = ARGS[kind]
    t0 = time.monotonic()
    r = subprocess.run([EXE, *args, f"out_dir={tmp_path / 'reference'}"], env=ENV, capture_output=True, text=True,
                       timeout=900)
    duration = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    ref = _run_dir(tmp_path / "reference")
    ref_weights = _final_weights(ref, kind)
    rng = random.Random(f"kills-{kind}")
    moments = [("before the first checkpoint", dict(condition=_before_first_checkpoint)),
               ("between a checkpoint and its evaluation", dict(condition=_between_checkpoint_and_eval)),
               ("during the final report", dict(condition=_during_final_report))]
    logged = sorted({r["step"] for r in read_jsonl(ref.metrics_path) if r["step"] > 0})
    for step, delay in sorted((rng.choice(logged[:-1]), rng.uniform(0.0, 1.0)) for _ in range(7)):
        moments.append((f"{delay:.2f} s after step {step} was logged", dict(condition=_after_step(step), delay_s=delay)))
    outcomes = []
    for i, (what, when) in enumerate(moments):
        out = tmp_path / f"kill{i}"
        outcome = _kill_when(args, out, **when)
        r = subprocess.run([EXE, *args, f"out_dir={out}"], env=ENV, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"rerun after a kill {what}: {r.stderr[-2000:]}"
        run = _run_dir(out)
        check_complete(run, MAX_STEPS[kind])
        weights = _final_weights(run, kind)
        assert weights.keys() == ref_weights.keys()
        for k in weights:
            torch.testing.assert_close(weights[k], ref_weights[k], rtol=0, atol=0, msg=f"{k} after a kill {what}")
        outcomes.append((what, outcome))
    killed = [w for w, o in outcomes if o == "killed"]
    assert len(killed) >= 8, outcomes  # the moments are inside the run: nearly every one is a real kill
    print(json.dumps({"kind": kind, "uninterrupted_s": round(duration, 1), "outcomes": outcomes}))
