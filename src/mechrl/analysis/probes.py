"""Linear probes on cached activations: ridge regression and multinomial logistic regression.

Activations come as one tensor per distribution, (N, L, P, D): examples x layers x positions x
width. A probe is fitted for every (layer, position) on the in-distribution (ID) examples only,
and evaluated on held-out ID examples and on every out-of-distribution (OOD) set:

  - the ID examples are split by example (seeded) into train / val / test;
  - the regularisation strength is chosen per (layer, position) on ID val;
  - scores are reported on ID val (the selection score, optimistic by construction), ID test
    (untouched by fitting and selection) and each OOD set.

Ridge is solved in closed form for all layers, positions and strengths at once: one batched
eigendecomposition of the centred Gram matrix per (layer, position), in float64. Strengths are
given relative to the mean eigenvalue of XᵀX (`alpha * trace(XᵀX) / D`), so one grid fits
activations of any scale. Logistic probes use scikit-learn's multinomial L2 `LogisticRegression`
(lbfgs) on standardised features, one fit per (layer, position, C).

    result = probe(acts={"id": x_id, "ood_colors": x_ood}, labels={"id": y_id, "ood_colors": y_ood}, kind="ridge")
    result["records"][0]  # {"layer": 0, "position": -1, "distribution": "id_test", "metric": "r2", "value": 0.93, ...}
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

DEFAULT_RIDGE_ALPHAS = tuple(10.0 ** k for k in range(-6, 3))  # relative to the mean eigenvalue of XᵀX
DEFAULT_LOGISTIC_CS = (0.001, 0.01, 0.1, 1.0, 10.0)


# --------------------------------------------------------------------------------------------- ridge

@dataclass
class RidgeFit:
    """Ridge solutions for G groups (layer x position) and S strengths."""

    W: torch.Tensor  # (S, G, D, K)
    b: torch.Tensor  # (S, G, K)

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """(G, N, D) -> (S, G, N, K)."""
        X = X.to(self.W.dtype)
        return torch.einsum("gnd,sgdk->sgnk", X, self.W) + self.b[:, :, None, :]


def ridge_fit(X: torch.Tensor, y: torch.Tensor, lambdas: torch.Tensor) -> RidgeFit:
    """Ridge regression with intercept, argmin ||y - XW - b||² + λ||W||², for every group and λ.

    X: (G, N, D) one design matrix per group; y: (N, K) or (N,) shared targets; lambdas: (S,) for
    all groups or (S, G) per group. The intercept is not penalised (as in scikit-learn's Ridge).
    Solved through the eigendecomposition of XᵀX (D <= N) or of XXᵀ (D > N), so every λ costs one
    matrix product.
    """
    assert X.dim() == 3, f"X must be (G, N, D), got {tuple(X.shape)}"
    y = y[:, None] if y.dim() == 1 else y
    G, N, D = X.shape
    assert y.shape[0] == N, f"y has {y.shape[0]} rows, X has {N}"
    X, y = X.double(), y.double().to(X.device)
    lam = torch.as_tensor(lambdas, dtype=torch.float64, device=X.device)
    lam = lam[:, None].expand(-1, G) if lam.dim() == 1 else lam  # (S, G)
    assert lam.shape[1] == G and (lam >= 0).all(), f"lambdas must be (S,) or (S, {G}) and >= 0"
    x_mean, y_mean = X.mean(1, keepdim=True), y.mean(0, keepdim=True)  # (G, 1, D), (1, K)
    Xc, yc = X - x_mean, y - y_mean
    if D <= N:  # primal: W = V diag(1/(s+λ)) Vᵀ Xᵀy
        s, V = torch.linalg.eigh(Xc.transpose(1, 2) @ Xc)  # (G, D), (G, D, D)
        proj = V.transpose(1, 2) @ (Xc.transpose(1, 2) @ yc)  # (G, D, K)
        W = V[None] @ (proj[None] / (s[None, :, :, None] + lam[:, :, None, None]))  # (S, G, D, K)
    else:  # dual: W = Xᵀ U diag(1/(s+λ)) Uᵀ y
        s, U = torch.linalg.eigh(Xc @ Xc.transpose(1, 2))  # (G, N), (G, N, N)
        proj = U.transpose(1, 2) @ yc  # (G, N, K)
        W = Xc.transpose(1, 2)[None] @ (U[None] @ (proj[None] / (s[None, :, :, None] + lam[:, :, None, None])))
    if not torch.isfinite(W).all():
        raise FloatingPointError("ridge solution is not finite (λ = 0 on a rank-deficient design?)")
    b = y_mean[None] - (x_mean[None] @ W).squeeze(2)  # (S, G, K)
    return RidgeFit(W, b)


def r2_score(y: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """R² over the N axis, averaged over outputs (scikit-learn's `uniform_average`).
    y: (N, K); pred: (..., N, K) -> (...)."""
    y = y.double()
    ss_res = ((pred - y) ** 2).sum(-2)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    if (ss_tot == 0).any():
        raise ValueError("R² is undefined: a target is constant on this set")
    return (1 - ss_res / ss_tot).mean(-1)


# --------------------------------------------------------------------------------------------- splits

def split_indices(n: int, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded split of `n` examples into train / val / test index sets (disjoint, covering all)."""
    assert len(fractions) == 3 and abs(sum(fractions) - 1) < 1e-9, f"fractions must be 3 numbers summing to 1, got {fractions}"
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(round(fractions[0] * n)), int(round(fractions[1] * n))
    out = {"train": perm[:n_train], "val": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}
    for k, v in out.items():
        if len(v) < 2:
            raise ValueError(f"split {k!r} has {len(v)} examples (n={n}, fractions={fractions}); need more data")
    return out


# --------------------------------------------------------------------------------------------- probes

def _groups(x: torch.Tensor) -> torch.Tensor:
    """(N, L, P, D) -> (L*P, N, D): one design matrix per (layer, position), layer-major."""
    assert x.dim() == 4, f"activations must be (N, L, P, D), got {tuple(x.shape)}"
    N, L, P, D = x.shape
    return x.permute(1, 2, 0, 3).reshape(L * P, N, D)


def _check_inputs(acts: Mapping[str, torch.Tensor], labels: Mapping, id_key: str) -> None:
    if id_key not in acts:
        raise KeyError(f"no ID activations under {id_key!r}; got {sorted(acts)}")
    if set(acts) != set(labels):
        raise KeyError(f"activations for {sorted(acts)} but labels for {sorted(labels)}")
    shape = acts[id_key].shape[1:]
    for k, x in acts.items():
        if x.shape[1:] != shape:
            raise ValueError(f"{k}: activations {tuple(x.shape)} do not match ID's (N, {', '.join(map(str, shape))})")
        if len(labels[k]) != len(x):
            raise ValueError(f"{k}: {len(labels[k])} labels for {len(x)} examples")


def probe(acts: Mapping[str, torch.Tensor], labels: Mapping[str, Sequence], kind: Literal["ridge", "logistic"], *,
          id_key: str = "id", positions: Sequence[int] | None = None, layers: Sequence[int] | None = None,
          strengths: Sequence[float] | None = None, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0,
          label: str = "") -> dict:
    """Fit a probe per (layer, position) on ID, choose its strength on ID val, score every distribution.

    acts: distribution -> (N, L, P, D); labels: distribution -> (N,) targets (numbers for ridge, or
    (N, K); any hashable classes for logistic). `positions` / `layers` name the P and L axes in the
    records (default 0..P-1, 0..L-1). `strengths`: ridge alphas (relative, see module doc) or
    logistic Cs. Returns a JSON-ready dict with one record per (layer, position, distribution).
    """
    _check_inputs(acts, labels, id_key)
    N, L, P, D = acts[id_key].shape
    layers = list(range(L)) if layers is None else list(layers)
    positions = list(range(P)) if positions is None else list(positions)
    assert len(layers) == L and len(positions) == P, f"layers {layers} / positions {positions} do not match {(L, P)}"
    split = split_indices(N, fractions, seed)
    if kind == "ridge":
        scores, chosen = _ridge_scores(acts, labels, id_key, split, strengths or DEFAULT_RIDGE_ALPHAS)
        metric, extra, not_converged = "r2", {}, []
    elif kind == "logistic":
        scores, chosen, extra, not_converged = _logistic_scores(acts, labels, id_key, split, strengths or DEFAULT_LOGISTIC_CS)
        metric = "accuracy"
    else:
        raise ValueError(f"unknown probe kind {kind!r}; choose ridge or logistic")
    records = []
    for g in range(L * P):
        layer, pos = layers[g // P], positions[g % P]
        for dist, vals in scores.items():
            value = float(vals[g])
            rec = {"layer": layer, "position": pos, "distribution": dist, "metric": metric,
                   "value": None if np.isnan(value) else value, "strength": float(chosen[g]), **extra.get(dist, {})}
            if np.isnan(value):
                rec["undefined"] = "the target is constant on this set"
            records.append(rec)
    ood = [k for k in acts if k != id_key]
    return {"label": label, "kind": kind, "metric": metric, "layers": layers, "positions": positions,
            "distributions": ["id_val", "id_test", *ood], "strength_grid": [float(s) for s in (strengths or (
                DEFAULT_RIDGE_ALPHAS if kind == "ridge" else DEFAULT_LOGISTIC_CS))],
            "n": {"id_train": len(split["train"]), "id_val": len(split["val"]), "id_test": len(split["test"]),
                  **{k: len(acts[k]) for k in ood}}, "seed": seed, "records": records,
            # (layer, position, C) fits that stopped at max_iter before converging (logistic only)
            "not_converged": [{"layer": layers[g // P], "position": positions[g % P], "strength": c}
                              for g, c in not_converged]}


def _ridge_scores(acts, labels, id_key, split, alphas):
    """Per distribution, (G,) R² at the strength chosen on ID val; and the chosen λ per group."""
    to_y = lambda v: torch.as_tensor(np.asarray(v, dtype=np.float64))  # noqa: E731
    X = {k: _groups(x.double()) for k, x in acts.items()}  # (G, N, D)
    y = {k: to_y(v) for k, v in labels.items()}
    y = {k: v[:, None] if v.dim() == 1 else v for k, v in y.items()}  # (N, K)
    Xid, yid = X[id_key], y[id_key]
    Xtr = Xid[:, split["train"]]
    scale = (Xtr - Xtr.mean(1, keepdim=True)).pow(2).sum((1, 2)) / Xtr.shape[-1]  # (G,) trace(XᵀX)/D
    lam = torch.tensor(alphas, dtype=torch.float64)[:, None] * scale[None]  # (S, G)
    fit = ridge_fit(Xtr, yid[split["train"]], lam)
    val = r2_score(yid[split["val"]], fit.predict(Xid[:, split["val"]]))  # (S, G); raises if ID val is constant
    best = val.argmax(0)  # (G,)
    g = torch.arange(len(best))
    pick = lambda pred: pred[best, g]  # noqa: E731  (S, G, ...) -> (G, ...)
    scores = {"id_val": val[best, g], "id_test": pick(_r2_or_nan(yid[split["test"]], fit.predict(Xid[:, split["test"]])))}
    for k in acts:
        if k != id_key:
            scores[k] = pick(_r2_or_nan(y[k], fit.predict(X[k])))
    return scores, lam[best, g]


def _r2_or_nan(y: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """R² on an evaluation set, NaN where the target is constant there (e.g. the sum of a colour an
    OOD set never deals); `probe` reports those as null with the reason."""
    if ((y - y.mean(0)) ** 2).sum(0).eq(0).any():
        return torch.full(pred.shape[:-2], float("nan"), dtype=torch.float64)
    return r2_score(y, pred)


def _logistic_scores(acts, labels, id_key, split, Cs):
    """Per distribution, (G,) accuracy at the C chosen on ID val; chosen C per group; per-distribution
    baselines; fits that did not converge. Classes unseen in ID train count as errors (`unseen_class_frac`)."""
    from threadpoolctl import threadpool_limits

    train_labels = [labels[id_key][i] for i in split["train"].tolist()]
    classes = sorted(set(train_labels), key=str)
    if len(classes) < 2:
        raise ValueError(f"logistic probe: ID train has a single class {classes}; nothing to separate")
    code = {c: i for i, c in enumerate(classes)}
    y = {k: np.array([code.get(c, -1) for c in v]) for k, v in labels.items()}  # -1: a class unseen in training
    X = {k: _groups(x.float()).numpy() for k, x in acts.items()}  # (G, N, D)
    tr, va, te = (split[s].numpy() for s in ("train", "val", "test"))
    G = X[id_key].shape[0]
    dists = ["id_val", "id_test", *[k for k in acts if k != id_key]]
    rows = {"id_val": (id_key, va), "id_test": (id_key, te), **{k: (k, slice(None)) for k in acts if k != id_key}}
    scores = {d: np.zeros(G) for d in dists}
    chosen = np.zeros(G)
    not_converged: list[tuple[int, float]] = []
    # one BLAS/OpenMP thread: these fits are small, and with torch's OpenMP pool alive next to
    # OpenBLAS's, multi-threaded lbfgs ran 10-40x slower (measured on 2 cores, 480 x 128 features)
    with threadpool_limits(limits=1):
        for g in range(G):
            _fit_group(g, X, y, id_key, tr, va, Cs, dists, rows, scores, chosen, not_converged)
    majority = np.bincount(y[id_key][tr]).argmax()
    extra = {}
    for d in dists:
        key, idx = rows[d]
        yy = y[key][idx]
        extra[d] = {"majority_baseline": float((yy == majority).mean()), "unseen_class_frac": float((yy == -1).mean())}
    return scores, chosen, extra, not_converged


def _fit_group(g, X, y, id_key, tr, va, Cs, dists, rows, scores, chosen, not_converged) -> None:
    """Logistic probes of group g for every C; keep the best on ID val and score every distribution
    with it (writes into `scores`, `chosen`, `not_converged`)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X[id_key][g, tr])
    fits = []
    for C in Cs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", category=ConvergenceWarning)
            clf = LogisticRegression(C=C, max_iter=2000).fit(scaler.transform(X[id_key][g, tr]), y[id_key][tr])
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            not_converged.append((g, float(C)))  # reported in the result, never dropped
        fits.append(clf)
    val_acc = [(f.predict(scaler.transform(X[id_key][g, va])) == y[id_key][va]).mean() for f in fits]
    best = int(np.argmax(val_acc))
    chosen[g] = Cs[best]
    for d in dists:
        key, idx = rows[d]
        scores[d][g] = (fits[best].predict(scaler.transform(X[key][g, idx])) == y[key][idx]).mean()
