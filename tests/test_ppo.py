"""The PPO loop: a toy reward is learned, the value head trains and is checkpointed, resume continues."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from mechrl.config import load_config
from mechrl.runs.rundir import RunDir
from mechrl.train.ppo import forward, rollout, run_ppo
from mechrl.train.rlcommon import Timer, setup_rl
from mechrl.train.ppo import make_value_head

TOY = ["task.n_train=200", "task.n_val=20", "task.n_test=20", "task.n_ood=20", "model.tiny.d_model=32",
       "model.tiny.n_layer=1", "reward=[{name: contains_word, params: {word: RED}}]", "train.max_new_tokens=8",
       "train.prompts_per_step=16", "train.lr=3e-3", "train.eval_every=1000", "train.save_every=1000",
       "train.kl_coef=0.01", "eval.n_per_split=4", "eval.n_final=4", "eval.max_new_tokens=4"]


def _cfg(tmp_path, *extra):
    return load_config("cards-ppo", [f"out_dir={tmp_path}", *TOY, *extra], kind="ppo")


def test_ppo_learns_a_toy_reward(tmp_path):
    cfg, name = _cfg(tmp_path, "train.max_steps=60")
    run = RunDir.start(cfg, name)
    # CPU seconds of this process, not wall time, so that other load on the machine does not fail the
    # test: 120 CPU-seconds is one minute of both cores of a 2-core machine.
    t0 = time.process_time()
    final = run_ppo(cfg, run)
    assert time.process_time() - t0 < 120
    rewards = [m["reward/mean"] for m in run.metrics() if "reward/mean" in m]
    assert len(rewards) == 60
    assert sum(rewards[:5]) / 5 < 0.5, rewards[:5]
    assert sum(rewards[-10:]) / 10 >= 0.75, rewards[-10:]
    assert (final / "resume" / "value_head.safetensors").exists()
    for key in ("objective/kl", "policy/clipfrac", "policy/approx_kl", "value/value_loss", "policy/entropy"):
        assert any(key in m for m in run.metrics()), key


def test_forward_matches_a_plain_forward(tmp_path):
    """PPO's log-probs of the completion tokens equal those of an unpadded single-sequence forward."""
    cfg, name = _cfg(tmp_path)
    st = setup_rl(cfg, RunDir.start(cfg, name), need_ref=False, make_modules=make_value_head)
    batch = rollout(st, Timer())
    with torch.no_grad():
        logp, values, ent = forward(st, batch, slice(None), temperature=1.0)
        for i in range(3):
            p = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
            c = batch.completion_ids[i][batch.completion_mask[i].bool()]
            logits = st.policy(torch.cat([p, c])[None]).logits[0, len(p) - 1:-1].float()
            ref = logits.log_softmax(-1).gather(-1, c[:, None]).squeeze(-1)
            torch.testing.assert_close(logp[i, :len(c)], ref, atol=1e-5, rtol=1e-5)
    assert values.shape == logp.shape == ent.shape
    assert torch.all(values == 0)  # the value head starts at zero


def test_ppo_resumes_with_its_value_head(tmp_path):
    args = ["train.max_steps=4", "train.save_every=2"]
    cfg, name = _cfg(tmp_path / "a", *args)
    run = RunDir.start(cfg, name)
    run_ppo(cfg, run)
    full = [m for m in run.metrics() if "reward/mean" in m]
    shutil.rmtree(run.checkpoint_path(4))  # as if killed after the step-2 checkpoint
    run.set_status("running")
    run2 = RunDir.start(cfg, name)
    run_ppo(cfg, run2)
    again = [m for m in run2.metrics() if "reward/mean" in m]
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    for a, b in zip(full, again):
        assert {k: v for k, v in a.items() if not k.startswith(("time/", "throughput/"))} == pytest.approx(
            {k: v for k, v in b.items() if not k.startswith(("time/", "throughput/"))}, rel=1e-5, abs=1e-6)
