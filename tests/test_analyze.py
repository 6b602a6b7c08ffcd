"""`mechrl analyze` and the sft-vs-rl study's analysis half, on a real smoke SFT run built in the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mechrl.cli import main
from mechrl.config import load_config
from mechrl.runs.rundir import RunDir
from mechrl.studies.analyze_runs import task_of_run
from mechrl.studies.sft_vs_rl_analysis import PRESETS, WHATS, analyze
from mechrl.train.sft import run_sft


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models, tiny matmuls: one intra-op thread is several times faster than two fighting over a loaded CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("analyze-runs")
    cfg, name = load_config("cards-sft", ["preset=smoke", f"out_dir={out}", "train.max_steps=8",
                                          "train.eval_every=8", "eval.n_final=16"], kind="sft")
    run = RunDir.start(cfg, name)
    run_sft(cfg, run)
    return run.path


@pytest.fixture(scope="module")
def analyzed(sft_run, tmp_path_factory):
    """`mechrl analyze <run> --preset smoke --out DIR` with every analysis: (exit code, stdout, out dir)."""
    out = tmp_path_factory.mktemp("analyze-out")
    code = main(["analyze", str(sft_run), "--preset", "smoke", "--out", str(out)])
    return code, out


def _png(path: Path) -> bool:
    return path.is_file() and path.read_bytes().startswith(b"\x89PNG")


def test_analyze_run_writes_every_analysis(analyzed, sft_run):
    code, out = analyzed
    assert code == 0
    root = out / "analysis"
    d = root / "final"
    for w in WHATS:
        data = json.loads((d / f"{w}.json").read_text())
        assert data["checkpoint"] == str(sft_run / "checkpoints" / "step-8") and data["preset"] == "smoke"
    for png in ["probes_pos1.png", "ablation_profiles.png", "final/ablation_test.png",
                "final/patching_rule_resid.png", "final/patching_rule_heads.png", "final/sae_features.png"]:
        assert _png(root / png), png
    html = (root / "report.html").read_text()
    for kind in ("analysis-probes", "analysis-patching", "analysis-ablation", "analysis-sae"):
        assert f'data-kind="{kind}"' in html
    headline = json.loads((root / "compare.json").read_text())["headline"]["final"]
    assert set(headline["best_probe"]) == set(PRESETS["smoke"].probe_labels)


def test_probe_scores_in_range(analyzed, sft_run):
    _, out = analyzed
    labels = json.loads((out / "analysis/final/probes.json").read_text())["probes"]["labels"]
    task = task_of_run(sft_run)
    n_layers = 3  # the cards-sft recipe's tiny GPT-2
    for label, res in labels.items():
        assert res["layers"] == list(range(n_layers))
        assert res["distributions"] == ["id_val", "id_test", *[s for s in task.eval_splits if s != "test"]]
        assert len(res["records"]) == n_layers * len(res["positions"]) * len(res["distributions"])
        for r in res["records"]:
            if r["value"] is None:
                continue
            if res["metric"] == "accuracy":
                assert 0.0 <= r["value"] <= 1.0
            else:
                assert r["value"] <= 1.0 + 1e-9  # R² is at most 1


def test_patching_last_layer_last_position_restores_clean(analyzed):
    """Patching the last block's output at the last token gives the clean logits there: score exactly 1."""
    _, out = analyzed
    res = json.loads((out / "analysis/final/patching.json").read_text())["patching"]
    assert "rule" in res
    done = [k for k, r in res.items() if "skipped" not in r]
    assert done, f"every pair kind was skipped: {res}"
    for kind in done:
        exact = res[kind]["exact"]
        resid = np.array(exact["resid"]["scores"], dtype=float)  # (L, T)
        assert resid.shape == (3, len(exact["positions"]))
        assert resid[-1, -1] == pytest.approx(1.0, abs=1e-4)
        assert np.array(exact["heads"]["scores"], dtype=float).shape == (3, 4)
        assert len(exact["kept"]) + exact["n_dropped"] == PRESETS["smoke"].pairs


def test_ablation_and_sae_consistent(analyzed):
    _, out = analyzed
    abl = json.loads((out / "analysis/final/ablation.json").read_text())["ablation"]
    assert set(abl) == {"test", "ood_colors"}
    for split, r in abl.items():
        assert 0.0 <= r["base"]["token_acc"] <= 1.0
        assert len(r["importance"]) == 3 * 4 + 3
        for c, imp in r["importance"].items():
            assert imp == pytest.approx(r["base"]["token_acc"] - r["ablated"][c]["token_acc"])
        assert np.nanmax(np.array(r["heads"], dtype=float)) == pytest.approx(
            max(v for c, v in r["importance"].items() if "H" in c))
    sae = json.loads((out / "analysis/final/sae.json").read_text())["sae"]
    m = sae["metrics"]
    assert sae["site"] == "resid_post.2" and m["fvu"] >= 0 and 0 < m["l0"] <= 8 and 0 <= m["n_dead"] <= m["d_sae"]
    assert sae["splice"]["delta"] == pytest.approx(sae["splice"]["spliced"] - sae["splice"]["clean"])
    for split, counts in sae["feature_classes"].items():
        assert sum(counts.values()) == m["d_sae"], split


def test_checkpoint_against_itself_overlaps_fully(sft_run, tmp_path):
    ck = sft_run / "checkpoints" / "step-8"
    res = analyze({"a": ck, "b": ck}, task_of_run(sft_run), ["ablation"], out=tmp_path, preset="smoke")
    jac = res["compare"]["jaccard"]["a|b"]
    assert set(jac) == {"test", "ood_colors"}
    assert all(v == 1.0 for by_k in jac.values() for v in by_k.values())
    assert res["headline"]["jaccard_top10"]["a|b"] == {"test": 1.0, "ood_colors": 1.0}
    assert res["checkpoints"]["a"]["ablation"]["test"]["importance"] == res["checkpoints"]["b"]["ablation"]["test"]["importance"]
    assert _png(tmp_path / "analysis" / "jaccard_a_b.png")


@pytest.mark.parametrize("args, needle", [
    (["--what", "probes,nonsense"], "unknown analysis ['nonsense']"),
    (["--preset", "huge"], "unknown analysis preset 'huge'"),
    (["--checkpoint", "step-999"], "no checkpoint 'step-999'"),
])
def test_cli_errors_exit_2_with_one_line(sft_run, tmp_path, capsys, args, needle):
    assert main(["analyze", str(sft_run), "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mechrl analyze: error:") and needle in err


def test_cli_rejects_a_dir_that_is_not_a_run(tmp_path, capsys):
    assert main(["analyze", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "neither a run directory" in err


def test_smoke_demo_summary_has_analysis(tmp_path):
    from mechrl.studies.sft_vs_rl import format_summary, run_demo

    summary = run_demo(tmp_path, preset="smoke")
    a = json.loads((tmp_path / "summary.json").read_text())["analysis"]
    assert a["preset"] == "smoke" and a == json.loads(json.dumps(summary["analysis"]))
    for phase in ("sft", "grpo"):
        assert 0 <= a[phase]["sae"]["fvu"] and set(a[phase]["best_probe"]) == set(PRESETS["smoke"].probe_labels)
        assert (tmp_path / "analysis" / phase / "ablation.json").is_file()
    jac = a["jaccard_top10"]["sft|grpo"]
    sizes = a["top10_sizes"]
    assert set(jac) == {"test", "ood_colors"}
    for split, v in jac.items():  # None only where no component matters in either checkpoint
        assert (v is None and sizes["sft"][split] == sizes["grpo"][split] == 0) or 0.0 <= v <= 1.0
    html = (tmp_path / "report.html").read_text()
    assert 'data-kind="analysis-jaccard"' in html
    # the report leads with the question and its answer; the config differences are an appendix at the end
    assert html.index("Question and answer") < html.index("Final evaluation") < html.index("Appendix: hyperparameters")
    assert "Jaccard top-10 sft vs grpo: test" in format_summary(summary)


def test_cli_refuses_an_unfinished_run_without_checkpoint(sft_run, tmp_path, capsys):
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "config.yaml").write_text((sft_run / "config.yaml").read_text())
    (run / "status.json").write_text(json.dumps({"status": "running"}))
    assert main(["analyze", str(run), "--what", "probes", "--preset", "smoke"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run is not finished (status 'running')" in err
