"""Numbers that must not be silently wrong: seeds that reach every random draw (checked across fresh
processes), the answer format a checkpoint is judged with, overlaps that do not count ties as
agreement, patching aggregates that small gaps cannot dominate, options that are honoured, and
inputs that fail in one line before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from mechrl.cli import main

EXE = os.path.join(os.path.dirname(sys.executable), "mechrl")
ROUTED = ["preset=smoke", "seed=1", "train.max_steps=4", "train.save_every=2", "train.eval_every=4",
          "routing.eval_every=2", "routing.detector.label_noise=0.3"]


def _mechrl(*args, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _adapters(path):
    """The tensors and metadata of a safetensors file (its header's key order is not fixed, so bytes differ)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _same(a, b) -> bool:
    (ta, ma), (tb, mb) = a, b
    return ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _metrics(run_dir):
    from mechrl.runs.rundir import read_jsonl

    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))}
            for r in read_jsonl(run_dir / "metrics.jsonl")]


# -- seeds -----------------------------------------------------------------------------------------

def test_routed_grpo_is_reproducible_across_fresh_processes_and_resumes_exactly(tmp_path):
    """Seed 1 (not the 0 every test is seeded with): two uninterrupted runs in fresh processes give the
    same metrics and the same adapters; a run interrupted after its step-2 checkpoint resumes, in
    another fresh process, to the same metrics and adapters."""
    dirs = [tmp_path / n for n in ("a", "b", "c")]
    for d in dirs:
        _mechrl("grpo", "reward-hacking-routing", f"out_dir={d}", *ROUTED)
    (ra,), (rb,), (rc,) = [list(d.iterdir()) for d in dirs]
    a, b = _metrics(ra), _metrics(rb)
    assert a == b and len([r for r in a if "reward/mean" in r]) == 4
    adapters = [_adapters(r / "checkpoints/step-4/dual_lora.safetensors") for r in (ra, rb)]
    assert _same(adapters[0], adapters[1])
    # interrupt c after step 2: the state a kill after that checkpoint leaves
    shutil.rmtree(rc / "checkpoints/step-4")
    (rc / "report.html").unlink()
    (rc / "status.json").write_text(json.dumps({"status": "running"}))
    _mechrl("grpo", "reward-hacking-routing", f"out_dir={dirs[2]}", *ROUTED)
    assert "resuming" in (rc / "train.log").read_text()
    assert _metrics(rc) == a
    assert _same(_adapters(rc / "checkpoints/step-4/dual_lora.safetensors"), adapters[0])


def test_routed_adapter_init_follows_the_seed_not_the_global_rng(cards_tok):
    from mechrl.config import TinyModelConfig
    from mechrl.models.dual_lora import add_dual_lora, dual_lora_state_dict
    from mechrl.models.loading import build_tiny_model

    def init(seed, global_seed):
        torch.manual_seed(global_seed)
        m = build_tiny_model(TinyModelConfig(arch="llama", n_layer=1, d_model=32, n_head=4), cards_tok, seed=0)
        add_dual_lora(m, None, 2, 4.0, 2, 4.0, seed=seed)
        return dual_lora_state_dict(m)

    a, b, c = init(1, 0), init(1, 123), init(2, 0)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the global RNG does not matter
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)  # the seed does


def test_detector_noise_follows_the_run_seed():
    from mechrl.rewards.detectors import DetectorSpec, build_detector

    spec = DetectorSpec(name="contains_happy", coverage=0.5, label_noise=0.2)
    comps = ["she was happy ."] * 200 + ["the dog ran ."] * 200
    args = (["p"] * 400, comps, [{}] * 400)
    run0, run0_again, run1 = (build_detector(spec, run_seed=s)(*args) for s in (0, 0, 1))
    assert run0 == run0_again and run0 != run1
    fixed = spec.model_copy(update={"seed": 5})
    assert build_detector(fixed, run_seed=0)(*args) == build_detector(fixed, run_seed=1)(*args)


# -- the answer format a checkpoint is judged with --------------------------------------------------

def _save_ckpt(path, tiny_model, tok, task_cfg=None):
    tiny_model.save_pretrained(path)
    tok.save_pretrained(path)
    if task_cfg is not None:
        from mechrl.config import config_to_yaml
        from mechrl.runs.rundir import CHECKPOINT_TASK_FILE

        (path / CHECKPOINT_TASK_FILE).write_text(config_to_yaml(task_cfg))


def test_eval_reads_the_answer_format_from_the_checkpoint(tmp_path, tiny_model, cards_tok, capsys):
    from mechrl.config import CardsTaskConfig
    from mechrl.evaluate import checkpoint_task_config
    from mechrl.tasks import build_task

    small = dict(n_train=50, n_val=10, n_test=50, n_ood=10)
    running = CardsTaskConfig(answer_format="running", **small)
    ckpt = tmp_path / "moved-checkpoint"
    _save_ckpt(ckpt, tiny_model, cards_tok, running)
    got = checkpoint_task_config(ckpt, "cards")
    assert got.answer_format == "running" and got == running
    # judged with the checkpoint's format, every gold running answer is correct; with the default
    # format (what eval fell back to before) most are scored wrong
    task = build_task(got)
    test = task.datasets["test"]
    assert all(task.judge(ex["completion"], ex).correct for ex in test)
    default_test = build_task(CardsTaskConfig(**small)).datasets["test"]
    assert default_test["prompt"] == test["prompt"]  # the same questions; only the answers' form differs
    default_task = build_task(CardsTaskConfig(**small))
    wrong = sum(not default_task.judge(ex["completion"], d).correct for ex, d in zip(test, default_test))
    assert wrong > len(test) // 2
    # a checkpoint that does not say, outside any run directory: refused, unless told on the command line
    bare = tmp_path / "bare"
    _save_ckpt(bare, tiny_model, cards_tok)
    code = main(["eval", str(bare), "--task", "cards", "--n", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "task.answer_format" in err and "Traceback" not in err
    assert checkpoint_task_config(bare, "cards", ["task.answer_format=running"]).answer_format == "running"


def test_eval_n_zero_is_refused(tmp_path, tiny_model, cards_tok, capsys):
    _save_ckpt(tmp_path, tiny_model, cards_tok)
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tmp_path), "--task", "cards", "--n", "0"])
    assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err


# -- overlaps and aggregates ------------------------------------------------------------------------

def test_top_k_overlap_of_two_different_checkpoints_does_not_count_ties(cards_tok, cards_task):
    """Two different models on a discrete metric: most components have importance exactly 0. The
    top-k sets hold only components that matter (ties kept whole), and the Jaccard is the hand-computed
    one over those; name order would have filled both sets with the same zero-importance components."""
    from mechrl.analysis.ablation import ablation_importance, compare_top_k, jaccard, top_k
    from mechrl.config import TinyModelConfig
    from mechrl.models.loading import build_tiny_model

    examples = [dict(r) for r in cards_task.datasets["test"].select(range(6))]
    res = []
    for seed in (0, 1):
        m = build_tiny_model(TinyModelConfig(arch="gpt2", n_layer=2, d_model=32, n_head=4), cards_tok, seed=seed).eval()
        res.append(ablation_importance(m, cards_tok, examples, mode="zero", metric="token_acc"))
    imp_a, imp_b = res[0]["importance"], res[1]["importance"]
    assert imp_a != imp_b
    k = 8
    for imp, r in zip((imp_a, imp_b), res):
        s = top_k(r, k)
        assert all(imp[c] > 0 for c in s)
        kth = sorted(imp.values(), reverse=True)[k - 1]
        assert s == {c for c, v in imp.items() if v >= kth and v > 0}
    zeros = [c for c in imp_a if imp_a[c] <= 0 and imp_b[c] <= 0]
    assert zeros, "the test needs components that matter in neither model"
    sa, sb = top_k(res[0], k), top_k(res[1], k)
    expect = jaccard(sa, sb)
    got = compare_top_k({"test": res[0]}, {"test": res[1]}, ks=(k,))["test"][k]
    assert (np.isnan(got) and np.isnan(expect)) or got == expect
    # what breaking ties by name gave: the shared zero-importance names inflate the overlap
    by_name = [set(sorted(r["importance"], key=lambda c: (-r["importance"][c], c))[:k]) for r in res]
    if not np.isnan(got):
        assert jaccard(*by_name) >= got


def test_patching_aggregate_is_gap_weighted_and_ignores_tiny_gaps():
    from mechrl.analysis.patching import weighted_scores

    gap = np.array([[2.0], [-1.0], [1e-3]])  # (N, 1): the third pair barely differs
    delta = np.array([[1.0], [-0.5], [0.5]])  # its ratio is 500, the others 0.5
    got = weighted_scores(delta, gap)
    assert got[0] == pytest.approx((1.0 + 0.5 + 0.5) / (2.0 + 1.0 + 1e-3))
    assert abs(got[0] - 0.5) < 0.2  # the plain mean of ratios would be ~167
    assert np.mean(delta / gap) > 100
    with_nan = weighted_scores(np.array([[np.nan, 1.0], [np.nan, 2.0]]), np.array([[1.0], [2.0]]))
    assert np.isnan(with_nan[0]) and with_nan[1] == pytest.approx(3.0 / 3.0)


# -- options honoured -------------------------------------------------------------------------------

def test_rl_evaluation_writes_eval_samples(tmp_path):
    from mechrl.config import load_config
    from mechrl.runs.rundir import RunDir, read_jsonl
    from mechrl.train.grpo import run_grpo

    cfg, name = load_config("cards-grpo", [f"out_dir={tmp_path}", "task.n_train=200", "task.n_val=20",
                                           "task.n_test=20", "task.n_ood=20", "model.tiny.d_model=32",
                                           "model.tiny.n_layer=1", "train.max_new_tokens=4", "train.prompts_per_step=2",
                                           "train.num_generations=2", "train.max_steps=2", "train.eval_every=2",
                                           "eval.n_per_split=3", "eval.n_final=3", "eval.max_new_tokens=4",
                                           "eval.n_samples=2", "train.n_samples=0"], kind="grpo")
    run = RunDir.start(cfg, name)
    run_grpo(cfg, run)
    samples = read_jsonl(run.samples_path)
    ev = json.loads((run.eval_dir / "step-2.json").read_text())
    for step in (0, 2):
        at = [s for s in samples if s["step"] == step]
        assert len(at) == 2 * len(ev["splits"]) and {"split", "completion", "correct"} <= set(at[0])


def test_routing_evaluation_samples_as_configured(tmp_path, cards_tok, tiny_model):
    from mechrl.config import load_config
    from mechrl.rewards import build_reward
    from mechrl.config import RewardSpec
    from mechrl.models.dual_lora import add_dual_lora
    from mechrl.train.routing import eval_sampling, evaluate_routing
    from mechrl.train.rollout import generate

    cfg, _ = load_config("reward-hacking-routing", ["preset=smoke", "train.top_k=3", "train.top_p=0.9",
                                                     "eval.batch_size=5"], kind="grpo")
    opts = eval_sampling(cfg)
    assert (opts["top_k"], opts["top_p"], opts["batch_size"]) == (3, 0.9, 5)
    # top_k=1 at temperature 1 is greedy: the evaluation must pass top_k through to the sampler
    model = add_dual_lora(tiny_model.eval(), None, 2, 4.0, 2, 4.0, seed=0)
    prompts = ["Cards : RED 3 .", "Cards : BLUE 5 ."]
    reward = {"w": build_reward([RewardSpec(name="contains_word", params={"word": "RED"})])}
    res = evaluate_routing(model, cards_tok, prompts, [{}, {}], reward, max_new_tokens=5, temperature=1.0, top_k=1,
                           batch_size=1)
    greedy = generate(model, cards_tok, prompts, max_new_tokens=5, temperature=0.0).texts
    assert res["modes"]["both"]["samples"] == greedy


def test_story_runs_log_no_meaningless_accuracy(tmp_path):
    _mechrl("grpo", "reward-hacking-routing", f"out_dir={tmp_path}", "preset=smoke", "routing.enabled=false",
            "train.lora={rank: 2}")
    (run,) = list(tmp_path.iterdir())
    keys = {k for r in _metrics(run) for k in r}
    assert not any(k.startswith("eval/") for k in keys)
    assert "eval accuracy" not in (run / "train.log").read_text()


def test_reward_parameter_types_are_always_checked():
    from mechrl.config import ConfigError, RewardSpec
    from mechrl.rewards import build_reward, register_reward

    @register_reward("test_unresolvable_annotation")
    def bad(prompts, completions, examples, scale: "NotAType" = 1.0):  # noqa: F821
        return [0.0] * len(completions)

    with pytest.raises(TypeError, match="annotations do not resolve"):
        build_reward([RewardSpec(name="test_unresolvable_annotation", params={"scale": 2.0})])
    with pytest.raises(ConfigError, match="parameter 'word'"):
        build_reward([RewardSpec(name="contains_word", params={"word": [1, 2]})])


def test_make_test_all_selects_the_slow_tests():
    import re

    text = open(os.path.join(os.path.dirname(__file__), "..", "Makefile")).read()
    recipe = re.search(r"^test-all:.*\n\t(.*)$", text, re.M).group(1)
    expr = re.search(r'-m "([^"]+)"', recipe).group(1)
    root = os.path.join(os.path.dirname(__file__), "..")
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", expr, "-p", "no:cacheprovider"],
                       capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:]
    collected = int(re.search(r"(\d+) tests? collected", r.stdout).group(1))
    default = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                             capture_output=True, text=True, cwd=root, timeout=300)
    base = int(re.search(r"(\d+)/(\d+) tests? collected", default.stdout).group(1))
    assert collected > base  # the slow tests are in


# -- one line, before any work ----------------------------------------------------------------------

@pytest.mark.parametrize("override,needle", [("train.lr=.inf", "train.lr"), ("train.temperature=.nan", "temperature")])
def test_non_finite_numbers_are_config_errors(capsys, tmp_path, override, needle):
    code = main(["grpo", "cards-grpo", f"out_dir={tmp_path}", override])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "finite" in err and "Traceback" not in err


def test_a_name_that_is_not_a_folder_fails_at_once_without_the_hub(capsys, tmp_path):
    t0 = time.process_time()
    code = main(["grpo", "cards-grpo", f"out_dir={tmp_path}", "model.path=nonexistent-model"])
    err = capsys.readouterr().err
    assert code == 2 and "model.allow_hub=true" in err and "Traceback" not in err
    assert time.process_time() - t0 < 30 and not any(tmp_path.iterdir())  # no run directory for a refused run


@pytest.mark.parametrize("damage,needle", [
    ("truncate", "model.safetensors"), ("random", "model.safetensors"), ("empty", "model.safetensors"),
    ("config", "config.json"), ("no_tokenizer", "no tokenizer files"),
])
def test_a_damaged_model_folder_names_the_file(tmp_path, tiny_model, cards_tok, damage, needle, capsys):
    _save_ckpt(tmp_path / "m", tiny_model, cards_tok)
    m = tmp_path / "m"
    w = m / "model.safetensors"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:100])
    elif damage == "random":
        w.write_bytes(os.urandom(4096))
    elif damage == "empty":
        w.write_bytes(b"")
    elif damage == "config":
        (m / "config.json").write_text("{not json")
    else:
        for f in m.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                f.unlink()
    code = main(["eval", str(m), "--task", "cards", "--n", "1", "task.answer_format=running"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err


def test_unwritable_outputs_fail_before_any_work(tmp_path, tiny_model, cards_tok, monkeypatch, capsys):
    import mechrl.evaluate

    a_file = tmp_path / "file"
    a_file.write_text("x")
    code = main(["sft", "cards-sft", f"out_dir={a_file}"])
    assert code == 2 and "is a file" in capsys.readouterr().err
    _save_ckpt(tmp_path / "m", tiny_model, cards_tok)
    monkeypatch.setattr(mechrl.evaluate, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated first"))
    code = main(["eval", str(tmp_path / "m"), "--task", "cards", "--out", str(a_file / "eval.json")])
    assert code == 2 and "is a file" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        code = main(["eval", str(tmp_path / "m"), "--task", "cards", "--out", str(ro / "eval.json")])
        assert code == 2 and "not writable" in capsys.readouterr().err
    code = main(["analyze", str(tmp_path / "m"), "--out", str(a_file)])
    assert code == 2 and "is a file" in capsys.readouterr().err


def test_sweep_with_an_unknown_reward_fails_before_any_trial(tmp_path, capsys):
    code = main(["sweep", "cards-grpo", "--grid", "seed=0,1", "--fixed", "reward=[{name: no_such_reward}]",
                 "--out", str(tmp_path), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown reward 'no_such_reward'" in err and "sweep trial 1/2" in err
    assert not any(tmp_path.iterdir())


# -- smaller ----------------------------------------------------------------------------------------

def test_rl_run_name_carries_a_short_model_tag():
    from mechrl.config import load_config

    _, name = load_config("cards-grpo", ["model.path=runs/demo/sft/checkpoints/step-2200"])
    assert name == "cards-grpo_from_sft-step-2200_s0"


def test_orphaned_story_model_builds_are_removed(tmp_path):
    from mechrl.tasks.stories.base_model import _remove_orphaned_builds

    out = tmp_path / "story-model-abc"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".story-model-abc-pid{int(dead.stdout)}-x1"
    live = tmp_path / f".story-model-abc-pid{os.getpid()}-x2"
    old = tmp_path / ".story-model-abc-x3"
    for p in (orphan, live, old):
        p.mkdir()
    _remove_orphaned_builds(out)
    assert live.exists() and not orphan.exists() and not old.exists()


def test_sae_progress_bar_reaches_its_total(capsys):
    from mechrl.analysis.sae import SAESpec, train_sae

    spec = SAESpec(site="x", architecture="topk", expansion=2, k=2, steps=7, batch_size=16, lr=1e-3)
    train_sae(torch.randn(400, 8), spec)
    err = capsys.readouterr().err
    assert f"{7 * 16}/{7 * 16}" in err


def test_checkpoints_record_their_task(tmp_path):
    from mechrl.config import load_config
    from mechrl.runs.rundir import CHECKPOINT_TASK_FILE, RunDir
    from mechrl.train.grpo import run_grpo

    cfg, name = load_config("cards-grpo", [f"out_dir={tmp_path}", "task.n_train=100", "task.n_val=10",
                                           "task.n_test=10", "task.n_ood=10", "model.tiny.d_model=32",
                                           "model.tiny.n_layer=1", "train.max_new_tokens=4", "train.prompts_per_step=2",
                                           "train.num_generations=2", "train.max_steps=1", "eval.n_per_split=2",
                                           "eval.n_final=2", "eval.max_new_tokens=4"], kind="grpo")
    run = RunDir.start(cfg, name)
    final = run_grpo(cfg, run)
    saved = yaml.safe_load((final / CHECKPOINT_TASK_FILE).read_text())
    assert saved == cfg.task.model_dump(mode="json")
