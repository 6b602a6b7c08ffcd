"""The GRPO loop: every trainable parameter moves, micro-batching does not change the update, a toy
reward is learned, and a run killed with SIGKILL resumes where it left off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mechrl.config import load_config
from mechrl.runs.rundir import RunDir
from mechrl.train.grpo import GRPOHooks, Timer, policy_update, rollout, run_grpo
from mechrl.train.rlcommon import setup_rl

# A tiny random model on the card task's vocabulary, rewarded for saying a word: learnable in seconds.
TOY = ["task.n_train=200", "task.n_val=20", "task.n_test=20", "task.n_ood=20", "model.tiny.d_model=32",
       "model.tiny.n_layer=1", "reward=[{name: contains_word, params: {word: RED}}]", "train.max_new_tokens=8",
       "train.prompts_per_step=4", "train.num_generations=4", "train.lr=3e-3", "train.eval_every=1000",
       "train.save_every=1000", "eval.n_per_split=4", "eval.n_final=4", "eval.max_new_tokens=4"]


def _cfg(tmp_path, *extra):
    return load_config("cards-grpo", [f"out_dir={tmp_path}", *TOY, *extra], kind="grpo")


def _state(tmp_path, *extra):
    cfg, name = _cfg(tmp_path, *extra)
    return setup_rl(cfg, RunDir.start(cfg, name), need_ref=cfg.train.beta > 0)


@pytest.mark.parametrize("extra", [[], ["train.lora={rank: 4}"], ["train.beta=0.1", "train.num_iterations=2"]])
def test_every_trainable_parameter_changes(tmp_path, extra):
    st = _state(tmp_path, *extra)
    before = {n: p.detach().clone() for n, p in st.policy.named_parameters() if p.requires_grad}
    assert before
    batch = rollout(st, Timer())
    # make sure the advantages are not all zero (else no parameter would move, rightly)
    batch.advantages = torch.randn_like(batch.advantages)
    policy_update(st, batch, GRPOHooks())
    if st.uses_lora:  # LoRA's B starts at zero, so A has no gradient until B has moved once
        policy_update(st, batch, GRPOHooks())
    unchanged = [n for n, p in st.policy.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged, f"parameters that did not change: {unchanged}"
    if "train.lora={rank: 4}" in extra:
        assert all("lora_" in n for n in before)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_give_the_same_gradients(tmp_path, loss_type):
    """Batch 16 x accumulation 1 equals batch 1 x accumulation 16 (and 4 x 4)."""
    st = _state(tmp_path, f"train.loss_type={loss_type}", "train.beta=0.05")
    batch = rollout(st, Timer())
    batch.advantages = torch.randn_like(batch.advantages)
    init = {k: v.clone() for k, v in st.policy.state_dict().items()}
    grads = {}
    for size in (None, 1, 4):
        st.policy.load_state_dict(init)
        st.optimizer.state.clear()
        loss, _, _ = policy_update(st, batch, GRPOHooks(), micro_batch_size=size)
        grads[size] = ({n: p.grad.clone() for n, p in st.policy.named_parameters() if p.grad is not None}, loss)
    ref_grads, ref_loss = grads[None]
    for size in (1, 4):
        g, loss = grads[size]
        assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
        for n in ref_grads:
            torch.testing.assert_close(g[n], ref_grads[n], atol=1e-6, rtol=1e-5, msg=f"{n} (micro-batch {size})")


def test_update_micro_batch_by_device_and_logit_size():
    """Unset `train.micro_batch_size`: the whole batch on an accelerator; on CPU whole groups whose
    float32 logits fit in `CPU_LOGITS_BYTES` (hand-computed), at least one group; a set value wins."""
    from types import SimpleNamespace

    from mechrl.config import GRPOConfig
    from mechrl.train.rlcommon import CPU_LOGITS_BYTES, update_micro_batch

    def state(device, vocab, size=None):
        cfg = SimpleNamespace(train=GRPOConfig(micro_batch_size=size))
        policy = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: SimpleNamespace(vocab_size=vocab)))
        return SimpleNamespace(cfg=cfg, device=torch.device(device), policy=policy)

    assert CPU_LOGITS_BYTES == 32 * 2**20
    # 8 rows x 32 tokens x 4,096 words x 4 bytes = 4 MiB a group: 8 groups = 64 rows in 32 MiB
    assert update_micro_batch(state("cpu", 4096), rows=128, length=32, group=8) == 64
    assert update_micro_batch(state("cpu", 4096), rows=64, length=32, group=8) is None  # fits whole
    # 16 x 64 x 50,257 x 4 = 196 MiB for one group: still one whole group (its prompt pass is shared)
    assert update_micro_batch(state("cpu", 50257), rows=128, length=64, group=16) == 16
    assert update_micro_batch(state("cpu", 50257), rows=8, length=64) == 2  # 12.3 MiB a row (PPO: no groups)
    assert update_micro_batch(state("cuda", 50257), rows=128, length=64, group=16) is None
    assert update_micro_batch(state("cpu", 4096, size=5), rows=128, length=32, group=8) == 5


def test_grpo_learns_a_toy_reward(tmp_path):
    cfg, name = _cfg(tmp_path, "train.max_steps=60", "train.prompts_per_step=8")
    run = RunDir.start(cfg, name)
    # CPU seconds of this process, not wall time, so that other load on the machine does not fail the
    # test: 120 CPU-seconds is one minute of both cores of a 2-core machine.
    t0 = time.process_time()
    final = run_grpo(cfg, run)
    assert time.process_time() - t0 < 120
    rewards = [m["reward/mean"] for m in run.metrics() if "reward/mean" in m]
    assert len(rewards) == 60
    assert sum(rewards[:5]) / 5 < 0.5, rewards[:5]  # the untrained model rarely says the word
    assert sum(rewards[-5:]) / 5 >= 0.8, rewards[-5:]
    assert (final / "model.safetensors").exists() and (final / "resume" / "optimizer.pt").exists()
    for key in ("reward/std", "reward/contains_word/mean", "reward/frac_reward_zero_std", "policy/clip_ratio/region_mean",
                "completions/mean_length", "policy/entropy", "time/step_s", "throughput/tokens_per_s"):
        assert any(key in r for r in run.metrics()), key
    assert run.finished
    assert "<img src=\"data:image/png;base64," in (run.path / "report.html").read_text()  # written at the end


def _metrics_without_time(run):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in run.metrics()]


def test_killed_run_resumes_and_continues(tmp_path):
    """SIGKILL a `mechrl grpo` process after its first checkpoint; the rerun resumes from it, keeps
    whole JSONL lines only, and ends with the same metrics as an uninterrupted run."""
    args = [*TOY, "train.max_steps=60", "train.save_every=3", "train.eval_every=30", "train.log_every=1"]
    exe = os.path.join(os.path.dirname(sys.executable), "mechrl")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([exe, "grpo", "cards-grpo", f"out_dir={killed_dir}", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            cps = list(killed_dir.glob("*/checkpoints/step-*"))
            if cps:
                break
            time.sleep(0.05)
        assert cps, "no checkpoint appeared"
        assert proc.poll() is None, "the run finished before it could be killed; make it longer"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    (run_path,) = list(killed_dir.iterdir())
    lines = (run_path / "metrics.jsonl").read_bytes().split(b"\n")
    done = RunDir(run_path).latest_checkpoint()[0]
    assert done < 60
    r = subprocess.run([exe, "grpo", "cards-grpo", f"out_dir={killed_dir}", *args], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming {run_path.name} from" in (run_path / "train.log").read_text()
    text = (run_path / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    for line in text.splitlines():
        json.loads(line)  # whole lines only
    resumed = RunDir(run_path)
    steps = [m["step"] for m in resumed.metrics() if "reward/mean" in m]
    assert steps == list(range(1, 61)), steps
    r = subprocess.run([exe, "grpo", "cards-grpo", f"out_dir={clean_dir}", *args], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    clean = RunDir(next(clean_dir.iterdir()))
    a, b = _metrics_without_time(resumed), _metrics_without_time(clean)
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra == pytest.approx(rb, rel=1e-5, abs=1e-6)
    assert len(lines) > 1


def test_reward_of_wrong_length_is_an_error(tmp_path):
    from mechrl.rewards import register_reward

    @register_reward("test_wrong_length")
    def wrong(prompts, completions, examples):
        return [0.0] * (len(completions) - 1)

    st = _state(tmp_path, "reward=[{name: test_wrong_length}]")
    with pytest.raises(ValueError, match="test_wrong_length"):
        rollout(st, Timer())
