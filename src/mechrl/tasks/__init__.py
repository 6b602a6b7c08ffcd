"""Tasks: example generation, prompt formatting, answer checking, ID/OOD splits, rich labels."""

from __future__ import annotations

from mechrl.tasks.base import Judgement, Task

__all__ = ["Judgement", "Task", "build_task"]


def build_task(cfg) -> Task:
    """The task object for a task config (dispatch on `cfg.name`)."""
    if cfg.name == "cards":
        from mechrl.tasks.cards.task import CardsTask

        return CardsTask(cfg)
    if cfg.name == "stories":
        from mechrl.tasks.stories.task import StoriesTask

        return StoriesTask(cfg)
    raise ValueError(f"unknown task {cfg.name!r}")
