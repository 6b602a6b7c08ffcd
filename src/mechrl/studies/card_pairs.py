"""Clean/corrupted prompt pairs from the card game, for `patching`.

    rule_pairs      same cards, phrasing and layout; a different rule of the same family (the two
                    colours swapped, or another threshold), so the answers differ. Only pairs whose
                    prompts tokenize to the same length are kept: every position aligns.
    ood_pairs       an ID prompt and its OOD counterpart with the same hand and rule:
                      ood_colors      every ID colour replaced by an OOD colour (a fixed bijection)
                      ood_paraphrase  the rule in a held-out phrasing
                    Colour pairs keep equal lengths when colour names are one token each (checked, and
                    pairs that do not are skipped); paraphrases usually differ in length and align from
                    the end (see `patching`).

Rules are drawn from the ID families, or from `families` when given (e.g. only colour rules).
Each generator returns (pairs, counts) where counts say how many candidates were drawn and why some
were skipped. Examples are drawn from the ID spec with their own RNG (`cards-pairs-{seed}-{kind}`), so
pair sets are reproducible and independent of the task's splits.

    pairs, counts = rule_pairs(cfg, tok, n=64)
    pb = tokenize_pairs(pairs, tok)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from mechrl.analysis.patching import PromptPair
from mechrl.config import CardsTaskConfig
from mechrl.tasks.cards.dataset import id_spec, phrasing
from mechrl.tasks.cards.formatting import OOD_PHRASINGS, format_answer, format_prompt
from mechrl.tasks.cards.rules import FAMILIES, Card, Rule, Selector, apply_rule


def render(rule: Rule, cards: list[Card], ph_name: str, template: str, cfg: CardsTaskConfig,
           question: str = "score") -> dict:
    """Prompt, completion and answer of one hand under one rule, as `make_example` writes them."""
    prompt = format_prompt(phrasing(ph_name).rule_text(rule), cards, template, question, cfg.big_threshold)
    completion, answer = format_answer(rule, apply_rule(rule, cards), cfg.answer_format, question, cfg.big_threshold)
    return {"prompt": prompt, "completion": completion, "answer": answer, "rule": rule.to_dict(),
            "cards": [list(c) for c in cards], "phrasing": ph_name, "template": template}


def _draw(rng: random.Random, cfg: CardsTaskConfig, families: Sequence[str] | None) -> tuple[Rule, list[Card], str, str]:
    spec = id_spec(cfg)
    pool = list(spec.families) if families is None else list(families)
    unknown = [f for f in pool if f not in FAMILIES]
    if unknown or not pool:
        raise ValueError(f"pair families {pool}: unknown {unknown}; known: {sorted(FAMILIES)}")
    rule = FAMILIES[rng.choice(pool)].sample(rng, list(spec.colors.rule), cfg.thresholds)
    n = rng.randint(*spec.n_cards)
    cards = [(rng.choice(spec.colors.cards), rng.randint(0, cfg.max_value)) for _ in range(n)]
    return rule, cards, rng.choice(spec.phrasings), rng.choice(spec.templates)


def other_rule(rule: Rule, rng: random.Random, cfg: CardsTaskConfig) -> Rule | None:
    """A different rule of the same family with the same number of words, or None (parity families
    have no free parameter)."""
    if rule.a.kind == "color" and rule.b is not None and rule.b.kind == "color":
        return replace(rule, a=rule.b, b=rule.a)
    if rule.a.kind == "above":
        ks = [k for k in cfg.thresholds if k != rule.a.arg]
        return replace(rule, a=Selector("above", rng.choice(ks))) if ks else None
    return None


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _collect(n: int, make, kind: str, seed: int, max_tries: int | None) -> tuple[list[PromptPair], dict]:
    rng = random.Random(f"cards-pairs-{seed}-{kind}")
    pairs, counts = [], {"drawn": 0}
    limit = max_tries if max_tries is not None else 50 * n + 100
    while len(pairs) < n:
        if counts["drawn"] >= limit:
            raise RuntimeError(f"{kind} pairs: only {len(pairs)} of {n} after {limit} draws (skipped: {counts})")
        counts["drawn"] += 1
        made = make(rng)
        if isinstance(made, str):
            counts[made] = counts.get(made, 0) + 1
        else:
            pairs.append(made)
    counts["kept"] = len(pairs)
    return pairs, counts


def rule_pairs(cfg: CardsTaskConfig, tokenizer, n: int, *, seed: int = 0, families: Sequence[str] | None = None,
               max_tries: int | None = None) -> tuple[list[PromptPair], dict]:
    """`n` (clean rule A, corrupted rule B) pairs on the same cards with different answers and
    equal prompt lengths in tokens."""
    def make(rng):
        rule, cards, ph, tpl = _draw(rng, cfg, families)
        other = other_rule(rule, rng, cfg)
        if other is None:
            return "skipped_no_other_rule"
        a, b = render(rule, cards, ph, tpl, cfg), render(other, cards, ph, tpl, cfg)
        if a["answer"] == b["answer"]:
            return "skipped_same_answer"
        if _n_tokens(tokenizer, a["prompt"]) != _n_tokens(tokenizer, b["prompt"]):
            return "skipped_length"
        return PromptPair(a["prompt"], b["prompt"], a["completion"], b["completion"],
                          {"kind": "rule", "family": rule.family, "clean": a, "corrupt": b})
    return _collect(n, make, "rule", seed, max_tries)


def ood_pairs(cfg: CardsTaskConfig, tokenizer, n: int, shift: str = "ood_colors", *, seed: int = 0,
              families: Sequence[str] | None = None, max_tries: int | None = None) -> tuple[list[PromptPair], dict]:
    """`n` (clean ID, corrupted OOD) pairs with the same hand and rule; `shift` is ood_colors or
    ood_paraphrase. Colour pairs must tokenize to equal lengths (others are skipped and counted).

    Which metric fits: paraphrase pairs share their gold completion (use `logprob`/`prob`). Colour
    pairs' worked completions differ only where the rule names colours, so `logit_diff` needs
    `families` restricted to colour rules (e.g. ["color_sum_diff"]); otherwise use `logprob`."""
    if shift == "ood_colors":
        if len(cfg.ood_colors) < len(cfg.id_colors):
            raise ValueError(f"ood_colors pairs map each ID colour to an OOD colour: {len(cfg.id_colors)} ID colours "
                             f"but only {len(cfg.ood_colors)} OOD colours")
        to_ood = dict(zip(cfg.id_colors, cfg.ood_colors))

        def move(sel: Selector | None) -> Selector | None:
            return sel if sel is None or sel.kind != "color" else Selector("color", to_ood[sel.arg])

        def make(rng):
            rule, cards, ph, tpl = _draw(rng, cfg, families)
            ood_rule = replace(rule, a=move(rule.a), b=move(rule.b))
            a = render(rule, cards, ph, tpl, cfg)
            b = render(ood_rule, [(to_ood[c], v) for c, v in cards], ph, tpl, cfg)
            if _n_tokens(tokenizer, a["prompt"]) != _n_tokens(tokenizer, b["prompt"]):
                return "skipped_length"
            return PromptPair(a["prompt"], b["prompt"], a["completion"], b["completion"],
                              {"kind": shift, "family": rule.family, "clean": a, "corrupt": b})
    elif shift == "ood_paraphrase":
        def make(rng):
            rule, cards, ph, tpl = _draw(rng, cfg, families)
            a = render(rule, cards, ph, tpl, cfg)
            b = render(rule, cards, f"ood{rng.randrange(len(OOD_PHRASINGS))}", tpl, cfg)
            assert a["completion"] == b["completion"], "a paraphrase changed the gold completion"
            return PromptPair(a["prompt"], b["prompt"], a["completion"], b["completion"],
                              {"kind": shift, "family": rule.family, "clean": a, "corrupt": b})
    else:
        raise ValueError(f"unknown OOD shift {shift!r} for pairs; known: ood_colors, ood_paraphrase")
    return _collect(n, make, shift, seed, max_tries)
