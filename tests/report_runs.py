"""Run directories written with `RunDir` for the report tests: real configs, known numbers."""

from __future__ import annotations

from pathlib import Path

from mechrl.config import load_config
from mechrl.runs.rundir import RunDir

#: accuracy of split "test" at a step in `write_run(seed=s)`: `accuracy_at(s, step)`
STEPS = (10, 20)
XSS = "<script>alert('x')</script>"


def accuracy_at(seed: int, step: int) -> float:
    return round(0.25 * step / 10 + seed / 100, 4)


def write_run(out_dir: Path, *, seed: int, lr: float = 2e-3) -> Path:
    """A finished SFT-like run: metrics in six namespaces, two evaluations, samples (one holding
    a <script> tag)."""
    cfg, name = load_config("cards-sft", ["preset=smoke", f"out_dir={out_dir}", f"seed={seed}", f"train.lr={lr}"],
                            kind="sft")
    run = RunDir.start(cfg, name)
    for step in range(1, STEPS[-1] + 1):
        run.log_metrics(step, {"train/loss": 5.0 / step + seed * 0.01, "train/learning_rate": lr,
                               "reward/mean": step / 20, "policy/entropy": 2.0 - step / 20,
                               "completions/mean_length": 10.0 + step, "time/step_s": 0.5})
    for step in STEPS:
        acc = accuracy_at(seed, step)
        result = {"step": step, "splits": {
            "test": {"accuracy": acc, "format_error_rate": 0.0625, "n": 16,
                     "groups": {"count_above": {"accuracy": 0.875, "format_error_rate": 0.0, "n": 8},
                                "color_sum_diff": {"accuracy": 0.125, "format_error_rate": 0.125, "n": 8}}},
            "ood_colors": {"accuracy": 0.3125, "format_error_rate": 0.1875, "n": 16, "groups": {}}}}
        run.write_eval(step, result)
        run.log_metrics(step, {"eval/test/accuracy": acc, "eval/test/format_error_rate": 0.0625,
                               "eval/test/count_above/accuracy": 0.875, "eval/ood_colors/accuracy": 0.3125})
        run.log_samples([{"step": step, "split": "test", "prompt": f"Cards: RED {step} .\nAnswer:",
                          "completion": f" {XSS} & 7", "gold": "7", "answer": None, "correct": False}])
    run.set_status("finished", kind="sft", final_checkpoint=str(run.checkpoint_path(STEPS[-1])), train_time_s=12.5)
    run.close()
    return run.path
