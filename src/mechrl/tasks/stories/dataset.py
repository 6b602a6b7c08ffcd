"""Story datasets: train/val/test splits of (prompt, completion, story) rows.

Generated (default): each split is drawn from the grammar with its own seeded stream
(`random.Random(f"stories-{data_seed}-{split}")`), so splits are reproducible and independent of
each other's sizes. The prompt is the opening up to the hero, or the first `prompt_words` words.

Local data (`data_path`): a folder with a `story` column and `train`/`test` splits (the layout of
SimpleStories); val is the first `n_val` stories of train not used for train. Stories are used as
they are (no lower-casing): the model's own tokenizer decides how they are split.
"""

from __future__ import annotations

import random
from pathlib import Path

from datasets import Dataset, DatasetDict

from mechrl.config import StoriesTaskConfig
from mechrl.errors import UserError
from mechrl.tasks.stories.grammar import make_story, story_opening

SPLITS = ("train", "val", "test")


def split_prompt(story: str, prompt_words: int | None, opening: str | None = None) -> tuple[str, str]:
    """(prompt, completion) of a story; the completion keeps its leading space so that
    prompt + completion == story."""
    if prompt_words is None:
        assert opening is not None and story.startswith(opening), (opening, story[:80])
        return opening, story[len(opening):]
    words = story.split(" ")
    if len(words) <= prompt_words:
        raise ValueError(f"story has {len(words)} words, not more than prompt_words={prompt_words}: {story[:80]!r}")
    prompt = " ".join(words[:prompt_words])
    return prompt, story[len(prompt):]


def make_example(rng: random.Random, prompt_words: int | None = None) -> dict:
    """One generated example: the story, its prompt and the completion that continues it."""
    state = rng.getstate()
    opening = story_opening(rng)
    rng.setstate(state)  # replay: the story starts with exactly this opening
    story = make_story(rng)
    prompt, completion = split_prompt(story, prompt_words, opening)
    return {"prompt": prompt, "completion": completion, "story": story}


def generated_split(cfg: StoriesTaskConfig, split: str, n: int) -> Dataset:
    rng = random.Random(f"stories-{cfg.data_seed}-{split}")
    return Dataset.from_list([make_example(rng, cfg.prompt_words) for _ in range(n)])


def _load_local(path: str) -> DatasetDict:
    from datasets import load_dataset, load_from_disk

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"task.data_path: {path} does not exist (a local copy of the story dataset is needed; "
                        "nothing is downloaded)")
    try:
        return load_from_disk(str(p))
    except FileNotFoundError:  # not a save_to_disk folder: a dataset repository layout (parquet/json files)
        return load_dataset(str(p))


def local_splits(cfg: StoriesTaskConfig) -> DatasetDict:
    raw = _load_local(cfg.data_path)
    for split in ("train", "test"):
        if split not in raw:
            raise UserError(f"task.data_path {cfg.data_path}: no {split!r} split (found {list(raw)})")
        if "story" not in raw[split].column_names:
            raise UserError(f"task.data_path {cfg.data_path}: split {split!r} has no 'story' column "
                            f"(columns: {raw[split].column_names})")
    need = cfg.n_train + cfg.n_val
    if len(raw["train"]) < need or len(raw["test"]) < cfg.n_test:
        raise UserError(f"task.data_path {cfg.data_path}: needs {need} train and {cfg.n_test} test stories, "
                        f"has {len(raw['train'])} and {len(raw['test'])}")

    def rows(stories: list[str]) -> Dataset:
        out = []
        for story in stories:
            prompt, completion = split_prompt(story, cfg.prompt_words)
            out.append({"prompt": prompt, "completion": completion, "story": story})
        return Dataset.from_list(out)

    train = raw["train"].shuffle(seed=cfg.data_seed)["story"][:need]
    return DatasetDict(train=rows(train[:cfg.n_train]), val=rows(train[cfg.n_train:]),
                       test=rows(raw["test"]["story"][:cfg.n_test]))


def build_datasets(cfg: StoriesTaskConfig) -> DatasetDict:
    if cfg.data_path is not None:
        return local_splits(cfg)
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    return DatasetDict({split: generated_split(cfg, split, sizes[split]) for split in SPLITS})
