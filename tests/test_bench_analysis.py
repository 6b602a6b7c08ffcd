"""bench/analysis.py at toy sizes: the contenders do the same work, and the result JSON has every pair."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def analysis():
    path = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("bench_analysis", BENCH / "analysis.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # puts bench/ on sys.path for its `common` import
        yield module
    finally:
        sys.path[:] = path


@pytest.fixture(autouse=True)
def _keep_threads():
    """The script sets torch's thread count (--threads): give the other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


TOY = ["--seqs", "8", "--seq-len", "16", "--batch", "4", "--repeats", "1", "--warmup", "1", "--sae-tokens", "512",
       "--sae-batch", "64", "--sae-repeats", "1", "--threads", "1"]


def toy_args(analysis, *extra):
    return analysis.parser().parse_args([*TOY, *extra])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_extraction_contenders_return_equal_activations(analysis, arch):
    args = toy_args(analysis, "--arch", arch)
    model, tok, bridge, ids, layers = analysis.setup_extraction(args)
    # mechrl's model stays a plain HF model (to_transformer_lens wraps a copy of it)
    assert "Bridge" not in type(model.get_input_embeddings()).__name__
    assert "Bridge" in type(bridge.original_model.get_input_embeddings()).__name__
    fns = analysis.extraction_contenders(model, tok, bridge, ids, layers, args.batch)
    results = {name: fn() for name, fn in fns.items()}
    assert analysis.check_equal(results) <= analysis.ATOL
    for name, acts in results.items():
        for L in layers:
            assert acts[f"resid_post.{L}"].shape == (8 * 16, model.config.hidden_size), name
    # the check is not vacuous: a perturbed contender is caught
    results["mechrl_extract"]["resid_post.1"][3, 0] += 1e-3
    with pytest.raises(AssertionError, match="disagree at resid_post.1"):
        analysis.check_equal(results)


def test_mechrl_memory_scales_with_requested_sites(analysis):
    args = toy_args(analysis)
    model, tok, _, ids, layers = analysis.setup_extraction(args, need_bridge=False)
    texts = analysis.texts_of(ids)
    one = analysis.extract_activations(model, tok, texts, ["resid_post.0"], positions=None, batch_size=4,
                                       progress=False)
    every = analysis.extract_activations(model, tok, texts, [f"resid_post.{L}" for L in layers], positions=None,
                                         batch_size=4, progress=False)
    n, D = ids.numel(), model.config.hidden_size
    index = 2 * n * 8  # _example and _position, int64 per token
    assert analysis.nbytes(one.values()) == n * D * 4 + index
    assert analysis.nbytes(every.values()) == len(layers) * n * D * 4 + index
    # a view shares its storage: counted once
    t = torch.zeros(10, 4)
    assert analysis.nbytes([t, t[2:], t.T]) == t.nbytes


def test_rss_probe_reports_growth(analysis):
    out = analysis.rss_growth("mechrl_extract_1site", toy_args(analysis))
    assert out["returned_bytes"] == 8 * 16 * 128 * 4 + 2 * 8 * 16 * 8
    assert out["peak_growth_bytes"] >= out["rss_growth_bytes"] - 4096  # a peak is at least the final level


def test_main_writes_every_pair(analysis, tmp_path):
    result = analysis.main([*TOY, "--no-rss", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert saved["benchmark"] == "analysis" and {"device", "versions", "date", "config"} <= set(saved)
    ex, sae = saved["extraction"], saved["sae_training"]
    assert set(ex["tokens_per_s"]) == {"mechrl_extract", "mechrl_run_with_cache", "tl_filtered", "tl_all"}
    assert ex["ratio"] == pytest.approx(ex["tokens_per_s"]["mechrl_extract"] / ex["tokens_per_s"]["tl_filtered"],
                                        rel=1e-2)
    assert ex["max_abs_diff_vs_tl"] <= analysis.ATOL
    mem = ex["memory"]
    assert mem["mechrl_extract_1_site_bytes"] < mem["mechrl_extract_all_sites_bytes"]
    assert mem["mechrl_extract_last_position_all_sites_bytes"] < mem["mechrl_extract_all_sites_bytes"]
    assert mem["tl_unfiltered_cache_bytes_per_batch"] > mem["tl_filtered_cache_bytes_per_batch"]
    assert set(sae["training_tokens_per_s"]) == {"mechrl", "saelens"} and sae["ratio"] > 0
    tps = sae["training_tokens_per_s"]
    assert sae["ratio"] == pytest.approx(tps["mechrl"] / tps["saelens"], rel=1e-2)
    # both trained on the dataset's tokens: mechrl forwards each once, SAELens's runner at least once
    assert sae["model_tokens_forwarded"]["mechrl"] == 512
    assert sae["model_tokens_forwarded"]["saelens"] >= 512
    for name in ("mechrl", "saelens"):
        assert 0 <= sae["held_out"][name]["fvu"] < 1.5 and sae["held_out"][name]["l0"] <= 8
    assert result["extraction"]["ratio"] == ex["ratio"]
