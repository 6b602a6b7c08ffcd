"""Evaluation: greedy completions on every split, judged by the task, broken down by group.

`evaluate(model, tokenizer, task, n)` returns

    {"splits": {"test": {"accuracy": 0.93, "format_error_rate": 0.01, "n": 1000,
                         "groups": {"color_sum_diff": {"accuracy": ..., "format_error_rate": ..., "n": ...}}},
                "ood_colors": {...}, ...},
     "samples": [{"split", "prompt", "completion", "answer", "gold", "correct", "format_error", "group"}, ...]}

and `flat_metrics(result)` the `eval/<split>/accuracy`-style keys logged to metrics.jsonl.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mechrl.tasks.base import Task


@torch.no_grad()
def greedy_complete(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str], *,
                    max_new_tokens: int, batch_size: int = 256, desc: str | None = None) -> list[str]:
    """Greedy completions (text up to the first EOS, special tokens removed), in prompt order."""
    from mechrl.train.rollout import generate  # the fast sampler; imported here to keep import time low

    out: list[str] = []
    batches = range(0, len(prompts), batch_size)
    for i in tqdm(batches, desc=desc, leave=False, disable=desc is None):
        chunk = prompts[i:i + batch_size]
        roll = generate(model, tok, chunk, max_new_tokens=max_new_tokens, temperature=0.0)
        out.extend(roll.texts)
    return out


def _rate(xs: list[bool]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def evaluate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, task: Task, *, n: int,
             splits: tuple[str, ...] | None = None, batch_size: int = 256, max_new_tokens: int | None = None,
             progress: bool = True) -> dict:
    """Judge greedy completions of the first `n` examples of each split."""
    if n < 1:
        raise ValueError(f"evaluate: n must be at least 1, got {n}")
    was_training = model.training
    model.eval()
    splits = tuple(splits or task.eval_splits)
    max_new = max_new_tokens or task.max_new_tokens
    result: dict = {"splits": {}, "samples": []}
    try:
        for split in splits:
            ds = task.datasets[split]
            ds = ds.select(range(min(n, len(ds))))
            examples = ds.to_list()
            completions = greedy_complete(model, tok, [e["prompt"] for e in examples], max_new_tokens=max_new,
                                          batch_size=batch_size, desc=f"eval {split}" if progress else None)
            groups: dict[str, dict[str, list[bool]]] = defaultdict(lambda: {"correct": [], "format_error": []})
            correct, fmt = [], []
            for ex, comp in zip(examples, completions, strict=True):
                j = task.judge(comp, ex)
                correct.append(j.correct)
                fmt.append(j.format_error)
                g = str(ex[task.group_key]) if task.group_key else "all"
                groups[g]["correct"].append(j.correct)
                groups[g]["format_error"].append(j.format_error)
                result["samples"].append({"split": split, "prompt": ex["prompt"], "completion": comp,
                                          "answer": j.answer, "gold": ex.get("answer"), "correct": j.correct,
                                          "format_error": j.format_error, "group": g})
            result["splits"][split] = {
                "accuracy": _rate(correct), "format_error_rate": _rate(fmt), "n": len(examples),
                "groups": {g: {"accuracy": _rate(v["correct"]), "format_error_rate": _rate(v["format_error"]),
                               "n": len(v["correct"])} for g, v in sorted(groups.items())},
            }
    finally:
        model.train(was_training)
    return result


def flat_metrics(result: dict, prefix: str = "eval") -> dict[str, float]:
    """`eval/<split>/accuracy`, `eval/<split>/format_error_rate`, `eval/<split>/<group>/accuracy`."""
    out = {}
    for split, r in result["splits"].items():
        out[f"{prefix}/{split}/accuracy"] = r["accuracy"]
        out[f"{prefix}/{split}/format_error_rate"] = r["format_error_rate"]
        for g, gr in r["groups"].items():
            out[f"{prefix}/{split}/{g}/accuracy"] = gr["accuracy"]
    return out


def outcome_strings(samples: list[dict]) -> dict[str, str]:
    """{split: "0110..."}: each evaluated example's correctness, in the split's order (the first n
    examples of the split), so that intervals and paired comparisons can be computed from an
    evaluation file alone.

    >>> outcome_strings([{"split": "test", "correct": True}, {"split": "test", "correct": False}])
    {'test': '10'}
    """
    out: dict[str, list[str]] = defaultdict(list)
    for s in samples:
        out[s["split"]].append("1" if s["correct"] else "0")
    return {split: "".join(v) for split, v in out.items()}


def pick_samples(samples: list[dict], per_split: int, step: int) -> list[dict]:
    """The first `per_split` samples of each split, as samples.jsonl records of `step`."""
    seen: dict[str, int] = {}
    out = []
    for s in samples:
        if seen.get(s["split"], 0) < per_split:
            seen[s["split"]] = seen.get(s["split"], 0) + 1
            out.append({"step": step, **s})
    return out


def format_table(result: dict, title: str | None = None) -> str:
    """A plain-text table: one row per split and group, accuracy and format-error rate."""
    rows = [("split", "group", "n", "accuracy", "format_err")]
    for split, r in result["splits"].items():
        rows.append((split, "ALL", str(r["n"]), f"{r['accuracy']:.3f}", f"{r['format_error_rate']:.3f}"))
        for g, gr in r["groups"].items():
            rows.append(("", g, str(gr["n"]), f"{gr['accuracy']:.3f}", f"{gr['format_error_rate']:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"== {title} ==" if title else ""] if title else []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def checkpoint_task_config(path: str | Path, task: str, overrides: list[str] | None = None):
    """The task config a checkpoint was trained on, with `task.*` overrides applied: from the
    checkpoint's own `mechrl_task.yaml` (every checkpoint mechrl writes has one), else from its run's
    `config.yaml` (`<run>/checkpoints/step-N`). A checkpoint with neither is refused unless the
    overrides say how it was trained (e.g. `task.answer_format=running`): judging answers written in
    one format by another scores correct answers wrong."""
    from mechrl.config import ConfigError, build_task_config, parse_overrides
    from mechrl.runs.rundir import CHECKPOINT_TASK_FILE

    path = Path(path)
    parsed = parse_overrides(overrides or [])
    own, run_config = path / CHECKPOINT_TASK_FILE, path.parent.parent / "config.yaml"
    if own.is_file():
        data, source = yaml.safe_load(own.read_text()) or {}, own
    elif path.parent.name == "checkpoints" and run_config.is_file():
        data, source = (yaml.safe_load(run_config.read_text()) or {}).get("task") or {}, run_config
    elif parsed:
        data, source = {"name": task}, "the command line"
    else:
        raise ConfigError(f"{path}: no {CHECKPOINT_TASK_FILE} and no run config.yaml beside it, so the task it was "
                          f"trained on (answer format, families, colours) is unknown; give it as task.* overrides "
                          f"(e.g. task.answer_format=running)")
    if data.get("name", task) != task:
        raise ConfigError(f"{path} was trained on task {data.get('name')!r}, not {task!r} (from {source})")
    data = {**data, "name": task}
    return build_task_config(data, parsed, source=str(source))


def evaluate_checkpoint(path: str | Path, *, task: str, n: int, overrides: list[str] | None = None,
                        splits: tuple[str, ...] | None = None) -> dict:
    """Evaluate a saved checkpoint on the task it was trained on (`checkpoint_task_config`)."""
    from mechrl.config import ConfigError
    from mechrl.models.loading import CheckpointError, load_pretrained
    from mechrl.tasks import build_task

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    if n < 1:
        raise ConfigError(f"evaluate: n must be at least 1, got {n}")
    task_cfg = checkpoint_task_config(path, task, overrides)
    task_obj = build_task(task_cfg)
    if splits:
        unknown = [s for s in splits if s not in task_obj.datasets]
        if unknown:
            raise ConfigError(f"unknown split(s) {unknown}; splits: {list(task_obj.datasets)}")
    model, tok = load_pretrained(path)
    result = evaluate(model, tok, task_obj, n=n, splits=splits)
    result["checkpoint"] = str(path)
    result["task_config"] = task_cfg.model_dump(mode="json")
    return result
