"""The data of a sweep that its backends share: the trials (`Trial`), the plan (`SweepPlan`) and the
record of their statuses (`SweepRecord`, `sweep.json`). `sweep.py` builds and summarises them,
`sweep_backends.py` runs the trials; both import this module, and neither imports the other's
direction back (the backends never import `sweep.py`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechrl.runs.rundir import RunDir, atomic_write_json

__all__ = ["Trial", "SweepPlan", "SweepRecord"]


@dataclass(frozen=True)
class Trial:
    """One grid point: the overrides that make its run, and where that run lives."""

    index: int
    name: str
    """The run's name (from `load_config`): unique within the sweep."""
    kind: str
    """sft / grpo / ppo: the `mechrl` subcommand that runs it."""
    overrides: tuple[str, ...]
    """`key=value` strings passed to the run's command: fixed, then the grid point, then out_dir."""
    params: dict[str, Any]
    """The grid values of this trial, parsed ({"seed": 1, "train.lr": 0.001})."""
    run_dir: Path


@dataclass
class SweepPlan:
    recipe: Path
    name: str
    """The recipe's run name prefix (config `name`)."""
    grid: dict[str, list[str]]
    fixed: list[str]
    dir: Path
    trials: list[Trial] = field(default_factory=list)

    @property
    def logs_dir(self) -> Path:
        return self.dir / "logs"

    def log_path(self, t: Trial) -> Path:
        return self.logs_dir / f"{t.name}.log"

    def pid_path(self, t: Trial) -> Path:
        return self.logs_dir / f"{t.name}.pid"


class SweepRecord:
    """`sweep.json`: the plan and every trial's status. Rewritten (atomically) on every change,
    so a killed sweep leaves a readable record; trials it left `running` are re-run next time."""

    STATUSES = ("pending", "running", "finished", "failed")

    def __init__(self, plan: SweepPlan, backend: str):
        self.plan = plan
        self.path = plan.dir / "sweep.json"
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        old_trials = {t["name"]: t for t in old.get("trials", [])}
        self.trials: dict[str, dict] = {}
        for t in plan.trials:
            prev = old_trials.get(t.name, {})
            self.trials[t.name] = {
                "name": t.name, "kind": t.kind, "params": t.params, "overrides": list(t.overrides),
                "run_dir": str(t.run_dir), "log": str(plan.log_path(t)),
                "status": "finished" if RunDir(t.run_dir).finished else "pending",
                "attempts": prev.get("attempts", 0),
                **{k: prev[k] for k in ("exit_code", "signal", "error", "host", "started", "ended") if k in prev},
            }
        self.backend = backend
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, {
            "recipe": str(self.plan.recipe), "name": self.plan.name, "grid": self.plan.grid,
            "fixed": self.plan.fixed, "backend": self.backend, "updated": time.time(),
            "trials": list(self.trials.values()),
        })

    def status(self, t: Trial) -> str:
        return self.trials[t.name]["status"]

    def started(self, t: Trial) -> None:
        rec = self.trials[t.name]
        rec.update(status="running", started=time.time(), attempts=rec["attempts"] + 1)
        for k in ("exit_code", "signal", "error", "ended"):
            rec.pop(k, None)
        self.save()

    def ended(self, t: Trial, result: dict) -> str:
        """Record a trial's outcome (`exit_code`, `signal`, `error`, `host` from the backend).
        Finished means exit code 0 AND the run directory says finished; anything else is failed."""
        rec = self.trials[t.name]
        rec.update({k: v for k, v in result.items() if k in ("exit_code", "signal", "error", "host")})
        rec["ended"] = time.time()
        run_status = RunDir(t.run_dir).status().get("status")
        if result.get("exit_code") == 0 and run_status == "finished":
            rec["status"] = "finished"
        else:
            rec["status"] = "failed"
            if result.get("exit_code") == 0:
                rec["error"] = f"exited 0 but {t.run_dir / 'status.json'} says {run_status!r}"
        self.save()
        return rec["status"]

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in self.STATUSES}
        for rec in self.trials.values():
            out[rec["status"]] += 1
        return out
