"""Reading one run directory (the layout in `mechrl/runs/rundir.py`) into plain data for a report.

A path that is not a run directory or a config that is not YAML is a `ReportError` (a `UserError`)
naming the file. A damaged record (a metrics or samples line that is not JSON, an evaluation or
status file that does not parse) is skipped and listed in `RunData.skipped`, which the report shows
first: a report of what can be read, with what could not, beats no report. Missing metrics,
evaluations or samples are not errors: a running or just-started run has none yet, and the report
says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mechrl.errors import UserError
from mechrl.runs.rundir import read_jsonl_lenient

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
    skipped: list[str] = field(default_factory=list)  # "file[:line]: why" of each damaged record left out

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
    skipped: list[str] = []
    metrics = _read_records(path / "metrics.jsonl", skipped)
    keep = []
    for row in metrics:
        if isinstance(row.get("step"), int):
            keep.append(row)
        else:
            skipped.append(f"{path / 'metrics.jsonl'}: a record without an integer 'step': {str(row)[:80]}")
    metrics = keep
    evals = {}
    eval_dir = path / "eval"
    if eval_dir.is_dir():
        for p in sorted(eval_dir.iterdir()):
            m = _EVAL_NAME.match(p.name)
            if m:
                try:
                    evals[int(m.group(1))] = _read_eval(p)
                except ReportError as e:
                    skipped.append(str(e))
    status_path = path / "status.json"
    status = {"status": "new"}
    if status_path.exists():
        try:
            status = _read_json(status_path)
        except ReportError as e:
            skipped.append(str(e))
            status = {"status": "unreadable"}
    samples = _read_records(path / "samples.jsonl", skipped)
    return RunData(path=path, config=config, metrics=metrics, evals=dict(sorted(evals.items())),
                   samples=samples, status=status, skipped=skipped)


def _read_records(path: Path, skipped: list[str]) -> list[dict]:
    rows, bad = read_jsonl_lenient(path)
    skipped += [f"{path}:{i}: {why}" for i, why in bad]
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
