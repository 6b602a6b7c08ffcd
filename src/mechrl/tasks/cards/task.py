"""The card scoring game as a `Task` (seed 000's rule-based scoring game)."""

from __future__ import annotations

from functools import cached_property

from datasets import DatasetDict

from mechrl.config import CardsTaskConfig
from mechrl.models.tokenizer import build_word_tokenizer
from mechrl.tasks.base import Judgement, Task
from mechrl.tasks.cards.dataset import EVAL_SPLITS, build_datasets
from mechrl.tasks.cards.formatting import SYMBOLS, parse_answer, vocabulary


class CardsTask(Task):
    name = "cards"
    group_key = "family"

    def __init__(self, cfg: CardsTaskConfig):
        self.cfg = cfg

    def build_datasets(self) -> DatasetDict:
        return build_datasets(self.cfg)

    def build_tokenizer(self):
        return build_word_tokenizer(vocabulary(list(self.cfg.id_colors) + list(self.cfg.ood_colors)), SYMBOLS)

    def judge(self, completion: str, example: dict) -> Judgement:
        parsed = parse_answer(completion, example["answer_format"], example["question"])
        return Judgement(parsed.answer, parsed.answer == example["answer"], parsed.format_error)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return tuple(s for s in EVAL_SPLITS if s in self.datasets)

    @cached_property
    def max_new_tokens(self) -> int:
        """Longest gold completion over the evaluated splits, in tokens, plus room for a wrong one."""
        tok = self.build_tokenizer()
        longest = 0
        for split in self.eval_splits:
            comps = list(self.datasets[split]["completion"])
            longest = max(longest, max(len(ids) for ids in tok(comps, add_special_tokens=False)["input_ids"]))
        return longest + 8
