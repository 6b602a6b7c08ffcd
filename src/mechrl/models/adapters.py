"""PEFT LoRA adapters on any Hugging Face causal LM, and the reference model of an RL run.

With LoRA the reference policy is the same network with its adapters switched off
(`reference_logprobs` wraps that in `disable_adapter()`), so no second copy of the weights is
kept; with full fine-tuning the reference is a frozen copy.

    policy = add_lora(model, LoraConfig(rank=8))

Default targets come from PEFT's per-architecture mapping (mechrl's `MECHRL_TARGETS` first, for the
families PEFT lacks); `train.lora.target_modules` overrides them. Names match as in PEFT: an entry
matches a module whose path is the entry or ends in "." + entry.
"""

from __future__ import annotations

import copy
import logging
import re

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from mechrl.config import LoraConfig
from mechrl.errors import UserError

log = logging.getLogger(__name__)

#: mechrl's own default LoRA targets per `config.model_type`, consulted before PEFT's mapping (so an
#: entry here overrides PEFT's). Today they only fill PEFT's gaps, in PEFT's style (the query and
#: value projections; a fused q/k/v projection where the family has one).
MECHRL_TARGETS: dict[str, list[str]] = {
    "phi3": ["qkv_proj"],
    "olmo2": ["q_proj", "v_proj"],
}


class LoraTargetError(UserError, ValueError):
    """No default LoRA targets for the architecture, or targets that match no module."""


def default_targets(model_type: str | None) -> list[str] | str:
    """The default LoRA target modules of an architecture: mechrl's override (`MECHRL_TARGETS`), else
    PEFT's own per-architecture default (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`: GPT-2
    `c_attn`, the fused q/k/v projection only; Llama/Mistral/Qwen/Gemma `q_proj`, `v_proj`; GPT-NeoX
    `query_key_value`; Phi also its MLP's `fc1`, `fc2`). A list of module-name suffixes, or a regular
    expression over full module names (PEFT's form for a few families)."""
    if model_type in MECHRL_TARGETS:
        return list(MECHRL_TARGETS[model_type])
    if model_type in PEFT_TARGETS:
        t = PEFT_TARGETS[model_type]
        return t if isinstance(t, str) else list(t)
    raise LoraTargetError(f"no default LoRA target modules for model_type {model_type!r} (neither PEFT's "
                          f"per-architecture defaults nor mechrl's have it); set train.lora.target_modules "
                          f"(or routing.target_modules), e.g. [q_proj, v_proj]")


def matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's matching rule: a regex string must match the full module name; a list entry matches the
    name itself or a dotted suffix of it (`c_proj` matches `transformer.h.0.attn.c_proj` and
    `transformer.h.0.mlp.c_proj`; `attn.c_proj` only the first)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def target_modules(model: torch.nn.Module, targets: list[str] | str) -> dict[str, torch.nn.Module]:
    """Module path -> module for every linear layer (nn.Linear, GPT-2 Conv1D) `targets` selects; raises
    `LoraTargetError` when a list entry (or the regex) selects none."""
    linear = {n: m for n, m in model.named_modules() if n and isinstance(m, (torch.nn.Linear, Conv1D))}
    chosen = {n: m for n, m in linear.items() if matches(n, targets)}
    if isinstance(targets, str):
        missing = [] if chosen else [targets]
    else:
        missing = [t for t in targets if not any(matches(n, [t]) for n in chosen)]
    if missing or not chosen:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise LoraTargetError(f"LoRA target modules {missing or targets} match no linear layer of "
                              f"{type(model).__name__}; its linear layers end in {suffixes}")
    return chosen


def lora_targets(model: PreTrainedModel, cfg: LoraConfig) -> list[str] | str:
    """The configured targets (`cfg.target_modules`), else the architecture's `default_targets`."""
    if cfg.target_modules:
        return list(cfg.target_modules)
    return default_targets(getattr(model.config, "model_type", None))


def add_lora(model: PreTrainedModel, cfg: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` with a LoRA adapter; only adapter weights are trainable afterwards."""
    targets = lora_targets(model, cfg)
    chosen = target_modules(model, targets)  # PEFT would raise later with a less direct message
    # GPT-2's Conv1D stores weights transposed (fan_in_fan_out); PEFT flips the flag per layer where needed
    conv1d = all(isinstance(m, Conv1D) for m in chosen.values())
    pcfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          task_type="CAUSAL_LM", fan_in_fan_out=conv1d)
    peft_model = get_peft_model(model, pcfg, adapter_name=adapter_name)
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("LoRA rank %d on %d modules (%s): %d trainable parameters", cfg.rank, len(chosen), targets, n_train)
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
