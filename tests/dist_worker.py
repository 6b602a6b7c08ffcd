"""One process of a multi-process RL or SFT run, for tests/test_distributed.py (run it with
`accelerate launch --cpu --num_processes 2 tests/dist_worker.py KIND RECORD_DIR override ...`).

It runs `mechrl grpo|ppo|sft` the library way and records, outside the run directory:
- `audit-rank{r}.json`: every file-system write this process made under the run's `out_dir`
  (from Python's audit events: open for writing, mkdir, rename, replace, remove, rmtree, mkstemp);
- `batch-rank{r}-step{k}.pt` (GRPO, PPO): this process's share of each step's batch, so that a
  single-process run can replay the global batch and compare its update.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _install_audit(root: Path, events: list) -> None:
    root_s = str(root.resolve())

    def under(p) -> bool:
        if isinstance(p, bytes):
            p = p.decode(errors="replace")
        return isinstance(p, (str, os.PathLike)) and os.path.abspath(os.fspath(p)).startswith(root_s)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & WRITE_FLAGS)
            if writes and under(path):
                events.append([event, os.fspath(path)])
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "tempfile.mkstemp", "os.truncate"):
            if under(args[0]):
                events.append([event, os.fspath(args[0])])
        elif event in ("os.rename", "os.replace"):
            if under(args[0]) or under(args[1]):
                events.append([event, os.fspath(args[0]), os.fspath(args[1])])

    sys.addaudithook(hook)


def record_hooks(record_dir: Path, rank: int):
    """GRPO hooks that save this process's share of every batch (test instrumentation); every other
    hook is GRPOHooks' own."""
    from mechrl.train.grpo import GRPOHooks

    class RecordHooks(GRPOHooks):
        def __init__(self):
            self.step = 0

        def on_batch(self, st, batch):
            self.step += 1
            torch.save({"prompt_ids": batch.prompt_ids, "prompt_mask": batch.prompt_mask,
                        "completion_ids": batch.completion_ids, "completion_mask": batch.completion_mask,
                        "advantages": batch.advantages, "rewards": batch.rewards, "sampler_logp": batch.sampler_logp,
                        "prompts": batch.prompts}, record_dir / f"batch-rank{rank}-step{self.step}.pt")
            return super().on_batch(st, batch)

    return RecordHooks()


def _record_ppo_rollouts(ppo, record_dir: Path, rank: int) -> None:
    """Wrap `ppo.rollout` (which `ppo_step` calls) so that each step's batch share is saved."""
    rollout, step = ppo.rollout, [0]

    def recording(st, timer):
        batch = rollout(st, timer)
        step[0] += 1
        torch.save({"prompt_ids": batch.prompt_ids, "prompt_mask": batch.prompt_mask,
                    "completion_ids": batch.completion_ids, "completion_mask": batch.completion_mask,
                    "scores": batch.scores, "prompts": batch.prompts},
                   record_dir / f"batch-rank{rank}-step{step[0]}.pt")
        return batch

    ppo.rollout = recording


def main() -> None:
    kind, record_dir, *overrides = sys.argv[1:]
    record_dir = Path(record_dir)
    rank = int(os.environ["RANK"])
    from mechrl.config import load_config
    from mechrl.runs.rundir import RunDir

    cfg, name = load_config(f"cards-{kind}", overrides, kind=kind)
    events: list = []
    _install_audit(Path(cfg.out_dir), events)
    run = RunDir.start(cfg, name)
    if kind == "grpo":
        from mechrl.train.grpo import run_grpo

        final = run_grpo(cfg, run, hooks=record_hooks(record_dir, rank))
    elif kind == "ppo":
        from mechrl.train import ppo

        _record_ppo_rollouts(ppo, record_dir, rank)
        final = ppo.run_ppo(cfg, run)
    else:
        from mechrl.train.sft import run_sft

        final = run_sft(cfg, run)
    (record_dir / f"audit-rank{rank}.json").write_text(json.dumps({"events": events, "final": str(final)}))


if __name__ == "__main__":
    main()
