"""Reproducible card-game datasets: ID train/val/test and one OOD test set per shift.

Each split is drawn from a `SplitSpec` (families, colours, card counts, phrasings, question).
The OOD specs are the ID spec with exactly one field replaced, so each OOD set differs from the
training data in exactly one way (a test checks this by construction):

    ood_colors       colours never seen in training (cards and rule text)
    ood_composition  rule families that recombine ID rule parts
    ood_paraphrase   held-out rule phrasings
    ood_length       longer card lists (length shift, kept apart from rule shifts)
    ood_bigsmall     the BIG/SMALL question instead of the score

Every example carries its rich labels for analysis: the rule's parts, the selected-card masks,
per-selector partial results, per-colour sums, the total of all values, the score, BIG/SMALL.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace

from datasets import Dataset, DatasetDict

from mechrl.config import CardsTaskConfig
from mechrl.tasks.cards.formatting import (
    ID_PHRASINGS, OOD_PHRASINGS, TEMPLATES, format_answer, format_prompt,
)
from mechrl.tasks.cards.rules import FAMILIES, Card, apply_rule

ID_SPLITS = ("train", "val", "test")
OOD_SPLITS = ("ood_colors", "ood_composition", "ood_paraphrase", "ood_length", "ood_bigsmall")
EVAL_SPLITS = ("test",) + OOD_SPLITS


@dataclass(frozen=True)
class Palette:
    """The colours of a split: those cards are drawn in, and those rules name (a subset)."""

    cards: tuple[str, ...]
    rule: tuple[str, ...]


@dataclass(frozen=True)
class SplitSpec:
    """The distribution one split is drawn from."""

    families: tuple[str, ...]
    colors: Palette
    n_cards: tuple[int, int]  # inclusive range
    phrasings: tuple[str, ...]  # "id0", "ood1", ...
    templates: tuple[str, ...]
    question: str  # score | bigsmall


def id_spec(cfg: CardsTaskConfig) -> SplitSpec:
    return SplitSpec(
        families=tuple(cfg.id_families), colors=Palette(tuple(cfg.id_colors), tuple(cfg.id_rule_colors or cfg.id_colors)), n_cards=(cfg.min_cards, cfg.max_cards),
        phrasings=tuple(f"id{i}" for i in range(len(ID_PHRASINGS))), templates=TEMPLATES, question="score",
    )


def split_specs(cfg: CardsTaskConfig) -> dict[str, SplitSpec]:
    """Every split's spec; each OOD spec replaces exactly one field of the ID spec."""
    base = id_spec(cfg)
    specs = {s: base for s in ID_SPLITS}
    specs["ood_colors"] = replace(base, colors=Palette(tuple(cfg.ood_colors), tuple(cfg.ood_colors)))
    if cfg.composition_families:
        specs["ood_composition"] = replace(base, families=tuple(cfg.composition_families))
    specs["ood_paraphrase"] = replace(base, phrasings=tuple(f"ood{i}" for i in range(len(OOD_PHRASINGS))))
    specs["ood_length"] = replace(base, n_cards=(cfg.ood_min_cards, cfg.ood_max_cards))
    specs["ood_bigsmall"] = replace(base, question="bigsmall")
    return specs


def phrasing(name: str):
    table = ID_PHRASINGS if name.startswith("id") else OOD_PHRASINGS
    return table[int(name[3:] if name.startswith("ood") else name[2:])]


def make_example(rng: random.Random, spec: SplitSpec, cfg: CardsTaskConfig, all_colors: list[str],
                 family_weights: dict[str, float] | None = None) -> dict:
    """One example with its prompt, target completion, gold answer and rich labels."""
    if family_weights:
        family = FAMILIES[rng.choices(spec.families, [family_weights.get(f, 1.0) for f in spec.families])[0]]
    else:
        family = FAMILIES[rng.choice(spec.families)]
    rule = family.sample(rng, list(spec.colors.rule), cfg.thresholds)
    n = rng.randint(*spec.n_cards)
    cards: list[Card] = [(rng.choice(spec.colors.cards), rng.randint(0, cfg.max_value)) for _ in range(n)]
    result = apply_rule(rule, cards)
    ph_name, template = rng.choice(spec.phrasings), rng.choice(spec.templates)
    prompt = format_prompt(phrasing(ph_name).rule_text(rule), cards, template, spec.question, cfg.big_threshold)
    completion, answer = format_answer(rule, result, cfg.answer_format, spec.question, cfg.big_threshold)
    zeros = (0,) * n
    ex = {
        "prompt": prompt, "completion": completion, "answer": answer,
        "family": rule.family, "aggregate": rule.aggregate, "combine": rule.combine,
        "rule": json.dumps(rule.to_dict()),
        "sel_a": rule.a.tag, "sel_b": rule.b.tag if rule.b else "",
        "threshold": int(rule.a.arg) if rule.a.kind == "above" else -1,
        "phrasing": ph_name, "template": template, "question": spec.question, "answer_format": cfg.answer_format,
        "cards_colors": [c for c, _ in cards], "cards_values": [v for _, v in cards], "n_cards": n,
        "mask_a": list(result.masks[0]), "mask_b": list(result.masks[1] if rule.b else zeros),
        "partial_a": result.partials[0], "partial_b": result.partials[1] if rule.b else 0,
        "score": result.score, "big": result.score >= cfg.big_threshold, "total": sum(v for _, v in cards),
    }
    for c in all_colors:
        ex[f"sum_{c}"] = sum(v for col, v in cards if col == c)
    return ex


def generate_split(name: str, n: int, cfg: CardsTaskConfig, exclude_prompts: set[str] | None = None) -> list[dict]:
    """`n` examples of split `name`, from an RNG seeded by (data_seed, split): reproducible, and
    each split independent of the others' sizes. Prompts in `exclude_prompts` are redrawn."""
    spec = split_specs(cfg)[name]
    rng = random.Random(f"cards-{cfg.data_seed}-{name}")
    all_colors = list(cfg.id_colors) + list(cfg.ood_colors)
    out, seen = [], set(exclude_prompts or ())
    tries = 0
    while len(out) < n:
        ex = make_example(rng, spec, cfg, all_colors, cfg.train_family_weights if name == "train" else None)
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(f"split {name}: could only draw {len(out)} of {n} distinct examples; "
                               "the spec's example space is too small for the requested size")
        if ex["prompt"] in seen and name != "train":
            continue
        if name != "train":
            seen.add(ex["prompt"])
        ex["split"] = name
        out.append(ex)
    return out


def build_datasets(cfg: CardsTaskConfig) -> DatasetDict:
    """All splits as Hugging Face Datasets. Val prompts never occur in train, test prompts in neither."""
    train = generate_split("train", cfg.n_train, cfg)
    held_out = {ex["prompt"] for ex in train}
    sizes = {"val": cfg.n_val, "test": cfg.n_test, **{s: cfg.n_ood for s in OOD_SPLITS}}
    splits = {"train": train}
    for name in ("val", "test") + OOD_SPLITS:
        if name in split_specs(cfg):
            splits[name] = generate_split(name, sizes[name], cfg, exclude_prompts=held_out)
            if name == "val":  # test prompts also differ from val prompts
                held_out |= {ex["prompt"] for ex in splits[name]}
    return DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()})
