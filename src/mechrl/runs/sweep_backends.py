"""How sweep trials run: local subprocesses, or Ray tasks that each run one subprocess.

Either way a trial is the command `python -m mechrl.cli <kind> <recipe> key=value ...` in its own
process, its stdout and stderr appended to `logs/<run>.log`, its pid in `logs/<run>.pid` while it
runs. A crash, an out-of-memory kill or a `kill -9` of that process is a non-zero exit code (or a
signal) that the sweep records as `failed`; it never takes the sweep (or a Ray worker) down.

- local: at most `max_concurrent` trials at once (default: one per visible GPU, or 1 on a CPU),
  each given `gpus_per_trial` whole GPUs of its own through CUDA_VISIBLE_DEVICES.
- ray: each trial a task `@ray.remote(num_cpus=cpus_per_trial, num_gpus=gpus_per_trial)` (Ray
  sets CUDA_VISIBLE_DEVICES and OMP_NUM_THREADS for it); `address` connects to a running
  cluster, otherwise a local one is started on 127.0.0.1 only and shut down at the end. Every node
  must see the same paths (the recipe, the sweep folder): a shared file system.

On Linux a trial's process is killed with its parent (prctl PR_SET_PDEATHSIG), so stopping a
sweep, or Ray killing a worker, leaves no orphaned training behind.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mechrl.errors import UserError
from mechrl.runs.sweep_record import SweepPlan, SweepRecord, Trial

log = logging.getLogger(__name__)

POLL_S = 0.2
"""How often the local backend checks its children."""

if sys.platform.startswith("linux"):
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    _PR_SET_PDEATHSIG = 1

    def _die_with_parent() -> None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
else:  # no parent-death signal elsewhere: an orphaned trial runs to its end
    _die_with_parent = None


def trial_argv(t: Trial, recipe: Path, python: str) -> list[str]:
    return [python, "-m", "mechrl.cli", t.kind, str(recipe), *t.overrides]


def exit_info(returncode: int) -> dict:
    """`{"exit_code": rc, "signal": name or None}`; a negative return code is a signal (Popen)."""
    sig = signal.Signals(-returncode).name if returncode < 0 else None
    return {"exit_code": returncode, "signal": sig}


class TrialProcess:
    """One trial's command as a child process: output appended to `log_path`, pid in `pid_path`."""

    def __init__(self, argv: list[str], log_path: Path, pid_path: Path, *, cwd: str, env: dict[str, str],
                 attempt: int):
        self.host = socket.gethostname()
        self.pid_path = Path(pid_path)
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "ab")
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.log.write(f"=== mechrl sweep: attempt {attempt}, {now}, host {self.host}\n"
                       f"=== {shlex.join(argv)}\n".encode())
        self.log.flush()
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                         cwd=cwd, env=env, preexec_fn=_die_with_parent)
        except BaseException:
            self.log.close()
            raise
        self.pid_path.write_text(f"{self.host} {self.proc.pid}\n")

    def _done(self, rc: int) -> dict:
        self.pid_path.unlink(missing_ok=True)
        self.log.write(f"=== exit code {rc}\n".encode())
        self.log.close()
        return {**exit_info(rc), "host": self.host}

    def poll(self) -> dict | None:
        rc = self.proc.poll()
        return None if rc is None else self._done(rc)

    def wait(self) -> dict:
        return self._done(self.proc.wait())

    def kill(self) -> dict:
        self.proc.kill()
        return self._done(self.proc.wait())


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # the log shows progress as it happens
    return env


# ----------------------------------------------------------------------------------------------
# local
# ----------------------------------------------------------------------------------------------

def _visible_gpus() -> list[str]:
    """The GPU ids this process may use, as CUDA_VISIBLE_DEVICES names them."""
    import torch

    n = torch.cuda.device_count()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [i.strip() for i in env.split(",") if i.strip()] if env else [str(i) for i in range(n)]
    assert len(ids) >= n, f"CUDA_VISIBLE_DEVICES={env!r} names fewer devices than torch sees ({n})"
    return ids[:n]


def run_local(plan: SweepPlan, record: SweepRecord, trials: list[Trial], *, max_concurrent: int | None,
              cpus_per_trial: float | None, gpus_per_trial: float | None) -> None:
    """Run `trials` as child processes of this one, at most `max_concurrent` at a time."""
    gpus = _visible_gpus() if gpus_per_trial != 0 else []
    per = (1 if gpus else 0) if gpus_per_trial is None else gpus_per_trial
    if per != int(per):
        raise UserError(f"the local backend gives trials whole GPUs; --gpus-per-trial {per} is a fraction")
    per = int(per)
    if per > len(gpus):
        raise UserError(f"--gpus-per-trial {per}: only {len(gpus)} GPU(s) visible here")
    limit = max_concurrent or (len(gpus) // per if per else 1)
    log.info("local sweep: %d trials, at most %d at once, %d GPU(s) each of %s", len(trials), limit, per, gpus)
    free = list(gpus)
    pending = list(trials)
    running: dict[str, tuple[Trial, TrialProcess, list[str]]] = {}
    try:
        while pending or running:
            while pending and len(running) < limit and len(free) >= per:
                t = pending.pop(0)
                ids, free = free[:per], free[per:]
                env = _base_env()
                env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
                if cpus_per_trial:
                    env["OMP_NUM_THREADS"] = str(max(1, math.floor(cpus_per_trial)))
                record.started(t)
                try:
                    proc = TrialProcess(trial_argv(t, plan.recipe, sys.executable), plan.log_path(t),
                                        plan.pid_path(t), cwd=os.getcwd(), env=env,
                                        attempt=record.trials[t.name]["attempts"])
                except BaseException as e:
                    record.ended(t, {"exit_code": None, "error": f"could not start: {type(e).__name__}: {e}"})
                    raise
                running[t.name] = (t, proc, ids)
                log.info("started %s (pid %d)", t.name, proc.proc.pid)
            time.sleep(POLL_S)
            for name, (t, proc, ids) in list(running.items()):
                result = proc.poll()
                if result is None:
                    continue
                del running[name]
                free += ids
                status = record.ended(t, result)
                log.info("%s: %s (exit code %s)", name, status, result["exit_code"])
    except BaseException as e:  # interrupted: stop the children, record them, and re-raise
        for name, (t, proc, _) in running.items():
            record.ended(t, {**proc.kill(), "error": f"sweep stopped ({type(e).__name__})"})
        raise


# ----------------------------------------------------------------------------------------------
# ray
# ----------------------------------------------------------------------------------------------

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Off (0): Ray's single-machine mode, every server on 127.0.0.1 (ray/_private/ray_constants.py)."""


def _ray_trial(argv_tail: list[str], log_path: str, pid_path: str, cwd: str, attempt: int) -> dict:
    """The body of a trial's Ray task: run the trial's command with this worker's Python and wait.
    A non-zero exit is returned, not raised: it is the trial's failure, not the task's."""
    if not Path(cwd).is_dir():
        raise FileNotFoundError(f"{socket.gethostname()}: the sweep's working directory {cwd} does not exist "
                                "on this node (sweeps across machines need a shared file system)")
    proc = TrialProcess([sys.executable, *argv_tail], Path(log_path), Path(pid_path), cwd=cwd,
                        env=_base_env(), attempt=attempt)
    try:
        return proc.wait()
    except BaseException:  # the task was cancelled: take the trial down with it
        proc.kill()
        raise


def run_ray(plan: SweepPlan, record: SweepRecord, trials: list[Trial], *, address: str | None,
            max_concurrent: int | None, cpus_per_trial: float | None, gpus_per_trial: float | None) -> None:
    """Run `trials` as Ray tasks on the cluster at `address`, or on a local one started here."""
    if address is None and "ray" not in sys.modules:
        # Ray binds a local cluster to the machine's routable address (even when asked for
        # 127.0.0.1) unless this is off; read once, when ray is imported. Checked below.
        os.environ[LOOPBACK_ENV] = "0"
    import ray

    owns = not ray.is_initialized()
    if not owns and address is not None:
        raise UserError(f"Ray is already initialised in this process; cannot connect to {address}")
    if owns and address is not None:
        ray.init(address=address, log_to_driver=False)
    elif owns:
        ctx = ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, _node_ip_address="127.0.0.1",
                       log_to_driver=False)
        ip = ctx.address_info["node_ip_address"]
        if ip != "127.0.0.1":
            ray.shutdown()
            raise RuntimeError(f"the local Ray cluster bound to {ip}, not loopback: ray was imported before the "
                               f"sweep without {LOOPBACK_ENV}=0 in the environment")
    inflight: dict = {}
    try:
        resources = ray.cluster_resources()
        cpus = 1 if cpus_per_trial is None else cpus_per_trial
        gpus = (1 if resources.get("GPU", 0) >= 1 else 0) if gpus_per_trial is None else gpus_per_trial
        for what, need in (("CPU", cpus), ("GPU", gpus)):
            if need > resources.get(what, 0):
                raise UserError(f"each trial asks for {need} {what}(s) but the Ray cluster has "
                                f"{resources.get(what, 0)}")
        task = ray.remote(_ray_trial).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
        limit = max_concurrent or len(trials)
        log.info("ray sweep: %d trials, at most %d at once, %s CPU / %s GPU each; cluster %s", len(trials),
                 limit, cpus, gpus, resources)
        pending = list(trials)
        cwd = os.getcwd()
        while pending or inflight:
            while pending and len(inflight) < limit:
                t = pending.pop(0)
                record.started(t)
                argv_tail = trial_argv(t, plan.recipe, "python")[1:]
                ref = task.remote(argv_tail, str(plan.log_path(t)), str(plan.pid_path(t)), cwd,
                                  record.trials[t.name]["attempts"])
                inflight[ref] = t
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                t = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as e:  # the task itself failed (worker died, raised)
                    text = str(e)
                    result = {"exit_code": None, "error": f"{type(e).__name__}: {text[:2000]}"}
                status = record.ended(t, result)
                log.info("%s: %s (exit code %s)", t.name, status, result.get("exit_code"))
    except BaseException as e:  # interrupted: cancel what runs, record it, and re-raise
        for ref, t in inflight.items():
            ray.cancel(ref, force=True)
            record.ended(t, {"exit_code": None, "error": f"sweep stopped ({type(e).__name__})"})
        raise
    finally:
        if owns:
            ray.shutdown()
