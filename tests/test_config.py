"""Configs: validation, close-match suggestions, overrides, presets, run names."""

from __future__ import annotations

import pytest

from mechrl.config import ConfigError, load_config, parse_overrides, resolve_recipe


def test_recipe_loads_and_overrides_apply():
    cfg, name = load_config("recipes/cards-sft.yaml", ["train.lr=3e-4", "seed=7"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.seed == 7
    assert name == "cards-sft_lr3e-4_s7"


def test_run_name_carries_every_changed_value_and_seed():
    _, name = load_config("cards-sft", [])
    assert name == "cards-sft_s0"
    _, name = load_config("cards-sft", ["task.answer_format=direct", "train.batch_size=64", "model.tiny.n_layer=4"])
    assert name == "cards-sft_L4_direct_bs64_s0"  # keys in sorted order
    _, name = load_config("cards-sft", ["preset=smoke", "train.warmup_steps=5"])
    assert name == "cards-sft-smoke_warmup_steps_5_s0"
    # a value equal to the recipe's is not a difference
    _, name = load_config("cards-sft", ["train.lr=2e-3"])
    assert name == "cards-sft_s0"


def test_misspelled_key_names_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lrr' \(did you mean 'train\.lr'"):
        load_config("cards-sft", ["train.lrr=3e-4"])
    with pytest.raises(ConfigError, match=r"unknown key 'modle' \(did you mean 'model'"):
        load_config("cards-sft", ["modle.path=x"])
    with pytest.raises(ConfigError, match=r"'task\.answer_format'"):
        load_config("cards-sft", ["task.answr_format=direct"])


def test_wrong_type_and_bad_value_are_refused():
    with pytest.raises(ConfigError, match=r"train\.lr: .*valid number.*'abc'"):
        load_config("cards-sft", ["train.lr=abc"])
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config("cards-sft", ["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"task\.answer_format"):
        load_config("cards-sft", ["task.answer_format=essay"])


def test_invalid_combination_is_refused():
    with pytest.raises(ConfigError, match=r"min_cards \(9\) > max_cards \(6\)"):
        load_config("cards-sft", ["task.min_cards=9"])
    with pytest.raises(ConfigError, match="overlap"):
        load_config("cards-sft", ["task.ood_colors=[RED,PINK]"])
    with pytest.raises(ConfigError, match="divisible"):
        load_config("cards-sft", ["model.tiny.d_model=130"])


def test_unknown_preset_and_recipe():
    with pytest.raises(ConfigError, match="unknown preset 'tnyi'.*did you mean 'tiny'"):
        load_config("cards-sft", ["preset=tnyi"])
    with pytest.raises(ConfigError, match="recipe not found.*did you mean 'cards-sft'"):
        resolve_recipe("cards-stf")


def test_malformed_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("kind: sft\nname: x\ntrain:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: malformed YAML at line \d+"):
        load_config(p)


def test_override_parsing():
    assert parse_overrides(["a.b=3e-4", "c=7", "d=[x,y]", "e=true", "f=hello"]) == {
        "a.b": 3e-4, "c": 7, "d": ["x", "y"], "e": True, "f": "hello"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config("cards-sft", ["seed.x=1"])


def test_run_name_of_rewards_and_its_length_cap():
    _, name = load_config("cards-grpo", ["reward=[{name: contains_word, params: {word: RED}}, "
                                         "{name: cards_format, weight: 0.5}]"])
    assert name == "cards-grpo_reward_contains_word-wordRED-cards_formatx0.5_s0"
    long = [f"task.ood_colors=[{','.join(c * 12 for c in 'PQRSTUVWXYZ')}]"]
    _, a = load_config("cards-grpo", long)
    _, b = load_config("cards-grpo", long + ["train.lr=1e-3"])
    assert len(a) <= 160 and len(b) <= 160 and a != b and a.endswith("_s0")


def test_rl_configs_validate():
    with pytest.raises(ConfigError, match="ood_fraction > 0 needs ood_splits"):
        load_config("cards-grpo", ["env.ood_fraction=0.5"])
    with pytest.raises(ConfigError, match="listed twice"):
        load_config("cards-grpo", ["reward=[{name: cards_correct}, {name: cards_correct}]"])
    with pytest.raises(ConfigError, match=r"train\.loss_type"):
        load_config("cards-grpo", ["train.loss_type=ppo"])
    with pytest.raises(ConfigError, match=r"unknown key 'train\.num_generation' \(did you mean 'train\.num_generations'"):
        load_config("cards-grpo", ["train.num_generation=4"])
