"""Shared builders for the feature-control tests: a tiny Llama on the story vocabulary, saved to a folder,
and SAERewards on it with a random SARM-layout TopK SAE (no training, no network)."""

from __future__ import annotations

from pathlib import Path

import torch

from mechrl.config import TinyModelConfig
from mechrl.control.sarm import SAEReward, SarmTopK
from mechrl.models.loading import build_tiny_model, prepare_tokenizer
from mechrl.tasks.stories.grammar import vocabulary
from mechrl.tasks.stories.tokenizer import build_story_tokenizer

PROMPTS = ["once upon a time , a little fox", "one day , a brave girl named mia", "long ago , a shy owl"]
COMPLETIONS = [" lived in the park . she felt happy .", " lived in a green forest . he ran to the lake .",
               " lived in the cave . it felt glad and cheerful ."]


def story_tokenizer():
    return prepare_tokenizer(build_story_tokenizer(vocabulary()))


def tiny_story_lm(folder: Path, *, n_layer: int = 2, d_model: int = 32, seed: int = 0) -> Path:
    """A random tiny Llama causal LM with the story tokenizer, saved to `folder` (pad id 2 != EOS id 1)."""
    tok = story_tokenizer()
    model = build_tiny_model(TinyModelConfig(arch="llama", n_layer=n_layer, d_model=d_model, n_head=4,
                                             d_mlp=2 * d_model), tok, seed=seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_sarm(folder: Path, *, d_sae: int = 48, k: int = 6, layer: int = 1, seed: int = 0) -> SAEReward:
    """An SAEReward on a random tiny sequence classifier with a random SARM-layout TopK SAE and head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not (folder / "config.json").exists():
        tiny_story_lm(folder, seed=seed)
    trunk = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1)
    tok = AutoTokenizer.from_pretrained(str(folder))
    g = torch.Generator().manual_seed(seed)
    enc = SarmTopK(trunk.config.hidden_size, d_sae, k)
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    head = torch.randn(d_sae, generator=g)
    return SAEReward(trunk, tok, enc, head, layer=layer)
