"""Dual LoRA: two low-rank adapters, retain and forget, on every targeted linear layer.

Gradient routing trains the two adapters on different samples (the forget adapter alone on
samples flagged as reward hacking) and ablates the forget adapter at inference. Each targeted
`nn.Linear` (or GPT-2 `Conv1D`) is replaced by a `DualLoRALinear`:

    out = base(x) + s_r * (alpha_r / r_r) * B_r A_r x + s_f * (alpha_f / r_f) * B_f A_f x

with A_* (r, d_in) initialised like PEFT (Kaiming-uniform) and B_* (d_out, r) at zero, so the
wrapped model starts equal to the base. The scales s_r, s_f (default 1) are runtime attributes
read in the forward pass: `set_scales` / `scales(...)` switch adapters for evaluation and are
never merged into weights. The base weights are frozen; only the adapters train.

    add_dual_lora(model, None, retain_rank=4, retain_alpha=8, forget_rank=2, forget_alpha=8)
    with scales(model, retain=1.0, forget=0.0):   # forget adapter ablated
        logits = model(ids).logits
    save_dual_lora(model, "adapters.safetensors")
    load_dual_lora(fresh_base_model, "adapters.safetensors")   # ranks detected from the shapes

A simpler alternative to two PEFT adapters: the parameters of each adapter are plain attributes
(`adapter_parameters(model, "forget")`), so gradient hooks and optimiser groups need no PEFT API.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Iterator, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from mechrl.models.adapters import default_targets, target_modules

__all__ = ["DualLoRALinear", "add_dual_lora", "dual_lora_modules", "set_scales", "get_scales", "scales",
           "block_gradients", "merged_dual_lora", "adapter_parameters", "dual_lora_state_dict", "save_dual_lora",
           "load_dual_lora", "detect_ranks"]

Adapter = Literal["retain", "forget"]
ADAPTERS: tuple[Adapter, ...] = ("retain", "forget")
FORMAT = "mechrl-dual-lora-1"


class DualLoRALinear(nn.Module):
    """A frozen linear layer plus a retain and a forget LoRA adapter (see the module docstring)."""

    def __init__(self, base: nn.Linear | Conv1D, retain_rank: int, retain_alpha: float, forget_rank: int,
                 forget_alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if isinstance(base, nn.Linear):
            d_in, d_out = base.in_features, base.out_features
        elif isinstance(base, Conv1D):  # GPT-2: weight is (d_in, d_out), y = x @ W + b
            d_in, d_out = base.weight.shape
        else:
            raise TypeError(f"DualLoRALinear wraps nn.Linear or GPT-2 Conv1D, got {type(base).__name__}")
        for name, r, a in (("retain", retain_rank, retain_alpha), ("forget", forget_rank, forget_alpha)):
            if not (isinstance(r, int) and r >= 1):
                raise ValueError(f"{name}_rank must be an int >= 1, got {r!r}")
            if not (math.isfinite(a) and a > 0):
                raise ValueError(f"{name}_alpha must be finite and > 0, got {a!r}")
        self.base = base
        self.d_in, self.d_out = d_in, d_out
        self.ranks = {"retain": retain_rank, "forget": forget_rank}
        self.alphas = {"retain": float(retain_alpha), "forget": float(forget_alpha)}
        w = base.weight
        self.lora_A_retain = nn.Parameter(torch.empty(retain_rank, d_in, dtype=w.dtype, device=w.device))
        self.lora_B_retain = nn.Parameter(torch.zeros(d_out, retain_rank, dtype=w.dtype, device=w.device))
        self.lora_A_forget = nn.Parameter(torch.empty(forget_rank, d_in, dtype=w.dtype, device=w.device))
        self.lora_B_forget = nn.Parameter(torch.zeros(d_out, forget_rank, dtype=w.dtype, device=w.device))
        # as PEFT does; from `generator` when given (a seeded run), else the global torch RNG
        nn.init.kaiming_uniform_(self.lora_A_retain, a=math.sqrt(5), generator=generator)
        nn.init.kaiming_uniform_(self.lora_A_forget, a=math.sqrt(5), generator=generator)
        self.retain_scale = 1.0
        self.forget_scale = 1.0
        self.blocked: frozenset[str] = frozenset()  # adapters whose parameters get no gradient (routing)

    def factors(self, which: Adapter) -> tuple[nn.Parameter, nn.Parameter]:
        """(A (r, d_in), B (d_out, r)) of one adapter."""
        return getattr(self, f"lora_A_{which}"), getattr(self, f"lora_B_{which}")

    def delta(self, x: torch.Tensor, which: Adapter) -> torch.Tensor:
        """(alpha / r) * B A x of one adapter, without the runtime scale: (..., d_in) -> (..., d_out)."""
        A, B = self.factors(which)
        return (x @ A.T) @ B.T * (self.alphas[which] / self.ranks[which])

    def _branch(self, x: torch.Tensor, which: Adapter) -> torch.Tensor:
        """`delta`, with the adapter's parameters detached when it is blocked: the same value, and
        the gradient still flows to `x` through the branch, so only that adapter's own parameter
        gradients are zero (what hooks zeroing them would give), the other adapter's are unchanged."""
        if which not in self.blocked:
            return self.delta(x, which)
        A, B = self.factors(which)
        return (x @ A.detach().T) @ B.detach().T * (self.alphas[which] / self.ranks[which])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        out = self.base(x)
        # a zero scale skips the adapter: exactly the base output, and no graph through it
        if self.retain_scale != 0:
            out = out + self.retain_scale * self._branch(x, "retain")
        if self.forget_scale != 0:
            out = out + self.forget_scale * self._branch(x, "forget")
        return out

    def merged_weight(self) -> torch.Tensor:
        """The base weight with both adapters at their current scales folded in (base layout)."""
        w = self.base.weight.detach().clone()
        for which, s in (("retain", self.retain_scale), ("forget", self.forget_scale)):
            A, B = self.factors(which)
            d = s * (self.alphas[which] / self.ranks[which]) * (B.detach() @ A.detach())  # (d_out, d_in)
            w += d if isinstance(self.base, nn.Linear) else d.T  # Conv1D stores (d_in, d_out)
        return w

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, retain=(r={self.ranks['retain']}, alpha={self.alphas['retain']:g}),"
                f" forget=(r={self.ranks['forget']}, alpha={self.alphas['forget']:g})")


def dual_lora_modules(model: nn.Module) -> dict[str, DualLoRALinear]:
    """Every `DualLoRALinear` of `model` by its module path (e.g. `model.layers.0.self_attn.q_proj`)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DualLoRALinear)}


def _require(model: nn.Module) -> dict[str, DualLoRALinear]:
    mods = dual_lora_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no dual LoRA adapters; call add_dual_lora first")
    return mods


def add_dual_lora(model: nn.Module, targets: list[str] | None, retain_rank: int, retain_alpha: float,
                  forget_rank: int, forget_alpha: float, *, seed: int | None = None) -> nn.Module:
    """Wrap every linear layer `targets` selects (PEFT's rule: a module path equal to an entry or ending
    in "." + entry; None: the architecture's default LoRA targets, `adapters.default_targets`) in a
    `DualLoRALinear`, in place; freeze everything else. `seed`: the adapters' A matrices are drawn
    from a generator seeded with it (layer by layer in module order), so a run's initialisation
    depends on its seed alone; None draws from the global torch RNG. Returns `model`."""
    if dual_lora_modules(model):
        raise ValueError(f"{type(model).__name__} already has dual LoRA adapters")
    if targets is None:
        targets = default_targets(getattr(getattr(model, "config", None), "model_type", None))
    if not targets:
        raise ValueError("add_dual_lora: targets is empty")
    chosen = target_modules(model, targets)  # PEFT's matching rule; raises when an entry matches nothing
    for p in model.parameters():
        p.requires_grad_(False)
    gen = None
    if seed is not None:
        device = next(model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(seed)
    for name, base in chosen.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, DualLoRALinear(base, retain_rank, retain_alpha, forget_rank, forget_alpha, generator=gen))
    return model


def get_scales(model: nn.Module) -> tuple[float, float]:
    """The (retain, forget) scales, which must be the same on every adapted layer."""
    values = {(m.retain_scale, m.forget_scale) for m in _require(model).values()}
    if len(values) != 1:
        raise RuntimeError(f"dual LoRA layers disagree on their scales: {sorted(values)}")
    return values.pop()


def set_scales(model: nn.Module, retain: float, forget: float) -> None:
    """Set the runtime scales of both adapters on every layer (1, 1: both; 1, 0: forget ablated)."""
    for name, v in (("retain", retain), ("forget", forget)):
        if not math.isfinite(v):
            raise ValueError(f"set_scales: {name} scale must be finite, got {v}")
    for m in _require(model).values():
        m.retain_scale, m.forget_scale = float(retain), float(forget)


@contextlib.contextmanager
def scales(model: nn.Module, retain: float, forget: float) -> Iterator[nn.Module]:
    """`set_scales` for the duration of a `with` block; each layer's previous scales come back after."""
    before = {name: (m.retain_scale, m.forget_scale) for name, m in _require(model).items()}
    try:
        set_scales(model, retain, forget)
        yield model
    finally:
        for name, m in dual_lora_modules(model).items():
            m.retain_scale, m.forget_scale = before[name]


@contextlib.contextmanager
def block_gradients(model: nn.Module, retain: bool, forget: bool) -> Iterator[nn.Module]:
    """Within the block, forward passes give the blocked adapters' parameters no gradient (forward
    values unchanged; see `DualLoRALinear._branch`). Gradient routing runs flagged samples with the
    retain adapter blocked. Each layer's previous setting comes back after."""
    blocked = frozenset(w for w, b in (("retain", retain), ("forget", forget)) if b)
    before = {name: m.blocked for name, m in _require(model).items()}
    try:
        for m in dual_lora_modules(model).values():
            m.blocked = blocked
        yield model
    finally:
        for name, m in dual_lora_modules(model).items():
            m.blocked = before[name]


def merged_dual_lora(model: nn.Module) -> nn.Module:
    """A copy of `model` with every `DualLoRALinear` replaced by its base layer, the adapters folded
    into the weight at their current scales: a plain model (e.g. a Hugging Face one that
    `save_pretrained` / `from_pretrained` round-trip). `model` is unchanged."""
    import copy

    mods = _require(model)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in mods.items():
            base = copy.deepcopy(m.base)
            base.weight.copy_(m.merged_weight())
            parent_name, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, child, base)
    assert not dual_lora_modules(out)
    return out


def adapter_parameters(model: nn.Module, which: Adapter) -> list[nn.Parameter]:
    """The A and B parameters of one adapter on every layer (for routing hooks and optimiser groups)."""
    if which not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {which!r}")
    return [p for m in _require(model).values() for p in m.factors(which)]


def dual_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`<module path>.lora_{A,B}_{retain,forget}` -> tensor, for every adapted layer."""
    out = {}
    for name, m in _require(model).items():
        for which in ADAPTERS:
            A, B = m.factors(which)
            out[f"{name}.lora_A_{which}"] = A.detach().contiguous()
            out[f"{name}.lora_B_{which}"] = B.detach().contiguous()
    return out


def save_dual_lora(model: nn.Module, path: str | Path) -> Path:
    """Save the adapter weights (not the base) as safetensors, alphas and targets in the metadata."""
    mods = _require(model)
    alphas = {(m.alphas["retain"], m.alphas["forget"]) for m in mods.values()}
    if len(alphas) != 1:
        raise ValueError(f"save_dual_lora: layers have different alphas {sorted(alphas)}; the format stores one pair")
    (retain_alpha, forget_alpha), = alphas
    meta = {"format": FORMAT, "retain_alpha": repr(retain_alpha), "forget_alpha": repr(forget_alpha),
            "targets": json.dumps(sorted({n.rsplit('.', 1)[-1] for n in mods}))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in dual_lora_state_dict(model).items()}, str(path), metadata=meta)
    return path


def detect_ranks(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """{"retain": r_r, "forget": r_f} from the A matrices' shapes; one rank per adapter across layers."""
    ranks = {}
    for which in ADAPTERS:
        found = {k.rsplit(".", 1)[0]: v.shape[0] for k, v in state.items() if k.endswith(f".lora_A_{which}")}
        if not found:
            raise ValueError(f"dual LoRA state dict has no lora_A_{which} tensors (keys: {sorted(state)[:4]}...)")
        values = set(found.values())
        if len(values) != 1:
            raise ValueError(f"dual LoRA {which} ranks differ across layers: {dict(sorted(found.items()))}")
        ranks[which] = values.pop()
        for layer, r in found.items():  # B must agree with A
            B = state.get(f"{layer}.lora_B_{which}")
            if B is None or B.ndim != 2 or B.shape[1] != r:
                raise ValueError(f"dual LoRA {layer}: lora_B_{which} is missing or not (d_out, {r}): "
                                 f"{None if B is None else tuple(B.shape)}")
    return ranks


def load_dual_lora(model: nn.Module, path: str | Path, *, retain_rank: int | None = None,
                   forget_rank: int | None = None, retain_alpha: float | None = None,
                   forget_alpha: float | None = None) -> dict:
    """Load adapters saved by `save_dual_lora` into `model`, adding them first if it has none.

    Ranks come from the tensor shapes and alphas from the file's metadata; any value passed here is
    checked against them (a mismatch raises). Every saved layer must exist in the model and every
    adapted layer of the model must be in the file. Returns {ranks, alphas, targets}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dual LoRA weights not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a dual LoRA file (format {meta.get('format')!r}, expected {FORMAT!r})")
    ranks = detect_ranks(state)
    alphas = {"retain": float(meta["retain_alpha"]), "forget": float(meta["forget_alpha"])}
    given = {("rank", "retain"): retain_rank, ("rank", "forget"): forget_rank,
             ("alpha", "retain"): retain_alpha, ("alpha", "forget"): forget_alpha}
    for (what, which), v in given.items():
        saved = ranks[which] if what == "rank" else alphas[which]
        if v is not None and v != saved:
            raise ValueError(f"{path}: {which} {what} is {saved:g} in the file but {v:g} was given")
    targets = json.loads(meta["targets"])
    saved_layers = {k.rsplit(".", 1)[0] for k in state}
    if not dual_lora_modules(model):  # the saved layers' full paths: exactly those layers, whatever matched first
        add_dual_lora(model, sorted(saved_layers), ranks["retain"], alphas["retain"], ranks["forget"], alphas["forget"])
    mods = dual_lora_modules(model)
    for name, m in mods.items():
        if m.ranks != ranks or m.alphas != alphas:
            raise ValueError(f"{path}: layer {name} has ranks {m.ranks} alphas {m.alphas}; the file has {ranks} {alphas}")
    if saved_layers != set(mods):
        raise ValueError(f"{path}: layers differ from the model's adapted layers; only in file: "
                         f"{sorted(saved_layers - set(mods))[:5]}, only in model: {sorted(set(mods) - saved_layers)[:5]}")
    with torch.no_grad():
        for key, tensor in state.items():
            layer, _, attr = key.rpartition(".")
            param = getattr(mods[layer], attr)
            if param.shape != tensor.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model's is {tuple(param.shape)}")
            param.copy_(tensor.to(param.dtype))
    return {"ranks": ranks, "alphas": alphas, "targets": targets}
