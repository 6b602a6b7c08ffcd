"""Study 3, feature-control (seeds 002, 004): a reward model with interpretable SAE features, trained on
preferences with a labeller bias, and RL that penalises the features carrying the bias. The question is
whether the policy's behaviour changes or only the penalised features do (evasion).

    mechrl study feature-control --preset tiny --seeds 2 --out runs/fc

`recipes/feature-control.yaml` holds every setting and describes the pipeline; each stage writes its output
under `out/` and is reused on a rerun with the same config (a different config there is an error; `force`
starts over). RL runs are ordinary run directories under `out/runs/` and resume.

    out/pipeline.json              the resolved study config
    out/data/*.jsonl               train / held-out preference pairs, the human corpus (demonstrations)
    out/rm/                        the reward model (TRL RewardTrainer) and reward_model.json
    out/sarm/                      the SAEReward (trunk, SAE, head) and out/sarm_fit.json
    out/selected_features.json     selected latents (index, tau, alpha, evidence, top stories, logit lens, probes)
    out/human_latents.safetensors  the KL term's human buffer
    out/best_of_n.json             best-of-N reranking with and without the head edit
    out/runs/<arm>_s<seed>/        the GRPO runs
    out/evals/*.json               final evaluation of each run and of the base model
    out/summary.json, out/report.html
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from mechrl.config import Strict, build_config
from mechrl.config_loading import format_errors, read_yaml, set_dotted, resolve_recipe
from mechrl.control.features import (SelectionConfig, best_of_n, clamp_probe, feature_evidence, logit_lens,
                                     select_features, top_activating)
from mechrl.control.penalties import build_human_buffer, load_cached
from mechrl.control.sarm_train import SARMConfig, fit_sarm
from mechrl.errors import UserError
from mechrl.runs.rundir import RunDir, atomic_write_json
from mechrl.tasks.stories.dataset import make_example
from mechrl.tasks.stories.preferences import (GroundTruth, PreferenceConfig, generate_pairs, preference_accuracies,
                                              save_pairs, truncate_tokens)
from mechrl.train.reward_model import RewardModel, RewardModelConfig, train_record, train_reward_model

log = logging.getLogger(__name__)

ARMS = ("rm_only", "feature_penalty", "head_edit", "penalty_kl", "text_detector")


class ControlConfig(Strict):
    alpha_mult: float = Field(2.0, ge=0)
    """alpha_i = alpha_mult x the reward latent i adds when above tau_i on hacking texts (w_i x mean z_i)."""
    beta_mult: float = Field(0.5, ge=0)
    """beta = beta_mult x the RM score's std on human stories."""
    kl_refresh_every: int = Field(5, ge=1)
    kl_folds: int = Field(2, ge=2)
    kl_clip: float = Field(10.0, gt=0)


class BestOfNConfig(Strict):
    n: int = Field(16, ge=1)
    n_prompts: int = Field(64, ge=1)


class EvalConfig(Strict):
    n_prompts: int = Field(64, ge=1)
    samples_per_prompt: int = Field(4, ge=1)


class FeatureControlConfig(Strict):
    """The study's recipe (`recipes/feature-control.yaml`)."""

    study: Literal["feature-control"] = "feature-control"
    data: PreferenceConfig = PreferenceConfig()
    n_train_pairs: int = Field(4000, ge=10)
    n_test_pairs: int = Field(1000, ge=10)
    n_probe_pairs: int = Field(1000, ge=10)
    """Held-out pairs (labelled by quality) for the causal check of feature selection; the reported probes use
    the test pairs."""
    n_corpus: int = Field(3000, ge=10)
    reward_model: RewardModelConfig = RewardModelConfig()
    sarm: SARMConfig = SARMConfig()
    selection: SelectionConfig = SelectionConfig()
    control: ControlConfig = ControlConfig()
    best_of_n: BestOfNConfig = BestOfNConfig()
    eval: EvalConfig = EvalConfig()
    arms: list[str] = list(ARMS)
    rl: dict[str, Any]
    """A GRPO recipe (kind grpo) every arm shares; the study sets its rewards, seed and output folder."""
    threads: int | None = Field(1, ge=1)
    """Torch CPU threads while the study runs (restored after); None: torch's default. Tiny models on a shared
    CPU run far faster on one thread (measured: a GRPO step 2.6 s on 1 thread, 60 s on 2 threads while another
    job used both cores). Not part of the comparison with an existing output folder (it changes speed)."""
    presets: dict[str, dict[str, Any]] = {}
    preset: str | None = None

    @field_validator("arms")
    @classmethod
    def _known_arms(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in ARMS]
        if bad or not v or len(set(v)) != len(v):
            raise ValueError(f"arms: {v} must be distinct names among {list(ARMS)}")
        return v

    @field_validator("rl")
    @classmethod
    def _rl_recipe(cls, v: dict) -> dict:
        if v.get("kind") != "grpo":
            raise ValueError("rl: the arms are GRPO runs; set rl.kind: grpo")
        build_config(v, source="rl")  # every key checked now
        return v


def load_study_config(recipe: str | Path = "feature-control", preset: str | None = None,
                      overrides: dict[str, Any] | None = None) -> FeatureControlConfig:
    """The study config from its recipe, with a preset's dotted overrides (and `overrides`) applied."""
    from pydantic import ValidationError

    path = resolve_recipe(recipe)
    data = read_yaml(path)
    if preset is not None:
        presets = data.get("presets") or {}
        if preset not in presets:
            raise UserError(f"{path}: unknown preset {preset!r}; presets: {', '.join(presets) or 'none'}")
        for k, v in (presets[preset] or {}).items():
            set_dotted(data, k, v)
        data["preset"] = preset
    for k, v in (overrides or {}).items():
        set_dotted(data, k, v)
    try:
        return FeatureControlConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(format_errors(e, FeatureControlConfig, str(path))) from None


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------

def _base_model_path(cfg: FeatureControlConfig) -> Path:
    rl, _ = build_config(cfg.rl, source="rl")
    if rl.model.builtin is not None:
        from mechrl.tasks.stories.base_model import StoryModelConfig, story_base_model

        return story_base_model(StoryModelConfig(fast=rl.model.builtin == "stories-fast"))
    if rl.model.path is None:
        raise UserError("rl.model: the study needs a pretrained model (builtin: stories, or a path)")
    return Path(rl.model.path)


def corpus(cfg: FeatureControlConfig, n: int, split: str = "corpus") -> tuple[list[str], list[str]]:
    """(prompts, completions) of `n` human stories of the grammar, cut as the pairs are."""
    rng = random.Random(f"fc-{split}-{cfg.data.data_seed}")
    ex = [make_example(rng) for _ in range(n)]
    return [e["prompt"] for e in ex], [truncate_tokens(e["completion"], cfg.data.max_completion_tokens) for e in ex]


def stage_data(cfg: FeatureControlConfig, out: Path) -> dict:
    d = out / "data"
    if not (d / "done.json").is_file():
        train = generate_pairs(cfg.data, "train", cfg.n_train_pairs)
        test = generate_pairs(cfg.data, "test", cfg.n_test_pairs, bias_fraction=0.0)
        save_pairs(train, d / "train_pairs.jsonl")
        save_pairs(test, d / "test_pairs.jsonl")
        save_pairs(generate_pairs(cfg.data, "probe", cfg.n_probe_pairs, bias_fraction=0.0), d / "probe_pairs.jsonl")
        prompts, texts = corpus(cfg, cfg.n_corpus)
        (d / "corpus.jsonl").write_text("".join(json.dumps({"prompt": p, "response": t}) + "\n"
                                                for p, t in zip(prompts, texts)))
        truth = GroundTruth.of(cfg.data)
        stats = {"n_train": len(train), "bias_applied": sum(p["bias_applied"] for p in train) / len(train),
                 "train_conflict": sum(p["quality_chosen"] < p["quality_rejected"] for p in train) / len(train),
                 "corpus_hack_rate": sum(truth.hack_flags(texts)) / len(texts),
                 "corpus_quality": sum(truth.quality(texts)) / len(texts)}
        atomic_write_json(d / "done.json", stats)
    read = lambda f: [json.loads(x) for x in (d / f).read_text().splitlines() if x.strip()]  # noqa: E731
    corp = read("corpus.jsonl")
    return {"train": read("train_pairs.jsonl"), "test": read("test_pairs.jsonl"), "probe": read("probe_pairs.jsonl"),
            "corpus": ([c["prompt"] for c in corp], [c["response"] for c in corp]),
            "stats": json.loads((d / "done.json").read_text())}


def _scores_acc(score_fn, pairs: list[dict], truth: GroundTruth) -> dict:
    P = [p["prompt"] for p in pairs]
    sc, sr = score_fn(P, [p["chosen"] for p in pairs]), score_fn(P, [p["rejected"] for p in pairs])
    return preference_accuracies(pairs, list(map(float, sc)), list(map(float, sr)), truth)


def stage_rm(cfg: FeatureControlConfig, out: Path, data: dict) -> dict:
    rm_dir = out / "rm"
    if not (rm_dir / "accuracy.json").is_file():
        if rm_dir.exists():
            shutil.rmtree(rm_dir)
        train_reward_model(_base_model_path(cfg), data["train"], rm_dir, cfg.reward_model)
        rm = RewardModel.load(rm_dir)
        truth = GroundTruth.of(cfg.data)
        acc = {"held_out": _scores_acc(rm.score, data["test"], truth),
               "train": _scores_acc(rm.score, data["train"][:1000], truth)}
        atomic_write_json(rm_dir / "accuracy.json", acc)
    return {"path": str(rm_dir), "accuracy": json.loads((rm_dir / "accuracy.json").read_text()),
            "train_s": train_record(rm_dir)["wall_s"]}


def stage_sarm(cfg: FeatureControlConfig, out: Path, data: dict, rm: dict):
    path = out / "sarm"
    rec_path = out / "sarm_fit.json"
    if not rec_path.is_file():
        if path.exists():
            shutil.rmtree(path)
        train = data["train"]
        cp, ct = data["corpus"]
        sae_texts = ([p["prompt"] for p in train] * 2 + cp, [p["chosen"] for p in train]
                     + [p["rejected"] for p in train] + ct)
        held = corpus(cfg, min(500, cfg.n_corpus), split="sae-held-out")
        sarm, rec = fit_sarm(rm["path"], sae_texts, train, cfg.sarm, path, held_out_texts=held)
        truth = GroundTruth.of(cfg.data)
        rec["accuracy"] = {"held_out": _scores_acc(sarm.score, data["test"], truth),
                           "train": _scores_acc(sarm.score, train[:1000], truth)}
        atomic_write_json(rec_path, rec)
    return load_cached(path), json.loads(rec_path.read_text())


def stage_features(cfg: FeatureControlConfig, out: Path, data: dict, sarm) -> dict:
    sel_path = out / "selected_features.json"
    if sel_path.is_file():
        return json.loads(sel_path.read_text())
    truth = GroundTruth.of(cfg.data)
    cp, ct = data["corpus"]
    ev = feature_evidence(sarm, data["train"], (cp, ct), truth)

    def conflict_gain(i: int) -> float:
        r = clamp_probe(sarm, data["probe"], truth, set={i: 0.0})
        before, after = r["before"]["accuracy"]["conflict"], r["after"]["accuracy"]["conflict"]
        return 0.0 if before is None else after - before

    sel = select_features(ev, cfg.selection, probe=conflict_gain)
    z, hack = ev["z"], ev["hack"]
    scores = sarm.score(cp, ct)
    score_std = float(scores.std())
    for f in sel["features"]:
        i, tau = f["index"], f["tau"]
        on = (z[:, i] > tau) & (hack > 0)
        f["alpha"] = cfg.control.alpha_mult * float(f["head_weight"] * (z[on, i].mean() if on.any() else 0.0))
        f["logit_lens"] = logit_lens(sarm, i)
        f["top_stories"] = top_activating(sarm, i, cp, ct, n=5)
        f["clamp_to_zero"] = clamp_probe(sarm, data["test"], truth, set={i: 0.0})
    idx = [f["index"] for f in sel["features"]]
    sel["clamp_all_to_zero"] = clamp_probe(sarm, data["test"], truth, set={i: 0.0 for i in idx}) if idx else None
    sel["score_std"] = score_std
    sel["beta"] = cfg.control.beta_mult * score_std
    sel["d_sae"] = sarm.d_sae
    if idx:
        build_human_buffer(sarm, cp, ct, sel["kl_indices"], out / "human_latents.safetensors")
    atomic_write_json(sel_path, sel)
    return sel


@torch.no_grad()
def _sample(model, tok, prompts: list[str], k: int, max_new_tokens: int, seed: int) -> list[list[str]]:
    """`k` sampled completions (temperature 1) of each prompt."""
    from mechrl.train.rollout import generate

    model.eval()
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    roll = generate(model, tok, [p for p in prompts for _ in range(k)], max_new_tokens=max_new_tokens,
                    temperature=1.0, generator=g)
    return [roll.texts[i * k:(i + 1) * k] for i in range(len(prompts))]


def _eval_prompts(cfg: FeatureControlConfig, n: int, split: str) -> list[str]:
    return corpus(cfg, n, split=split)[0]


def stage_best_of_n(cfg: FeatureControlConfig, out: Path, sarm, sel: dict) -> dict:
    path = out / "best_of_n.json"
    if path.is_file():
        return json.loads(path.read_text())
    from mechrl.models.loading import load_pretrained

    rl, _ = build_config(cfg.rl, source="rl")
    model, tok = load_pretrained(_base_model_path(cfg), device="cpu")
    prompts = _eval_prompts(cfg, cfg.best_of_n.n_prompts, "best-of-n")
    cands = _sample(model, tok, prompts, cfg.best_of_n.n, rl.train.max_new_tokens, seed=0)
    truth = GroundTruth.of(cfg.data)
    idx = [f["index"] for f in sel["features"]]

    def measure(texts: list[str]) -> dict:
        return {"hack_rate": sum(truth.hack_flags(texts)) / len(texts),
                "positive_words": sum(truth.hack_counts(texts)) / len(texts),
                "quality": sum(truth.quality(texts)) / len(texts)}

    def rm(p, c):
        return sarm.score(p, c).tolist()

    def edited(p, c):
        with sarm.edit_head(zero=idx):
            return sarm.score(p, c).tolist()

    def oracle(p, c):
        return truth.quality(c)

    res = {"n": cfg.best_of_n.n, "n_prompts": len(prompts), "all_samples": measure([c for cs in cands for c in cs]),
           "rm": measure(best_of_n(prompts, cands, rm)),
           "edited_rm": measure(best_of_n(prompts, cands, edited)) if idx else None,
           "true_quality": measure(best_of_n(prompts, cands, oracle)), "edited_features": idx}
    atomic_write_json(path, res)
    return res


# ----------------------------------------------------------------------------------------------
# RL arms
# ----------------------------------------------------------------------------------------------

def arm_rewards(arm: str, sarm_path: str, sel: dict, human: str, cfg: FeatureControlConfig) -> list[dict]:
    """The reward list of an arm: its optimised terms, then the monitors every arm logs (weight 0)."""
    feats = sel["features"]
    idx, taus, alphas = [f["index"] for f in feats], [f["tau"] for f in feats], [f["alpha"] for f in feats]
    c = cfg.control
    kl = {"sarm": sarm_path, "human": human, "refresh_every": c.kl_refresh_every, "n_folds": c.kl_folds,
          "clip": c.kl_clip}
    pen = {"sarm": sarm_path, "features": idx, "taus": taus, "alphas": alphas}
    score = {"name": "sarm_score", "params": {"sarm": sarm_path}}
    if arm == "head_edit":
        score["params"]["head_zero"] = idx
    terms = [score]
    if idx:  # without selected latents there is no penalty, human buffer or firing to log (rm_only runs alone)
        terms.append({"name": "feature_penalty", "weight": 1.0 if arm in ("feature_penalty", "penalty_kl") else 0.0,
                      "params": pen})
        terms.append({"name": "latent_kl", "weight": sel["beta"] if arm == "penalty_kl" else 0.0, "params": kl})
        terms.append({"name": "latent_firing_kl", "weight": 0.0, "params": {"sarm": sarm_path, "human": human}})
    terms.append({"name": "rm_score", "weight": 0.0, "params": {"sarm": sarm_path}})
    terms += [{"name": f"feature_fires_{i}", "weight": 0.0, "params": {"sarm": sarm_path, "tau": t}}
              for i, t in zip(idx, taus)]
    words = list(cfg.data.positive_words)
    terms += [{"name": cfg.data.quality_reward, "weight": 0.0},
              {"name": "positive_word_any", "weight": 0.0, "params": {"words": words}},
              {"name": "positive_word_count", "weight": 0.0, "params": {"words": words}}]
    return terms


def arm_config(cfg: FeatureControlConfig, arm: str, seed: int, out: Path, sel: dict):
    """The GRPO run config of one arm and seed."""
    sarm_path, human = str((out / "sarm").resolve()), str((out / "human_latents.safetensors").resolve())
    rl = json.loads(json.dumps(cfg.rl))
    rl.update({"name": arm, "seed": seed, "out_dir": str(out / "runs"),
               "reward": arm_rewards(arm, sarm_path, sel, human, cfg)})
    if arm == "text_detector":
        rl["mitigation"] = {"method": "penalty", "penalty": max(sum(f["alpha"] for f in sel["features"]), 1e-6),
                            "detector": {"name": "contains_any_word",
                                         "params": {"words": list(cfg.data.positive_words)}}}
    return build_config(rl, source=f"arm {arm}")[0]


def run_arm(cfg: FeatureControlConfig, arm: str, seed: int, out: Path, sel: dict, force: bool) -> Path:
    from mechrl.train.runners import train

    rc = arm_config(cfg, arm, seed, out, sel)
    run = RunDir.start(rc, f"{arm}_s{seed}", force=force)
    t0 = time.perf_counter()
    final = train(rc, run)  # the text-detector arm runs the mitigated loop
    log.info("arm %s seed %d: %s (%.0f s)", arm, seed, final, time.perf_counter() - t0)
    return run.path


def evaluate_policy(cfg: FeatureControlConfig, model, tok, sarm, sel: dict) -> dict:
    """Sampled completions of held-out prompts: hack rate (any positive word), positive words per sample, each
    word's rate, true quality, RM score, each selected latent's firing and P(fires | hack) / P(fires | no hack)."""
    rl, _ = build_config(cfg.rl, source="rl")
    prompts = _eval_prompts(cfg, cfg.eval.n_prompts, "eval")
    k = cfg.eval.samples_per_prompt
    texts = [c for cs in _sample(model, tok, prompts, k, rl.train.max_new_tokens, seed=1234) for c in cs]
    P = [p for p in prompts for _ in range(k)]
    truth = GroundTruth.of(cfg.data)
    hack = truth.hack_flags(texts)
    z = sarm.raw_latents(P, texts)
    n = len(texts)
    res = {"n": n, "hack_rate": sum(hack) / n, "positive_words": sum(truth.hack_counts(texts)) / n,
           "quality": sum(truth.quality(texts)) / n, "rm_score": float(sarm.score(P, texts).mean()),
           "word_rates": {w: sum(v) / n for w, v in truth.word_hits(texts).items()}, "features": {},
           "examples": texts[:6]}
    fires_any = torch.zeros(n, dtype=torch.bool)
    for f in sel["features"]:
        fires = z[:, f["index"]] > f["tau"]
        fires_any |= fires
        res["features"][str(f["index"])] = _conditional(fires, hack)
    res["any_selected_fires"] = _conditional(fires_any, hack) if sel["features"] else None
    return res


def _conditional(fires: torch.Tensor, hack: list[bool]) -> dict:
    h = torch.tensor(hack)
    rate = lambda m: float(fires[m].float().mean()) if bool(m.any()) else None  # noqa: E731
    return {"rate": float(fires.float().mean()), "given_hack": rate(h), "given_no_hack": rate(~h)}


def stage_eval(cfg: FeatureControlConfig, out: Path, name: str, model_path: Path, sarm, sel: dict) -> dict:
    path = out / "evals" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    from mechrl.models.loading import load_pretrained

    model, tok = load_pretrained(model_path, device="cpu")
    res = evaluate_policy(cfg, model, tok, sarm, sel)
    res["model"] = str(model_path)
    atomic_write_json(path, res)
    return res


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------

def _check_out(cfg: FeatureControlConfig, out: Path, force: bool) -> None:
    """`out/pipeline.json` holds the config the stages there were built with; another one is an error."""
    rec = out / "pipeline.json"
    mine = cfg.model_dump(mode="json", exclude={"presets", "threads"})
    if force and out.exists():
        shutil.rmtree(out)
    if rec.is_file():
        old = json.loads(rec.read_text())
        if old != mine:
            diff = sorted(k for k in set(old) | set(mine) if old.get(k) != mine.get(k))
            raise UserError(f"{out} holds a study run with another config (differs in {diff}); use another --out "
                            "or --force to start over")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(rec, mine)


def run_study(out: Path, *, preset: str = "tiny", seeds: int = 1, force: bool = False) -> dict:
    """`mechrl study feature-control`: every stage, the RL arms for seeds 0..seeds-1, the final evaluations,
    then `summary.json` and `report.html` (see the module docstring)."""
    t0 = time.perf_counter()
    out = Path(out)
    cfg = load_study_config(preset=preset)
    _check_out(cfg, out, force)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out, preset, seeds, t0)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: FeatureControlConfig, out: Path, preset: str, seeds: int, t0: float) -> dict:
    from mechrl.studies.feature_control_report import summarize, write_report

    times: dict[str, float] = {}

    def timed(name, fn, *a):
        t = time.perf_counter()
        r = fn(*a)
        times[name] = times.get(name, 0.0) + time.perf_counter() - t
        return r

    data = timed("data", stage_data, cfg, out)
    rm = timed("reward_model", stage_rm, cfg, out, data)
    sarm, sarm_rec = timed("sarm", stage_sarm, cfg, out, data, rm)
    sel = timed("features", stage_features, cfg, out, data, sarm)
    if not sel["features"]:
        log.warning("no latent met the selection criteria %s: the penalty arms have nothing to penalise",
                    sel["criteria"])
    bon = timed("best_of_n", stage_best_of_n, cfg, out, sarm, sel)
    base = timed("eval", stage_eval, cfg, out, "base", _base_model_path(cfg), sarm, sel)
    runs: dict[str, dict[int, str]] = {}
    evals: dict[str, dict[int, dict]] = {}
    arms = cfg.arms if sel["features"] else [a for a in cfg.arms if a == "rm_only"]
    for seed in range(seeds):
        for arm in arms:
            path = timed(f"rl/{arm}", run_arm, cfg, arm, seed, out, sel, False)
            runs.setdefault(arm, {})[seed] = str(path)
            final = RunDir(path).status()["final_checkpoint"]
            evals.setdefault(arm, {})[seed] = timed("eval", stage_eval, cfg, out, f"{arm}_s{seed}", Path(final),
                                                    sarm, sel)
    summary = summarize(cfg, out, data=data, rm=rm, sarm_rec=sarm_rec, sel=sel, bon=bon, base=base, runs=runs,
                        evals=evals, seeds=seeds)
    summary["preset"] = preset
    summary["stage_time_s"] = times
    summary["wall_time_s"] = time.perf_counter() - t0
    atomic_write_json(out / "summary.json", summary)
    write_report(summary, out / "report.html")
    return summary

