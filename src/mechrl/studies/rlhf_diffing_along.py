"""Along the run: the diffing measures between the base model and each saved checkpoint of one RL run, so a user
sees when the change appears (no published tool does this).

Per checkpoint step-N of the policy run:

    divergence   relative weight change per block, activation CKA and logit-lens KL per layer (held-out texts)
    mmcs         an SAE on the checkpoint's `mlp_out.L` (L the study's top divergent layer) against an SAE on the
                 base model's (both with the same reduced budget `along.sae_steps`): MMCS both ways
    exclusivity  a crosscoder base vs checkpoint at the study's site (`along.crosscoder_steps`): other-only latents,
                 and those passing the latent-scaling check

Each checkpoint's record is written to `<folder>/step-N.json` as soon as it is done, so a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from mechrl.analysis.cache import extract_activations
from mechrl.analysis.crosscoder import latent_table, paired_activations, train_crosscoder
from mechrl.analysis.diffing import alive_features, mmcs, sae_directions
from mechrl.analysis.divergence import divergence
from mechrl.analysis.sae import SAESpec, load_sae, save_sae, train_sae
from mechrl.models.loading import load_pretrained
from mechrl.runs.rundir import RunDir, atomic_write_json

log = logging.getLogger(__name__)


def _sae(model, tok, train_texts, held_texts, site: str, spec: SAESpec, path: Path):
    """(SAE, alive mask on held-out tokens), trained and saved under `path` or loaded from it."""
    held = extract_activations(model, tok, held_texts, [site], positions=None, progress=False)[site]
    if (path / "mechrl_sae.json").is_file():
        sae, _ = load_sae(path)
    else:
        train = extract_activations(model, tok, train_texts, [site], positions=None, progress=False)[site]
        sae = train_sae(train, spec)
        save_sae(sae, path, spec)
    return sae, alive_features(sae, held)


def along_the_run(cfg, run: RunDir, base, tok, train_texts: list[str], held_texts: list[str], site: str, layer: int,
                  folder: Path) -> list[dict]:
    """One record per checkpoint of `run` (ascending steps); see the module docstring."""
    from mechrl.studies.rlhf_diffing import _criterion, crosscoder_spec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sae_site = f"mlp_out.{layer}"
    spec = SAESpec(site=sae_site, architecture="topk", expansion=cfg.sae.expansion, k=cfg.sae.k,
                   steps=cfg.along.sae_steps, batch_size=cfg.sae.batch_size, lr=cfg.sae.lr, seed=cfg.seed)
    base_sae, base_alive = _sae(base, tok, train_texts, held_texts, sae_site, spec, folder / "sae-base")
    texts = list(train_texts) + list(held_texts)
    held = torch.tensor([False] * len(train_texts) + [True] * len(held_texts))
    records = []
    for step, _ in run.checkpoints():
        path = folder / f"step-{step}.json"
        if path.is_file():
            records.append(json.loads(path.read_text()))
            continue
        log.info("rlhf-diffing along the run: step %d", step)
        model, _ = load_pretrained(run.checkpoint_path(step), device=str(next(base.parameters()).device))
        model.eval()
        div = divergence(base, model, tok, held_texts)
        sae, alive = _sae(model, tok, train_texts, held_texts, sae_site, dataclasses.replace(spec),
                          folder / f"sae-step-{step}")
        fwd = mmcs(sae_directions(sae), sae_directions(base_sae), alive_a=alive, alive_b=base_alive,
                   threshold=cfg.sae.threshold)
        bwd = mmcs(sae_directions(base_sae), sae_directions(sae), alive_a=base_alive, alive_b=alive,
                   threshold=cfg.sae.threshold)
        acts = paired_activations([base, model], tok, texts, site)
        rows_held = held[acts["_example"]]
        cc, _ = train_crosscoder(acts["x"][~rows_held], crosscoder_spec(cfg, site, cfg.along.crosscoder_steps))
        table = latent_table(cc, acts["x"][rows_held], _criterion(cfg), models=("base", f"step-{step}"))
        rec = {"step": step,
               "param_block_rel": [r["param_block_rel"] for r in div["layers"]],
               "resid_cka": [r["resid_cka"] for r in div["layers"]],
               "lens_kl": [r["lens_kl"] for r in div["layers"]],
               "mmcs_layer": layer, "mmcs_ckpt_to_base": fwd["mmcs"], "mmcs_base_to_ckpt": bwd["mmcs"],
               "unmatched_ckpt_to_base": len(fwd["unmatched"]),
               "crosscoder_site": site, "counts": table["counts"],
               "other_only_passing_scaling": table["exclusive_passing_scaling"]["other_only"]}
        atomic_write_json(path, rec)
        records.append(rec)
    return records


def along_figure(records: list[dict]) -> bytes:
    """PNG: per checkpoint step, relative weight change per layer, logit-lens KL at the last layer, MMCS (both
    ways) and the crosscoder's other-only latents (all, and passing the scaling check)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in records]
    fig = Figure(figsize=(14, 3.2), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 4, 1)
    for layer in range(len(records[0]["param_block_rel"])):
        ax.plot(steps, [r["param_block_rel"][layer] for r in records], marker="o", ms=3, label=f"layer {layer}")
    ax.set_title("relative weight change per block", fontsize=9)
    ax.legend(fontsize=6)
    ax = fig.add_subplot(1, 4, 2)
    ax.plot(steps, [r["lens_kl"][-1] for r in records], marker="o", ms=3, label="last layer (output KL)")
    ax.plot(steps, [r["lens_kl"][0] for r in records], marker="o", ms=3, label="layer 0 (lens)")
    ax.set_title("logit-lens KL(base || checkpoint)", fontsize=9)
    ax.legend(fontsize=6)
    ax = fig.add_subplot(1, 4, 3)
    ax.plot(steps, [r["mmcs_ckpt_to_base"] for r in records], marker="o", ms=3, label="checkpoint->base")
    ax.plot(steps, [r["mmcs_base_to_ckpt"] for r in records], marker="o", ms=3, label="base->checkpoint")
    ax.set_title(f"MMCS at mlp_out.{records[0]['mmcs_layer']}", fontsize=9)
    ax.legend(fontsize=6)
    ax = fig.add_subplot(1, 4, 4)
    ax.plot(steps, [r["counts"]["other_only"] for r in records], marker="o", ms=3, label="other-only")
    ax.plot(steps, [r["other_only_passing_scaling"] for r in records], marker="o", ms=3, label="... passing scaling")
    ax.set_title(f"crosscoder exclusive latents ({records[0]['crosscoder_site']})", fontsize=9)
    ax.legend(fontsize=6)
    for a in fig.axes:
        a.set_xlabel("RL step", fontsize=8)
        a.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
