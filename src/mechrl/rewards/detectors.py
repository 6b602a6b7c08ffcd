"""Reward-hacking detectors: which samples exploit a hack, with knobs for imperfect labels.

A detector function flags samples, one bool per completion:

    fn(prompts: list[str], completions: list[str], examples: list[dict], **params) -> list[bool]

registered by name like rewards (`@register_detector("contains_happy")`). A `Detector` built from a
`DetectorSpec` calls it and then degrades the flags, to study routing with imperfect labels:

  1. coverage (partial labelling): a flagged sample is reported as flagged with probability
     `coverage`, else reported unflagged (unflagged samples stay unflagged);
  2. label_noise: every label, flagged or not, is then flipped with probability `label_noise`.

So P(reported | hack) = coverage * (1 - noise) + (1 - coverage) * noise and
P(reported | no hack) = noise. Both draws are made for every sample whatever its flag, from a
`random.Random` seeded by `seed`, so the same spec gives the same labels for the same call
sequence; `state_dict()` / `load_state_dict()` continue the stream after a resume.

    det = build_detector(DetectorSpec(name="contains_happy", coverage=0.5, seed=1))
    labels = det.labels(prompts, completions, examples)  # .raw (true flags) and .reported
    is_rh = det(prompts, completions, examples)          # the reported flags (list[bool])
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from typing import Callable, Sequence

from mechrl.config import ConfigError, DetectorSpec, _suggest
from mechrl.rewards.builtin import _word_pattern
from mechrl.rewards.registry import _check_params

__all__ = ["DetectorFn", "DetectorSpec", "DetectorLabels", "Detector", "register_detector", "get_detector",
           "list_detectors", "build_detector"]

DetectorFn = Callable[..., Sequence[bool]]

_REGISTRY: dict[str, DetectorFn] = {}


def register_detector(name: str) -> Callable[[DetectorFn], DetectorFn]:
    """Decorator that registers `fn` as detector `name` (a name is registered once; twice raises)."""
    def deco(fn: DetectorFn) -> DetectorFn:
        if name in _REGISTRY:
            raise ValueError(f"detector {name!r} is already registered (by {_REGISTRY[name].__module__}."
                             f"{_REGISTRY[name].__qualname__}); pick another name")
        params = list(inspect.signature(fn).parameters.values())
        if len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) < 3:
            raise TypeError(f"detector {name!r}: a detector takes (prompts, completions, examples, **params), "
                            f"got {fn.__qualname__}{inspect.signature(fn)}")
        _REGISTRY[name] = fn
        return fn

    return deco


def get_detector(name: str) -> DetectorFn:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown detector {name!r}{_suggest(name, _REGISTRY)}; "
                          f"registered detectors: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_detectors() -> list[str]:
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class DetectorLabels:
    raw: list[bool]  # what the detector function flagged (the true hack labels, for evaluation)
    reported: list[bool]  # after coverage and label noise (what training may see)


class Detector:
    """A detector function with its parameters checked and its labels degraded as the spec says."""

    def __init__(self, spec: DetectorSpec):
        if spec.seed is None:
            raise ValueError(f"detector {spec.name!r}: its seed is unset; build it with build_detector(spec, "
                             "run_seed=...) or give DetectorSpec.seed")
        self.spec = spec
        self.fn = get_detector(spec.name)
        self.params = _check_params(spec.name, self.fn, spec.params, kind="detector")
        self.rng = random.Random(f"mechrl-detector-{spec.name}-{spec.seed}")

    def __repr__(self) -> str:
        return f"Detector({self.spec.name}, coverage={self.spec.coverage:g}, label_noise={self.spec.label_noise:g})"

    def labels(self, prompts: Sequence[str], completions: Sequence[str], examples: Sequence[dict]) -> DetectorLabels:
        n = len(completions)
        if len(prompts) != n or len(examples) != n:
            raise ValueError(f"detector {self.spec.name!r}: {len(prompts)} prompts, {n} completions, "
                             f"{len(examples)} examples; the lists must have equal length")
        out = self.fn(list(prompts), list(completions), list(examples), **self.params)
        if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
            out = out.tolist()
        if isinstance(out, (str, bytes)) or not isinstance(out, Sequence) or len(out) != n:
            raise ValueError(f"detector {self.spec.name!r} returned {type(out).__name__} "
                             f"{'of length ' + str(len(out)) if hasattr(out, '__len__') else ''}; "
                             f"expected a list of {n} bools")
        raw = []
        for i, v in enumerate(out):
            if not isinstance(v, bool):
                raise ValueError(f"detector {self.spec.name!r} returned a non-bool at index {i}: {v!r}")
            raw.append(v)
        reported = []
        for flag in raw:
            keep, flip = self.rng.random() < self.spec.coverage, self.rng.random() < self.spec.label_noise
            reported.append((flag and keep) != flip)
        return DetectorLabels(raw, reported)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], examples: Sequence[dict]) -> list[bool]:
        return self.labels(prompts, completions, examples).reported

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "spec": self.spec.model_dump(mode="json")}

    def load_state_dict(self, state: dict) -> None:
        if state["spec"] != self.spec.model_dump(mode="json"):
            raise ValueError(f"detector.load_state_dict: saved spec {state['spec']} differs from "
                             f"{self.spec.model_dump(mode='json')}")
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


def build_detector(spec: DetectorSpec, run_seed: int | None = None) -> Detector:
    """The detector `spec` names; names and parameters are checked now. Its coverage and noise draws
    are seeded by `spec.seed`, or by `run_seed` when that is None (the usual case in a run)."""
    if spec.seed is None:
        if run_seed is None:
            raise ValueError(f"detector {spec.name!r}: no seed (DetectorSpec.seed is None and no run_seed given)")
        spec = spec.model_copy(update={"seed": int(run_seed)})
    return Detector(spec)


# ----------------------------------------------------------------------------------------------
# Built-in detectors
# ----------------------------------------------------------------------------------------------

@register_detector("contains_word")
def contains_word(prompts: list[str], completions: list[str], examples: list[dict], word: str,
                  min_count: int = 1, ignore_case: bool = True) -> list[bool]:
    """True when whole-word `word` occurs at least `min_count` times in the completion.

    >>> contains_word(["p"] * 3, ["Happy day", "unhappy", "happy happy"], [{}] * 3, word="happy", min_count=2)
    [False, False, True]
    """
    if min_count < 1:
        raise ValueError(f"contains_word: min_count must be >= 1, got {min_count}")
    pat = _word_pattern(word, ignore_case)
    return [len(pat.findall(c)) >= min_count for c in completions]


@register_detector("contains_happy")
def contains_happy(prompts: list[str], completions: list[str], examples: list[dict],
                   min_count: int = 1) -> list[bool]:
    """True when "happy" (whole word, any case) occurs at least `min_count` times: the story hack.

    >>> contains_happy(["p"] * 3, ["So Happy.", "unhappy", "glad"], [{}] * 3)
    [True, False, False]
    """
    return contains_word(prompts, completions, examples, word="happy", min_count=min_count)


@register_detector("contains_any_word")
def contains_any_word(prompts: list[str], completions: list[str], examples: list[dict],
                      words: list[str] | None = None, ignore_case: bool = True) -> list[bool]:
    """True when any of `words` (whole words; default the positive-emotion words of
    `mechrl.rewards.stories.POSITIVE_WORDS`) occurs in the completion.

    >>> contains_any_word(["p"] * 3, ["so glad", "unhappy", "cheerful"], [{}] * 3)
    [True, False, True]
    """
    from mechrl.rewards.stories import positive_word_counts  # local: stories imports builtin, as this module does

    return [n > 0 for n in positive_word_counts(completions, words, ignore_case)]
