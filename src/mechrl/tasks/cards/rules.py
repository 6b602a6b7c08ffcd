"""The rule space of the card scoring game.

A card is a (colour, value) pair with value in 0..9. A rule is built from parts:

    selector   which cards count: a colour ("RED cards"), a threshold ("cards above 5"),
               a parity ("odd cards", "even cards")
    aggregate  what to do with the selected values: `sum` or `count`
    combine    `single` (one aggregate) or `diff` (aggregate of A minus aggregate of B)

A *family* fixes the parts' types and leaves their parameters (which colours, which k) free:

    color_sum_diff     sum(colour A) - sum(colour B)          ID
    count_above        count(value > k)                       ID
    parity_count_diff  count(odd) - count(even)               ID
    color_count_diff   count(colour A) - count(colour B)      new composition of ID parts
    sum_above          sum(value > k)                         new composition of ID parts
    parity_sum_diff    sum(odd) - sum(even)                   new composition of ID parts

Every part of a composition family occurs in some ID family; only the combination is new.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Card = tuple[str, int]


@dataclass(frozen=True)
class Selector:
    """Which cards a rule looks at. `kind` is color | above | odd | even; `arg` is the colour or k."""

    kind: Literal["color", "above", "odd", "even"]
    arg: str | int | None = None

    def selects(self, card: Card) -> bool:
        color, value = card
        if self.kind == "color":
            return color == self.arg
        if self.kind == "above":
            return value > self.arg  # type: ignore[operator]
        if self.kind == "odd":
            return value % 2 == 1
        if self.kind == "even":
            return value % 2 == 0
        raise ValueError(f"unknown selector kind {self.kind!r}")

    @property
    def tag(self) -> str:
        """The word naming this selection in worked answers (`RED 3 7 = 10`)."""
        return {"color": str(self.arg), "above": "HIGH", "odd": "ODD", "even": "EVEN"}[self.kind]


@dataclass(frozen=True)
class Rule:
    family: str
    aggregate: Literal["sum", "count"]
    a: Selector
    b: Selector | None = None  # set iff the rule is a difference

    @property
    def combine(self) -> str:
        return "single" if self.b is None else "diff"

    @property
    def selectors(self) -> tuple[Selector, ...]:
        return (self.a,) if self.b is None else (self.a, self.b)

    def to_dict(self) -> dict:
        return {"family": self.family, "aggregate": self.aggregate,
                "a": [self.a.kind, self.a.arg], "b": None if self.b is None else [self.b.kind, self.b.arg]}

    @staticmethod
    def from_dict(d: dict) -> "Rule":
        b = None if d["b"] is None else Selector(d["b"][0], d["b"][1])
        return Rule(d["family"], d["aggregate"], Selector(d["a"][0], d["a"][1]), b)


@dataclass(frozen=True)
class Family:
    name: str
    aggregate: Literal["sum", "count"]
    selectors: tuple[str, ...]  # selector kinds: ("color", "color"), ("above",), ("odd", "even")

    def sample(self, rng: random.Random, colors: list[str], thresholds: list[int]) -> Rule:
        """A rule of this family with its parameters drawn from `colors` / `thresholds`."""
        if self.selectors == ("color", "color"):
            a, b = rng.sample(colors, 2)
            return Rule(self.name, self.aggregate, Selector("color", a), Selector("color", b))
        if self.selectors == ("above",):
            return Rule(self.name, self.aggregate, Selector("above", rng.choice(thresholds)))
        if self.selectors == ("odd", "even"):
            return Rule(self.name, self.aggregate, Selector("odd"), Selector("even"))
        raise ValueError(f"family {self.name}: no sampler for selectors {self.selectors}")


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("color_sum_diff", "sum", ("color", "color")),
    Family("count_above", "count", ("above",)),
    Family("parity_count_diff", "count", ("odd", "even")),
    Family("color_count_diff", "count", ("color", "color")),
    Family("sum_above", "sum", ("above",)),
    Family("parity_sum_diff", "sum", ("odd", "even")),
]}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        import difflib

        close = difflib.get_close_matches(name, list(FAMILIES), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise KeyError(f"unknown rule family {name!r}{hint}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


@dataclass(frozen=True)
class Score:
    """A rule applied to cards: the answer and the intermediate results (the rich labels)."""

    masks: tuple[tuple[int, ...], ...]  # per selector: 1 where the card is selected, (n_sel, n_cards)
    selected: tuple[tuple[int, ...], ...]  # per selector: the selected values, in card order
    partials: tuple[int, ...]  # per selector: its aggregate
    score: int


def apply_rule(rule: Rule, cards: list[Card]) -> Score:
    """Ground truth: select, aggregate, combine."""
    masks, selected, partials = [], [], []
    for sel in rule.selectors:
        mask = tuple(int(sel.selects(c)) for c in cards)
        vals = tuple(v for (c, v), m in zip(cards, mask) if m)
        masks.append(mask)
        selected.append(vals)
        partials.append(sum(vals) if rule.aggregate == "sum" else len(vals))
    score = partials[0] if rule.b is None else partials[0] - partials[1]
    return Score(tuple(masks), tuple(selected), tuple(partials), score)
