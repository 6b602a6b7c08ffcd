"""Default LoRA targets: PEFT's own per-architecture mapping where it has one, mechrl's table where it
does not; PEFT's name-matching rule for user targets; one-line errors otherwise."""

from __future__ import annotations

import pytest
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT
from transformers import AutoModelForCausalLM, BioGptConfig

from mechrl.config import LoraConfig, TinyModelConfig
from mechrl.errors import UserError
from mechrl.models.adapters import MECHRL_TARGETS, LoraTargetError, add_lora, default_targets
from mechrl.models.dual_lora import add_dual_lora, dual_lora_modules
from mechrl.models.loading import build_tiny_model


def adapted(peft_model) -> list[str]:
    return sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A"))


@pytest.fixture
def gpt2(cards_tok):
    return build_tiny_model(TinyModelConfig(arch="gpt2", n_layer=3, d_model=32, n_head=4), cards_tok)


def test_defaults_are_peft_s_where_peft_has_them():
    for mt in ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt_neox", "gptj", "phi"):
        assert default_targets(mt) == list(PEFT[mt]), mt
    for mt, targets in MECHRL_TARGETS.items():  # mechrl's table fills PEFT's gaps
        assert mt not in PEFT and default_targets(mt) == targets


def test_gpt2_default_adapts_only_attention_qkv(gpt2):
    """GPT-2's default is PEFT's: the fused q/k/v projection c_attn, one per block; no c_proj (the
    name GPT-2 gives both attention's output projection and the MLP's)."""
    peft = add_lora(gpt2, LoraConfig(rank=2))
    assert adapted(peft) == [f"transformer.h.{i}.attn.c_attn" for i in range(3)]


def test_user_targets_match_as_in_peft(cards_tok):
    """An entry matches a module path equal to it or ending in '.' + entry: `c_proj` names both of GPT-2's
    c_proj layers, `attn.c_proj` only attention's; dual LoRA follows the same rule."""
    def fresh():
        return build_tiny_model(TinyModelConfig(arch="gpt2", n_layer=3, d_model=32, n_head=4), cards_tok)

    both = adapted(add_lora(fresh(), LoraConfig(rank=2, target_modules=["c_proj"])))
    assert both == sorted(f"transformer.h.{i}.{m}.c_proj" for i in range(3) for m in ("attn", "mlp"))
    attn_only = adapted(add_lora(fresh(), LoraConfig(rank=2, target_modules=["attn.c_proj"])))
    assert attn_only == [f"transformer.h.{i}.attn.c_proj" for i in range(3)]
    dual = add_dual_lora(fresh(), ["attn.c_proj"], 2, 4.0, 1, 2.0)
    assert sorted(dual_lora_modules(dual)) == attn_only


def test_unknown_architecture_and_unmatched_targets_are_one_line_errors(cards_tok, gpt2):
    cfg = BioGptConfig(vocab_size=len(cards_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg)
    assert "biogpt" not in PEFT and "biogpt" not in MECHRL_TARGETS
    for add in (lambda: add_lora(model, LoraConfig(rank=2)), lambda: add_dual_lora(model, None, 2, 4.0, 1, 2.0)):
        with pytest.raises(LoraTargetError, match="model_type 'biogpt'.*train.lora.target_modules") as err:
            add()
        assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    with pytest.raises(LoraTargetError, match=r"\['q_proj'\] match no linear layer.*'c_attn'"):
        add_lora(gpt2, LoraConfig(rank=2, target_modules=["c_attn", "q_proj"]))
    add_lora(model, LoraConfig(rank=2, target_modules=["out_proj", "fc1"]))  # explicit targets work on any family
