"""Compute accounting (`mechrl.train.compute`): token-passes counted by hand for small batches, a tiny
GRPO run and a tiny SFT run, and the checkpoints and stops that compute marks trigger."""

from __future__ import annotations

import json

import pytest
import torch

from mechrl.config import ConfigError, load_config
from mechrl.runs.rundir import RunDir, read_jsonl
from mechrl.train.compute import crossed, pass_tokens, sft_token_passes
from mechrl.train.grpo import GRPOHooks, run_grpo


def test_pass_tokens_by_hand():
    # two prompts (3 and 2 real tokens, left-padded), each sampled twice: a GRPO group of G = 2
    prompt_ids = torch.tensor([[0, 5, 6, 7], [0, 5, 6, 7], [0, 0, 8, 9], [0, 0, 8, 9]])
    prompt_mask = (prompt_ids != 0).long()
    completion_mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])  # 2, 1, 3, 4 tokens
    # shared: 3 + 2 prompt tokens once each, 2 + 1 + 3 + 4 completion tokens
    assert pass_tokens(prompt_ids, prompt_mask, completion_mask) == 15
    assert pass_tokens(prompt_ids, prompt_mask, completion_mask, share_prompts=False) == 3 + 3 + 2 + 2 + 10
    assert pass_tokens(prompt_ids, prompt_mask, completion_mask, torch.tensor([0, 2])) == 3 + 2 + 2 + 3
    assert pass_tokens(prompt_ids, prompt_mask, completion_mask, slice(0, 2)) == 3 + 2 + 1  # one prompt, shared
    assert pass_tokens(prompt_ids, prompt_mask, completion_mask, torch.tensor([], dtype=torch.long)) == 0
    # the same ids under another padding are another prompt (as the sampler sees them)
    assert pass_tokens(torch.tensor([[0, 5], [5, 5]]), torch.tensor([[0, 1], [1, 1]]), torch.ones(2, 1)) == 1 + 2 + 2
    with pytest.raises(ValueError, match="shapes disagree"):
        pass_tokens(prompt_ids, prompt_mask[:, :2], completion_mask)
    assert sft_token_passes(7) == 21
    assert crossed(0, 10, [5, 10, 11]) == [5, 10] and crossed(10, 20, [5, 10, 11]) == [11]


class _Record(GRPOHooks):
    """Keeps each step's batch tensors, to count its token-passes independently of the loop."""

    def __init__(self):
        self.batches = []

    def after_step(self, st, step, batch):
        self.batches.append((batch.prompt_ids.clone(), batch.prompt_mask.clone(), batch.completion_mask.clone()))
        return {}


def _hand_pass(prompt_ids, prompt_mask, completion_mask) -> int:
    """One pass over a batch, counted with Python loops: distinct prompts once, completions per row."""
    seen, total = set(), 0
    for i in range(prompt_ids.size(0)):
        key = (tuple(prompt_ids[i].tolist()), tuple(prompt_mask[i].tolist()))
        if key not in seen:
            seen.add(key)
            total += sum(prompt_mask[i].tolist())
        total += sum(completion_mask[i].tolist())
    return total


TINY = ["task.n_train=200", "task.n_val=20", "task.n_test=20", "task.n_ood=20", "model.tiny.d_model=32",
        "model.tiny.n_layer=1", "train.max_new_tokens=6", "train.prompts_per_step=2", "train.num_generations=3",
        "train.eval_every=1000", "train.save_every=1000", "eval.n_per_split=4", "eval.n_final=4",
        "eval.max_new_tokens=4", "train.lr=1e-3"]


def test_grpo_counts_sampling_old_reference_and_updates(tmp_path):
    """beta > 0 and two iterations: per step 1 (sampling) + 1 (old log-probs) + 1 (reference) + 2 x 3
    (updates) = 9 passes over the batch, the G rows of a group sharing one prompt pass."""
    cfg, name = load_config("cards-grpo", [f"out_dir={tmp_path}", *TINY, "train.max_steps=3", "train.beta=0.1",
                                           "train.num_iterations=2"], kind="grpo")
    hooks = _Record()
    run = RunDir.start(cfg, name)
    run_grpo(cfg, run, hooks=hooks)
    metrics = [r for r in read_jsonl(run.metrics_path) if "compute/step_token_passes" in r]
    assert [r["step"] for r in metrics] == [1, 2, 3]
    expected = [9 * _hand_pass(*b) for b in hooks.batches]
    assert [r["compute/step_token_passes"] for r in metrics] == expected
    running = [sum(expected[:i + 1]) for i in range(3)]
    assert [r["compute/token_passes"] for r in metrics] == running
    final = json.loads((run.eval_dir / "step-3.json").read_text())
    assert final["compute"]["token_passes"] == running[-1]
    assert json.loads((run.path / "status.json").read_text())["token_passes"] == running[-1]
    # every evaluated example's correctness, in split order, matches the split's accuracy
    for split, r in final["splits"].items():
        s = final["correct"][split]
        assert len(s) == r["n"] and s.count("1") / len(s) == pytest.approx(r["accuracy"])


def test_grpo_micro_batches_pay_their_own_prompt_pass(tmp_path):
    """With micro-batches of 1 every row runs its prompt again in the update (and the one pass of
    sampling still shares it): 1 x shared + 3 x unshared."""
    cfg, name = load_config("cards-grpo", [f"out_dir={tmp_path}", *TINY, "train.max_steps=1",
                                           "train.micro_batch_size=1"], kind="grpo")
    hooks = _Record()
    run = RunDir.start(cfg, name)
    run_grpo(cfg, run, hooks=hooks)
    (p, pm, cm), = hooks.batches
    unshared = int(pm.sum() + cm.sum())
    m = [r for r in read_jsonl(run.metrics_path) if "compute/step_token_passes" in r]
    assert m[0]["compute/step_token_passes"] == _hand_pass(p, pm, cm) + 3 * unshared
    assert unshared > _hand_pass(p, pm, cm)  # the groups did share their prompt in sampling


def test_compute_marks_checkpoint_and_the_budget_stops_the_run(tmp_path):
    cfg, name = load_config("cards-grpo", [f"out_dir={tmp_path}", *TINY, "train.max_steps=8"], kind="grpo")
    run = RunDir.start(cfg, name)
    run_grpo(cfg, run)  # a reference run: the same seed draws the same batches
    per_step = [r["compute/token_passes"] for r in read_jsonl(run.metrics_path) if "compute/token_passes" in r]
    # marks inside steps 2 and 4, the budget inside step 6
    marks = [per_step[0] + 1, per_step[3]]
    budget = per_step[4] + 1
    cfg2, name2 = load_config("cards-grpo", [f"out_dir={tmp_path / 'b'}", *TINY, "train.max_steps=50",
                                             f"train.checkpoint_at_compute={marks}",
                                             f"train.max_token_passes={budget}"], kind="grpo")
    run2 = RunDir.start(cfg2, name2)
    final = run_grpo(cfg2, run2)
    assert final.name == "step-6"
    assert [s for s, _ in run2.checkpoints()] == [2, 4, 6]
    assert sorted(int(p.stem.split("-")[1]) for p in run2.eval_dir.glob("step-*.json")) == [0, 2, 4, 6]
    for step in (2, 4, 6):
        assert json.loads((run2.eval_dir / f"step-{step}.json").read_text())["compute"]["token_passes"] == per_step[step - 1]
    status = json.loads((run2.path / "status.json").read_text())
    assert status["stopped_early"]["max_token_passes"] == budget and status["token_passes"] == per_step[5]
    # a rerun is finished already: nothing more is trained
    n = len(read_jsonl(run2.metrics_path))
    assert run_grpo(cfg2, RunDir.start(cfg2, name2)) == final
    assert len(read_jsonl(run2.metrics_path)) == n
    with pytest.raises(ConfigError, match="past max_token_passes"):
        load_config("cards-grpo", [f"out_dir={tmp_path}", *TINY, "train.checkpoint_at_compute=[100]",
                                   "train.max_token_passes=50"], kind="grpo")


def test_sft_counts_three_passes_per_real_token_and_checkpoints_at_marks(tmp_path):
    """Batch = the whole 8-example train split, so every step sees each example once: per step
    3 x the sum over examples of prompt + completion + EOS tokens, counted with the tokenizer."""
    from mechrl.models.loading import load_pretrained
    from mechrl.tasks import build_task
    from mechrl.train.sft import run_sft

    base = [f"out_dir={tmp_path}", "task.n_train=8", "task.n_val=10", "task.n_test=10", "task.n_ood=10",
            "model.tiny.n_layer=1", "model.tiny.d_model=32", "train.batch_size=8", "train.max_steps=4",
            "train.warmup_steps=0", "train.eval_every=4", "train.log_every=1", "eval.n_per_split=4",
            "eval.n_final=4", "eval.max_new_tokens=4"]
    cfg, _ = load_config("cards-sft", base, kind="sft")
    task = build_task(cfg.task)
    from mechrl.models.loading import load_model

    _, tok = load_model(cfg.model, task, seed=0)
    per_step = 0
    for ex in task.datasets["train"]:
        per_step += len(tok(ex["prompt"], add_special_tokens=False)["input_ids"])
        per_step += len(tok(ex["completion"], add_special_tokens=False)["input_ids"]) + 1  # + EOS
    per_step *= 3
    cfg, name = load_config("cards-sft", [*base, f"train.checkpoint_at_compute=[{per_step + 1}]"], kind="sft")
    run = RunDir.start(cfg, name)
    final = run_sft(cfg, run)
    logged = [r["compute/token_passes"] for r in read_jsonl(run.metrics_path) if "compute/token_passes" in r]
    assert logged == [per_step * k for k in (1, 2, 3, 4)]
    assert [s for s, _ in run.checkpoints()] == [2, 4]  # the mark lies inside step 2
    assert json.loads((run.eval_dir / "step-2.json").read_text())["compute"]["token_passes"] == 2 * per_step
    assert json.loads((run.eval_dir / "step-4.json").read_text())["compute"]["token_passes"] == 4 * per_step
    assert json.loads((run.path / "status.json").read_text())["token_passes"] == 4 * per_step
    load_pretrained(final)  # the final checkpoint is a plain model


def test_ppo_counts_sampling_old_values_reference_and_epochs(tmp_path, monkeypatch):
    """kl_coef > 0, 2 epochs: 1 (sampling) + 1 (old log-probs and values) + 1 (reference) + 2 x 3
    (updates) passes; PPO's forward runs every row's prompt in full."""
    from mechrl.train import ppo

    seen = []
    original = ppo.rollout

    def rollout(st, timer):
        batch = original(st, timer)
        seen.append((batch.prompt_ids.clone(), batch.prompt_mask.clone(), batch.completion_mask.clone()))
        return batch

    monkeypatch.setattr(ppo, "rollout", rollout)
    tiny = [o for o in TINY if not o.startswith("train.num_generations")]
    cfg, name = load_config("cards-ppo", [f"out_dir={tmp_path}", *tiny, "train.max_steps=2", "train.ppo_epochs=2",
                                          "train.kl_coef=0.05", "train.num_minibatches=2"], kind="ppo")
    run = RunDir.start(cfg, name)
    ppo.run_ppo(cfg, run)
    metrics = [r for r in read_jsonl(run.metrics_path) if "compute/step_token_passes" in r]
    expected = [_hand_pass(p, pm, cm) + 8 * int(pm.sum() + cm.sum()) for p, pm, cm in seen]
    assert [r["compute/step_token_passes"] for r in metrics] == expected
    assert metrics[-1]["compute/token_passes"] == sum(expected)
