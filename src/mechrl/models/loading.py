"""Loading Hugging Face causal LMs and tokenizers, and building tiny ones locally.

`load_model(cfg, task)`:
  - `cfg.path` set: a local folder, or a hub name (the only case in which anything downloads, and
    only because the user named it). `trust_remote_code` stays off unless the config turns it on.
  - `cfg.path` unset: a tiny GPT-2 or Llama built from `cfg.tiny` around the task's tokenizer.

Tokenizers are prepared the same way everywhere: a pad token (distinct from EOS when the vocabulary
has one, else EOS), left padding for generation, and the model's generation config told the
pad and EOS ids.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase,
)

from mechrl.config import ModelConfig, TinyModelConfig
from mechrl.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(UserError, FileNotFoundError):
    """A model path that is neither a loadable folder nor a hub name the user asked for."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device=cuda but no CUDA device is available")
    return torch.device(device)


def prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Pad token set (EOS when the tokenizer has none), left padding for batched generation."""
    if tok.eos_token is None:
        raise ValueError(f"tokenizer {tok.name_or_path!r} has no EOS token; mechrl needs one to end completions")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised GPT-2 or Llama sized by `cfg`, vocabulary from `tokenizer`."""
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
                  tie_word_embeddings=cfg.tie_embeddings)
    d_mlp = cfg.d_mlp or 4 * cfg.d_model
    if cfg.arch == "gpt2":
        config = GPT2Config(n_layer=cfg.n_layer, n_embd=cfg.d_model, n_head=cfg.n_head, n_inner=d_mlp,
                            n_positions=cfg.n_positions, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    elif cfg.arch == "llama":
        config = LlamaConfig(num_hidden_layers=cfg.n_layer, hidden_size=cfg.d_model, num_attention_heads=cfg.n_head,
                             num_key_value_heads=cfg.n_head, intermediate_size=d_mlp,
                             max_position_embeddings=cfg.n_positions, **common)
    else:
        raise ValueError(f"unknown tiny arch {cfg.arch!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code))


def load_pretrained(path: str | Path, *, dtype: str = "float32", device: str = "auto",
                    trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a local folder or a hub name."""
    path = str(path)
    local = Path(path)
    if local.exists():
        if not (local / "config.json").is_file():
            raise CheckpointError(f"{path}: not a model folder (no config.json)")
    elif path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise CheckpointError(f"checkpoint not found: {path}")
    else:
        log.info("loading %s from the Hugging Face hub (named by the user)", path)
    tok = load_tokenizer(path, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    model.to(resolve_device(device))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


def load_model(cfg: ModelConfig, task=None, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model a config describes: pretrained from `cfg.path`, a built-in model (`cfg.builtin`),
    else tiny built for `task`; with `cfg.site_map`, that map checked and stored in the model's config."""
    model, tok = _load_model(cfg, task, seed)
    if cfg.site_map is not None:
        from mechrl.analysis.arch import set_site_map  # local: analysis sits above models

        set_site_map(model, cfg.site_map)
    return model, tok


def _load_model(cfg: ModelConfig, task, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if cfg.builtin in ("stories", "stories-fast"):
        from mechrl.tasks.stories.base_model import StoryModelConfig, story_base_model  # local: imports this module

        path = story_base_model(StoryModelConfig(fast=cfg.builtin == "stories-fast"))
        return load_pretrained(path, dtype=cfg.dtype, device=cfg.device)
    if cfg.builtin is not None:
        raise ValueError(f"unknown built-in model {cfg.builtin!r}")
    if cfg.path is not None:
        return load_pretrained(cfg.path, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    if task is None:
        raise ValueError("model.path is unset and no task was given to build a tiny model's tokenizer for")
    tok = prepare_tokenizer(task.build_tokenizer())
    model = build_tiny_model(cfg.tiny, tok, seed=seed).to(DTYPES[cfg.dtype]).to(resolve_device(cfg.device))
    return model, tok
