"""The story task: grammar statistics, the 4096-word tokenizer, datasets (generated and local),
the RL prompt sampler, and the cached story base model (fast preset)."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch
from datasets import Dataset, DatasetDict

from mechrl.config import EnvConfig, RewardSpec, StoriesTaskConfig, build_task_config
from mechrl.envs import build_env
from mechrl.errors import UserError
from mechrl.models.loading import load_pretrained
from mechrl.tasks import build_task
from mechrl.tasks.stories.base_model import (
    StoryModelConfig, config_hash, sample_stories, story_base_model,
)
from mechrl.tasks.stories.grammar import EMOTIONS, WORD_RE, corpus_stats, make_story, sentences, vocabulary
from mechrl.tasks.stories.tokenizer import VOCAB_SIZE, build_story_tokenizer


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(0)
    return [make_story(rng) for _ in range(3000)]


@pytest.fixture(scope="module")
def story_tok():
    return build_story_tokenizer(vocabulary())


def test_grammar_is_deterministic_and_varied(corpus):
    rng = random.Random(0)
    assert [make_story(rng) for _ in range(5)] == corpus[:5]
    stats = corpus_stats(corpus)
    assert stats["min_len"] == 3 and stats["max_len"] >= 19  # sentence lengths 3 .. ~20 words
    assert 0.015 < stats["happy_sentence_frac"] < 0.035  # "happy" present, not dominant (~2.2%)
    # "happy" is at most twice as frequent as the average other emotion word
    words = [w for s in corpus for w in WORD_RE.findall(s)]
    counts = {e: words.count(e) for e in EMOTIONS}
    others = [c for e, c in counts.items() if e != "happy"]
    assert counts["happy"] < 5 * sum(others) / len(others)
    assert set(w for s in corpus for w in s.split()) <= set(vocabulary())
    assert sentences("a b . c d ! e") == ["a b .", "c d !", "e"]


def test_tokenizer_matches_simplestories_conventions(story_tok, corpus, tmp_path):
    tok = story_tok
    assert len(tok) == VOCAB_SIZE == 4096
    assert (tok.unk_token_id, tok.eos_token_id, tok.pad_token_id, tok.bos_token) == (0, 1, 2, None)
    story = corpus[0]
    ids = tok(story, add_special_tokens=False)["input_ids"]
    assert ids[0] != tok.eos_token_id and tok.unk_token_id not in ids
    assert tok(story)["input_ids"] == ids + [1]  # add_special_tokens=True appends EOS only
    assert tok.decode(ids) == story
    assert tok("the zebra", add_special_tokens=False)["input_ids"][1] == 0  # unknown word -> [UNK]
    real = 2 * len(vocabulary()) + 3  # each word with and without a leading space
    assert all(i < real for s in corpus[:200] for i in tok(s)["input_ids"])  # fillers never used
    assert tok.convert_ids_to_tokens(real) == "[unused0]"
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(story)["input_ids"] == tok(story)["input_ids"] and again.decode(ids) == story
    batch = tok(["once upon", "a little fox"], add_special_tokens=False, padding=True)
    assert batch["input_ids"][0][0] == 2 and batch["attention_mask"][0] == [0, 1, 1]  # left padding


def test_generated_datasets():
    cfg = StoriesTaskConfig(n_train=50, n_val=20, n_test=30)
    task = build_task(cfg)
    ds = task.datasets
    assert {k: len(v) for k, v in ds.items()} == {"train": 50, "val": 20, "test": 30}
    for row in ds["test"]:
        assert row["prompt"] + row["completion"] == row["story"]
        assert row["completion"].startswith(" lived in ")  # the prompt is the opening up to the hero
    assert build_task(cfg).datasets["test"]["story"] == ds["test"]["story"]  # reproducible
    assert build_task(cfg.model_copy(update={"n_train": 10})).datasets["test"]["story"] == ds["test"]["story"]
    assert ds["train"]["story"][:5] != ds["test"]["story"][:5]
    k3 = build_task(cfg.model_copy(update={"prompt_words": 3})).datasets["test"][0]
    assert len(k3["prompt"].split(" ")) == 3 and k3["prompt"] + k3["completion"] == k3["story"]
    assert task.eval_splits == ("test",) and task.max_new_tokens == cfg.max_new_tokens
    assert build_task_config({"name": "stories", "n_train": 7}).n_train == 7


def test_judge_checks_form_only():
    task = build_task(StoriesTaskConfig(n_train=5))
    assert task.judge(" he smiled softly .", {}).correct
    assert not task.judge(" he smiled softly", {}).correct  # unfinished sentence
    assert not task.judge(" he zonked .", {}).correct  # word outside the grammar
    j = task.judge(" . ,", {})
    assert j.format_error and j.answer is None


def test_local_story_data(tmp_path):
    stories = [f"Once upon a time, there was a cat number {i}. It was happy." for i in range(40)]
    DatasetDict(train=Dataset.from_dict({"story": stories[:30]}),
                test=Dataset.from_dict({"story": stories[30:]})).save_to_disk(str(tmp_path / "ss"))
    cfg = StoriesTaskConfig(data_path=str(tmp_path / "ss"), prompt_words=4, n_train=20, n_val=5, n_test=10)
    task = build_task(cfg)
    ds = task.datasets
    assert {k: len(v) for k, v in ds.items()} == {"train": 20, "val": 5, "test": 10}
    assert ds["test"][0]["prompt"] == "Once upon a time," and ds["test"][0]["completion"] == " there was a cat number 30. It was happy."
    assert not set(ds["train"]["story"]) & set(ds["val"]["story"])
    with pytest.raises(ValueError, match="tokenizer of the model at model.path"):
        task.build_tokenizer()  # nothing silently substitutes the generated vocabulary
    with pytest.raises(UserError, match="needs 35 train"):
        build_task(cfg.model_copy(update={"n_train": 30})).datasets
    with pytest.raises(UserError, match="does not exist"):
        build_task(cfg.model_copy(update={"data_path": str(tmp_path / "missing")})).datasets
    DatasetDict(train=Dataset.from_dict({"text": stories[:30]}),
                test=Dataset.from_dict({"text": stories[30:]})).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(UserError, match="no 'story' column"):
        build_task(cfg.model_copy(update={"data_path": str(tmp_path / "bad")})).datasets
    with pytest.raises(ValueError, match="data_path needs prompt_words"):
        StoriesTaskConfig(data_path="x")


def test_env_draws_fresh_openings():
    task = build_task(StoriesTaskConfig(n_train=10, n_test=100))
    env = build_env(task, [RewardSpec(name="happy_count")], EnvConfig(seed=3))
    items = env.reset(50)
    test_prompts = set(task.datasets["test"]["prompt"])
    assert all(it.prompt not in test_prompts and it.example["split"] == "train" for it in items)
    assert len({it.prompt for it in items}) > 40
    again = build_env(task, [RewardSpec(name="happy_count")], EnvConfig(seed=3)).reset(50)
    assert [it.prompt for it in again] == [it.prompt for it in items]
    res = env.step(items[:2], [" she felt happy .", " she felt sad ."])
    assert res.rewards.total.tolist() == pytest.approx([1 / 3, 0.0])


# ----------------------------------------------------------------------------------------------
# The story base model
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fast_model_dir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MECHRL_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        yield story_base_model(StoryModelConfig(fast=True, threads=1))
    finally:
        mp.undo()


def test_fast_pretraining_learns_and_is_shaped_like_simplestories(fast_model_dir):
    record = json.loads((fast_model_dir / "pretrain.json").read_text())
    assert record["val_loss"] < 0.65 * record["val_loss_init"], record  # from ~8.3 (uniform) to < 5.4
    model, tok = load_pretrained(fast_model_dir, device="cpu")
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size,
            c.vocab_size, c.tie_word_embeddings, c.max_position_embeddings) == ("llama", 4, 128, 4, 512, 4096, True, 512)
    assert c.bos_token_id is None and model.generation_config.eos_token_id == 1
    assert model.generation_config.pad_token_id == 2
    assert sum(p.numel() for p in model.parameters()) == record["n_params"]
    assert 1.5e6 < record["n_params"] < 1.6e6
    out = sample_stories(model, tok, ["once upon a time , a little fox"], max_new_tokens=10)
    assert out[0].startswith("once upon a time , a little fox ") and "[unused" not in out[0]


def test_cache_is_reused_and_keyed_by_config(fast_model_dir, monkeypatch):
    monkeypatch.setenv("MECHRL_CACHE", str(fast_model_dir.parent))
    mtime = (fast_model_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.process_time()  # CPU seconds: other load on the machine does not count
    assert story_base_model(StoryModelConfig(fast=True)) == fast_model_dir
    model, _ = load_pretrained(fast_model_dir, device="cpu")
    assert time.process_time() - t0 < 2.0  # loads offline in about a CPU-second (pretraining takes far more)
    assert (fast_model_dir / "model.safetensors").stat().st_mtime_ns == mtime  # not retrained
    assert config_hash(StoryModelConfig(fast=True)) != config_hash(StoryModelConfig(fast=True, seed=1))
    assert config_hash(StoryModelConfig(fast=True)) == config_hash(StoryModelConfig(fast=True, threads=1))
    assert config_hash(StoryModelConfig()) != config_hash(StoryModelConfig(fast=True))
    assert not any(p.name.startswith(".") for p in fast_model_dir.parent.iterdir())  # no temp folders left
    (fast_model_dir / "pretrain.json").rename(fast_model_dir / "pretrain.bak")
    try:
        with pytest.raises(RuntimeError, match="incomplete"):
            story_base_model(StoryModelConfig(fast=True))
    finally:
        (fast_model_dir / "pretrain.bak").rename(fast_model_dir / "pretrain.json")


@pytest.mark.slow
def test_full_story_model_pretrains(tmp_path, monkeypatch):
    """The default story model: loss falls from ~8.3 to near the grammar's entropy, samples are stories."""
    monkeypatch.setenv("MECHRL_CACHE", str(tmp_path))
    path = story_base_model(StoryModelConfig(threads=1))  # same cache key as the default
    record = json.loads((path / "pretrain.json").read_text())
    assert record["val_loss_init"] > 8.0 and record["val_loss"] < 1.8, record["val_loss"]
    assert record["train_loss_last10"] < 1.8
    vocab = set(vocabulary())
    for s in record["samples"]:
        words = s.split()
        assert "[unused" not in s and sum(w in vocab for w in words) >= 0.95 * len(words), s
        assert s.rstrip().endswith(".") and len(sentences(s)) >= 3, s  # ended by EOS after whole sentences
    model, tok = load_pretrained(path, device="cpu")
    ids = tok(make_story(random.Random(99)), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).loss < 2.0


def test_story_checks_explain_what_is_wrong(fast_model_dir, story_tok, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from mechrl.tasks.stories.checks import StoryModelError, check_story_tokenizer, load_story_model

    model, tok = load_story_model(fast_model_dir, device="cpu")  # the generated model passes
    check_story_tokenizer(story_tok)

    # SimpleStories-like: no pad token
    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "[EOS]": 1, "once": 2, "upon": 3, "a": 4, "time": 5}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(cleanup=False)
    no_pad = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[EOS]", padding_side="left")
    with pytest.raises(StoryModelError, match="no pad token.*SimpleStories ships none"):
        check_story_tokenizer(no_pad)
    no_pad.pad_token = "[EOS]"
    check_story_tokenizer(no_pad)  # what load_pretrained does: pad with EOS
    raw.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 1)])
    adds_eos = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[EOS]", pad_token="[EOS]",
                                       padding_side="left")
    check_story_tokenizer(adds_eos)  # EOS only with add_special_tokens=True: fine
    raw.post_processor = None
    no_eos = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", padding_side="left")
    with pytest.raises(StoryModelError, match="no EOS token"):
        check_story_tokenizer(no_eos)
    model.generation_config.eos_token_id = 3
    with pytest.raises(StoryModelError, match="generation would not stop"):
        check_story_tokenizer(tok, model)
