"""BatchTopK crosscoders: one sparse code shared by two models' activations at a site, a decoder per model.

A crosscoder (Lindsey et al. 2024) reads the activations x⁰ (base) and x¹ (other, e.g. the RL policy) of the
same token and reconstructs both from one code f:

    pre  = ReLU( Σ_m W_encᵐ x̃ᵐ + b_enc )                         (N, H)   x̃ᵐ = xᵐ / s (one scale s for both models)
    f    = pre ⊙ 1[ pre ⊙ (||d⁰|| + ||d¹||) is among the top k·N of the batch ]      (BatchTopK, training)
         = pre ⊙ 1[ pre ⊙ (||d⁰|| + ||d¹||) > θ ]                                    (inference; θ learned)
    x̂ᵐ   = s · ( f Wᵐ_dec + bᵐ_dec )                                (N, D) per model

Sparsity is BatchTopK (Bussmann et al. 2024; for crosscoders Minder et al. 2025, arXiv 2504.02922): on average k
latents per token, chosen over the batch by activation times the latent's summed decoder norms, so a latent
cannot win selection by shrinking its encoder and growing its decoder. No L1 penalty touches the decoder norms:
an L1 penalty is what manufactures fake model-exclusive latents (a concept that is weaker in one model gets its
decoder there shrunk to zero). θ, the inference threshold, is set after training to the score of the (k·n)-th
largest entry over n training rows (BatchTopK over one large batch), so encoding is per token and keeps k latents
per token on average. Dead latents (no firing for `dead_steps` steps) get the
AuxK loss: the top `aux_k` dead latents per token reconstruct the residual error, weighted `aux_alpha`.
Every latent starts shared (the same random unit decoder direction in both models, the encoder its transpose):
a latent is model-exclusive only if training makes it so.

Per latent, after training (`latent_table`, on held-out tokens):

    rel_norm   Δ = ½ ((||d¹|| - ||d⁰||) / max(||d⁰||, ||d¹||) + 1): 0 base-only, ½ shared, 1 other-only
    cosine     cos(d⁰, d¹), meaningful for shared latents
    class      base_only (Δ ≤ 0.1), other_only (Δ ≥ 0.9), shared (0.4 ≤ Δ ≤ 0.6), between, or dead (never fires on
               the held-out tokens); thresholds in `ExclusivityCriterion`

and the latent-scaling check (`latent_scaling`, Minder et al.) on exclusive latents. For an other-only latent j
with decoder vector d = d¹_j and activation f_j, the closed-form least-squares scale of f_j·d that best explains a
target yᵐ (per model m) is

    βᵐ = dᵀ Σᵢ f_j(xᵢ) yᵐᵢ / ( ||d||² Σᵢ f_j(xᵢ)² )

with two targets: the error yᵐ = xᵐ - (x̂ᵐ - f_j dᵐ_j) (what the crosscoder leaves unexplained in model m, latent j
put back) and the reconstruction yᵐ = x̂ᵐ. Their ratios ν_ε = β⁰_ε / β¹_ε and ν_r = β⁰_r / β¹_r say how much of
what the latent explains in the other model is also present in the base model: a high ν_ε means the base
activations contain the direction and the crosscoder shrank the base decoder to zero ("complete shrinkage"); a
high ν_r means other latents carry it in the base model ("latent decoupling"). A latent passes the check when
ν_ε ≤ `max_nu_error` and ν_r ≤ `max_nu_recon`. For base-only latents the roles of the models are swapped.

Saved as a folder: `crosscoder.safetensors` (W_enc (M, D, H), b_enc (H,), W_dec (H, M, D), b_dec (M, D), scale,
threshold) and `crosscoder.json` ({"format": "mechrl-crosscoder/1", "spec", "d_in", "dict_size", "n_models",
"models", "metrics"}); `load_crosscoder` reads it back.

    x = paired_activations([base, policy], tok, texts, "resid_post.2")        # (N, 2, D)
    cc, log = train_crosscoder(x, CrosscoderSpec(site="resid_post.2", dict_size=1024, k=8, steps=2000))
    table = latent_table(cc, held_out)                                        # per latent: rel_norm, class, ...
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from mechrl.analysis.cache import extract_activations

log = logging.getLogger(__name__)

FORMAT = "mechrl-crosscoder/1"
WEIGHTS_FILE = "crosscoder.safetensors"
CONFIG_FILE = "crosscoder.json"
CLASSES = ("base_only", "other_only", "shared", "between", "dead")


@dataclass
class CrosscoderSpec:
    """What to train and how. Validates itself on construction."""

    site: str
    """hook site of both models (alias such as `resid_post.2` or `mlp_out.1`, or a module path)"""
    dict_size: int | None = None
    """latents H; default `expansion` x d_in"""
    expansion: int = 8
    k: int = 8
    """mean active latents per token (BatchTopK keeps the top k x batch of each batch)"""
    steps: int = 2000
    batch_size: int = 1024
    """tokens per step"""
    lr: float = 1e-3
    """Adam, constant after `warmup_steps`, then linear decay to 0 over the last 20% of steps"""
    warmup_steps: int = 100
    aux_k: int | None = None
    """dead latents per token in the AuxK loss; default 2k"""
    aux_alpha: float = 1 / 32
    dead_steps: int = 200
    """steps without firing after which a latent counts as dead (for the AuxK loss)"""
    threshold_rows: int = 16384
    """training rows the inference threshold θ is calibrated on after training"""
    shared_init: bool = True
    """every latent starts with the same decoder direction in each model (False: independent directions)"""
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        for name in ("expansion", "k", "steps", "batch_size", "dead_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CrosscoderSpec.{name} must be positive, got {getattr(self, name)}")
        if self.dict_size is not None and self.dict_size <= self.k:
            raise ValueError(f"CrosscoderSpec: dict_size={self.dict_size} must exceed k={self.k}")
        if not (self.lr > 0 and self.aux_alpha >= 0 and self.threshold_rows > 0 and self.warmup_steps >= 0):
            raise ValueError(f"CrosscoderSpec: need lr > 0, aux_alpha >= 0, threshold_rows > 0, warmup >= 0 "
                             f"(got {self.lr}, {self.aux_alpha}, {self.threshold_rows}, {self.warmup_steps})")

    def width(self, d_in: int) -> int:
        return self.dict_size if self.dict_size is not None else self.expansion * d_in


@dataclass(frozen=True)
class ExclusivityCriterion:
    """Thresholds on the relative decoder norm Δ and on the latent-scaling ratios (see the module docstring)."""

    base_only_max: float = 0.1
    other_only_min: float = 0.9
    shared_min: float = 0.4
    shared_max: float = 0.6
    max_nu_error: float = 0.2
    max_nu_recon: float = 0.5

    def __post_init__(self):
        if not (0 <= self.base_only_max < self.shared_min <= self.shared_max < self.other_only_min <= 1):
            raise ValueError(f"ExclusivityCriterion: need 0 <= base_only_max < shared_min <= shared_max < "
                             f"other_only_min <= 1, got {asdict(self)}")


# --------------------------------------------------------------------------------------------- the model

class Crosscoder(nn.Module):
    """The crosscoder's parameters and its encode / decode maps (see the module docstring)."""

    def __init__(self, n_models: int, d_in: int, dict_size: int, k: int, seed: int = 0, shared_init: bool = True):
        super().__init__()
        assert n_models >= 2 and d_in > 0 and dict_size > k > 0, (n_models, d_in, dict_size, k)
        self.n_models, self.d_in, self.dict_size, self.k = n_models, d_in, dict_size, k
        gen = torch.Generator().manual_seed(seed)
        d = torch.randn(dict_size, 1 if shared_init else n_models, d_in, generator=gen)
        d = d / d.norm(dim=-1, keepdim=True)  # unit directions, by default the same in every model
        self.W_dec = nn.Parameter(d.expand(dict_size, n_models, d_in).contiguous())  # (H, M, D)
        self.W_enc = nn.Parameter(self.W_dec.detach().permute(1, 2, 0).contiguous().clone())  # (M, D, H)
        self.b_enc = nn.Parameter(torch.zeros(dict_size))  # (H,)
        self.b_dec = nn.Parameter(torch.zeros(n_models, d_in))  # (M, D)
        self.register_buffer("scale", torch.tensor(1.0))  # input scale s (raw activations / s are modelled)
        self.register_buffer("threshold", torch.tensor(-1.0))  # θ; < 0 until training has set it

    def decoder_norms(self) -> torch.Tensor:
        """(H, M) ||dᵐ_j||."""
        return self.W_dec.norm(dim=-1)

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """(N, M, D) raw activations -> (N, H) ReLU pre-activations."""
        N = x.shape[0]
        assert x.shape[1:] == (self.n_models, self.d_in), \
            f"crosscoder input must be (N, {self.n_models}, {self.d_in}), got {tuple(x.shape)}"
        xs = (x / self.scale).reshape(N, -1)  # (N, M*D)
        return torch.relu(xs @ self.W_enc.reshape(-1, self.dict_size) + self.b_enc)

    def scores(self, pre: torch.Tensor) -> torch.Tensor:
        """(N, H) selection scores: pre-activation times the latent's summed decoder norms."""
        return pre * self.decoder_norms().sum(-1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, M, D) -> (N, H) codes, per token with the learned threshold θ (after training; BatchTopK selection
        is for training only)."""
        if float(self.threshold) < 0:
            raise RuntimeError("Crosscoder.encode: the inference threshold is unset (train it first)")
        pre = self.pre(x)
        return pre * (self.scores(pre) > self.threshold)

    def batch_topk(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H) pre-activations -> (the mask of the batch's top k·N scores, the smallest kept score). A zero
        score (ReLU'd) is never kept."""
        s = self.scores(pre).detach()
        n_keep = min(self.k * pre.shape[0], s.numel())
        vals, idx = s.flatten().topk(n_keep, sorted=False)
        idx = idx[vals > 0]
        mask = torch.zeros(s.numel(), dtype=torch.bool, device=s.device).index_fill_(0, idx, True)
        cutoff = vals[vals > 0].min() if idx.numel() else s.new_zeros(())
        return mask.view_as(s), cutoff

    def decode(self, f: torch.Tensor, *, bias: bool = True) -> torch.Tensor:
        """(N, H) codes -> (N, M, D) reconstructions of the raw activations (without the decoder bias: the part
        the latents explain). A dense product: on CPU it beat gathering the k active rows (measured, d=128)."""
        out = (f @ self.W_dec.reshape(self.dict_size, -1)).view(-1, self.n_models, self.d_in)  # (N, M, D)
        return ((out + self.b_dec) if bias else out) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


# ------------------------------------------------------------------------------------------------ data

def paired_activations(models: Sequence[nn.Module], tokenizer, texts: Sequence[str], site: str, *,
                       batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Every real token of `texts` through each model at `site`: {"x": (N, M, D), "_example": (N,),
    "_position": (N,), "input_ids": (N,)} (M = len(models), the same token rows in each model)."""
    if len(models) < 2:
        raise ValueError(f"paired_activations: need at least two models, got {len(models)}")
    xs, ref = [], None
    for model in models:
        acts = extract_activations(model, tokenizer, texts, [site], positions=None, batch_size=batch_size,
                                   progress=False)
        if ref is None:
            ref = acts
        elif not (torch.equal(acts["_example"], ref["_example"]) and torch.equal(acts["_position"], ref["_position"])):
            raise RuntimeError("paired_activations: the models saw different token rows (different tokenizers?)")
        xs.append(acts[site].float())
    ids = token_ids(tokenizer, texts, ref["_example"], ref["_position"])
    return {"x": torch.stack(xs, 1), "_example": ref["_example"], "_position": ref["_position"], "input_ids": ids}


def token_ids(tokenizer, texts: Sequence[str], example: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """(N,) the token id of each activation row (text `example[i]`, real-token position `position[i]`)."""
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    out = torch.empty(len(example), dtype=torch.long)
    for i, (e, p) in enumerate(zip(example.tolist(), position.tolist())):
        out[i] = enc[e][p]
    return out


# -------------------------------------------------------------------------------------------- training

def _lr_at(spec: CrosscoderSpec, step: int) -> float:
    warm = min(1.0, (step + 1) / spec.warmup_steps) if spec.warmup_steps else 1.0
    decay_start = int(0.8 * spec.steps)
    decay = 1.0 if step < decay_start else max(0.0, (spec.steps - step) / max(1, spec.steps - decay_start))
    return spec.lr * warm * decay


def train_crosscoder(x: torch.Tensor, spec: CrosscoderSpec, *, progress: bool = False) -> tuple[Crosscoder, dict]:
    """Train a BatchTopK crosscoder on (N, M, D) paired activations (rows shuffled each epoch, seeded).
    Returns (the crosscoder in eval mode, a training log: losses every 50 steps, time, tokens/s)."""
    assert x.dim() == 3 and x.shape[1] >= 2, f"crosscoder data must be (N, M>=2, D), got {tuple(x.shape)}"
    N, M, D = x.shape
    if N < spec.batch_size:
        raise ValueError(f"train_crosscoder: {N} token rows, fewer than one batch of {spec.batch_size}")
    if not torch.isfinite(x).all():
        raise ValueError("train_crosscoder: activations contain NaN or inf")
    H = spec.width(D)
    dev = torch.device(spec.device)
    cc = Crosscoder(M, D, H, spec.k, seed=spec.seed, shared_init=spec.shared_init).to(dev)
    x = x.to(dev, torch.float32)
    with torch.no_grad():
        cc.scale.fill_(float(x.pow(2).sum(-1).mean().sqrt() / math.sqrt(D)))  # normalised rows have norm ~ sqrt(D)
        cc.b_dec.copy_(x.mean(0) / cc.scale)  # (M, D)
    opt = torch.optim.Adam(cc.parameters(), lr=spec.lr, betas=(0.9, 0.999))
    aux_k = spec.aux_k or 2 * spec.k
    since_fired = torch.zeros(H, dtype=torch.long, device=dev)
    gen = torch.Generator(device="cpu").manual_seed(spec.seed)
    order, cursor = torch.randperm(N, generator=gen), 0
    history = []
    t0 = time.perf_counter()
    cc.train()
    for step in tqdm(range(spec.steps), desc="crosscoder", disable=not progress):
        if cursor + spec.batch_size > N:
            order, cursor = torch.randperm(N, generator=gen), 0
        xb = x[order[cursor:cursor + spec.batch_size].to(dev)]  # (B, M, D)
        cursor += spec.batch_size
        for g in opt.param_groups:
            g["lr"] = _lr_at(spec, step)
        # ALGO LOGIC
        pre = cc.pre(xb)  # (B, H)
        keep, _ = cc.batch_topk(pre)  # (B, H) bool: the batch's top k·B scores
        f = pre * keep
        x_hat = cc.decode(f)  # (B, M, D) raw units
        err = (xb - x_hat) / cc.scale  # normalised units
        recon = err.pow(2).sum((1, 2)).mean()
        since_fired = torch.where(keep.any(0), torch.zeros_like(since_fired), since_fired + 1)
        dead = since_fired > spec.dead_steps
        aux = torch.zeros((), device=dev)
        if spec.aux_alpha > 0 and dead.any():
            k_aux = min(aux_k, int(dead.sum()))
            dead_scores = cc.scores(pre).detach().masked_fill(~dead, -1.0)  # only dead latents compete
            vals, idx = dead_scores.topk(k_aux, dim=-1)  # (B, k_aux)
            f_aux = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx) * (vals > 0))
            e_hat = cc.decode(f_aux, bias=False) / cc.scale  # (B, M, D) normalised: it models the residual
            e = err.detach()
            aux = (e - e_hat).pow(2).sum() / e.pow(2).sum().clamp(min=1e-12)
        loss = recon + spec.aux_alpha * aux
        if not torch.isfinite(loss):
            raise FloatingPointError(f"crosscoder training: loss is {loss.item()} at step {step} (lr {spec.lr} too high?)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # TRY NOT TO MODIFY: the log
        if step % 50 == 0 or step == spec.steps - 1:
            with torch.no_grad():
                xn = xb / cc.scale
                fvu = err.pow(2).sum() / (xn - xn.mean(0)).pow(2).sum().clamp(min=1e-12)
                history.append({"step": step, "loss": loss.item(), "recon": recon.item(), "aux": aux.item(),
                                "fvu": fvu.item(), "l0": int(keep.sum()) / len(xb), "dead": int(dead.sum())})
    wall = time.perf_counter() - t0
    thr = calibrate_threshold(cc, x[order[:spec.threshold_rows].to(dev)])
    cc.eval()
    for name, p in cc.named_parameters():
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"crosscoder parameter {name} is not finite after training")
    return cc, {"history": history, "wall_s": wall, "tokens_per_s": spec.steps * spec.batch_size / wall,
                "threshold": thr, "d_in": D, "dict_size": H, "n_models": M}


@torch.no_grad()
def calibrate_threshold(cc: Crosscoder, x: torch.Tensor, batch_size: int = 8192) -> float:
    """Set θ to the smallest score BatchTopK keeps over all of x (N, M, D) taken as one batch (k·N entries),
    so that per-token encoding keeps k latents per token on average on these rows. Returns θ."""
    scores = torch.cat([cc.scores(cc.pre(b)).flatten().cpu() for b in x.split(batch_size)])
    n_keep = min(cc.k * len(x), scores.numel())
    kept = scores.topk(n_keep, sorted=False).values
    kept = kept[kept > 0]
    if kept.numel() == 0:
        raise RuntimeError("calibrate_threshold: no latent has a positive score on these rows")
    theta = float(kept.min())
    cc.threshold.fill_(theta)
    return theta


# --------------------------------------------------------------------------------------------- metrics

@torch.no_grad()
def encode_all(cc: Crosscoder, x: torch.Tensor, batch_size: int = 8192, columns=None) -> torch.Tensor:
    """(N, M, D) -> (N, H) codes (or only the latents in `columns`: (N, len(columns))), in batches, on the
    crosscoder's device, returned on the CPU."""
    dev = cc.W_dec.device
    cols = None if columns is None else torch.as_tensor(list(columns), dtype=torch.long, device=dev)
    out = []
    for b in x.split(batch_size):
        f = cc.encode(b.to(dev, torch.float32))
        out.append((f if cols is None else f[:, cols]).cpu())
    return torch.cat(out)


@torch.no_grad()
def crosscoder_metrics(cc: Crosscoder, x: torch.Tensor) -> dict:
    """On held-out (N, M, D) activations: FVU per model, L0 (mean active latents per token), dead latents."""
    f = encode_all(cc, x)
    dev = cc.W_dec.device
    x_hat = torch.cat([cc.decode(b.to(dev)).cpu() for b in f.split(8192)])
    x64, xh64 = x.double(), x_hat.double()
    fvu = [float((x64[:, m] - xh64[:, m]).pow(2).sum() / (x64[:, m] - x64[:, m].mean(0)).pow(2).sum())
           for m in range(x.shape[1])]
    fires = (f > 0).any(0)
    return {"fvu": fvu, "l0": float((f > 0).sum(-1).float().mean()), "n_dead": int((~fires).sum()),
            "dead_fraction": float((~fires).float().mean()), "n_rows": int(x.shape[0]), "dict_size": int(f.shape[1])}


def relative_norms(cc: Crosscoder, a: int = 0, b: int = 1) -> torch.Tensor:
    """(H,) Δ = ½((||dᵇ|| - ||dᵃ||) / max(||dᵃ||, ||dᵇ||) + 1): 0 only in model a, 1 only in model b."""
    n = cc.decoder_norms().detach().double().cpu()
    na, nb = n[:, a], n[:, b]
    return 0.5 * ((nb - na) / torch.maximum(na, nb).clamp(min=1e-30) + 1.0)


def classify(rel_norm: torch.Tensor, freq: torch.Tensor, crit: ExclusivityCriterion = ExclusivityCriterion()) -> list[str]:
    """Per latent: base_only / other_only / shared / between by Δ, or dead when it never fires (freq = 0)."""
    out = []
    for d, fq in zip(rel_norm.tolist(), freq.tolist(), strict=True):
        if fq == 0:
            out.append("dead")
        elif d <= crit.base_only_max:
            out.append("base_only")
        elif d >= crit.other_only_min:
            out.append("other_only")
        elif crit.shared_min <= d <= crit.shared_max:
            out.append("shared")
        else:
            out.append("between")
    return out


@torch.no_grad()
def latent_scaling(cc: Crosscoder, x: torch.Tensor, latents: Sequence[int], *, toward: int = 1,
                   batch_size: int = 8192) -> dict[str, torch.Tensor]:
    """Closed-form latent-scaling betas and ratios for `latents`, fitting f_j · d_j^toward (see module docstring).

    Returns {"beta_error": (J, M), "beta_recon": (J, M), "nu_error": (J,), "nu_recon": (J,), "n_active": (J,)},
    where ν = β[other model] / β[toward] for two models (the other model is 1 - toward). A latent that never
    fires on `x` gets NaN betas.
    """
    idx = torch.as_tensor(list(latents), dtype=torch.long)
    if idx.numel() and (idx.min() < 0 or idx.max() >= cc.dict_size):
        raise IndexError(f"latent_scaling: latent indices must lie in [0, {cc.dict_size}), got {idx.tolist()[:10]}")
    if cc.n_models != 2 or toward not in (0, 1):
        raise ValueError(f"latent_scaling compares two models (toward 0 or 1); this crosscoder has {cc.n_models}")
    dev = cc.W_dec.device
    J, M = idx.numel(), cc.n_models
    d = cc.W_dec[idx.to(dev), toward].double()  # (J, D) the direction fitted in every model
    dec = cc.W_dec[idx.to(dev)].double()  # (J, M, D) each model's own decoder vector of j
    num_err = torch.zeros(J, M, dtype=torch.float64, device=dev)
    num_rec = torch.zeros(J, M, dtype=torch.float64, device=dev)
    f_sq = torch.zeros(J, dtype=torch.float64, device=dev)
    n_active = torch.zeros(J, dtype=torch.long, device=dev)
    s = float(cc.scale)
    for xb in x.split(batch_size):
        xb = xb.to(dev, torch.float32)
        f = cc.encode(xb)  # (B, H)
        x_hat = cc.decode(f).double()  # (B, M, D)
        fj = f[:, idx.to(dev)].double()  # (B, J)
        # Σ_i f_j(x_i) yᵢ projected on d, without forming (J, B, M, D): dᵀ(Σ f y) = Σ_i f_ij (y_i · d_j)
        rec_proj = torch.einsum("bmd,jd->bjm", x_hat, d)  # (B, J, M) x̂ᵐ_i · d_j
        err_proj = torch.einsum("bmd,jd->bjm", xb.double() - x_hat, d)  # (B, J, M) (xᵐ - x̂ᵐ)_i · d_j
        own = s * torch.einsum("jmd,jd->jm", dec, d)  # (J, M) (s dᵐ_j) · d_j: latent j's own term, put back
        err_proj = err_proj + fj[:, :, None] * own[None]  # (B, J, M) (xᵐ - (x̂ᵐ - f_j s dᵐ_j))_i · d_j
        num_err += torch.einsum("bj,bjm->jm", fj, err_proj)
        num_rec += torch.einsum("bj,bjm->jm", fj, rec_proj)
        f_sq += fj.pow(2).sum(0)
        n_active += (fj > 0).sum(0)
    # the fitted vector is f_j · s · d_j (decode's raw units), so β = dᵀΣ f y / (s ||d||² Σ f²)
    denom = (s * d.pow(2).sum(-1) * f_sq)[:, None]  # (J, 1)
    beta_err = torch.where(denom > 0, num_err / denom.clamp(min=1e-300), torch.nan)  # (J, M)
    beta_rec = torch.where(denom > 0, num_rec / denom.clamp(min=1e-300), torch.nan)
    other = 1 - toward
    return {"beta_error": beta_err.cpu(), "beta_recon": beta_rec.cpu(),
            "nu_error": (beta_err[:, other] / beta_err[:, toward]).cpu(),
            "nu_recon": (beta_rec[:, other] / beta_rec[:, toward]).cpu(), "n_active": n_active.cpu()}


@torch.no_grad()
def latent_table(cc: Crosscoder, x: torch.Tensor, crit: ExclusivityCriterion = ExclusivityCriterion(), *,
                 models: Sequence[str] = ("base", "other")) -> dict:
    """Per latent on held-out (N, 2, D) activations: firing frequency, mean activation, Δ, decoder cosine, class,
    and for the exclusive ones the latent-scaling betas, ratios and whether the check passes. JSON-ready."""
    if cc.n_models != 2:
        raise ValueError(f"latent_table compares two models; this crosscoder has {cc.n_models}")
    f = encode_all(cc, x)  # (N, H)
    freq = (f > 0).double().mean(0)
    mean_act = f.double().sum(0) / (f > 0).sum(0).clamp(min=1)  # mean over the tokens where it fires
    rel = relative_norms(cc)
    dec = cc.W_dec.detach().double().cpu()
    cos = torch.nn.functional.cosine_similarity(dec[:, 0], dec[:, 1], dim=-1)
    classes = classify(rel, freq, crit)
    rows = [{"latent": j, "freq": float(freq[j]), "mean_act": float(mean_act[j]), "rel_norm": float(rel[j]),
             "norm_base": float(dec[j, 0].norm()), "norm_other": float(dec[j, 1].norm()),
             "cosine": float(cos[j]), "class": classes[j]} for j in range(cc.dict_size)]
    for cls, toward in (("other_only", 1), ("base_only", 0)):
        js = [j for j in range(cc.dict_size) if classes[j] == cls]
        if not js:
            continue
        ls = latent_scaling(cc, x, js, toward=toward)
        for i, j in enumerate(js):
            nu_e, nu_r = float(ls["nu_error"][i]), float(ls["nu_recon"][i])
            ok = (math.isfinite(nu_e) and math.isfinite(nu_r) and nu_e <= crit.max_nu_error
                  and nu_r <= crit.max_nu_recon)
            rows[j].update({"beta_error": [_finite_or_none(v) for v in ls["beta_error"][i].tolist()],
                            "beta_recon": [_finite_or_none(v) for v in ls["beta_recon"][i].tolist()],
                            "nu_error": _finite_or_none(nu_e), "nu_recon": _finite_or_none(nu_r),
                            "scaling_ok": ok})
    counts = {c: sum(1 for r in rows if r["class"] == c) for c in CLASSES}
    passed = {c: sum(1 for r in rows if r["class"] == c and r.get("scaling_ok")) for c in ("other_only", "base_only")}
    return {"models": list(models), "criterion": asdict(crit), "n_rows": int(x.shape[0]), "counts": counts,
            "exclusive_passing_scaling": passed, "latents": rows}


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def top_exclusive(table: dict, n: int, cls: str = "other_only", *, require_scaling: bool = True) -> list[dict]:
    """The `n` latents of class `cls` with the most extreme Δ (closest to the model they belong to), ties broken by
    firing frequency; with `require_scaling` only those that pass the latent-scaling check."""
    rows = [r for r in table["latents"] if r["class"] == cls and (r.get("scaling_ok") or not require_scaling)]
    key = (lambda r: (-r["rel_norm"], -r["freq"])) if cls == "other_only" else (lambda r: (r["rel_norm"], -r["freq"]))
    return sorted(rows, key=key)[:n]


# ---------------------------------------------------------------------------------------- save / load

def save_crosscoder(cc: Crosscoder, path: str | Path, spec: CrosscoderSpec, *, models: Sequence[str] = ("base", "other"),
                    metrics: dict | None = None) -> Path:
    """Write the folder format of the module docstring; returns the folder."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in cc.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS_FILE))
    record = {"format": FORMAT, "spec": asdict(spec), "d_in": cc.d_in, "dict_size": cc.dict_size,
              "n_models": cc.n_models, "k": cc.k, "models": list(models), "metrics": metrics or {}}
    (path / CONFIG_FILE).write_text(json.dumps(record, indent=1, allow_nan=False))
    return path


def load_crosscoder(path: str | Path, device: str = "cpu") -> tuple[Crosscoder, dict]:
    """(crosscoder in eval mode, its JSON record) from a folder written by `save_crosscoder`."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: no {name} (not a folder written by mechrl's save_crosscoder)")
    record = json.loads((path / CONFIG_FILE).read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_FILE}: format {record.get('format')!r}, expected {FORMAT!r}")
    cc = Crosscoder(record["n_models"], record["d_in"], record["dict_size"], record["k"])
    cc.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
    return cc.to(device).eval(), record
