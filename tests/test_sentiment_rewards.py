"""The sentiment rewards: VADER equals the package's own compound score; the no-signal control is
constant or a reproducible hash-uniform number that does not depend on sentiment."""

from __future__ import annotations

import doctest
import statistics

import pytest

import mechrl.rewards.sentiment
from mechrl.config import ConfigError, RewardSpec
from mechrl.rewards import build_reward, list_rewards

TEXTS = [" she smiled and felt very happy .", " the cat was not happy at all .", " he cried because he was lonely .",
         " the sky was blue .", "", " What a GREAT day!!! :)", " it was good , but the end was sad ."]


def _r(name, completions, **params):
    reward = build_reward([RewardSpec(name=name, params=params)])
    return reward(["p"] * len(completions), completions, [{}] * len(completions)).total.tolist()


def test_registered_and_doctests():
    assert {"vader", "no_signal"} <= set(list_rewards())
    assert doctest.testmod(mechrl.rewards.sentiment).failed == 0


def test_vader_equals_the_package_compound_score():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    ref = SentimentIntensityAnalyzer()  # an independent instance of the package's analyser
    expected = [ref.polarity_scores(t)["compound"] for t in TEXTS]
    got = _r("vader", TEXTS)
    assert got == pytest.approx(expected, abs=1e-6)  # float32 round trip of the reward tensor
    assert got[0] > 0.5 and got[2] < -0.5 and got[4] == 0.0  # positive, negative, empty
    assert got[1] < 0  # VADER's negation rule ("not happy")


def test_vader_scores_the_completion_only():
    reward = build_reward([RewardSpec(name="vader")])
    out = reward([" a very sad and lonely prompt", " happy prompt"], [" the sky was blue ."] * 2, [{}, {}]).total
    assert out[0] == out[1] == 0.0


def test_no_signal_constant_and_random():
    assert _r("no_signal", TEXTS, mode="constant", value=0.25) == [0.25] * len(TEXTS)
    a = _r("no_signal", TEXTS)
    assert a == _r("no_signal", TEXTS)  # reproducible
    assert a != _r("no_signal", TEXTS, seed=1)  # the seed changes the draw
    assert all(-1.0 <= x < 1.0 for x in a)
    lo_hi = _r("no_signal", TEXTS, low=2.0, high=3.0)
    assert all(2.0 <= x < 3.0 for x in lo_hi)


def test_no_signal_is_uniform_and_unrelated_to_sentiment():
    from mechrl.rewards.sentiment import no_signal, vader

    texts = [f" story {i} was {'happy' if i % 2 else 'sad'} ." for i in range(2000)]
    r = no_signal(["p"] * len(texts), texts, [{}] * len(texts))
    assert abs(statistics.mean(r)) < 0.05 and abs(statistics.pvariance(r) - 1 / 3) < 0.03  # U(-1, 1)
    v = vader(["p"] * len(texts), texts, [{}] * len(texts))
    assert abs(statistics.correlation(r, v)) < 0.08  # ~N(0, 1/sqrt(2000)=0.022) if independent


def test_no_signal_bad_params():
    with pytest.raises(ConfigError, match="mode"):
        build_reward([RewardSpec(name="no_signal", params={"mode": "noise"})])
    with pytest.raises(ValueError, match="high > low"):
        _r("no_signal", TEXTS, low=1.0, high=1.0)
