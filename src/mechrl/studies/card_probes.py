"""Probes for the card game's labels: prompts of each split -> residual stream -> `probes.probe`.

Probes are trained on ID examples (the task's `train` split, prompts the model was trained on, which
is where "does the model represent X" is asked) and evaluated on held-out ID examples and on every
OOD split the task evaluates. Each label has a kind: numbers get ridge probes (R²), categories
logistic probes (accuracy).

    result = probe_card_label(model, tok, task, "score", positions=(-1,), n_examples=500)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mechrl.analysis.cache import extract_activations
from mechrl.analysis.hooks import n_layers
from mechrl.analysis.probes import probe

#: Card labels a probe can target, and the probe each gets. `sum_<COLOUR>` labels are regression too.
REGRESSION_LABELS = ("score", "total", "partial_a", "partial_b", "n_cards", "threshold")
CLASSIFICATION_LABELS = ("family", "aggregate", "combine", "sel_a", "sel_b", "big", "question", "phrasing", "template")


def label_kind(name: str) -> str:
    if name in REGRESSION_LABELS or name.startswith("sum_"):
        return "ridge"
    if name in CLASSIFICATION_LABELS:
        return "logistic"
    raise KeyError(f"no probe kind for card label {name!r}; regression labels: {list(REGRESSION_LABELS)} and "
                   f"sum_<COLOUR>; classification labels: {list(CLASSIFICATION_LABELS)}")


def residual_stream(model, tokenizer, prompts: Sequence[str], positions: Sequence[int], batch_size: int = 64,
                    progress: bool = False) -> torch.Tensor:
    """(N, L, P, D): every block's output (`resid_post.{L}`) at `positions` of each prompt."""
    names = [f"resid_post.{L}" for L in range(n_layers(model))]
    acts = extract_activations(model, tokenizer, list(prompts), names, positions=positions,
                               batch_size=batch_size, progress=progress)
    return torch.stack([acts[n] for n in names], dim=1)


def probe_card_label(model, tokenizer, task, label: str, *, positions: Sequence[int] = (-1,), n_examples: int = 1000,
                     splits: Sequence[str] | None = None, seed: int = 0, batch_size: int = 64,
                     progress: bool = False) -> dict:
    """Probe every layer's residual stream at `positions` for `label`; a tidy result dict (see `probes.probe`).

    ID pool: the first `n_examples` of the task's `train` split. OOD sets: `splits` (default: every
    evaluated split but `test`), at most `n_examples` each.
    """
    kind = label_kind(label)
    data = task.datasets
    splits = [s for s in task.eval_splits if s != "test"] if splits is None else list(splits)
    missing = [s for s in ["train", *splits] if s not in data]
    if missing:
        raise KeyError(f"task {task.name!r} has no split(s) {missing}; it has {list(data)}")
    acts, labels = {}, {}
    for key, split in [("id", "train"), *[(s, s) for s in splits]]:
        ds = data[split].select(range(min(n_examples, len(data[split]))))
        if label not in ds.column_names:
            raise KeyError(f"split {split!r} has no label {label!r}; columns: {ds.column_names}")
        acts[key] = residual_stream(model, tokenizer, ds["prompt"], positions, batch_size, progress)
        labels[key] = list(ds[label])
    result = probe(acts, labels, kind, positions=positions, seed=seed, label=label)
    result["sites"] = [f"resid_post.{L}" for L in range(n_layers(model))]
    result["id_split"] = "train"
    return result
