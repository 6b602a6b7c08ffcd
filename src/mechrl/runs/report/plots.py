"""Metric curves as PNG figures (matplotlib's Agg canvas, no pyplot state, no display needed).

Metric keys are namespaced (`train/loss`, `eval/test/accuracy`, `eval/test/count_above/accuracy`).
One figure per namespace, one panel per metric: keys with three or more parts share a panel per
`<namespace>/<second part>` (e.g. every `eval/test/...` key in the panel `eval/test`), one line each.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import MaxNLocator

from mechrl.runs.report.sections import Figure

Series = tuple[list[int], list[float]]  # (steps, values), sorted by step

_COLS = 4            # panels per row
_PANEL_W, _PANEL_H = 3.4, 2.5  # inches per panel
_DPI = 80


def metric_series(metrics: list[dict]) -> dict[str, Series]:
    """Per numeric metric key, its (steps, values) in step order (a key logged twice at one step
    keeps the last value: a resumed run redoes that step)."""
    by_key: dict[str, dict[int, float]] = defaultdict(dict)
    for row in metrics:
        step = row["step"]
        for k, v in row.items():
            if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            by_key[k][step] = float(v)
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in sorted(by_key.items())}


def namespace_of(key: str) -> str:
    return key.split("/", 1)[0] if "/" in key else "other"


def panel_of(key: str) -> tuple[str, str | None]:
    """(panel title, line label): `eval/test/accuracy` -> ("eval/test", "accuracy");
    `train/loss` -> ("train/loss", None)."""
    parts = key.split("/")
    if len(parts) >= 3:
        return "/".join(parts[:2]), "/".join(parts[2:])
    return key, None


def unit_of(key: str) -> str:
    """The unit of a metric, from its name; '' where none is known."""
    name = key.rsplit("/", 1)[-1]
    if name.endswith("_per_s"):
        return f"{name[:-len('_per_s')].replace('_', ' ')}/s"
    if name.endswith("_s"):
        return "s"
    if name in ("learning_rate", "lr"):
        return ""
    if "accuracy" in name or name.endswith("rate") or name.startswith("frac"):
        return "fraction"
    if name in ("num_tokens",) or "length" in name:
        return "tokens"
    if "entropy" in name or name.startswith("kl"):
        return "nats"
    return ""


def _render(fig: MplFigure, caption: str) -> Figure:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return Figure(png=buf.getvalue(), caption=caption)


def _grid(n_panels: int) -> tuple[MplFigure, list]:
    cols = min(_COLS, n_panels)
    rows = math.ceil(n_panels / cols)
    w, h = _PANEL_W * cols, _PANEL_H * rows
    fig = MplFigure(figsize=(w, h))
    # fixed margins in inches (a constrained layout would draw every figure twice: slow on a CPU)
    fig.subplots_adjust(left=0.65 / w, right=1 - 0.15 / w, bottom=0.45 / h, top=1 - 0.3 / h, wspace=0.38, hspace=0.6)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def _draw(ax, title: str, lines: list[tuple[str | None, Series]], unit: str) -> None:
    for label, (steps, values) in lines:
        ax.plot(steps, values, marker="o" if len(steps) <= 25 else None, markersize=3, linewidth=1.3, label=label)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel(unit or "value", fontsize=8)
    ax.tick_params(labelsize=7)
    # few ticks: readable at this size, and tick labels are most of the drawing time
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.grid(alpha=0.3)
    if any(label for label, _ in lines) and len(lines) > 1:
        ax.legend(fontsize=6, loc="best")


def _common_unit(keys: list[str]) -> str:
    units = {unit_of(k) for k in keys}
    return units.pop() if len(units) == 1 else ""


def namespace_figure(namespace: str, series: dict[str, Series], caption: str = "") -> Figure:
    """Small multiples of every key in `series` (all of one namespace)."""
    assert series, f"namespace_figure({namespace!r}): no series"
    panels: dict[str, list[tuple[str, str | None]]] = defaultdict(list)  # title -> [(key, label)]
    for key in series:
        title, label = panel_of(key)
        panels[title].append((key, label))
    fig, axes = _grid(len(panels))
    for ax, (title, members) in zip(axes, panels.items(), strict=True):
        keys = [k for k, _ in members]
        _draw(ax, title, [(label, series[k]) for k, label in members], _common_unit(keys))
    return _render(fig, caption or f"{namespace}/ metrics against training step")


def overlay_figure(namespace: str, runs: dict[str, dict[str, Series]], keys: list[str]) -> Figure:
    """One panel per key, one line per run (the runs' labels in the legend)."""
    assert keys, f"overlay_figure({namespace!r}): no keys"
    fig, axes = _grid(len(keys))
    for ax, key in zip(axes, keys, strict=True):
        lines = [(name, s[key]) for name, s in runs.items() if key in s]
        _draw(ax, key, lines, unit_of(key))
        ax.legend(fontsize=6, loc="best")  # always: the legend says which line is which run
    return _render(fig, f"{namespace}/ metrics of every run, one line per run")
