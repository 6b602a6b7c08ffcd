"""Sweeps: the Cartesian product of a grid of overrides, each point an ordinary mechrl run.

    mechrl sweep cards-sft --grid seed=1,2,3 train.lr=1e-3,2e-3 --fixed preset=smoke [--backend ray]

A trial is the recipe + the fixed overrides + one value per grid key; its run name comes from
`load_config` (so it carries the values that differ from the recipe, and the seed). Every trial's
config is validated before anything runs: a typo fails fast and names the key.

Everything a sweep writes lives in one folder, named by the recipe and a hash of grid + fixed
(re-running the same command finds the same folder):

    <out>/sweep-<recipe name>-<hash>/
      sweep.json      the grid, the fixed overrides and every trial: status (pending / running /
                      finished / failed), exit code or signal, log path, attempts
      logs/<run>.log  the trial's stdout + stderr (appended across attempts)
      logs/<run>.pid  "<host> <pid>" while the trial's process runs
      .lock           held (flock) by the sweep running in this folder: one at a time
      runs/<run>/     the run directories (unless the fixed overrides set `out_dir`)
      summary.csv     final metrics per run (eval accuracy per split, reward mean, ...)
      summary.md      the same table in Markdown (also printed)

A trial whose run directory says `finished` is skipped, so re-running a sweep completes only the
missing and failed trials (and a failed run resumes from its last checkpoint, as any mechrl run
does). How trials run is a backend's business (`mechrl.runs.sweep_backends`: local subprocesses
or Ray tasks); the plan, the record and the summary here are the same for both.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import itertools
import json
import logging
from pathlib import Path
from typing import Any

from mechrl.config import ConfigError, load_config, parse_overrides, resolve_recipe
from mechrl.errors import UserError
from mechrl.runs import sweep_backends
from mechrl.runs.preflight import preflight
from mechrl.runs.rundir import RunDir, atomic_write_text
from mechrl.runs.sweep_record import SweepPlan, SweepRecord, Trial

log = logging.getLogger(__name__)

__all__ = ["Trial", "SweepPlan", "SweepRecord", "parse_grid", "parse_fixed", "plan_sweep",
           "summarize", "format_table", "format_plan", "write_summary", "check_options", "run_sweep", "BACKENDS"]

BACKENDS = ("local", "ray")


# ----------------------------------------------------------------------------------------------
# Grid syntax
# ----------------------------------------------------------------------------------------------

def _split_top_level(raw: str) -> list[str]:
    """Split on commas outside brackets and quotes: `1,[a,b],'x,y'` -> ['1', '[a,b]', "'x,y'"]."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in raw:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0 or quote:
        raise ConfigError(f"grid values {raw!r}: unbalanced brackets or quotes")
    parts.append("".join(cur))
    return parts


def _key_of(item: str, what: str) -> str:
    if "=" not in item:
        raise ConfigError(f"{what} {item!r} is not of the form key=value")
    key = item.split("=", 1)[0].strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"{what} {item!r} has an empty key")
    return key


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`["seed=1,2", "train.lr=1e-3,2e-3"]` -> `{"seed": ["1", "2"], "train.lr": ["1e-3", "2e-3"]}`.

    Values stay strings (each is parsed as YAML when the trial's config is built, exactly as a
    command-line override is). Key order is kept: the first key varies slowest."""
    if not items:
        raise ConfigError("a sweep needs a grid: --grid key=v1,v2 [key2=...]")
    grid: dict[str, list[str]] = {}
    for item in items:
        key = _key_of(item, "grid entry")
        if key in grid:
            raise ConfigError(f"grid key {key!r} is given twice")
        raw = item.split("=", 1)[1]
        values = [v.strip() for v in _split_top_level(raw)] if raw.strip() else []
        if not values or any(not v for v in values):
            raise ConfigError(f"grid entry {item!r}: needs one or more comma-separated values, none empty")
        parsed = [parse_overrides([f"{key}={v}"])[key] for v in values]
        for i, p in enumerate(parsed):
            if p in parsed[:i]:
                raise ConfigError(f"grid key {key!r}: value {values[i]!r} is listed twice")
        grid[key] = values
    return grid


def parse_fixed(items: list[str], grid: dict[str, list[str]]) -> list[str]:
    """Fixed overrides (`key=value`, applied to every trial); a key may appear once, and not in the grid."""
    seen: set[str] = set()
    for item in items:
        key = _key_of(item, "fixed override")
        if key in seen:
            raise ConfigError(f"fixed override key {key!r} is given twice")
        if key in grid:
            raise ConfigError(f"key {key!r} is both in --grid and in --fixed")
        seen.add(key)
    parse_overrides(items)  # values parse as YAML (raises on malformed ones)
    return [item.strip() for item in items]


# ----------------------------------------------------------------------------------------------
# The plan: trials and the sweep folder
# ----------------------------------------------------------------------------------------------

def sweep_hash(grid: dict[str, list[str]], fixed: list[str]) -> str:
    """Eight hex digits that identify a grid + fixed overrides (order of keys and values included)."""
    text = json.dumps({"grid": [[k, v] for k, v in grid.items()], "fixed": fixed})
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def plan_sweep(recipe: str | Path, grid_items: list[str], fixed_items: list[str] | None = None,
               out: str | Path = "runs") -> SweepPlan:
    """Parse the grid, build and validate every trial's config (nothing runs, nothing is written).

    Raises ConfigError naming the trial for the first config that does not validate (an unknown
    key, a bad value) or would fail at its start (`preflight`: an unknown reward, a missing model
    folder), and when two trials would get the same run name."""
    path = resolve_recipe(recipe).resolve()
    grid = parse_grid(grid_items)
    fixed = parse_fixed(list(fixed_items or []), grid)
    base_cfg, _ = load_config(path, list(fixed))
    sdir = (Path(out) / f"sweep-{base_cfg.name}-{sweep_hash(grid, fixed)}").resolve()
    plan = SweepPlan(recipe=path, name=base_cfg.name, grid=grid, fixed=fixed, dir=sdir)
    # runs go into the sweep folder unless the user chose a place (out_dir is never in a run name)
    placement = [] if any(_key_of(f, "") == "out_dir" for f in fixed) else [f"out_dir={sdir / 'runs'}"]
    keys = list(grid)
    combos = list(itertools.product(*(grid[k] for k in keys)))
    seen: dict[str, int] = {}
    for i, values in enumerate(combos):
        point = [f"{k}={v}" for k, v in zip(keys, values)]
        overrides = [*fixed, *point, *placement]
        try:
            cfg, name = load_config(path, overrides)
            preflight(cfg)  # unknown rewards, missing model folders, ...: before any trial runs
        except UserError as e:
            raise ConfigError(f"{e} [sweep trial {i + 1}/{len(combos)}: {' '.join(point)}]") from None
        if name in seen:
            raise ConfigError(f"sweep trials {seen[name] + 1} and {i + 1} get the same run name {name!r} "
                              f"(do two grid values give the same config?)")
        seen[name] = i
        params = {k: parse_overrides([p])[k] for k, p in zip(keys, point)}
        run_dir = Path(cfg.out_dir).resolve() / name
        plan.trials.append(Trial(index=i, name=name, kind=cfg.kind, overrides=tuple(overrides),
                                 params=params, run_dir=run_dir))
    return plan


def format_plan(plan: SweepPlan) -> str:
    """What `--dry-run` prints: the sweep folder, then one line per trial (name, overrides)."""
    lines = [f"sweep: {plan.dir}", f"recipe: {plan.recipe}", f"trials: {len(plan.trials)}"]
    width = max(len(t.name) for t in plan.trials)
    for t in plan.trials:
        shown = [o for o in t.overrides if not o.startswith("out_dir=")] or ["(recipe as is)"]
        lines.append(f"  {t.name:<{width}}  {t.kind}  {' '.join(shown)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------
# The summary: final metrics per run
# ----------------------------------------------------------------------------------------------

def _final_eval(run_dir: Path) -> tuple[int | None, dict[str, float]]:
    """The latest `eval/step-N.json` of a run: (N, {split: accuracy})."""
    evals = []
    for p in (run_dir / "eval").glob("step-*.json"):
        step = p.stem.removeprefix("step-")
        if step.isdigit():
            evals.append((int(step), p))
    if not evals:
        return None, {}
    step, p = max(evals)
    splits = json.loads(p.read_text()).get("splits")
    if not isinstance(splits, dict):
        raise ValueError(f"{p}: no 'splits' mapping (not a mechrl evaluation file?)")
    return step, {s: float(v["accuracy"]) for s, v in splits.items()}


def _last_metric(rows: list[dict], key: str) -> float | None:
    for row in reversed(rows):
        if key in row:
            return row[key]
    return None


#: Reward components are summarised by their mean over this many last logged steps (one step's
#: batch is noisy).
LAST_STEPS = 10


def _last_mean(rows: list[dict], key: str, n: int = LAST_STEPS) -> float | None:
    vals = [r[key] for r in rows if key in r][-n:]
    return sum(vals) / len(vals) if vals else None


def _final_routing_eval(run_dir: Path) -> dict[str, float]:
    """The latest `eval/routing-step-N.json` of a routed run: {`<mode>/<component>`: mean}."""
    evals = [(int(p.stem.removeprefix("routing-step-")), p) for p in (run_dir / "eval").glob("routing-step-*.json")
             if p.stem.removeprefix("routing-step-").isdigit()]
    if not evals:
        return {}
    modes = json.loads(max(evals)[1].read_text()).get("modes")
    if not isinstance(modes, dict):
        raise ValueError(f"{max(evals)[1]}: no 'modes' mapping (not a routing evaluation file?)")
    return {f"{mode}/{name}": float(v) for mode, r in modes.items() for name, v in r["rewards"].items()}


def summarize(plan: SweepPlan, record: SweepRecord) -> list[dict[str, Any]]:
    """One row per trial: run, status, grid values, the step of the latest evaluation, accuracy per
    split there (`acc/<split>`), the last `reward/mean` (RL runs), each reward component's mean
    over the last `LAST_STEPS` steps (`last10/<component>`), a routed run's final routing
    evaluation (`<mode>/<component>`), the step an early stop ended the run at, and the training time."""
    rows = []
    for t in plan.trials:
        rd = RunDir(t.run_dir)
        row: dict[str, Any] = {"run": t.name, "status": record.status(t)}
        row.update({k: v for k, v in t.params.items()})
        step, acc = _final_eval(t.run_dir)
        row["eval_step"] = step
        row.update({f"acc/{s}": a for s, a in acc.items()})
        metrics = rd.metrics()
        row["reward/mean"] = _last_metric(metrics, "reward/mean")
        components = sorted({k for m in metrics for k in m
                             if k.startswith("reward/") and k.endswith("/mean") and k.count("/") == 2})
        row.update({f"last{LAST_STEPS}/{k.split('/')[1]}": _last_mean(metrics, k) for k in components})
        row.update(_final_routing_eval(t.run_dir))
        status = rd.status()
        row["stopped_at"] = (status.get("stopped_early") or {}).get("step")
        row["train_time_s"] = status.get("train_time_s")
        rows.append(row)
    return rows


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    # an RL-only column stays out of an SFT sweep's table (and vice versa)
    return [c for c in cols if any(r.get(c) is not None for r in rows) or c in ("run", "status")]


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(rows: list[dict]) -> str:
    """The summary as a Markdown table (what `mechrl sweep` prints and writes to summary.md)."""
    cols = _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_summary(plan: SweepPlan, rows: list[dict]) -> tuple[Path, Path]:
    """Write summary.csv and summary.md into the sweep folder."""
    cols = _columns(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    csv_path, md_path = plan.dir / "summary.csv", plan.dir / "summary.md"
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_text(md_path, format_table(rows) + "\n")
    return csv_path, md_path


# ----------------------------------------------------------------------------------------------
# Running a sweep
# ----------------------------------------------------------------------------------------------

def check_options(backend: str, *, address: str | None = None, max_concurrent: int | None = None,
                  cpus_per_trial: float | None = None, gpus_per_trial: float | None = None) -> None:
    """Refuse an unknown backend or an impossible option before anything is planned or run."""
    if backend not in BACKENDS:
        raise UserError(f"unknown sweep backend {backend!r}; backends: {', '.join(BACKENDS)}")
    if address is not None and backend != "ray":
        raise UserError("--address connects to a Ray cluster: it needs --backend ray")
    if max_concurrent is not None and max_concurrent < 1:
        raise UserError(f"--max-concurrent must be at least 1, got {max_concurrent}")
    for opt, v in (("--cpus-per-trial", cpus_per_trial), ("--gpus-per-trial", gpus_per_trial)):
        if v is not None and v < 0:
            raise UserError(f"{opt} must be >= 0, got {v}")


def run_sweep(plan: SweepPlan, *, backend: str = "local", max_concurrent: int | None = None,
              cpus_per_trial: float | None = None, gpus_per_trial: float | None = None,
              address: str | None = None) -> tuple[SweepRecord, list[dict]]:
    """Run every trial of `plan` that has not finished, on `backend`; write sweep.json and the
    summary. Returns the record and the summary rows. Failed trials are recorded, not raised."""
    check_options(backend, address=address, max_concurrent=max_concurrent, cpus_per_trial=cpus_per_trial,
                  gpus_per_trial=gpus_per_trial)
    plan.logs_dir.mkdir(parents=True, exist_ok=True)
    resources = dict(max_concurrent=max_concurrent, cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial)
    with _exclusive(plan.dir / ".lock"):
        record = SweepRecord(plan, backend)
        todo = [t for t in plan.trials if record.status(t) != "finished"]
        log.info("sweep %s: %d trials, %d finished already, %d to run on %s", plan.dir.name, len(plan.trials),
                 len(plan.trials) - len(todo), len(todo), backend)
        if todo and backend == "local":
            sweep_backends.run_local(plan, record, todo, **resources)
        elif todo:
            sweep_backends.run_ray(plan, record, todo, address=address, **resources)
        leftover = [t.name for t in todo if record.status(t) in ("pending", "running")]
        assert not leftover, f"backend {backend} returned with trials not ended: {leftover}"
        rows = summarize(plan, record)
        write_summary(plan, rows)
    return record, rows


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an exclusive lock on `path` (released when the process dies): one sweep per folder."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another sweep is running in {path.parent} (it holds {path.name})") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
