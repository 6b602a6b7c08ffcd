"""The `mechrl` command. Thin: parse, build a config, call one library function.

    mechrl sft  <recipe> [key=value ...] [--force]
    mechrl grpo <recipe> [key=value ...] [--force]
    mechrl ppo  <recipe> [key=value ...] [--force]
    mechrl eval <checkpoint> --task cards [--n N] [--out FILE] [key=value ...]
    mechrl demo [--out DIR]
    mechrl report <run> [<run> ...] [--out FILE]

User errors (a typo in a recipe, a missing checkpoint) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from mechrl.errors import UserError


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()


def cmd_sft(args) -> int:
    from mechrl.config import load_config
    from mechrl.runs.rundir import RunDir
    from mechrl.train.sft import run_sft

    cfg, name = load_config(args.recipe, args.overrides, kind="sft")
    run = RunDir.start(cfg, name, force=args.force)
    print(f"run: {run.path}", file=sys.stderr)
    final = run_sft(cfg, run)
    print(final)
    return 0


def cmd_rl(args) -> int:
    from mechrl.config import load_config
    from mechrl.runs.rundir import RunDir

    cfg, name = load_config(args.recipe, args.overrides, kind=args.command)
    run = RunDir.start(cfg, name, force=args.force)
    print(f"run: {run.path}", file=sys.stderr)
    if args.command == "grpo":
        from mechrl.train.grpo import run_grpo as train
    else:
        from mechrl.train.ppo import run_ppo as train
    print(train(cfg, run))
    return 0


def cmd_eval(args) -> int:
    from mechrl.evaluate import evaluate_checkpoint, format_table

    result = evaluate_checkpoint(args.checkpoint, task=args.task, n=args.n, overrides=args.overrides,
                                 splits=tuple(args.split) if args.split else None)
    print(format_table(result, title=f"{args.checkpoint}"))
    if args.out:
        from mechrl.runs.rundir import atomic_write_json

        atomic_write_json(args.out, {k: v for k, v in result.items() if k != "samples"})
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from mechrl.runs.report import build_report

    out = args.out or (Path(args.runs[0]) / "report.html" if len(args.runs) == 1 else Path("report.html"))
    print(build_report(args.runs, out))
    return 0


def cmd_demo(args) -> int:
    from mechrl.studies.sft_vs_rl import format_summary, run_demo

    summary = run_demo(Path(args.out), preset=args.preset, force=args.force)
    print(format_summary(summary))
    print(json.dumps({"summary": str(Path(args.out) / "summary.json")}))
    return 0 if summary else 1


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
    e.add_argument("--n", type=int, default=1000, help="examples per split")
    e.add_argument("--split", action="append", help="only these splits (repeatable)")
    e.add_argument("--out", help="write the result as JSON here")
    e.add_argument("overrides", nargs="*", help="task overrides: task.n_ood=2000 ...")
    e.set_defaults(fn=cmd_eval)

    rp = sub.add_parser("report", help="one self-contained HTML report of one or more run directories")
    rp.add_argument("runs", nargs="+", help="run directories (several: compared side by side)")
    rp.add_argument("--out", help="the HTML file (default: <run>/report.html for one run, ./report.html for several)")
    rp.set_defaults(fn=cmd_report)

    d = sub.add_parser("demo", help="the sft-vs-rl study at its tiny preset, end to end")
    d.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    d.add_argument("--preset", default="tiny")
    d.add_argument("--force", action="store_true", help="start over instead of resuming")
    d.set_defaults(fn=cmd_demo)
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
    try:
        return args.fn(args)
    except UserError as e:
        print(f"mechrl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mechrl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
