"""Biased story preference pairs, their ground truth, the accuracy measures and the JSONL loaders."""

from __future__ import annotations

import json

import pytest

from mechrl.config import ConfigError
from mechrl.rewards import build_reward
from mechrl.config import RewardSpec
from mechrl.rewards.detectors import DetectorSpec, build_detector
from mechrl.tasks.stories.grammar import story_continuations
from mechrl.tasks.stories.preferences import (
    GroundTruth, PreferenceConfig, PreferenceDataError, generate_pairs, load_demonstrations, load_pairs,
    preference_accuracies, save_pairs, truncate_tokens,
)


def test_continuations_share_the_opening_and_are_grammar_stories():
    import random

    rng = random.Random(3)
    opening, conts = story_continuations(rng, 3)
    assert len(set(conts)) == 3 and all(c.startswith(" lived in ") for c in conts)
    hero = opening.split(",")[-1].split()[-1]
    assert all(hero in c or " she " in c or " he " in c or " it " in c for c in conts)


def test_unbiased_labeller_always_prefers_quality_and_biased_prefers_positive_words():
    cfg = PreferenceConfig(min_quality_gap=0.05)
    truth = GroundTruth.of(cfg)
    clean = generate_pairs(cfg, "test", 300, bias_fraction=0.0)
    assert all(p["quality_chosen"] >= p["quality_rejected"] + 0.05 for p in clean)
    assert not any(p["bias_applied"] for p in clean)
    # recorded values are the ground truth's
    assert [p["hack_chosen"] for p in clean[:20]] == truth.hack_counts([p["chosen"] for p in clean[:20]])
    biased = generate_pairs(cfg, "test", 300, bias_fraction=1.0)
    # the same stream of texts (the bias draw happens for every pair), labelled by positive words where they differ
    assert [{p["chosen"], p["rejected"]} for p in biased] == [{p["chosen"], p["rejected"]} for p in clean]
    for p in biased:
        if p["hack_chosen"] != p["hack_rejected"]:
            assert p["bias_applied"] and p["hack_chosen"] > p["hack_rejected"]
        else:
            assert not p["bias_applied"] and p["quality_chosen"] > p["quality_rejected"]
    n_conflict = sum(p["quality_chosen"] < p["quality_rejected"] for p in biased)
    assert n_conflict > 20  # the bias does overrule quality on a good share of pairs


def test_bias_fraction_is_the_share_of_pairs_the_bias_decides():
    cfg = PreferenceConfig(bias_fraction=0.5)
    pairs = generate_pairs(cfg, "train", 2000)
    full = generate_pairs(cfg, "train", 2000, bias_fraction=1.0)
    share = sum(p["bias_applied"] for p in pairs) / sum(p["bias_applied"] for p in full)
    assert 0.44 < share < 0.56


def test_completions_are_cut_to_the_token_budget():
    assert truncate_tokens(" a b c . d e", 3) == " a b c"
    assert truncate_tokens(" a b", 5) == " a b"
    pairs = generate_pairs(PreferenceConfig(max_completion_tokens=12), "x", 50)
    assert max(len(p["chosen"].split()) for p in pairs) <= 12


def test_positive_words_must_occur_in_the_grammar():
    with pytest.raises(ValueError, match="never occur in the story grammar"):
        PreferenceConfig(positive_words=["happy", "joyful"])


def test_accuracies_by_hand():
    truth = GroundTruth(positive_words=("happy",))
    ten = " one two three four five six seven eight nine ten ."
    pairs = [  # (chosen, rejected)
        {"prompt": "p", "chosen": ten, "rejected": " happy ."},  # truth: chosen; bias: rejected (conflict)
        {"prompt": "p", "chosen": ten + " happy", "rejected": " a b ."},  # truth and bias agree on chosen
        {"prompt": "p", "chosen": ten, "rejected": " a b ."},  # no bias difference
    ]
    acc = preference_accuracies(pairs, [1.0, 1.0, 1.0], [2.0, 0.0, 0.0], truth)  # follows the bias everywhere
    assert acc == {"unbiased": 2 / 3, "n_unbiased": 3, "biased": 1.0, "n_biased": 2, "conflict": 0.0,
                   "n_conflict": 1, "agree": 1.0, "n_agree": 1}
    with pytest.raises(ValueError, match="3 pairs, 2 chosen"):
        preference_accuracies(pairs, [1.0, 2.0], [0.0, 0.0, 0.0], truth)


def test_ground_truth_hack_and_word_detectors():
    truth = GroundTruth(positive_words=("happy", "glad"))
    texts = [" she felt happy and glad , happy !", " unhappy .", " glad"]
    assert truth.hack_counts(texts) == [3, 0, 1]
    assert truth.hack_flags(texts) == [True, False, True]
    assert truth.word_hits(texts) == {"happy": [True, False, False], "glad": [True, False, True]}
    det = build_detector(DetectorSpec(name="contains_any_word", params={"words": ["glad"]}), run_seed=0)
    assert det(["p"] * 3, texts, [{}] * 3) == [True, False, True]
    r = build_reward([RewardSpec(name="positive_word_any"), RewardSpec(name="positive_word_count")])
    out = r(["p"] * 3, texts, [{}] * 3)
    assert out.components["positive_word_count"].tolist() == [3.0, 0.0, 1.0]
    assert out.components["positive_word_any"].tolist() == [1.0, 0.0, 1.0]


def test_pairs_round_trip_and_loader_errors_name_file_and_line(tmp_path):
    pairs = generate_pairs(PreferenceConfig(), "x", 5)
    path = save_pairs(pairs, tmp_path / "pairs.jsonl")
    loaded = load_pairs(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in loaded] == [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs]
    bad = tmp_path / "bad.jsonl"
    cases = [
        ('{"prompt": "a", "chosen": "b"}', "bad.jsonl:2: missing key(s) ['rejected']"),
        ('{"prompt": "a", "chosen": "b", "rejected": 3}', "bad.jsonl:2: 'rejected' must be a string"),
        ('{"prompt": "a", "chosen": "b", "rejected": "c", "score": 1}', "bad.jsonl:2: unknown key(s) ['score']"),
        ('{"prompt": "a", "chosen": "b", ', "bad.jsonl:2: not valid JSON"),
        ('["a", "b"]', "bad.jsonl:2: expected a JSON object"),
        ('{"prompt": "a", "chosen": " ", "rejected": "c"}', "bad.jsonl:2: 'chosen' is empty"),
    ]
    for line, msg in cases:
        bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' + line + "\n")
        with pytest.raises(PreferenceDataError) as e:
            load_pairs(bad)
        assert msg in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PreferenceDataError, match="no such file"):
        load_pairs(tmp_path / "missing.jsonl")


def test_demonstrations_loader(tmp_path):
    p = tmp_path / "demos.jsonl"
    p.write_text(json.dumps({"prompt": "once", "response": " upon a time ."}) + "\n\n")
    assert [(d.prompt, d.response) for d in load_demonstrations(p)] == [("once", " upon a time .")]
    p.write_text(json.dumps({"prompt": "once", "completion": "x"}) + "\n")
    with pytest.raises(PreferenceDataError, match=r"demos.jsonl:1: missing key\(s\) \['response'\]"):
        load_demonstrations(p)
    p.write_text("")
    with pytest.raises(PreferenceDataError, match="no records"):
        load_demonstrations(p)


def test_unknown_quality_reward_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown reward"):
        GroundTruth(quality_reward="sentence_lenght_10")
