"""What SAE features respond to: activation statistics per task label, and ID-specific vs OOD-stable features.

A feature's value on an example is its SAE latent at the chosen prompt positions (default: the last prompt
token, where the answer starts), taking the max over positions when several are chosen (`positions=None`:
every prompt token). A feature is *active* on an example when that value is > 0 (SAE latents are ReLU'd).

Label groups are boolean masks over examples (`card_groups`), a small set chosen to be readable:

    family=<name>        the rule family
    has_<COLOUR>         at least one card of that colour
    max_value=<range>    the largest card value: 0-3, 4-6, 7-9 (higher: 10+)
    n_cards=<range>      3-4, 5-6, 7+ cards
    score<0 / score=0 / score>0

For each feature and group: activation frequency and mean activation inside the group, and selectivity =
freq(in group) - freq(rest).

ID vs OOD (`classify_id_ood`), per OOD set, from activation frequencies f_id (held-out ID) and f_ood:

    id_specific   f_id >= 0.05  and  f_ood <= 0.2 * f_id
    ood_specific  f_ood >= 0.05 and  f_id <= 0.2 * f_ood
    ood_stable    f_id >= 0.01, f_ood >= 0.01 and |ln(f_ood / f_id)| <= ln 2   (within a factor of 2)
    rare          f_id < 0.01 and f_ood < 0.01
    other         anything else (a shift between 2x and 5x, or one side rare)

The classes are disjoint (id_specific means a ratio <= 0.2, ood_stable one >= 0.5). Thresholds are arguments;
the table records the ones used.

    table = card_feature_table(model, tok, task, sae, "resid_post.1", n_examples=500)
    plot_feature_table(table, "features.png")
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mechrl.analysis.cache import extract_activations
from mechrl.analysis.sae import encode

CLASSES = ("id_specific", "ood_specific", "ood_stable", "rare", "other")


@dataclass(frozen=True)
class IdOodCriterion:
    """Thresholds of `classify_id_ood` (see the module docstring)."""

    specific_min_freq: float = 0.05  # the side a feature is specific to fires on at least this fraction
    specific_max_ratio: float = 0.2  # ... and the other side at most this fraction of it
    stable_min_freq: float = 0.01  # both sides fire at least this often
    stable_max_log_ratio: float = math.log(2)  # |ln(f_ood / f_id)| at most this

    def describe(self) -> str:
        return (f"id_specific: f_id >= {self.specific_min_freq} and f_ood <= {self.specific_max_ratio} * f_id; "
                f"ood_specific: the same with ID and OOD swapped; ood_stable: f_id, f_ood >= {self.stable_min_freq} "
                f"and |ln(f_ood/f_id)| <= {self.stable_max_log_ratio:.4f}; rare: both < {self.stable_min_freq}; "
                "other: the rest")


def classify_id_ood(freq_id: np.ndarray, freq_ood: np.ndarray, crit: IdOodCriterion = IdOodCriterion()) -> np.ndarray:
    """(F,) ID and OOD activation frequencies -> (F,) class names (see `CLASSES`)."""
    f_id, f_ood = np.asarray(freq_id, dtype=float), np.asarray(freq_ood, dtype=float)
    assert f_id.shape == f_ood.shape and f_id.ndim == 1, f"frequency shapes differ: {f_id.shape} vs {f_ood.shape}"
    if ((f_id < 0) | (f_id > 1) | (f_ood < 0) | (f_ood > 1)).any():
        raise ValueError("activation frequencies must lie in [0, 1]")
    out = np.full(f_id.shape, "other", dtype=object)
    lo = crit.stable_min_freq
    out[(f_id < lo) & (f_ood < lo)] = "rare"
    both = (f_id >= lo) & (f_ood >= lo)
    ratio = np.divide(f_ood, f_id, out=np.ones_like(f_id), where=both)  # only read where both fire
    out[both & (np.abs(np.log(ratio)) <= crit.stable_max_log_ratio + 1e-12)] = "ood_stable"  # 1e-12: ratio 2 is in
    out[(f_id >= crit.specific_min_freq) & (f_ood <= crit.specific_max_ratio * f_id)] = "id_specific"
    out[(f_ood >= crit.specific_min_freq) & (f_id <= crit.specific_max_ratio * f_ood)] = "ood_specific"
    return out.astype(str)


# ------------------------------------------------------------------------------------- labels

def _bucket(v: int, edges: Sequence[tuple[int, int | None]]) -> str:
    for lo, hi in edges:
        if v >= lo and (hi is None or v <= hi):
            return f"{lo}-{hi}" if hi is not None else f"{lo}+"
    raise ValueError(f"value {v} falls in no bucket of {list(edges)}")


def card_groups(examples: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """Label groups (name -> (N,) bool mask) of card examples; groups no example belongs to are left out."""
    if not examples:
        raise ValueError("card_groups: no examples")
    n = len(examples)
    groups: dict[str, np.ndarray] = {}

    def add(name: str, i: int):
        groups.setdefault(name, np.zeros(n, dtype=bool))[i] = True

    for i, ex in enumerate(examples):
        add(f"family={ex['family']}", i)
        for c in sorted(set(ex["cards_colors"])):
            add(f"has_{c}", i)
        add(f"max_value={_bucket(max(ex['cards_values']), [(0, 3), (4, 6), (7, 9), (10, None)])}", i)
        add(f"n_cards={_bucket(ex['n_cards'], [(0, 4), (5, 6), (7, None)])}", i)
        s = ex["score"]
        add("score<0" if s < 0 else "score=0" if s == 0 else "score>0", i)
    return dict(sorted(groups.items()))


# ------------------------------------------------------------------------------------ features

@torch.no_grad()
def feature_values(model, tokenizer, sae, site: str, prompts: Sequence[str], *, positions: Sequence[int] | None = (-1,),
                   batch_size: int = 64) -> torch.Tensor:
    """(N, d_sae): each prompt's SAE latents at `site`, max over `positions` (None: every prompt token)."""
    acts = extract_activations(model, tokenizer, list(prompts), [site], positions=positions, batch_size=batch_size,
                               progress=False)
    z = encode(sae, acts[site].float())  # (N, P, d_sae) or (rows, d_sae)
    if positions is not None:
        return z.amax(1)
    ex = acts["_example"]  # (rows,) example index of each token row
    out = torch.full((len(prompts), z.shape[-1]), -torch.inf)
    out.scatter_reduce_(0, ex[:, None].expand_as(z), z, reduce="amax")
    assert torch.isfinite(out).all(), "an example contributed no tokens"
    return out


def group_stats(values: torch.Tensor, groups: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Per group: (F,) activation frequency and mean activation inside it, frequency outside, selectivity."""
    v = values.double().numpy()  # (N, F)
    active = v > 0
    out = {}
    for name, mask in groups.items():
        mask = np.asarray(mask, dtype=bool)
        assert mask.shape == (len(v),), f"group {name!r} mask {mask.shape} does not match {len(v)} examples"
        if not mask.any():
            raise ValueError(f"group {name!r} is empty")
        f_in = active[mask].mean(0)
        f_out = active[~mask].mean(0) if (~mask).any() else np.zeros(v.shape[1])
        out[name] = {"n": int(mask.sum()), "freq": f_in, "mean": v[mask].mean(0), "freq_rest": f_out,
                     "selectivity": f_in - f_out}
    return out


def feature_table(values: Mapping[str, torch.Tensor], groups: Mapping[str, np.ndarray], *, id_key: str = "id",
                  crit: IdOodCriterion = IdOodCriterion(), top: int = 20) -> dict:
    """The JSON-ready feature table from per-split feature values (split -> (N_s, F)) and ID label groups.

    `values[id_key]` is the held-out ID set the groups describe; every other key is an OOD set.
    """
    if id_key not in values:
        raise KeyError(f"feature_table: no ID values under {id_key!r}; got {sorted(values)}")
    F = values[id_key].shape[1]
    for k, v in values.items():
        assert v.dim() == 2 and v.shape[1] == F, f"{k}: values {tuple(v.shape)} do not have {F} features"
    freq = {k: (v > 0).double().mean(0).numpy() for k, v in values.items()}  # split -> (F,)
    mean = {k: v.double().mean(0).numpy() for k, v in values.items()}
    oods = [k for k in values if k != id_key]
    classes = {k: classify_id_ood(freq[id_key], freq[k], crit) for k in oods}
    stats = group_stats(values[id_key], groups)
    best = np.stack([stats[g]["selectivity"] for g in stats]) if stats else np.zeros((0, F))  # (G, F)
    names = list(stats)

    def record(f: int) -> dict:
        g = int(best[:, f].argmax()) if len(names) else None
        return {"feature": f, "freq_id": float(freq[id_key][f]), "mean_id": float(mean[id_key][f]),
                "freq": {k: float(freq[k][f]) for k in values}, "class": {k: str(classes[k][f]) for k in oods},
                "best_group": names[g] if g is not None else None,
                "selectivity": float(best[g, f]) if g is not None else None,
                "freq_by_group": {n: float(stats[n]["freq"][f]) for n in names},
                "mean_by_group": {n: float(stats[n]["mean"][f]) for n in names}}

    by_freq = np.argsort(-freq[id_key], kind="stable")[:top]
    by_sel = np.argsort(-best.max(0), kind="stable")[:top] if len(names) else np.zeros(0, dtype=int)
    return {
        "id_split": id_key, "ood_splits": oods, "n_features": F,
        "n_examples": {k: int(v.shape[0]) for k, v in values.items()},
        "criterion": {**asdict(crit), "text": crit.describe()},
        "class_counts": {k: {c: int((classes[k] == c).sum()) for c in CLASSES} for k in oods},
        "freq": {k: freq[k].round(6).tolist() for k in values},
        "classes": {k: classes[k].tolist() for k in oods},
        "groups": {n: stats[n]["n"] for n in names},
        "top_by_frequency": [record(int(f)) for f in by_freq],
        "top_by_selectivity": [record(int(f)) for f in by_sel if best[:, f].max() > 0],
    }


def card_feature_table(model, tokenizer, task, sae, site: str, *, n_examples: int = 500, id_split: str = "test",
                       ood_splits: Sequence[str] | None = None, positions: Sequence[int] | None = (-1,),
                       crit: IdOodCriterion = IdOodCriterion(), top: int = 20, batch_size: int = 64) -> dict:
    """`feature_table` for the card game: held-out ID examples (`id_split`) against every OOD split."""
    data = task.datasets
    oods = [s for s in task.eval_splits if s != id_split] if ood_splits is None else list(ood_splits)
    missing = [s for s in [id_split, *oods] if s not in data]
    if missing:
        raise KeyError(f"task {task.name!r} has no split(s) {missing}; it has {list(data)}")
    values, id_examples = {}, None
    for split in [id_split, *oods]:
        ds = data[split].select(range(min(n_examples, len(data[split]))))
        values[split] = feature_values(model, tokenizer, sae, site, ds["prompt"], positions=positions,
                                       batch_size=batch_size)
        if split == id_split:
            id_examples = list(ds)
    table = feature_table(values, card_groups(id_examples), id_key=id_split, crit=crit, top=top)
    table.update({"site": site, "positions": None if positions is None else list(positions)})
    return table


def save_feature_table(table: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(table, indent=1, allow_nan=False))
    return path


# ---------------------------------------------------------------------------------------- plot

_COLORS = {"id_specific": "tab:red", "ood_specific": "tab:purple", "ood_stable": "tab:green", "rare": "lightgray",
           "other": "tab:gray"}


def plot_feature_table(table: dict, path: str | Path | None = None, *, n_heatmap: int = 20) -> bytes:
    """A PNG: per OOD split, feature frequency ID vs OOD (log-log, coloured by class, the factor-2 band
    dashed; a frequency of 0 is drawn at half of one example's frequency, on the axis edge), and a heatmap of
    the most selective features' frequency in each label group. Returns the PNG bytes, also written to `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    oods = table["ood_splits"]
    heat = table["top_by_selectivity"][:n_heatmap]
    n_panels = len(oods) + (1 if heat else 0)
    if n_panels == 0:
        raise ValueError("feature table has neither OOD splits nor selective features to plot")
    cols = min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows))
    FigureCanvasAgg(fig)
    lo = 1.0 / max(table["n_examples"].values())  # floor for log axes: one example
    f_id = np.maximum(np.asarray(table["freq"][table["id_split"]]), lo / 2)
    for i, split in enumerate(oods):
        ax = fig.add_subplot(rows, cols, i + 1)
        f_ood = np.maximum(np.asarray(table["freq"][split]), lo / 2)
        cls = np.asarray(table["classes"][split])
        for c in CLASSES:
            m = cls == c
            if m.any():
                ax.scatter(f_id[m], f_ood[m], s=8, color=_COLORS[c], label=f"{c} ({int(m.sum())})")
        grid = np.array([lo / 2, 1.0])
        ax.plot(grid, grid, color="black", linewidth=0.8)
        for r in (0.5, 2.0):
            ax.plot(grid, grid * r, color="black", linewidth=0.6, linestyle="--")
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlim(lo / 2, 1.05), ax.set_ylim(lo / 2, 1.05)
        ax.set_xlabel(f"freq {table['id_split']}", fontsize=8), ax.set_ylabel(f"freq {split}", fontsize=8)
        ax.set_title(split, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right")
    if heat:
        ax = fig.add_subplot(rows, cols, len(oods) + 1)
        groups = list(table["groups"])
        m = np.array([[r["freq_by_group"][g] for g in groups] for r in heat])  # (features, groups)
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(heat)), [str(r["feature"]) for r in heat], fontsize=6)
        ax.set_xticks(range(len(groups)), groups, fontsize=6, rotation=90)
        ax.set_title("activation freq by label group (most selective)", fontsize=9)
        fig.colorbar(im, ax=ax)
    # fixed margins (no constrained layout: it draws twice); room below for the heatmap's group names
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.3 / rows, top=1 - 0.07 / rows, wspace=0.4, hspace=0.9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    png = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(png)
    return png
