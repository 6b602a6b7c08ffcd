"""Run directories: the plain, documented artifacts every stage reads and writes.

    <out_dir>/<run name>/
      config.yaml            the fully resolved config
      metrics.jsonl          one JSON object per logging step: {"step": N, "train/loss": ..., ...}
      samples.jsonl          completions: step, split, prompt, completion, answer, correct, ...
      train.log              the run's log
      checkpoints/step-N/    safetensors weights + tokenizer + config (+ resume state) + mechrl_task.yaml
      eval/step-N.json       evaluation of every split at checkpoint N
      status.json            {"status": "running" | "finished" | "failed", "reason": ..., ...}
      report.html            the run's HTML report, written when it finishes (mechrl/runs/report/)
      .lock                  who writes the run now: {"pid", "host", "started", "argv"} (see RunLock)

Nothing here is ever left half-written by a killed process: JSON files are written to a temporary
file and renamed; JSONL records are appended as whole lines in one `write`, and a partial last line
(only possible if the machine died mid-write) is cut off when the file is next opened. A run that
resumes drops the records logged after its last complete checkpoint (all of them when it has none),
so every logged step appears once. One process writes a run at a time (`RunLock`); a second one
stops at once with a line naming the holder.

A run launched as several processes (`accelerate launch`, `torchrun`) has one writer: rank 0. On
every other rank a `RunDir` is read-only (it may find checkpoints to resume from) and any write
raises, so a code path that forgets to check the rank fails loudly instead of writing twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml
from pydantic import ValidationError

from mechrl.config import ConfigError, RunConfig, config_to_yaml
from mechrl.errors import UserError
from mechrl.runs.tracking import NullTracker, Tracker, build_tracker

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
#: In every `checkpoints/step-N/`: the task config it was trained on, so that `mechrl eval` judges it
#: with the same task (answer format, vocabulary) wherever the checkpoint is moved.
CHECKPOINT_TASK_FILE = "mechrl_task.yaml"


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


class RunDataError(UserError, ValueError):
    """A run directory's file that cannot be read as mechrl wrote it (a corrupted line, a missing part)."""


class RunLockedError(UserError):
    """Another live process writes this run directory."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a part. The file
    gets the permissions a plainly created file would (0666 less the process umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600
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
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # less the umask
    try:
        os.write(fd, payload)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict]:
    """Every record of a JSONL file; a line that is not a JSON object raises `RunDataError` naming
    the file and line (`read_jsonl_lenient` skips such lines and says which)."""
    records, bad = read_jsonl_lenient(path)
    if bad:
        i, why = bad[0]
        more = f" (and {len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
        raise RunDataError(f"{path}:{i}: not a JSON object line ({why}){more}; fix or delete the line")
    return records


def read_jsonl_lenient(path: str | Path) -> tuple[list[dict], list[tuple[int, str]]]:
    """(records, skipped): the lines that are JSON objects, and (line number, reason) of the others."""
    path = Path(path)
    if not path.exists():
        return [], []
    out, bad = [], []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append((i, str(e)))
            continue
        if isinstance(rec, dict):
            out.append(rec)
        else:
            bad.append((i, f"a JSON {type(rec).__name__}, not an object"))
    return out, bad


def check_writable_dir(path: str | Path, what: str = "output directory") -> Path:
    """Raise `UserError` unless `path` is (or can be created as) a writable directory: checked before
    any work, so a bad `--out` fails at once instead of after the work it would hold."""
    path = Path(path)
    probe = path
    while not probe.exists():  # the nearest existing ancestor decides whether it can be created
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{what} {path}: {probe} is a file, not a directory")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: {probe} is not writable")
    return path


def check_writable_file(path: str | Path, what: str = "output file") -> Path:
    """Raise `UserError` unless a file can be written at `path` (its folder writable, not a directory)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{what} {path} is not writable")
    check_writable_dir(path.parent if str(path.parent) else Path("."), what=f"folder of {what}")
    return path


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class RunLock:
    """Exclusive lock on a run directory (`<run>/.lock`), held from `RunDir.start` until the run closes.

    An advisory `flock` on the file does the locking: the kernel releases it when its process dies,
    however it dies, so a lock whose process is gone is free and is taken over (with a log line
    naming the previous holder). The file records the holder (pid, host, start time, command) so
    that a refused process can say who holds the run. A lock recorded by another host cannot be
    checked from here (flock does not span machines on every file system): it is refused, and
    the message says to delete the file if that process is gone. Re-entrant within one process."""

    _held: dict[str, list] = {}  # resolved path -> [fd, count], this process's locks

    def __init__(self, run_path: Path):
        self.path = Path(run_path) / ".lock"
        self.key = str(self.path.resolve())

    @staticmethod
    def _info(text: str) -> dict:
        try:
            info = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            return {"unreadable": text[:80]}
        return info if isinstance(info, dict) else {}

    @staticmethod
    def describe(info: dict) -> str:
        started = info.get("started")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
        return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {when}"

    def acquire(self) -> None:
        held = RunLock._held.get(self.key)
        if held is not None:
            held[1] += 1
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._info(os.pread(fd, 4096, 0).decode(errors="replace"))
                raise RunLockedError(f"{self.path.parent} is in use by {self.describe(holder)}; wait for it to "
                                     "finish or stop it (one process writes a run at a time)") from None
            previous = self._info(os.pread(fd, 4096, 0).decode(errors="replace"))
            host = socket.gethostname()
            if previous:
                if previous.get("host") not in (None, host):
                    raise RunLockedError(f"{self.path.parent} is locked by {self.describe(previous)}, another "
                                         f"machine, which this one cannot check; if that process is gone, delete "
                                         f"{self.path}")
                log.warning("%s: taking over the lock of %s, a process that is gone", self.path.parent,
                            self.describe(previous))
            info = {"pid": os.getpid(), "host": host, "started": time.time(), "argv": sys.argv[:8]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        RunLock._held[self.key] = [fd, 1]

    def release(self) -> None:
        held = RunLock._held.get(self.key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        fd = held[0]
        del RunLock._held[self.key]
        try:
            os.ftruncate(fd, 0)  # a released lock records nobody (the file stays: see the class docstring)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock


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
        self._lock: RunLock | None = None

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
        must mean one config; `out_dir` is where the run lives, not part of it, so a moved run
        resumes); `force` deletes it and starts over. The run is locked (`RunLock`) until `close`."""
        path = Path(cfg.out_dir) / name
        run = cls(path)
        if run.readonly:  # rank 0 creates or checks the directory; the loops wait for it at a barrier
            return run
        check_writable_dir(cfg.out_dir, "out_dir")
        text = config_to_yaml(cfg)
        path.mkdir(parents=True, exist_ok=True)
        run._lock = RunLock(path)
        run._lock.acquire()  # before anything is deleted or compared: another process may be writing it
        try:
            if force:
                for child in path.iterdir():
                    if child.name != ".lock":
                        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            if run.config_path.exists():
                old = yaml.safe_load(run.config_path.read_text())
                if not isinstance(old, dict):
                    raise RunDataError(f"{run.config_path}: not a config mapping; delete the run or use --force")
                new = yaml.safe_load(text)
                old_out = old.pop("out_dir", None)
                new.pop("out_dir", None)
                filled = False
                if old != new:
                    old = _with_new_defaults(old, new, type(cfg), run.config_path)
                    filled = old == new
                if old != new:
                    diffs = _diff_keys(old, new)
                    raise ConfigError(f"{path} exists with a different config ({', '.join(diffs[:5])}); "
                                      "use another name, seed or out_dir, or --force to start over")
                if old_out != cfg.out_dir:
                    log.info("%s was moved (its config said out_dir %s); recording the new place", path, old_out)
                if old_out != cfg.out_dir or filled:
                    atomic_write_text(run.config_path, text)
            else:
                atomic_write_text(run.config_path, text)
            for p in (run.metrics_path, run.samples_path):
                cut = repair_jsonl(p)
                if cut:
                    log.warning("%s: removed a partial last line (%d bytes) left by a killed process", p, cut)
            run.tracker = build_tracker(cfg.tracking, path, name, cfg.model_dump(mode="json"))
        except BaseException:
            run._lock.release()
            run._lock = None
            raise
        return run

    def close(self) -> None:
        """Close the tracker's sinks (metrics.jsonl needs no closing) and release the run's lock."""
        try:
            self.tracker.close()
        finally:
            self.tracker = NullTracker()
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    @contextlib.contextmanager
    def failure_status(self, kind: str) -> Iterator[None]:
        """Leave status.json "failed" with a one-line reason when the body raises (a Ctrl-C or a
        SIGTERM too); the exception propagates unchanged. A SIGKILL leaves "running": the next
        start resumes from the last checkpoint."""
        try:
            yield
        except BaseException as e:
            if not self.readonly and self.path.is_dir():
                if isinstance(e, KeyboardInterrupt):
                    reason = f"interrupted ({e})" if str(e) else "interrupted (Ctrl-C)"
                else:
                    reason = one_line(e)
                try:
                    self.set_status("failed", kind=kind, reason=reason)
                except OSError as write_error:  # the original error matters more; say both
                    log.error("%s: could not record the failure (%s): %s", self.path, write_error, reason)
            raise

    def status(self) -> dict:
        return json.loads(self.status_path.read_text()) if self.status_path.exists() else {"status": "new"}

    def set_status(self, status: str, **extra) -> None:
        self.check_writable("set_status")
        atomic_write_json(self.status_path, {"status": status, "time": time.time(), **extra})

    @property
    def finished(self) -> bool:
        return self.status().get("status") == "finished"

    def finish(self, kind: str, **extra) -> None:
        """Record the run as finished, then write report.html. A process killed in between leaves a
        finished run without a report: `needs_finish` says so, and the rerun calls this again."""
        from mechrl.runs.report import write_run_report  # local: the report module reads run directories

        self.set_status("finished", kind=kind, **extra)
        write_run_report(self.path)

    @property
    def needs_finish(self) -> bool:
        """Whether the finishing writes (status "finished", report.html) are incomplete."""
        return not self.finished or not (self.path / "report.html").is_file()

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

    def truncate_after(self, step: int | None, *, also=None) -> None:
        """Drop metric and sample records logged after `step` (a resumed run redoes those steps);
        `step=None` drops every record (a run with no complete checkpoint starts over). `also(path,
        record) -> bool` drops further records (e.g. an evaluation that did not complete)."""
        self.check_writable("truncate_after")
        for p in (self.metrics_path, self.samples_path):
            rows = read_jsonl(p)
            keep = [r for r in rows if step is not None and r.get("step", 0) <= step
                    and not (also is not None and also(p, r))]
            if len(keep) != len(rows):
                atomic_write_text(p, "".join(dumps(r) + "\n" for r in keep))
                log.info("%s: dropped %d records %s (resuming)", p.name, len(rows) - len(keep),
                         "of a run with no complete checkpoint" if step is None else f"after step {step}")

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


def _missing_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys present in `new` and absent from `old` (nested mappings followed)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return []
    out = []
    for k, v in new.items():
        out += [f"{prefix}{k}"] if k not in old else _missing_keys(old[k], v, f"{prefix}{k}.")
    return out


def _with_new_defaults(old: dict, new: dict, cls: type, where: Path) -> dict:
    """A stored config written before some options existed, read by this version: the options it
    lacks take their defaults. Returned as `new` is laid out when that makes the two equal (the same
    run, logged with the options filled in); else `old` unchanged, so the caller names the real
    differences. Only absent keys are filled: a key the stored config holds is never reinterpreted."""
    missing = _missing_keys(old, new)
    if not missing:
        return old
    try:
        upgraded = yaml.safe_load(config_to_yaml(cls.model_validate(old)))
    except ValidationError:  # a key this version no longer knows, or a changed type: the caller names it
        return old
    upgraded.pop("out_dir", None)
    if upgraded != new:
        return old
    log.warning("%s was written before %s existed; resuming with %s at %s", where, ", ".join(missing),
                "its default" if len(missing) == 1 else "their defaults",
                ", ".join(f"{k}={_get(new, k)!r}" for k in missing))
    return upgraded


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]
