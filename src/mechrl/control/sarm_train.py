"""Fitting a SARM-form reward model (`SAEReward`) on top of a trained reward model.

    1. hidden states of the reward model (the trunk) at block `layer`, at each text's end token,
       standardised per token as SARM does;
    2. a TopK SAE on them, trained by SAELens through `mechrl.analysis.sae.train_sae`;
    3. a bias-free linear head w on the latents, trained with the Bradley-Terry loss on preference pairs,
       -log sigmoid(w . (z_chosen - z_rejected)), plus `l2` ||w||^2. By default the SAE is frozen (its
       latents are computed once); with `joint` the SAE's encoder trains too, with its reconstruction loss
       (weight `recon_coef`) kept in the objective so that the latents stay an SAE's (SARM's default trains
       SAE and head together).

    sarm, record = fit_sarm(rm_path, sae_texts, train_pairs, SARMConfig(), out_dir)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from mechrl.analysis.sae import SAESpec, load_sae, reconstruction_stats, save_sae, train_sae
from mechrl.config import Strict
from mechrl.control.sarm import SAEReward, hidden_at_end, standardize
from mechrl.train.reward_model import RewardModel, encode

log = logging.getLogger(__name__)

__all__ = ["SARMConfig", "bt_loss", "fit_head", "fit_sarm"]


class SARMConfig(Strict):
    """The SAE and head of a SARM-form reward model."""

    layer: int | None = None
    """Block whose output the SAE reads; None: the last block."""
    standardize: bool = True
    expansion: int = Field(4, ge=1)
    k: int = Field(8, ge=1)
    sae_steps: int = Field(2000, ge=1)
    sae_batch_size: int = Field(256, ge=1)
    sae_lr: float = Field(1e-3, gt=0)
    head_steps: int = Field(500, ge=1)
    head_lr: float = Field(1e-2, gt=0)
    l2: float = Field(1e-4, ge=0)
    joint: bool = False
    """Train the SAE's encoder with the head (reconstruction loss kept, weight `recon_coef`)."""
    recon_coef: float = Field(1.0, ge=0)
    seed: int = 0


def bt_loss(w: torch.Tensor, z_chosen: torch.Tensor, z_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss of a bias-free linear head: mean of -log sigmoid(w . (z_c - z_r)); z (N, d_sae), w (d_sae,)."""
    return -F.logsigmoid((z_chosen - z_rejected) @ w).mean()


def fit_head(z_chosen: torch.Tensor, z_rejected: torch.Tensor, *, steps: int, lr: float, l2: float,
             seed: int = 0) -> tuple[torch.Tensor, dict]:
    """The head w (d_sae,) minimising `bt_loss` + l2 ||w||^2 on frozen latents (full-batch Adam from w = 0)."""
    assert z_chosen.shape == z_rejected.shape and z_chosen.dim() == 2, (z_chosen.shape, z_rejected.shape)
    torch.manual_seed(seed)
    w = torch.zeros(z_chosen.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    losses = []
    for _ in range(steps):
        loss = bt_loss(w, z_chosen, z_rejected) + l2 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if not bool(torch.isfinite(w).all()):
        raise FloatingPointError(f"fit_head: non-finite head weights (lr {lr})")
    w = w.detach()
    acc = float(((z_chosen - z_rejected) @ w > 0).float().mean())
    return w, {"loss_first": losses[0], "loss_last": losses[-1], "train_accuracy": acc}


def _joint(sae, h_c: torch.Tensor, h_r: torch.Tensor, h_sae: torch.Tensor, cfg: SARMConfig) -> tuple[torch.Tensor, dict]:
    """Head and SAE encoder trained together (decoder fixed): BT loss + recon_coef * MSE on the SAE data."""
    torch.manual_seed(cfg.seed)
    w = torch.zeros(sae.cfg.d_sae, requires_grad=True)
    enc = [sae.W_enc, sae.b_enc]
    for p in enc:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": [w], "lr": cfg.head_lr}, {"params": enc, "lr": cfg.sae_lr}])
    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for _ in range(cfg.head_steps):
        rows = h_sae[torch.randint(len(h_sae), (min(cfg.sae_batch_size, len(h_sae)),), generator=g)]
        bt = bt_loss(w, sae.encode(h_c), sae.encode(h_r))
        recon = (sae.decode(sae.encode(rows)) - rows).pow(2).sum(-1).mean()
        loss = bt + cfg.l2 * w.pow(2).sum() + cfg.recon_coef * recon
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for p in enc:
        p.requires_grad_(False)
    w = w.detach()
    with torch.no_grad():
        acc = float(((sae.encode(h_c) - sae.encode(h_r)) @ w > 0).float().mean())
    return w, {"loss_first": losses[0], "loss_last": losses[-1], "train_accuracy": acc}


def _get(p, k):
    return p[k] if isinstance(p, dict) else getattr(p, k)


def fit_sarm(rm_path: str | Path, sae_texts: tuple[Sequence[str], Sequence[str]], pairs: Sequence,
             cfg: SARMConfig, out_dir: str | Path, *, held_out_texts: tuple[Sequence[str], Sequence[str]] | None = None
             ) -> tuple[SAEReward, dict]:
    """Fit the SAE on the hidden states of `sae_texts` (prompts, completions) and the head on `pairs`, save the
    `SAEReward` to `out_dir` and return it with a record (SAE metrics on `held_out_texts`, head fit, times)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    rm = RewardModel.load(rm_path)
    trunk, tok = rm.model, rm.tokenizer
    n_layers = int(getattr(trunk.config, "num_hidden_layers", None) or trunk.config.n_layer)
    layer = n_layers - 1 if cfg.layer is None else cfg.layer
    if not 0 <= layer < n_layers:
        raise ValueError(f"SARMConfig.layer={cfg.layer} outside 0..{n_layers - 1}")
    end = tok.eos_token_id

    def hid(prompts, completions):
        h = hidden_at_end(trunk, tok, layer, encode(tok, list(prompts), list(completions)), end)
        return standardize(h) if cfg.standardize else h

    h_sae = hid(*sae_texts)  # (N, D)
    spec = SAESpec(site=f"resid_post.{layer}", architecture="topk", expansion=cfg.expansion, k=cfg.k,
                   steps=cfg.sae_steps, batch_size=min(cfg.sae_batch_size, len(h_sae)), lr=cfg.sae_lr, seed=cfg.seed)
    t1 = time.perf_counter()
    trained = train_sae(h_sae, spec)
    sae_time = time.perf_counter() - t1
    save_sae(trained, out / "sae", spec)
    sae, _ = load_sae(out / "sae")  # the inference SAE, as SAELens loads it
    held = hid(*held_out_texts) if held_out_texts is not None else h_sae
    with torch.no_grad():
        z_held = sae.encode(held)
        sae_stats = reconstruction_stats(held, sae.decode(z_held), z_held)
    prompts = [_get(p, "prompt") for p in pairs]
    h_c, h_r = hid(prompts, [_get(p, "chosen") for p in pairs]), hid(prompts, [_get(p, "rejected") for p in pairs])
    t2 = time.perf_counter()
    if cfg.joint:
        head, head_rec = _joint(sae, h_c, h_r, h_sae, cfg)
    else:
        with torch.no_grad():
            z_c, z_r = sae.encode(h_c), sae.encode(h_r)
        head, head_rec = fit_head(z_c, z_r, steps=cfg.head_steps, lr=cfg.head_lr, l2=cfg.l2, seed=cfg.seed)
    head_time = time.perf_counter() - t2
    sarm = SAEReward(trunk, tok, sae, head, layer=layer, standardize_hidden=cfg.standardize, end_token_id=end,
                     text_format="plain", meta={"reward_model": str(rm_path), "config": cfg.model_dump(mode="json")})
    sarm.save(out)
    record = {"layer": layer, "d_sae": sarm.d_sae, "n_sae_rows": len(h_sae), "n_pairs": len(pairs),
              "sae": sae_stats, "head": head_rec, "sae_train_s": sae_time, "head_train_s": head_time,
              "wall_s": time.perf_counter() - t0}
    log.info("SARM: SAE fvu %.3f l0 %.1f dead %d/%d, head train accuracy %.3f (%.0f s)", sae_stats["fvu"],
             sae_stats["l0"], sae_stats["n_dead"], sarm.d_sae, head_rec["train_accuracy"], record["wall_s"])
    return sarm, record
