"""Text environments: reproducible and resumable prompt streams, the ID/OOD mix, no evaluation
prompt ever served for RL, and step's rewards and infos on gold and garbage completions."""

from __future__ import annotations

import json

import pytest

from mechrl.config import CardsTaskConfig, ConfigError, EnvConfig, RewardSpec
from mechrl.envs import ExampleSampler, build_env
from mechrl.tasks import build_task
from mechrl.tasks.base import Task

CORRECT = [RewardSpec(name="cards_correct")]


def _env(task, reward=CORRECT, **env):
    return build_env(task, reward, EnvConfig(**env))


def _prompts(env, *sizes):
    return [it.prompt for n in sizes for it in env.reset(n)]


def _eval_prompts(task) -> set[str]:
    return {p for split in task.eval_splits for p in task.datasets[split]["prompt"]}


def test_same_seed_same_prompts(cards_task):
    a = _prompts(_env(cards_task, seed=3), 10, 10)
    assert a == _prompts(_env(cards_task, seed=3), 10, 10)
    assert a == _prompts(_env(cards_task, seed=3), 5, 15)  # the stream does not depend on the batching
    assert len(set(a)) > 15
    assert a != _prompts(_env(cards_task, seed=4), 20)


def test_state_dict_round_trip_continues_the_stream(cards_task):
    cfg = dict(seed=1, ood_fraction=0.3, ood_splits=["ood_composition", "ood_length"])
    env = _env(cards_task, **cfg)
    env.reset(7)
    state = json.loads(json.dumps(env.state_dict()))  # what a checkpoint stores
    expected = _prompts(env, 12)
    resumed = _env(cards_task, **cfg)
    assert _prompts(_env(cards_task, **cfg), 12) != expected  # a fresh env would start over
    resumed.load_state_dict(state)
    assert _prompts(resumed, 12) == expected
    assert resumed.state_dict() == env.state_dict()
    other = _env(cards_task, **{**cfg, "ood_fraction": 0.5})
    with pytest.raises(ValueError, match="ood_fraction: saved 0.3, now 0.5"):
        other.load_state_dict(state)


def test_ood_fraction_zero_gives_only_id_families(cards_task, small_cards_cfg):
    items = _env(cards_task, ood_fraction=0.0).reset(200)
    assert {it.example["family"] for it in items} == set(small_cards_cfg.id_families)
    assert {it.example["split"] for it in items} == {"train"}
    assert all(3 <= it.example["n_cards"] <= 6 and it.example["question"] == "score" for it in items)


def test_ood_fraction_one_gives_only_the_named_shift(cards_task, small_cards_cfg):
    items = _env(cards_task, ood_fraction=1.0, ood_splits=["ood_composition"]).reset(200)
    assert {it.example["family"] for it in items} == set(small_cards_cfg.composition_families)
    assert {it.example["split"] for it in items} == {"ood_composition"}


def test_ood_fraction_mixes_in_proportion(cards_task, small_cards_cfg):
    items = _env(cards_task, ood_fraction=0.25, ood_splits=["ood_length", "ood_bigsmall"]).reset(800)
    splits = [it.example["split"] for it in items]
    assert 0.19 < 1 - splits.count("train") / len(splits) < 0.31  # ~6 standard deviations around 0.25
    assert splits.count("ood_length") > 50 and splits.count("ood_bigsmall") > 50
    for it in items:
        long = it.example["n_cards"] >= small_cards_cfg.ood_min_cards
        assert long == (it.example["split"] == "ood_length")
        assert (it.example["question"] == "bigsmall") == (it.example["split"] == "ood_bigsmall")


def test_ood_splits_are_validated(cards_task):
    with pytest.raises(ConfigError, match=r"unknown OOD split 'ood_compostion'.*did you mean 'ood_composition'"):
        _env(cards_task, ood_fraction=0.5, ood_splits=["ood_compostion"])
    with pytest.raises(ConfigError, match="unknown OOD split 'test'"):
        _env(cards_task, ood_fraction=0.5, ood_splits=["test"])
    with pytest.raises(ConfigError, match="unknown reward"):
        _env(cards_task, reward=[RewardSpec(name="nope")])


def test_no_rl_prompt_is_an_evaluation_prompt(cards_task):
    env = _env(cards_task, ood_fraction=0.5, ood_splits=["ood_composition", "ood_paraphrase"])
    assert not set(_prompts(env, 500)) & _eval_prompts(cards_task)


def test_evaluation_prompts_are_redrawn_in_a_small_prompt_space():
    # one card of 12, one rule family of 2 colour pairs: 216 ID prompts, of which the test split holds
    # 100, so about every other fresh draw collides with an evaluation prompt and must be redrawn
    cfg = CardsTaskConfig(id_families=["color_sum_diff"], composition_families=["color_count_diff"],
                          min_cards=1, max_cards=1, max_value=2, thresholds=[0, 1], ood_min_cards=2,
                          ood_max_cards=2, n_train=30, n_val=20, n_test=100, n_ood=100)
    task = build_task(cfg)
    evals = _eval_prompts(task)
    env = _env(task, ood_fraction=0.5, ood_splits=["ood_paraphrase", "ood_bigsmall"])
    prompts = _prompts(env, 300)
    assert not set(prompts) & evals
    assert env.n_redrawn > 100, env.n_redrawn  # the redraw path was taken (else the check above means little)
    assert env.state_dict()["n_drawn"] == 300


def test_redrawing_gives_up_loudly(cards_task):
    env = _env(cards_task)
    test_example = dict(cards_task.datasets["test"][0])
    env.sampler = ExampleSampler("train", (), lambda rng, split: dict(test_example))
    with pytest.raises(RuntimeError, match="1000 draws from split 'train'"):
        env.reset(1)


def test_step_on_gold_wrong_and_garbage_completions(cards_task):
    env = _env(cards_task, reward=[RewardSpec(name="cards_correct"), RewardSpec(name="cards_format", weight=0.5)],
               ood_fraction=0.5, ood_splits=["ood_bigsmall", "ood_colors"])
    items = env.reset(40)
    assert {it.example["question"] for it in items} == {"score", "bigsmall"}

    gold = env.step(items, [it.example["completion"] for it in items])
    assert gold.rewards.components["cards_correct"].tolist() == [1.0] * 40
    assert gold.rewards.total.tolist() == pytest.approx([1.05] * 40)
    for it, info in zip(items, gold.infos):
        assert info == {"answer": it.example["answer"], "correct": True, "format_error": False,
                        "split": it.example["split"], "family": it.example["family"]}

    score_items = [it for it in items if it.example["question"] == "score"]
    wrong = [it.example["completion"].rsplit("= ", 1)[0] + "= 99" for it in score_items]  # well formed, wrong
    res = env.step(score_items, wrong)
    assert res.rewards.total.tolist() == pytest.approx([0.05] * len(score_items))
    assert all(i["answer"] == "99" and not i["correct"] and not i["format_error"] for i in res.infos)

    garbage = env.step(items, ["banana"] * 20 + [""] * 20)
    assert garbage.rewards.total.tolist() == [0.0] * 40
    assert all(i["answer"] is None and not i["correct"] and i["format_error"] for i in garbage.infos)

    with pytest.raises(ValueError, match="3 completions for 40 items"):
        env.step(items, ["x"] * 3)


def test_a_task_without_a_sampler_cannot_serve_rl_prompts():
    class Dummy(Task):
        name = "dummy"
        build_datasets = build_tokenizer = judge = None
        eval_splits = max_new_tokens = ()

    with pytest.raises(ConfigError, match="task 'dummy' cannot draw fresh RL prompts"):
        build_env(Dummy(), CORRECT, EnvConfig())
