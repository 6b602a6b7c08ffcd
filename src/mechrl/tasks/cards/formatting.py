"""Text for the card game: rule phrasings, prompt templates, answers (direct and worked), parsing.

A prompt always has the same three blocks, whatever the template:

    Rule: the score is the sum of RED cards minus the sum of BLUE cards .
    Cards: RED 3 , BLUE 5 , RED 7 .
    Answer:

and the completion is the answer, either `direct` (` 5`) or `worked`, where the selected values
and partial results come first and the final answer is the number after the last `=`:

    RED 3 7 = 10 ; BLUE 5 = 5 ; 10 - 5 = 5          (a difference rule)
    HIGH 7 9 = 2                                     (a single rule)
    RED 3 7 = 10 ; BLUE 5 = 5 ; 10 - 5 = 5 ; BIG     (the BIG/SMALL question)

Rule text is composed from a *phrasing* (a sentence frame plus words for each rule part), so any
family, including new compositions, can be written in any phrasing. `ID_PHRASINGS` are used in
training; `OOD_PHRASINGS` only in the paraphrase test split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mechrl.tasks.cards.rules import Card, Rule, Score, Selector


@dataclass(frozen=True)
class Phrasing:
    single: str  # frame with {A}
    diff: str  # frame with {A} and {B}
    sum: str  # aggregate phrase with {sel}
    count: str
    color: str  # selector phrases; {c} colour, {k} threshold
    above: str
    odd: str
    even: str

    def selector(self, sel: Selector) -> str:
        if sel.kind == "color":
            return self.color.format(c=sel.arg)
        if sel.kind == "above":
            return self.above.format(k=sel.arg)
        return getattr(self, sel.kind)

    def rule_text(self, rule: Rule) -> str:
        agg = getattr(self, rule.aggregate)
        a = agg.format(sel=self.selector(rule.a))
        if rule.b is None:
            return self.single.format(A=a)
        return self.diff.format(A=a, B=agg.format(sel=self.selector(rule.b)))


ID_PHRASINGS: tuple[Phrasing, ...] = (
    Phrasing(single="the score is {A}", diff="the score is {A} minus {B}",
             sum="the sum of {sel}", count="the number of {sel}",
             color="{c} cards", above="cards above {k}", odd="odd cards", even="even cards"),
    Phrasing(single="compute {A}", diff="compute {A} take away {B}",
             sum="the total of {sel}", count="the count of {sel}",
             color="the {c} cards", above="cards greater than {k}", odd="cards with odd values",
             even="cards with even values"),
    Phrasing(single="find {A}", diff="find {A} less {B}",
             sum="the {sel} added up", count="how many {sel} there are",
             color="{c} ones", above="values over {k}", odd="odd values", even="even values"),
)

OOD_PHRASINGS: tuple[Phrasing, ...] = (
    Phrasing(single="report {A}", diff="from {A} remove {B}",
             sum="the added values of {sel}", count="the amount of {sel}",
             color="cards coloured {c}", above="cards bigger than {k}", odd="cards that are odd",
             even="cards that are even"),
    Phrasing(single="your answer is {A}", diff="your answer is {A} with {B} subtracted",
             sum="all {sel} summed", count="the tally of {sel}",
             color="{c} coloured cards", above="cards exceeding {k}", odd="the odd ones",
             even="the even ones"),
)

#: Card-list layouts; all keep the Rule / Cards / Answer blocks.
TEMPLATES: tuple[str, ...] = ("comma", "lines", "bars")

BIGSMALL_QUESTION = "Question: is the score at least {t} ? say BIG or SMALL ."
SYMBOLS = (":", ".", ",", "|", "=", ";", "-", "?")
TAGS = ("HIGH", "ODD", "EVEN", "BIG", "SMALL")


def format_cards(cards: list[Card], template: str) -> str:
    items = [f"{c} {v}" for c, v in cards]
    if template == "comma":
        return "Cards: " + " , ".join(items) + " ."
    if template == "lines":
        return "Cards:\n" + "\n".join(items)
    if template == "bars":
        return "Cards: " + " | ".join(items)
    raise ValueError(f"unknown template {template!r}; known: {TEMPLATES}")


def format_prompt(rule_text: str, cards: list[Card], template: str, question: str, big_threshold: int) -> str:
    lines = [f"Rule: {rule_text} .", format_cards(cards, template)]
    if question == "bigsmall":
        lines.append(BIGSMALL_QUESTION.format(t=big_threshold))
    elif question != "score":
        raise ValueError(f"unknown question {question!r}")
    lines.append("Answer:")
    return "\n".join(lines)


def worked_steps(rule: Rule, result: Score, running: bool = False) -> str:
    """`RED 3 7 = 10 ; BLUE 5 = 5 ; 10 - 5 = 5` (no leading space). With `running`, each selection's
    result is written as its running total, one number per selected card: `RED 3 7 = 3 10`
    (a count runs `HIGH 7 9 = 1 2`); an empty selection is `BLUE = 0`."""
    steps = []
    for sel, vals, part in zip(rule.selectors, result.selected, result.partials):
        totals = [str(part)]
        if running and vals:
            counted = rule.aggregate == "count"
            acc, totals = 0, []
            for v in vals:
                acc += 1 if counted else v
                totals.append(str(acc))
            if acc != part:
                raise AssertionError(f"running total {acc} != partial {part} for {sel.tag} {vals}")
        steps.append(" ".join([sel.tag, *map(str, vals), "=", *totals]))
    if rule.b is not None:
        steps.append(f"{result.partials[0]} - {result.partials[1]} = {result.score}")
    return " ; ".join(steps)


def format_answer(rule: Rule, result: Score, answer_format: str, question: str, big_threshold: int) -> tuple[str, str]:
    """(completion text with a leading space, gold answer string)."""
    if question == "score":
        gold = str(result.score)
    elif question == "bigsmall":
        gold = "BIG" if result.score >= big_threshold else "SMALL"
    else:
        raise ValueError(f"unknown question {question!r}")
    if answer_format == "direct":
        return " " + gold, gold
    if answer_format in ("worked", "running"):
        steps = worked_steps(rule, result, running=answer_format == "running")
        return " " + (steps if question == "score" else f"{steps} ; {gold}"), gold
    raise ValueError(f"unknown answer_format {answer_format!r}")


# ----------------------------------------------------------------------------------------------
# Strict parsing
# ----------------------------------------------------------------------------------------------

_INT = r"-?(?:0|[1-9][0-9]*)"
_NAT = r"(?:0|[1-9][0-9]*)"
_SEL_STEP = rf"[A-Z]+(?: [0-9])* = {_NAT}"
_DIFF_STEP = rf"{_NAT} - {_NAT} = {_INT}"
_WORKED = rf"{_SEL_STEP}(?: ; {_SEL_STEP})*(?: ; {_DIFF_STEP})?"
_RUN_STEP = rf"[A-Z]+(?: [0-9])* =(?: {_NAT})+"
_RUNNING = rf"{_RUN_STEP}(?: ; {_RUN_STEP})*(?: ; {_DIFF_STEP})?"
_PATTERNS = {
    ("direct", "score"): re.compile(rf"^({_INT})$"),
    ("direct", "bigsmall"): re.compile(r"^(BIG|SMALL)$"),
    ("worked", "score"): re.compile(rf"^{_WORKED}$"),
    ("worked", "bigsmall"): re.compile(rf"^{_WORKED} ; (BIG|SMALL)$"),
    ("running", "score"): re.compile(rf"^{_RUNNING}$"),
    ("running", "bigsmall"): re.compile(rf"^{_RUNNING} ; (BIG|SMALL)$"),
}


@dataclass(frozen=True)
class Parsed:
    answer: str | None  # None when the completion is malformed
    format_error: bool


def parse_answer(completion: str, answer_format: str, question: str = "score") -> Parsed:
    """Strict parse of a completion (text up to EOS). A completion that does not match the grammar
    of its format exactly is a format error and has no answer (so it also counts as wrong).
    Whitespace at either end is ignored; inside, tokens are separated by single spaces."""
    key = (answer_format, question)
    if key not in _PATTERNS:
        raise ValueError(f"no parser for answer_format={answer_format!r}, question={question!r}")
    text = completion.strip()
    m = _PATTERNS[key].match(text)
    if m is None:
        return Parsed(None, True)
    if answer_format == "direct" or question == "bigsmall":
        return Parsed(m.group(1), False)
    return Parsed(text.rsplit(" ", 1)[1], False)  # the last number: after the last `=`, or a running total


def vocabulary(colors: list[str]) -> list[str]:
    """Every word the task can write (letters-only words; digits and symbols are added by the
    tokenizer), so that a word-level tokenizer covers all splits including the OOD ones."""
    words: set[str] = set(colors) | set(TAGS)
    texts = ["Rule: Cards: Answer:", BIGSMALL_QUESTION]
    for ph in ID_PHRASINGS + OOD_PHRASINGS:
        texts += [ph.single, ph.diff, ph.sum, ph.count, ph.color, ph.above, ph.odd, ph.even]
    for t in texts:
        words.update(re.findall(r"(?<!\{)\b[A-Za-z]+\b(?!\})", t))
    return sorted(words)
