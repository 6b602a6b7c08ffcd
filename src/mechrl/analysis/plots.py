"""Figures for patching and ablation results (matplotlib's Agg canvas: no pyplot state, no display).

    patching_heatmap(result)           resid scores, layer x position (positions from the end)
    head_heatmap(result)               per-head scores, layer x head (patching or ablation results)
    importance_heatmap(result)         ablation importance: heads (layer x head) beside MLPs (layer)
    jaccard_bar(compare_top_k(a, b))   top-k overlap of two checkpoints, one bar group per split

Each returns a `matplotlib.figure.Figure`; `save_png(fig, path)` writes it. NaN cells (positions
not patched, components not evaluated) are drawn blank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

_DPI = 100


def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _diverging(values: np.ndarray) -> TwoSlopeNorm:
    """A colour scale centred on 0, so recovery and harm read as opposite colours."""
    finite = values[np.isfinite(values)]
    lim = float(np.abs(finite).max()) if finite.size else 1.0
    lim = lim or 1.0
    return TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)


def _heatmap(ax, values: np.ndarray, xlabels: Sequence, ylabels: Sequence, label: str):
    values = np.asarray(values, dtype=float)
    assert values.shape == (len(ylabels), len(xlabels)), f"heatmap {values.shape} vs labels {(len(ylabels), len(xlabels))}"
    im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="RdBu_r", norm=_diverging(values),
                   interpolation="nearest")
    step = max(1, len(xlabels) // 20)
    ax.set_xticks(range(0, len(xlabels), step), [str(x) for x in xlabels][::step])
    ax.set_yticks(range(len(ylabels)), [str(y) for y in ylabels])
    ax.figure.colorbar(im, ax=ax, label=label)
    return im


def patching_heatmap(result: Mapping, *, title: str = "Residual stream patching",
                     tokens: Sequence[str] | None = None) -> Figure:
    """Layer x position heatmap of `result["resid"]["scores"]` (`activation_patching` or attribution).
    `tokens` (one per position, e.g. one pair's corrupted tokens) replace the position numbers."""
    scores = np.asarray(result["resid"]["scores"], dtype=float)  # (L, T)
    xlabels = list(tokens) if tokens is not None else list(result["positions"])
    fig = _figure(max(6.0, 0.22 * scores.shape[1]), 1.0 + 0.45 * scores.shape[0])
    ax = fig.add_subplot()
    _heatmap(ax, scores, xlabels, range(scores.shape[0]), f"normalised {result['metric']} (1 = clean)")
    ax.set_xlabel("position (from the end)" if tokens is None else "token")
    ax.set_ylabel("layer (resid_post)")
    ax.set_title(f"{title} ({result.get('method', 'exact')}, {len(result['kept'])} pairs)")
    if tokens is not None:
        for t in ax.get_xticklabels():
            t.set_rotation(90)
    fig.tight_layout()
    return fig


def head_heatmap(values, *, title: str, label: str) -> Figure:
    """Layer x head heatmap of an (L, H) array (patching `result["heads"]["scores"]` or ablation `result["heads"]`)."""
    values = np.asarray(values, dtype=float)  # (L, H)
    fig = _figure(1.5 + 0.5 * values.shape[1], 1.0 + 0.45 * values.shape[0])
    ax = fig.add_subplot()
    _heatmap(ax, values, range(values.shape[1]), range(values.shape[0]), label)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def importance_heatmap(result: Mapping, *, title: str = "Ablation importance") -> Figure:
    """Heads (layer x head) and MLPs (layer) of an `ablation_importance` result, on one colour scale."""
    heads = np.asarray(result["heads"], dtype=float)  # (L, H)
    mlp = np.asarray(result["mlp"], dtype=float)[:, None]  # (L, 1)
    both = np.concatenate([heads, mlp], 1)  # (L, H + 1)
    fig = _figure(2.0 + 0.5 * both.shape[1], 1.0 + 0.45 * both.shape[0])
    ax = fig.add_subplot()
    _heatmap(ax, both, [*range(heads.shape[1]), "MLP"], range(both.shape[0]),
             f"drop in {result['metric']} ({result['mode']} ablation)")
    ax.axvline(heads.shape[1] - 0.5, color="black", lw=1)
    ax.set_xlabel("head / MLP")
    ax.set_ylabel("layer")
    ax.set_title(f"{title} ({result['n_examples']} examples)")
    fig.tight_layout()
    return fig


def jaccard_bar(overlap: Mapping[str, Mapping[int, float]], *, title: str = "Top-k overlap (Jaccard)",
                labels: tuple[str, str] = ("SFT", "RL")) -> Figure:
    """Grouped bars: per split, one bar per k with the Jaccard overlap of the two checkpoints' top-k sets."""
    splits = list(overlap)
    ks = sorted({k for v in overlap.values() for k in v})
    if not splits or not ks:
        raise ValueError("jaccard_bar: nothing to plot")
    fig = _figure(1.5 + 1.2 * len(splits), 3.0)
    ax = fig.add_subplot()
    width = 0.8 / len(ks)
    x = np.arange(len(splits))
    for i, k in enumerate(ks):
        ax.bar(x + (i - (len(ks) - 1) / 2) * width, [overlap[s].get(k, np.nan) for s in splits], width, label=f"top-{k}")
    ax.set_xticks(x, splits)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("split")
    ax.set_ylabel(f"Jaccard({labels[0]}, {labels[1]})")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
