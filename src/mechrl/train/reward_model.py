"""Reward models: Bradley-Terry training with TRL's RewardTrainer, and scoring exactly as trained.

The model is any Hugging Face causal LM loaded as `AutoModelForSequenceClassification(num_labels=1)`
(a new, bias-free linear `score` head on the final hidden state). The score of (prompt, completion) is
read at the sequence's last token. What that token is matters: TRL appends EOS to each text, and the
sequence classifier reads the last token that is not the pad token, so scoring text without the EOS
reads another position and gives other scores (STACK.md measured pairwise accuracy falling from 1.00 to
0.91). So mechrl tokenizes once, in `encode`, for training and for scoring:

    ids = tokenizer(prompt + completion, add_special_tokens=False) + [EOS]       right-padded with PAD

and hands RewardTrainer the token ids (`chosen_ids` / `rejected_ids`, so TRL does not tokenize again).
`end_positions` checks every batch before a score is read: each row's last real token must be the end
token, and the position the classifier pools (its last non-pad token) must be that one; a tokenizer whose
pad token is its EOS, a truncated row or a left-padded batch raises `PoolingError` instead of scoring
the wrong token.

    path = train_reward_model(base_path, pairs, "runs/rm", RewardModelConfig(epochs=2))
    rm = RewardModel.load(path)
    rm.score(prompts, completions)           # (B,) float32
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch
from pydantic import Field

from mechrl.config import Strict
from mechrl.errors import UserError
from mechrl.runs.rundir import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["RewardModelConfig", "PoolingError", "encode", "pad_right", "end_positions", "train_reward_model",
           "RewardModel", "TRAIN_RECORD", "train_record"]

#: Written next to the trained model: the config, the loss curve and the training time.
TRAIN_RECORD = "reward_model.json"


class PoolingError(UserError, ValueError):
    """The position a reward model would read its score from is not the end token it was trained on."""


class RewardModelConfig(Strict):
    """Reward-model training (TRL RewardTrainer, Bradley-Terry loss)."""

    lr: float = Field(1e-3, gt=0)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(32, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_length: int = Field(256, ge=2)
    """Longest tokenized pair text (EOS included); a longer one is an error, never silently dropped."""
    center_rewards_coefficient: float | None = Field(None, ge=0)
    seed: int = 0
    log_every: int = Field(10, ge=1)


# ----------------------------------------------------------------------------------------------
# Tokenization and pooling: one definition for training and scoring
# ----------------------------------------------------------------------------------------------

def encode(tokenizer, prompts: Sequence[str], completions: Sequence[str]) -> list[list[int]]:
    """Token ids of prompt + completion + EOS for each pair of strings (no other special token)."""
    if len(prompts) != len(completions):
        raise ValueError(f"encode: {len(prompts)} prompts for {len(completions)} completions")
    if tokenizer.eos_token_id is None:
        raise PoolingError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to end the scored text with")
    texts = [p + c for p, c in zip(prompts, completions)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [x + [tokenizer.eos_token_id] for x in ids]


def pad_right(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), right-padded as TRL's preference collator pads."""
    if not ids:
        raise ValueError("pad_right: no sequences")
    T = max(len(x) for x in ids)
    out = torch.full((len(ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        if not x:
            raise ValueError(f"pad_right: sequence {i} is empty")
        out[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return out, mask


def end_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, end_id: int,
                  pad_id: int | None) -> torch.Tensor:
    """(B,) index of each row's last real token, after checking that it is the end token `end_id` and that
    the classifier's pooling rule (the last token that is not `pad_id`) picks the same position."""
    B, T = input_ids.shape
    if attention_mask.shape != (B, T):
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {(B, T)}")
    mask = attention_mask.bool()
    n_real = mask.sum(1)  # (B,)
    right_padded = mask == (torch.arange(T, device=mask.device)[None] < n_real[:, None])
    if not bool(right_padded.all()):
        row = int((~right_padded).any(1).nonzero()[0])
        raise PoolingError(f"row {row}: the batch is not right-padded (real tokens must come first); the score "
                           "position would not be the last real token")
    if bool((n_real == 0).any()):
        raise PoolingError(f"row {int((n_real == 0).nonzero()[0])} has no real token")
    pos = n_real - 1  # (B,)
    last = input_ids[torch.arange(B), pos]
    wrong = (last != end_id).nonzero().flatten()
    if wrong.numel():
        r = int(wrong[0])
        raise PoolingError(f"row {r}: the last real token is id {int(last[r])}, not the end token id {end_id} the "
                           f"reward model was trained to score at ({wrong.numel()} of {B} rows); append the end token "
                           "(mechrl.train.reward_model.encode does)")
    if pad_id is None:
        if B > 1:
            raise PoolingError("the model has no pad token id: a sequence classifier cannot find the last token of a "
                               "padded batch")
        return pos
    # the classifier's rule: the last position whose token is not the pad token
    idx = torch.arange(T, device=input_ids.device)[None].expand(B, T)
    pooled = (idx * (input_ids != pad_id)).argmax(1)
    if not torch.equal(pooled, pos):
        r = int((pooled != pos).nonzero()[0])
        raise PoolingError(f"row {r}: the classifier would pool position {int(pooled[r])} but the last real token is at "
                           f"{int(pos[r])}; the pad token (id {pad_id}) must differ from the end token (id {end_id}) "
                           "and must not occur inside a text")
    return pos


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def _loss_log():
    """A TrainerCallback that keeps the trainer's numeric log records (transformers imported on use)."""
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        def __init__(self):
            self.records: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.records.append({"step": state.global_step, **{k: v for k, v in logs.items()
                                                                  if isinstance(v, (int, float))}})

    return LossLog()


def _pair_fields(pairs) -> tuple[list[str], list[str], list[str]]:
    get = (lambda p, k: p[k]) if pairs and isinstance(pairs[0], dict) else getattr
    return ([get(p, "prompt") for p in pairs], [get(p, "chosen") for p in pairs], [get(p, "rejected") for p in pairs])


def train_reward_model(base: str | Path, pairs: Sequence, out_dir: str | Path, cfg: RewardModelConfig,
                       *, device: str = "cpu") -> Path:
    """Train a reward model from the causal LM at `base` (a local folder) on `pairs` (dicts or objects with
    prompt / chosen / rejected) with TRL's RewardTrainer, and save it with its tokenizer and `TRAIN_RECORD`
    to `out_dir`. Returns `out_dir`."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    out = Path(out_dir)
    set_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(str(base))
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise PoolingError(f"{base}: the tokenizer's pad token (id {tok.pad_token_id}) must exist and differ from its "
                           f"EOS (id {tok.eos_token_id}): the classifier pools the last non-pad token, which must be the "
                           "appended EOS; add a pad token")
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    prompts, chosen, rejected = _pair_fields(list(pairs))
    c_ids, r_ids = encode(tok, prompts, chosen), encode(tok, prompts, rejected)
    for i, (c, r) in enumerate(zip(c_ids, r_ids)):
        if max(len(c), len(r)) > cfg.max_length:
            raise UserError(f"reward model: pair {i} is {max(len(c), len(r))} tokens, more than "
                            f"max_length={cfg.max_length}; raise the limit or shorten the pair")
    data = Dataset.from_dict({"chosen_ids": c_ids, "rejected_ids": r_ids})
    args = RewardConfig(
        output_dir=str(out / "_trainer"), per_device_train_batch_size=cfg.batch_size, num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio, lr_scheduler_type="linear",
        max_length=None, center_rewards_coefficient=cfg.center_rewards_coefficient, seed=cfg.seed,
        data_seed=cfg.seed, logging_steps=cfg.log_every, save_strategy="no", report_to="none",
        use_cpu=device == "cpu", bf16=False, fp16=False, dataloader_num_workers=0, disable_tqdm=True,
        activation_checkpointing=False,  # TRL's default recomputes every forward: no memory worth it here
    )
    losses = _loss_log()
    t0 = time.perf_counter()
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[losses])
    if len(trainer.train_dataset) != len(c_ids):
        raise RuntimeError(f"RewardTrainer kept {len(trainer.train_dataset)} of {len(c_ids)} pairs")
    trainer.train()
    wall = time.perf_counter() - t0
    model = trainer.model.eval()
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"reward model parameter {name} is not finite after training (lr {cfg.lr})")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    atomic_write_json(out / TRAIN_RECORD, {"config": cfg.model_dump(mode="json"), "base": str(base),
                                           "n_pairs": len(c_ids), "wall_s": wall, "log": losses.records})
    shutil.rmtree(out / "_trainer", ignore_errors=True)
    log.info("reward model: %d pairs, %.1f s, saved to %s", len(c_ids), wall, out)
    return out


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------

class RewardModel:
    """A trained reward model that scores (prompt, completion) pairs exactly as it was trained."""

    def __init__(self, model, tokenizer):
        if getattr(model.config, "num_labels", None) != 1:
            raise ValueError(f"RewardModel needs a sequence classifier with num_labels=1, got "
                             f"{getattr(model.config, 'num_labels', None)}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        for p in self.model.parameters():
            p.requires_grad_(False)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "RewardModel":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: not a reward model folder (no config.json)")
        model = AutoModelForSequenceClassification.from_pretrained(str(path)).to(device)
        return cls(model, AutoTokenizer.from_pretrained(str(path)))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def batch(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, end positions) of a batch, checked by `end_positions`."""
        ids, mask = pad_right(encode(self.tokenizer, prompts, completions), self.tokenizer.pad_token_id)
        pos = end_positions(ids, mask, self.tokenizer.eos_token_id, self.model.config.pad_token_id)
        return ids.to(self.device), mask.to(self.device), pos.to(self.device)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(B,) float32 scores on the CPU."""
        out = []
        for i in range(0, len(prompts), batch_size):
            ids, mask, _ = self.batch(prompts[i:i + batch_size], completions[i:i + batch_size])
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # (b, 1)
            out.append(logits[:, 0].float().cpu())
        s = torch.cat(out) if out else torch.zeros(0)
        if not bool(torch.isfinite(s).all()):
            raise FloatingPointError("reward model produced a non-finite score")
        return s


def train_record(path: str | Path) -> dict:
    """The `TRAIN_RECORD` of a trained reward model folder."""
    p = Path(path) / TRAIN_RECORD
    if not p.is_file():
        raise UserError(f"{path}: no {TRAIN_RECORD} (not written by mechrl's train_reward_model)")
    return json.loads(p.read_text())

