"""Study 4, rlhf-diffing (seed 003): what RL on a sentiment reward changed inside the story model, found by model
diffing and calibrated by a control run.

    mechrl study rlhf-diffing [--preset smoke|tiny] [--out DIR]

The pipeline (recipe `recipes/rlhf-diffing.yaml`; each stage writes its files under `out/` and a rerun resumes
from them; `--force` starts over):

  1. runs        the policy: GRPO (or PPO) of the story model on VADER's sentiment score (`rl_recipe`); the
                 control: the same recipe with a reward that carries no signal (`control_reward`)
  2. corpus      the texts every analysis reads: task stories plus completions sampled from base, policy and
                 control on held-out prompts; each text scored with `text_reward`; a fifth held out
  3. divergence  per layer, base vs policy and base vs control: weights, activations, logit-lens KL; top-k layers
  4. saes        paired SAEs (the published method) on the MLP outputs of the top-k layers: MMCS both ways per
                 layer, unmatched features, a base-vs-base seed control
  5. crosscoders BatchTopK crosscoders for base/policy and base/control at one site, on the same tokens; per latent
                 the relative decoder norm, class and latent-scaling check (`mechrl.analysis.crosscoder`)
  6. describe    the top exclusive latents of each pair (and the least-matched policy SAE features): contexts,
                 histogram, logit lens, token-lookup explanation and score, reward firing, positive-word shares
  7. probes      reward probes on crosscoder and SAE codes
  8. along       divergence, MMCS and exclusivity between the base and each checkpoint of the policy run
                 (`rlhf_diffing_along.py`)

then `summary.json` (the bar's numbers under "bar") and `report.html` (`rlhf_diffing_report.py`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from mechrl.analysis.crosscoder import (
    CrosscoderSpec, ExclusivityCriterion, crosscoder_metrics, encode_all, latent_table, load_crosscoder,
    paired_activations, save_crosscoder, top_exclusive, train_crosscoder,
)
from mechrl.analysis.describe import DescribeSpec, TokenCorpus, describe_latents
from mechrl.analysis.diffing import paired_saes
from mechrl.analysis.divergence import divergence, top_divergent_layers
from mechrl.analysis.reward_probes import reward_probe, text_features
from mechrl.analysis.sae import SAESpec, encode, load_sae
from mechrl.config import load_config
from mechrl.errors import UserError
from mechrl.models.loading import load_model, load_pretrained
from mechrl.rewards import build_reward
from mechrl.rewards.sentiment import positive_share
from mechrl.runs.rundir import RunDir, atomic_write_json
from mechrl.studies.rlhf_diffing_config import DiffingStudyConfig, load_study_config
from mechrl.tasks import build_task

log = logging.getLogger(__name__)

PAIRS = ("policy", "control")


def run_study(out: Path, *, preset: str = "tiny", seeds: int = 1, force: bool = False) -> dict:
    """`mechrl study rlhf-diffing`: the pipeline of the module docstring at `preset`, into `out`."""
    if seeds != 1:
        raise UserError("rlhf-diffing runs one seed: its calibration is the control run, and intervals come from "
                        "resampling texts; use --seeds 1")
    return run_diffing(load_study_config(preset=preset), Path(out), force=force)


@contextlib.contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    try:
        if n is not None:
            torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(old)


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def run_diffing(cfg: DiffingStudyConfig, out: Path, *, force: bool = False) -> dict:
    out = Path(out)
    if force:
        for sub in ("analysis",):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with _threads(cfg.threads):
        runs = train_runs(cfg, out, force=force)
        from mechrl.studies.rlhf_diffing_report import write_report  # local: the report imports this module

        a = out / "analysis"
        a.mkdir(exist_ok=True)
        task = build_task(runs["policy"]["cfg"].task)
        base, tok = load_model(runs["policy"]["cfg"].model, task, seed=cfg.seed)
        models = {"base": base.eval()}
        for pair in PAIRS:
            models[pair] = load_pretrained(runs[pair]["final"], device=str(next(base.parameters()).device))[0].eval()
        corpus = build_corpus(cfg, task, tok, models, a / "corpus.json")
        div = _cached(a / "divergence.json", lambda: divergence_stage(cfg, models, tok, corpus))
        saes = _cached(a / "paired_saes.json", lambda: paired_saes(
            models, tok, _texts(corpus, held=False), _texts(corpus, held=True), div["top_layers"],
            SAESpec(site="", architecture="topk", expansion=cfg.sae.expansion, k=cfg.sae.k, steps=cfg.sae.steps,
                    batch_size=cfg.sae.batch_size, lr=cfg.sae.lr, seed=cfg.seed),
            a / "saes", seed_control=cfg.sae.seed_control, threshold=cfg.sae.threshold))
        site = cfg.crosscoder.site if cfg.crosscoder.site != "auto" else f"resid_post.{div['top_layers'][0]}"
        cc = crosscoder_stage(cfg, models, tok, corpus, site, a / "crosscoders")
        variants = variants_stage(cfg, models, tok, corpus, site, a / "crosscoder-variants")
        desc = _cached(a / "descriptions.json", lambda: describe_stage(cfg, models, tok, corpus, site, cc, saes,
                                                                      a / "crosscoders"))
        probes = _cached(a / "reward_probes.json", lambda: probe_stage(cfg, models, tok, corpus, cc, saes))
        along = None
        if cfg.along.enabled:
            from mechrl.studies.rlhf_diffing_along import along_the_run

            along = along_the_run(cfg, runs["policy"]["run"], models["base"], tok, _texts(corpus, held=False),
                                  _texts(corpus, held=True), site, div["top_layers"][0], a / "along")
        summary = summarise(cfg, runs, corpus, div, saes, cc, desc, probes, along, site)
        summary["crosscoder_variants"] = variants
        summary["wall_time_s"] = time.perf_counter() - t0
        atomic_write_json(out / "summary.json", summary)
        write_report(summary, cfg, [runs[p]["run"].path for p in PAIRS], out / "report.html", a)
    return summary


def _cached(path: Path, fn):
    """Load `path` when a previous run wrote it, else compute, write and return `fn()`."""
    done = _json(path)
    if done is not None:
        log.info("rlhf-diffing: reusing %s", path)
        return done
    res = fn()
    atomic_write_json(path, res)
    return res


# ------------------------------------------------------------------------------------------------ 1. runs

def train_runs(cfg: DiffingStudyConfig, out: Path, *, force: bool = False) -> dict:
    """Train (or resume) the policy and the control run; returns per pair {cfg, run, final, name}."""
    overrides = [f"out_dir={out / 'runs'}", f"seed={cfg.seed}"]
    if cfg.rl_preset:
        overrides.insert(0, f"preset={cfg.rl_preset}")
    overrides += [f"{k}={json.dumps(v)}" for k, v in cfg.rl_overrides.items()]
    pol_cfg, pol_name = load_config(cfg.rl_recipe, overrides)
    if pol_cfg.kind not in ("grpo", "ppo"):
        raise UserError(f"rlhf-diffing: rl_recipe {cfg.rl_recipe!r} is kind {pol_cfg.kind!r}; it needs grpo or ppo")
    if getattr(pol_cfg.train, "lora", None) is not None:
        log.warning("rlhf-diffing: the policy trains LoRA adapters; diffing sees the merged weights")
    ctl_data = pol_cfg.model_dump()
    ctl_data.update(name=f"{pol_cfg.name}-control", reward=[r.model_dump() for r in cfg.control_reward])
    ctl_cfg = type(pol_cfg).model_validate(ctl_data)
    ctl_name = f"{pol_cfg.name}-control" + pol_name[len(pol_cfg.name):]
    out_runs = {}
    for pair, rcfg, name in (("policy", pol_cfg, pol_name), ("control", ctl_cfg, ctl_name)):
        run = RunDir.start(rcfg, name, force=force)
        if rcfg.kind == "grpo":
            from mechrl.train.grpo import run_grpo as train
        else:
            from mechrl.train.ppo import run_ppo as train
        log.info("rlhf-diffing: training the %s run %s", pair, run.path)
        final = train(rcfg, run)
        out_runs[pair] = {"cfg": rcfg, "run": run, "final": final, "name": name}
    return out_runs


def reward_curve(run_path: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of a logged metric from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_path) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r[key]) for r in rows if key in r]


# ---------------------------------------------------------------------------------------------- 2. corpus

def build_corpus(cfg: DiffingStudyConfig, task, tok, models: dict, path: Path) -> dict:
    """{"texts", "source", "reward", "held_out"}: task stories, then `n_samples` completions per model on the
    task's test prompts (prompt + completion), every text scored by `text_reward` as a whole."""
    done = _json(path)
    if done is not None:
        return done
    from mechrl.train.rollout import generate

    c = cfg.corpus
    ds = task.datasets
    stories = list(ds["train"]["story"][:c.n_stories]) if c.n_stories else []
    if len(stories) < c.n_stories:
        raise UserError(f"corpus.n_stories={c.n_stories} but the task's train split has {len(stories)} stories")
    prompts = list(ds["test"]["prompt"])
    prompts = [prompts[i % len(prompts)] for i in range(c.n_samples)]
    texts, source = list(stories), ["story"] * len(stories)
    for name, model in models.items():
        device = next(model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(c.seed)
        comps = []
        for i in range(0, len(prompts), 64):
            roll = generate(model, tok, prompts[i:i + 64], max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                            generator=gen)
            comps += roll.texts
        texts += [p + x for p, x in zip(prompts, comps)]
        source += [name] * len(prompts)
    reward = build_reward([cfg.text_reward.model_copy(update={"weight": 1.0})])
    scores = reward([""] * len(texts), texts, [{}] * len(texts)).total.tolist()
    g = torch.Generator().manual_seed(c.seed)
    held = torch.zeros(len(texts), dtype=torch.bool)
    held[torch.randperm(len(texts), generator=g)[:max(1, round(c.held_out_fraction * len(texts)))]] = True
    corpus = {"texts": texts, "source": source, "reward": scores, "held_out": held.tolist(),
              "reward_name": cfg.text_reward.name, "n_prompts": len(set(prompts))}
    atomic_write_json(path, corpus)
    return corpus


def _texts(corpus: dict, *, held: bool) -> list[str]:
    return [t for t, h in zip(corpus["texts"], corpus["held_out"]) if h == held]


def token_corpus(corpus: dict, tok, acts: dict) -> TokenCorpus:
    return TokenCorpus.build(tok, corpus["texts"], acts["_example"], acts["_position"],
                             held_out=torch.tensor(corpus["held_out"]), rewards=corpus["reward"])


# ------------------------------------------------------------------------------------------ 3. divergence

def divergence_stage(cfg: DiffingStudyConfig, models: dict, tok, corpus: dict) -> dict:
    held = _texts(corpus, held=True)
    res = {pair: divergence(models["base"], models[pair], tok, held) for pair in PAIRS}
    top = top_divergent_layers(res["policy"], cfg.divergence.top_k, by=cfg.divergence.rank_by)
    res.update(top_layers=top, rank_by=cfg.divergence.rank_by,
               top_layers_control=top_divergent_layers(res["control"], cfg.divergence.top_k, by=cfg.divergence.rank_by))
    return res


# ----------------------------------------------------------------------------------------- 5. crosscoders

def _criterion(cfg: DiffingStudyConfig) -> ExclusivityCriterion:
    c = cfg.crosscoder
    return ExclusivityCriterion(base_only_max=c.base_only_max, other_only_min=c.other_only_min,
                                shared_min=c.shared_min, shared_max=c.shared_max, max_nu_error=c.max_nu_error,
                                max_nu_recon=c.max_nu_recon)


def crosscoder_spec(cfg: DiffingStudyConfig, site: str, steps: int | None = None, variant=None) -> CrosscoderSpec:
    c = cfg.crosscoder
    v = {} if variant is None else {k: x for k, x in variant.model_dump().items() if x is not None and k != "name"}
    return CrosscoderSpec(site=site, expansion=v.get("expansion", c.expansion), k=v.get("k", c.k),
                          steps=v.get("steps", steps or c.steps), batch_size=c.batch_size, lr=c.lr,
                          shared_init=v.get("shared_init", c.shared_init), seed=cfg.seed)


def fit_pair_crosscoder(cfg: DiffingStudyConfig, base, other, tok, texts: list[str], held: torch.Tensor, site: str,
                        folder: Path, *, other_name: str, steps: int | None = None, variant=None) -> dict:
    """Train (or load) the crosscoder of base vs `other` on the non-held-out texts' tokens; its latent table and
    metrics on the held-out ones. Writes `folder/` (crosscoder) and `folder/table.json`."""
    acts = paired_activations([base, other], tok, texts, site)
    rows_held = held[acts["_example"]]
    if (folder / "table.json").is_file() and (folder / "crosscoder.json").is_file():
        return {"acts": acts, "table": _json(folder / "table.json"), "cc": load_crosscoder(folder)[0]}
    spec = crosscoder_spec(cfg, site, steps, variant)
    cc, train_log = train_crosscoder(acts["x"][~rows_held], spec)
    metrics = crosscoder_metrics(cc, acts["x"][rows_held])
    save_crosscoder(cc, folder, spec, models=("base", other_name), metrics={**metrics, "train": train_log})
    table = latent_table(cc, acts["x"][rows_held], _criterion(cfg), models=("base", other_name))
    table.update(metrics=metrics, site=site, tokens_per_s=train_log["tokens_per_s"], train_wall_s=train_log["wall_s"])
    atomic_write_json(folder / "table.json", table)
    return {"acts": acts, "table": table, "cc": cc}


def crosscoder_stage(cfg: DiffingStudyConfig, models: dict, tok, corpus: dict, site: str, folder: Path) -> dict:
    held = torch.tensor(corpus["held_out"])
    return {pair: fit_pair_crosscoder(cfg, models["base"], models[pair], tok, corpus["texts"], held, site,
                                      folder / pair, other_name=pair) for pair in PAIRS}


def _nearest(table: dict, n: int) -> list[dict]:
    """The `n` firing latents with the highest Δ, whatever their class."""
    rows = [r for r in table["latents"] if r["class"] != "dead"]
    return sorted(rows, key=lambda r: (-r["rel_norm"], -r["freq"]))[:n]


def variants_stage(cfg: DiffingStudyConfig, models: dict, tok, corpus: dict, site: str, folder: Path) -> dict:
    """Both pairs' crosscoders once per `crosscoder_variants` entry: counts, passing, the highest Δ, and the top
    exclusive latents that pass the scaling check described (offline; no LLM)."""
    held = torch.tensor(corpus["held_out"])
    out = {}
    describe = None
    for v in cfg.crosscoder_variants:
        vsite = v.site or site
        rec = {"site": vsite, "settings": v.model_dump()}
        for pair in PAIRS:
            res = fit_pair_crosscoder(cfg, models["base"], models[pair], tok, corpus["texts"], held, vsite,
                                      folder / v.name / pair, other_name=pair, variant=v)
            t = res["table"]
            describe = describe or _Describer(cfg, tok, corpus, res["acts"])
            top = [r["latent"] for r in top_exclusive(t, cfg.describe.n_top)]
            recs = describe.crosscoder(res["cc"], res["acts"]["x"], t, top, models[pair]) if top else []
            rec[pair] = {"counts": t["counts"], "exclusive_passing_scaling": t["exclusive_passing_scaling"],
                         "fvu": t["metrics"]["fvu"], "nearest": [{k: r[k] for k in ("latent", "rel_norm", "freq", "cosine")}
                                                                 for r in _nearest(t, 5)],
                         "top_exclusive": [_latent_summary(r) for r in recs],
                         "positive_latent_in_top5": any(r["positive"]["dominated"] for r in recs[:5])}
        out[v.name] = rec
        log.info("rlhf-diffing variant %s: other-only passing scaling policy %d, control %d", v.name,
                 rec["policy"]["exclusive_passing_scaling"]["other_only"],
                 rec["control"]["exclusive_passing_scaling"]["other_only"])
    return out


# -------------------------------------------------------------------------------------------- 6. describe

def _positive(desc: dict, codes_col: torch.Tensor, tc: TokenCorpus, n_rows: int) -> dict:
    """Positive-sentiment shares of a latent's top-activating tokens and its logit-lens tokens."""
    top = torch.argsort(codes_col, descending=True)[:n_rows]
    top = top[codes_col[top] > 0]
    words = [tc.tokens[int(tc.example[i])][int(tc.position[i])] for i in top.tolist()]
    lens = [t["token"] for t in desc.get("lens", {}).get("top", [])]
    ctx, lns = positive_share(words), positive_share(lens)
    return {"top_tokens": words, "context_share": ctx, "lens_share": lns,
            "dominated": bool((ctx or 0) > 0.5 or (lns or 0) > 0.5)}


class _Describer:
    """Describes latents from their codes on the corpus rows (columns of the described latents only)."""

    def __init__(self, cfg: DiffingStudyConfig, tok, corpus: dict, acts: dict, endpoint=None):
        d = cfg.describe
        self.cfg, self.tok, self.endpoint = cfg, tok, endpoint
        self.spec = DescribeSpec(n_contexts=d.n_contexts, n_lens=d.n_lens, n_tokens=d.n_tokens)
        self.tc = token_corpus(corpus, tok, acts)
        self.allowed = self.tc.input_ids.unique()

    def __call__(self, codes: torch.Tensor, latents: list[int], model, directions: torch.Tensor) -> list[dict]:
        """`codes` (N, len(latents)) holds the columns of `latents`; records carry the real latent ids."""
        from mechrl.analysis.llm_describe import describe_and_score

        ds = describe_latents(codes, self.tc, range(len(latents)), model=model, directions=directions[latents],
                              tokenizer=self.tok, allowed_ids=self.allowed, spec=self.spec)
        for i, rec in enumerate(ds):
            rec["latent"] = int(latents[i])
            rec["positive"] = _positive(rec, codes[:, i], self.tc, self.cfg.describe.n_top_rows)
            if self.endpoint is not None and rec["contexts"]:
                rec["llm"] = describe_and_score(self.endpoint, codes[:, i], self.tc,
                                                [c["context"] for c in rec["contexts"]])
        return ds

    def crosscoder(self, cc, x: torch.Tensor, table: dict, latents: list[int], model) -> list[dict]:
        """Descriptions of crosscoder latents, read in the second model (decoder, logit lens), with their rows."""
        codes = encode_all(cc, x, columns=latents)  # (N, n) every corpus token
        recs = self(codes, latents, model, cc.W_dec[:, 1].detach())
        rows = {r["latent"]: r for r in table["latents"]}
        for rec in recs:
            rec["table"] = rows[rec["latent"]]
        return recs


def describe_stage(cfg: DiffingStudyConfig, models: dict, tok, corpus: dict, site: str, cc: dict, saes: dict,
                   folder: Path) -> dict:
    """Descriptions of each pair's top exclusive latents (scaling check passed; the top failing ones listed apart;
    the highest-Δ ones whatever their class), and of the least-matched policy SAE features at the top layer."""
    from mechrl.analysis.llm_describe import LLMEndpoint

    d = cfg.describe
    endpoint = LLMEndpoint.from_env() if d.llm else None
    out: dict = {"llm": None if endpoint is None else {"url": endpoint.url, "model": endpoint.model}, "pairs": {}}
    describe = _Describer(cfg, tok, corpus, cc["policy"]["acts"], endpoint)
    tc, allowed = describe.tc, describe.allowed
    out["positive_base_rate"] = {"tokens": positive_share([t for toks in tc.tokens for t in toks]),
                                 "vocabulary": positive_share([tok.decode([int(i)]) for i in allowed])}
    for pair in PAIRS:
        crosscoder, table = cc[pair]["cc"], cc[pair]["table"]
        passing = top_exclusive(table, d.n_top)
        failing = [r for r in top_exclusive(table, d.n_top, require_scaling=False) if not r.get("scaling_ok")]
        nearest = _nearest(table, d.n_top)  # described whether or not they reach the other-only threshold
        rows = {r["latent"]: r for r in table["latents"]}
        latents = [r["latent"] for r in passing + failing + nearest]
        recs = describe.crosscoder(crosscoder, cc[pair]["acts"]["x"], table, latents, models[pair])
        n1, n2 = len(passing), len(passing) + len(failing)
        out["pairs"][pair] = {"passing": recs[:n1], "failing": recs[n1:n2], "nearest": recs[n2:],
                              "base_only": [rows[r["latent"]] for r in top_exclusive(table, d.n_top, "base_only")]}
    # the published method's view: the policy SAE features with the lowest max cosine to the base SAE
    layer = next(iter(saes["layers"]))
    rec = saes["layers"][layer]
    sae, _ = load_sae(rec["saes"]["policy"]["path"])
    from mechrl.analysis.cache import extract_activations

    acts = extract_activations(models["policy"], tok, corpus["texts"], [rec["site"]], positions=None, progress=False)
    per = {int(k): v for k, v in rec["per_feature"]["policy->base"].items()}  # JSON keys are strings on a rerun
    least = sorted(per, key=per.get)[:d.n_top]
    codes = torch.cat([encode(sae, b.float())[:, least] for b in acts[rec["site"]].split(8192)])
    feats = describe(codes, least, models["policy"], sae.W_dec.detach())
    for f in feats:
        f["max_cosine_to_base"] = per[f["latent"]]
    out["sae_unmatched"] = {"site": rec["site"], "features": feats}
    return out


# ---------------------------------------------------------------------------------------------- 7. probes

def probe_stage(cfg: DiffingStudyConfig, models: dict, tok, corpus: dict, cc: dict, saes: dict) -> dict:
    """Reward probes on each pair's crosscoder codes and on the base and policy SAE codes at the top layer."""
    from mechrl.analysis.cache import extract_activations

    n = len(corpus["texts"])
    out = {}
    for pair in PAIRS:
        acts = cc[pair]["acts"]
        feats = text_features(encode_all(cc[pair]["cc"], acts["x"]), acts["_example"], n)
        out[f"crosscoder_{pair}"] = reward_probe(feats, corpus["reward"], seed=cfg.seed)
    layer = next(iter(saes["layers"]))
    rec = saes["layers"][layer]
    for name in ("base", "policy"):
        sae, _ = load_sae(rec["saes"][name]["path"])
        acts = extract_activations(models[name], tok, corpus["texts"], [rec["site"]], positions=None, progress=False)
        feats = text_features(encode(sae, acts[rec["site"]].float()), acts["_example"], n)
        out[f"sae_{name}_{rec['site']}"] = reward_probe(feats, corpus["reward"], seed=cfg.seed)
    return out


# -------------------------------------------------------------------------------------------- the summary

def _mean_ci(xs: list[float], seed: int = 0, n_boot: int = 2000) -> dict:
    """Mean and a 95% bootstrap interval."""
    t = torch.tensor(xs, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(t), (n_boot, len(t)), generator=g)
    boots = t[idx].mean(1)
    return {"mean": float(t.mean()), "lo": float(boots.quantile(0.025)), "hi": float(boots.quantile(0.975)),
            "n": len(xs)}


def summarise(cfg, runs, corpus, div, saes, cc, desc, probes, along, site) -> dict:
    by_src = {}
    for s, r in zip(corpus["source"], corpus["reward"]):
        by_src.setdefault(s, []).append(r)
    reward = {s: _mean_ci(v, cfg.seed) for s, v in by_src.items()}
    # paired difference policy - base on the same prompts (samples are aligned prompt by prompt)
    diff = [p - b for p, b in zip(by_src["policy"], by_src["base"])]
    reward["policy_minus_base"] = _mean_ci(diff, cfg.seed)
    reward["control_minus_base"] = _mean_ci([c - b for c, b in zip(by_src["control"], by_src["base"])], cfg.seed)
    train = {}
    for pair in PAIRS:
        curve = reward_curve(runs[pair]["run"].path, f"reward/{cfg.text_reward.name}/mean")
        vals = [v for _, v in curve]
        k = max(1, min(10, len(vals) // 4))
        train[pair] = {"metric": f"reward/{cfg.text_reward.name}/mean", "first": sum(vals[:k]) / k,
                       "last": sum(vals[-k:]) / k, "window": k, "steps": len(vals)}
    counts = {p: cc[p]["table"]["counts"] for p in PAIRS}
    passing = {p: cc[p]["table"]["exclusive_passing_scaling"]["other_only"] for p in PAIRS}
    top5 = desc["pairs"]["policy"]["passing"][:5]
    bar = {
        "reward_rises": reward["policy_minus_base"]["lo"] > 0,
        "positive_latent_in_top5": any(r["positive"]["dominated"] for r in top5),
        "n_top5_passing_scaling": len(top5),
        "exclusive_policy": passing["policy"], "exclusive_control": passing["control"],
        "control_at_most_quarter": passing["control"] <= passing["policy"] / 4 if passing["policy"] else None,
        "exclusive_policy_any_scaling": counts["policy"]["other_only"],
        "exclusive_control_any_scaling": counts["control"]["other_only"],
        "max_rel_norm": {p: max((r["rel_norm"] for r in cc[p]["table"]["latents"] if r["class"] != "dead"),
                                default=None) for p in PAIRS},
        "positive_latent_in_top5_by_rel_norm": any(r["positive"]["dominated"]
                                                   for r in desc["pairs"]["policy"].get("nearest", [])[:5]),
    }
    mmcs = {layer: rec["mmcs"] for layer, rec in saes["layers"].items()}
    return {
        "preset": cfg.preset, "question": "What did RL on a sentiment reward change inside the story model, beyond "
        "what training alone (a no-signal control run) changes?",
        "runs": {p: {"run": str(runs[p]["run"].path), "final": str(runs[p]["final"]), "kind": runs[p]["cfg"].kind,
                     "reward": [r.model_dump() for r in runs[p]["cfg"].reward], "train_reward": train[p]} for p in PAIRS},
        "reward": reward, "bar": bar, "site": site,
        "divergence": {"top_layers": div["top_layers"], "top_layers_control": div["top_layers_control"],
                       "rank_by": div["rank_by"], "per_layer": {p: div[p]["layers"] for p in PAIRS}},
        "mmcs": mmcs, "sae_metrics": {layer: {n: s["metrics"] for n, s in rec["saes"].items()}
                                      for layer, rec in saes["layers"].items()},
        "crosscoder": {p: {"counts": counts[p], "exclusive_passing_scaling": cc[p]["table"]["exclusive_passing_scaling"],
                           "metrics": cc[p]["table"]["metrics"], "tokens_per_s": cc[p]["table"].get("tokens_per_s")}
                       for p in PAIRS},
        "exclusive": {p: [_latent_summary(r) for r in desc["pairs"][p]["passing"]] for p in PAIRS},
        "exclusive_failing_scaling": {p: [_latent_summary(r) for r in desc["pairs"][p]["failing"]] for p in PAIRS},
        "highest_rel_norm": {p: [_latent_summary(r) for r in desc["pairs"][p].get("nearest", [])] for p in PAIRS},
        "positive_base_rate": desc["positive_base_rate"],
        "reward_probes": {k: {kk: v[kk] for kk in ("ridge_r2", "logistic_accuracy", "majority_baseline", "n_texts")}
                          for k, v in probes.items()},
        "along": along, "corpus": {"n_texts": len(corpus["texts"]), "n_held_out": sum(corpus["held_out"]),
                                   "sources": {s: len(v) for s, v in by_src.items()}},
    }


def _latent_summary(r: dict) -> dict:
    t = r["table"]
    return {"latent": r["latent"], "class": t["class"], "rel_norm": t["rel_norm"], "freq": t["freq"],
            "cosine": t["cosine"], "nu_error": t.get("nu_error"),
            "nu_recon": t.get("nu_recon"), "scaling_ok": t.get("scaling_ok"),
            "explanation": [x["token"] for x in r["explanation"]["tokens"]], "explanation_score": r["explanation"]["score"],
            "lens_top": [x["token"] for x in r.get("lens", {}).get("top", [])][:5],
            "contexts": [c["context"] for c in r["contexts"][:3]], "reward_high": (r["reward"] or {}).get("high"),
            "reward_low": (r["reward"] or {}).get("low"), "positive_context_share": r["positive"]["context_share"],
            "positive_lens_share": r["positive"]["lens_share"], "positive_dominated": r["positive"]["dominated"],
            **({"llm": r["llm"]} if "llm" in r else {})}
