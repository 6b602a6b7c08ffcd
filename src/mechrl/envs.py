"""Text environments: where RL prompts come from and how completions are scored.

An RL loop only talks to a `TextEnv`:

    items = env.reset(n)                        # n fresh prompts with their example dicts
    result = env.step(items, completions)       # rewards (total + components) and per-sample infos

`TaskEnv` serves any task that can draw fresh examples. Each prompt is drawn from the task's ID
(training) distribution, or with probability `env.ood_fraction` from one of the `env.ood_splits`
distributions chosen uniformly. Prompts are drawn fresh, not read from the train split, by a
`random.Random` seeded from `env.seed`; a prompt that equals one of an evaluated split (test and
OOD test sets) is redrawn, so RL never trains on an evaluation prompt. The RNG state is the env's
whole state: `state_dict()` (JSON) saved with a checkpoint and `load_state_dict()` on resume
continue the same prompt stream.

    env = build_env(task, cfg.reward, cfg.env)

How a task draws examples is a small `ExampleSampler` chosen by `example_sampler(task)` (by task
name), so tasks need no RL-specific code.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

from mechrl.config import ConfigError, EnvConfig, RewardSpec, _suggest
from mechrl.rewards import Reward, RewardOutput, build_reward
from mechrl.tasks.base import Task

__all__ = ["EnvItem", "StepResult", "TextEnv", "ExampleSampler", "TaskEnv", "example_sampler", "build_env"]

#: Draws per prompt before giving up on finding one that is not an evaluation prompt.
MAX_REDRAWS = 1000


@dataclass(frozen=True)
class EnvItem:
    prompt: str
    example: dict  # the task's example dict (gold answer, labels, "split": where it was drawn from)


@dataclass(frozen=True)
class StepResult:
    rewards: RewardOutput  # total (B,) and components
    infos: list[dict]  # per completion: answer, correct, format_error, split, the task's group key


class TextEnv(ABC):
    """Prompts in, rewards out. Subclasses keep all their randomness in `state_dict()`."""

    reward: Reward

    @abstractmethod
    def reset(self, n: int) -> list[EnvItem]:
        """`n` fresh prompts."""

    @abstractmethod
    def step(self, items: Sequence[EnvItem], completions: Sequence[str]) -> StepResult:
        """Score one completion per item (items may repeat, e.g. a GRPO group)."""

    @abstractmethod
    def state_dict(self) -> dict:
        """JSON-serialisable state; `load_state_dict` of it continues the same prompt stream."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class ExampleSampler:
    """How a task draws one fresh example of a split's distribution."""

    id_split: str  # the training distribution
    ood_splits: tuple[str, ...]  # the shifted distributions RL may mix in
    draw: Callable[[random.Random, str], dict]  # (rng, split) -> example dict


def _cards_sampler(task) -> ExampleSampler:
    from mechrl.tasks.cards.dataset import ID_SPLITS, make_example, split_specs

    cfg = task.cfg
    specs = split_specs(cfg)
    all_colors = list(cfg.id_colors) + list(cfg.ood_colors)

    def draw(rng: random.Random, split: str) -> dict:
        # the ID draws follow the train split's family weights, as SFT's data does
        weights = cfg.train_family_weights if split == "train" else None
        return make_example(rng, specs[split], cfg, all_colors, weights)

    return ExampleSampler("train", tuple(s for s in specs if s not in ID_SPLITS), draw)


def _stories_sampler(task) -> ExampleSampler:
    """Generated stories: a fresh story per prompt. Local data (`data_path`): a train-split story."""
    from mechrl.tasks.stories.dataset import make_example

    if task.cfg.data_path is not None:
        train = task.datasets["train"]
        return ExampleSampler("train", (), lambda rng, split: dict(train[rng.randrange(len(train))]))
    return ExampleSampler("train", (), lambda rng, split: make_example(rng, task.cfg.prompt_words))


_SAMPLERS: dict[str, Callable[[Task], ExampleSampler]] = {"cards": _cards_sampler, "stories": _stories_sampler}


def example_sampler(task: Task) -> ExampleSampler:
    """The sampler of `task` (dispatch on `task.name`); a task without one cannot serve RL prompts."""
    if task.name not in _SAMPLERS:
        raise ConfigError(f"task {task.name!r} cannot draw fresh RL prompts; tasks that can: {', '.join(_SAMPLERS)}")
    return _SAMPLERS[task.name](task)


class TaskEnv(TextEnv):
    """Fresh prompts from a task's ID distribution mixed with OOD shifts; scored by `reward` and
    judged by the task (`infos`)."""

    def __init__(self, task: Task, reward: Reward, env_cfg: EnvConfig):
        self.task, self.reward, self.cfg = task, reward, env_cfg
        self.sampler = example_sampler(task)
        for name in env_cfg.ood_splits:
            if name not in self.sampler.ood_splits:
                raise ConfigError(f"env.ood_splits: unknown OOD split {name!r}{_suggest(name, self.sampler.ood_splits)}; "
                                  f"this task's OOD splits: {', '.join(self.sampler.ood_splits)}")
        # every prompt an evaluation may see; RL prompts must avoid them
        self.eval_prompts: frozenset[str] = frozenset(
            p for split in task.eval_splits for p in task.datasets[split]["prompt"])
        self.rng = random.Random(f"mechrl-env-{env_cfg.seed}")
        self.n_drawn = 0  # prompts handed out
        self.n_redrawn = 0  # draws rejected because they equal an evaluation prompt

    def _draw(self, split: str) -> dict:
        for _ in range(MAX_REDRAWS):
            ex = self.sampler.draw(self.rng, split)
            if ex["prompt"] not in self.eval_prompts:
                ex["split"] = split
                return ex
            self.n_redrawn += 1
        raise RuntimeError(f"env: {MAX_REDRAWS} draws from split {split!r} in a row were all evaluation prompts; "
                           "the split's prompt space is too small next to the evaluated splits")

    def reset(self, n: int) -> list[EnvItem]:
        if n < 0:
            raise ValueError(f"reset: n must be >= 0, got {n}")
        ood = self.cfg.ood_splits
        items = []
        for _ in range(n):
            # one uniform draw per prompt whatever the fraction, so the stream's shape never depends on it
            use_ood = self.rng.random() < self.cfg.ood_fraction
            split = self.rng.choice(ood) if use_ood else self.sampler.id_split
            ex = self._draw(split)
            items.append(EnvItem(ex["prompt"], ex))
        self.n_drawn += n
        return items

    def step(self, items: Sequence[EnvItem], completions: Sequence[str]) -> StepResult:
        if len(items) != len(completions):
            raise ValueError(f"step: {len(completions)} completions for {len(items)} items; need one per item")
        examples = [it.example for it in items]
        rewards = self.reward([it.prompt for it in items], list(completions), examples)
        key = self.task.group_key
        infos = []
        for completion, ex in zip(completions, examples):
            j = self.task.judge(completion, ex)
            info = {"answer": j.answer, "correct": j.correct, "format_error": j.format_error, "split": ex.get("split")}
            if key is not None:
                info[key] = ex[key]
            infos.append(info)
        return StepResult(rewards, infos)

    # -- resume ------------------------------------------------------------------------------

    def _identity(self) -> dict:
        return {"seed": self.cfg.seed, "ood_fraction": self.cfg.ood_fraction, "ood_splits": list(self.cfg.ood_splits)}

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "n_drawn": self.n_drawn, "n_redrawn": self.n_redrawn,
                **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._identity()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError("env.load_state_dict: the saved env was configured differently "
                             + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()))
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.n_drawn, self.n_redrawn = state["n_drawn"], state["n_redrawn"]


def build_env(task: Task, reward_specs: Sequence[RewardSpec] | Reward, env_cfg: EnvConfig) -> TaskEnv:
    """The RL environment of `task`, scored by the weighted sum of `reward_specs`."""
    reward = reward_specs if isinstance(reward_specs, Reward) else build_reward(reward_specs)
    return TaskEnv(task, reward, env_cfg)
