"""Speed options of the RL update: AdamW's implementation, a compiled log-prob head, bf16 autocast.

On a GPU, a small model's update (forward, backward, optimiser step) is bound by kernel launches,
and its largest tensors are the logits (B, T, V). Three options, each off or neutral on CPU:

- `build_adamw(params, train_cfg, device)`: `torch.optim.AdamW` with `train.adamw` = auto (fused on
  CUDA: multi-tensor kernels, each updating many parameters per launch; PyTorch's default
  elsewhere), for-loop, foreach or fused. The same update up to float rounding (tests: 1e-6).
- `CompiledLogprobs`: `torch.compile` of the per-token log-prob head, log-softmax over the
  vocabulary and the gather of the taken token (forward and backward), as `x[id] - logsumexp(x)`, so
  that the (B, T, V) log-softmax is never written out. Its two leading dimensions are dynamic, so it
  compiles once per vocabulary, temperature and dtype however the batch and completion lengths
  vary; the time spent compiling is counted apart (`compile_stats`). `train.compile_logprobs`.
- `autocast(dtype, device)`: `train.dtype` = bf16 runs the forward passes under
  `torch.autocast("cuda", torch.bfloat16)`: weights, gradients and optimiser state stay float32
  (master weights), and log-probs are reduced in float32 (`token_logprobs` casts the logits up first).
  Refused on CPU with a one-line error: there bf16 autocast is slower than fp32 (STACK.md: 6x for
  TRL's trainer), so it would only be a trap.

    opt = build_adamw(params, cfg.train, device)
    with autocast(cfg.train.dtype, device):
        logp = completion_logprobs(policy, ..., logprob_fn=compiled_logprobs())
"""

from __future__ import annotations

import contextlib
import time

import torch

from mechrl.errors import UserError

ADAMW_IMPLS = ("auto", "for-loop", "foreach", "fused")


def adamw_options(impl: str, device: torch.device | str) -> dict[str, bool]:
    """The `foreach` / `fused` arguments of `torch.optim.AdamW` for `train.adamw`."""
    device = torch.device(device)
    if impl == "auto":
        return {"fused": True} if device.type == "cuda" else {}
    if impl == "for-loop":
        return {"foreach": False, "fused": False}
    if impl == "foreach":
        return {"foreach": True}
    if impl == "fused":
        return {"fused": True}
    raise ValueError(f"train.adamw must be one of {ADAMW_IMPLS}, got {impl!r}")


def build_adamw(params, train_cfg, device: torch.device | str) -> torch.optim.AdamW:
    """AdamW over `params` with the run's lr, betas, weight decay and implementation (`train.adamw`)."""
    t = train_cfg
    return torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay,
                             **adamw_options(t.adamw, device))


class PrecisionError(UserError, ValueError):
    """A precision that this device does not run (bf16 autocast on CPU)."""


def check_dtype(dtype: str, device: torch.device | str) -> None:
    """Raise `PrecisionError` (one line) unless `train.dtype` can run on `device`."""
    device = torch.device(device)
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"train.dtype must be fp32 or bf16, got {dtype!r}")
    if dtype == "bf16" and device.type != "cuda":
        raise PrecisionError(f"train.dtype=bf16 runs on CUDA only (autocast to bfloat16 with fp32 master weights); "
                             f"on {device.type} bf16 autocast is slower than fp32: use train.dtype=fp32")


def autocast(dtype: str, device: torch.device | str):
    """The context the forward passes run in for `train.dtype`: nothing for fp32, bf16 autocast on CUDA.
    Its cache of bf16 weight copies is off: a captured decode step must cast the weights on every replay
    (a cached copy would miss the optimiser's updates, and be freed when the context exits; PyTorch's
    CUDA-graph notes ask for `cache_enabled=False`), and each micro-batch's forward runs in a context
    of its own, where the cache would save little."""
    check_dtype(dtype, device)
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, cache_enabled=False)


def _head(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, T, V) logits, (B, T) ids -> (B, T) float32 log-probs, as x[id] - logsumexp(x)."""
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    return x.gather(2, ids[..., None]).squeeze(2) - torch.logsumexp(x, dim=2)


class CompiledLogprobs:
    """`torch.compile(_head)` with dynamic batch and length; counts its compilations and their time.
    Call it as `token_logprobs(logits, ids, temperature)` (a drop-in for `rollout.token_logprobs`)."""

    def __init__(self, backend: str = "inductor"):
        self.backend = backend
        self._fn = None
        self.compiles = 0  # calls during which torch.compile built a new graph
        self.compile_s = 0.0  # wall time of those calls (the compilation, and that call's own run)
        self.calls = 0

    def __call__(self, logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        if logits.ndim != 3 or ids.shape != logits.shape[:2]:
            raise ValueError(f"compiled log-probs: logits {tuple(logits.shape)} must be (B, T, V) and ids "
                             f"{tuple(ids.shape)} (B, T)")
        if self._fn is None:
            self._fn = torch.compile(_head, backend=self.backend)
        from torch._dynamo.utils import counters

        logits = logits.contiguous()  # a view's strides would be guarded on, and recompile
        for d in (0, 1):  # batch and length vary from step to step: one dynamic kernel for all
            torch._dynamo.maybe_mark_dynamic(logits, d)
            torch._dynamo.maybe_mark_dynamic(ids, d)
        before = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        out = self._fn(logits, ids, float(temperature))
        self.calls += 1
        if counters["stats"]["unique_graphs"] != before:
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            self.compiles += 1
            self.compile_s += time.perf_counter() - t0
        return out


_COMPILED: CompiledLogprobs | None = None


def compiled_logprobs() -> CompiledLogprobs:
    """The process's compiled head (torch.compile's caches are per process anyway)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = CompiledLogprobs()
    return _COMPILED


def compile_stats() -> dict[str, float]:
    """Compilations of the process's compiled head so far, their seconds, and its calls."""
    c = _COMPILED
    return {"compiles": c.compiles if c else 0, "compile_s": c.compile_s if c else 0.0, "calls": c.calls if c else 0}
