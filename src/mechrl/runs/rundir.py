"""Run directories: the plain, documented artifacts every stage reads and writes.

    <out_dir>/<run name>/
      config.yaml            the fully resolved config
      metrics.jsonl          one JSON object per logging step: {"step": N, "train/loss": ..., ...}
      samples.jsonl          completions: step, split, prompt, completion, answer, correct, ...
      train.log              the run's log
      checkpoints/step-N/    safetensors weights + tokenizer + config (+ resume state)
      eval/step-N.json       evaluation of every split at checkpoint N
      status.json            {"status": "running" | "finished", ...}
      report.html            the run's HTML report, written when it finishes (mechrl/runs/report/)

Nothing here is ever left half-written by a killed process: JSON files are written to a temporary
file and renamed; JSONL records are appended as whole lines in one `write`, and a partial last line
(only possible if the machine died mid-write) is cut off when the file is next opened.

A run launched as several processes (`accelerate launch`, `torchrun`) has one writer: rank 0. On
every other rank a `RunDir` is read-only (it may find checkpoints to resume from) and any write
raises, so a code path that forgets to check the rank fails loudly instead of writing twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

from mechrl.config import ConfigError, RunConfig, config_to_yaml
from mechrl.runs.tracking import NullTracker, Tracker, build_tracker

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")


def dumps(obj: Any) -> str:
    """JSON with NaN/inf refused (a NaN in a metrics file is a bug upstream, never data)."""
    return json.dumps(obj, default=_json_default, allow_nan=False)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, default=_json_default, allow_nan=False, indent=2) + "\n")


def repair_jsonl(path: Path) -> int:
    """Cut a trailing partial line off `path`. Returns the bytes removed."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
        return len(data) - keep


def append_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Append records as whole lines with a single write."""
    payload = "".join(dumps(r) + "\n" for r in records).encode()
    if not payload:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, payload)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON line ({e})") from None
    return out


def launch_rank() -> int:
    """The global rank a multi-process launcher (torchrun, accelerate launch) set; 0 when this
    process is not one of several."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


class RunDir:
    """One run's directory. Create with `RunDir.start(cfg, name)`; reopen with `RunDir(path)`.
    Read-only on the non-zero ranks of a multi-process launch (module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tracker: Tracker = NullTracker()  # metric sinks beside metrics.jsonl; see runs/tracking.py
        self.readonly = launch_rank() != 0

    def check_writable(self, what: str) -> None:
        if self.readonly:
            raise RuntimeError(f"{self.path}: {what} on rank {launch_rank()}; only rank 0 writes the run directory")

    # -- layout ---------------------------------------------------------------------------------
    config_path = property(lambda self: self.path / "config.yaml")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    samples_path = property(lambda self: self.path / "samples.jsonl")
    log_path = property(lambda self: self.path / "train.log")
    status_path = property(lambda self: self.path / "status.json")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    eval_dir = property(lambda self: self.path / "eval")

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"{CHECKPOINT_PREFIX}{step}"

    # -- lifecycle ------------------------------------------------------------------------------
    @classmethod
    def start(cls, cfg: RunConfig, name: str, *, force: bool = False) -> "RunDir":
        """Create the run directory, or reopen it to resume when it holds the same config.

        A directory with a different config is an error that names the differing keys (a run name
        must mean one config); `force` deletes it and starts over."""
        path = Path(cfg.out_dir) / name
        run = cls(path)
        if run.readonly:  # rank 0 creates or checks the directory; the loops wait for it at a barrier
            return run
        text = config_to_yaml(cfg)
        if path.exists() and force:
            shutil.rmtree(path)
        if run.config_path.exists():
            old = yaml.safe_load(run.config_path.read_text())
            new = yaml.safe_load(text)
            if old != new:
                diffs = _diff_keys(old, new)
                raise ConfigError(f"{path} exists with a different config ({', '.join(diffs[:5])}); "
                                  "use another name, seed or out_dir, or --force to start over")
        path.mkdir(parents=True, exist_ok=True)
        if not run.config_path.exists():
            atomic_write_text(run.config_path, text)
        for p in (run.metrics_path, run.samples_path):
            cut = repair_jsonl(p)
            if cut:
                log.warning("%s: removed a partial last line (%d bytes) left by a killed process", p, cut)
        run.tracker = build_tracker(cfg.tracking, path, name, cfg.model_dump(mode="json"))
        return run

    def close(self) -> None:
        """Close the tracker's sinks (metrics.jsonl needs no closing)."""
        self.tracker.close()
        self.tracker = NullTracker()

    def status(self) -> dict:
        return json.loads(self.status_path.read_text()) if self.status_path.exists() else {"status": "new"}

    def set_status(self, status: str, **extra) -> None:
        self.check_writable("set_status")
        atomic_write_json(self.status_path, {"status": status, "time": time.time(), **extra})

    @property
    def finished(self) -> bool:
        return self.status().get("status") == "finished"

    # -- records --------------------------------------------------------------------------------
    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        self.check_writable("log_metrics")
        bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"{self.path.name}: non-finite metrics at step {step}: {bad}")
        append_jsonl(self.metrics_path, [{"step": int(step), **metrics}])
        self.tracker.log(int(step), metrics)

    def log_samples(self, records: list[dict]) -> None:
        self.check_writable("log_samples")
        append_jsonl(self.samples_path, records)

    def metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path)

    def truncate_after(self, step: int) -> None:
        """Drop metric and sample records logged after `step` (a resumed run redoes those steps)."""
        self.check_writable("truncate_after")
        for p in (self.metrics_path, self.samples_path):
            rows = read_jsonl(p)
            keep = [r for r in rows if r.get("step", 0) <= step]
            if len(keep) != len(rows):
                atomic_write_text(p, "".join(dumps(r) + "\n" for r in keep))
                log.info("%s: dropped %d records after step %d (resuming)", p.name, len(rows) - len(keep), step)

    def write_eval(self, step: int, result: dict) -> Path:
        self.check_writable("write_eval")
        path = self.eval_dir / f"step-{step}.json"
        atomic_write_json(path, result)
        return path

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, sorted by step."""
        if not self.checkpoints_dir.exists():
            return []
        out = []
        for p in self.checkpoints_dir.iterdir():
            if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit():
                out.append((int(p.name[len(CHECKPOINT_PREFIX):]), p))
        return sorted(out)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        cps = self.checkpoints()
        return cps[-1] if cps else None

    # -- logging --------------------------------------------------------------------------------
    def attach_log(self) -> logging.Handler:
        """Send the `mechrl` logger to train.log; returns the handler (remove it when done)."""
        self.check_writable("attach_log")
        handler = logging.FileHandler(self.log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger("mechrl")
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        return handler


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]
