"""The `mechrl` command. Thin: parse, build a config, call one library function.

    mechrl sft  <recipe> [key=value ...] [--force]
    mechrl grpo <recipe> [key=value ...] [--force]
    mechrl ppo  <recipe> [key=value ...] [--force]
    mechrl eval <checkpoint> --task cards [--n N] [--out FILE] [key=value ...]
    mechrl eval-routing <checkpoint> [--n N] [--out FILE]
    mechrl demo [--out DIR]
    mechrl study <name> [--preset P] [--seeds N] [--out DIR] [--force]
    mechrl sweep <recipe> --grid key=v1,v2 ... [--fixed key=value ...] [--backend local|ray] [--dry-run]
    mechrl report <run> [<run> ...] [--out FILE]
    mechrl analyze <run-or-study> [--what probes,patching,ablation,sae] [--out DIR] [--preset tiny|smoke|full]

User errors (a typo in a recipe, a missing checkpoint) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from mechrl.errors import UserError


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    import warnings

    # deprecations inside the pinned dependencies (PEFT reads transformers' old `is_gradient_checkpointing`
    # on every LoRA wrap), not in anything a user of mechrl wrote or can change
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def cmd_sft(args) -> int:
    from mechrl.config import load_config
    from mechrl.runs.preflight import preflight
    from mechrl.runs.rundir import RunDir
    from mechrl.train.runners import train

    cfg, name = load_config(args.recipe, args.overrides, kind="sft")
    preflight(cfg)
    run = RunDir.start(cfg, name, force=args.force)
    print(f"run: {run.path}", file=sys.stderr)
    print(train(cfg, run))
    return 0


def cmd_rl(args) -> int:
    from mechrl.config import load_config
    from mechrl.runs.preflight import preflight
    from mechrl.runs.rundir import RunDir
    from mechrl.train.runners import train

    cfg, name = load_config(args.recipe, args.overrides, kind=args.command)
    preflight(cfg)
    run = RunDir.start(cfg, name, force=args.force)
    print(f"run: {run.path}", file=sys.stderr)
    print(train(cfg, run))
    return 0


def cmd_eval(args) -> int:
    from mechrl.evaluate import evaluate_checkpoint, format_table
    from mechrl.runs.rundir import check_writable_file

    if args.out:
        check_writable_file(args.out, "--out")

    result = evaluate_checkpoint(args.checkpoint, task=args.task, n=args.n, overrides=args.overrides,
                                 splits=tuple(args.split) if args.split else None)
    print(format_table(result, title=f"{args.checkpoint}"))
    if args.out:
        from mechrl.runs.rundir import atomic_write_json

        atomic_write_json(args.out, {k: v for k, v in result.items() if k != "samples"})
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_eval_routing(args) -> int:
    from mechrl.runs.rundir import atomic_write_json, check_writable_file
    from mechrl.train.routing import evaluate_routing_checkpoint, summary_line

    if args.out:
        check_writable_file(args.out, "--out")
    result = evaluate_routing_checkpoint(args.checkpoint, n=args.n)
    print(summary_line(result))
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from mechrl.runs.report import build_report
    from mechrl.runs.rundir import check_writable_file

    out = args.out or (Path(args.runs[0]) / "report.html" if len(args.runs) == 1 else Path("report.html"))
    check_writable_file(out, "report")
    print(build_report(args.runs, out))
    return 0


def cmd_sweep(args) -> int:
    from mechrl.runs.sweep import check_options, format_plan, format_table, plan_sweep, run_sweep

    opts = dict(address=args.address, max_concurrent=args.max_concurrent, cpus_per_trial=args.cpus_per_trial,
                gpus_per_trial=args.gpus_per_trial)
    check_options(args.backend, **opts)
    from mechrl.runs.rundir import check_writable_dir

    check_writable_dir(args.out, "--out")
    plan = plan_sweep(args.recipe, args.grid, args.fixed or [], out=args.out)
    print(format_plan(plan), flush=True)
    if args.dry_run:
        return 0
    record, rows = run_sweep(plan, backend=args.backend, **opts)
    print(format_table(rows))
    counts = record.counts()
    print(f"sweep {plan.dir}: {counts['finished']} finished, {counts['failed']} failed "
          f"(details in sweep.json, logs in {plan.logs_dir})")
    return 0 if counts["finished"] == len(plan.trials) else 1


def cmd_analyze(args) -> int:
    from mechrl.runs.rundir import check_writable_dir
    from mechrl.studies.analyze_runs import analyze_dir
    from mechrl.studies.sft_vs_rl_analysis import format_headline

    check_writable_dir(args.out or args.target, "--out")

    result = analyze_dir(args.target, args.what.split(","), out=args.out, preset=args.preset,
                         checkpoint=args.checkpoint)
    print(format_headline(result["headline"]))
    print(json.dumps({"report": result["report"], "analysis": str(Path(result["report"]).parent)}))
    return 0


def cmd_demo(args) -> int:
    from mechrl.runs.rundir import check_writable_dir
    from mechrl.studies.sft_vs_rl import format_summary, run_demo

    check_writable_dir(args.out, "--out")

    summary = run_demo(Path(args.out), preset=args.preset, force=args.force, seed=args.seed)
    print(format_summary(summary))
    print(json.dumps({"summary": str(Path(args.out) / "summary.json")}))
    return 0 if summary else 1


def cmd_study(args) -> int:
    from mechrl.studies.registry import get_study, run_study

    from mechrl.runs.rundir import check_writable_dir

    spec = get_study(args.name)
    out = args.out or str(Path("runs") / f"study-{spec.name}-{args.preset or spec.presets[0]}")
    check_writable_dir(out, "--out")
    summary = run_study(args.name, out, preset=args.preset, seeds=args.seeds, force=args.force)
    print(json.dumps({"study": spec.name, "summary": str(Path(out) / "summary.json"),
                      "report": str(Path(out) / "report.html")}))
    return 0 if summary else 1


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _terminate(signum, frame):
    """SIGTERM (a scheduler, `kill`, a sweep stopping a trial) ends the command as Ctrl-C would, so
    the run records why it stopped instead of vanishing with its status still "running"."""
    raise KeyboardInterrupt(f"terminated by signal {signum}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mechrl", description="RL post-training of small language models "
                                "with interpretability built in.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sft", help="supervised fine-tuning (TRL SFTTrainer) from a recipe")
    s.add_argument("recipe", help="a recipe file or a built-in recipe name (e.g. cards-sft)")
    s.add_argument("overrides", nargs="*", help="dotted overrides: train.lr=3e-4 seed=7 preset=tiny")
    s.add_argument("--force", action="store_true", help="delete an existing run of this name first")
    s.set_defaults(fn=cmd_sft)

    for kind, what in (("grpo", "GRPO"), ("ppo", "PPO")):
        r = sub.add_parser(kind, help=f"{what} from a recipe (start from an SFT checkpoint with model.path=...)")
        r.add_argument("recipe", help=f"a recipe file or a built-in recipe name (e.g. cards-{kind})")
        r.add_argument("overrides", nargs="*", help="dotted overrides: train.lr=1e-4 model.path=runs/x/checkpoints/step-N")
        r.add_argument("--force", action="store_true", help="delete an existing run of this name first")
        r.set_defaults(fn=cmd_rl)

    e = sub.add_parser("eval", help="evaluate a checkpoint on every split of a task")
    e.add_argument("checkpoint")
    e.add_argument("--task", required=True, help="task name (e.g. cards)")
    e.add_argument("--n", type=_positive_int, default=1000, help="examples per split (>= 1)")
    e.add_argument("--split", action="append", help="only these splits (repeatable)")
    e.add_argument("--out", help="write the result as JSON here")
    e.add_argument("overrides", nargs="*", help="task overrides: task.n_ood=2000 ...")
    e.set_defaults(fn=cmd_eval)

    er = sub.add_parser("eval-routing", help="routing evaluation of a routed GRPO checkpoint: both adapters, "
                        "retain only, forget only")
    er.add_argument("checkpoint", help="a routed run's checkpoint, e.g. runs/<run>/checkpoints/step-N")
    er.add_argument("--n", type=_positive_int, help="completions per adapter mode (default: the run's routing.eval_n)")
    er.add_argument("--out", help="write the result (with samples) as JSON here")
    er.set_defaults(fn=cmd_eval_routing)

    rp = sub.add_parser("report", help="one self-contained HTML report of one or more run directories")
    rp.add_argument("runs", nargs="+", help="run directories (several: compared side by side)")
    rp.add_argument("--out", help="the HTML file (default: <run>/report.html for one run, ./report.html for several)")
    rp.set_defaults(fn=cmd_report)

    a = sub.add_parser("analyze", help="probes, patching, ablation and SAEs on a run's or a study's final checkpoints")
    a.add_argument("target", help="a run directory, or a study directory holding sft/ and grpo/ runs")
    a.add_argument("--what", default="probes,patching,ablation,sae", help="comma-separated analyses "
                   "(default: probes,patching,ablation,sae)")
    a.add_argument("--out", help="where analysis/ goes (default: the target directory)")
    a.add_argument("--preset", default="tiny", help="analysis size: smoke, tiny or full (default: tiny)")
    a.add_argument("--checkpoint", help="a run's checkpoint to analyze, e.g. step-500 (default: the final one)")
    a.set_defaults(fn=cmd_analyze)

    d = sub.add_parser("demo", help="the sft-vs-rl study at its tiny preset, end to end")
    d.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    d.add_argument("--preset", default="tiny")
    d.add_argument("--force", action="store_true", help="start over instead of resuming")
    d.add_argument("--seed", type=int, default=0, help="seed of both phases (default 0)")
    d.set_defaults(fn=cmd_demo)

    from mechrl.studies.registry import STUDIES

    st = sub.add_parser("study", help="run a study end to end (report.html + summary.json): "
                        + ", ".join(STUDIES))
    st.add_argument("name", help="; ".join(f"{s.name}: {s.description} (presets: {', '.join(s.presets)})"
                                           for s in STUDIES.values()))
    st.add_argument("--preset", help="the study's size (default: its first preset)")
    st.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the preset's, 1 unless it says)")
    st.add_argument("--out", help="output directory (default: runs/study-<name>-<preset>)")
    st.add_argument("--force", action="store_true", help="start over instead of resuming")
    st.set_defaults(fn=cmd_study)

    w = sub.add_parser("sweep", help="run a recipe over a grid of overrides (locally or on Ray)")
    w.add_argument("recipe", help="a recipe file or a built-in recipe name (e.g. cards-sft)")
    w.add_argument("--grid", nargs="+", action="extend", required=True, metavar="KEY=V1,V2",
                   help="grid keys and their comma-separated values; every combination is a run")
    w.add_argument("--fixed", nargs="+", action="extend", metavar="KEY=VALUE", help="overrides for every run")
    w.add_argument("--backend", default="local", help="local (subprocesses) or ray (default: local)")
    w.add_argument("--address", help="a running Ray cluster (default: start a local one)")
    w.add_argument("--max-concurrent", type=int, help="trials at once (local default: 1 per GPU, 1 on CPU)")
    w.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (ray default: 1)")
    w.add_argument("--gpus-per-trial", type=float, help="GPUs per trial (default: 1 where there are GPUs)")
    w.add_argument("--dry-run", action="store_true", help="print the trials and exit")
    w.add_argument("--out", default="runs", help="where the sweep folder goes (default: runs)")
    w.set_defaults(fn=cmd_sweep)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # dotted overrides may come after options (`--split x task.n=1`): collect them too
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    _setup_logging(args.verbose)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.fn(args)
    except UserError as e:
        print(f"mechrl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"mechrl {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 143 if str(e).startswith("terminated") else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
