"""Routing variants used to look for absorption: a warm-up without routing, the forget adapter ablated
for the last steps, known-good labels trained without the forget adapter, frontloaded detector labels;
each against a reference computed another way, and a run with every phase resuming exactly."""

from __future__ import annotations

import pytest
import torch

from mechrl.cli import main
from mechrl.config import ConfigError, load_config
from mechrl.models.dual_lora import get_scales, scales
from mechrl.runs.rundir import RunDir, read_jsonl
from mechrl.train.detect import DetectorHooks
from mechrl.train.grpo import GRPOHooks
from mechrl.train.losses import kept_group_advantages
from mechrl.train.routing import PHASE_ABLATED, PHASE_ROUTED, PHASE_WARMUP, RoutingHooks
from test_routing import TOY, _state, _subset_grads, _update_grads

THE = "routing.detector={name: contains_word, params: {word: the}}"


def _label_texts(batch, pattern=("the cat", "a dog", "The end", "none")):
    """Completions the `the` detector flags at known rows (rows 0 and 2 of every 4)."""
    batch.texts = [pattern[i % 4] for i in range(len(batch.texts))]


def test_warmup_uses_no_labels_then_routing_starts(tmp_path, cards_tok):
    st, batch = _state(tmp_path, cards_tok, THE, "routing.start_step=3")
    _label_texts(batch)
    init = {k: v.clone() for k, v in st.policy.state_dict().items()}
    hooks = RoutingHooks(st.cfg)
    hooks.before_step(st, 2)
    metrics = hooks.on_batch(st, batch)
    assert hooks.phase == PHASE_WARMUP and metrics["routing/phase"] == PHASE_WARMUP
    assert metrics["routing/flag_rate"] == 0.5  # the labels are logged ...
    assert not batch.labels["flagged"].any()  # ... and not used
    adv = batch.advantages.clone()
    warm = _update_grads(st, batch, hooks, 2, init)
    ref = _update_grads(st, batch, GRPOHooks(), None, init)  # the unrouted update of the same batch
    assert warm.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(warm[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)
    hooks.before_step(st, 3)
    batch.advantages = adv
    hooks.on_batch(st, batch)
    assert hooks.phase == PHASE_ROUTED and batch.labels["flagged"].sum() == batch.labels["flagged"].numel() // 2


def test_ablated_forget_adapter_trains_retain_alone_on_unflagged_rows(tmp_path, cards_tok):
    st, batch = _state(tmp_path, cards_tok, THE, "routing.ablate_forget_from=4", "routing.unflagged_baseline=true")
    _label_texts(batch)
    init = {k: v.clone() for k, v in st.policy.state_dict().items()}
    hooks = RoutingHooks(st.cfg)
    hooks.before_step(st, 3)
    assert hooks.phase == PHASE_ROUTED and get_scales(st.policy) == (1.0, 1.0)
    hooks.before_step(st, 4)
    assert hooks.phase == PHASE_ABLATED and get_scales(st.policy) == (1.0, 0.0)
    t = st.cfg.train
    raw_adv = batch.advantages.clone()
    metrics = hooks.on_batch(st, batch)
    unflagged = ~batch.labels["flagged"]
    assert metrics["routing/kept_frac"] == 0.5 and torch.equal(batch.keep, unflagged)
    torch.testing.assert_close(batch.advantages,
                               kept_group_advantages(batch.rewards, unflagged, t.num_generations, t.scale_rewards))
    parts = hooks.partition(st, batch, 2)
    assert sorted(torch.cat(parts).tolist()) == unflagged.nonzero().flatten().tolist()
    got = _update_grads(st, batch, hooks, 2, init)
    assert got and all("_retain" in n for n in got)  # the forget adapter is out of the graph
    # reference: the unflagged rows alone, with the forget adapter switched off, no routing
    ref_batch = batch
    ref_batch.labels = {}
    with scales(st.policy, 1.0, 0.0):
        ref = _update_grads(st, ref_batch, GRPOHooks(), None, init)
    assert ref.keys() == got.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)
    assert not torch.equal(raw_adv, batch.advantages)


def test_known_good_rows_update_only_the_retain_adapter_without_the_forget_adapter(tmp_path, cards_tok):
    st, batch = _state(tmp_path, cards_tok, THE, "routing.good_label_fraction=0.7", "routing.unflagged_baseline=false")
    _label_texts(batch)
    init = {k: v.clone() for k, v in st.policy.state_dict().items()}
    hooks = RoutingHooks(st.cfg)
    hooks.before_step(st, 5)
    hooks.on_batch(st, batch)
    good, flagged = batch.labels["good"], batch.labels["flagged"]
    assert good.any() and not (good & (flagged | batch.labels["hack"])).any()  # only truly clean, unflagged rows
    first = good.clone()
    hooks.on_batch(st, batch)
    assert torch.equal(batch.labels["good"], first)  # the same step draws the same labels
    hooks.before_step(st, 6)
    hooks.on_batch(st, batch)
    assert not torch.equal(batch.labels["good"], first)  # another step, other draws
    hooks.before_step(st, 5)
    hooks.on_batch(st, batch)
    for idx in hooks.partition(st, batch, 3):
        kinds = {(bool(flagged[i]), bool(good[i])) for i in idx.tolist()}
        assert len(kinds) == 1
    routed = _update_grads(st, batch, hooks, 3, init)
    others = (~good).nonzero().flatten()
    forget_ref = _subset_grads(st, batch, others, init)  # classic: every non-good row reaches forget
    retain_plain = _subset_grads(st, batch, (~good & ~flagged).nonzero().flatten(), init)
    st.policy.load_state_dict(init)
    with scales(st.policy, 1.0, 0.0):
        retain_good = _subset_grads(st, batch, good.nonzero().flatten(), init)
    for n, g in routed.items():
        ref = forget_ref[n] if "_forget" in n else retain_plain[n] + retain_good[n]
        torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-5, msg=n)


def test_frontloaded_labels_report_every_hack_then_match_a_run_without_them(tmp_path, cards_tok):
    st, batch = _state(tmp_path, cards_tok, THE)
    _label_texts(batch)
    raw = torch.tensor([i % 4 in (0, 2) for i in range(len(batch.texts))])
    spec = {"name": "contains_word", "params": {"word": "the"}, "coverage": 0.5}
    front = DetectorHooks({**spec, "full_coverage_steps": 2}, run_seed=0, single_process_reason="test")
    plain = DetectorHooks(spec, run_seed=0, single_process_reason="test")
    seen, extras = [], {"front": {}, "plain": {}}  # each hooks keeps its detector state in its own extras
    for step in (1, 2, 3, 4):
        got = {}
        for name, hooks in (("front", front), ("plain", plain)):
            st.extra = extras[name]
            hooks.before_step(st, step)
            m = hooks.label(st, batch)
            got[name] = batch.labels["flagged"].clone()
            if name == "front":
                assert m["detector/frontloaded"] == float(step <= 2)
        seen.append(got)
        if step <= 2:
            assert torch.equal(got["front"], raw)  # coverage 1 while frontloaded
            assert not torch.equal(got["plain"], raw)  # coverage 0.5 drops some
        else:
            assert torch.equal(got["front"], got["plain"])  # the same stream afterwards
    st.extra = {}
    with pytest.raises(RuntimeError, match="before_step"):
        DetectorHooks({**spec, "full_coverage_steps": 1}, run_seed=0, single_process_reason="t").label(st, batch)


def test_phase_config_checks():
    with pytest.raises(ConfigError, match="must come after"):
        load_config("cards-grpo", [*TOY, "routing.start_step=5", "routing.ablate_forget_from=5"], kind="grpo")
    with pytest.raises(ConfigError, match="good_label_fraction"):
        load_config("cards-grpo", [*TOY, "routing.good_label_fraction=1.5"], kind="grpo")


class _Interrupt(Exception):
    pass


def test_run_with_every_phase_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Warm-up (step 1), routed (2-3), forget ablated (4-5), frontloaded labels and known-good labels:
    stopped after the step-4 checkpoint, the rerun ends with the metrics of an uninterrupted run (the
    forget adapter is switched off again before the first resumed step)."""
    from mechrl.train import routing

    args = [*TOY, "train.max_steps=5", "train.save_every=2", "routing.eval_every=5", "routing.eval_n=4",
            "routing.start_step=2", "routing.ablate_forget_from=4", "routing.good_label_fraction=0.3",
            "routing.detector={name: contains_word, params: {word: the}, coverage: 0.5, full_coverage_steps: 2}"]
    assert main(["grpo", "cards-grpo", f"out_dir={tmp_path / 'clean'}", *args]) == 0
    original = routing.RoutingHooks.after_step

    def after_step(self, st, step, batch):
        if step == 5:
            raise _Interrupt()
        return original(self, st, step, batch)

    monkeypatch.setattr(routing.RoutingHooks, "after_step", after_step)
    with pytest.raises(_Interrupt):
        main(["grpo", "cards-grpo", f"out_dir={tmp_path / 'killed'}", *args])
    monkeypatch.setattr(routing.RoutingHooks, "after_step", original)
    (run,) = list((tmp_path / "killed").iterdir())
    assert RunDir(run).latest_checkpoint()[0] == 4
    assert main(["grpo", "cards-grpo", f"out_dir={tmp_path / 'killed'}", *args]) == 0
    (clean,) = list((tmp_path / "clean").iterdir())

    def strip(p):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))}
                for r in read_jsonl(p / "metrics.jsonl")]

    a, b = strip(run), strip(clean)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    phases = [(r["step"], r["routing/phase"]) for r in b if "routing/phase" in r]
    assert phases == [(1, PHASE_WARMUP), (2, PHASE_ROUTED), (3, PHASE_ROUTED), (4, PHASE_ABLATED), (5, PHASE_ABLATED)]
    for ra, rb in zip(a, b):
        assert ra == pytest.approx(rb, rel=1e-5, abs=1e-6)
