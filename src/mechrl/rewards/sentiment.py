"""Sentiment rewards for RLHF-style runs, and a reward that carries no signal (the diffing control).

    vader        VADER's compound score of the completion, in [-1, 1] (Hutto & Gilbert 2014; the
                 `vaderSentiment` package ships its lexicon, so it runs offline). Positive words raise it,
                 negative words and negations lower it; an empty completion scores 0.
    no_signal    a reward that says nothing about the text: `mode="constant"` returns `value` for every
                 completion; `mode="random"` returns a uniform number in [low, high) drawn from a hash of
                 (seed, prompt, completion), so it is reproducible, resume-safe (no RNG state) and
                 independent of anything a policy could learn to produce on purpose.

The control run of the rlhf-diffing study is the policy's recipe with `no_signal` in place of `vader`:
what differs between base and control is what training alone does (sampling noise, optimiser drift),
which calibrates what differs between base and policy. Under GRPO's group-normalised advantages a
constant reward gives zero advantages (no update at all); the random mode gives advantages of the same
scale as a real reward's, so it is the default.

    >>> vader(["p"] * 2, [" she smiled and felt happy .", " he was sad and lonely ."], [{}] * 2)
    [0.802, -0.6808]
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Literal

from mechrl.rewards.registry import register_reward

__all__ = ["vader", "no_signal", "vader_analyzer"]


@lru_cache(maxsize=1)
def vader_analyzer():
    """The package's `SentimentIntensityAnalyzer` (built once: it parses the lexicon file)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:  # a declared dependency: a missing install is an environment error
        raise ImportError("the vader reward needs the vaderSentiment package (pip install vaderSentiment==3.3.2)") from e
    return SentimentIntensityAnalyzer()


@register_reward("vader")
def vader(prompts: list[str], completions: list[str], examples: list[dict]) -> list[float]:
    """VADER's compound sentiment score of each completion (the prompt is not scored), in [-1, 1].

    >>> vader(["p"], [""], [{}])
    [0.0]
    """
    analyzer = vader_analyzer()
    return [float(analyzer.polarity_scores(c)["compound"]) for c in completions]


def _unit_hash(seed: int, prompt: str, completion: str) -> float:
    """A number in [0, 1) fixed by (seed, prompt, completion): the first 8 bytes of a SHA-256."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}\x00{completion}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


@register_reward("no_signal")
def no_signal(prompts: list[str], completions: list[str], examples: list[dict],
              mode: Literal["random", "constant"] = "random", value: float = 0.0, low: float = -1.0,
              high: float = 1.0, seed: int = 0) -> list[float]:
    """A reward without information about the text: `value` everywhere ("constant"), or uniform in
    [low, high) from a hash of (seed, prompt, completion) ("random").

    >>> no_signal(["p", "p"], ["a", "b"], [{}, {}], mode="constant", value=0.5)
    [0.5, 0.5]
    >>> r = no_signal(["p", "p", "p"], ["a", "b", "a"], [{}] * 3)
    >>> r[0] == r[2] != r[1] and all(-1 <= x < 1 for x in r)
    True
    """
    if mode == "constant":
        return [float(value)] * len(completions)
    if mode != "random":
        raise ValueError(f"no_signal: mode must be 'random' or 'constant', got {mode!r}")
    if not high > low:
        raise ValueError(f"no_signal: need high > low, got low={low}, high={high}")
    return [low + (high - low) * _unit_hash(seed, p, c) for p, c in zip(prompts, completions, strict=True)]


def word_valence(word: str) -> float:
    """VADER's lexicon valence of one word (lower-cased, surrounding spaces and punctuation stripped); 0 when the
    lexicon does not list it. Positive words score > 0 ("happy" 2.7), negative ones < 0 ("sad" -2.1).

    >>> word_valence(" Happy"), word_valence("sad"), word_valence("the")
    (2.7, -2.1, 0.0)
    """
    return float(vader_analyzer().lexicon.get(word.strip().strip(".,!?;:\"'").lower(), 0.0))


def positive_share(words: list[str]) -> float | None:
    """The fraction of `words` with a positive VADER valence (None for no words)."""
    if not words:
        return None
    return sum(1 for w in words if word_valence(w) > 0) / len(words)
