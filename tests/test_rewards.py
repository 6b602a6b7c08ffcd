"""Rewards: the built-ins on hand-worked completions, the weighted total, and every way a reward
can be misconfigured or misbehave raising with the culprit's name."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import mechrl.rewards
import mechrl.rewards.builtin
import mechrl.rewards.registry as registry
from mechrl.config import ConfigError, RewardSpec
from mechrl.rewards import build_reward, get_reward, list_rewards, register_reward

WORKED = {"answer": "5", "answer_format": "worked", "question": "score"}  # RED 3, BLUE 5, RED 7; red minus blue
DIRECT = {"answer": "-2", "answer_format": "direct", "question": "score"}
BIGSMALL = {"answer": "SMALL", "answer_format": "worked", "question": "bigsmall"}

# (completion, example, correct?, parses?)
CASES = [
    (" RED 3 7 = 10 ; BLUE 5 = 5 ; 10 - 5 = 5", WORKED, True, True),
    ("RED 3 7 = 10 ; BLUE 5 = 5 ; 10 - 5 = 5  ", WORKED, True, True),  # whitespace at the ends is fine
    (" RED 3 7 = 10 ; BLUE 5 = 5 ; 10 - 5 = 4", WORKED, False, True),  # wrong arithmetic, well formed
    (" RED 3 7 = 10 ; BLUE 5 = 5 ; 10 - 5 =", WORKED, False, False),  # cut off
    (" 5", WORKED, False, False),  # direct answer where worked is expected
    (" RED 3 7 = 10 ; BLUE 5 = 5 ; 10 - 5 = 5 BLUE", WORKED, False, False),  # trailing junk
    (" -2", DIRECT, True, True),
    (" 2", DIRECT, False, True),
    (" - 2", DIRECT, False, False),
    (" RED 1 = 1 ; BLUE 3 = 3 ; 1 - 3 = -2 ; SMALL", BIGSMALL, True, True),
    (" RED 1 = 1 ; BLUE 3 = 3 ; 1 - 3 = -2 ; BIG", BIGSMALL, False, True),
    (" RED 1 = 1 ; BLUE 3 = 3 ; 1 - 3 = -2", BIGSMALL, False, False),
]


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by a test vanish after it (the built-ins stay visible)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def _call(name, completions, examples=None, **params):
    reward = build_reward([RewardSpec(name=name, params=params)])
    examples = examples or [{}] * len(completions)
    return reward(["prompt"] * len(completions), completions, examples)


def test_builtins_are_registered():
    assert {"cards_correct", "cards_format", "word_count", "contains_word"} <= set(list_rewards())


def test_docstring_examples():
    for mod in (mechrl.rewards, mechrl.rewards.registry, mechrl.rewards.builtin):
        result = doctest.testmod(mod)
        assert result.attempted > 0 and result.failed == 0, mod.__name__


def test_cards_correct_and_format_on_hand_worked_completions():
    comps = [c for c, *_ in CASES]
    exs = [e for _, e, *_ in CASES]
    correct = _call("cards_correct", comps, exs)
    fmt = _call("cards_format", comps, exs, value=0.25)
    assert correct.total.tolist() == [1.0 if ok else 0.0 for *_, ok, _ in CASES]
    assert fmt.total.tolist() == [0.25 if parses else 0.0 for *_, parses in CASES]
    assert _call("cards_format", comps[:1], exs[:1]).total.tolist() == [pytest.approx(0.1)]  # the default


def test_word_rewards():
    comps = ["happy happy, unhappy Happy! happy_ happy", "nothing here", "HAPPY"]
    assert _call("word_count", comps, word="happy").total.tolist() == [3.0, 0.0, 0.0]
    assert _call("word_count", comps, word="happy", ignore_case=True).total.tolist() == [4.0, 0.0, 1.0]
    assert _call("word_count", comps, word="happy", max_count=2).total.tolist() == [2.0, 0.0, 0.0]
    assert _call("contains_word", comps, word="happy").total.tolist() == [1.0, 0.0, 0.0]
    assert _call("contains_word", ["a.b", "axb"], word="a.b").total.tolist() == [1.0, 0.0]  # literal, not a regex
    with pytest.raises(ValueError, match="max_count"):
        _call("word_count", comps, word="happy", max_count=-1)


def test_weighted_total_and_raw_components():
    reward = build_reward([RewardSpec(name="cards_correct", weight=2.0),
                           RewardSpec(name="cards_format", weight=0.5, params={"value": 0.2}),
                           RewardSpec(name="word_count", weight=-1.0, params={"word": "BLUE"})])
    assert reward.names == ["cards_correct", "cards_format", "word_count"]
    comps = [" RED 3 7 = 10 ; BLUE 5 = 5 ; 10 - 5 = 5", " RED 3 7 = 10 ; BLUE 5 = 5 ; 10 - 5 = 4", "BLUE BLUE"]
    out = reward(["p"] * 3, comps, [WORKED] * 3)
    assert out.total.dtype == torch.float32 and out.total.shape == (3,)
    assert out.components["cards_correct"].tolist() == [1.0, 0.0, 0.0]
    assert out.components["cards_format"].tolist() == pytest.approx([0.2, 0.2, 0.0])  # unweighted
    assert out.components["word_count"].tolist() == [1.0, 1.0, 2.0]
    assert out.total.tolist() == pytest.approx([2.0 + 0.1 - 1.0, 0.1 - 1.0, -2.0])


def test_unknown_reward_names_close_matches():
    with pytest.raises(ConfigError, match=r"unknown reward 'cards_corect'.*did you mean 'cards_correct'"):
        get_reward("cards_corect")
    with pytest.raises(ConfigError, match="cards_corect"):
        build_reward([RewardSpec(name="cards_corect")])


def test_unknown_missing_and_mistyped_params():
    with pytest.raises(ConfigError, match=r"reward 'word_count'.*unknown parameter 'wrod'.*did you mean 'word'"):
        build_reward([RewardSpec(name="word_count", params={"wrod": "happy"})])
    with pytest.raises(ConfigError, match=r"reward 'word_count'.*missing parameter 'word'"):
        build_reward([RewardSpec(name="word_count")])
    with pytest.raises(ConfigError, match=r"reward 'cards_correct'.*unknown parameter 'value'.*no parameters"):
        build_reward([RewardSpec(name="cards_correct", params={"value": 1})])
    with pytest.raises(ConfigError, match=r"reward 'word_count'.*parameter 'max_count'"):
        build_reward([RewardSpec(name="word_count", params={"word": "x", "max_count": "many"})])
    with pytest.raises(ConfigError, match=r"reward 'contains_word'.*parameter 'word'"):
        build_reward([RewardSpec(name="contains_word", params={"word": 3})])
    with pytest.raises(ConfigError, match="listed twice"):
        build_reward([RewardSpec(name="cards_correct"), RewardSpec(name="cards_correct")])
    with pytest.raises(ValueError, match="finite number"):  # the schema refuses it (pydantic's ValidationError)
        RewardSpec(name="cards_correct", weight=math.inf)
    spec = RewardSpec.model_construct(name="cards_correct", weight=math.inf, params={})  # past the schema
    with pytest.raises(ConfigError, match="weight must be finite"):
        build_reward([spec])


def test_duplicate_registration_raises(scratch_registry):
    @register_reward("test_dup")
    def first(prompts, completions, examples):
        return [0.0] * len(prompts)

    with pytest.raises(ValueError, match="'test_dup' is already registered"):
        @register_reward("test_dup")
        def second(prompts, completions, examples):
            return [1.0] * len(prompts)

    assert get_reward("test_dup") is first
    with pytest.raises(ValueError, match="already registered"):
        register_reward("cards_correct")(first)
    with pytest.raises(TypeError, match="test_bad_signature"):
        register_reward("test_bad_signature")(lambda completions: [])


@pytest.mark.parametrize("bad, message", [
    (lambda n: [0.0] * (n - 1), r"'test_bad' returned 2 values for 3 completions \(expected 3\)"),
    (lambda n: [0.0] * (n + 1), r"'test_bad' returned 4 values for 3 completions"),
    (lambda n: [0.0, math.nan, 0.0], r"'test_bad' returned a non-finite value at index 1"),
    (lambda n: [0.0, 0.0, -math.inf], r"'test_bad' returned a non-finite value at index 2"),
    (lambda n: [0.0, None, 0.0], r"'test_bad' returned a non-number at index 1"),
    (lambda n: 1.0, r"'test_bad' returned a float"),
    (lambda n: "111", r"'test_bad' returned a str"),
    (lambda n: torch.zeros(n, 1), r"'test_bad' returned an array of shape \(3, 1\)"),
])
def test_misbehaving_reward_raises_with_its_name(scratch_registry, bad, message):
    @register_reward("test_bad")
    def test_bad(prompts, completions, examples):
        return bad(len(prompts))

    reward = build_reward([RewardSpec(name="cards_format"), RewardSpec(name="test_bad")])
    with pytest.raises(ValueError, match=message):
        reward(["p"] * 3, [" 1"] * 3, [DIRECT] * 3)


def test_tensor_outputs_are_accepted(scratch_registry):
    @register_reward("test_tensor")
    def test_tensor(prompts, completions, examples, scale: float = 1.0):
        return torch.arange(len(prompts), dtype=torch.float64) * scale

    out = build_reward([RewardSpec(name="test_tensor", params={"scale": 2})])(["p"] * 3, ["c"] * 3, [{}] * 3)
    assert out.total.tolist() == [0.0, 2.0, 4.0] and out.total.dtype == torch.float32


def test_unequal_inputs_raise():
    reward = build_reward([RewardSpec(name="cards_correct")])
    with pytest.raises(ValueError, match="2 completions for 3 prompts"):
        reward(["p"] * 3, [" 5"] * 2, [WORKED] * 3)
    with pytest.raises(ValueError, match="1 examples for 3 prompts"):
        reward(["p"] * 3, [" 5"] * 3, [WORKED])
