"""Rewards: plain functions `fn(prompts, completions, examples, **params) -> list[float]`, registered
by name and composed into one weighted reward from the recipe's `reward:` list.

    >>> from mechrl.config import RewardSpec
    >>> reward = build_reward([RewardSpec(name="cards_correct"), RewardSpec(name="cards_format", weight=0.5)])
    >>> reward.names
    ['cards_correct', 'cards_format']

Importing this package registers the built-ins (`mechrl.rewards.builtin`), the story rewards
(`mechrl.rewards.stories`), the sentiment rewards (`mechrl.rewards.sentiment`: VADER and the
no-signal control) and the feature-control rewards read from a SARM-form reward model
(`mechrl.control.penalties`); reward-hacking detectors live in `mechrl.rewards.detectors`.
"""

from __future__ import annotations

from mechrl.rewards import builtin  # noqa: F401  (registers the built-in rewards)
from mechrl.rewards import sentiment  # noqa: F401  (registers vader and no_signal)
from mechrl.rewards import stories  # noqa: F401  (registers the story rewards)
from mechrl.control import penalties  # noqa: F401,E402  (registers the feature-control rewards)
from mechrl.rewards.registry import (
    Reward, RewardFn, RewardOutput, build_reward, get_reward, list_rewards, register_reward, register_reward_factory,
    register_reward_pattern,
)

__all__ = ["Reward", "RewardFn", "RewardOutput", "build_reward", "get_reward", "list_rewards", "register_reward",
           "register_reward_factory", "register_reward_pattern"]
