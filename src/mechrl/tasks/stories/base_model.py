"""A tiny Llama shaped like SimpleStories-1.25M, pretrained on the generated story corpus and cached.

    path = story_base_model(StoryModelConfig())        # builds once (minutes on CPU), then loads in < 1 s
    model, tok = load_pretrained(path, device="cpu")   # mechrl.models.loading

Shape: 4 layers, hidden 128, 4 heads, MLP 512, vocabulary 4096 (the grammar's words plus filler
tokens, see `tokenizer.py`), tied embeddings, context 512: 1.57M parameters, as SimpleStories-1.25M.

Training is a plain causal-LM loop: each step draws `batch_size` stories, each starting at
position 0 (as prompts do at generation; there is no BOS) and ending in `[EOS]`, right-padded,
with the loss on real tokens only. AdamW, linear warm-up then cosine decay, gradient clipping at 1.

The cache folder is `$MECHRL_CACHE/story-model-<hash>` (default `~/.cache/mechrl`); the hash covers
the config, the format version and a fingerprint of the grammar (its first stories), so changing
any of them builds a new model. The folder is written under a temporary name and renamed when
complete, so a half-written model is never loaded. `pretrain.json` in it records the losses, the
wall time and sampled stories.

`fast=True` is the test preset: a small corpus and a few dozen steps (seconds); the loss still falls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from pydantic import Field

from mechrl.config import Strict, TinyModelConfig
from mechrl.models.loading import build_tiny_model
from mechrl.tasks.stories.grammar import make_story, vocabulary
from mechrl.tasks.stories.tokenizer import VOCAB_SIZE, build_story_tokenizer

log = logging.getLogger(__name__)

#: Bump when the training recipe or saved layout changes, so old caches are not reused.
FORMAT_VERSION = 2
#: Files a complete cached model folder holds.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "pretrain.json")


class StoryModelConfig(Strict):
    """How the story base model is built. `fast` replaces the corpus and step counts with the test preset."""

    n_stories: int = Field(20_000, ge=10)
    steps: int = Field(600, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup: int = Field(30, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    n_val: int = Field(200, ge=1)
    corpus_seed: int = 0
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    """Torch CPU threads while pretraining (restored after); None: torch's default. Not part of the
    cache key (it changes speed, not the recipe). On a busy machine 1 thread is often fastest."""
    fast: bool = False
    """Test preset: 200 stories, 20 steps of batch 8 at lr 1e-2 (seconds on a CPU)."""

    def resolved(self) -> "StoryModelConfig":
        """The config actually trained (the fast preset applied)."""
        if not self.fast:
            return self
        return self.model_copy(update=dict(n_stories=200, steps=20, batch_size=8, n_val=32, warmup=3, lr=1e-2))


#: The model shape: SimpleStories-1.25M's.
MODEL_SHAPE = TinyModelConfig(arch="llama", n_layer=4, d_model=128, n_head=4, d_mlp=512, n_positions=512,
                              tie_embeddings=True)


def cache_root() -> Path:
    return Path(os.environ.get("MECHRL_CACHE", Path.home() / ".cache" / "mechrl")).expanduser()


def _grammar_fingerprint() -> str:
    rng = random.Random(0)
    return hashlib.sha256("\n".join([make_story(rng) for _ in range(20)] + vocabulary()).encode()).hexdigest()


def config_hash(cfg: StoryModelConfig) -> str:
    payload = {"cfg": cfg.resolved().model_dump(mode="json", exclude={"threads"}), "shape": MODEL_SHAPE.model_dump(mode="json"),
               "version": FORMAT_VERSION, "grammar": _grammar_fingerprint(), "vocab_size": VOCAB_SIZE}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def model_dir(cfg: StoryModelConfig) -> Path:
    return cache_root() / f"story-model-{config_hash(cfg)}"


def story_base_model(cfg: StoryModelConfig | None = None) -> Path:
    """The folder of the pretrained story model for `cfg`: loaded from the cache, else trained and cached."""
    cfg = cfg or StoryModelConfig()
    out = model_dir(cfg)
    if out.exists():
        missing = [f for f in REQUIRED_FILES if not (out / f).is_file()]
        if missing:
            raise RuntimeError(f"story model cache {out} is incomplete (missing {missing}); delete the folder "
                               "to rebuild it")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphaned_builds(out)
    # the temporary name carries the builder's pid, so a later build can tell an orphan from a live build
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-pid{os.getpid()}-", dir=out.parent))
    threads = torch.get_num_threads()
    try:
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        pretrain(cfg, tmp)
        try:
            tmp.rename(out)
        except OSError:
            if not all((out / f).is_file() for f in REQUIRED_FILES):  # not another process's finished copy
                raise
            log.info("story model %s was built concurrently by another process; using that one", out)
    finally:
        torch.set_num_threads(threads)
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def story_model_folder() -> Path:
    """`model.builtin: stories` (`mechrl.models.builtin`): the default story model's folder."""
    return story_base_model(StoryModelConfig())


def fast_story_model_folder() -> Path:
    """`model.builtin: stories-fast`: the test preset's folder (seconds to build)."""
    return story_base_model(StoryModelConfig(fast=True))


def _remove_orphaned_builds(out: Path) -> None:
    """Delete temporary build folders of `out` whose building process is gone (killed mid-build)."""
    for p in out.parent.glob(f".{out.name}-*"):
        pid = p.name[len(out.name) + 2:].split("-")[0]
        alive = True
        if pid.startswith("pid") and pid[3:].isdigit():
            try:
                os.kill(int(pid[3:]), 0)
            except ProcessLookupError:
                alive = False
            except PermissionError:  # another user's live process
                pass
        else:
            alive = False  # a folder from before pids were recorded: no build of this version writes it
        if not alive and p.is_dir():
            log.info("removing %s, left by a story-model build that was killed", p)
            try:
                shutil.rmtree(p)
            except FileNotFoundError:  # another process removed it first
                pass


def _batch(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels), each (B, T); labels are -100 on padding."""
    T = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return input_ids, mask, labels


@torch.no_grad()
def _mean_loss(model, ids: list[list[int]], pad_id: int, batch_size: int = 64) -> float:
    """Token-weighted mean next-token loss over `ids`."""
    total, n = 0.0, 0
    for i in range(0, len(ids), batch_size):
        x, m, y = _batch(ids[i:i + batch_size], pad_id)
        k = int((y[:, 1:] != -100).sum())
        total += float(model(input_ids=x, attention_mask=m, labels=y).loss) * k
        n += k
    return total / n


def pretrain(cfg: StoryModelConfig, out: Path) -> dict:
    """Train the story model described by `cfg` and save model, tokenizer and `pretrain.json` to `out`."""
    run = cfg.resolved()
    t0 = time.perf_counter()
    tok = build_story_tokenizer(vocabulary(), model_max_length=MODEL_SHAPE.n_positions)
    rng = random.Random(f"story-corpus-{run.corpus_seed}")
    stories = [make_story(rng) for _ in range(run.n_stories + run.n_val)]
    enc = tok(stories, add_special_tokens=True)["input_ids"]  # each story ends in [EOS]
    assert all(x[-1] == tok.eos_token_id and tok.unk_token_id not in x for x in enc), "corpus has unknown words"
    assert max(len(x) for x in enc) <= MODEL_SHAPE.n_positions, "a story is longer than the context"
    train_ids, val_ids = enc[:run.n_stories], enc[run.n_stories:]

    model = build_tiny_model(MODEL_SHAPE, tok, seed=run.seed)
    model.config.bos_token_id = None  # no BOS, as in SimpleStories
    model.generation_config.bos_token_id = None
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=run.weight_decay, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < run.warmup:
            return run.lr * (step + 1) / run.warmup
        progress = (step - run.warmup) / max(1, run.steps - run.warmup)
        return run.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    val_loss_init = _mean_loss(model, val_ids, tok.pad_token_id)
    batch_rng = random.Random(f"story-batches-{run.seed}")
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        for step in range(run.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            x, m, y = _batch([train_ids[batch_rng.randrange(len(train_ids))] for _ in range(run.batch_size)],
                             tok.pad_token_id)
            loss = model(input_ids=x, attention_mask=m, labels=y).loss
            if not torch.isfinite(loss):
                raise RuntimeError(f"story pretraining: loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if step % 100 == 0 or step == run.steps - 1:
                log.info("story pretraining step %d/%d loss %.3f", step, run.steps, losses[-1])
    model.eval()
    val_loss = _mean_loss(model, val_ids, tok.pad_token_id)
    samples = sample_stories(model, tok, ["once upon a time , a little fox", "one day , a brave girl named mia"],
                             seed=run.seed, max_new_tokens=30 if run.fast else 120)
    wall = time.perf_counter() - t0
    record = {"config": run.model_dump(mode="json"), "val_loss_init": val_loss_init, "val_loss": val_loss,
              "train_loss_first": losses[0], "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
              "train_losses": losses, "wall_s": wall, "n_params": sum(p.numel() for p in model.parameters()),
              "samples": samples}
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps(record, indent=1))
    log.info("story model: val loss %.3f -> %.3f in %.0f s, saved to %s", val_loss_init, val_loss, wall, out)
    return record


@torch.no_grad()
def sample_stories(model, tok, prompts: list[str], *, seed: int = 0, temperature: float = 1.0,
                   max_new_tokens: int = 120) -> list[str]:
    """Prompt + sampled continuation (up to EOS) for each prompt, with a fixed seed."""
    was_training = model.training
    model.eval()
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in prompts:
            x = tok(p, add_special_tokens=False, return_tensors="pt")
            gen = model.generate(**x, do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                                 top_k=None, top_p=None, max_new_tokens=max_new_tokens,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            out.append(p + tok.decode(gen[0, x["input_ids"].shape[1]:], skip_special_tokens=True))
    model.train(was_training)
    return out
