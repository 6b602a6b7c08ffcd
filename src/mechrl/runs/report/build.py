"""Assembling a report: per run its overview, config, metric curves, evaluation table and sample
completions; for several runs first an overlay of their shared metrics, their final evaluations
side by side and the hyperparameters that differ. Studies append their own `Section`s.

    build_report(["runs/a", "runs/b"], "compare.html", extra_sections=[Section("Notes", text="...")])
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from mechrl.runs.report.html import render_page
from mechrl.runs.report.plots import metric_series, namespace_figure, namespace_of, overlay_figure
from mechrl.runs.report.rundata import ReportError, RunData, flatten, load_run
from mechrl.runs.report.sections import Section, Table
from mechrl.runs.rundir import atomic_write_text

SAMPLES_PER_GROUP = 3   # completions shown per (step, split)
MAX_SAMPLE_STEPS = 8    # steps with samples shown per run (first, last and evenly between)
_ABSENT = "(absent)"
log = logging.getLogger(__name__)


# -- one run --------------------------------------------------------------------------------------
def overview_table(run: RunData) -> Table:
    st = run.status
    rows = [["path", str(run.path)], ["kind", run.config.get("kind")], ["status", st.get("status")],
            ["seed", run.config.get("seed")], ["final checkpoint", st.get("final_checkpoint")],
            ["training time (s)", st.get("train_time_s")], ["evaluated checkpoints", ", ".join(map(str, run.evals)) or None],
            ["metric records", len(run.metrics)], ["sample records", len(run.samples)]]
    return Table(["field", "value"], rows, kind="overview", float_format="{:.1f}")


def config_table(run: RunData) -> Table:
    flat = flatten(run.config)
    return Table(["key", "value"], [[k, _show(v)] for k, v in flat.items()], kind="config",
                 caption=f"resolved config ({run.path / 'config.yaml'})")


def metrics_section(run: RunData) -> Section:
    if not run.metrics:
        return Section("Metrics", text="No metrics logged yet (metrics.jsonl is missing or empty).")
    series = metric_series(run.metrics)
    by_ns: dict[str, dict] = defaultdict(dict)
    for key, s in series.items():
        by_ns[namespace_of(key)][key] = s
    figures = [namespace_figure(ns, by_ns[ns], caption=f"{run.name}: {ns}/ metrics against training step")
               for ns in sorted(by_ns)]
    return Section("Metrics", text=f"One figure per namespace ({', '.join(sorted(by_ns))}); x is the training step.",
                   figures=figures)


def eval_table(run: RunData) -> Table:
    """Rows: split, then each rule family of it; per checkpoint: n, accuracy, format-error rate."""
    steps = list(run.evals)
    columns = ["split", "rule family"]
    for s in steps:
        columns += [f"n @{s}", f"accuracy @{s}", f"format err @{s}"]
    rows: list[list[Any]] = []
    splits = list(dict.fromkeys(sp for e in run.evals.values() for sp in e["splits"]))
    for split in splits:
        groups = list(dict.fromkeys(g for e in run.evals.values() for g in e["splits"].get(split, {}).get("groups", {})))
        for group in [None, *groups]:
            row: list[Any] = [split, "all" if group is None else group]
            for s in steps:
                r = run.evals[s]["splits"].get(split)
                if r is not None and group is not None:
                    r = r.get("groups", {}).get(group)
                row += [None, None, None] if r is None else [r.get("n"), r.get("accuracy"), r.get("format_error_rate")]
            rows.append(row)
    return Table(columns, rows, kind="eval", caption=f"greedy evaluation per split and checkpoint step "
                 f"(from {run.path / 'eval'}/step-N.json)")


def eval_section(run: RunData) -> Section:
    if not run.evals:
        return Section("Evaluation", text="No evaluations yet (no eval/step-N.json in this run).")
    return Section("Evaluation", tables=[eval_table(run)])


def samples_section(run: RunData) -> Section:
    if not run.samples:
        return Section("Sample completions", text="No samples logged yet (samples.jsonl is missing or empty).")
    by_step: dict[int, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in run.samples:
        by_step[int(r.get("step", 0))][str(r.get("split", "rollout"))].append(r)
    steps = sorted(by_step)
    if len(steps) > MAX_SAMPLE_STEPS:
        idx = sorted({round(i * (len(steps) - 1) / (MAX_SAMPLE_STEPS - 1)) for i in range(MAX_SAMPLE_STEPS)})
        steps = [steps[i] for i in idx]
    rows = []
    for step in steps:
        for split, recs in by_step[step].items():
            for r in recs[:SAMPLES_PER_GROUP]:
                rest = {k: v for k, v in r.items() if k not in ("step", "split", "prompt", "completion")}
                rows.append([step, split, str(r.get("prompt", "")), str(r.get("completion", "")), _outcome(rest)])
    text = (f"Up to {SAMPLES_PER_GROUP} completions per step and split"
            + (f", at {len(steps)} of {len(by_step)} logged steps" if len(steps) < len(by_step) else "") + ".")
    table = Table(["step", "split", "prompt", "completion", "outcome"], rows, kind="samples", text_columns=(2, 3, 4))
    return Section("Sample completions", text=text, tables=[table])


def run_sections(run: RunData) -> list[Section]:
    # the config last: it is long, and the numbers are what a reader looks for first
    return [Section("Overview", tables=[overview_table(run)]), eval_section(run), metrics_section(run),
            samples_section(run), Section("Config", tables=[config_table(run)])]


# -- several runs ---------------------------------------------------------------------------------
def config_diff_table(runs: dict[str, RunData]) -> Table:
    """The flattened config keys whose values differ between the runs (absent counts as a value)."""
    flats = {name: flatten(r.config) for name, r in runs.items()}
    keys = sorted(set().union(*flats.values()))
    rows = []
    for k in keys:
        vals = [_show(f[k]) if k in f else _ABSENT for f in flats.values()]
        if len(set(vals)) > 1:
            rows.append([k, *vals])
    return Table(["key", *runs], rows, kind="config-diff", caption="hyperparameters that differ between the runs")


def final_eval_table(runs: dict[str, RunData]) -> Table | None:
    last = {name: r.evals[max(r.evals)] for name, r in runs.items() if r.evals}
    if not last:
        return None
    splits = list(dict.fromkeys(sp for e in last.values() for sp in e["splits"]))
    columns = ["split"]
    for name, r in runs.items():
        if name in last:
            columns += [f"{name} accuracy @{max(r.evals)}", f"{name} format err"]
    rows = []
    for sp in splits:
        row: list[Any] = [sp]
        for e in last.values():
            s = e["splits"].get(sp)
            row += [None, None] if s is None else [s["accuracy"], s["format_error_rate"]]
        rows.append(row)
    return Table(columns, rows, kind="final-eval", caption="accuracy and format-error rate at each run's last evaluation")


def overlay_section(runs: dict[str, RunData]) -> Section:
    """Every headline metric (at most three name parts: not per rule family) logged by two or more runs."""
    series = {name: metric_series(r.metrics) for name, r in runs.items()}
    counts: dict[str, int] = defaultdict(int)
    for s in series.values():
        for k in s:
            counts[k] += 1
    shared = sorted(k for k, c in counts.items() if c >= 2 and k.count("/") <= 2)
    if not shared:
        return Section("Metric comparison", text="The runs share no logged metric to compare.")
    by_ns: dict[str, list[str]] = defaultdict(list)
    for k in shared:
        by_ns[namespace_of(k)].append(k)
    return Section("Metric comparison", text="Each metric logged by two or more runs; one line per run.",
                   figures=[overlay_figure(ns, series, keys) for ns, keys in sorted(by_ns.items())])


def comparison_sections(runs: dict[str, RunData], *, overlay: bool = True) -> list[Section]:
    """The final evaluations side by side and, with `overlay`, the shared metrics overlaid (only where
    the runs' steps mean the same thing: a study of an SFT and an RL phase turns it off)."""
    final = final_eval_table(runs)
    out = [Section("Final evaluation", tables=[final] if final else [],
                   text="" if final else "No evaluations in any of the runs (tasks without gold answers are "
                                         "judged by their rewards: see the metrics).")]
    return out + ([overlay_section(runs)] if overlay else [])


def config_appendix(runs: dict[str, RunData]) -> Section:
    diff = config_diff_table(runs)
    return Section("Appendix: hyperparameters that differ", tables=[diff],
                   text="" if diff.rows else "The runs have identical configs.")


# -- the report -----------------------------------------------------------------------------------
def build_report(runs: Sequence[str | Path | RunData], out: str | Path, *,
                 extra_sections: Sequence[Section] = (), title: str | None = None,
                 lead_sections: Sequence[Section] = (), overlay: bool = True) -> Path:
    """Write one self-contained HTML report of `runs` (run directories) to `out`; returns `out`.

    Order: `lead_sections` (a study's question, answer and headline table), then the runs'
    comparison (several runs) or the run's sections, then `extra_sections` (a study's detail), then,
    for several runs, an appendix of the hyperparameters that differ. `overlay=False` leaves out the
    overlay of metrics against step (for runs whose steps are not comparable, e.g. SFT and RL)."""
    if not runs:
        raise ReportError("no runs given")
    out = Path(out)
    if out.is_dir():
        raise ReportError(f"--out {out} is a directory; give the path of the HTML file to write")
    data = [r if isinstance(r, RunData) else load_run(r) for r in runs]
    labels = _labels(data)
    by_label = dict(zip(labels, data, strict=True))
    sections: list[Section] = list(lead_sections)
    if len(data) == 1:
        sections += run_sections(data[0])
        title = title or f"Run report: {labels[0]}"
    else:
        sections += comparison_sections(by_label, overlay=overlay)
        sections += [Section(f"Run {label}", subsections=run_sections(r)) for label, r in by_label.items()]
        title = title or f"Comparison of {len(data)} runs: {', '.join(labels)}"
    sections += list(extra_sections)
    if len(data) > 1:
        sections.append(config_appendix(by_label))
    skipped = [line for r in data for line in r.skipped]
    if skipped:  # first, so that no reader misses it
        for line in skipped:
            log.warning("report: skipped %s", line)
        sections.insert(0, Section("Skipped while reading", text=f"{len(skipped)} damaged record(s) could not be "
                                   "read and are left out of everything below.",
                                   tables=[Table(["file:line", "why"], [list(_split_skip(x)) for x in skipped],
                                                 kind="skipped", text_columns=(0, 1))]))
    intro = (f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by mechrl from "
             + ", ".join(str(r.path) for r in data) + ".")
    atomic_write_text(out, render_page(title, sections, intro))
    return out


def _split_skip(line: str) -> tuple[str, str]:
    """"<file>[:<line>]: why" -> (where, why)."""
    head, _, why = line.partition(": ")
    return head, why


def write_run_report(run_dir: str | Path) -> Path:
    """`<run_dir>/report.html`, the report every training run writes when it finishes."""
    return build_report([run_dir], Path(run_dir) / "report.html")


# -- helpers --------------------------------------------------------------------------------------
def _labels(data: list[RunData]) -> list[str]:
    """Run names, made unique with their parent folder where two runs share a name."""
    names = [r.name for r in data]
    labels = [f"{r.path.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in data]
    if len(set(labels)) != len(labels):
        raise ReportError(f"the same run is given twice: {[str(r.path) for r in data]}")
    return labels


def _show(v: Any) -> str:
    """A config value as text: YAML-like scalars, JSON for lists and mappings."""
    if v is None:
        return "null"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _outcome(rest: dict) -> str:
    parts = []
    for k, v in rest.items():
        if isinstance(v, float):
            v = f"{v:.3g}"
        elif isinstance(v, (list, dict)):
            v = json.dumps(v)
        parts.append(f"{k}={v}")
    return "  ".join(parts)
