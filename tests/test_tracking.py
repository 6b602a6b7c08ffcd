"""Tracking sinks: off by default, and when on, each real sink receives what metrics.jsonl holds."""

from __future__ import annotations

import sys
import time

import pytest

from mechrl.config import load_config
from mechrl.errors import UserError
from mechrl.runs.rundir import RunDir
from mechrl.runs.tracking import NullTracker


def _run(tmp_path, *overrides):
    cfg, name = load_config("cards-sft", [f"out_dir={tmp_path}", *overrides])
    return RunDir.start(cfg, name)


def test_no_sink_by_default(tmp_path):
    run = _run(tmp_path)
    assert isinstance(run.tracker, NullTracker)
    run.log_metrics(1, {"train/loss": 1.0})
    run.close()
    assert sorted(p.name for p in run.path.iterdir()) == [".lock", "config.yaml", "metrics.jsonl"]


def test_tensorboard_sink_gets_every_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _run(tmp_path, "tracking.sinks=[tensorboard]")
    for step in (1, 2, 3):
        run.log_metrics(step, {"train/loss": 1.0 / step, "eval/test/accuracy": 0.1 * step})
    run.close()
    acc = EventAccumulator(str(run.path / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3])
    assert [e.step for e in acc.Scalars("eval/test/accuracy")] == [1, 2, 3]


def test_wandb_offline_sink(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # conftest disables wandb; this test wants it on, offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = _run(tmp_path, "tracking.sinks=[wandb]", "tracking.wandb_mode=offline")
    assert run.tracker.sinks[0].run.settings.mode == "offline"
    run.log_metrics(1, {"train/loss": 0.123456})
    run.log_metrics(2, {"train/loss": 0.654321})
    run.close()
    offline = list((run.path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    # wandb's transaction log (history records hold keys and JSON values) is written by wandb's own
    # service process, which may still be flushing when finish() returns on a busy machine: wait for it
    needles = (b"train/loss", b"0.123456", b"0.654321")
    deadline = time.monotonic() + 120
    while True:
        data = offline[0].read_bytes()
        if all(n in data for n in needles) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for needle in needles:
        assert needle in data, needle


def test_trackio_sink_writes_local_logs(tmp_path, capsys):
    from trackio.sqlite_storage import SQLiteStorage

    run = _run(tmp_path, "tracking.sinks=[trackio]", "tracking.project=mechrl-test")
    for step in (1, 2):
        run.log_metrics(step, {"train/loss": 2.0 / step})
    run.close()
    assert "Uploading" not in capsys.readouterr().out  # it writes a local store; nothing is uploaded
    logs = SQLiteStorage.get_logs("mechrl-test", run.path.name)
    assert [(r["step"], r["train/loss"]) for r in logs] == [(1, 2.0), (2, 1.0)]


def test_missing_sink_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # makes `import tensorboard` fail
    with pytest.raises(UserError, match="needs the 'tensorboard' package.*mechrl\\[tracking\\]"):
        _run(tmp_path, "tracking.sinks=[tensorboard]")


def test_unknown_sink_is_a_config_error(tmp_path):
    from mechrl.config import ConfigError

    with pytest.raises(ConfigError, match="tracking.sinks"):
        _run(tmp_path, "tracking.sinks=[mlflow]")
