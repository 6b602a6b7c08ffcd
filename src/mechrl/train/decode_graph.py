"""The decode step as one fixed-shape function over static buffers, replayed from a CUDA graph on CUDA.

On a GPU a decode step of a small model is bound by kernel launches and Python, not by arithmetic
(issue 15, on an H200: mechrl's host loop 5.9 ms per step for a 1.6M-parameter model, a hand-captured
graph of the same work about 1 ms). Here the decode step of `rollout.generate` is a function without
arguments over buffers that never move:

    runner.load(...)          # per call: the prefilled cache rows, the prompt mask, the positions
    runner.sample()           # token 0, from the prefill's logits (eager)
    graph.replay()  x (T-1)   # each: feed the last token through the model, sample the next one

Every per-step index is a device tensor: the step counter `t`, the cache's write position
(`StaticLayer.cumulative_length`, which the model's own cache update advances), the mask column
`start + t - 1` and the positions `base + t - 1`. So the same `step()` is captured once in a
`torch.cuda.CUDAGraph` and replayed, or run eagerly (`decode="static"`; on CPU the tests hold it to
exactly the tokens and log-probs of the host loop `rollout._sample_loop`).

Host syncs inside the loop: one every `check_every` steps (have all rows ended? plus, with stop
strings, one to decode the texts), none otherwise (`DecodeStats.host_checks` counts them). The runner's
buffers are reused by the next call (the next replay overwrites them), so what a call returns is cloned.

What a captured graph bakes in besides its buffers' addresses is part of its cache key: rows, new
tokens, cache length, sampling settings, the generator's device (or none), autocast, the
attention kernel, every module's training flag, the adapters' runtime state (PEFT LoRA scaling,
active, disabled, merged; dual LoRA scales, Python floats baked into the kernels) and the storage
addresses of parameters and buffers. A change in any of them gives a new capture; `MAX_RUNNERS` are
kept per model (least recently used dropped). Weights updated in place (the optimiser) need nothing:
the graph reads them where they live. On the graph path the cache length P + T is rounded up to a
multiple of `CACHE_BUCKET`, so prompts of nearby lengths share a graph (the extra columns stay masked).

RNG inside a graph: a generator is registered with the graph before capture
(`CUDAGraph.register_generator_state`); each replay then reads the generator's current seed and
offset and advances the offset by the graph's total (Note [CUDA Graph-safe RNG states] in
ATen/cuda/CUDAGeneratorImpl.h), so replay i draws what eager step i would. The graph is registered
with the runner's own generator, which each call loads with the caller's generator state and hands
back advanced (`get_state`/`set_state`: seed and offset, host values), so any generator object the
caller passes samples its own stream, and a new one per call needs no new capture. The warm-up steps
before capture draw from it; its state is saved before and restored after, so a call that captures
samples exactly what a call that only replays would. The default CUDA generator is registered too
(sampling without a generator, and dropout of a model sampled in train mode).

Where capture is impossible, `decode="auto"` says why in one log line (once per model and reason) and
decodes with the host loop: on CPU (an info line: the loop is the CPU path), caches with
sliding-window layers (they keep their position in a Python int), attention kernels other than sdpa
and eager (they build masks on the host), a generator on another device, or a capture that failed
(its error logged). `decode="graph"` raises `DecodeGraphError` instead.

Shapes: B rows, P prompt columns (left-padded), T new tokens, L >= P + T cache columns, V vocabulary.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StaticCache
from transformers.cache_utils import StaticLayer

from mechrl.errors import UserError
from mechrl.train.rollout import KVCache, _hit_stop, _sample, _sample_loop, decode_mask, prefill

log = logging.getLogger(__name__)

#: `generate(decode=...)`: "auto" (graph on CUDA where possible, else the host loop), "eager" (the host
#: loop), "static" (this module's step, run eagerly), "graph" (this module's step, captured; an error
#: where that is impossible).
DECODE_MODES = ("auto", "eager", "static", "graph")
MAX_RUNNERS = 4  # runners (buffers + graph) kept per model
CACHE_BUCKET = 32  # the graph path rounds the cache length up to a multiple of this
WARMUP_STEPS = 3  # eager steps on a side stream before capture (lazy initialisation stays out of the graph)


class DecodeGraphError(UserError, RuntimeError):
    """`decode="graph"` was asked for where the decode step cannot be captured."""


@dataclass
class DecodeStats:
    """How one call's decode steps ran (`Rollout.decode`)."""

    mode: str  # "eager" (host loop), "static" (fixed-shape step, eager) or "graph" (replayed)
    steps: int = 0  # tokens sampled per row (the width before trimming)
    replays: int = 0  # graph replays (steps - 1 on the graph path)
    host_checks: int = 0  # end checks inside the loop that read a device value on the host
    captured: bool = False  # this call captured a new graph
    capture_s: float = 0.0  # wall time of that capture (warm-up steps included)
    cache_len: int = 0  # L, cache columns
    fallback: str | None = None  # why "auto" did not use the graph path (None when it did)


@dataclass
class _ModelRunners:
    runners: OrderedDict = field(default_factory=OrderedDict)  # key -> DecodeRunner, least recent first
    failed: str | None = None  # a capture of this model failed: why (not retried)
    logged: set = field(default_factory=set)
    captures: int = 0
    capture_s: float = 0.0
    replays: int = 0


_REGISTRY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _ModelRunners


def decode_totals(model: torch.nn.Module) -> dict[str, float]:
    """Captures, their total seconds and replays so far for `model` (the benchmarks report them)."""
    r = _REGISTRY.get(model)
    return {"captures": r.captures if r else 0, "capture_s": r.capture_s if r else 0.0,
            "replays": r.replays if r else 0, "runners": len(r.runners) if r else 0}


def clear_runners(model: torch.nn.Module | None = None) -> None:
    """Drop the cached runners (and graphs) of `model`, or of every model."""
    if model is None:
        _REGISTRY.clear()
    else:
        _REGISTRY.pop(model, None)


class DecodeRunner:
    """The static buffers and the decode step of one model at one shape (see the module docstring).
    Holds no reference to the model (the registry is keyed weakly by it): the step takes it."""

    def __init__(self, config, pre: StaticCache, attn: torch.Tensor, open_value, *, rows: int, new_tokens: int,
                 cache_len: int, vocab: int, temperature: float, top_k: int | None, top_p: float | None,
                 eos: int, pad: int, generator: torch.Generator | None):
        device = attn.device
        B, T = rows, new_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        # the runner's own generator, on the caller's generator's device: the graph is registered with it
        # (not with the caller's), and each call lends it the caller's state and hands it back advanced
        self.generator = torch.Generator(device=generator.device) if generator is not None else None
        self.eos, self.open_value, self.T = eos, open_value, T
        self.cache = _static_cache_like(config, pre, B)
        self.attn = torch.empty_like(attn)  # (B, 1, 1, L) or (B, L): the mask over every cache column
        self.logits = torch.zeros(B, vocab, dtype=torch.float32, device=device)  # (B, V) next-token logits
        self.tokens = torch.full((B,), pad, dtype=torch.long, device=device)  # (B,) last sampled token
        self.pad_t = torch.full((B,), pad, dtype=torch.long, device=device)
        self.t = torch.zeros(1, dtype=torch.long, device=device)  # (1,) slot of the next sampled token
        self.start = torch.zeros(1, dtype=torch.long, device=device)  # (1,) cache column of token 0 (= P)
        self.base_pos = torch.zeros(B, 1, dtype=torch.long, device=device)  # (B, 1) position of token 0
        self.ids = torch.full((B, T), pad, dtype=torch.long, device=device)  # (B, T)
        self.logprobs = torch.zeros(B, T, dtype=torch.float32, device=device)  # (B, T)
        self.mask = torch.zeros(B, T, dtype=torch.long, device=device)  # (B, T)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
        self.graph: torch.cuda.CUDAGraph | None = None

    # -- per call -------------------------------------------------------------------------------
    def load(self, pre: StaticCache, inverse: torch.Tensor | None, logits: torch.Tensor,
             attn: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        """Reset every buffer for a new batch: the prefilled cache (U rows; row i of the batch is
        `inverse[i]`, or row i itself when None), its next-token logits (U, V), the decode mask."""
        P = prompt_mask.size(1)
        for dst, src in zip(self.cache.layers, pre.layers):
            if inverse is None:
                dst.keys.copy_(src.keys)
                dst.values.copy_(src.values)
            else:
                torch.index_select(src.keys, 0, inverse, out=dst.keys)
                torch.index_select(src.values, 0, inverse, out=dst.values)
            dst.cumulative_length.fill_(P)  # the next write goes to column P
        if inverse is None:
            self.logits.copy_(logits)
        else:
            torch.index_select(logits, 0, inverse, out=self.logits)
        self.attn.copy_(attn)
        self.start.fill_(P)
        self.base_pos.copy_(prompt_mask.sum(1, keepdim=True))  # positions count real tokens only
        self.t.zero_()
        self.tokens.copy_(self.pad_t)
        self.ids.copy_(self.pad_t[:, None].expand_as(self.ids))
        self.logprobs.zero_()
        self.mask.zero_()
        self.done.zero_()

    # -- the step ---------------------------------------------------------------------------------
    def sample(self) -> None:
        """Generated token t of every row from `logits`, into slot t; rows that have ended take pad."""
        tokens, lp = _sample(self.logits, self.temperature, self.top_k, self.top_p, self.generator)  # (B,), (B,)
        live = ~self.done
        tokens = torch.where(live, tokens, self.pad_t)
        self.ids.index_copy_(1, self.t, tokens[:, None])
        self.logprobs.index_copy_(1, self.t, lp.masked_fill(self.done, 0.0)[:, None])
        self.mask.index_copy_(1, self.t, live[:, None].long())
        self.done.logical_or_(tokens == self.eos)
        self.tokens.copy_(tokens)
        self.t.add_(1)

    def feed(self, model: PreTrainedModel) -> None:
        """The model on the last sampled tokens (generated token t - 1, at cache column start + t - 1):
        their keys and values enter the cache, the logits of token t go to `logits`."""
        prev = self.t - 1  # (1,)
        self.attn.index_fill_(-1, self.start + prev, self.open_value)
        out = model(input_ids=self.tokens[:, None], attention_mask=self.attn, position_ids=self.base_pos + prev,
                    past_key_values=self.cache, use_cache=True)
        self.logits.copy_(out.logits[:, -1, :])  # (B, V), cast to float32

    def step(self, model: PreTrainedModel) -> None:
        self.feed(model)
        self.sample()

    def decode(self, model: PreTrainedModel, check_every: int, stop_check=None, *, replay: bool) -> tuple[int, int]:
        """Tokens 0 .. T-1 (fewer when every row has ended at a check); returns (steps, host checks).
        Steps 1 .. replay the captured graph with `replay`, else run eagerly. Same schedule as the host
        loop: a check after every `check_every` steps, none after the last."""
        assert not replay or self.graph is not None, "replay asked for, but nothing was captured"
        self.sample()
        steps, checks = 1, 0
        while steps < self.T:
            if steps % check_every == 0:
                checks += 1
                if stop_check is not None:
                    self.done.logical_or_(stop_check(self.ids[:, :steps], self.mask[:, :steps]))
                if bool(self.done.all()):
                    break
            if replay:
                self.graph.replay()
            else:
                self.step(model)
            steps += 1
        return steps, checks

    # -- capture ----------------------------------------------------------------------------------
    def capture(self, model: PreTrainedModel) -> float:
        """Warm the step up on a side stream, then capture it into a CUDA graph; returns the seconds
        taken. Needs a loaded runner; leaves its buffers spent (`load` again before decoding). The
        generators' states are restored, so the capture draws nothing. Raises `_CaptureFailed` when
        the step cannot be captured (a host sync or an unsupported operation in the model's forward)."""
        assert self.T >= 2, "nothing to capture: one new token is sampled from the prefill"
        device = self.ids.device
        gens = _generators(self.generator, device)
        saved = [g.get_state() for g in gens]
        t0 = time.perf_counter()
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), _uncached_autocast(device):
                self.sample()
                for _ in range(min(WARMUP_STEPS, self.T - 1)):  # slots 1 .. stay inside the T columns
                    self.step(model)
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            for g in gens:
                graph.register_generator_state(g)
            try:
                with torch.cuda.stream(side), _uncached_autocast(device):
                    graph.capture_begin(capture_error_mode="thread_local")
                    try:
                        self.step(model)
                    finally:
                        graph.capture_end()
            except Exception as e:  # the forward is not capturable: the caller decides (log + host loop, or raise)
                first = (str(e).strip().splitlines() or [""])[0]
                raise _CaptureFailed(f"{type(e).__name__}: {first}") from e
            torch.cuda.synchronize(device)
        finally:
            for g, s in zip(gens, saved):
                g.set_state(s)
        self.graph = graph
        return time.perf_counter() - t0


class _CaptureFailed(Exception):
    pass


def _uncached_autocast(device: torch.device):
    """Autocast as the caller set it, with its cache of cast weights off. Under a caching autocast a
    capture would record reads of bf16 weight copies made before it (stale once the optimiser moves
    the weights, and freed when the caller's context exits); uncached, every replay casts afresh."""
    t = device.type
    if not torch.is_autocast_enabled(t):
        return contextlib.nullcontext()
    return torch.autocast(t, dtype=torch.get_autocast_dtype(t), cache_enabled=False)


def _static_cache_like(config, pre: StaticCache, rows: int) -> StaticCache:
    """A StaticCache of `pre`'s length with its layers allocated now (heads, head sizes, dtype, device
    as in `pre`) for `rows` rows, so that their addresses never change."""
    cache = KVCache(config=config, max_cache_len=pre.layers[0].max_cache_len, dtype=pre.kv_dtype, host_position=False)
    for dst, src in zip(cache.layers, pre.layers, strict=True):
        if type(src) is not StaticLayer or type(dst) is not StaticLayer:
            raise ValueError(f"decode runner: cache layers must be plain StaticLayers, got {type(src).__name__}")
        k, v = src.keys, src.values  # (U, H, L, D)
        dst.lazy_initialization(k.new_empty((rows, k.size(1), 1, k.size(3))),
                                v.new_empty((rows, v.size(1), 1, v.size(3))))
    return cache


def _generators(generator: torch.Generator | None, device: torch.device) -> list[torch.Generator]:
    """The generators a captured step may draw from: the sampling one and the device's default
    (sampling without a generator, or dropout in train mode), each once."""
    default = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    gens = [generator] if generator is not None else []
    return gens + ([default] if all(g is not default for g in gens) else [])


def _state_key(model: torch.nn.Module) -> tuple:
    """What a captured forward bakes in besides its inputs' addresses: training flags, adapter runtime
    state (PEFT LoRA, dual LoRA), and where the parameters and buffers live."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from mechrl.models.dual_lora import DualLoRALinear

    adapters = []
    for name, m in model.named_modules():
        if isinstance(m, DualLoRALinear):
            adapters.append((name, m.retain_scale, m.forget_scale))
        elif isinstance(m, BaseTunerLayer):
            scaling = getattr(m, "scaling", {})
            adapters.append((name, tuple(m.active_adapters), bool(m.disable_adapters), tuple(m.merged_adapters),
                             tuple(sorted((k, float(v)) for k, v in scaling.items()))))
    return (tuple(m.training for m in model.modules()), tuple(adapters),
            tuple(p.data_ptr() for p in model.parameters()), tuple(b.data_ptr() for b in model.buffers()),
            getattr(model.config, "_attn_implementation", None))


def capture_blocked(model: PreTrainedModel, generator: torch.Generator | None = None) -> str | None:
    """Why the decode step of `model` (sampling with `generator`) cannot be captured here, or None."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return f"the model is on {device.type}, and CUDA graphs need CUDA"
    if generator is not None and not same_device(generator.device, device):
        return f"the generator is on {generator.device}, the model on {device}"
    r = _REGISTRY.get(model)
    return step_blocker(model) or (r.failed if r is not None else None)


def canonical_device(d: torch.device | str) -> torch.device:
    """`d` with its index filled in: a bare type means its current index (`cuda` is the current CUDA
    device, as a generator made on "cuda" reports it; other types index 0)."""
    d = torch.device(d)
    if d.index is not None:
        return d
    return torch.device(d.type, torch.cuda.current_device() if d.type == "cuda" and torch.cuda.is_available() else 0)


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether two devices are one: `cuda` (a generator's device) and `cuda:0` (a parameter's) are the
    same device when 0 is the current one."""
    return canonical_device(a) == canonical_device(b)


def step_blocker(model: PreTrainedModel) -> str | None:
    """What in the model itself keeps its decode step from being captured, on any device, or None."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return f"attention kernel {impl!r} builds its masks on the host per step (sdpa and eager are captured)"
    kinds = {type(layer).__name__ for layer in StaticCache(config=model.config, max_cache_len=1).layers}
    if kinds != {"StaticLayer"}:
        return (f"its cache has {sorted(kinds - {'StaticLayer'})} layers (sliding windows keep their position in "
                f"a Python int)")
    return None


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


AUTO_ON_CUDA = ("decode=auto runs the host loop on CUDA as well: the captured step is opt-in (decode=graph) "
                "until it passes its GPU checks (on an H200 it hit an illegal memory access in the sampler "
                "benchmark and 3 of 17 GPU tests failed)")


def run_decode(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt_ids: torch.Tensor,
               prompt_mask: torch.Tensor, *, max_new_tokens: int, temperature: float, top_k: int | None,
               top_p: float | None, stop_strings: tuple[str, ...], generator: torch.Generator | None,
               check_every: int, mode: str = "auto", cache_bucket: int | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DecodeStats]:
    """Prefill and decode (B, P) left-padded prompts in `mode` (`DECODE_MODES`); returns completion
    (ids, mask, logprobs), each (B, steps run), not aliased to any reused buffer, and `DecodeStats`.
    `cache_bucket`: round the cache length up to a multiple of it (default `CACHE_BUCKET` on the graph
    path, 1 for "static": exactly the host loop's cache). Call under `torch.no_grad()`."""
    if mode not in DECODE_MODES:
        raise ValueError(f"generate: decode must be one of {DECODE_MODES}, got {mode!r}")
    device = prompt_ids.device
    loop_kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   stop_strings=stop_strings, generator=generator, check_every=check_every)
    fallback = None
    if mode == "auto" and device.type != "cuda":  # the host loop is the CPU path: said once, at info level
        mode, fallback = "eager", capture_blocked(model, generator)
        _log_once(model, fallback, level=logging.INFO)
    elif mode == "auto":  # on CUDA too, for now: see AUTO_ON_CUDA
        mode, fallback = "eager", AUTO_ON_CUDA
        _log_once(model, fallback, level=logging.INFO)
    if mode in ("auto", "graph"):
        fallback = capture_blocked(model, generator)
        if fallback is not None and mode == "graph":
            raise DecodeGraphError(f"decode=graph: the decode step of {type(model).__name__} cannot be captured: "
                                   f"{fallback}")
        if fallback is not None:
            _log_once(model, fallback)
        elif max_new_tokens < 2:  # token 0 comes from the prefill: no decode step to replay, nothing to log
            fallback = "one new token: nothing to replay"
    if mode == "eager" or fallback is not None:
        ids, mask, logprobs, checks = _sample_loop(model, tok, prompt_ids, prompt_mask, **loop_kw)
        return ids, mask, logprobs, DecodeStats("eager", steps=ids.size(1), host_checks=checks,
                                                cache_len=prompt_ids.size(1) + max_new_tokens, fallback=fallback)
    capture = mode in ("auto", "graph")
    try:
        return _decode_static(model, tok, prompt_ids, prompt_mask, capture=capture,
                              cache_bucket=cache_bucket or (CACHE_BUCKET if capture else 1), **loop_kw)
    except _CaptureFailed as e:
        reason = f"capture failed ({e})"
        _REGISTRY[model].failed = reason
        if mode == "graph":
            raise DecodeGraphError(f"decode=graph: the decode step of {type(model).__name__} cannot be captured: "
                                   f"{reason}") from e
        _log_once(model, reason)
        ids, mask, logprobs, checks = _sample_loop(model, tok, prompt_ids, prompt_mask, **loop_kw)
        return ids, mask, logprobs, DecodeStats("eager", steps=ids.size(1), host_checks=checks,
                                                cache_len=prompt_ids.size(1) + max_new_tokens, fallback=reason)


def _log_once(model: PreTrainedModel, reason: str, level: int = logging.WARNING) -> None:
    r = _REGISTRY.setdefault(model, _ModelRunners())
    if reason not in r.logged:
        r.logged.add(reason)
        log.log(level, "decode graph: the decode step of %s is not captured (%s); decoding with the host loop",
                type(model).__name__, reason)


def _decode_static(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt_ids: torch.Tensor,
                   prompt_mask: torch.Tensor, *, max_new_tokens: int, temperature: float, top_k: int | None,
                   top_p: float | None, stop_strings: tuple[str, ...], generator: torch.Generator | None,
                   check_every: int, capture: bool, cache_bucket: int):
    B, P = prompt_ids.shape
    T = max_new_tokens
    L = _round_up(P + T, cache_bucket)
    pre, logits, inverse = prefill(model, prompt_ids, prompt_mask, L)  # (U rows), (U, V)
    kinds = {type(layer).__name__ for layer in pre.layers}
    if kinds != {"StaticLayer"}:
        raise ValueError(f"generate: decode='static' needs a cache of plain StaticLayers; {type(model).__name__}'s "
                         f"has {sorted(kinds)} (use decode='eager' or 'auto')")
    attn, open_value = decode_mask(model, pre, prompt_mask, L)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    device = prompt_ids.device
    autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
    gen_device = None if generator is None else str(canonical_device(generator.device))  # cuda == cuda:0
    key = (B, T, L, float(temperature), top_k, top_p, eos, pad, gen_device, autocast, _state_key(model))
    reg = _REGISTRY.setdefault(model, _ModelRunners())
    runner = reg.runners.get(key)
    if runner is None:
        runner = DecodeRunner(model.config, pre, attn, open_value, rows=B, new_tokens=T, cache_len=L,
                              vocab=logits.size(-1), temperature=temperature, top_k=top_k, top_p=top_p, eos=eos,
                              pad=pad, generator=generator)
        reg.runners[key] = runner
        while len(reg.runners) > MAX_RUNNERS:
            reg.runners.popitem(last=False)
    reg.runners.move_to_end(key)
    stats = DecodeStats("graph" if capture else "static", cache_len=L)
    if capture and runner.graph is None:
        runner.load(pre, inverse, logits, attn, prompt_mask)
        try:
            stats.capture_s = runner.capture(model)
        except BaseException:
            reg.runners.pop(key, None)  # its buffers are spent and it has no graph
            raise
        stats.captured = True
        reg.captures += 1
        reg.capture_s += stats.capture_s
        log.info("decode graph: captured %s at %d rows x %d tokens (cache %d) in %.2f s", type(model).__name__, B,
                 T, L, stats.capture_s)
    runner.load(pre, inverse, logits, attn, prompt_mask)
    stop_check = None
    if stop_strings:
        def stop_check(ids, mask):
            return _hit_stop(tok, ids, mask, stop_strings)
    if generator is not None:
        runner.generator.set_state(generator.get_state())  # the caller's stream, lent to the runner
    steps, checks = runner.decode(model, check_every, stop_check, replay=capture)
    if generator is not None:
        generator.set_state(runner.generator.get_state())  # and handed back, advanced by what was drawn
    stats.steps, stats.host_checks = steps, checks
    stats.replays = steps - 1 if capture else 0
    reg.replays += stats.replays
    return (runner.ids[:, :steps].clone(), runner.mask[:, :steps].clone(), runner.logprobs[:, :steps].clone(),
            stats)
