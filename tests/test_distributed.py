"""Several processes (torchrun + accelerate, gloo on CPU) compute the same GRPO updates as one
process on the same global batch, draw exactly the single-process prompts between them, and only
rank 0 writes the run directory. Marked slow: the same for PPO, for SFT (TRL's trainer against
gradient accumulation), and a two-process GRPO run that resumes like an uninterrupted one.

The multi-process run is real: `tests/dist_worker.py` under `python -m torch.distributed.run
--nproc_per_node 2` (what `accelerate launch` starts on GPUs; accelerate's own launcher needs MPI
for several CPU processes), each process building its `Accelerator`. Each process records its
share of every batch; a single-process `run_grpo` then replays the concatenated global batch
through the real update (`GRPOHooks.on_batch` swaps the tensors in) and its losses, gradient norms
and final weights are compared.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mechrl.config import load_config
from mechrl.models.loading import load_model
from mechrl.runs.rundir import RunDir
from mechrl.tasks import build_task
from mechrl.train.grpo import GRPOHooks, run_grpo

ROOT = Path(__file__).resolve().parent.parent

# A tiny random model rewarded for colour words (groups of 4 completions of 12 tokens: most groups
# have some reward spread, so the advantages and gradients are not zero). "dapo" normalises by the
# global token count (all-reduced), beta > 0 adds the KL term, micro-batches of 4 accumulate.
TOY = ["task.n_train=200", "task.n_val=20", "task.n_test=20", "task.n_ood=20", "model.tiny.d_model=32",
       "model.tiny.n_layer=1", "model.device=cpu",
       "reward=[{name: word_count, params: {word: RED}}, {name: contains_word, params: {word: BLUE}}]",
       "train.max_new_tokens=12", "train.lr=3e-3", "train.max_steps=3", "train.eval_every=3", "train.save_every=3",
       "eval.n_per_split=4", "eval.n_final=4", "eval.max_new_tokens=4"]
GRPO = [*TOY, "train.prompts_per_step=4", "train.num_generations=4", "train.loss_type=dapo", "train.beta=0.04",
        "train.micro_batch_size=4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(kind: str, record_dir: Path, overrides: list[str], n: int = 2, timeout: float = 300) -> None:
    record_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "tests" / "dist_worker.py"), kind, str(record_dir),
           *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _global_batch(record_dir: Path, step: int, n: int, pad: int) -> dict:
    """The processes' shares of one step's batch, concatenated in rank order and padded to common
    widths (left for prompts, right for completions; padding is masked, so it changes no log-prob)."""
    parts = [torch.load(record_dir / f"batch-rank{r}-step{step}.pt", weights_only=True) for r in range(n)]
    P = max(p["prompt_ids"].size(1) for p in parts)
    T = max(p["completion_ids"].size(1) for p in parts)

    def left(x, w, v):
        return torch.nn.functional.pad(x, (w - x.size(1), 0), value=v)

    def right(x, w, v):
        return torch.nn.functional.pad(x, (0, w - x.size(1)), value=v)

    out = {"prompts": sum((p["prompts"] for p in parts), []),
           "prompt_ids": torch.cat([left(p["prompt_ids"], P, pad) for p in parts]),
           "prompt_mask": torch.cat([left(p["prompt_mask"], P, 0) for p in parts]),
           "completion_ids": torch.cat([right(p["completion_ids"], T, pad) for p in parts]),
           "completion_mask": torch.cat([right(p["completion_mask"], T, 0) for p in parts])}
    if "sampler_logp" in parts[0]:
        out["sampler_logp"] = torch.cat([right(p["sampler_logp"], T, 0.0) for p in parts])
    for key in ("advantages", "rewards", "scores"):
        if key in parts[0]:
            out[key] = torch.cat([p[key] for p in parts])
    return out


class _Replay(GRPOHooks):
    """Swap each step's batch for the global batch the processes sampled."""

    def __init__(self, record_dir: Path, n: int):
        self.dir, self.n, self.step = record_dir, n, 0

    def on_batch(self, st, batch):
        self.step += 1
        g = _global_batch(self.dir, self.step, self.n, st.tokenizer.pad_token_id)
        # the processes drew exactly the prompts one process draws, in the same order, groups whole
        assert g.pop("prompts") == batch.prompts, f"step {self.step}: prompts differ"
        for k, v in g.items():
            setattr(batch, k, v)
        return {}


def _run(out_dir: Path, kind: str = "grpo", overrides: list[str] = GRPO) -> RunDir:
    cfg, name = load_config(f"cards-{kind}", [f"out_dir={out_dir}", *overrides], kind=kind)
    return RunDir(Path(cfg.out_dir) / name)


def _assert_close_metrics(a_rows, b_rows, keys, rel=1e-4, abs=1e-7):
    assert len(a_rows) == len(b_rows) > 0
    for a, b in zip(a_rows, b_rows):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=abs), (a["step"], key, a[key], b[key])


def _assert_close_weights(path_a: Path, path_b: Path, atol: float) -> dict:
    wa, wb = load_file(path_a / "model.safetensors"), load_file(path_b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)
    return wb


def _moved(cfg, weights: dict) -> float:
    init, _ = load_model(cfg.model, build_task(cfg.task), seed=cfg.seed)
    return max((weights[k] - v.detach()).abs().max().item() for k, v in init.state_dict().items() if k in weights)


def test_two_processes_equal_one_process_and_only_rank0_writes(tmp_path):
    """Tolerance: per-step loss and gradient norm to rtol 1e-4 (atol 1e-7), final weights to atol 2e-5.
    The two runs compute the same sums in a different order (per-process partial sums, then an
    all-reduce) and over differently padded tensors, which moves float32 results by ~1e-7
    relative (measured: gradient norms equal to 3e-8, weights to 1.3e-6 after three Adam steps
    at lr 3e-3). A wrong normaliser changes the gradient norm far beyond that: a missing 1/N by a
    factor 2, a local instead of the global token count by the (percent-level) difference between
    the processes' token counts; a dropped all-reduce leaves each process's weights on its own data."""
    rec = tmp_path / "rec"
    _launch("grpo", rec, [f"out_dir={tmp_path / 'multi'}", *GRPO])
    multi = _run(tmp_path / "multi")

    # only rank 0 wrote: rank 1 made no file-system write under out_dir; the run dir holds one copy
    audits = [json.loads((rec / f"audit-rank{r}.json").read_text()) for r in (0, 1)]
    assert audits[1]["events"] == [], audits[1]["events"][:5]
    assert any(e[0] == "open" and e[1].endswith("metrics.jsonl") for e in audits[0]["events"])
    assert [r["step"] for r in multi.metrics()] == [0, 1, 2, 3, 3]  # eval 0, steps 1-3, eval 3: no duplicates
    assert [p.name for p in multi.checkpoints_dir.iterdir()] == ["step-3"]
    assert multi.finished
    rng = load_file(multi.checkpoint_path(3) / "resume" / "rng.safetensors")
    assert not torch.equal(rng["sampling"], rng["sampling_rank1"])  # one sampling stream per process
    assert json.loads((multi.checkpoint_path(3) / "resume" / "state.json").read_text())["world_size"] == 2

    # one process replays the global batches through the same update
    cfg, name = load_config("cards-grpo", [f"out_dir={tmp_path / 'single'}", *GRPO], kind="grpo")
    single = RunDir.start(cfg, name)
    hooks = _Replay(rec, 2)
    run_grpo(cfg, single, hooks=hooks)
    assert hooks.step == 3

    m_multi = [r for r in multi.metrics() if "policy/loss" in r]
    m_single = [r for r in single.metrics() if "policy/loss" in r]
    assert len(m_multi) == len(m_single) == 3
    assert max(r["policy/grad_norm"] for r in m_single) > 1e-2  # the comparison is not of zeros
    _assert_close_metrics(m_multi, m_single, ("policy/loss", "policy/grad_norm", "reward/mean", "reward/std",
                                              "completions/mean_length", "completions/max_length", "policy/entropy"))
    w = _assert_close_weights(multi.checkpoint_path(3), single.checkpoint_path(3), atol=2e-5)
    assert _moved(cfg, w) > 1e-3  # the weights moved far more than the tolerance


def _rank1_events(rec: Path) -> list:
    return json.loads((rec / "audit-rank1.json").read_text())["events"]


# PPO with one minibatch per epoch: the minibatch is the global batch on either side, so the order
# each process shuffles its share into does not change the update (the whitening and token
# normalisers are the global batch's).
PPO = [*TOY, "train.prompts_per_step=8", "train.ppo_epochs=2", "train.num_minibatches=1", "train.micro_batch_size=2",
       "train.kl_coef=0.05"]


@pytest.mark.slow
def test_ppo_two_processes_equal_one_process(tmp_path, monkeypatch):
    """As the GRPO test, for PPO (value head, KL penalty, GAE, whitened advantages, two epochs).
    Same tolerances and reasons: rtol 1e-4 on per-step metrics, atol 2e-5 on final weights."""
    from mechrl.train import ppo

    rec = tmp_path / "rec"
    _launch("ppo", rec, [f"out_dir={tmp_path / 'multi'}", *PPO])
    multi = _run(tmp_path / "multi", "ppo", PPO)
    assert _rank1_events(rec) == []
    assert multi.finished and [r["step"] for r in multi.metrics()] == [0, 1, 2, 3, 3]

    rollout, step = ppo.rollout, [0]

    def replay(st, timer):  # the real rollout (prompts, env scoring), then the processes' global batch
        batch = rollout(st, timer)
        step[0] += 1
        g = _global_batch(rec, step[0], 2, st.tokenizer.pad_token_id)
        assert g.pop("prompts") == batch.prompts, f"step {step[0]}: prompts differ"
        for k, v in g.items():
            setattr(batch, k, v)
        return batch

    monkeypatch.setattr(ppo, "rollout", replay)
    cfg, name = load_config("cards-ppo", [f"out_dir={tmp_path / 'single'}", *PPO], kind="ppo")
    single = RunDir.start(cfg, name)
    ppo.run_ppo(cfg, single)
    assert step[0] == 3
    m_multi = [r for r in multi.metrics() if "policy/grad_norm" in r]
    m_single = [r for r in single.metrics() if "policy/grad_norm" in r]
    assert max(r["policy/grad_norm"] for r in m_single) > 1e-2
    _assert_close_metrics(m_multi, m_single, ("policy/grad_norm", "reward/mean", "objective/kl", "value/mean",
                                              "value/returns_mean", "policy/policy_loss", "value/value_loss",
                                              "completions/mean_length"))
    w = _assert_close_weights(multi.checkpoint_path(3), single.checkpoint_path(3), atol=2e-5)
    assert _moved(cfg, w) > 1e-3


@pytest.mark.slow
def test_two_process_grpo_resumes_like_an_uninterrupted_run(tmp_path):
    """Checkpoint at step 2 of 4; remove the step-4 checkpoint and relaunch: both processes resume
    from step 2 (rank 1 with its own sampling stream) and log the same metrics again: the same
    samples, rewards and lengths exactly, float metrics to rtol 1e-6 (one launch to the next, a
    float32 loss was seen to differ in its last bit, 1e-7 relative; a wrong sampling stream on
    either rank changes the rewards and lengths outright)."""
    args = [f"out_dir={tmp_path / 'runs'}", *GRPO, "train.max_steps=4", "train.save_every=2", "train.eval_every=4"]
    _launch("grpo", tmp_path / "rec1", args)
    run = _run(tmp_path / "runs", "grpo", args[1:])
    first = [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in run.metrics()]
    import shutil

    shutil.rmtree(run.checkpoint_path(4))
    run.status_path.unlink()
    _launch("grpo", tmp_path / "rec2", args)
    again = [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in run.metrics()]
    assert [r["step"] for r in again] == [0, 1, 2, 3, 4, 4]
    diffs = [(a["step"], {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys()
                          if a.get(k) != pytest.approx(b.get(k), rel=1e-6, abs=1e-12)})
             for a, b in zip(first, again)]
    assert all(not d for _, d in diffs), [x for x in diffs if x[1]]
    assert sorted(p.name for p in (tmp_path / "rec2").glob("batch-*")) == [
        "batch-rank0-step1.pt", "batch-rank0-step2.pt", "batch-rank1-step1.pt", "batch-rank1-step2.pt"]  # 2 steps redone
    assert _rank1_events(tmp_path / "rec2") == []


SFT = ["preset=smoke", "task.n_train=200", "task.n_val=20", "task.n_test=20", "task.n_ood=20", "model.device=cpu",
       "model.tiny.d_model=32", "model.tiny.n_layer=1", "train.max_steps=4", "train.eval_every=2", "train.log_every=1",
       "train.warmup_steps=0", "eval.n_per_split=4", "eval.n_final=4", "eval.max_new_tokens=4"]


@pytest.mark.slow
def test_sft_two_processes_write_once_and_equal_gradient_accumulation(tmp_path):
    """TRL's SFTTrainer in 2 processes with batch 4 each takes the single-process batches 2k and
    2k+1 (accelerate's batch-sampler sharding), so it equals one process with batch 4 x 2
    accumulation steps: same losses (rtol 1e-4) and final weights (atol 2e-5), float summation
    order aside. Rank 1 writes nothing but its RNG state into the trainer's checkpoint folder."""
    from mechrl.train.sft import run_sft

    rec = tmp_path / "rec"
    _launch("sft", rec, [f"out_dir={tmp_path / 'multi'}", *SFT, "train.batch_size=4"])
    multi = _run(tmp_path / "multi", "sft", [*SFT, "train.batch_size=4"])
    assert multi.finished
    assert sorted(p.name for p in multi.checkpoints_dir.iterdir()) == ["step-2", "step-4"]
    assert sorted(p.name for p in multi.eval_dir.iterdir()) == ["step-2.json", "step-4.json"]
    for e in _rank1_events(rec):
        assert "/checkpoints/_trainer/checkpoint-" in e[1] and (e[0] == "os.mkdir" or e[1].endswith("rng_state_1.pth")), e
    assert (multi.checkpoint_path(4) / "rng_state_1.pth").exists()

    cfg, name = load_config("cards-sft", [f"out_dir={tmp_path / 'single'}", *SFT, "train.batch_size=4",
                                          "train.grad_accum=2"], kind="sft")
    single = RunDir.start(cfg, name)
    run_sft(cfg, single)
    losses = [[r for r in run.metrics() if "train/loss" in r] for run in (multi, single)]
    _assert_close_metrics(*losses, ("train/loss", "train/grad_norm"))
    w = _assert_close_weights(multi.checkpoint_path(4), single.checkpoint_path(4), atol=2e-5)
    assert _moved(cfg, w) > 1e-3


def test_shares_of_the_global_batch():
    from mechrl.errors import UserError
    from mechrl.train.distributed import Dist, sampling_seed

    cpu = torch.device("cpu")
    assert [Dist(r, 3, cpu).share(6) for r in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 6)]
    with pytest.raises(UserError, match="prompts_per_step=4 must be divisible by the number of processes \\(3\\)"):
        Dist(0, 3, cpu).share(4, "train.prompts_per_step")
    assert sampling_seed(7, 0) == 7  # rank 0 samples as one process does
    assert len({sampling_seed(7, r) for r in range(4)} | {sampling_seed(8, r) for r in range(4)}) == 8


def test_rundir_is_read_only_on_other_ranks(tmp_path, monkeypatch):
    cfg, name = load_config("cards-grpo", [f"out_dir={tmp_path}", *GRPO], kind="grpo")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    run = RunDir.start(cfg, name)
    assert run.readonly and not run.path.exists()  # rank 1 created nothing
    for write in (lambda: run.set_status("running"), lambda: run.log_metrics(1, {"a": 1.0}),
                  lambda: run.log_samples([{}]), lambda: run.write_eval(1, {}), run.attach_log):
        with pytest.raises(RuntimeError, match="only rank 0 writes the run directory"):
            write()
    assert not run.path.exists()
    monkeypatch.setenv("RANK", "0")
    assert not RunDir.start(cfg, name).readonly and run.path.is_dir()
