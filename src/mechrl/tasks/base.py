"""What a task gives the rest of mechrl: datasets, a tokenizer for local models, and a scorer.

A task owns its data generation, its prompt format and its notion of a correct answer. Trainers,
evaluation and analysis only talk to this interface, so a new task is one new module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property

from datasets import DatasetDict
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Judgement:
    """The verdict on one completion."""

    answer: str | None  # the parsed answer; None when the completion is malformed
    correct: bool
    format_error: bool


class Task(ABC):
    name: str
    #: Column that splits results into groups in every report (e.g. the rule family).
    group_key: str | None = None
    #: Whether `judge` says if an answer is correct. A task without gold answers (story continuation)
    #: is judged by its rewards, and the training loops do not log an "accuracy" for it.
    judges_answers: bool = True

    @cached_property
    def datasets(self) -> DatasetDict:
        """All splits; built once per task object."""
        return self.build_datasets()

    @abstractmethod
    def build_datasets(self) -> DatasetDict: ...

    @abstractmethod
    def build_tokenizer(self) -> PreTrainedTokenizerBase:
        """A tokenizer covering every split's text, for models built locally for this task."""

    @abstractmethod
    def judge(self, completion: str, example: dict) -> Judgement: ...

    @property
    @abstractmethod
    def eval_splits(self) -> tuple[str, ...]:
        """The splits evaluated at every checkpoint (ID test first)."""

    @property
    @abstractmethod
    def max_new_tokens(self) -> int:
        """An upper bound on the tokens a correct answer needs."""
