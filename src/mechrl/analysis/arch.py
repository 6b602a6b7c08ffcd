"""Architecture adapters: where each model family keeps its blocks, attention, MLP, heads and neurons,
and what each sublayer ADDS to the residual stream.

One declarative entry per family (a `SiteMapConfig`; paths inside a block are relative to it):

    blocks       the ModuleList of transformer blocks        resid_pre.{L} = block input, resid_post.{L} = output
    attn_out     module whose output attention adds           attn_out.{L}
    mlp_out      module whose output the MLP adds             mlp_out.{L}
    attn_proj    attention's output projection                heads.{L} = its input, split per head
    mlp_proj     the MLP's output projection                  mlp_post.{L} = its input (the neurons)
    attn_after   modules between attn_proj and attn_out       (post-attention norm, residual dropout)
    mlp_after    modules between mlp_proj and mlp_out
    parallel     attention and MLP both read resid_pre        (a bool, or the config flag that says so)

So on every family  resid_pre.L + attn_out.L + mlp_out.L == resid_post.L  (parallel blocks included),
and  attn_out.L == after(attn_proj(heads.L))  (`heads_to_attn_out`),
     mlp_out.L  == after(mlp_proj(mlp_post.L))  (`neurons_to_mlp_out`).

What `heads.{L}` means per family: each head's output (attention-weighted values, H x d_head) before
the output projection. Where the projection has a bias (GPT-2, GPT-J has none, GPT-NeoX, Phi) the bias
belongs to no head; where a post-attention norm follows (Gemma2/3, OLMo2) the heads' projected sum is
normalised before it is added, so a head's contribution to `attn_out` is not linear there: zeroing
or patching a head goes through the norm. Grouped-query attention changes nothing here (H query heads).

Family notes (transformers 5.23 modules):
    gpt2                 attn / mlp end in their residual dropouts (identity in eval)
    gptj, phi            parallel blocks; Phi's one `resid_dropout` module is called for both sublayers,
                         so attn_out / mlp_out are read before it (identity in eval)
    gpt_neox (Pythia)    parallel when config.use_parallel_residual; sublayer outputs pass through
                         post_attention_dropout / post_mlp_dropout, which are what is added
    llama, mistral (sliding window or not), qwen2, qwen3, gemma: the Llama layout; their
                         `post_attention_layernorm` is the MLP's INPUT norm, not a post-norm
    gemma2, gemma3_text, olmo2: post-sublayer norms: `post_attention_layernorm` and
                         `post_feedforward_layernorm` normalise each sublayer's output before the add
    phi3                 fused qkv / gate_up projections; residual dropouts after each sublayer

An architecture without an entry raises `UnknownArchitectureError` (one line) naming how to supply a
map: `model.site_map: {...}` in a recipe, or `set_site_map(model, {...})` in Python. The map is stored
in the model's config (`mechrl_site_map`), so a checkpoint saved afterwards carries it, and it takes
precedence over the built-in entry.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import ValidationError
from torch import nn

from mechrl.config import SiteMapConfig
from mechrl.errors import UserError

#: Key under which a user's site map lives in the HF model config (saved with checkpoints).
CONFIG_KEY = "mechrl_site_map"

_LLAMA = SiteMapConfig(blocks="model.layers", attn_out="self_attn", mlp_out="mlp",
                       attn_proj="self_attn.o_proj", mlp_proj="mlp.down_proj")
_POST_NORM = SiteMapConfig(blocks="model.layers", attn_out="post_attention_layernorm",
                           mlp_out="post_feedforward_layernorm", attn_proj="self_attn.o_proj",
                           mlp_proj="mlp.down_proj", attn_after=("post_attention_layernorm",),
                           mlp_after=("post_feedforward_layernorm",))

#: Built-in entries by family.
FAMILIES: dict[str, SiteMapConfig] = {
    "gpt2": SiteMapConfig(blocks="transformer.h", attn_out="attn", mlp_out="mlp", attn_proj="attn.c_proj",
                          mlp_proj="mlp.c_proj", attn_after=("attn.resid_dropout",), mlp_after=("mlp.dropout",)),
    "gptj": SiteMapConfig(blocks="transformer.h", attn_out="attn", mlp_out="mlp", attn_proj="attn.out_proj",
                          mlp_proj="mlp.fc_out", attn_after=("attn.resid_dropout",), mlp_after=("mlp.dropout",),
                          parallel=True),
    "gpt_neox": SiteMapConfig(blocks="gpt_neox.layers", attn_out="post_attention_dropout", mlp_out="post_mlp_dropout",
                              attn_proj="attention.dense", mlp_proj="mlp.dense_4h_to_h",
                              attn_after=("post_attention_dropout",), mlp_after=("post_mlp_dropout",),
                              parallel="use_parallel_residual"),
    "llama": _LLAMA,
    "post_norm": _POST_NORM,
    "phi3": SiteMapConfig(blocks="model.layers", attn_out="resid_attn_dropout", mlp_out="resid_mlp_dropout",
                          attn_proj="self_attn.o_proj", mlp_proj="mlp.down_proj",
                          attn_after=("resid_attn_dropout",), mlp_after=("resid_mlp_dropout",)),
    "phi": SiteMapConfig(blocks="model.layers", attn_out="self_attn", mlp_out="mlp", attn_proj="self_attn.dense",
                         mlp_proj="mlp.fc2", parallel=True),
}

#: `config.model_type` -> family. Each is covered by the architecture test matrix.
FAMILY_OF_MODEL_TYPE: dict[str, str] = {
    "gpt2": "gpt2", "gptj": "gptj", "gpt_neox": "gpt_neox", "llama": "llama", "mistral": "llama", "qwen2": "llama",
    "qwen3": "llama", "gemma": "llama", "gemma2": "post_norm", "gemma3_text": "post_norm", "olmo2": "post_norm",
    "phi3": "phi3", "phi": "phi",
}

#: Alias -> (which field of the site map, which side of the module). "block" is the block itself.
ALIASES: dict[str, tuple[str, str]] = {
    "resid_pre": ("block", "input"),
    "resid_post": ("block", "output"),
    "attn_out": ("attn_out", "output"),
    "mlp_out": ("mlp_out", "output"),
    "heads": ("attn_proj", "input"),
    "mlp_post": ("mlp_proj", "input"),
}

_HOW = ("supply one with model.site_map={blocks, attn_out, mlp_out, attn_proj, mlp_proj[, attn_after, mlp_after, "
        "parallel]} in the recipe or mechrl.analysis.arch.set_site_map(model, {...}) (see docs/arch.md)")


class UnknownArchitectureError(UserError, LookupError):
    """The model's architecture has no site map, built in or supplied."""


class SiteMapError(UserError, ValueError):
    """A supplied site map does not fit the model."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain HF model inside a PEFT wrapper (the model itself otherwise)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but hooks do not need it
        return model
    if isinstance(model, PeftModel):
        return model.base_model.model
    return model


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(unwrap(model), "config", None), "model_type", None)


def site_map_of(model: nn.Module, *, required: bool = True) -> SiteMapConfig | None:
    """The model's site map: the one stored in its config (user-supplied), else the built-in entry for
    its model_type; with `required`, an unknown architecture raises `UnknownArchitectureError`."""
    base = unwrap(model)
    stored = getattr(getattr(base, "config", None), CONFIG_KEY, None)
    if stored is not None:
        try:
            return SiteMapConfig.model_validate(dict(stored))
        except (ValidationError, TypeError) as e:
            raise SiteMapError(f"{type(base).__name__}: config.{CONFIG_KEY} is not a valid site map: "
                               f"{str(e).splitlines()[0]}") from None
    mt = _model_type(base)
    family = FAMILY_OF_MODEL_TYPE.get(mt)
    if family is not None:
        return FAMILIES[family]
    if required:
        raise UnknownArchitectureError(f"mechrl has no site map for {type(base).__name__} (model_type {mt!r}); {_HOW}")
    return None


def set_site_map(model: nn.Module, site_map: SiteMapConfig | Mapping) -> SiteMapConfig:
    """Check `site_map` against `model` and store it in the model's config (overriding any built-in
    entry for its model type). Raises `SiteMapError` naming the first path that does not fit."""
    try:
        sm = site_map if isinstance(site_map, SiteMapConfig) else SiteMapConfig.model_validate(dict(site_map))
    except ValidationError as e:
        raise SiteMapError(f"invalid site map: {'; '.join(_pydantic_lines(e))}") from None
    check_site_map(model, sm)
    setattr(unwrap(model).config, CONFIG_KEY, sm.model_dump(mode="json"))
    return sm


def _pydantic_lines(e: ValidationError) -> list[str]:
    return [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]


def blocks(model: nn.Module, site_map: SiteMapConfig | None = None) -> nn.ModuleList:
    """The model's transformer blocks (a ModuleList)."""
    sm = site_map or site_map_of(model)
    base = unwrap(model)
    try:
        mods = base.get_submodule(sm.blocks)
    except AttributeError:
        top = [n for n, _ in base.named_children()]
        raise SiteMapError(f"site map: blocks={sm.blocks!r} is not a module of {type(base).__name__} "
                           f"(its top-level modules: {top})") from None
    if not isinstance(mods, (nn.ModuleList, nn.Sequential)) or len(mods) == 0:
        raise SiteMapError(f"site map: blocks={sm.blocks!r} of {type(base).__name__} is a "
                           f"{type(mods).__name__}, not a non-empty ModuleList of blocks")
    return mods


def check_site_map(model: nn.Module, site_map: SiteMapConfig) -> None:
    """Every path of `site_map` exists in every block of `model`; the projections are linear layers."""
    for i, block in enumerate(blocks(model, site_map)):
        names = {n for n, _ in block.named_modules() if n}
        for field in ("attn_out", "mlp_out", "attn_proj", "mlp_proj"):
            path = getattr(site_map, field)
            if path not in names:
                raise SiteMapError(f"site map: {field}={path!r} is not a module of block {i} "
                                   f"({site_map.blocks}.{i}); its modules: {sorted(names)}")
        for field in ("attn_after", "mlp_after"):
            missing = [p for p in getattr(site_map, field) if p not in names]
            if missing:
                raise SiteMapError(f"site map: {field} {missing} are not modules of block {i}; "
                                   f"its modules: {sorted(names)}")
        for field in ("attn_proj", "mlp_proj"):
            in_features(block.get_submodule(getattr(site_map, field)), where=f"site map {field} of block {i}")
    if isinstance(site_map.parallel, str):
        cfg = unwrap(model).config
        if not isinstance(getattr(cfg, site_map.parallel, None), bool):
            raise SiteMapError(f"site map: parallel={site_map.parallel!r} names no boolean attribute of "
                               f"{type(cfg).__name__}")


def in_features(module: nn.Module, where: str = "") -> int:
    """Input width of a linear layer: nn.Linear, GPT-2's Conv1D, or either inside a LoRA wrapper."""
    from transformers.pytorch_utils import Conv1D

    inner = module
    for attr in ("base_layer", "base"):  # PEFT LoRA layer, mechrl's DualLoRALinear
        while isinstance(getattr(inner, attr, None), nn.Module):
            inner = getattr(inner, attr)
    if isinstance(inner, nn.Linear):
        return inner.in_features
    if isinstance(inner, Conv1D):
        return int(inner.weight.shape[0])  # Conv1D stores (d_in, d_out)
    raise SiteMapError(f"{where or type(module).__name__}: {type(inner).__name__} is not a linear layer "
                       "(nn.Linear or Conv1D)")


def n_layers(model: nn.Module) -> int:
    """Number of transformer blocks: the length of the block list where the site map is known, else
    the config's num_hidden_layers / n_layer."""
    sm = site_map_of(model, required=False)
    if sm is not None:
        return len(blocks(model, sm))
    cfg = unwrap(model).config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    assert n is not None, f"{type(model).__name__}: config has neither num_hidden_layers nor n_layer"
    return int(n)


def n_heads(model: nn.Module) -> int:
    """Number of attention (query) heads, from the model config."""
    cfg = unwrap(model).config
    n = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    assert n is not None, f"{type(model).__name__}: config has neither num_attention_heads nor n_head"
    return int(n)


def mlp_width(model: nn.Module) -> int:
    """Neurons per MLP (d_mlp): the input width of the MLP's output projection."""
    sm = site_map_of(model)
    return in_features(blocks(model, sm)[0].get_submodule(sm.mlp_proj))


def is_parallel(model: nn.Module) -> bool:
    """Whether attention and MLP both read the block input (the MLP does not see attn_out)."""
    p = site_map_of(model).parallel
    return bool(getattr(unwrap(model).config, p)) if isinstance(p, str) else p


def alias_site(model: nn.Module, alias: str, layer: int) -> tuple[str, str]:
    """(module path, "input" | "output") of alias site `alias.{layer}` (alias without the layer)."""
    if alias not in ALIASES:
        raise KeyError(f"unknown alias {alias!r}; known: {sorted(ALIASES)}")
    sm = site_map_of(model)
    field, kind = ALIASES[alias]
    block = f"{sm.blocks}.{layer}"
    return (block if field == "block" else f"{block}.{getattr(sm, field)}"), kind


def _chain(block: nn.Module, proj: str, after: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    x = block.get_submodule(proj)(x)
    for path in after:
        x = block.get_submodule(path)(x)
    return x


def heads_to_attn_out(model: nn.Module, layer: int, heads: torch.Tensor) -> torch.Tensor:
    """(B, T, H, d_head) head outputs -> (B, T, D) what attention adds to the residual stream: the output
    projection (its bias included) and then `attn_after` (post-norm, dropout). Equals `attn_out.{layer}`
    when `heads` is `heads.{layer}` of the same forward pass."""
    sm = site_map_of(model)
    x = heads.reshape(*heads.shape[:-2], heads.shape[-2] * heads.shape[-1])  # (B, T, H * d_head)
    return _chain(blocks(model, sm)[layer], sm.attn_proj, sm.attn_after, x)


def neurons_to_mlp_out(model: nn.Module, layer: int, acts: torch.Tensor) -> torch.Tensor:
    """(B, T, d_mlp) neuron activations -> (B, T, D) what the MLP adds to the residual stream: its output
    projection and then `mlp_after`. Equals `mlp_out.{layer}` for `mlp_post.{layer}` of the same pass."""
    sm = site_map_of(model)
    return _chain(blocks(model, sm)[layer], sm.mlp_proj, sm.mlp_after, acts)


#: Where HF causal LMs keep the norm applied to the last block's output before the unembedding,
#: relative to the base model (`model.base_model`).
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")


def final_norm(model: nn.Module) -> nn.Module:
    """The model's final normalisation (the last block's output goes through it, then the unembedding).
    Raises naming the base model's modules when it has none of `FINAL_NORM_NAMES`."""
    base = unwrap(model).base_model
    for name in FINAL_NORM_NAMES:
        mod = getattr(base, name, None)
        if isinstance(mod, nn.Module):
            return mod
    raise UnknownArchitectureError(f"{type(base).__name__}: no final norm among {FINAL_NORM_NAMES}; its modules: "
                                   f"{[n for n, _ in base.named_children()]}")


def block_parts(model: nn.Module) -> dict[str, str]:
    """{"blocks": path of the block list, "attn": the attention module in a block, "mlp": the MLP
    module in a block} (the modules holding each sublayer's parameters: the first component of
    the output projections' paths)."""
    sm = site_map_of(model)
    return {"blocks": sm.blocks, "attn": sm.attn_proj.split(".")[0], "mlp": sm.mlp_proj.split(".")[0]}


def site_table(model: nn.Module, layer: int = 0) -> dict[str, str]:
    """Alias -> 'module path (input|output)' for one block: what each alias reads on this model."""
    return {a: "{} ({})".format(*alias_site(model, a, layer)) for a in ALIASES}
