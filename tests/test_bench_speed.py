"""bench/rollout_vs_generate.py and bench/grpo_vs_trl.py at toy sizes on CPU: the options of the GPU
measurement set (`--shape`, `--dtype`, contenders, one-time costs apart) parse, run and land in the
result JSON. No timing is asserted: these check the scripts, not the machine."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _load(name: str):
    path = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # puts bench/ on sys.path for its `common` import
        return module
    finally:
        sys.path[:] = path


@pytest.fixture(scope="module")
def rollout_bench():
    return _load("rollout_vs_generate")


def test_shapes_are_the_issues_models():
    from transformers import AutoModelForCausalLM, LlamaConfig

    common = _load("common")
    with torch.device("meta"):
        big = AutoModelForCausalLM.from_config(LlamaConfig(**common.SHAPES["qwen05b"]))
        tiny = AutoModelForCausalLM.from_config(LlamaConfig(**common.SHAPES["tiny"]))
    assert sum(p.numel() for p in big.parameters()) == 361_540_480  # "361M"
    assert sum(p.numel() for p in tiny.parameters()) == 1_574_016  # the 1.57M of bench/results/grpo_vs_trl_cpu_run1.json
    attn = big.model.layers[0].self_attn
    assert (big.config.num_attention_heads, big.config.num_key_value_heads, attn.head_dim) == (14, 2, 64)


def test_rollout_bench_records_contenders_and_one_time_costs(rollout_bench, tmp_path):
    result = rollout_bench.main(["--prompts", "2", "--generations", "2", "--new-tokens", "4", "--repeats", "1",
                                 "--warmup", "1", "--threads", "1", "--out", str(tmp_path), "--name", "toy",
                                 "--contenders", "mechrl,mechrl_eager,generate"])
    saved = json.loads((tmp_path / "toy.json").read_text())
    assert saved["device"]
    assert set(saved["contenders"]) == {"mechrl", "mechrl_eager", "generate"}
    for r in saved["contenders"].values():
        assert r["first_call_s"] > 0 and r["ms_per_decode_step"] > 0
    assert set(saved["speedups"]) == {"mechrl_vs_mechrl_eager", "mechrl_vs_generate"}
    modes = {tuple(m[:2]): m[2] for m in saved["mechrl_decode"]["modes"]}  # CPU: the host loop, saying why
    assert set(modes) == {("auto", "eager"), ("eager", "eager")} and modes[("eager", "eager")] is None
    assert "CUDA graphs need CUDA" in modes[("auto", "eager")]
    assert saved["config"]["model"]["shape"] == "tiny" and saved["config"]["dtype"] == "fp32"
    assert len(saved["timings"]["mechrl"]["warmup_s"]) == 1 and "speedup" in saved
    assert saved["failed_contenders"] == {}
    assert result["tokens_per_call"] == 2 * 2 * 4


def test_benches_refuse_bf16_on_cpu(rollout_bench, tmp_path):
    from mechrl.train.fast_update import PrecisionError

    with pytest.raises(PrecisionError, match="CUDA only"):
        rollout_bench.main(["--dtype", "bf16", "--out", str(tmp_path)])
    out = subprocess.run([sys.executable, str(BENCH / "grpo_vs_trl.py"), "--device", "cpu", "--dtype", "bf16"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "CUDA only" in out.stderr


@pytest.mark.slow
def test_grpo_bench_records_warmup_phases_and_options(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "grpo_vs_trl.py"), "--device", "cpu", "--prompts", "2",
                          "--generations", "2", "--new-tokens", "4", "--warmup", "1", "--steps", "1", "--out",
                          str(tmp_path), "--name", "toy", "--adamw", "fused"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    saved = json.loads((tmp_path / "toy.json").read_text())
    assert len(saved["warmup_times_s"]["mechrl"]) == len(saved["warmup_times_s"]["trl"]) == 1
    assert set(saved["mechrl_phases_median_s"]) == {"generate", "reward", "update"}
    assert saved["config"]["mechrl_train"] == {"decode": "auto", "adamw": "fused", "compile_logprobs": False}
    assert saved["mechrl_phases"][0]["decode_mode"] == "eager" and saved["mechrl_decode"]["captures"] == 0
