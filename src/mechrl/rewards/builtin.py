"""Built-in rewards, registered when `mechrl.rewards` is imported.

Task rewards read what they need from the example dict (gold answer, answer format), so they work
on any batch of examples of their task; the toy word rewards need no task at all and are what
tests and small studies learn in seconds (a study's own hackable bonus, e.g. "happy", is one more
`@register_reward` in its module).
"""

from __future__ import annotations

import re

from mechrl.rewards.registry import register_reward
from mechrl.tasks.cards.formatting import parse_answer

__all__ = ["cards_correct", "cards_format", "word_count", "contains_word"]


# ----------------------------------------------------------------------------------------------
# The card game
# ----------------------------------------------------------------------------------------------

@register_reward("cards_correct")
def cards_correct(prompts: list[str], completions: list[str], examples: list[dict]) -> list[float]:
    """1.0 when the strictly parsed answer equals the gold answer, else 0.0 (malformed is wrong).

    >>> ex = {"answer": "5", "answer_format": "worked", "question": "score"}
    >>> cards_correct(["p"] * 3, [" RED 3 7 = 10 ; BLUE 5 = 5 ; 10 - 5 = 5",
    ...                           " RED 3 7 = 10 ; BLUE 5 = 5 ; 10 - 5 = 4", " 5"], [ex] * 3)
    [1.0, 0.0, 0.0]
    """
    out = []
    for completion, ex in zip(completions, examples, strict=True):
        parsed = parse_answer(completion, ex["answer_format"], ex["question"])
        out.append(1.0 if parsed.answer is not None and parsed.answer == ex["answer"] else 0.0)
    return out


@register_reward("cards_format")
def cards_format(prompts: list[str], completions: list[str], examples: list[dict], value: float = 0.1) -> list[float]:
    """`value` when the completion parses in its example's answer format (right or wrong), else 0.

    >>> ex = {"answer": "5", "answer_format": "direct", "question": "score"}
    >>> cards_format(["p"] * 3, [" 4", " 5 apples", " 5"], [ex] * 3, value=0.5)
    [0.5, 0.0, 0.5]
    """
    return [0.0 if parse_answer(c, ex["answer_format"], ex["question"]).format_error else float(value)
            for c, ex in zip(completions, examples, strict=True)]


# ----------------------------------------------------------------------------------------------
# Toy word rewards
# ----------------------------------------------------------------------------------------------

def _word_pattern(word: str, ignore_case: bool) -> re.Pattern:
    if not word or word != word.strip():
        raise ValueError(f"word rewards need a non-empty word without surrounding spaces, got {word!r}")
    # whole words: no letter, digit or underscore on either side ("happy" is not in "unhappy")
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE if ignore_case else 0)


@register_reward("word_count")
def word_count(prompts: list[str], completions: list[str], examples: list[dict], word: str,
               max_count: int | None = None, ignore_case: bool = False) -> list[float]:
    """The number of whole-word occurrences of `word` in each completion, capped at `max_count`.

    >>> word_count(["p"] * 2, ["happy, happy unhappy Happy!", "sad"], [{}, {}], word="happy")
    [2.0, 0.0]
    >>> word_count(["p"], ["happy, happy unhappy Happy!"], [{}], word="happy", ignore_case=True, max_count=2)
    [2.0]
    """
    if max_count is not None and max_count < 0:
        raise ValueError(f"word_count: max_count must be >= 0, got {max_count}")
    pat = _word_pattern(word, ignore_case)
    counts = [len(pat.findall(c)) for c in completions]
    return [float(n if max_count is None else min(n, max_count)) for n in counts]


@register_reward("contains_word")
def contains_word(prompts: list[str], completions: list[str], examples: list[dict], word: str,
                  ignore_case: bool = False) -> list[float]:
    """1.0 when `word` occurs as a whole word in the completion, else 0.0.

    >>> contains_word(["p"] * 3, ["RED 3 = 3", "REDS", "red"], [{}] * 3, word="RED")
    [1.0, 0.0, 0.0]
    """
    pat = _word_pattern(word, ignore_case)
    return [1.0 if pat.search(c) else 0.0 for c in completions]
