"""Run-directory integrity: a rerun after a kill at any point loses nothing and duplicates nothing,
incomplete checkpoints are refused, one process writes a run at a time, and every failure leaves
status.json "failed" with its reason.

Kills are simulated here by putting the run directory in the state a SIGKILL at that moment leaves
(files written up to that point, nothing after); `test_random_kills.py` kills real processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from mechrl.config import load_config
from mechrl.models.loading import CheckpointError
from mechrl.runs.rundir import RunDir, RunLock, RunLockedError, read_jsonl
from mechrl.train.grpo import run_grpo
from mechrl.train.sft import run_sft

SFT = ["task.id_families=[count_above]", "task.train_family_weights=null", "task.composition_families=[sum_above]",
       "task.answer_format=direct", "task.n_train=500", "task.n_test=20", "task.n_ood=10", "task.n_val=10",
       "model.tiny.n_layer=1", "model.tiny.d_model=32", "train.max_steps=20", "train.warmup_steps=2",
       "train.eval_every=10", "train.log_every=5", "eval.n_per_split=8", "eval.n_final=8", "eval.n_samples=2"]
GRPO = ["task.n_train=200", "task.n_val=20", "task.n_test=20", "task.n_ood=20", "model.tiny.d_model=32",
        "model.tiny.n_layer=1", "reward=[{name: contains_word, params: {word: RED}}]", "train.max_new_tokens=8",
        "train.prompts_per_step=4", "train.num_generations=4", "train.lr=3e-3", "train.max_steps=6",
        "train.save_every=2", "train.eval_every=3", "eval.n_per_split=4", "eval.n_final=4", "eval.max_new_tokens=4",
        "eval.n_samples=1"]


def _sft(tmp_path, *extra):
    cfg, name = load_config("cards-sft", [f"out_dir={tmp_path}", *SFT, *extra], kind="sft")
    return cfg, name


def _grpo(tmp_path, *extra):
    return load_config("cards-grpo", [f"out_dir={tmp_path}", *GRPO, *extra], kind="grpo")


def _train(kind, cfg, name):
    run = RunDir.start(cfg, name)
    return run, (run_sft if kind == "sft" else run_grpo)(cfg, run)


def check_complete(run: RunDir, max_steps: int) -> None:
    """What every finished run directory must hold, whatever happened to it before."""
    metrics = read_jsonl(run.metrics_path)
    train_key = "train/loss" if run.status().get("kind") == "sft" else "reward/mean"
    steps = [r["step"] for r in metrics if train_key in r]
    assert steps == sorted(set(steps)), f"duplicated or unordered step records: {steps}"
    eval_steps = [r["step"] for r in metrics if any(k.startswith("eval/") for k in r)]
    assert eval_steps == sorted(set(eval_steps)), f"duplicated evaluation records: {eval_steps}"
    for step, _ in run.checkpoints():
        assert (run.eval_dir / f"step-{step}.json").is_file() or step not in eval_steps
    for s in eval_steps:
        assert (run.eval_dir / f"step-{s}.json").is_file(), f"evaluation of step {s} logged but no eval file"
    assert run.latest_checkpoint()[0] == max_steps
    assert max(steps) == max_steps
    assert run.status()["status"] == "finished"
    assert (run.path / "report.html").is_file()


def _reference(tmp_path, kind, *extra):
    cfg, name = (_sft if kind == "sft" else _grpo)(tmp_path / "ref", *extra)
    run, _ = _train(kind, cfg, name)
    return run


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_rerun_after_kill_before_first_checkpoint_has_one_record_per_step(tmp_path, kind):
    cfg, name = (_sft if kind == "sft" else _grpo)(tmp_path)
    run, _ = _train(kind, cfg, name)
    full = read_jsonl(run.metrics_path)
    # the state a kill just before the first checkpoint leaves: records, no checkpoint, "running"
    shutil.rmtree(run.checkpoints_dir)
    shutil.rmtree(run.eval_dir)
    (run.path / "report.html").unlink()
    run2 = RunDir.start(cfg, name)
    run2.set_status("running", kind=kind)
    (run_sft if kind == "sft" else run_grpo)(cfg, run2)
    again = read_jsonl(run.metrics_path)
    assert len(again) == len(full)  # the old records were dropped, not appended to
    check_complete(run2, cfg.train.max_steps)


def test_sft_kill_between_checkpoint_and_evaluation_redoes_the_evaluation(tmp_path):
    cfg, name = _sft(tmp_path)
    run, _ = _train("sft", cfg, name)
    full_metrics, full_samples = read_jsonl(run.metrics_path), read_jsonl(run.samples_path)
    # killed after step-10 appeared and its eval metrics were logged, before its samples and eval file
    shutil.rmtree(run.checkpoint_path(20))
    (run.eval_dir / "step-10.json").unlink()
    (run.eval_dir / "step-20.json").unlink()
    keep = [r for r in full_metrics if r["step"] <= 10]
    run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    run.samples_path.write_text("".join(json.dumps(r) + "\n" for r in full_samples if r["step"] < 10))
    run.set_status("running", kind="sft")
    run2 = RunDir.start(cfg, name)
    run_sft(cfg, run2)
    check_complete(run2, 20)
    ev = json.loads((run.eval_dir / "step-10.json").read_text())
    assert ev["step"] == 10 and ev["checkpoint"].endswith("step-10")
    assert [r["step"] for r in read_jsonl(run.samples_path)].count(10) == len(ev["splits"]) * 2  # 2 per split
    # the redone evaluation of the step-10 weights equals the original one
    old = [r for r in full_metrics if r["step"] == 10 and "eval/test/accuracy" in r][0]
    new = [r for r in read_jsonl(run.metrics_path) if r["step"] == 10 and "eval/test/accuracy" in r]
    assert len(new) == 1 and new[0] == old


def test_sft_kill_between_final_checkpoint_and_evaluation_trains_no_extra_step(tmp_path):
    cfg, name = _sft(tmp_path)
    run, _ = _train("sft", cfg, name)
    (run.eval_dir / "step-20.json").unlink()
    run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(run.metrics_path)
                                        if not (r["step"] == 20 and "eval/test/accuracy" in r)))
    (run.path / "report.html").unlink()
    run.set_status("running", kind="sft")
    run2 = RunDir.start(cfg, name)
    final = run_sft(cfg, run2)
    assert final == run.checkpoint_path(20)
    assert max(r["step"] for r in read_jsonl(run.metrics_path)) == 20  # no 21st step
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["global_step"] == 20
    check_complete(run2, 20)


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_kill_while_finishing_is_completed_by_the_rerun(tmp_path, kind):
    cfg, name = (_sft if kind == "sft" else _grpo)(tmp_path)
    run, _ = _train(kind, cfg, name)
    status = run.status()
    # killed while writing the report: finished, no report.html
    (run.path / "report.html").unlink()
    _train(kind, cfg, name)
    check_complete(run, cfg.train.max_steps)
    # killed after the final checkpoint, before the run was marked finished
    (run.path / "report.html").unlink()
    run.set_status("running", kind=kind)
    _train(kind, cfg, name)
    check_complete(run, cfg.train.max_steps)
    assert run.status()["train_time_s"] == status["train_time_s"]


@pytest.mark.parametrize("missing", ["optimizer.pt", "scheduler.pt", "trainer_state.json"])
def test_sft_checkpoint_missing_a_part_is_refused(tmp_path, missing, capsys):
    from mechrl.cli import main

    cfg, name = _sft(tmp_path)
    run, _ = _train("sft", cfg, name)
    shutil.rmtree(run.checkpoint_path(20))
    (run.checkpoint_path(10) / missing).unlink()
    run.set_status("running", kind="sft")
    with pytest.raises(CheckpointError, match=f"missing {missing}"):
        run_sft(cfg, RunDir.start(cfg, name))
    assert run.status()["status"] == "failed" and missing in run.status()["reason"]
    code = main(["sft", "cards-sft", f"out_dir={tmp_path}", *SFT])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and f"missing {missing}" in err


@pytest.mark.parametrize("missing", ["resume/optimizer.pt", "resume/scheduler.pt", "resume/state.json",
                                     "resume/rng.safetensors"])
def test_grpo_checkpoint_missing_a_part_is_refused(tmp_path, missing, capsys):
    from mechrl.cli import main

    cfg, name = _grpo(tmp_path)
    run, _ = _train("grpo", cfg, name)
    for step in (6, 4):
        shutil.rmtree(run.checkpoint_path(step))
    (run.checkpoint_path(3) / missing).unlink()
    code = main(["grpo", "cards-grpo", f"out_dir={tmp_path}", *GRPO])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and f"missing {missing}" in err
    assert run.status()["status"] == "failed"


def test_sft_resume_continues_token_count_and_train_time(tmp_path):
    cfg, name = _sft(tmp_path)
    run, _ = _train("sft", cfg, name)
    full = {r["step"]: r for r in read_jsonl(run.metrics_path) if "train/loss" in r}
    shutil.rmtree(run.checkpoint_path(20))
    run.set_status("running", kind="sft")
    run_sft(cfg, RunDir.start(cfg, name))
    resumed = {r["step"]: r for r in read_jsonl(run.metrics_path) if "train/loss" in r}
    assert sorted(resumed) == [5, 10, 15, 20]
    assert resumed[15]["train/num_tokens"] == full[15]["train/num_tokens"] > resumed[10]["train/num_tokens"] > 0
    assert resumed[20]["train/num_tokens"] == full[20]["train/num_tokens"]
    assert resumed[15]["train/time_s"] > resumed[10]["train/time_s"] > 0  # continued, not restarted at 0


def test_corrupted_metrics_line_is_one_error_and_the_report_shows_what_it_skipped(tmp_path, capsys):
    from mechrl.cli import main

    cfg, name = _grpo(tmp_path)
    run, _ = _train("grpo", cfg, name)
    lines = run.metrics_path.read_text().splitlines()
    lines[2] = lines[2][:10] + "\x00garbage"
    run.metrics_path.write_text("\n".join(lines) + "\n")
    shutil.rmtree(run.checkpoint_path(6))
    code = main(["grpo", "cards-grpo", f"out_dir={tmp_path}", *GRPO])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "metrics.jsonl:3" in err
    assert run.status()["status"] == "failed"
    code = main(["report", str(run.path), "--out", str(tmp_path / "r.html")])
    assert code == 0
    html = (tmp_path / "r.html").read_text()
    assert "Skipped while reading" in html and "metrics.jsonl:3" in html
    assert html.index("Skipped while reading") < html.index("Evaluation")  # first, before the numbers


def test_lock_refuses_a_second_writer_and_takes_over_a_dead_ones(tmp_path, caplog):
    cfg, name = _grpo(tmp_path)
    run = RunDir.start(cfg, name)  # holds the lock until closed
    code = ("import sys; from mechrl.config import load_config; from mechrl.runs.rundir import RunDir\n"
            f"cfg, name = load_config('cards-grpo', {[f'out_dir={tmp_path}', *GRPO]!r}, kind='grpo')\n"
            "RunDir.start(cfg, name)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "RunLockedError" in r.stderr
    assert f"in use by pid {os.getpid()} on {socket.gethostname()} since" in r.stderr
    run.close()
    # a holder that died without releasing: its record stays in .lock, the flock went with it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (run.path / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": time.time()}))
    with caplog.at_level("WARNING", logger="mechrl"):
        run2 = RunDir.start(cfg, name)
    assert f"taking over the lock of pid {pid}" in caplog.text
    assert json.loads((run.path / ".lock").read_text())["pid"] == os.getpid()
    run2.close()
    assert (run.path / ".lock").read_text() == ""  # released: nobody recorded


def test_cli_second_process_on_a_run_exits_at_once_naming_the_holder(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "mechrl")
    args = [exe, "grpo", "cards-grpo", f"out_dir={tmp_path}", *GRPO, "train.max_steps=400"]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.glob("*/metrics.jsonl")):
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second started"
        r = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2
        lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
        assert len(lines) == 1 and f"in use by pid {first.pid}" in lines[0], r.stderr
        # refused before anything was written or built: the run's log holds the first process's start only
        assert (next(tmp_path.iterdir()) / "train.log").read_text().count("GRPO ") == 1
    finally:
        first.kill()
        first.wait()


def test_other_host_lock_is_refused_with_how_to_clear_it(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    (path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(RunLockedError, match="another machine.*delete"):
        RunLock(path).acquire()


def test_every_failure_leaves_status_failed_with_the_reason(tmp_path, capsys):
    from mechrl.cli import main

    code = main(["grpo", "cards-grpo", f"out_dir={tmp_path}", *GRPO, "train.lr=1e30"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "diverged" in err
    (run_path,) = list(tmp_path.iterdir())
    status = json.loads((run_path / "status.json").read_text())
    assert status["status"] == "failed" and "TrainingDiverged" in status["reason"]
    # an interrupt is a failure too
    cfg, name = _sft(tmp_path / "sft")
    run = RunDir.start(cfg, name)

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    import mechrl.train.sft as sft_module

    orig = sft_module.SFTTrainer.train
    sft_module.SFTTrainer.train = interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            run_sft(cfg, run)
    finally:
        sft_module.SFTTrainer.train = orig
    assert run.status()["status"] == "failed" and run.status()["reason"] == "interrupted (Ctrl-C)"


def test_sigterm_marks_the_run_failed(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "mechrl")
    proc = subprocess.Popen([exe, "grpo", "cards-grpo", f"out_dir={tmp_path}", *GRPO, "train.max_steps=400"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("*/checkpoints/step-*")):
        time.sleep(0.05)
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    (run_path,) = list(tmp_path.iterdir())
    status = json.loads((run_path / "status.json").read_text())
    assert status["status"] == "failed" and "terminated by signal 15" in status["reason"]


def test_moved_run_resumes(tmp_path):
    cfg, name = _grpo(tmp_path / "a")
    run, _ = _train("grpo", cfg, name)
    shutil.rmtree(run.checkpoint_path(6))
    run.set_status("running", kind="grpo")
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    cfg_b, name_b = _grpo(tmp_path / "b")
    assert name_b == name
    run_b, _ = _train("grpo", cfg_b, name_b)
    check_complete(run_b, 6)


def test_config_from_before_an_option_existed_resumes_and_a_changed_value_is_refused(tmp_path, caplog):
    """A run written by an older mechrl lacks options added since: it resumes with their defaults (named
    in a warning) and its config.yaml is brought up to date; a stored value that differs is still refused."""
    import yaml
    from mechrl.config import ConfigError
    cfg, name = _grpo(tmp_path)
    run = RunDir.start(cfg, name)
    run.close()
    stored = yaml.safe_load(run.config_path.read_text())
    del stored["train"]["decode"], stored["train"]["adamw"]  # as written before these options existed
    run.config_path.write_text(yaml.safe_dump(stored))
    with caplog.at_level("WARNING", logger="mechrl.runs.rundir"):
        RunDir.start(cfg, name).close()
    assert "train.decode, train.adamw" in caplog.text and "'auto'" in caplog.text
    assert yaml.safe_load(run.config_path.read_text())["train"]["decode"] == "auto"  # brought up to date
    stored = yaml.safe_load(run.config_path.read_text())
    del stored["train"]["decode"]
    stored["train"]["lr"] = 123.0  # a real difference next to a missing option
    run.config_path.write_text(yaml.safe_dump(stored))
    with pytest.raises(ConfigError, match=r"train\.lr: 123\.0"):
        RunDir.start(cfg, name)
    stored["train"]["lr"] = cfg.train.lr
    stored["train"]["decode_mode"] = "x"  # a key this version does not know
    run.config_path.write_text(yaml.safe_dump(stored))
    with pytest.raises(ConfigError, match="decode_mode"):
        RunDir.start(cfg, name)


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        cfg, name = _grpo(tmp_path)
        run, _ = _train("grpo", cfg, name)
    finally:
        os.umask(old)
    for f in ("config.yaml", "status.json", "report.html", "metrics.jsonl", "eval/step-3.json"):
        assert (run.path / f).stat().st_mode & 0o777 == 0o644, f


def test_sft_prints_no_log_dicts_and_no_deprecation_warnings(tmp_path, capsys):
    import warnings

    cfg, name = _sft(tmp_path, "train.max_steps=10")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train("sft", cfg, name)
    out = capsys.readouterr().out
    assert "{'loss'" not in out and "'train_runtime'" not in out  # the trainer's printed log dicts
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not future, future
