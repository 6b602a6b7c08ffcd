"""The rlhf-diffing study's configuration: `recipes/rlhf-diffing.yaml` (kind `study`), validated like run recipes
(unknown keys are errors naming the close matches), with presets and dotted overrides.

    cfg = load_study_config("rlhf-diffing", preset="tiny", overrides=["crosscoder.steps=500"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from mechrl.config import ConfigError, RewardSpec, Strict, _suggest
from mechrl.config_loading import format_errors, read_yaml, set_dotted, parse_overrides, resolve_recipe


class CorpusConfig(Strict):
    """The texts every analysis reads, the same for every model: stories of the task's train split and completions
    sampled from each model (base, policy, control) on the task's test prompts."""

    n_stories: int = Field(1000, ge=0)
    n_samples: int = Field(300, ge=1)
    """completions sampled per model"""
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(1.0, gt=0)
    held_out_fraction: float = Field(0.2, gt=0, lt=1)
    """texts held out from SAE / crosscoder training: metrics, explanation scores, exclusivity tables"""
    seed: int = 0


class DivergenceConfig(Strict):
    top_k: int = Field(2, ge=1)
    """layers whose MLP outputs get paired SAEs"""
    rank_by: str = "param_block_rel"
    """measure that ranks layers (mechrl.analysis.divergence.RANK_BY); the published method: relative weight change"""


class SAEConfig(Strict):
    """Paired SAEs (SAELens TopK) on the MLP outputs of the top divergent layers."""

    expansion: int = Field(8, ge=1)
    k: int = Field(8, ge=1)
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(512, ge=1)
    lr: float = Field(1e-3, gt=0)
    threshold: float = Field(0.7, gt=0, le=1)
    """max cosine under which a feature counts as unmatched"""
    seed_control: bool = True
    """a second base SAE (seed + 1): the MMCS two SAEs of one model reach"""


class CrosscoderConfig(Strict):
    site: str = "auto"
    """hook site of both models; "auto": resid_post of the policy pair's most divergent layer"""
    expansion: int = Field(8, ge=1)
    k: int = Field(8, ge=1)
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(1024, ge=1)
    lr: float = Field(1e-3, gt=0)
    shared_init: bool = True
    """every latent starts with the same decoder direction in both models"""
    base_only_max: float = 0.1
    other_only_min: float = 0.9
    shared_min: float = 0.4
    shared_max: float = 0.6
    max_nu_error: float = 0.2
    max_nu_recon: float = 0.5


class CrosscoderVariant(Strict):
    """A sensitivity check: the crosscoders of both pairs retrained with some settings changed (unset: as
    `crosscoder`), reported next to the main ones; the main crosscoders alone make the headline."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    site: str | None = None
    steps: int | None = Field(None, ge=1)
    expansion: int | None = Field(None, ge=1)
    k: int | None = Field(None, ge=1)
    shared_init: bool | None = None


class DescribeConfig(Strict):
    n_top: int = Field(5, ge=1)
    """exclusive latents described per pair (the bar looks at the top 5)"""
    n_contexts: int = Field(6, ge=1)
    n_lens: int = Field(10, ge=1)
    n_tokens: int = Field(5, ge=1)
    n_top_rows: int = Field(20, ge=1)
    """top-activating token rows whose words are checked for positive sentiment"""
    llm: bool = True
    """describe with the LLM endpoint of MECHRL_LLM_URL when it is set (nothing happens when it is not)"""


class AlongConfig(Strict):
    """Divergence, MMCS and crosscoder exclusivity between the base and each saved checkpoint of the policy run."""

    enabled: bool = True
    sae_steps: int = Field(600, ge=1)
    crosscoder_steps: int = Field(1000, ge=1)


class DiffingStudyConfig(Strict):
    kind: Literal["study"] = "study"
    name: str = "rlhf-diffing"
    seed: int = 0
    rl_recipe: str = "sentiment-grpo"
    """the policy's run recipe (kind grpo or ppo), e.g. sentiment-ppo"""
    rl_preset: str | None = None
    rl_overrides: dict[str, Any] = {}
    """dotted overrides of the RL recipe, e.g. {train.max_steps: 200}"""
    control_reward: list[RewardSpec] = [RewardSpec(name="no_signal", params={"mode": "random"}),
                                        RewardSpec(name="vader", weight=0.0)]
    """the control run's reward: the policy recipe with this reward instead"""
    text_reward: RewardSpec = RewardSpec(name="vader")
    """scores the corpus texts (reward firing, reward probes): the policy's reward"""
    threads: int | None = Field(None, ge=1)
    """torch CPU threads while the study runs (restored after); None: torch's default"""
    corpus: CorpusConfig = CorpusConfig()
    divergence: DivergenceConfig = DivergenceConfig()
    sae: SAEConfig = SAEConfig()
    crosscoder: CrosscoderConfig = CrosscoderConfig()
    crosscoder_variants: list[CrosscoderVariant] = []
    """sensitivity checks: both pairs' crosscoders again with some settings changed"""
    describe: DescribeConfig = DescribeConfig()
    along: AlongConfig = AlongConfig()
    presets: dict[str, dict[str, Any]] = {}
    preset: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "DiffingStudyConfig":
        from mechrl.analysis.divergence import RANK_BY

        names = [v.name for v in self.crosscoder_variants]
        if len(set(names)) != len(names):
            raise ValueError(f"crosscoder_variants: a name is used twice: {names}")
        if self.divergence.rank_by not in RANK_BY:
            raise ValueError(f"divergence.rank_by: unknown measure {self.divergence.rank_by!r}"
                             f"{_suggest(self.divergence.rank_by, RANK_BY)}; choose from {', '.join(RANK_BY)}")
        return self


def load_study_config(recipe: str | Path = "rlhf-diffing", *, preset: str | None = None,
                      overrides: list[str] | dict | None = None) -> DiffingStudyConfig:
    """The study recipe with a preset and dotted overrides applied, validated."""
    path = resolve_recipe(recipe)
    data = read_yaml(path)
    if data.get("kind") != "study":
        raise ConfigError(f"{path}: kind {data.get('kind')!r}; a study recipe has kind: study")
    if preset is not None:
        presets = data.get("presets") or {}
        if preset not in presets:
            raise ConfigError(f"{path}: unknown preset {preset!r}{_suggest(preset, presets)}; "
                              f"presets: {', '.join(presets) or 'none'}")
        for key, value in (presets[preset] or {}).items():
            set_dotted(data, key, value)
        data["preset"] = preset
    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    for key, value in ov.items():
        set_dotted(data, key, value)
    try:
        return DiffingStudyConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, DiffingStudyConfig, str(path))) from None
