"""Feature-control reward components (score, feature penalty, latent KL, monitors) through the reward registry;
their zero cases; one-line errors; GRPO and PPO runs with them; best-of-N; feature selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fc_helpers import COMPLETIONS, PROMPTS, tiny_sarm
from mechrl.config import ConfigError, RewardSpec, build_config
from mechrl.control.features import SelectionConfig, best_of_n, pick_best, select_features
from mechrl.control.penalties import build_human_buffer, load_cached, penalty_values
from mechrl.control.sarm import FeatureIndexError
from mechrl.errors import UserError
from mechrl.rewards import build_reward
from mechrl.runs.rundir import RunDir, read_jsonl


@pytest.fixture
def saved(tmp_path):
    """(path of a saved tiny SAEReward, the loaded model the rewards share)."""
    path = tiny_sarm(tmp_path / "lm").save(tmp_path / "sarm")
    return str(path), load_cached(path)


def _reward(*specs):
    return build_reward([RewardSpec(**s) for s in specs])


def test_sarm_score_component_is_the_models_score(saved):
    path, sarm = saved
    out = _reward({"name": "sarm_score", "params": {"sarm": path}})(PROMPTS, COMPLETIONS, [{}] * 3)
    torch.testing.assert_close(out.components["sarm_score"], sarm.score(PROMPTS, COMPLETIONS), atol=1e-6, rtol=0)
    # a head edit inside the RM: the contribution of the zeroed latents is gone, and the model is unchanged after
    attr = sarm.attribution(PROMPTS, COMPLETIONS)
    i = int(attr.abs().sum(0).argmax())
    edited = _reward({"name": "sarm_score", "params": {"sarm": path, "head_zero": [i]}})(PROMPTS, COMPLETIONS, [{}] * 3)
    torch.testing.assert_close(edited.total, sarm.score(PROMPTS, COMPLETIONS) - attr[:, i], atol=1e-5, rtol=0)
    clamped = _reward({"name": "sarm_score", "params": {"sarm": path, "clamp_set": {i: 0.0}}})(PROMPTS, COMPLETIONS, [{}] * 3)
    torch.testing.assert_close(clamped.total, edited.total, atol=1e-5, rtol=0)
    assert sarm._clamps == [] and sarm.head[i] != 0


def test_feature_penalty_is_zero_when_nothing_fires_and_alpha_sum_when_all_fire(saved):
    path, sarm = saved
    z = sarm.raw_latents(PROMPTS, COMPLETIONS)
    feats = [int(i) for i in z.abs().sum(0).argsort(descending=True)[:3]]
    none = _reward({"name": "feature_penalty", "params": {"sarm": path, "features": feats, "taus": 1e9}})
    assert none(PROMPTS, COMPLETIONS, [{}] * 3).total.tolist() == [0.0, 0.0, 0.0]
    every = _reward({"name": "feature_penalty", "params": {"sarm": path, "features": feats, "taus": -1e9,
                                                           "alphas": [0.5, 1.0, 2.0]}})
    assert every(PROMPTS, COMPLETIONS, [{}] * 3).total.tolist() == [-3.5, -3.5, -3.5]
    # by hand: tau between values
    zz = torch.tensor([[0.0, 2.0, 5.0], [1.0, 0.0, 0.5]])
    assert penalty_values(zz, [1, 2], [1.0, 0.5], [0.3, 2.0]).tolist() == pytest.approx([-2.3, 0.0])
    assert penalty_values(zz, [0], [0.0], [1.0]).tolist() == [0.0, -1.0]  # strictly above tau


@pytest.mark.parametrize("params, err, match", [
    ({"features": [48]}, FeatureIndexError, r"penalised feature index 48 is out of range: the SAE has 48 latents"),
    ({"features": ["x"]}, ConfigError, "features"),
    ({"features": [1], "taus": float("nan")}, ConfigError, "tau of feature 1 must be a finite number"),
    ({"features": [1, 2], "taus": [0.0]}, ConfigError, "1 taus for 2 features"),
    ({"features": [1], "alphas": -1.0}, ConfigError, "alphas must be >= 0"),
    ({"features": [1, 1]}, ConfigError, "listed twice"),
])
def test_bad_penalty_config_is_a_one_line_error(saved, params, err, match):
    path, _ = saved
    with pytest.raises(err, match=match) as e:
        _reward({"name": "feature_penalty", "params": {"sarm": path, **params}})
    assert "\n" not in str(e.value) and isinstance(e.value, UserError)


def test_latent_kl_is_zero_when_policy_and_human_latents_are_equal(saved, tmp_path):
    path, sarm = saved
    prompts, texts = PROMPTS * 8, [c + f" it {w} ." for c in COMPLETIONS for w in
                                   ("slept", "smiled", "laughed", "cried", "waited", "sang", "sighed", "nodded")]
    idx = [int(i) for i in sarm.raw_latents(prompts, texts).abs().sum(0).argsort(descending=True)[:6]]
    human = build_human_buffer(sarm, prompts, texts, idx, tmp_path / "human.safetensors")
    r = _reward({"name": "latent_kl", "params": {"sarm": path, "human": str(human)}},
                {"name": "latent_firing_kl", "weight": 0.0, "params": {"sarm": path, "human": str(human)}})
    out = r(prompts, texts, [{}] * len(texts))  # the policy's batch is the human set itself
    assert out.components["latent_kl"].abs().max() < 1e-3
    assert out.components["latent_firing_kl"].abs().max() < 1e-9
    # a different batch: the monitor sees the firing rates move
    other = r(PROMPTS, [" .", " the the the .", " happy happy happy ."], [{}] * 3)
    assert other.components["latent_firing_kl"][0] > 0.05
    with pytest.raises(ConfigError, match="does not exist"):
        _reward({"name": "latent_kl", "params": {"sarm": path, "human": str(tmp_path / "none.safetensors")}})


def test_latent_kl_components_keep_their_own_state_per_reward(saved, tmp_path):
    path, sarm = saved
    human = build_human_buffer(sarm, PROMPTS * 4, COMPLETIONS * 4, [0, 1, 2], tmp_path / "h.safetensors")
    spec = {"name": "latent_kl", "params": {"sarm": path, "human": str(human), "refresh_every": 100}}
    a, b = _reward(spec), _reward(spec)
    a(PROMPTS * 2, COMPLETIONS * 2, [{}] * 6)
    fa = a._parts[0][2]
    fb = b._parts[0][2]
    assert fa is not fb  # each Reward built its own component (and with it its own buffer)


def test_feature_fires_monitor(saved):
    path, sarm = saved
    z = sarm.raw_latents(PROMPTS, COMPLETIONS)
    i = int(z.abs().sum(0).argmax())
    out = _reward({"name": f"feature_fires_{i}", "weight": 0.0, "params": {"sarm": path, "tau": 0.0}})(
        PROMPTS, COMPLETIONS, [{}] * 3)
    assert out.components[f"feature_fires_{i}"].tolist() == (z[:, i] > 0).float().tolist()
    assert out.total.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(FeatureIndexError, match="out of range"):
        _reward({"name": "feature_fires_99", "params": {"sarm": path}})(PROMPTS, COMPLETIONS, [{}] * 3)


def test_best_of_n_returns_the_argmax_under_the_scorer():
    prompts = ["a", "b"]
    cands = [[" x", " yy", " zzz"], [" qqqq", " r", " ss"]]
    picked = best_of_n(prompts, cands, lambda p, c: [float(len(t)) for t in c])
    assert picked == [" zzz", " qqqq"]
    picked = best_of_n(prompts, cands, lambda p, c: [-float(len(t)) for t in c])
    assert picked == [" x", " r"]
    assert pick_best([[1.0, 3.0, 3.0]]) == [1]  # first of ties
    with pytest.raises(ValueError, match="non-finite"):
        pick_best([[1.0, float("nan")]])
    with pytest.raises(ValueError, match="returned 1 scores for 6"):
        best_of_n(prompts, cands, lambda p, c: [0.0])


def test_select_features_ranks_hack_features_with_positive_weight():
    rng = np.random.default_rng(0)
    n, d = 400, 6
    hack = rng.integers(0, 3, size=n).astype(float)
    z = np.abs(rng.normal(size=(n, d))) * 0.1
    z[:, 2] += hack  # a hack feature the head rewards
    z[:, 4] += 0.5 * hack  # a weaker one
    z[:, 5] += hack  # correlated with the hack but the head punishes it: not a bias carrier
    w = np.array([0.1, -0.2, 2.0, 0.3, 1.0, -1.0])
    ev = {"head_weight": w, "attr_diff": w * rng.normal(size=d), "hack_corr": np.array([np.corrcoef(z[:, i], hack)[0, 1] for i in range(d)]),
          "word_corr": {"happy": np.zeros(d)}, "fire_hack": np.ones(d), "fire_clean": np.ones(d),
          "bias_contribution": w * (z[hack > 0].mean(0) - z[hack == 0].mean(0)), "mean_attribution": w * z.mean(0),
          "z": z, "hack": hack}
    sel = select_features(ev, SelectionConfig(min_corr=0.5, max_features=3, tau_quantile=0.9, n_kl_features=4,
                                              causal_check=False))
    assert [f["index"] for f in sel["features"]] == [2, 4]
    f = sel["features"][0]
    assert f["tau"] == pytest.approx(np.quantile(z[hack == 0, 2], 0.9))
    assert f["above_tau_clean"] <= 0.1 + 1e-9 and f["above_tau_hack"] > 0.9
    assert sel["kl_indices"][:2] == [2, 4] and len(sel["kl_indices"]) == 4


# ----------------------------------------------------------------------------------------------
# RL with the components: GRPO and PPO
# ----------------------------------------------------------------------------------------------

def _rl_config(kind: str, tmp_path, path: str, human: str, feats: list[int]):
    data = {
        "kind": kind, "name": f"fc-{kind}", "out_dir": str(tmp_path / "runs"),
        "task": {"name": "stories", "n_train": 50, "n_val": 10, "n_test": 10},
        "model": {"tiny": {"arch": "llama", "n_layer": 1, "d_model": 32, "n_head": 4}},
        "reward": [{"name": "sarm_score", "params": {"sarm": path}},
                   {"name": "feature_penalty", "params": {"sarm": path, "features": feats, "taus": 0.0, "alphas": 0.5}},
                   {"name": "latent_kl", "weight": 0.1, "params": {"sarm": path, "human": human, "refresh_every": 2}},
                   {"name": "latent_firing_kl", "weight": 0.0, "params": {"sarm": path, "human": human}},
                   {"name": f"feature_fires_{feats[0]}", "weight": 0.0, "params": {"sarm": path}},
                   {"name": "positive_word_any", "weight": 0.0}],
        "train": {"max_steps": 3, "prompts_per_step": 2, "max_new_tokens": 8, "save_every": 100, "eval_every": 100,
                  "lr": 1e-3},
        "eval": {"n_per_split": 2, "n_final": 2, "max_new_tokens": 4},
    }
    data["train"].update({"num_generations": 4} if kind == "grpo" else {"kl_coef": 0.0, "ppo_epochs": 1})
    return build_config(data)[0]


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_rl_with_feature_control_logs_every_term_and_leaves_the_rm_frozen(saved, tmp_path, kind):
    from mechrl.train.grpo import run_grpo
    from mechrl.train.ppo import run_ppo

    torch.set_num_threads(1)
    path, sarm = saved
    feats = [int(i) for i in sarm.raw_latents(PROMPTS, COMPLETIONS).abs().sum(0).argsort(descending=True)[:2]]
    human = str(build_human_buffer(sarm, PROMPTS * 4, COMPLETIONS * 4, feats + [5, 6], tmp_path / "h.safetensors"))
    before = {k: v.clone() for k, v in sarm.trunk.state_dict().items()}
    head = sarm.head.clone()
    cfg = _rl_config(kind, tmp_path, path, human, feats)
    run = RunDir.start(cfg, cfg.name)
    (run_grpo if kind == "grpo" else run_ppo)(cfg, run)
    rows = [r for r in read_jsonl(run.metrics_path) if "reward/sarm_score/mean" in r]
    assert len(rows) == 3
    for key in ("reward/feature_penalty/mean", "reward/latent_kl/mean", "reward/latent_firing_kl/mean",
                f"reward/feature_fires_{feats[0]}/mean", "reward/positive_word_any/mean"):
        assert all(key in r for r in rows), key
    assert all(-1.0 <= r["reward/feature_penalty/mean"] <= 0.0 for r in rows)
    # the frozen reward model: no parameter moved, none takes gradients
    assert all(torch.equal(before[k], v) for k, v in sarm.trunk.state_dict().items())
    assert torch.equal(sarm.head, head)
    assert not any(p.requires_grad for p in sarm.trunk.parameters())
    # the total is the weighted sum of the components, with the penalty's sign
    r = rows[-1]
    want = r["reward/sarm_score/mean"] + r["reward/feature_penalty/mean"] + 0.1 * r["reward/latent_kl/mean"]
    assert r["reward/mean"] == pytest.approx(want, abs=1e-5)


def test_causal_check_keeps_only_candidates_whose_clamp_helps():
    rng = np.random.default_rng(1)
    n, d = 300, 5
    hack = rng.integers(0, 3, size=n).astype(float)
    z = np.abs(rng.normal(size=(n, d))) * 0.1 + hack[:, None] * np.array([1.0, 0.9, 0.8, 0.7, 0.0])
    w = np.array([1.0, 1.0, 1.0, 1.0, 1.0])
    ev = {"head_weight": w, "attr_diff": w, "hack_corr": np.array([np.corrcoef(z[:, i], hack)[0, 1] for i in range(d)]),
          "word_corr": {}, "fire_hack": np.ones(d), "fire_clean": np.ones(d),
          "bias_contribution": w * (z[hack > 0].mean(0) - z[hack == 0].mean(0)), "mean_attribution": w * z.mean(0),
          "z": z, "hack": hack}
    gains = {0: 0.05, 1: -0.1, 2: 0.0, 3: 0.02}
    probed = []
    sel = select_features(ev, SelectionConfig(min_corr=0.5, max_features=3, max_candidates=3),
                          probe=lambda i: probed.append(i) or gains[i])
    assert probed == [0, 1, 2]  # the first max_candidates by bias contribution
    assert [f["index"] for f in sel["features"]] == [0]
    assert sel["causal_check"] == [{"index": 0, "conflict_accuracy_gain": 0.05, "kept": True},
                                   {"index": 1, "conflict_accuracy_gain": -0.1, "kept": False},
                                   {"index": 2, "conflict_accuracy_gain": 0.0, "kept": False}]
    with pytest.raises(ValueError, match="needs a probe"):
        select_features(ev, SelectionConfig())


def test_top_activating_marks_the_words_whose_deletion_lowers_the_latent(saved):
    from mechrl.control.features import top_activating

    _, sarm = saved
    z = sarm.raw_latents(PROMPTS, COMPLETIONS)
    i = int(z.abs().sum(0).argmax())
    top = top_activating(sarm, i, PROMPTS, COMPLETIONS, n=2, mark_fraction=1.0)
    assert [t["text_index"] for t in top] == z[:, i].argsort(descending=True)[:2].tolist()
    t = top[0]
    words = t["completion"].split(" ")
    best = max(t["word_drops"], key=t["word_drops"].get)
    k = words.index(best)
    without = " ".join(words[:k] + words[k + 1:])
    want = float(z[t["text_index"], i] - sarm.raw_latents([t["prompt"]], [without])[0, i])
    assert t["word_drops"][best] == pytest.approx(want, abs=1e-4)
    if want > 0:
        assert f"[[{best}]]" in t["marked"]
