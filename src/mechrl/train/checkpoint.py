"""Checkpoints of mechrl's own training loops (GRPO, PPO): everything a killed run needs to resume.

    checkpoints/step-N/
      model.safetensors, config.json, tokenizer*   the policy as a plain HF model (LoRA merged in),
                                                   loadable by `mechrl eval` or `from_pretrained`
      adapter/                                     the LoRA adapter (PEFT format), when training one
      dual_lora.safetensors                        the retain and forget adapters of a routed run
                                                   (model.safetensors then has both merged in)
      resume/optimizer.pt, resume/scheduler.pt     optimizer and LR-scheduler state (tensors and
                                                   plain containers only: loaded with weights_only=True)
      resume/rng.safetensors                       torch CPU / CUDA / sampling-generator RNG states
                                                   ("sampling" is rank 0's; "sampling_rank{r}" rank r's
                                                   in a multi-process run)
      resume/<name>.safetensors                    extra trained modules of the loop (e.g. PPO's value head)
      resume/state.json                            step, Python RNG state, environment state, extras
      mechrl_task.yaml                             the task config (`mechrl eval` judges with it)

A checkpoint is written into `checkpoints/.partial-step-N/` and renamed when complete, so a run
killed mid-save never leaves something that looks like a checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from mechrl.config import config_to_yaml
from mechrl.models.adapters import merged_model
from mechrl.models.dual_lora import dual_lora_modules, load_dual_lora, merged_dual_lora, save_dual_lora
from mechrl.models.loading import CheckpointError
from mechrl.runs.rundir import CHECKPOINT_TASK_FILE, RunDir, atomic_write_json, atomic_write_text

PARTIAL_PREFIX = ".partial-"
#: The dual LoRA adapters of a gradient-routing run (`models/dual_lora.py` format; ranks detected on load).
DUAL_LORA_FILE = "dual_lora.safetensors"


def _py_random_state() -> list:
    v, state, gauss = random.getstate()
    return [v, list(state), gauss]


def save_checkpoint(run: RunDir, step: int, *, policy, tokenizer, optimizer, scheduler,
                    generator: torch.Generator | None, state: dict[str, Any],
                    modules: dict[str, torch.nn.Module] | None = None,
                    rank_generator_states: list[torch.Tensor] | None = None, task_config=None) -> Path:
    """Write `checkpoints/step-{step}` (see the module docstring) and return its path.
    `rank_generator_states`: the sampling-generator states of ranks 1.. of a multi-process run
    (rank 0's is `generator`)."""
    run.check_writable("save_checkpoint")
    final = run.checkpoint_path(step)
    tmp = final.parent / f"{PARTIAL_PREFIX}{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    dual = bool(dual_lora_modules(policy))
    (merged_dual_lora(policy) if dual else merged_model(policy)).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if task_config is not None:
        atomic_write_text(tmp / CHECKPOINT_TASK_FILE, config_to_yaml(task_config))
    if isinstance(policy, PeftModel):
        policy.save_pretrained(tmp / "adapter", safe_serialization=True)
    if dual:
        save_dual_lora(policy, tmp / DUAL_LORA_FILE)
    res = tmp / "resume"
    res.mkdir()
    for name, module in (modules or {}).items():
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, res / f"{name}.safetensors")
    torch.save(optimizer.state_dict(), res / "optimizer.pt")
    torch.save(scheduler.state_dict(), res / "scheduler.pt")
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    if generator is not None:
        rng["sampling"] = generator.get_state()
    for r, s in enumerate(rank_generator_states or [], start=1):
        rng[f"sampling_rank{r}"] = s
    save_file(rng, res / "rng.safetensors")
    atomic_write_json(res / "state.json", {"step": step, "python_random": _py_random_state(), **state})
    if final.exists():  # a redone step after a resume: replace the old checkpoint of that step
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def check_resumable(path: Path, *, policy=None, modules: dict | None = None) -> None:
    """Raise `CheckpointError` naming every missing part unless the run can resume from `path` exactly
    (a fresh optimizer or schedule would change the run without a word)."""
    res = path / "resume"
    need = ["resume/state.json", "resume/optimizer.pt", "resume/scheduler.pt", "resume/rng.safetensors"]
    need += [f"resume/{name}.safetensors" for name in (modules or {})]
    if isinstance(policy, PeftModel):
        need.append("adapter/adapter_model.safetensors")
    elif policy is not None and dual_lora_modules(policy):
        need.append(DUAL_LORA_FILE)
    else:
        need.append("model.safetensors")
    missing = [f for f in need if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path} cannot be resumed from: missing {', '.join(missing)}; delete this "
                              "checkpoint to resume from the previous one, or use --force to start over")
    try:
        state = json.loads((res / "state.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{res / 'state.json'}: not valid JSON ({e}); delete this checkpoint to resume "
                              "from the previous one") from None
    for key in ("step", "python_random"):
        if key not in state:
            raise CheckpointError(f"{res / 'state.json'}: no {key!r}; delete this checkpoint to resume from the "
                                  "previous one")


def load_checkpoint(path: Path, *, policy, optimizer, scheduler, generator: torch.Generator | None,
                    modules: dict[str, torch.nn.Module] | None = None, rank: int = 0) -> dict:
    """Restore optimizer, scheduler, RNG (and a LoRA adapter's weights) from `path`; returns the
    saved state dict (with `step`). Full-model weights are loaded by the caller with
    `from_pretrained(path)` before the optimizer is built; dual LoRA adapters (a routed run) are
    loaded here into the policy, whose base the caller built from the run's config. `rank`: whose sampling-generator state
    to restore in a multi-process run."""
    res = path / "resume"
    check_resumable(path, policy=policy, modules=modules)
    if isinstance(policy, PeftModel):
        adapter = path / "adapter" / "adapter_model.safetensors"
        if not adapter.is_file():
            raise FileNotFoundError(f"{path}: the run trains a LoRA adapter but {adapter} is missing")
        result = set_peft_model_state_dict(policy, load_file(adapter))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"{adapter}: keys that match no adapter weight: {unexpected[:5]}")
    if dual_lora_modules(policy):  # a routed run: the base stays as built, the adapters come back
        dual = path / DUAL_LORA_FILE
        if not dual.is_file():
            raise FileNotFoundError(f"{path}: the run trains dual LoRA adapters but {dual} is missing")
        load_dual_lora(policy, dual)
    for name, module in (modules or {}).items():
        f = res / f"{name}.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"{path}: no saved state for module {name!r} ({f})")
        module.load_state_dict(load_file(f, device=str(next(module.parameters()).device)))  # strict
    optimizer.load_state_dict(torch.load(res / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(res / "scheduler.pt", weights_only=True))
    rng = load_file(res / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if generator is not None:
        key = "sampling" if rank == 0 else f"sampling_rank{rank}"
        if key not in rng:
            raise RuntimeError(f"{path}: no sampling-generator state {key!r} saved (saved: {sorted(rng)})")
        generator.set_state(rng[key])
    state = json.loads((res / "state.json").read_text())
    v, st, gauss = state["python_random"]
    random.setstate((v, tuple(st), gauss))
    return state


def clear_partial(run: RunDir) -> None:
    """Remove half-written checkpoints left by a killed save."""
    run.check_writable("clear_partial")
    if run.checkpoints_dir.exists():
        for p in run.checkpoints_dir.glob(f"{PARTIAL_PREFIX}*"):
            shutil.rmtree(p)
