"""The reward-hacking baselines of gradient routing: filtering (kept-row advantages, the update of a
batch without the flagged rows), penalty, early stopping; and a routed run that resumes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mechrl.cli import main
from mechrl.config import ConfigError, load_config
from mechrl.runs.rundir import RunDir, read_jsonl
from mechrl.train.grpo import GRPOHooks, Timer, policy_update, rollout
from mechrl.train.losses import group_advantages, kept_group_advantages
from mechrl.train.mitigation import MitigationHooks
from mechrl.train.rlcommon import setup_rl

TOY = ["task.n_train=200", "task.n_val=20", "task.n_test=20", "task.n_ood=20", "model.tiny.d_model=32",
       "model.tiny.n_layer=1", "model.tiny.arch=llama", "reward=[{name: contains_word, params: {word: RED}}]",
       "train.max_new_tokens=8", "train.prompts_per_step=3", "train.num_generations=4", "train.eval_every=1000",
       "train.save_every=1000", "eval.n_per_split=4", "eval.n_final=4", "eval.max_new_tokens=4",
       "train.max_grad_norm=1e9", "train.beta=0.05"]
DETECT = "mitigation.detector={name: contains_word, params: {word: the}}"


# ----------------------------------------------------------------------------------------------
# Advantages of the kept rows
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_kept_advantages_equal_group_advantages_when_all_kept(scale):
    r = torch.randn(24, dtype=torch.float64)
    want, _ = group_advantages(r, 6, scale)
    torch.testing.assert_close(kept_group_advantages(r, torch.ones(24, dtype=torch.bool), 6, scale), want)


def test_kept_advantages_are_those_of_the_kept_rows_alone():
    G = 5
    r = torch.randn(4 * G, dtype=torch.float64)
    keep = torch.tensor([1, 0, 1, 1, 0,  0, 0, 0, 0, 0,  1, 0, 0, 0, 0,  1, 1, 1, 1, 1], dtype=torch.bool)
    got = kept_group_advantages(r, keep, G, "group")
    for g in range(4):
        sl = slice(g * G, (g + 1) * G)
        k = keep[sl]
        kept = r[sl][k]
        if kept.numel() > 1:  # the group of the kept rows alone, by hand
            want = (kept - kept.mean()) / (kept.std(correction=1) + 1e-4)
        else:  # one kept row: std 0, advantage 0 (as a group of one)
            want = torch.zeros_like(kept)
        torch.testing.assert_close(got[sl][k], want)
        assert (got[sl][~k] == 0).all()
    # "batch": one std over the kept rows of the whole batch
    got_b = kept_group_advantages(r, keep, G, "batch")
    torch.testing.assert_close(got_b[keep].abs().sum() > 0, torch.tensor(True))
    g0 = r[:G][keep[:G]]
    torch.testing.assert_close(got_b[:G][keep[:G]], (g0 - g0.mean()) / (r[keep].std(correction=1) + 1e-4))


# ----------------------------------------------------------------------------------------------
# Filtering and penalty in the update
# ----------------------------------------------------------------------------------------------

def _state(tmp_path, *extra):
    cfg, name = load_config("cards-grpo", [f"out_dir={tmp_path}", *TOY, *extra], kind="grpo")
    st = setup_rl(cfg, RunDir.start(cfg, name), need_ref=True)
    return st, rollout(st, Timer())


def _grads(st, batch, init, size=None):
    st.policy.load_state_dict(init)
    st.optimizer.state.clear()
    policy_update(st, batch, GRPOHooks(), micro_batch_size=size)
    return {n: p.grad.clone() for n, p in st.policy.named_parameters() if p.grad is not None}


def _rows(batch, idx):
    """The batch restricted to rows `idx`, as if only they had been sampled."""
    sub = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "rewards", "advantages",
              "sampler_logp"):
        sub[k] = sub[k][idx]
    sub["texts"] = [batch.texts[i] for i in idx.tolist()]
    sub["prompts"] = [batch.prompts[i] for i in idx.tolist()]
    sub["labels"], sub["keep"], sub["ref_logp"], sub["old_logp"] = {}, None, None, None
    return dataclasses.replace(batch, **sub)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_a_filtered_update_is_the_update_of_the_batch_without_the_dropped_rows(tmp_path, loss_type):
    st, batch = _state(tmp_path, f"train.loss_type={loss_type}")
    batch.advantages = torch.randn_like(batch.advantages)
    B = batch.rewards.numel()
    keep = torch.tensor([i % 4 != 1 for i in range(B)])
    init = {k: v.clone() for k, v in st.policy.state_dict().items()}
    ref = _grads(st, _rows(batch, keep.nonzero().flatten()), init)
    full = _grads(st, batch, init)
    batch.keep = keep
    for size in (None, 2):
        got = _grads(st, batch, init, size)
        assert got.keys() == ref.keys() and len(ref) > 0
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5, msg=f"{n} (micro-batch {size})")
    assert any(not torch.allclose(full[n], ref[n], atol=1e-5) for n in ref)  # dropping changed the update
    # a partition that touches a dropped row is refused
    class Bad(GRPOHooks):
        def partition(self, st, batch, size):
            return [torch.arange(B)]
    with pytest.raises(RuntimeError, match="no dropped row"):
        policy_update(st, batch, Bad())


def test_filter_and_penalty_hooks_on_a_labelled_batch(tmp_path):
    st, batch = _state(tmp_path, "mitigation.method=filter", DETECT)
    G = st.cfg.train.num_generations
    texts = ["the cat", "a dog", "The end", "none"]
    batch.texts = texts * (len(batch.texts) // 4)
    rewards = batch.rewards.clone()
    m = MitigationHooks(st.cfg).on_batch(st, batch)
    flagged = torch.tensor([True, False, True, False] * (len(texts) and len(batch.texts) // 4))
    assert torch.equal(batch.labels["flagged"], flagged) and m["detector/flag_rate"] == 0.5
    assert torch.equal(batch.keep, ~flagged) and m["detector/kept_frac"] == 0.5
    torch.testing.assert_close(batch.advantages, kept_group_advantages(rewards, ~flagged, G, "group"))
    assert torch.equal(batch.rewards, rewards)  # filtering leaves the rewards as they are

    cfg = st.cfg.model_copy(update={"mitigation": st.cfg.mitigation.model_copy(update={"method": "penalty",
                                                                                       "penalty": 0.7})})
    batch.keep, batch.rewards = None, rewards.clone()
    MitigationHooks(cfg).on_batch(st, batch)
    torch.testing.assert_close(batch.rewards, rewards - 0.7 * flagged.float())
    torch.testing.assert_close(batch.advantages, group_advantages(rewards - 0.7 * flagged.float(), G, "group")[0])
    assert batch.keep is None


def test_mitigation_config_checks():
    with pytest.raises(ConfigError, match="needs mitigation.detector"):
        load_config("cards-grpo", ["mitigation.method=filter"], kind="grpo")
    with pytest.raises(ConfigError, match="exclusive"):
        load_config("cards-grpo", ["routing.enabled=true", "routing.detector={name: contains_happy}",
                                   "mitigation.detector={name: contains_happy}"], kind="grpo")
    with pytest.raises(ConfigError, match="exactly one of"):
        load_config("cards-grpo", ["train.early_stop={metric: reward/mean}"], kind="grpo")


def test_filter_run_end_to_end_logs_the_detector(tmp_path):
    args = ["grpo", "cards-grpo", f"out_dir={tmp_path}", *TOY, "train.max_steps=3", "mitigation.method=filter",
            "mitigation.detector={name: contains_word, params: {word: BLUE}}"]
    assert main(args) == 0
    (run,) = list(tmp_path.iterdir())
    rows = [m for m in read_jsonl(run / "metrics.jsonl") if "detector/flag_rate" in m]
    assert [m["step"] for m in rows] == [1, 2, 3]
    assert all(m["detector/kept_frac"] == pytest.approx(1 - m["detector/flag_rate"]) for m in rows)


# ----------------------------------------------------------------------------------------------
# Early stopping
# ----------------------------------------------------------------------------------------------

def test_early_stop_stops_checkpoints_and_stays_stopped(tmp_path, capsys):
    args = ["grpo", "cards-grpo", f"out_dir={tmp_path}", *TOY, "train.max_steps=8",
            "train.early_stop={metric: reward/mean, above: -1.0, window: 2, min_steps: 3}"]
    assert main(args) == 0
    (run,) = list(tmp_path.iterdir())
    status = json.loads((run / "status.json").read_text())
    assert status["stopped_early"]["step"] == 3 and status["final_checkpoint"].endswith("step-3")
    assert (run / "checkpoints" / "step-3" / "model.safetensors").is_file()
    assert (run / "eval" / "step-3.json").is_file()  # the final evaluation ran at the stop
    steps = [m["step"] for m in read_jsonl(run / "metrics.jsonl") if "reward/mean" in m]
    assert steps == [1, 2, 3]
    assert main(args) == 0  # rerun: already finished, nothing more trained
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl") if "reward/mean" in m] == [1, 2, 3]
    assert not (run / "checkpoints" / "step-4").exists()


def test_early_stop_that_never_triggers_runs_to_the_end(tmp_path):
    assert main(["grpo", "cards-grpo", f"out_dir={tmp_path}", *TOY, "train.max_steps=3",
                 "train.early_stop={metric: reward/mean, below: -1.0}"]) == 0
    (run,) = list(tmp_path.iterdir())
    status = json.loads((run / "status.json").read_text())
    assert status["stopped_early"] is None and status["final_checkpoint"].endswith("step-3")


def test_early_stop_on_a_metric_that_is_not_logged_names_close_ones(tmp_path, capsys):
    code = main(["grpo", "cards-grpo", f"out_dir={tmp_path}", *TOY, "train.max_steps=3",
                 "train.early_stop={metric: reward/maen, above: 0.5}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "reward/maen" in err and "reward/mean" in err


# ----------------------------------------------------------------------------------------------
# A routed run resumes
# ----------------------------------------------------------------------------------------------

class _Interrupt(Exception):
    pass


def test_routed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Stop a routed run (label noise on, so the detector's random stream matters) after its step-2
    checkpoint; the rerun resumes from it and ends with the metrics of an uninterrupted run."""
    from mechrl.train import routing

    args = [*TOY, "train.max_steps=4", "train.save_every=2", "routing.enabled=true", "routing.eval_every=2",
            "routing.detector={name: contains_word, params: {word: the}, label_noise: 0.3}", "routing.eval_n=4"]
    assert main(["grpo", "cards-grpo", f"out_dir={tmp_path / 'clean'}", *args]) == 0
    original = routing.RoutingHooks.after_step

    def after_step(self, st, step, batch):
        if step == 3:
            raise _Interrupt()
        return original(self, st, step, batch)

    monkeypatch.setattr(routing.RoutingHooks, "after_step", after_step)
    with pytest.raises(_Interrupt):
        main(["grpo", "cards-grpo", f"out_dir={tmp_path / 'killed'}", *args])
    monkeypatch.setattr(routing.RoutingHooks, "after_step", original)
    (run,) = list((tmp_path / "killed").iterdir())
    assert RunDir(run).latest_checkpoint()[0] == 2
    assert main(["grpo", "cards-grpo", f"out_dir={tmp_path / 'killed'}", *args]) == 0
    assert "resuming" in (run / "train.log").read_text()
    (clean,) = list((tmp_path / "clean").iterdir())

    def strip(p):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))}
                for r in read_jsonl(p / "metrics.jsonl")]

    a, b = strip(run), strip(clean)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra == pytest.approx(rb, rel=1e-5, abs=1e-6)
