"""The card game: rules against hand-worked examples, label consistency, one shift per OOD set,
strict parsing, tokenizer round trip."""

from __future__ import annotations

import json

import pytest

from mechrl.config import CardsTaskConfig
from mechrl.tasks.cards.dataset import ID_SPLITS, OOD_SPLITS, id_spec, split_specs
from mechrl.tasks.cards.formatting import format_answer, parse_answer, worked_steps
from mechrl.tasks.cards.rules import Rule, Selector, apply_rule

CARDS = [("RED", 3), ("BLUE", 5), ("RED", 7), ("GREEN", 2), ("BLUE", 9)]


@pytest.mark.parametrize("rule, score, partials", [
    # RED: 3+7=10, BLUE: 5+9=14 -> -4
    (Rule("color_sum_diff", "sum", Selector("color", "RED"), Selector("color", "BLUE")), -4, (10, 14)),
    # values above 4: 5, 7, 9 -> 3
    (Rule("count_above", "count", Selector("above", 4)), 3, (3,)),
    # odd: 3,5,7,9 -> 4 ; even: 2 -> 1 ; 4 - 1 = 3
    (Rule("parity_count_diff", "count", Selector("odd"), Selector("even")), 3, (4, 1)),
    # RED count 2, GREEN count 1 -> 1
    (Rule("color_count_diff", "count", Selector("color", "RED"), Selector("color", "GREEN")), 1, (2, 1)),
    # sum above 6: 7 + 9 = 16
    (Rule("sum_above", "sum", Selector("above", 6)), 16, (16,)),
    # odd sum 24, even sum 2 -> 22
    (Rule("parity_sum_diff", "sum", Selector("odd"), Selector("even")), 22, (24, 2)),
    # a colour absent from the cards selects nothing
    (Rule("color_sum_diff", "sum", Selector("color", "YELLOW"), Selector("color", "RED")), -10, (0, 10)),
])
def test_rule_families_by_hand(rule, score, partials):
    r = apply_rule(rule, CARDS)
    assert r.score == score
    assert r.partials == partials


def test_worked_answer_by_hand():
    rule = Rule("color_sum_diff", "sum", Selector("color", "RED"), Selector("color", "BLUE"))
    r = apply_rule(rule, CARDS)
    assert worked_steps(rule, r) == "RED 3 7 = 10 ; BLUE 5 9 = 14 ; 10 - 14 = -4"
    assert format_answer(rule, r, "direct", "score", 1) == (" -4", "-4")
    assert format_answer(rule, r, "worked", "bigsmall", 1)[1] == "SMALL"
    single = Rule("count_above", "count", Selector("above", 4))
    assert worked_steps(single, apply_rule(single, CARDS)) == "HIGH 5 7 9 = 3"
    empty = Rule("count_above", "count", Selector("above", 8))
    assert worked_steps(empty, apply_rule(empty, [("RED", 1)])) == "HIGH = 0"


def test_running_answer_by_hand():
    rule = Rule("color_sum_diff", "sum", Selector("color", "RED"), Selector("color", "BLUE"))
    r = apply_rule(rule, CARDS)
    assert worked_steps(rule, r, running=True) == "RED 3 7 = 3 10 ; BLUE 5 9 = 5 14 ; 10 - 14 = -4"
    assert format_answer(rule, r, "running", "score", 1) == (" RED 3 7 = 3 10 ; BLUE 5 9 = 5 14 ; 10 - 14 = -4", "-4")
    assert format_answer(rule, r, "running", "bigsmall", 1)[0].endswith("10 - 14 = -4 ; SMALL")
    single = Rule("count_above", "count", Selector("above", 4))
    assert worked_steps(single, apply_rule(single, CARDS), running=True) == "HIGH 5 7 9 = 1 2 3"
    empty = Rule("count_above", "count", Selector("above", 8))
    assert worked_steps(empty, apply_rule(empty, [("RED", 1)]), running=True) == "HIGH = 0"


def test_every_running_completion_parses_to_its_answer(small_cards_cfg):
    from mechrl.tasks import build_task

    task = build_task(small_cards_cfg.model_copy(update={"answer_format": "running"}))
    for split, ds in task.datasets.items():
        for i in range(min(len(ds), 200)):
            ex = ds[i]
            parsed = parse_answer(ex["completion"], "running", ex["question"])
            assert (parsed.answer, parsed.format_error) == (ex["answer"], False), (split, ex["completion"])


def test_labels_consistent_with_answer(cards_task, small_cards_cfg):
    for split, ds in cards_task.datasets.items():
        for ex in ds.select(range(min(200, len(ds)))):
            cards = list(zip(ex["cards_colors"], ex["cards_values"]))
            rule = Rule.from_dict(json.loads(ex["rule"]))
            r = apply_rule(rule, cards)
            assert ex["score"] == r.score
            assert ex["n_cards"] == len(cards)
            assert ex["total"] == sum(ex["cards_values"])
            assert ex["big"] == (ex["score"] >= small_cards_cfg.big_threshold)
            for c in small_cards_cfg.id_colors + small_cards_cfg.ood_colors:
                assert ex[f"sum_{c}"] == sum(v for col, v in cards if col == c)
            # masks select exactly the values in the partial results
            sel_a = [v for v, m in zip(ex["cards_values"], ex["mask_a"]) if m]
            expect_a = sum(sel_a) if ex["aggregate"] == "sum" else len(sel_a)
            assert ex["partial_a"] == expect_a
            if ex["combine"] == "diff":
                sel_b = [v for v, m in zip(ex["cards_values"], ex["mask_b"]) if m]
                assert ex["partial_b"] == (sum(sel_b) if ex["aggregate"] == "sum" else len(sel_b))
                assert ex["score"] == ex["partial_a"] - ex["partial_b"]
            else:
                assert ex["score"] == ex["partial_a"] and not any(ex["mask_b"])
            # the gold answer is what the strict parser reads from the gold completion
            assert parse_answer(ex["completion"], ex["answer_format"], ex["question"]).answer == ex["answer"]
            if ex["question"] == "score":
                assert ex["answer"] == str(ex["score"])
            else:
                assert ex["answer"] == ("BIG" if ex["big"] else "SMALL")


def _rule_colors(ds) -> set[str]:
    """Colours the rules name."""
    out = set()
    for r in ds["rule"]:
        rule = json.loads(r)
        out |= {part[1] for part in (rule["a"], rule["b"]) if part is not None and part[0] == "color"}
    return out


def _attributes(ds) -> dict[str, set]:
    """What a split's examples look like along each axis a shift can move."""
    return {
        "families": set(ds["family"]),
        "colors": {c for cs in ds["cards_colors"] for c in cs} | _rule_colors(ds),
        "n_cards": set(ds["n_cards"]),
        "phrasings": set(ds["phrasing"]),
        "question": set(ds["question"]),
    }


EXPECTED_SHIFT = {"ood_colors": "colors", "ood_composition": "families", "ood_paraphrase": "phrasings",
                  "ood_length": "n_cards", "ood_bigsmall": "question"}


def test_each_ood_split_differs_in_exactly_its_shift(cards_task):
    train = _attributes(cards_task.datasets["train"])
    for split in OOD_SPLITS:
        attrs = _attributes(cards_task.datasets[split])
        for axis, values in attrs.items():
            if axis == EXPECTED_SHIFT[split]:
                assert values.isdisjoint(train[axis]), f"{split}: {axis} overlaps training: {values & train[axis]}"
            else:
                assert values <= train[axis], f"{split}: {axis} has values unseen in training: {values - train[axis]}"
    # the ID test split differs from training in nothing
    for axis, values in _attributes(cards_task.datasets["test"]).items():
        assert values <= train[axis]


def test_specs_replace_one_field_each():
    cfg = CardsTaskConfig()
    base, specs = id_spec(cfg), split_specs(cfg)
    for split in ID_SPLITS:
        assert specs[split] == base
    for split in OOD_SPLITS:
        changed = [f for f in base.__dataclass_fields__ if getattr(base, f) != getattr(specs[split], f)]
        assert len(changed) == 1, f"{split} changes {changed}"


def test_rule_text_of_colour_split_uses_new_colours(cards_task, small_cards_cfg):
    for ex in cards_task.datasets["ood_colors"].select(range(50)):
        rule_line = ex["prompt"].split("\n")[0]
        assert not any(c in rule_line.split() for c in small_cards_cfg.id_colors)


def test_splits_reproducible_and_disjoint(small_cards_cfg, cards_task):
    from mechrl.tasks.cards.dataset import build_datasets

    again = build_datasets(small_cards_cfg)
    for split in again:
        assert list(again[split]["prompt"]) == list(cards_task.datasets[split]["prompt"])
    train = set(cards_task.datasets["train"]["prompt"])
    val = set(cards_task.datasets["val"]["prompt"])
    assert not (set(cards_task.datasets["test"]["prompt"]) & (train | val))
    assert not (val & train)
    other = build_datasets(small_cards_cfg.model_copy(update={"data_seed": 99}))
    assert list(other["test"]["prompt"]) != list(cards_task.datasets["test"]["prompt"])


@pytest.mark.parametrize("text, fmt, question, answer", [
    (" 5", "direct", "score", "5"),
    ("-12", "direct", "score", "-12"),
    ("  7  ", "direct", "score", "7"),  # whitespace at the ends is ignored
    (" 05", "direct", "score", None),  # leading zero
    (" 5 5", "direct", "score", None),
    (" five", "direct", "score", None),
    ("", "direct", "score", None),
    (" -", "direct", "score", None),
    (" 5.", "direct", "score", None),
    (" RED 3 7 = 10 ; BLUE 5 = 5 ; 10 - 5 = 5", "worked", "score", "5"),
    (" RED = 0 ; BLUE 5 = 5 ; 0 - 5 = -5", "worked", "score", "-5"),
    (" HIGH 7 9 = 2", "worked", "score", "2"),
    (" HIGH 7 9 = 2 ;", "worked", "score", None),  # trailing separator
    (" RED 3 7 = 10 ; BLUE 5 = 5 ; 10 - 5 =", "worked", "score", None),  # truncated
    (" RED 3 7 =  10", "worked", "score", None),  # double space inside
    (" RED 3 17 = 20", "worked", "score", None),  # card values are single digits
    (" 5", "worked", "score", None),  # a direct answer is not a worked one
    (" BIG", "direct", "bigsmall", "BIG"),
    (" SMALL", "direct", "bigsmall", "SMALL"),
    (" big", "direct", "bigsmall", None),
    (" HIGH 7 9 = 2 ; BIG", "worked", "bigsmall", "BIG"),
    (" RED 3 7 = 3 10 ; BLUE 5 = 5 ; 10 - 5 = 5", "running", "score", "5"),
    (" HIGH 7 9 = 1 2", "running", "score", "2"),
    (" HIGH = 0", "running", "score", "0"),
    (" HIGH 7 9 = 1 2 ; SMALL", "running", "bigsmall", "SMALL"),
    (" HIGH 7 9 =", "running", "score", None),  # no total
    (" RED 3 7 = 3 10 ; BLUE 5 = 5 ; 10 - 5 =", "running", "score", None),  # truncated
    (" RED 3 7 = 3 10 ;", "running", "score", None),  # trailing separator
    (" HIGH 7 9 = 2", "worked", "bigsmall", None),
])
def test_parser_edge_cases(text, fmt, question, answer):
    p = parse_answer(text, fmt, question)
    assert p.answer == answer
    assert p.format_error == (answer is None)


def test_malformed_counts_as_wrong_and_format_error(cards_task):
    ex = cards_task.datasets["test"][0]
    j = cards_task.judge(" garbage", ex)
    assert not j.correct and j.format_error and j.answer is None
    j = cards_task.judge(ex["completion"], ex)
    assert j.correct and not j.format_error


def test_tokenizer_round_trip_and_special_ids(cards_task, cards_tok):
    assert (cards_tok.unk_token_id, cards_tok.eos_token_id, cards_tok.pad_token_id) == (0, 1, 2)
    assert cards_tok.bos_token is None
    for split in cards_task.datasets:
        for ex in cards_task.datasets[split].select(range(20)):
            text = ex["prompt"] + ex["completion"]
            ids = cards_tok(text, add_special_tokens=False)["input_ids"]
            assert cards_tok.unk_token_id not in ids, f"{split}: out-of-vocabulary text in {text!r}"
            assert cards_tok.decode(ids) == text
    # numbers are split into digits
    assert cards_tok.convert_ids_to_tokens(cards_tok(" 10", add_special_tokens=False)["input_ids"]) == [" 1", "0"]


def test_unknown_rule_family_is_refused():
    from mechrl.config import ConfigError, build_task_config

    with pytest.raises(ConfigError, match="did you mean 'color_sum_diff'"):
        build_task_config({"name": "cards", "id_families": ["color_sum_dif"]})


def test_id_rules_name_only_the_rule_colours(cards_task, small_cards_cfg):
    train = cards_task.datasets["train"]
    assert _rule_colors(train) == set(small_cards_cfg.id_rule_colors)
    assert {c for cs in train["cards_colors"] for c in cs} == set(small_cards_cfg.id_colors)
    with pytest.raises(ValueError, match="id_rule_colors"):
        CardsTaskConfig(id_rule_colors=["RED", "PINK"])


def test_train_family_weights_shift_only_the_train_split():
    from collections import Counter

    from mechrl.tasks.cards.dataset import build_datasets

    cfg = CardsTaskConfig(n_train=3000, n_val=50, n_test=600, n_ood=20,
                          train_family_weights={"color_sum_diff": 2.0})
    ds = build_datasets(cfg)
    train = Counter(ds["train"]["family"])
    assert abs(train["color_sum_diff"] / 3000 - 0.5) < 0.04, train  # 2 / (2 + 1 + 1)
    test = Counter(ds["test"]["family"])
    assert abs(test["color_sum_diff"] / 600 - 1 / 3) < 0.06, test
    with pytest.raises(ValueError, match="not ID families"):
        CardsTaskConfig(train_family_weights={"sum_above": 2.0})
