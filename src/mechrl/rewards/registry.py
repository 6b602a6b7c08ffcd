"""The reward registry: plain functions registered by name, composed into one weighted reward.

A reward function scores a batch of completions:

    fn(prompts: list[str], completions: list[str], examples: list[dict], **params) -> list[float]

`examples` are the task's example dicts (gold answer, labels), one per completion. Parameters come
from the recipe (`reward: [{name: word_count, weight: 0.5, params: {word: happy}}]`) and are
checked against the function's signature (names and annotated types) when the reward is built,
so a typo fails before training starts. Every call is checked too: a component that returns the
wrong number of values, something that is not a number, or a NaN/inf raises with its name.

A reward that holds state (a loaded reward model, a buffer of samples) is registered as a factory
(`register_reward_factory`): `factory(**params)` returns the batch function, and each built `Reward` calls
it once, so every run has its own state.

    >>> from mechrl.config import RewardSpec
    >>> reward = build_reward([RewardSpec(name="contains_word", params={"word": "RED"})])
    >>> reward(["p", "p"], ["RED 3 = 3", "BLUE"], [{}, {}]).total
    tensor([1., 0.])
"""

from __future__ import annotations

import inspect
import math
import re
import numbers
import typing
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from pydantic import TypeAdapter, ValidationError

from mechrl.config import ConfigError, RewardSpec, _suggest

__all__ = ["RewardFn", "RewardOutput", "Reward", "register_reward", "register_reward_pattern", "get_reward",
           "list_rewards", "build_reward", "register_reward_factory"]

RewardFn = Callable[..., Sequence[float]]

#: The positional arguments every reward function takes first; the rest are its parameters.
_BATCH_ARGS = ("prompts", "completions", "examples")

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator that registers `fn` under `name` (a name is registered once; twice raises).

        @register_reward("happy_count")
        def happy_count(prompts, completions, examples, bonus: float = 1.0) -> list[float]: ...
    """
    def deco(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY or name in _FACTORIES:
            raise ValueError(f"reward {name!r} is already registered (by {_REGISTRY.get(name, _FACTORIES.get(name)).__module__}."
                             f"{_REGISTRY[name].__qualname__}); pick another name")
        params = list(inspect.signature(fn).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) < 3 and not any(p.kind is p.VAR_POSITIONAL for p in params):
            raise TypeError(f"reward {name!r}: a reward function takes (prompts, completions, examples, **params), "
                            f"got {fn.__qualname__}{inspect.signature(fn)}")
        _REGISTRY[name] = fn
        return fn

    return deco


#: Reward families named by a pattern (e.g. `sentence_length_(\d+)`): (compiled pattern, an example
#: name, factory(match) -> reward function). Exact names take precedence over patterns.
_PATTERNS: list[tuple[re.Pattern, str, Callable[[re.Match], RewardFn]]] = []


def register_reward_pattern(pattern: str, example: str) -> Callable[[Callable[[re.Match], RewardFn]], Callable]:
    """Decorator that registers a factory serving every name that fully matches `pattern`; the factory
    gets the match and returns the reward function (so parameters can live in the name, as in
    `sentence_length_10_smooth`). `example` is a name the pattern matches, shown in error messages."""
    compiled = re.compile(pattern)
    if not compiled.fullmatch(example):
        raise ValueError(f"reward pattern {pattern!r}: its example {example!r} does not match it")

    def deco(factory: Callable[[re.Match], RewardFn]) -> Callable[[re.Match], RewardFn]:
        if any(p.pattern == pattern for p, _, _ in _PATTERNS):
            raise ValueError(f"reward pattern {pattern!r} is already registered")
        _PATTERNS.append((compiled, example, factory))
        return factory

    return deco


#: Rewards that hold state (a loaded model, a buffer): name -> factory(**params) -> fn(prompts, completions,
#: examples). Each built `Reward` calls the factory once, so every run gets its own state.
_FACTORIES: dict[str, Callable[..., RewardFn]] = {}


def register_reward_factory(name: str) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Decorator that registers a stateful reward: `factory(**params)` returns the batch function
    `fn(prompts, completions, examples)`. The spec's params are checked against the factory's signature
    when the `Reward` is built, and the factory is called then, once per `Reward`."""
    def deco(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if name in _REGISTRY or name in _FACTORIES:
            raise ValueError(f"reward {name!r} is already registered; pick another name")
        _FACTORIES[name] = factory
        return factory

    return deco


def get_reward(name: str) -> RewardFn:
    """The function registered as `name` (or built by the pattern it matches); an unknown name is a
    `ConfigError` naming close matches."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _FACTORIES:
        raise ValueError(f"reward {name!r} holds state and is built with its params by build_reward, not get_reward")
    matches = [(p, f) for p, _, f in _PATTERNS if p.fullmatch(name)]
    if len(matches) > 1:
        raise ConfigError(f"reward {name!r} matches several reward patterns: {[p.pattern for p, _ in matches]}")
    if matches:
        pattern, factory = matches[0]
        return factory(pattern.fullmatch(name))
    examples = [e for _, e, _ in _PATTERNS]
    families = f"; reward families (numbers vary): {', '.join(examples)}" if examples else ""
    raise ConfigError(f"unknown reward {name!r}{_suggest(name, list(_REGISTRY) + list(_FACTORIES) + examples)}; "
                      f"registered rewards: {', '.join(list_rewards())}{families}")


def list_rewards() -> list[str]:
    return sorted([*_REGISTRY, *_FACTORIES])


@dataclass(frozen=True)
class RewardOutput:
    total: torch.Tensor  # (B,) float32, the weighted sum of the components
    components: dict[str, torch.Tensor]  # name -> (B,) float32, each component's raw (unweighted) value


def _check_params(name: str, fn: RewardFn, params: dict[str, Any], kind: str = "reward",
                  n_batch_args: int = 3) -> dict[str, Any]:
    """`params` validated against `fn`'s signature: names (unknown / missing) and annotated types.
    Returns the params as pydantic parsed them (e.g. a YAML int for a float parameter)."""
    sig = inspect.signature(fn)
    accepted = [p for p in list(sig.parameters.values())[n_batch_args:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    open_ended = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    names = [p.name for p in accepted]
    problems = []
    for key in params:
        if key not in names and not open_ended:
            valid = f"; its parameters: {', '.join(names)}" if names else "; it takes no parameters"
            problems.append(f"unknown parameter {key!r}{_suggest(key, names)}{valid}")
    for p in accepted:
        if p.default is p.empty and p.name not in params:
            problems.append(f"missing parameter {p.name!r}")
    if problems:
        raise ConfigError(f"{kind} {name!r}: " + "; ".join(problems))
    try:
        hints = typing.get_type_hints(fn)
    except NameError as e:  # parameters could not be type-checked: say so rather than skip the check
        raise TypeError(f"{kind} {name!r} ({fn.__module__}.{fn.__qualname__}): its annotations do not resolve "
                        f"({e}); annotate its parameters with types importable where it is defined") from None
    out = dict(params)
    for key, value in params.items():
        if key in hints:
            try:
                out[key] = TypeAdapter(hints[key]).validate_python(value)
            except ValidationError as e:
                msg = e.errors()[0]["msg"]
                raise ConfigError(f"{kind} {name!r}: parameter {key!r}: {msg} (got {value!r})") from None
    return out


class Reward:
    """A weighted sum of registered reward functions, built from `RewardSpec`s by `build_reward`.
    Calling it scores a batch and returns the total and each component (logged as `reward/<name>`)."""

    def __init__(self, specs: Sequence[RewardSpec]):
        if not specs:
            raise ConfigError("reward: at least one reward component is needed")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"reward: a component is listed twice: {names}")
        self.specs = list(specs)
        self._parts: list[tuple[str, float, RewardFn, dict[str, Any]]] = []
        for s in specs:
            if not math.isfinite(s.weight):
                raise ConfigError(f"reward {s.name!r}: weight must be finite, got {s.weight}")
            if s.name in _FACTORIES:  # stateful: built now with its params, called without them
                factory = _FACTORIES[s.name]
                fn = factory(**_check_params(s.name, factory, s.params, n_batch_args=0))
                self._parts.append((s.name, float(s.weight), fn, {}))
                continue
            fn = get_reward(s.name)
            self._parts.append((s.name, float(s.weight), fn, _check_params(s.name, fn, s.params)))

    @property
    def names(self) -> list[str]:
        return [name for name, *_ in self._parts]

    def __repr__(self) -> str:
        return "Reward(" + " + ".join(f"{w:g}*{n}" for n, w, *_ in self._parts) + ")"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], examples: Sequence[dict]) -> RewardOutput:
        B = len(prompts)
        for what, seq in (("completions", completions), ("examples", examples)):
            if len(seq) != B:
                raise ValueError(f"reward: {len(seq)} {what} for {B} prompts; the lists must have equal length")
        prompts, completions, examples = list(prompts), list(completions), list(examples)
        total = torch.zeros(B, dtype=torch.float32)  # (B,)
        components = {}
        for name, weight, fn, params in self._parts:
            values = _as_floats(name, fn(prompts, completions, examples, **params), B)
            comp = torch.tensor(values, dtype=torch.float32)  # (B,)
            components[name] = comp
            total += weight * comp
        return RewardOutput(total, components)


def _as_floats(name: str, out: Any, n: int) -> list[float]:
    """A component's output as `n` finite floats, or an error naming the component."""
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):  # torch / numpy arrays
        if getattr(out, "ndim", 1) != 1:
            raise ValueError(f"reward {name!r} returned an array of shape {tuple(out.shape)}; expected ({n},)")
        out = out.tolist()
    if not isinstance(out, Sequence) or isinstance(out, (str, bytes)):
        raise ValueError(f"reward {name!r} returned a {type(out).__name__}; expected a list of {n} numbers")
    if len(out) != n:
        raise ValueError(f"reward {name!r} returned {len(out)} values for {n} completions (expected {n})")
    values = []
    for i, v in enumerate(out):
        if not isinstance(v, numbers.Real):
            raise ValueError(f"reward {name!r} returned a non-number at index {i}: {v!r}")
        if not math.isfinite(v):
            raise ValueError(f"reward {name!r} returned a non-finite value at index {i}: {v}")
        values.append(float(v))
    return values


def build_reward(specs: Sequence[RewardSpec]) -> Reward:
    """The weighted sum of `specs`; names and parameters are checked now, not at the first step."""
    return Reward(specs)
