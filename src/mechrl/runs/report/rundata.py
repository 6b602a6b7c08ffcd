"""Reading one run directory (the layout in `mechrl/runs/rundir.py`) into plain data for a report.

A path that is not a run directory, a config that is not YAML, a metrics line that is not JSON:
each is a `ReportError` (a `UserError`) naming the file. Missing metrics, evaluations or samples
are not errors: a running or just-started run has none yet, and the report says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mechrl.errors import UserError
from mechrl.runs.rundir import read_jsonl

_EVAL_NAME = re.compile(r"^step-(\d+)\.json$")


class ReportError(UserError):
    """A report cannot be made from this input (not a run directory, unreadable files)."""


@dataclass
class RunData:
    path: Path
    config: dict[str, Any]              # config.yaml, as loaded
    metrics: list[dict[str, Any]]       # metrics.jsonl rows: {"step": N, "<ns>/<name>": value, ...}
    evals: dict[int, dict[str, Any]]    # checkpoint step -> eval/step-N.json
    samples: list[dict[str, Any]]       # samples.jsonl rows
    status: dict[str, Any]              # status.json ({"status": "new"} when absent)

    @property
    def name(self) -> str:
        return self.path.name


def load_run(path: str | Path) -> RunData:
    """Read a run directory; raise `ReportError` when `path` is not one or a file is unreadable."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"not a run directory: {path} (no such directory)")
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise ReportError(f"not a run directory: {path} (no config.yaml)")
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as e:
        raise ReportError(f"{config_path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ReportError(f"{config_path}: expected a mapping of config keys, got {type(config).__name__}")
    metrics = _read_records(path / "metrics.jsonl")
    for i, row in enumerate(metrics, 1):
        if not isinstance(row.get("step"), int):
            raise ReportError(f"{path / 'metrics.jsonl'}:{i}: a metrics record without an integer 'step'")
    evals = {}
    eval_dir = path / "eval"
    if eval_dir.is_dir():
        for p in eval_dir.iterdir():
            m = _EVAL_NAME.match(p.name)
            if m:
                evals[int(m.group(1))] = _read_eval(p)
    status_path = path / "status.json"
    status = _read_json(status_path) if status_path.exists() else {"status": "new"}
    return RunData(path=path, config=config, metrics=metrics, evals=dict(sorted(evals.items())),
                   samples=_read_records(path / "samples.jsonl"), status=status)


def _read_records(path: Path) -> list[dict]:
    try:
        rows = read_jsonl(path)
    except ValueError as e:  # read_jsonl names the file and line
        raise ReportError(str(e)) from None
    bad = [i for i, r in enumerate(rows, 1) if not isinstance(r, dict)]
    if bad:
        raise ReportError(f"{path}:{bad[0]}: expected a JSON object per line")
    return rows


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_eval(path: Path) -> dict:
    data = _read_json(path)
    splits = data.get("splits")
    if not isinstance(splits, dict):
        raise ReportError(f"{path}: an evaluation file needs a 'splits' object (see mechrl/evaluate.py)")
    for split, r in splits.items():
        missing = [k for k in ("accuracy", "format_error_rate", "n") if k not in r]
        if missing:
            raise ReportError(f"{path}: split {split!r} lacks {missing}")
    return data


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}. Lists and scalars are leaves; an empty
    mapping is a leaf too (so that `{}` and a missing key differ)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
