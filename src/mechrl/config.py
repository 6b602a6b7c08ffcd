"""Typed, validated configuration: YAML recipes, dotted command-line overrides, run names.

A recipe is a YAML file whose top level is one of the run configs below (`kind` picks which).
Every section is a pydantic model with `extra="forbid"`, so a misspelled key is an error, and
`ConfigError` turns pydantic's errors into one line per problem that names the dotted key and the
closest valid keys:

    >>> load_config("recipes/cards-sft.yaml", ["train.lrr=3e-4"])
    ConfigError: unknown key 'train.lrr' (did you mean 'train.lr'?)

Overrides are `dotted.key=value`, the value parsed as YAML (`train.lr=3e-4`, `task.id_families=[a,b]`).
A recipe may carry `presets: {tiny: {dotted.key: value, ...}}`; `preset=tiny` applies one.

The run name is the recipe's name, then a short tag for every value that differs from the recipe
(after its preset), then the seed: `cards-sft_lr3e-4_s7`. Runs are findable by name.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mechrl.errors import UserError

__all__ = [
    "ConfigError", "CardsTaskConfig", "StoriesTaskConfig", "ModelConfig", "TinyModelConfig", "SFTConfig", "EvalConfig",
    "TrackingConfig", "SFTRunConfig", "load_config", "parse_overrides", "run_name", "resolve_recipe",
    "RECIPES_DIR", "config_to_yaml", "RewardSpec", "EnvConfig", "LoraConfig", "GRPOConfig", "PPOConfig",
    "RLRunConfig", "GRPORunConfig", "PPORunConfig", "RUN_KINDS", "RoutingConfig", "DetectorSpec", "SiteMapConfig",
]

RECIPES_DIR = Path(__file__).parent / "recipes"


class ConfigError(UserError, ValueError):
    """A user error in a recipe or an override. The CLI prints it in one line, without traceback."""


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are re-validated, and a
    float field refuses NaN and infinities (`train.lr=.inf` is a typo, not a learning rate)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------

class CardsTaskConfig(Strict):
    """The card scoring game (see `mechrl.tasks.cards`). Data is generated from `data_seed`, which is
    separate from the run seed so that runs with different training seeds see the same examples."""

    name: Literal["cards"] = "cards"
    id_families: list[str] = ["color_sum_diff", "count_above", "parity_count_diff"]
    """Rule families seen in training and in the ID test split."""
    composition_families: list[str] = ["color_count_diff", "sum_above", "parity_sum_diff"]
    """Families that recombine ID rule parts in unseen ways: the `ood_composition` split."""
    id_colors: list[str] = ["RED", "BLUE", "GREEN", "YELLOW"]
    id_rule_colors: list[str] | None = ["RED", "BLUE"]
    """Colours that ID rules name (pairs drawn from these; cards still use every ID colour). A tiny
    model learns to retrieve a rule's colours from its text slowly: with two rule colours the
    colour-sum family is learnable in minutes on a CPU. None: rules name any ID colour."""
    ood_colors: list[str] = ["PURPLE", "ORANGE", "WHITE", "BLACK"]
    """Colours of the `ood_colors` split (cards and rule text); never seen in training."""
    min_cards: int = Field(3, ge=1)
    max_cards: int = Field(6, ge=1)
    ood_min_cards: int = Field(8, ge=1)
    ood_max_cards: int = Field(10, ge=1)
    """Card counts of the `ood_length` split; must lie above `max_cards`."""
    max_value: int = Field(9, ge=1, le=9)
    """Card values are 0..max_value (single digits)."""
    thresholds: list[int] = [3, 4, 5, 6]
    """The k of "cards above k" rules."""
    big_threshold: int = 1
    """BIG iff score >= big_threshold: the label on every example and the `ood_bigsmall` question."""
    answer_format: Literal["worked", "running", "direct"] = "worked"
    """`direct`: the number alone. `worked`: the selected values and partial results, then the number.
    `running`: as worked, with each partial written as a running total (one addition per number)."""
    train_family_weights: dict[str, float] | None = None
    """Relative frequency of each ID family in the train split only (default 1 each); evaluated
    splits stay uniform. Lets a hard family get more of a small training budget."""
    n_train: int = Field(50_000, ge=1)
    n_val: int = Field(500, ge=1)
    n_test: int = Field(1_000, ge=1)
    n_ood: int = Field(1_000, ge=1)
    """Examples in each OOD split."""
    data_seed: int = 1234

    @field_validator("id_families", "composition_families")
    @classmethod
    def _known_families(cls, v: list[str]) -> list[str]:
        from mechrl.tasks.cards.rules import FAMILIES  # local: rules imports nothing from config

        for fam in v:
            if fam not in FAMILIES:
                raise ValueError(f"unknown rule family {fam!r}{_suggest(fam, FAMILIES)}; known: {sorted(FAMILIES)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "CardsTaskConfig":
        if not self.id_families:
            raise ValueError("id_families: at least one rule family is needed")
        overlap = set(self.id_families) & set(self.composition_families)
        if overlap:
            raise ValueError(f"composition_families must not contain ID families: {sorted(overlap)}")
        if len(self.id_colors) < 2 or len(self.ood_colors) < 2:
            raise ValueError("id_colors and ood_colors need at least two colours each")
        if self.id_rule_colors is not None and (len(self.id_rule_colors) < 2
                                                or not set(self.id_rule_colors) <= set(self.id_colors)):
            raise ValueError(f"id_rule_colors must be at least two of id_colors, got {self.id_rule_colors}")
        if set(self.id_colors) & set(self.ood_colors):
            raise ValueError(f"ood_colors overlap id_colors: {sorted(set(self.id_colors) & set(self.ood_colors))}")
        for c in self.id_colors + self.ood_colors:
            if not c.isalpha() or not c.isupper():
                raise ValueError(f"colour names must be upper-case words, got {c!r}")
        if self.train_family_weights is not None:
            unknown = set(self.train_family_weights) - set(self.id_families)
            if unknown:
                raise ValueError(f"train_family_weights names families that are not ID families: {sorted(unknown)}")
            if any(w <= 0 for w in self.train_family_weights.values()):
                raise ValueError(f"train_family_weights must be positive, got {self.train_family_weights}")
        if self.min_cards > self.max_cards:
            raise ValueError(f"min_cards ({self.min_cards}) > max_cards ({self.max_cards})")
        if not (self.max_cards < self.ood_min_cards <= self.ood_max_cards):
            raise ValueError("need max_cards < ood_min_cards <= ood_max_cards so that the length shift "
                             f"is a shift (got {self.max_cards}, {self.ood_min_cards}, {self.ood_max_cards})")
        if not self.thresholds or any(not 0 <= k < self.max_value for k in self.thresholds):
            raise ValueError(f"thresholds must be non-empty and in [0, max_value), got {self.thresholds}")
        return self


class StoriesTaskConfig(Strict):
    """Short stories (see `mechrl.tasks.stories`): prompts are story openings, completions continue
    them. Generated from a small grammar by default; `data_path` reads a local copy of a story
    dataset instead (e.g. SimpleStories, column `story`)."""

    name: Literal["stories"] = "stories"
    n_train: int = Field(20_000, ge=1)
    n_val: int = Field(200, ge=1)
    n_test: int = Field(200, ge=1)
    data_seed: int = 1234
    prompt_words: int | None = None
    """None: the prompt is the story's opening up to its hero ("once upon a time , a little fox");
    k: the first k words. Required with `data_path` (real stories have no marked opening)."""
    max_new_tokens: int = Field(96, ge=1)
    data_path: str | None = None
    """A local folder `datasets.load_from_disk` or `datasets.load_dataset` reads, with a `story`
    column and `train`/`test` splits (val is carved from train). None: the generated grammar."""

    @model_validator(mode="after")
    def _check(self) -> "StoriesTaskConfig":
        if self.data_path is not None and self.prompt_words is None:
            raise ValueError("stories: data_path needs prompt_words (how many opening words form the prompt)")
        if self.prompt_words is not None and self.prompt_words < 1:
            raise ValueError(f"stories: prompt_words must be >= 1, got {self.prompt_words}")
        return self


TaskConfig = Annotated[Union[CardsTaskConfig, StoriesTaskConfig], Field(discriminator="name")]


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

class TinyModelConfig(Strict):
    """A small model built locally (no download) when `model.path` is unset."""

    arch: Literal["gpt2", "llama"] = "gpt2"
    n_layer: int = Field(2, ge=1)
    d_model: int = Field(128, ge=8)
    n_head: int = Field(4, ge=1)
    d_mlp: int | None = None
    """MLP width; default 4 * d_model."""
    n_positions: int = Field(256, ge=16)
    tie_embeddings: bool = True

    @model_validator(mode="after")
    def _check(self) -> "TinyModelConfig":
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        return self


_MODULE_PATH = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*"


class SiteMapConfig(Strict):
    """Where mechrl's alias sites (`resid_pre.{L}`, `attn_out.{L}`, `heads.{L}`, ...) live in an
    architecture mechrl has no built-in entry for (`mechrl.analysis.arch` has the built-in ones, in
    this same form). `blocks` is a path from the model's root; every other path is relative to one
    block (`model.layers.3` + `self_attn.o_proj`). Checked against the model when applied: a path
    that does not exist is an error naming the block's modules.

        model.site_map: {blocks: transformer.layers, attn_out: attn, mlp_out: ffn,
                         attn_proj: attn.out_proj, mlp_proj: ffn.w2}
    """

    blocks: str = Field(pattern=f"^{_MODULE_PATH}$")
    """The ModuleList of transformer blocks, from the model's root (`model.layers`); a block's input is
    `resid_pre.{L}`, its output `resid_post.{L}`."""
    attn_out: str = Field(pattern=f"^{_MODULE_PATH}$")
    """The module whose output attention ADDS to the residual stream (after any post-attention norm or
    dropout): `attn_out.{L}`."""
    mlp_out: str = Field(pattern=f"^{_MODULE_PATH}$")
    """The module whose output the MLP adds to the residual stream: `mlp_out.{L}`."""
    attn_proj: str = Field(pattern=f"^{_MODULE_PATH}$")
    """Attention's output projection (a linear layer); its input, split per head, is `heads.{L}`."""
    mlp_proj: str = Field(pattern=f"^{_MODULE_PATH}$")
    """The MLP's output projection (a linear layer); its input is `mlp_post.{L}` (the neurons)."""
    attn_after: tuple[str, ...] = ()
    """Modules applied, in order, between `attn_proj`'s output and `attn_out` outside the projection
    (post-attention norms, residual dropouts); empty when `attn_proj`'s output is what is added."""
    mlp_after: tuple[str, ...] = ()
    """The same for the MLP: modules between `mlp_proj`'s output and `mlp_out`."""
    parallel: bool | str = False
    """True when attention and MLP both read the block's input (GPT-J style): the MLP does not see
    `attn_out`. A string names a boolean attribute of the model config that says so."""

    @field_validator("attn_after", "mlp_after")
    @classmethod
    def _paths(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [p for p in v if not re.fullmatch(_MODULE_PATH, p)]
        if bad:
            raise ValueError(f"not module paths: {bad}")
        return v


class ModelConfig(Strict):
    path: str | None = None
    """A local folder or a hub name (downloaded only because the user named it). None: build `tiny`."""
    tiny: TinyModelConfig = TinyModelConfig()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    trust_remote_code: bool = False
    """Off by default: remote code runs only when the user turns this on."""
    allow_hub: bool = False
    """Download `path` from the Hugging Face hub when it is not a local folder. Off by default: a name
    that is not a local folder is an error at once (nothing is fetched unless asked for)."""
    builtin: Literal["stories", "stories-fast"] | None = None
    """A model mechrl builds itself (no download): `stories` is the pretrained tiny story Llama
    (`mechrl.tasks.stories.story_base_model`, built once, a few minutes on CPU, and cached);
    `stories-fast` the same shape pretrained for seconds (for smoke runs and tests). Excludes `path`."""
    site_map: SiteMapConfig | None = None
    """Where the analysis sites live, for an architecture mechrl does not know (or to override a
    built-in entry). Stored in the model's config (`mechrl_site_map`), so checkpoints carry it."""

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if self.builtin is not None and self.path is not None:
            raise ValueError(f"model: set path or builtin, not both (path={self.path!r}, builtin={self.builtin!r})")
        return self


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------

def _check_compute_marks(v: list[float]) -> list[float]:
    if any(x <= 0 for x in v):
        raise ValueError(f"checkpoint_at_compute: every mark must be > 0 token-passes, got {v}")
    return sorted(v)


class SFTConfig(Strict):
    """Supervised fine-tuning with TRL's SFTTrainer; loss on completion (answer) tokens only."""

    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(2000, ge=1)
    warmup_steps: int = Field(100, ge=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine decays to lr * min_lr_ratio."""
    weight_decay: float = Field(0.01, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.98, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    log_every: int = Field(50, ge=1)
    eval_every: int = Field(500, ge=1)
    """Checkpoint and evaluate every split every this many steps (and at the end)."""
    checkpoint_at_compute: list[float] = []
    """Also checkpoint and evaluate at the first step whose running `compute/token_passes` (3 x the
    non-padding tokens trained on; `mechrl.train.compute`) reaches each of these: the budgets of a
    matched-compute comparison."""

    @field_validator("checkpoint_at_compute")
    @classmethod
    def _positive_marks(cls, v: list[float]) -> list[float]:
        return _check_compute_marks(v)


class EvalConfig(Strict):
    n_per_split: int = Field(300, ge=1)
    """Examples per split at intermediate checkpoints."""
    n_final: int = Field(1000, ge=1)
    """Examples per split at the final checkpoint (capped by the split's size)."""
    batch_size: int = Field(256, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)
    """None: the task's own bound for its longest answer."""
    n_samples: int = Field(8, ge=0)
    """Completions per split written to samples.jsonl at each evaluation."""


class TrackingConfig(Strict):
    """Optional metric sinks; none touches the network unless the user asks (`wandb_mode: online`)."""

    sinks: list[Literal["wandb", "trackio", "tensorboard"]] = []
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "mechrl"


class RunConfig(Strict):
    """Fields common to every run."""

    kind: str
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = 0
    out_dir: str = "runs"
    task: TaskConfig = CardsTaskConfig()
    model: ModelConfig = ModelConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    presets: dict[str, dict[str, Any]] = {}
    """Named sets of dotted overrides (`preset=tiny`); kept in the recipe for reference."""
    preset: str | None = None


class SFTRunConfig(RunConfig):
    kind: Literal["sft"] = "sft"
    train: SFTConfig = SFTConfig()


# ----------------------------------------------------------------------------------------------
# RL: rewards, environments, adapters, GRPO, PPO
# ----------------------------------------------------------------------------------------------

class RewardSpec(Strict):
    """One reward component: a registered reward function, its parameters and its weight.
    The total reward is the weighted sum of the components; each is logged as `reward/<name>`."""

    name: str
    weight: float = 1.0
    params: dict[str, Any] = {}


class EnvConfig(Strict):
    """Where RL prompts come from. For cards: ID rules, mixed with a fraction of OOD-shifted ones.
    RL prompts are drawn fresh (seeded by `seed`) and never equal a prompt of an evaluated split."""

    ood_fraction: float = Field(0.0, ge=0, le=1)
    """Fraction of RL prompts drawn from the `ood_splits` distributions (the rest are ID)."""
    ood_splits: list[str] = []
    """Which shifts the OOD fraction is drawn from (e.g. [ood_composition]); required when ood_fraction > 0."""
    seed: int | None = None
    """Seed of the prompt stream; None: the run's seed (so runs with different seeds see different prompts)."""

    @model_validator(mode="after")
    def _check(self) -> "EnvConfig":
        if self.ood_fraction > 0 and not self.ood_splits:
            raise ValueError("ood_fraction > 0 needs ood_splits (e.g. [ood_composition])")
        return self


class LoraConfig(Strict):
    """PEFT LoRA on the policy (the reference model is then the base with adapters disabled)."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None
    """None: PEFT's per-architecture default (GPT-2 `c_attn`; Llama, Mistral, Qwen, Gemma `q_proj`,
    `v_proj`; see `mechrl.models.adapters.default_targets`). Entries match module paths as in PEFT:
    the path itself or a dotted suffix (`attn.c_proj` is GPT-2's attention output projection only)."""


class EarlyStopConfig(Strict):
    """Stop a run when the moving average of a logged metric crosses a threshold: the run then
    evaluates, checkpoints and finishes at that step (its final checkpoint). The metric must be
    logged at every step (e.g. `detector/flag_rate` of `mitigation`, or `reward/<component>/mean`)."""

    metric: str
    above: float | None = None
    """Stop when the moving average exceeds this."""
    below: float | None = None
    """Stop when the moving average falls under this."""
    window: int = Field(1, ge=1)
    """Steps in the moving average (the first check waits until it is full)."""
    min_steps: int = Field(0, ge=0)
    """Never stop before this step."""

    @model_validator(mode="after")
    def _one_threshold(self) -> "EarlyStopConfig":
        if (self.above is None) == (self.below is None):
            raise ValueError("early_stop: give exactly one of `above` and `below`")
        return self


class RLCommon(Strict):
    """Fields every RL loop shares."""

    lr: float = Field(1e-5, gt=0)
    max_steps: int = Field(100, ge=1)
    """Optimisation steps, each on one freshly sampled batch (times `num_iterations` / epochs)."""
    prompts_per_step: int = Field(16, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    micro_batch_size: int | None = Field(None, ge=1)
    """Sequences per forward/backward; gradients accumulate over the step. None: chosen by mechrl, the
    whole batch on an accelerator, and on CPU whole groups whose logits fit in 32 MiB
    (`rlcommon.update_micro_batch`; logged once)."""
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    lora: LoraConfig | None = None
    log_every: int = Field(1, ge=1)
    save_every: int = Field(50, ge=1)
    """Checkpoint (weights + optimizer/scheduler/RNG state) every this many steps and at the end."""
    eval_every: int = Field(50, ge=1)
    """Evaluate every split every this many steps (at checkpoints) and at the end."""
    sample_every: int = Field(10, ge=1)
    """Write this step's first completions to samples.jsonl every this many steps."""
    n_samples: int = Field(4, ge=0)
    early_stop: EarlyStopConfig | None = None
    """Stop before `max_steps` when a logged metric crosses a threshold (None: never)."""
    decode: Literal["auto", "eager", "static", "graph"] = "auto"
    """How rollouts run their decode steps (`mechrl.train.decode_graph`): `auto` runs the host loop (on
    CUDA too, until the captured step passes its GPU checks: `decode_graph.AUTO_ON_CUDA`); `eager` the
    host loop everywhere; `static` the fixed-shape step without
    capture; `graph` the captured step or an error. Every mode samples the same tokens."""
    adamw: Literal["auto", "for-loop", "foreach", "fused"] = "auto"
    """AdamW's implementation (`torch.optim.AdamW`'s `foreach` / `fused`): `auto` is fused on CUDA and
    PyTorch's default elsewhere (a loop over the parameters on CPU). All give the same update up to
    float rounding (a test holds them to 1e-6)."""
    checkpoint_at_compute: list[float] = []
    """Also checkpoint and evaluate at the first step whose running `compute/token_passes`
    (`mechrl.train.compute`: sampling, no-grad passes and updates) reaches each of these: the
    budgets of a matched-compute comparison."""
    max_token_passes: float | None = Field(None, gt=0)
    """Stop at the first step whose running `compute/token_passes` reaches this (the run's final
    checkpoint is there, evaluated); None: run `max_steps` steps."""

    @field_validator("checkpoint_at_compute")
    @classmethod
    def _positive_marks(cls, v: list[float]) -> list[float]:
        return _check_compute_marks(v)

    @model_validator(mode="after")
    def _marks_reachable(self) -> "RLCommon":
        late = [m for m in self.checkpoint_at_compute if self.max_token_passes is not None and m > self.max_token_passes]
        if late:
            raise ValueError(f"checkpoint_at_compute {late} lie past max_token_passes={self.max_token_passes:g}: "
                             "the run stops before reaching them")
        return self


class GRPOConfig(RLCommon):
    """Group-relative policy optimisation (see `mechrl.train.grpo`)."""

    num_generations: int = Field(8, ge=2)
    """Completions per prompt (the group). Advantages are relative within a group."""
    num_iterations: int = Field(1, ge=1)
    """Optimisation passes over each generation batch (the clipped ratio uses the kept old log-probs)."""
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "grpo"
    beta: float = Field(0.0, ge=0)
    """Weight of the KL to the reference model (k3 estimator, per token)."""
    kl_bias_correction: bool = True
    """Weight the per-token KL by the importance ratio (TRL's default `use_bias_correction_kl`)."""
    epsilon_low: float = Field(0.2, ge=0)
    epsilon_high: float | None = Field(None, ge=0)
    """Upper clip; None: epsilon_low."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Precision of the forward passes (sampling and update). `bf16`: autocast to bfloat16 on CUDA, with
    fp32 master weights, optimiser state and log-prob reductions; refused on CPU, where bf16 autocast is
    slower than fp32. Needs `model.dtype: float32`."""
    compile_logprobs: bool = False
    """`torch.compile` the update's per-token log-prob head (log-softmax over the vocabulary and the
    gather of the taken token, forward and backward) into fused kernels. It compiles once per
    vocabulary, temperature and dtype (the row count is a dynamic dimension); the compile time is
    reported apart (`mechrl.train.fast_update.compile_stats`). Off until measured faster."""


class PPOConfig(RLCommon):
    """PPO with a value head and a per-token KL penalty to the reference (see `mechrl.train.ppo`)."""

    ppo_epochs: int = Field(4, ge=1)
    num_minibatches: int = Field(1, ge=1)
    clip_range: float = Field(0.2, gt=0)
    clip_range_value: float | None = Field(0.2, gt=0)
    """None: the value loss is not clipped."""
    vf_coef: float = Field(0.5, ge=0)
    ent_coef: float = Field(0.0, ge=0)
    kl_coef: float = Field(0.05, ge=0)
    """Per-token KL penalty to the reference, folded into the rewards before GAE."""
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = True


class RLRunConfig(RunConfig):
    """Fields common to RL runs: the rewards and the prompt environment."""

    reward: list[RewardSpec] = [RewardSpec(name="cards_correct")]
    env: EnvConfig = EnvConfig()

    @field_validator("reward", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        # `reward: {name: x, params: {...}}` is one component; a list is a weighted sum
        return [v] if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _check_rewards(self) -> "RLRunConfig":
        if not self.reward:
            raise ValueError("reward: at least one reward component is needed")
        names = [r.name for r in self.reward]
        if len(set(names)) != len(names):
            raise ValueError(f"reward: a component is listed twice: {names}")
        return self


class DetectorSpec(Strict):
    """A registered reward-hacking detector (`mechrl.rewards.detectors`), its parameters and how its
    labels are degraded. The schema only: whether `name` is registered and takes `params` is checked
    when the detector is built (and before a run starts, by `mechrl.runs.preflight`)."""

    name: str
    params: dict[str, Any] = {}
    coverage: float = Field(1.0, ge=0, le=1)
    """P(a flagged sample is reported flagged), before noise. 1: every flagged sample is reported."""
    label_noise: float = Field(0.0, ge=0, le=1)
    """P(any label is flipped), applied after coverage."""
    seed: int | None = None
    """Seed of the coverage and noise draws; None: the run's seed (so a seed sweep draws fresh labels)."""
    full_coverage_steps: int = Field(0, ge=0)
    """Frontloaded labels: during the first this many steps every detected sample is reported (coverage
    1, no noise), then `coverage` and `label_noise` apply (the coverage and noise draws are made
    throughout, so the labels after the frontloaded steps are those of a run without them)."""


class RoutingConfig(Strict):
    """Gradient routing in GRPO (see `mechrl.train.routing`): the policy gets a retain and a forget
    LoRA adapter; samples the detector flags update only the forget adapter ("classic"), and in
    "exclusive" mode unflagged samples update only the retain adapter."""

    enabled: bool = False
    mode: Literal["classic", "exclusive"] = "classic"
    retain_rank: int = Field(4, ge=1)
    retain_alpha: float = Field(8.0, gt=0)
    forget_rank: int = Field(4, ge=1)
    forget_alpha: float = Field(8.0, gt=0)
    target_modules: list[str] | None = None
    """None: the architecture's default LoRA targets (as for `train.lora.target_modules`)."""
    detector: DetectorSpec | None = None
    """The detector whose flags route samples: {name, params, coverage, label_noise, seed}."""
    unflagged_baseline: bool = False
    """Advantages of unflagged samples relative to the unflagged samples of their group only (flagged
    samples keep the whole group's). With the whole group's baseline, the unflagged samples of a
    group with rewarded hacks get negative advantages, which pushes the adapters they update away
    from them, and so towards the hack."""
    eval_every: int = Field(50, ge=1)
    """Routing evaluation (both / retain-only / forget-only) every this many steps and at the end."""
    eval_rewards: list[RewardSpec] = []
    """Reward components reported separately by the routing evaluation (names or {name, params});
    empty: the run's reward components."""
    eval_n: int = Field(32, ge=2)
    """Completions sampled per adapter mode in the routing evaluation."""
    eval_seed: int = 0
    """Seed of the evaluation's own sampling generator (it never touches the training streams)."""
    start_step: int = Field(1, ge=1)
    """Routing applies from this step on. Before it (a warm-up) the detector still labels and logs,
    but every sample updates both adapters as in unrouted training (no masks, the group baseline)."""
    good_label_fraction: float = Field(0.0, ge=0, le=1)
    """Known-good labels: this share of the samples the detector itself calls clean (before coverage
    and noise) is reported as verified good, drawn each step from a generator seeded by the run's
    seed and the step. Their update runs with the forget adapter switched off and reaches only the
    retain adapter (the routing authors' "dispersed labelled-good" training). 0: none."""
    ablate_forget_from: int | None = Field(None, ge=1)
    """From this step on the forget adapter is switched off (scale 0) for sampling and updates: the
    retain adapter trains alone, as it will be deployed, and flagged samples, which could update only
    the forget adapter, are dropped from the loss (and from their group's advantage statistics).
    None: never."""

    @field_validator("eval_rewards", mode="before")
    @classmethod
    def _names(cls, v):
        return [{"name": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _phases(self) -> "RoutingConfig":
        if self.ablate_forget_from is not None and self.ablate_forget_from <= self.start_step:
            raise ValueError(f"routing.ablate_forget_from ({self.ablate_forget_from}) must come after "
                             f"routing.start_step ({self.start_step})")
        return self



class MitigationConfig(Strict):
    """Reward-hacking baselines on one policy, using a detector as gradient routing does (see
    `mechrl.train.mitigation`): "filter" drops the flagged samples (from the loss and from their
    group's advantage statistics); "penalty" subtracts `penalty` from a flagged sample's reward.
    "none" with a detector only labels and logs (`detector/flag_rate`, e.g. for early stopping)."""

    method: Literal["none", "filter", "penalty"] = "none"
    detector: DetectorSpec | None = None
    """The detector whose flags the baseline acts on: {name, params, coverage, label_noise, seed}."""
    penalty: float = Field(1.0, gt=0)
    """Subtracted from the total reward of each flagged sample ("penalty")."""


class GRPORunConfig(RLRunConfig):
    kind: Literal["grpo"] = "grpo"
    train: GRPOConfig = GRPOConfig()
    routing: RoutingConfig = RoutingConfig()
    mitigation: MitigationConfig = MitigationConfig()

    @model_validator(mode="after")
    def _check_routing(self) -> "GRPORunConfig":
        r, m = self.routing, self.mitigation
        if m.method != "none" and m.detector is None:
            raise ValueError(f"mitigation.method={m.method} needs mitigation.detector (e.g. {{name: contains_happy}})")
        if r.enabled and m.detector is not None:
            raise ValueError("routing.enabled and mitigation.detector are exclusive: routing runs its own "
                             "detector (routing.detector); use one or the other")
        if r.enabled and r.detector is None:
            raise ValueError("routing.enabled needs routing.detector (e.g. {name: contains_happy}): "
                             "routing sends the samples it flags to the forget adapter")
        if r.enabled and self.train.lora is not None:
            raise ValueError("routing trains its own dual LoRA (routing.retain_rank / forget_rank); "
                             "remove train.lora (PEFT LoRA and full fine-tuning cannot be routed)")
        if self.train.dtype == "bf16" and self.model.dtype != "float32":
            raise ValueError(f"train.dtype=bf16 autocasts a float32 model (fp32 master weights); model.dtype is "
                             f"{self.model.dtype}: set model.dtype=float32")
        return self


class PPORunConfig(RLRunConfig):
    kind: Literal["ppo"] = "ppo"
    train: PPOConfig = PPOConfig()


RUN_KINDS: dict[str, type[RunConfig]] = {"sft": SFTRunConfig, "grpo": GRPORunConfig, "ppo": PPORunConfig}


# ----------------------------------------------------------------------------------------------
# Loading, overrides, errors
# ----------------------------------------------------------------------------------------------


# The loading half lives in its own module; importing it here (after the schema is defined) keeps
# `from mechrl.config import load_config` working.
from mechrl.config_loading import (MAX_NAME, build_config, build_task_config, config_to_yaml,  # noqa: E402, F401
                                   load_config, parse_overrides, resolve_recipe, run_name)
