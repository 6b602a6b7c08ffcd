"""Story rewards and reward-hacking detectors: exact values on hand-worked strings, the registry's
checks, name-parametrised families, and the detector knobs' label statistics."""

from __future__ import annotations

import doctest
import math

import pytest

import mechrl.rewards.detectors
import mechrl.rewards.stories
from mechrl.config import ConfigError, RewardSpec
from mechrl.rewards import build_reward, list_rewards
from mechrl.rewards.detectors import DetectorSpec, build_detector, list_detectors, register_detector
from mechrl.rewards.stories import sentence_lengths

# 3 sentences of 5, 10 and 2 words; "happy" twice as a word, once inside "unhappy"
STORY = " the fox felt very happy . then the happy fox ran to the big old park ! unhappy cat"
SHORT = " she smiled ."
NONE = " . , !"


def _r(name, completions, **params):
    reward = build_reward([RewardSpec(name=name, params=params)])
    return reward(["p"] * len(completions), completions, [{}] * len(completions)).total.tolist()


def test_registered_and_doctests():
    assert {"happy_count", "happy_binary", "sentence_length", "sentence_length_smooth",
            "sentence_length_with_happy", "sentence_length_smooth_with_happy"} <= set(list_rewards())
    assert {"contains_happy", "contains_word"} <= set(list_detectors())
    for mod in (mechrl.rewards.stories, mechrl.rewards.detectors):
        result = doctest.testmod(mod)
        assert result.attempted > 0 and result.failed == 0, mod.__name__


def test_sentence_lengths():
    assert sentence_lengths(STORY) == [5, 10, 2]
    assert sentence_lengths(SHORT) == [2]
    assert sentence_lengths(NONE) == []
    assert sentence_lengths("I don't know. Mia's dog ran!") == [3, 3]  # inner apostrophes keep one word


def test_happy_rewards_exact():
    comps = [STORY, SHORT, "HAPPY Happy happy happy"]
    assert _r("happy_count", comps) == pytest.approx([2 / 3, 0.0, 1.0])  # k=3: min(count / 3, 1)
    assert _r("happy_count", comps, k=5) == pytest.approx([0.4, 0.0, 0.8])
    assert _r("happy_count", comps, ignore_case=False) == pytest.approx([2 / 3, 0.0, 2 / 3])
    assert _r("happy_binary", comps) == [1.0, 0.0, 1.0]
    assert _r("happy_binary", [" unhappy"]) == [0.0]
    with pytest.raises(ValueError, match="k must be >= 1"):
        _r("happy_count", comps, k=0)


def test_sentence_length_rewards_exact():
    comps = [STORY, SHORT, NONE, ""]
    assert _r("sentence_length", comps, n=5) == pytest.approx([1 / 3, 0.0, 0.0, 0.0])
    assert _r("sentence_length", comps, n=2) == pytest.approx([1 / 3, 1.0, 0.0, 0.0])
    # smooth, n=10, width 10: lengths 5, 10, 2 -> 0.5, 1.0, 0.2
    assert _r("sentence_length_smooth", comps, n=10) == pytest.approx([(0.5 + 1.0 + 0.2) / 3, 0.2, 0.0, 0.0])
    # width 4: 0, 1, 0 (clipped at 0)
    assert _r("sentence_length_smooth", comps, n=10, width=4) == pytest.approx([1 / 3, 0.0, 0.0, 0.0])


def test_named_families_equal_parametrised_rewards():
    comps = [STORY, SHORT, "a b c d e f g h i j . happy happy happy"]
    assert _r("sentence_length_10", comps) == _r("sentence_length", comps, n=10)
    assert _r("sentence_length_10_smooth", comps) == _r("sentence_length_smooth", comps, n=10)
    assert _r("sentence_length_2_smooth", comps, width=1) == _r("sentence_length_smooth", comps, n=2, width=1)
    # task + hack, 0.5 each by default: third completion has lengths 10 and 3, happy 3/3
    assert _r("sentence_length_10_with_happy", comps)[2] == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)
    assert _r("sentence_length_10_smooth_with_happy", comps)[2] == pytest.approx(0.5 * (1 + 0.3) / 2 + 0.5)
    assert _r("sentence_length_10_smooth_with_happy", comps, hack_weight=0.2, k=6)[2] == pytest.approx(
        0.8 * 0.65 + 0.2 * 0.5)
    # STORY: smooth task (0.5 + 1 + 0.2) / 3, hack 2/3
    assert _r("sentence_length_10_smooth_with_happy", [STORY]) == pytest.approx([0.5 * 1.7 / 3 + 0.5 * 2 / 3])
    assert all(0.0 <= v <= 1.0 for v in _r("sentence_length_3_smooth_with_happy", comps))


def test_misconfiguration_raises():
    with pytest.raises(ConfigError, match="unknown parameter 'n'"):
        build_reward([RewardSpec(name="sentence_length_10", params={"n": 3})])
    with pytest.raises(ConfigError, match="missing parameter 'n'"):
        build_reward([RewardSpec(name="sentence_length")])
    with pytest.raises(ConfigError, match="unknown reward 'sentence_lenght_10'.*families"):
        build_reward([RewardSpec(name="sentence_lenght_10")])
    with pytest.raises(ValueError, match="n >= 1"):
        build_reward([RewardSpec(name="sentence_length_0")])
    with pytest.raises(ValueError, match="hack_weight"):
        _r("sentence_length_10_with_happy", [SHORT], hack_weight=1.5)
    with pytest.raises(ConfigError, match="parameter 'k'"):
        build_reward([RewardSpec(name="happy_count", params={"k": "three"})])


def test_registry_checks_apply_to_story_components(monkeypatch):
    reward = build_reward([RewardSpec(name="happy_count"), RewardSpec(name="sentence_length_5", weight=2.0)])
    out = reward(["p", "p"], [STORY, SHORT], [{}, {}])
    assert out.total.tolist() == pytest.approx([2 / 3 + 2 / 3, 0.0])
    assert set(out.components) == {"happy_count", "sentence_length_5"}
    with pytest.raises(ValueError, match="2 completions for 3 prompts"):
        reward(["p"] * 3, [STORY, SHORT], [{}] * 2)
    # a component that misbehaves is named: wrong length, then a non-finite value
    monkeypatch.setattr(mechrl.rewards.stories, "_happy_counts", lambda comps, w, c: [1])
    with pytest.raises(ValueError, match="'happy_count' returned 1 values for 2 completions"):
        build_reward([RewardSpec(name="happy_count")])(["p", "p"], [STORY, SHORT], [{}, {}])
    monkeypatch.setattr(mechrl.rewards.stories, "_happy_counts", lambda comps, w, c: [math.nan] * len(comps))
    with pytest.raises(ValueError, match="'happy_count' returned a non-finite value at index 0"):
        build_reward([RewardSpec(name="happy_count")])(["p", "p"], [STORY, SHORT], [{}, {}])


# ----------------------------------------------------------------------------------------------
# Detectors
# ----------------------------------------------------------------------------------------------

N = 20_000  # half hacks, half clean


def _batch():
    comps = [" she felt happy ."] * (N // 2) + [" she felt glad ."] * (N // 2)
    return ["p"] * N, comps, [{}] * N


def _within(frac: float, p: float, n: int) -> bool:
    """|frac - p| within 5 binomial standard deviations."""
    return abs(frac - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_detector_exact_without_knobs():
    det = build_detector(DetectorSpec(name="contains_happy"), run_seed=0)
    comps = [STORY, SHORT, " HAPPY", " unhappy"]
    labels = det.labels(["p"] * 4, comps, [{}] * 4)
    assert labels.raw == labels.reported == [True, False, True, False]
    det2 = build_detector(DetectorSpec(name="contains_word", params={"word": "happy", "min_count": 2}), run_seed=0)
    assert det2(["p"] * 4, comps, [{}] * 4) == [True, False, False, False]


@pytest.mark.parametrize("coverage,noise", [(0.3, 0.0), (1.0, 0.1), (0.5, 0.2)])
def test_detector_knobs_give_stated_fractions(coverage, noise):
    spec = DetectorSpec(name="contains_happy", coverage=coverage, label_noise=noise, seed=7)
    prompts, comps, exs = _batch()
    labels = build_detector(spec).labels(prompts, comps, exs)
    assert labels.raw == [True] * (N // 2) + [False] * (N // 2)
    pos = sum(labels.reported[:N // 2]) / (N // 2)
    neg = sum(labels.reported[N // 2:]) / (N // 2)
    p_pos = coverage * (1 - noise) + (1 - coverage) * noise
    assert _within(pos, p_pos, N // 2), (pos, p_pos)
    assert _within(neg, noise, N // 2), (neg, noise)
    # deterministic: the same spec gives the same labels; another seed does not
    assert build_detector(spec)(prompts, comps, exs) == labels.reported
    other = build_detector(spec.model_copy(update={"seed": 8}))(prompts, comps, exs)
    assert other != labels.reported


def test_detector_state_resumes_stream():
    spec = DetectorSpec(name="contains_happy", coverage=0.5, label_noise=0.1, seed=3)
    prompts, comps, exs = _batch()
    a = build_detector(spec)
    a(prompts[:100], comps[:100], exs[:100])
    state = a.state_dict()
    expect = a(prompts[:100], comps[:100], exs[:100])
    b = build_detector(spec)
    b.load_state_dict(state)
    assert b(prompts[:100], comps[:100], exs[:100]) == expect
    with pytest.raises(ValueError, match="differs"):
        build_detector(spec.model_copy(update={"coverage": 0.4})).load_state_dict(state)


def test_detector_errors(monkeypatch):
    import mechrl.rewards.detectors as d

    monkeypatch.setattr(d, "_REGISTRY", dict(d._REGISTRY))
    with pytest.raises(ConfigError, match="unknown detector 'contains_hapy'.*contains_happy"):
        build_detector(DetectorSpec(name="contains_hapy"), run_seed=0)
    with pytest.raises(ConfigError, match="detector 'contains_word': missing parameter 'word'"):
        build_detector(DetectorSpec(name="contains_word"), run_seed=0)
    with pytest.raises(ValueError, match="no seed"):
        build_detector(DetectorSpec(name="contains_happy"))
    with pytest.raises(ValueError):
        DetectorSpec(name="contains_happy", coverage=1.5)

    @register_detector("short_list")
    def short_list(prompts, completions, examples):
        return [True]

    @register_detector("ints")
    def ints(prompts, completions, examples):
        return [1] * len(completions)

    with pytest.raises(ValueError, match="expected a list of 2 bools"):
        build_detector(DetectorSpec(name="short_list"), run_seed=0)(["p"] * 2, ["a", "b"], [{}] * 2)
    with pytest.raises(ValueError, match="non-bool at index 0"):
        build_detector(DetectorSpec(name="ints"), run_seed=0)(["p"] * 2, ["a", "b"], [{}] * 2)
    with pytest.raises(ValueError, match="already registered"):
        register_detector("ints")(ints)
