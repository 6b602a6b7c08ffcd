"""Sparse autoencoders on mechrl activations: trained with SAELens, measured on held-out data and in the model.

Training goes through SAELens's own `SAETrainer`, fed by mechrl's activation iterator (`activation_batches`:
an in-memory tensor from `extract_activations`, or an `ActivationStore` on disk), so the saved folder is a
plain SAELens SAE (`SAE.load_from_disk(path)` loads it) with mechrl's `mechrl_sae.json` beside it.
Two architectures: "standard" (ReLU latents, L1 penalty) and "topk" (exactly k latents per row). Nothing is
logged to wandb or fetched from the network.

Measures (`sae_metrics`, on held-out activations: `fit_card_sae` takes them from another split):

    fvu        fraction of variance unexplained, sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (pooled over
               rows and dims; 0 perfect, 1 no better than the mean)
    l0         mean number of non-zero latents per row (per token)
    n_dead     latents that are zero on every row of the held-out set; the window is that set
               (`dead_window_rows` rows), so a latent dead here may fire elsewhere

and, spliced into the model (`splice_loss`): the teacher-forced loss on gold completions (mean NLL per
completion token, EOS included; prompt + completion + EOS as SFT trains) with the site's activation replaced
by the SAE's reconstruction at every position, next to the clean loss and the zero-ablation loss (site set
to 0) for scale; `loss_recovered` = (zero - spliced) / (zero - clean).

    spec = SAESpec(site="resid_post.1", architecture="topk", expansion=4, k=8, steps=2000)
    result = fit_card_sae(model, tok, task, spec, out_dir="saes/resid_post.1")
    result["metrics"]["fvu"], result["splice"]["delta"]
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from mechrl.analysis.cache import extract_activations, prepare_batch
from mechrl.analysis.hooks import hooks, resolve_site
from mechrl.analysis.store import ActivationStore

log = logging.getLogger(__name__)

ARCHITECTURES = ("standard", "topk")
METRICS_FILE = "mechrl_sae.json"  # mechrl's metrics and spec, next to SAELens's cfg.json + sae_weights.safetensors
METRICS_FORMAT = "mechrl-sae/1"


@dataclass
class SAESpec:
    """What to train, where, and how. Validates itself on construction."""

    site: str
    """hook site whose activations the SAE reconstructs (alias such as `resid_post.1` or a module path)"""
    architecture: Literal["standard", "topk"] = "topk"
    """"standard": ReLU latents with an L1 penalty; "topk": the k largest pre-activations, ReLU'd"""
    expansion: int = 4
    """d_sae = expansion * d_in, unless d_sae is given"""
    d_sae: int | None = None
    k: int = 8
    """TopK only: active latents per row"""
    l1_coefficient: float = 1.0
    """standard only: weight of the L1 penalty (on latent x decoder-norm)"""
    l1_warm_up_steps: int = 0
    lr: float = 1e-3
    lr_end: float | None = None
    """final learning rate of the cosine schedule; default lr / 10"""
    lr_warm_up_steps: int = 0
    steps: int = 2000
    batch_size: int = 256
    """rows (tokens) per step"""
    normalize: Literal["none", "expected_average_only_in"] = "none"
    """SAELens's input scaling: "expected_average_only_in" scales inputs to norm sqrt(d_in) while training and
    folds the factor into the weights at the end (the saved SAE takes raw activations either way)"""
    dead_feature_window: int = 1000
    """steps without firing after which SAELens counts a latent dead during training (TopK's aux loss uses it)"""
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"SAESpec.architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.normalize not in ("none", "expected_average_only_in"):
            raise ValueError(f"SAESpec.normalize must be 'none' or 'expected_average_only_in', got {self.normalize!r}")
        for name in ("expansion", "k", "steps", "batch_size", "dead_feature_window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SAESpec.{name} must be positive, got {getattr(self, name)}")
        if self.d_sae is not None and self.d_sae <= 0:
            raise ValueError(f"SAESpec.d_sae must be positive, got {self.d_sae}")
        if not (self.lr > 0 and self.l1_coefficient >= 0):
            raise ValueError(f"SAESpec: lr must be > 0 and l1_coefficient >= 0, got {self.lr}, {self.l1_coefficient}")

    def width(self, d_in: int) -> int:
        return self.d_sae if self.d_sae is not None else self.expansion * d_in


# ------------------------------------------------------------------------------------------ data

ActivationSource = torch.Tensor | ActivationStore


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(N, D) or (N, P, D) -> (N*P, D): every row is one token's activation."""
    if x.dim() == 3:
        x = x.reshape(-1, x.shape[-1])
    if x.dim() != 2:
        raise ValueError(f"activations must be (N, D) or (N, P, D), got shape {tuple(x.shape)}")
    return x


def activation_batches(source: ActivationSource, batch_size: int, *, site: str | None = None,
                       seed: int = 0) -> Iterator[torch.Tensor]:
    """An endless iterator of (batch_size, D) float32 activation batches, reshuffled every epoch.

    A tensor is shuffled whole; an `ActivationStore` (tensor `site`) is read one shard at a time, rows
    shuffled within each shard, so memory stays at one shard. Plain tensor ops only, outside any
    `torch.no_grad()`: grad mode is thread-global and SAELens's backward runs between our yields.
    """
    gen = torch.Generator().manual_seed(seed)
    if isinstance(source, ActivationStore):
        if site is None:
            raise ValueError(f"activation_batches: reading {source.path} needs the site name; it holds {source.names}")
        if len(source) < batch_size:
            raise ValueError(f"{source.path} has {len(source)} rows, fewer than one batch of {batch_size}")

        def shards():
            for shard in source:
                yield _rows(shard[site])
    else:
        rows = _rows(source)
        if len(rows) < batch_size:
            raise ValueError(f"activation_batches: {len(rows)} rows, fewer than one batch of {batch_size}")

        def shards():
            yield rows
    while True:
        carry = None
        for x in shards():
            x = x[torch.randperm(len(x), generator=gen)]
            x = x if carry is None else torch.cat([carry, x])
            n_full = len(x) // batch_size * batch_size
            for b in x[:n_full].split(batch_size):
                yield b.float()
            carry = x[n_full:]


def _d_in(source: ActivationSource, site: str | None) -> int:
    if isinstance(source, ActivationStore):
        if site not in source.index["tensors"]:
            raise KeyError(f"{source.path} has no tensor {site!r}; it has {source.names}")
        return int(source.index["tensors"][site]["shape"][-1])
    return int(source.shape[-1])


# --------------------------------------------------------------------------------------- training

def build_training_sae(spec: SAESpec, d_in: int):
    """An untrained SAELens training SAE for `spec` (seeded from `spec.seed`)."""
    from sae_lens import StandardTrainingSAE, TopKTrainingSAE
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    d_sae = spec.width(d_in)
    common = dict(d_in=d_in, d_sae=d_sae, device=spec.device, normalize_activations=spec.normalize)
    if spec.architecture == "topk" and spec.k > d_sae:
        raise ValueError(f"SAESpec.k={spec.k} exceeds d_sae={d_sae}")
    with torch.random.fork_rng(devices=[]):  # seeded init without moving the caller's RNG
        torch.manual_seed(spec.seed)
        if spec.architecture == "topk":
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=spec.k, **common))
        else:
            sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=spec.l1_coefficient,
                                                                l1_warm_up_steps=spec.l1_warm_up_steps, **common))
    sae.cfg.metadata.hook_name = spec.site  # SAELens's field for "where this SAE reads"; a mechrl site name
    return sae


def _sae_trainer_class():
    """SAELens's `SAETrainer` with its progress bar advanced every step (it advances every 100 steps,
    so a run of fewer steps showed 0/N until it ended)."""
    from sae_lens.training.sae_trainer import SAETrainer

    class ProgressSAETrainer(SAETrainer):
        def _update_pbar(self, step_output, pbar, update_interval: int = 100):
            super()._update_pbar(step_output, pbar, update_interval=1)

    return ProgressSAETrainer


def train_sae(source: ActivationSource, spec: SAESpec, *, site: str | None = None):
    """Train an SAE with SAELens's `SAETrainer` on `source` (tensor (N, D) / (N, P, D), or a store).

    `site` names the store's tensor (default `spec.site`). Returns the trained SAELens training SAE in eval
    mode; its `encode` / `decode` are what `save_sae` writes and `SAE.load_from_disk` reads back.
    """
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    _SAETrainer = _sae_trainer_class()
    site = spec.site if site is None else site
    d_in = _d_in(source, site)
    sae = build_training_sae(spec, d_in)
    cfg = SAETrainerConfig(
        total_training_samples=spec.steps * spec.batch_size, train_batch_size_samples=spec.batch_size,
        lr=spec.lr, lr_end=spec.lr / 10 if spec.lr_end is None else spec.lr_end,
        lr_scheduler_name="cosineannealing", lr_warm_up_steps=spec.lr_warm_up_steps, device=spec.device,
        dead_feature_window=spec.dead_feature_window, feature_sampling_window=spec.steps,
        n_batches_for_norm_estimate=min(100, spec.steps), logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0, save_final_checkpoint=False, checkpoint_path=None,
    )
    trainer = _SAETrainer(cfg=cfg, sae=sae, data_provider=activation_batches(source, spec.batch_size, site=site,
                                                                           seed=spec.seed))
    sae = trainer.fit()
    for name, p in sae.named_parameters():
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"SAE parameter {name} is not finite after training (lr {spec.lr} too high?)")
    return sae.eval()


def save_sae(sae, path: str | Path, spec: SAESpec, metrics: dict | None = None) -> Path:
    """SAELens's `save_model` (cfg.json + sae_weights.safetensors, loadable with `SAE.load_from_disk`), plus
    `mechrl_sae.json` with the spec and any metrics."""
    path = Path(path)
    sae.save_model(path)
    record = {"format": METRICS_FORMAT, "spec": asdict(spec), "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
              "metrics": metrics or {}}
    (path / METRICS_FILE).write_text(json.dumps(record, indent=1, allow_nan=False))
    return path


def load_sae(path: str | Path, device: str = "cpu"):
    """(SAELens inference SAE, mechrl record) from a folder written by `save_sae`."""
    from sae_lens import SAE

    path = Path(path)
    if not (path / METRICS_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {METRICS_FILE} (not written by mechrl's save_sae)")
    record = json.loads((path / METRICS_FILE).read_text())
    if record.get("format") != METRICS_FORMAT:
        raise ValueError(f"{path / METRICS_FILE}: format {record.get('format')!r}, expected {METRICS_FORMAT!r}")
    return SAE.load_from_disk(path, device=device).eval(), record


# ---------------------------------------------------------------------------------------- metrics

@torch.no_grad()
def encode(sae, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """(..., D) activations -> (..., d_sae) latents, in batches, on the SAE's device, returned on x's device."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    dev, dtype = sae.W_dec.device, sae.W_dec.dtype
    out = [sae.encode(b.to(dev, dtype)).to(x.device) for b in rows.split(batch_size)]
    return torch.cat(out).reshape(*lead, -1)


def reconstruct(sae, x: torch.Tensor) -> torch.Tensor:
    """decode(encode(x)) with x's shape, dtype and device (the SAE's error term is never added)."""
    dev, dtype = sae.W_dec.device, sae.W_dec.dtype
    lead = x.shape[:-1]
    z = sae.encode(x.reshape(-1, x.shape[-1]).to(dev, dtype))
    return sae.decode(z).reshape(*lead, -1).to(x.device, x.dtype)


def reconstruction_stats(x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> dict:
    """FVU, MSE, L0 and dead latents of one held-out set: x, x_hat (N, D), z (N, d_sae). Pure arithmetic."""
    assert x.shape == x_hat.shape and x.dim() == 2, f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} must be equal (N, D)"
    assert z.dim() == 2 and z.shape[0] == x.shape[0], f"latents {tuple(z.shape)} do not match {x.shape[0]} rows"
    x, x_hat, z = x.double(), x_hat.double(), z.double()
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    if total == 0:
        raise ValueError("held-out activations have zero variance; FVU is undefined")
    active = z != 0  # (N, d_sae)
    fires = active.any(0)  # (d_sae,)
    return {
        "fvu": float(resid / total), "mse": float(resid / x.numel()), "l0": float(active.sum(-1).float().mean()),
        "n_dead": int((~fires).sum()), "dead_fraction": float((~fires).double().mean()),
        "dead_window_rows": int(x.shape[0]), "d_sae": int(z.shape[1]), "n_rows": int(x.shape[0]),
    }


@torch.no_grad()
def sae_metrics(sae, held_out: ActivationSource, *, site: str | None = None, batch_size: int = 4096) -> dict:
    """FVU, L0 and dead latents on held-out activations (a tensor (N, D) / (N, P, D), or a store + `site`)."""
    if isinstance(held_out, ActivationStore):
        if site is None:
            raise ValueError(f"sae_metrics: reading {held_out.path} needs the site name; it holds {held_out.names}")
        x = _rows(held_out.load(site))
    else:
        x = _rows(held_out)
    z = encode(sae, x.float(), batch_size)
    x_hat = torch.cat([sae.decode(b.to(sae.W_dec.device, sae.W_dec.dtype)).cpu() for b in z.split(batch_size)])
    return reconstruction_stats(x.float().cpu(), x_hat, z.cpu())


# ---------------------------------------------------------------------------------- splicing

def completion_batch(tokenizer, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, torch.Tensor]:
    """Teacher-forcing batch as SFT sees it: prompt ids + completion ids + EOS, right-padded.

    `labels` (B, T) holds each position's next token where it belongs to the completion (EOS included),
    -100 elsewhere, so logits[:, t] is scored against labels[:, t].
    """
    assert len(prompts) == len(completions), f"{len(prompts)} prompts vs {len(completions)} completions"
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("tokenizer needs eos and pad tokens to score completions")
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    seqs, targets = [], []
    for p, c in zip(p_ids, c_ids):
        if not p or not c:
            raise ValueError("an empty prompt or completion cannot be scored")
        ids = p + c + [tokenizer.eos_token_id]
        seqs.append(ids)
        # position t predicts ids[t+1]; completion tokens (and EOS) start at index len(p)
        targets.append([-100] * (len(p) - 1) + c + [tokenizer.eos_token_id, -100])
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), tokenizer.pad_token_id)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), -100)
    for i, (s, t) in enumerate(zip(seqs, targets)):
        ids[i, :len(s)], mask[i, :len(s)], labels[i, :len(t)] = torch.tensor(s), 1, torch.tensor(t)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def completion_loss(model: nn.Module, tokenizer, prompts: Sequence[str], completions: Sequence[str], *,
                    replace: dict | None = None, batch_size: int = 64) -> tuple[float, int]:
    """(mean next-token NLL over every completion token, number of tokens), teacher-forced.

    `replace` maps site names to hook functions (see `hooks.hooks`) active during the forward passes.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    try:
        for start in range(0, len(prompts), batch_size):
            batch = completion_batch(tokenizer, prompts[start:start + batch_size], completions[start:start + batch_size])
            labels = batch.pop("labels").to(device)
            inputs = prepare_batch(batch, device)
            if replace:
                with hooks(model, replace):
                    logits = model(**inputs).logits
            else:
                logits = model(**inputs).logits
            nll = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                              reduction="sum")
            total += float(nll)
            n += int((labels != -100).sum())
    finally:
        model.train(was_training)
    if not math.isfinite(total):
        raise FloatingPointError(f"completion loss is {total} (replace: {sorted(replace or {})})")
    return total / n, n


def splice_fn(sae, site: str):
    """Hook function that replaces the site's (B, T, D) tensor with the SAE's reconstruction."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != sae.cfg.d_in:
            raise ValueError(f"site {site!r} has width {x.shape[-1]}, the SAE reads {sae.cfg.d_in}")
        return reconstruct(sae, x)
    return fn


def splice_loss(model: nn.Module, tokenizer, sae, site: str, prompts: Sequence[str], completions: Sequence[str], *,
                batch_size: int = 64) -> dict:
    """LM loss on gold completions, clean vs. SAE spliced in at `site` (all positions) vs. site zero-ablated."""
    s = resolve_site(model, site)
    if s.n_heads is not None and s.head is None:
        raise ValueError(f"site {site!r} is (B, T, H, d_head); splice an SAE per head (head_out.L.H) instead")
    clean, n = completion_loss(model, tokenizer, prompts, completions, batch_size=batch_size)
    spliced, _ = completion_loss(model, tokenizer, prompts, completions, batch_size=batch_size,
                                 replace={site: splice_fn(sae, site)})
    zero, _ = completion_loss(model, tokenizer, prompts, completions, batch_size=batch_size,
                              replace={site: torch.zeros_like})
    gap = zero - clean
    return {"site": site, "clean": clean, "spliced": spliced, "delta": spliced - clean, "zero_ablation": zero,
            "loss_recovered": (zero - spliced) / gap if gap != 0 else None, "n_tokens": n, "n_examples": len(prompts),
            "positions": "all"}


# ----------------------------------------------------------------------------------- card task

def task_texts(task, split: str, n: int) -> tuple[list[str], list[str]]:
    """(prompts, gold completions) of the first `n` examples of a split."""
    ds = task.datasets
    if split not in ds:
        raise KeyError(f"task {task.name!r} has no split {split!r}; it has {list(ds)}")
    d = ds[split].select(range(min(n, len(ds[split]))))
    return list(d["prompt"]), list(d["completion"])


def fit_card_sae(model: nn.Module, tokenizer, task, spec: SAESpec, *, n_train: int = 2000, n_eval: int = 500,
                 train_split: str = "train", eval_split: str = "val", out_dir: str | Path | None = None,
                 store_dir: str | Path | None = None, batch_size: int = 64, progress: bool = False) -> dict:
    """Train an SAE at `spec.site` on every token of the task's prompt + gold completion texts, measure it.

    Training rows: every real token of the first `n_train` examples of `train_split` (in memory, or in an
    `ActivationStore` under `store_dir`). Held-out: the first `n_eval` examples of `eval_split`, for FVU, L0,
    dead latents and the spliced LM loss. With `out_dir`, the SAE and its metrics are saved there.
    Returns {"sae", "spec", "metrics", "splice", "path"}.
    """
    prompts, comps = task_texts(task, train_split, n_train)
    train_acts = extract_activations(model, tokenizer, [p + c for p, c in zip(prompts, comps)], [spec.site],
                                     positions=None, batch_size=batch_size, out_dir=store_dir, progress=progress)
    source = train_acts if isinstance(train_acts, ActivationStore) else train_acts[spec.site]
    sae = train_sae(source, spec)
    ev_prompts, ev_comps = task_texts(task, eval_split, n_eval)
    held = extract_activations(model, tokenizer, [p + c for p, c in zip(ev_prompts, ev_comps)], [spec.site],
                               positions=None, batch_size=batch_size, progress=progress)[spec.site]
    metrics = sae_metrics(sae, held)
    metrics.update({"train_split": train_split, "n_train_examples": len(prompts), "eval_split": eval_split,
                    "n_eval_examples": len(ev_prompts)})
    splice = splice_loss(model, tokenizer, sae, spec.site, ev_prompts, ev_comps, batch_size=batch_size)
    log.info("SAE %s: fvu %.4f, l0 %.2f, dead %d/%d, loss %.4f -> %.4f (zero %.4f)", spec.site, metrics["fvu"],
             metrics["l0"], metrics["n_dead"], metrics["d_sae"], splice["clean"], splice["spliced"],
             splice["zero_ablation"])
    path = save_sae(sae, out_dir, spec, {**metrics, "splice": splice}) if out_dir is not None else None
    return {"sae": sae, "spec": spec, "metrics": metrics, "splice": splice, "path": path}
