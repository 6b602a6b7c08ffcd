"""Sweeps: grid parsing, the trial plan, fail-fast validation, and real sweeps on both backends
(local subprocesses; Ray on a local cluster bound to 127.0.0.1) with a killed trial and a re-run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from mechrl.cli import main
from mechrl.config import RECIPES_DIR, ConfigError
from mechrl.errors import UserError
from mechrl.runs.rundir import RunDir
from mechrl.runs.sweep import (SweepRecord, format_plan, parse_fixed, parse_grid, plan_sweep, run_sweep,
                               summarize, sweep_hash)

SPLITS = ["test", "ood_colors", "ood_composition", "ood_paraphrase", "ood_length", "ood_bigsmall"]


@pytest.fixture
def recipe(tmp_path) -> Path:
    """The built-in SFT recipe shrunk until a run is a few seconds of work (most of it imports)."""
    data = yaml.safe_load((RECIPES_DIR / "cards-sft.yaml").read_text())
    data.pop("presets")
    data["name"] = "sw"
    data["task"].update(n_train=64, n_val=16, n_test=16, n_ood=16)
    data["model"]["tiny"].update(n_layer=1, d_model=32, n_head=2, n_positions=128)
    data["train"].update(max_steps=2, batch_size=8, warmup_steps=0, log_every=1, eval_every=2)
    data["eval"] = {"n_per_split": 4, "n_final": 4, "n_samples": 0, "batch_size": 16}
    p = tmp_path / "sw.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


# ----------------------------------------------------------------------------------------------
# Grid syntax and the plan (no runs)
# ----------------------------------------------------------------------------------------------

def test_grid_product_order_and_names(recipe, tmp_path):
    plan = plan_sweep(recipe, ["seed=1,2,3", "train.lr=1e-3,5e-3"], ["train.max_steps=3"], out=tmp_path)
    assert len(plan.trials) == 6
    # the first key varies slowest
    assert [t.params for t in plan.trials] == [{"seed": s, "train.lr": lr} for s in (1, 2, 3) for lr in (1e-3, 5e-3)]
    names = [t.name for t in plan.trials]
    assert len(set(names)) == 6
    for t in plan.trials:  # every name carries its grid values (and the fixed one)
        assert t.name.startswith("sw_")
        assert f"lr{'1e-3' if t.params['train.lr'] == 1e-3 else '5e-3'}" in t.name
        assert t.name.endswith(f"_s{t.params['seed']}") and "steps3" in t.name
        assert t.kind == "sft"
        assert t.overrides[0] == "train.max_steps=3" and f"seed={t.params['seed']}" in t.overrides
        assert t.run_dir == plan.dir / "runs" / t.name
    assert plan.dir.name == f"sweep-sw-{sweep_hash(plan.grid, plan.fixed)}"
    assert not plan.dir.exists()  # planning writes nothing


def test_same_command_same_folder(recipe, tmp_path):
    a = plan_sweep(recipe, ["seed=1,2"], ["train.lr=1e-3"], out=tmp_path)
    b = plan_sweep(recipe, ["seed=1,2"], ["train.lr=1e-3"], out=tmp_path)
    c = plan_sweep(recipe, ["seed=1,3"], ["train.lr=1e-3"], out=tmp_path)
    d = plan_sweep(recipe, ["seed=1,2"], ["train.lr=2e-3"], out=tmp_path)
    assert a.dir == b.dir and len({a.dir, c.dir, d.dir}) == 3


def test_grid_values_with_brackets():
    grid = parse_grid(["task.id_families=[color_sum_diff,count_above],[parity_count_diff]", "seed=0"])
    assert grid == {"task.id_families": ["[color_sum_diff,count_above]", "[parity_count_diff]"], "seed": ["0"]}


@pytest.mark.parametrize("items, message", [
    (["seed="], "needs one or more comma-separated values"),
    (["seed=1,,2"], "needs one or more comma-separated values"),
    (["seed"], "not of the form key=value"),
    (["=1,2"], "has an empty key"),
    (["seed=1", "seed=2"], "grid key 'seed' is given twice"),
    (["seed=1,2,1"], "value '1' is listed twice"),
    (["train.lr=1e-3,0.001"], "value '0.001' is listed twice"),
    (["task.id_families=[a,b"], "unbalanced"),
    ([], "needs a grid"),
])
def test_grid_syntax_errors(items, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_grid(items)


def test_fixed_errors():
    with pytest.raises(ConfigError, match="'train.lr' is given twice"):
        parse_fixed(["train.lr=1", "train.lr=2"], {})
    with pytest.raises(ConfigError, match="'seed' is both in --grid and in --fixed"):
        parse_fixed(["seed=3"], {"seed": ["1", "2"]})


def test_typo_fails_before_anything_runs(recipe, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["sweep", str(recipe), "--grid", "seed=1,2", "train.bta=0.1,0.2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1 and "unknown key 'train.bta'" in lines[0] and "Traceback" not in err
    assert not out.exists()


def test_bad_value_in_a_later_trial_names_it(recipe, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lr.*sweep trial 2/2: train\.lr=-1"):
        plan_sweep(recipe, ["train.lr=1e-3,-1"], out=tmp_path)
    assert not any(tmp_path.glob("sweep-*"))


def test_unknown_backend_and_options(recipe, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sweep", str(recipe), "--grid", "seed=1", "--backend", "slurm", "--out", str(out)]) == 2
    assert "unknown sweep backend 'slurm'; backends: local, ray" in capsys.readouterr().err
    assert main(["sweep", str(recipe), "--grid", "seed=1", "--address", "127.0.0.1:6379", "--out", str(out)]) == 2
    assert "needs --backend ray" in capsys.readouterr().err
    assert not out.exists()


def test_dry_run_prints_trials(recipe, tmp_path, capsys):
    where = tmp_path / "out"
    code = main(["sweep", str(recipe), "--grid", "seed=1,2", "--fixed", "train.lr=1e-3", "--dry-run",
                 "--out", str(where)])
    out = capsys.readouterr().out
    assert code == 0
    plan = plan_sweep(recipe, ["seed=1,2"], ["train.lr=1e-3"], out=where)
    assert out.strip() == format_plan(plan)
    for t, seed in zip(plan.trials, (1, 2)):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(t.name + " "))
        assert line.split()[1:] == ["sft", "train.lr=1e-3", f"seed={seed}"]
    assert not where.exists()  # nothing written, nothing run


def test_help_and_one_sweep_per_folder(recipe, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--help"])
    assert e.value.code == 0 and "--grid" in capsys.readouterr().out
    import fcntl

    plan = plan_sweep(recipe, ["seed=1"], out=tmp_path / "out")
    plan.dir.mkdir(parents=True)
    with open(plan.dir / ".lock", "a") as held:  # as a running sweep holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another sweep is running in"):
            run_sweep(plan, backend="local")
    assert not (plan.dir / "sweep.json").exists()


def test_summary_reads_run_directories(recipe, tmp_path):
    """The table comes from the documented run-directory files: the latest eval, the last reward."""
    plan = plan_sweep(recipe, ["seed=1,2"], out=tmp_path)
    plan.dir.mkdir(parents=True)
    a = RunDir(plan.trials[0].run_dir)
    a.path.mkdir(parents=True)
    a.write_eval(1, {"splits": {"test": {"accuracy": 0.25}, "ood_length": {"accuracy": 0.0}}})
    a.write_eval(10, {"splits": {"test": {"accuracy": 0.75}, "ood_length": {"accuracy": 0.5}}})
    a.write_eval(9, {"splits": {"test": {"accuracy": 0.1}, "ood_length": {"accuracy": 0.1}}})
    a.log_metrics(5, {"reward/mean": 0.2})
    for step in range(1, 13):  # a component: its mean over the last 10 logged steps (3..12)
        a.log_metrics(step, {"reward/hack/mean": float(step), "reward/hack/std": 0.0})
    a.log_metrics(10, {"reward/mean": 0.6, "loss": 1.0})
    a.log_metrics(10, {"eval/test/accuracy": 0.75})
    from mechrl.runs.rundir import atomic_write_json
    atomic_write_json(a.eval_dir / "routing-step-4.json", {"modes": {"both": {"rewards": {"hack": 0.1}}}})
    atomic_write_json(a.eval_dir / "routing-step-12.json", {"modes": {"both": {"rewards": {"hack": 0.9}},
                                                                     "retain_only": {"rewards": {"hack": 0.2}}}})
    a.set_status("finished", train_time_s=12.5, stopped_early={"step": 12})
    record = SweepRecord(plan, "local")
    assert [record.status(t) for t in plan.trials] == ["finished", "pending"]
    rows = summarize(plan, record)
    assert rows[0] == {"run": plan.trials[0].name, "status": "finished", "seed": 1, "eval_step": 10,
                       "acc/test": 0.75, "acc/ood_length": 0.5, "reward/mean": 0.6, "last10/hack": 7.5,
                       "both/hack": 0.9, "retain_only/hack": 0.2, "stopped_at": 12, "train_time_s": 12.5}
    assert rows[1] == {"run": plan.trials[1].name, "status": "pending", "seed": 2, "eval_step": None,
                       "reward/mean": None, "stopped_at": None, "train_time_s": None}


# ----------------------------------------------------------------------------------------------
# Real sweeps
# ----------------------------------------------------------------------------------------------

def _sweep_cli(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mechrl.cli", "sweep", str(recipe), "--grid", "seed=1,2",
                             "--out", str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _kill_when_started(pid_path: Path, alive, timeout: float = 240) -> int:
    """Wait for a trial's pid file (while `alive()`), SIGKILL that process; returns its pid."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        text = pid_path.read_text().split() if pid_path.exists() else []
        if len(text) == 2:
            pid = int(text[1])
            os.kill(pid, signal.SIGKILL)
            return pid
        assert alive(), f"the sweep ended before {pid_path.name} appeared"
        time.sleep(0.05)
    raise AssertionError(f"{pid_path} did not appear in {timeout} s")


def _check_finished_row(row: dict, trial) -> None:
    """The summary's accuracies are the run's own final evaluation."""
    final = json.loads((trial.run_dir / "eval" / "step-2.json").read_text())["splits"]
    assert row["eval_step"] in (2, "2")
    for s in SPLITS:
        assert float(row[f"acc/{s}"]) == pytest.approx(final[s]["accuracy"])
        assert 0.0 <= final[s]["accuracy"] <= 1.0 and final[s]["n"] == 4


def _read_csv(plan) -> list[dict]:
    with open(plan.dir / "summary.csv") as f:
        return list(csv.DictReader(f))


EXPECTED_COLUMNS = ["run", "status", "seed", "eval_step", *(f"acc/{s}" for s in SPLITS), "train_time_s"]


def test_local_sweep_kill_and_rerun(recipe, tmp_path):
    """Two trials one at a time; the second is killed: failed, not lost. The same command again
    runs only that one (the finished trial's log and run directory are untouched)."""
    plan = plan_sweep(recipe, ["seed=1,2"], out=tmp_path / "out")
    first, second = plan.trials
    # in-process (the CLI is the same call; the Ray test runs it as a command)
    done: list = []
    sweep = threading.Thread(target=lambda: done.append(run_sweep(plan, backend="local")))
    sweep.start()
    _kill_when_started(plan.pid_path(second), sweep.is_alive)
    sweep.join(timeout=240)
    assert done, "the sweep raised or did not end"
    record, rows = done[0]
    assert record.counts() == {"pending": 0, "running": 0, "finished": 1, "failed": 1}
    rec = {t["name"]: t for t in json.loads((plan.dir / "sweep.json").read_text())["trials"]}
    assert rec[first.name]["status"] == "finished" and rec[first.name]["exit_code"] == 0
    assert rec[second.name]["status"] == "failed", rec[second.name]
    assert rec[second.name]["exit_code"] == -9 and rec[second.name]["signal"] == "SIGKILL"
    assert Path(rec[second.name]["log"]).exists() and not plan.pid_path(second).exists()
    assert "=== exit code -9" in Path(rec[second.name]["log"]).read_text()
    assert _read_csv(plan) == [{c: "" if r.get(c) is None else str(r[c]) for c in EXPECTED_COLUMNS} for r in rows]
    rows = _read_csv(plan)
    assert [r["status"] for r in rows] == ["finished", "failed"]
    assert list(rows[0]) == EXPECTED_COLUMNS
    _check_finished_row(rows[0], first)
    assert "| sw_s1 | finished | 1 | 2 |" in (plan.dir / "summary.md").read_text()

    log1 = plan.log_path(first)
    before = (log1.stat().st_mtime_ns, (first.run_dir / "status.json").stat().st_mtime_ns)
    record, _ = run_sweep(plan_sweep(recipe, ["seed=1,2"], out=tmp_path / "out"), backend="local")
    assert record.counts()["finished"] == 2
    assert (log1.stat().st_mtime_ns, (first.run_dir / "status.json").stat().st_mtime_ns) == before
    rec = {t["name"]: t for t in json.loads((plan.dir / "sweep.json").read_text())["trials"]}
    assert rec[first.name]["attempts"] == 1 and rec[second.name]["attempts"] == 2
    assert rec[second.name]["status"] == "finished" and rec[second.name]["exit_code"] == 0
    assert plan.log_path(second).read_text().count("=== mechrl sweep: attempt") == 2
    rows = _read_csv(plan)
    assert [r["status"] for r in rows] == ["finished", "finished"] and [r["seed"] for r in rows] == ["1", "2"]
    for row, trial in zip(rows, plan.trials):
        _check_finished_row(row, trial)
    assert (plan.dir / "summary.md").read_text().count("| finished |") == 2


@pytest.fixture
def ray_cluster(monkeypatch):
    """A Ray cluster on 127.0.0.1 with 2 CPUs, started by this process and shut down after."""
    from mechrl.runs.sweep_backends import LOOPBACK_ENV

    monkeypatch.setenv(LOOPBACK_ENV, "0")  # read when ray is first imported: keeps it on loopback
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    ctx = ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1",
                   log_to_driver=False)
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


def test_ray_sweep_with_a_killed_trial(recipe, tmp_path, ray_cluster):
    """Both trials as Ray tasks on a running cluster (`--address`); one is killed while it runs:
    it is recorded failed and the other finishes. The same table as the local backend's."""
    assert ray_cluster.startswith("127.0.0.1:"), ray_cluster
    out = tmp_path / "out"
    plan = plan_sweep(recipe, ["seed=1,2"], out=out)
    first, second = plan.trials
    sweep = _sweep_cli(recipe, out, "--backend", "ray", "--address", ray_cluster, "--max-concurrent", "2",
                       "--cpus-per-trial", "1")
    _kill_when_started(plan.pid_path(second), lambda: sweep.poll() is None)
    text, _ = sweep.communicate(timeout=240)
    assert sweep.returncode == 1, text
    assert f"| {first.name} | finished | 1 | 2 |" in text and "1 finished, 1 failed" in text
    data = json.loads((plan.dir / "sweep.json").read_text())
    assert data["backend"] == "ray"
    rec = {t["name"]: t for t in data["trials"]}
    assert rec[first.name]["status"] == "finished" and rec[first.name]["exit_code"] == 0
    assert rec[second.name]["status"] == "failed"
    assert rec[second.name]["exit_code"] == -9 and rec[second.name]["signal"] == "SIGKILL"
    rows = _read_csv(plan)
    assert [r["status"] for r in rows] == ["finished", "failed"]
    assert list(rows[0]) == EXPECTED_COLUMNS
    _check_finished_row(rows[0], first)


@pytest.mark.slow
def test_ray_sweep_starts_its_own_cluster(recipe, tmp_path):
    """Without --address the sweep starts a local cluster on 127.0.0.1 and stops it at the end."""
    pytest.importorskip("ray")
    out = tmp_path / "out"
    plan = plan_sweep(recipe, ["seed=1,2"], out=out)
    sweep = _sweep_cli(recipe, out, "--backend", "ray")
    text, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, text
    rows = _read_csv(plan)
    assert [r["status"] for r in rows] == ["finished", "finished"] and list(rows[0]) == EXPECTED_COLUMNS
    for row, trial in zip(rows, plan.trials):
        _check_finished_row(row, trial)
