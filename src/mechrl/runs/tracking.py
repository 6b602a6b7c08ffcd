"""Optional metric sinks behind one small interface: wandb (offline by default), trackio, TensorBoard.

metrics.jsonl in the run directory is always the record; a sink is a copy for a dashboard. Every
metric a run logs goes through `RunDir.log_metrics`, which forwards it to the run's tracker, so a
training loop never branches on "is tracking on" (the null tracker takes the calls when it is off).

    tracking: {sinks: [wandb, tensorboard], wandb_mode: offline}

Nothing touches the network unless the user asks for it (`wandb_mode: online`). Where each sink
writes: wandb under `<run>/wandb/`, TensorBoard under `<run>/tensorboard/`, trackio under its own
`TRACKIO_DIR` (trackio reads that variable once, when it is first imported).

A sink whose package is missing is an error that names the package to install, never a silent skip.
"""

from __future__ import annotations

import contextlib
import io

import importlib
import logging
from pathlib import Path
from typing import Any, Protocol

from mechrl.errors import UserError

log = logging.getLogger(__name__)


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    """Takes every call and does nothing: the tracker when no sink is configured."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def _require(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"tracking sink needs the {package!r} package ({e}); "
                        f"install it with: pip install 'mechrl[tracking]'") from None


class WandbSink:
    def __init__(self, run_dir: Path, name: str, project: str, config: dict, mode: str):
        wandb = _require("wandb", "wandb")
        # resume="allow" with a stable id: a resumed mechrl run continues the same wandb run
        self.run = wandb.init(project=project, name=name, id=_safe_id(name), config=config, mode=mode,
                              dir=str(run_dir), resume="allow", reinit="create_new")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardSink:
    def __init__(self, run_dir: Path):
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class TrackioSink:
    def __init__(self, name: str, project: str, config: dict):
        trackio = _require("trackio", "trackio")
        # embed=False: no dashboard server is started; space_id=None: nothing leaves the machine
        self.run = trackio.init(project=project, name=name, config=config, resume="allow", embed=False,
                                space_id=None, auto_log_cpu=False, auto_log_gpu=False)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        # trackio prints "Uploading logs to Trackio" while it writes its *local* SQLite store (space_id is
        # None: nothing leaves the machine); that line reads as a network upload, so it is not shown
        from trackio import context_vars

        with contextlib.redirect_stdout(io.StringIO()):
            self.run.finish()
        if context_vars.current_run.get() is self.run:  # else trackio's exit hook finishes it (and prints) again
            context_vars.current_run.set(None)
        log.debug("trackio: run %s written to the local store under TRACKIO_DIR", self.run.name)


class MultiTracker:
    """Fans each call out to every sink."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, step: int, metrics: dict[str, float]) -> None:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for s in self.sinks:
            s.log(step, numeric)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def _safe_id(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)[:128]


def build_tracker(tracking, run_dir: Path, name: str, config: dict[str, Any]) -> Tracker:
    """The tracker a `TrackingConfig` asks for (a `NullTracker` when `sinks` is empty)."""
    if not tracking.sinks:
        return NullTracker()
    sinks = []
    for s in tracking.sinks:
        if s == "wandb":
            sinks.append(WandbSink(run_dir, name, tracking.project, config, tracking.wandb_mode))
        elif s == "tensorboard":
            sinks.append(TensorBoardSink(run_dir))
        elif s == "trackio":
            sinks.append(TrackioSink(name, tracking.project, config))
        else:  # the config's Literal makes this unreachable; keep it loud if that ever changes
            raise ValueError(f"unknown tracking sink {s!r}")
        log.info("tracking: %s sink on", s)
    return MultiTracker(sinks)
