"""Hook sites on unmodified Hugging Face models, by module path or by a normalised alias.

A *site* is a place in the forward pass whose tensor can be read or replaced. Two kinds of name work:

  - module paths as `model.named_modules()` prints them (`transformer.h.0.mlp`,
    `model.layers.1.self_attn.o_proj`): the module's output;
  - aliases that mean the same thing on every supported architecture (`mechrl.analysis.arch` says
    where each lives per family, or a user-supplied site map does):

        resid_pre.{L}      input of block L                              (B, T, D)
        resid_post.{L}     output of block L                             (B, T, D)
        attn_out.{L}       what attention adds to the residual stream    (B, T, D)
                           (after the output projection and any post-attention norm)
        mlp_out.{L}        what the MLP adds to the residual stream      (B, T, D)
        heads.{L}          every head's output BEFORE the output projection
                           (input of c_proj / o_proj / dense, split per head)  (B, T, H, d_head)
        mlp_post.{L}       the MLP's hidden activations (its neurons), the input of its
                           output projection (c_proj / down_proj / fc2)  (B, T, d_mlp)
        head_out.{L}.{H}   one head's slice of `heads.{L}`               (B, T, d_head)

    so that resid_pre.{L} + attn_out.{L} + mlp_out.{L} == resid_post.{L} on every family.

On a `peft.PeftModel` names resolve through `base_model.model`, so the same names work with
adapters on (LoRA layers wrap the modules named; their hooks see the adapted output).

    with hooks(model, {"mlp_out.0": lambda x: x * 0}):   # zero-ablate layer 0's MLP
        logits = model(**batch).logits

A hook function takes the site's tensor and returns None (read only) or a tensor of the same shape
that replaces it. A name that does not exist raises `KeyError` naming the closest names; a hook that
never fired inside the `with` block raises `RuntimeError` (a silent no-op is a wrong result).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mechrl.analysis.arch import ALIASES, alias_site, n_heads, n_layers, site_map_of, unwrap

__all__ = ["HookFn", "Site", "hooks", "resolve_site", "site_names", "alias_names", "unwrap", "n_layers", "n_heads"]

HookFn = Callable[[torch.Tensor], torch.Tensor | None]


@dataclass(frozen=True)
class Site:
    """A resolved site: the module to hook, which side of it, and the head split if any."""

    name: str
    module_path: str
    kind: Literal["input", "output"]
    n_heads: int | None = None  # set for heads.{L} / head_out.{L}.{H}: split the last dim into (H, d_head)
    head: int | None = None  # set for head_out.{L}.{H}


def _n_heads(model: nn.Module) -> int:
    return n_heads(model)


def alias_names(model: nn.Module) -> list[str]:
    """Every alias site name the model supports (empty for architectures without a site map)."""
    if site_map_of(model, required=False) is None:
        return []
    L, H = n_layers(model), n_heads(model)
    names = [f"{a}.{i}" for a in ALIASES for i in range(L)]
    names += [f"head_out.{i}.{h}" for i in range(L) for h in range(H)]
    return names


def site_names(model: nn.Module) -> list[str]:
    """All names `resolve_site` accepts: aliases, then module paths."""
    return alias_names(model) + [n for n, _ in unwrap(model).named_modules() if n]


def resolve_site(model: nn.Module, name: str) -> Site:
    """Resolve a site name (alias or module path) on `model`; KeyError with close matches if unknown.
    An alias on an architecture without a site map raises `UnknownArchitectureError` (one line)."""
    base = unwrap(model)
    modules = dict(base.named_modules())
    if name.startswith("base_model.model."):  # a PEFT-wrapped path: same module on the base model
        name = name[len("base_model.model."):]
    if name in modules and name:
        return Site(name, name, "output")
    parts = name.split(".")
    alias = "heads" if parts[0] == "head_out" else parts[0]
    if alias in ALIASES and len(parts) in (2, 3) and all(p.isdigit() for p in parts[1:]):
        site_map_of(base)  # an unknown architecture raises here, in one line
        L, H = n_layers(model), n_heads(model)
        layer = int(parts[1])
        if 0 <= layer < L and (len(parts) == 2) == (parts[0] != "head_out"):
            path, kind = alias_site(base, alias, layer)
            assert path in modules, f"alias {name!r} maps to {path!r}, which {type(base).__name__} does not have"
            if alias != "heads":
                return Site(name, path, kind)
            head = int(parts[2]) if len(parts) == 3 else None
            if head is None or 0 <= head < H:
                return Site(name, path, kind, n_heads=H, head=head)
    close = difflib.get_close_matches(name, site_names(model), n=8, cutoff=0.5)
    raise KeyError(f"unknown hook site {name!r} on {type(base).__name__}; closest names: {close}")


def _split_heads(x: torch.Tensor, site: Site) -> torch.Tensor:
    """(B, T, H*d_head) -> (B, T, H, d_head), or one head's (B, T, d_head)."""
    assert x.shape[-1] % site.n_heads == 0, f"{site.name}: width {x.shape[-1]} not divisible by {site.n_heads} heads"
    x = x.reshape(*x.shape[:-1], site.n_heads, x.shape[-1] // site.n_heads)
    return x if site.head is None else x[..., site.head, :]


def _merge_heads(orig: torch.Tensor, new: torch.Tensor, site: Site) -> torch.Tensor:
    """The inverse of `_split_heads` for a replacement value: back to (B, T, H*d_head)."""
    split = orig.reshape(*orig.shape[:-1], site.n_heads, orig.shape[-1] // site.n_heads)
    if site.head is not None:
        split = split.clone()
        split[..., site.head, :] = new
        new = split
    assert new.shape == split.shape, f"{site.name}: hook returned shape {tuple(new.shape)}, expected {tuple(split.shape)}"
    return new.reshape(orig.shape)


def _apply(site: Site, fn: HookFn, x: torch.Tensor) -> torch.Tensor | None:
    """Call `fn` on the site's view of `x`; the replacement for `x`, or None when `fn` only read."""
    view = _split_heads(x, site) if site.n_heads is not None else x
    new = fn(view)
    if new is None:
        return None
    if not isinstance(new, torch.Tensor):
        raise TypeError(f"hook on {site.name!r} returned {type(new).__name__}; return a tensor or None")
    if site.n_heads is not None:
        return _merge_heads(x, new, site)
    if new.shape != x.shape:
        raise ValueError(f"hook on {site.name!r} returned shape {tuple(new.shape)}, expected {tuple(x.shape)}")
    return new


def _register(module: nn.Module, site: Site, fn: HookFn, fired: dict[str, int]) -> torch.utils.hooks.RemovableHandle:
    if site.kind == "output":
        def out_hook(mod, args, output):
            fired[site.name] += 1
            x = output[0] if isinstance(output, tuple) else output
            assert isinstance(x, torch.Tensor), f"{site.module_path} returned {type(x).__name__}, not a tensor"
            new = _apply(site, fn, x)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return module.register_forward_hook(out_hook)

    def in_hook(mod, args, kwargs):
        fired[site.name] += 1
        if args:
            x = args[0]
        elif "hidden_states" in kwargs:
            x = kwargs["hidden_states"]
        else:
            raise RuntimeError(f"{site.name}: {site.module_path} was called without a positional input "
                               f"or hidden_states (kwargs: {sorted(kwargs)})")
        new = _apply(site, fn, x)
        if new is None:
            return None
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}
    return module.register_forward_pre_hook(in_hook, with_kwargs=True)


@contextmanager
def hooks(model: nn.Module, fns: Mapping[str, HookFn]) -> Iterator[dict[str, int]]:
    """Install `fns` (site name -> hook function) for the duration of the block.

    Yields the fire counts (site name -> calls). Hooks are removed in every case. On a normal
    exit, a hook that never fired raises RuntimeError.
    """
    base = unwrap(model)
    sites = [(resolve_site(model, name), fn) for name, fn in fns.items()]  # all names checked before any hook
    modules = dict(base.named_modules())
    fired = {s.name: 0 for s, _ in sites}
    handles = []
    try:
        for site, fn in sites:
            handles.append(_register(modules[site.module_path], site, fn, fired))
        yield fired
    finally:
        for h in handles:
            h.remove()
    silent = [name for name, n in fired.items() if n == 0]
    if silent:
        raise RuntimeError(f"hooks on {silent} never fired: the forward pass inside the `with` block "
                           "did not run those modules")
