"""Shared by the dual LoRA and routing tests."""

from __future__ import annotations

import torch

from mechrl.models.dual_lora import dual_lora_modules


def randomise_b(model, scale: float, seed: int = 1) -> None:
    """LoRA B starts at zero; give both adapters non-zero B (N(0, scale²)) so that both change the
    output and every factor has a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in dual_lora_modules(model).values():
            for which in ("retain", "forget"):
                B = m.factors(which)[1]
                B.copy_(torch.randn(B.shape, generator=g) * scale)
