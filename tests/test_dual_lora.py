"""Dual LoRA: the forward formula against hand-merged weights, scales, frozen base, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dual_lora_helpers import randomise_b
from mechrl.models.dual_lora import (
    DualLoRALinear, adapter_parameters, add_dual_lora, detect_ranks, dual_lora_modules, dual_lora_state_dict,
    get_scales, load_dual_lora, save_dual_lora, scales, set_scales,
)

RANKS = dict(retain_rank=4, retain_alpha=8.0, forget_rank=2, forget_alpha=3.0)


def _merged_reference(base, adapted, s_r, s_f):
    """The base model with W + s_r (a_r/r_r) B_r A_r + s_f (a_f/r_f) B_f A_f written into each weight by hand."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, m in dual_lora_modules(adapted).items():
            delta = torch.zeros(m.d_out, m.d_in)
            for which, s in (("retain", s_r), ("forget", s_f)):
                A, B = m.factors(which)
                delta += s * (m.alphas[which] / m.ranks[which]) * (B @ A)
            target = ref.get_submodule(name)
            target.weight += delta.T if isinstance(target, Conv1D) else delta  # Conv1D stores (d_in, d_out)
    return ref


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def ids():
    return torch.randint(3, 40, (2, 7))


def test_single_layer_formula_linear_and_conv1d():
    x = torch.randn(5, 6)
    for base in (nn.Linear(6, 3), Conv1D(3, 6)):
        layer = DualLoRALinear(copy.deepcopy(base), 2, 4.0, 1, 5.0)
        with torch.no_grad():
            layer.lora_B_retain.normal_()
            layer.lora_B_forget.normal_()
        Ar, Br, Af, Bf = layer.lora_A_retain, layer.lora_B_retain, layer.lora_A_forget, layer.lora_B_forget
        layer.retain_scale, layer.forget_scale = 0.5, 2.0
        expect = base(x) + 0.5 * (4.0 / 2) * x @ Ar.T @ Br.T + 2.0 * (5.0 / 1) * x @ Af.T @ Bf.T
        torch.testing.assert_close(layer(x), expect)


def test_init_and_zero_scales_equal_base(tiny_model, ids):
    base = copy.deepcopy(tiny_model)
    model = add_dual_lora(tiny_model, None, **RANKS)
    # PEFT's defaults: GPT-2 the fused q/k/v projection c_attn only (no c_proj); Llama q_proj and v_proj
    suffixes = {"gpt2": ["attn.c_attn"], "llama": ["self_attn.q_proj", "self_attn.v_proj"]}[tiny_model.config.model_type]
    L = tiny_model.config.num_hidden_layers
    assert sorted(dual_lora_modules(model)) == sorted(
        f"{'transformer.h' if tiny_model.config.model_type == 'gpt2' else 'model.layers'}.{i}.{s}"
        for i in range(L) for s in suffixes)
    assert torch.equal(_logits(model, ids), _logits(base, ids))  # B = 0 at init
    randomise_b(model, 0.1)
    assert not torch.allclose(_logits(model, ids), _logits(base, ids))
    with scales(model, 0.0, 0.0):
        assert torch.equal(_logits(model, ids), _logits(base, ids))


@pytest.mark.parametrize("s_r,s_f", [(1.0, 0.0), (0.0, 1.0), (0.5, -2.0)])
def test_scales_match_hand_merged_weights(tiny_model, ids, s_r, s_f):
    base = copy.deepcopy(tiny_model)
    model = add_dual_lora(tiny_model, None, **RANKS)
    randomise_b(model, 0.1)
    with scales(model, s_r, s_f):
        got = _logits(model, ids)
    assert get_scales(model) == (1.0, 1.0)  # restored
    torch.testing.assert_close(got, _logits(_merged_reference(base, model, s_r, s_f), ids), atol=2e-5, rtol=1e-4)


def test_scales_restored_after_exception_and_errors_without_adapters(tiny_model):
    with pytest.raises(ValueError, match="no dual LoRA"):
        set_scales(tiny_model, 1.0, 0.0)
    with pytest.raises(ValueError, match="no dual LoRA"):
        with scales(tiny_model, 1.0, 0.0):
            pass
    model = add_dual_lora(tiny_model, None, **RANKS)
    set_scales(model, 1.0, 0.25)
    with pytest.raises(RuntimeError, match="boom"):
        with scales(model, 0.0, 0.0):
            assert get_scales(model) == (0.0, 0.0)
            raise RuntimeError("boom")
    assert get_scales(model) == (1.0, 0.25)
    with pytest.raises(ValueError, match="finite"):
        set_scales(model, float("nan"), 0.0)
    with pytest.raises(ValueError, match="already has"):
        add_dual_lora(model, None, **RANKS)


def test_gradients_reach_only_adapters(tiny_model, ids):
    model = add_dual_lora(tiny_model, None, **RANKS)
    randomise_b(model, 0.1)
    adapters = {id(p) for which in ("retain", "forget") for p in adapter_parameters(model, which)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == adapters and len(adapters) == 4 * len(dual_lora_modules(model))
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if id(p) in adapters:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # with the forget scale at 0 the forget adapter gets no gradient at all
    model.zero_grad(set_to_none=True)
    with scales(model, 1.0, 0.0):
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in adapter_parameters(model, "forget"))
    assert all(p.grad is not None for p in adapter_parameters(model, "retain"))


def test_save_load_round_trip_and_rank_detection(tiny_model, ids, tmp_path):
    fresh = copy.deepcopy(tiny_model)
    model = add_dual_lora(tiny_model, None, **RANKS)
    randomise_b(model, 0.1)
    path = save_dual_lora(model, tmp_path / "adapters.safetensors")
    info = load_dual_lora(fresh, path)
    assert info["ranks"] == {"retain": 4, "forget": 2}
    assert info["alphas"] == {"retain": 8.0, "forget": 3.0}
    assert detect_ranks(dual_lora_state_dict(model)) == {"retain": 4, "forget": 2}
    for s in [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0)]:
        with scales(model, *s), scales(fresh, *s):
            assert torch.equal(_logits(fresh, ids), _logits(model, ids)), s
    # a given config is checked against the file
    with pytest.raises(ValueError, match="retain rank is 4 in the file but 8 was given"):
        load_dual_lora(copy.deepcopy(fresh), path, retain_rank=8)
    with pytest.raises(ValueError, match="forget alpha"):
        load_dual_lora(copy.deepcopy(fresh), path, forget_alpha=16.0)
    # loading into a model whose adapters have other ranks raises
    base_again = copy.deepcopy(fresh)
    for name, m in dual_lora_modules(base_again).items():  # unwrap to a plain model, then add other ranks
        parent, _, child = name.rpartition(".")
        setattr(base_again.get_submodule(parent), child, m.base)
    add_dual_lora(base_again, None, 2, 8.0, 2, 3.0)
    with pytest.raises(ValueError, match="has ranks"):
        load_dual_lora(base_again, path)


def test_detect_ranks_rejects_inconsistent_state():
    state = {"a.lora_A_retain": torch.zeros(3, 5), "a.lora_B_retain": torch.zeros(4, 3),
             "a.lora_A_forget": torch.zeros(1, 5), "a.lora_B_forget": torch.zeros(4, 1),
             "b.lora_A_retain": torch.zeros(2, 5), "b.lora_B_retain": torch.zeros(4, 2),
             "b.lora_A_forget": torch.zeros(1, 5), "b.lora_B_forget": torch.zeros(4, 1)}
    with pytest.raises(ValueError, match="retain ranks differ"):
        detect_ranks(state)
    state["b.lora_A_retain"], state["b.lora_B_retain"] = torch.zeros(3, 5), torch.zeros(4, 2)
    with pytest.raises(ValueError, match="lora_B_retain"):
        detect_ranks(state)


def test_unknown_targets_raise(tiny_model):
    with pytest.raises(ValueError, match="match no linear layer"):
        add_dual_lora(tiny_model, ["nope_proj"], **RANKS)
    assert all(p.requires_grad for p in tiny_model.parameters())  # untouched on failure
