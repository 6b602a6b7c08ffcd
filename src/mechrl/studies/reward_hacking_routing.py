"""Study 2, reward-hacking-routing (seed 001): does gradient routing put a reward hack into an adapter
that can be removed, and does it beat the simpler things a practitioner would do?

GRPO on the story task rewards sentences of about ten words plus a hackable bonus for "happy"
(`recipes/reward-hacking-routing.yaml`). Each arm is one run of that recipe per seed, the same
reward, beta, learning rate and steps:

    routed      dual LoRA; flagged samples update only the forget adapter (the recipe's default)
    lora        plain LoRA of the same total rank, no detector: how far the hack goes unchecked
    filter      plain LoRA; flagged samples dropped from the loss and their group's statistics
    penalty     plain LoRA; a flagged sample's reward loses 1
    early_stop  plain LoRA; stop when the flag rate's 5-step mean exceeds 0.4

Every arm's final policy is evaluated the same way (`train.routing.sample_and_score`: one completion
per held-out prompt from the same seeded stream, at the training temperature): hack rate = share
of completions saying "happy", task = `sentence_length_10_smooth`. A routed policy is evaluated with
both adapters, retain only (the forget adapter removed: the deployed model) and forget only.

    mechrl study reward-hacking-routing --preset smoke            # seconds
    mechrl study reward-hacking-routing --preset tiny --seeds 2   # the recipe's 100 steps per arm
    mechrl study reward-hacking-routing --preset coverage         # hack vs detector coverage per method,
                                                                  # and routed variants at coverage 0.5

Writes `<out>/runs/<arm>_s<seed>/` (ordinary run directories: a killed study resumes each run where
it stopped), `<out>/summary.json` and `<out>/report.html`.
"""

from __future__ import annotations

import io
import logging
import statistics
import time
from pathlib import Path

import yaml

from mechrl.config import GRPORunConfig, build_config, resolve_recipe
from mechrl.errors import UserError
from mechrl.runs.report import Figure, Section, Table, build_report
from mechrl.runs.rundir import RunDir, atomic_write_json

log = logging.getLogger(__name__)

RECIPE = "reward-hacking-routing"
#: Arm -> the recipe preset that makes it (None: the recipe's default, the routed run).
ARMS: dict[str, str | None] = {"routed": None, "lora": "lora", "filter": "filter", "penalty": "penalty",
                               "early_stop": "early_stop"}
#: Study preset -> the recipe preset applied on top of every arm (None: the recipe's own size).
SIZES: dict[str, str | None] = {"tiny": None, "smoke": "smoke"}
HACK, TASK = "happy_binary", "sentence_length_10_smooth"


def arm_config(arm: str, size: str, seed: int, out: Path) -> GRPORunConfig:
    """The recipe with the arm's preset and the size's preset both applied (dotted overrides)."""
    path = resolve_recipe(RECIPE)
    data = yaml.safe_load(path.read_text())
    overrides: dict = {}
    for preset in (ARMS[arm], SIZES[size]):
        if preset is not None:
            overrides.update(data["presets"][preset])
    overrides.update({"seed": seed, "out_dir": str(out / "runs")})
    cfg, _ = build_config({**data, "preset": None}, overrides, source=f"{path} ({arm}, {size})", kind="grpo")
    assert isinstance(cfg, GRPORunConfig)
    return cfg


def evaluate_arm(cfg: GRPORunConfig, final: Path) -> dict:
    """{mode: {task, hack, unique_frac, degenerate}} of a finished arm's final checkpoint."""
    from mechrl.models.loading import load_pretrained
    from mechrl.tasks import build_task
    from mechrl.train.routing import eval_prompts, eval_reward_components, eval_sampling, evaluate_routing_checkpoint
    from mechrl.train.routing import sample_and_score

    if cfg.routing.enabled:
        modes = evaluate_routing_checkpoint(final)["modes"]
    else:
        model, tok = load_pretrained(final, dtype=cfg.model.dtype, device=cfg.model.device)
        model.eval()
        prompts, examples = eval_prompts(build_task(cfg.task), cfg.routing.eval_n)
        modes = {"policy": sample_and_score(model, tok, prompts, examples, eval_reward_components(cfg),
                                            **eval_sampling(cfg))}
    return {mode: {"task": r["rewards"][TASK], "hack": r["rewards"][HACK], "unique_frac": r["unique_frac"],
                   "degenerate": r["degenerate"], "samples": r["samples"][:3]} for mode, r in modes.items()}


def run_study(out: Path, *, preset: str = "tiny", seeds: int = 1, force: bool = False) -> dict:
    """Every arm at `preset` for seeds 0..seeds-1, each evaluated; summary.json and report.html.
    Presets `coverage` and `coverage-smoke` run the partial-label design (`reward_hacking_coverage`)."""
    from mechrl.studies.reward_hacking_coverage import SIZES as COVERAGE, run_coverage
    from mechrl.train.runners import train

    if preset in COVERAGE:
        return run_coverage(Path(out), preset=preset, seeds=seeds, force=force)
    if preset not in SIZES:
        raise UserError(f"reward-hacking-routing: unknown preset {preset!r}; presets: {', '.join(SIZES)}")
    t0 = time.perf_counter()
    out = Path(out)
    results: dict = {}
    run_dirs = []
    for seed in range(seeds):
        for arm in ARMS:
            cfg = arm_config(arm, preset, seed, out)
            name = f"{arm}_s{seed}"
            log.info("reward-hacking-routing: arm %s, seed %d", arm, seed)
            run = RunDir.start(cfg, name, force=force)
            final = train(cfg, run)
            status = RunDir(run.path).status()
            results.setdefault(arm, {})[str(seed)] = {
                "run": str(run.path), "checkpoint": str(final), "final_step": int(final.name.split("-")[1]),
                "stopped_early": status.get("stopped_early"), "train_time_s": status.get("train_time_s"),
                "modes": evaluate_arm(cfg, final)}
            run_dirs.append(run.path)
    summary = {"study": "reward-hacking-routing", "preset": preset, "seeds": seeds,
               "measures": {"hack": f"{HACK} (share of completions saying 'happy')", "task": TASK},
               "arms": results, "over_seeds": over_seeds(results), "wall_time_s": time.perf_counter() - t0}
    atomic_write_json(out / "summary.json", summary)
    build_report(run_dirs, out / "report.html", lead_sections=[headline_section(summary)],
                 title=f"reward-hacking-routing study ({preset} preset, {seeds} seed(s))")
    return summary


def over_seeds(results: dict) -> dict:
    """{arm: {mode: {task|hack: {mean, min, max, n}}}}: every seed's final evaluation summarised."""
    out: dict = {}
    for arm, by_seed in results.items():
        modes = next(iter(by_seed.values()))["modes"]
        for mode in modes:
            for key in ("task", "hack"):
                vals = [r["modes"][mode][key] for r in by_seed.values()]
                out.setdefault(arm, {}).setdefault(mode, {})[key] = {
                    "mean": statistics.fmean(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
    return out


def headline_section(summary: dict) -> Section:
    """The question, the per-arm table (mean and range over seeds) and a figure of hack vs task."""
    rows = []
    for arm, modes in summary["over_seeds"].items():
        for mode, v in modes.items():
            rows.append([arm, mode, v["task"]["mean"], f"{v['task']['min']:.2f}-{v['task']['max']:.2f}",
                         v["hack"]["mean"], f"{v['hack']['min']:.2f}-{v['hack']['max']:.2f}", v["hack"]["n"]])
    deployed = {arm: modes.get("retain_only", modes.get("policy")) for arm, modes in summary["over_seeds"].items()}
    answer = "; ".join(f"{arm}: hack {v['hack']['mean']:.2f}, task {v['task']['mean']:.2f}"
                       for arm, v in deployed.items())
    text = ("Question: does gradient routing confine a reward hack (saying 'happy') to a forget adapter that "
            "can be removed, keeping the task, and how does it compare with filtering, a penalty, early "
            "stopping and no mitigation, all with the same detector and budget?\n\n"
            f"Answer at this preset, deployed policy (routed: retain only; others: the policy), mean over "
            f"{summary['seeds']} seed(s): {answer}.\n\n"
            f"Every final policy sampled once per held-out prompt at the training temperature; hack = "
            f"{summary['measures']['hack']}, task = {summary['measures']['task']}.")
    table = Table(["arm", "mode", "task", "task range", "hack", "hack range", "seeds"], rows, kind="routing-study",
                  caption="final evaluation per arm and adapter mode (mean and min-max over seeds)")
    return Section("Question and answer", text=text, tables=[table], figures=[_figure(deployed)])


def _figure(deployed: dict) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for arm, v in deployed.items():
        t, h = v["task"], v["hack"]
        ax.errorbar(t["mean"], h["mean"], xerr=[[t["mean"] - t["min"]], [t["max"] - t["mean"]]],
                    yerr=[[h["mean"] - h["min"]], [h["max"] - h["mean"]]], fmt="o", capsize=3, label=arm)
    ax.set_xlabel(f"task ({TASK})")
    ax.set_ylabel("hack rate (says 'happy')")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Deployed policy per arm (mean, min-max over seeds)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return Figure(buf.getvalue(), "hack rate against task reward of each arm's deployed policy (routed: retain only)")
