"""PEFT LoRA adapters on any Hugging Face causal LM, and the reference model of an RL run.

With LoRA the reference policy is the same network with its adapters switched off
(`reference_logprobs` wraps that in `disable_adapter()`), so no second copy of the weights is
kept; with full fine-tuning the reference is a frozen copy.

    policy = add_lora(model, LoraConfig(rank=8))
"""

from __future__ import annotations

import copy
import logging

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel

from mechrl.config import LoraConfig

log = logging.getLogger(__name__)

#: Attention projections per architecture (`config.model_type`), the default LoRA targets.
DEFAULT_TARGETS = {
    "gpt2": ["c_attn", "c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt_neox": ["query_key_value", "dense"],
}


def lora_targets(model: PreTrainedModel, cfg: LoraConfig) -> list[str]:
    if cfg.target_modules:
        return list(cfg.target_modules)
    mt = model.config.model_type
    if mt not in DEFAULT_TARGETS:
        raise ValueError(f"no default LoRA target modules for model_type {mt!r}; set train.lora.target_modules "
                         f"(known defaults: {sorted(DEFAULT_TARGETS)})")
    return DEFAULT_TARGETS[mt]


def add_lora(model: PreTrainedModel, cfg: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` with a LoRA adapter; only adapter weights are trainable afterwards."""
    targets = lora_targets(model, cfg)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:  # PEFT would raise later with a less direct message; say what exists instead
        raise ValueError(f"LoRA target modules {missing} not found in {type(model).__name__}; "
                         f"module names include {sorted(names)[:20]}")
    pcfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          task_type="CAUSAL_LM", fan_in_fan_out=model.config.model_type == "gpt2")
    peft_model = get_peft_model(model, pcfg, adapter_name=adapter_name)
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("LoRA rank %d on %s: %d trainable parameters", cfg.rank, targets, n_train)
    return peft_model


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen, eval-mode copy (the reference model of full fine-tuning)."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def merged_model(model: PreTrainedModel) -> PreTrainedModel:
    """The plain HF model with LoRA weights folded in (a copy; `model` is unchanged). Full models
    are returned as they are."""
    if not isinstance(model, PeftModel):
        return model
    merged = copy.deepcopy(model).merge_and_unload()
    return merged


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return params
