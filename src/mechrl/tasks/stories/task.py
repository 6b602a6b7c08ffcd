"""Story continuation as a `Task`: prompts are story openings, completions continue the story.

There is no gold answer; `judge` checks form only. A completion is `format_error` when it has no
word at all, and `correct` when it is well formed: it ends a sentence (. ! ?) and, for the
generated grammar, uses only the grammar's words. What RL optimises comes from the rewards
(`mechrl.rewards.stories`), not from `judge`.
"""

from __future__ import annotations

from functools import cached_property

from datasets import DatasetDict

from mechrl.config import StoriesTaskConfig
from mechrl.tasks.base import Judgement, Task
from mechrl.tasks.stories.dataset import build_datasets
from mechrl.tasks.stories.grammar import WORD_RE, vocabulary
from mechrl.tasks.stories.tokenizer import build_story_tokenizer


class StoriesTask(Task):
    name = "stories"
    group_key = None
    judges_answers = False  # `judge` checks form only; rewards say how good a story is

    def __init__(self, cfg: StoriesTaskConfig):
        self.cfg = cfg

    def build_datasets(self) -> DatasetDict:
        return build_datasets(self.cfg)

    def build_tokenizer(self):
        if self.cfg.data_path is not None:
            raise ValueError("stories with task.data_path: use the tokenizer of the model at model.path "
                             "(the generated word vocabulary does not cover real stories)")
        return build_story_tokenizer(vocabulary())

    @cached_property
    def _vocab(self) -> frozenset[str] | None:
        return None if self.cfg.data_path is not None else frozenset(vocabulary())

    def judge(self, completion: str, example: dict) -> Judgement:
        text = completion.strip()
        if not WORD_RE.search(text.lower()):
            return Judgement(None, False, True)
        in_vocab = self._vocab is None or all(w in self._vocab for w in text.split())
        return Judgement(text, text.endswith((".", "!", "?")) and in_vocab, False)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return ("test",)

    @property
    def max_new_tokens(self) -> int:
        return self.cfg.max_new_tokens
