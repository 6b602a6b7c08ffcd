"""Tiny random models of every architecture family mechrl's site maps cover, built from their HF config
classes (no download): 2 blocks, width 32, 4 query heads (2 key/value heads where the family has
grouped-query attention), MLP width 64. Weights are perturbed away from HF's small initialisation
(and biases and norm gains away from 0 and 1), so that identities between sites are tested on
activations of order 1, where a wrong site would be far off."""

from __future__ import annotations

import torch
import transformers as T

from mechrl.models.loading import prepare_tokenizer
from mechrl.models.tokenizer import build_word_tokenizer

WORDS = ["Cards", "RED", "BLUE", "GREEN", "the", "story", "score", "is", "Answer", "Rule"]

_GQA = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            max_position_embeddings=64)

#: name -> (config class, kwargs). The name is the family as a user would say it; a few share a model_type.
FAMILIES = {
    "gpt2": (T.GPT2Config, dict(n_layer=2, n_embd=32, n_head=4, n_positions=64)),
    "gptj": (T.GPTJConfig, dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, rotary_dim=4)),
    "gpt_neox": (T.GPTNeoXConfig, dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                       max_position_embeddings=64, use_parallel_residual=True)),
    "gpt_neox_sequential": (T.GPTNeoXConfig, dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                  intermediate_size=64, max_position_embeddings=64,
                                                  use_parallel_residual=False)),
    "llama": (T.LlamaConfig, _GQA),
    "mistral": (T.MistralConfig, dict(_GQA, sliding_window=None)),
    "mistral_sliding": (T.MistralConfig, dict(_GQA, sliding_window=4)),
    "qwen2": (T.Qwen2Config, _GQA),
    "qwen3": (T.Qwen3Config, dict(_GQA, head_dim=8)),
    "gemma": (T.GemmaConfig, dict(_GQA, head_dim=8)),
    "gemma2": (T.Gemma2Config, dict(_GQA, head_dim=8, sliding_window=4)),
    "gemma3_text": (T.Gemma3TextConfig, dict(_GQA, head_dim=8, sliding_window=4,
                                             layer_types=["sliding_attention", "full_attention"])),
    "phi3": (T.Phi3Config, _GQA),
    "olmo2": (T.Olmo2Config, _GQA),
    "phi": (T.PhiConfig, dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                              max_position_embeddings=64)),
}

#: Families whose blocks run attention and MLP in parallel on the block input.
PARALLEL = {"gptj", "gpt_neox", "phi"}


def tokenizer():
    return prepare_tokenizer(build_word_tokenizer(WORDS, (":", ".", ",")))


def build(name: str, tok, seed: int = 0, scale: float = 0.2) -> T.PreTrainedModel:
    """The family's tiny model in eval mode, its vocabulary `tok`'s, its weights perturbed by `scale`."""
    cls, kw = FAMILIES[name]
    cfg = cls(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
              bos_token_id=tok.eos_token_id, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T.AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
    return model.eval()
