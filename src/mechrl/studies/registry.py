"""The studies `mechrl study <name>` runs: one name, one function, one output folder each.

A study function takes the output folder and the run options and returns its summary:

    fn(out: Path, *, preset: str, seeds: int, force: bool) -> dict

`seeds` is the user's `--seeds`, or the preset's default (`default_seeds`, else 1) when not given.

It writes `<out>/summary.json` (the returned dict) and `<out>/report.html`, resumes whatever is
unfinished when called again with the same arguments (`force` starts over), and raises `UserError`
for a preset it does not have. Studies are registered here by module path, imported only when run,
so `mechrl --help` stays fast and a study's dependencies load only for that study.

    mechrl study sft-vs-rl --preset smoke --out runs/svr
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mechrl.errors import UserError


@dataclass(frozen=True)
class StudySpec:
    """A registered study: where its function lives, its presets (the first is the default) and a line
    of description for `mechrl study --help`."""

    name: str
    target: str  # "module:function"
    presets: tuple[str, ...]
    description: str
    default_seeds: tuple[tuple[str, int], ...] = ()  # (preset, seeds) where a preset wants more than 1

    def load(self) -> Callable[..., dict]:
        module, fn = self.target.split(":")
        return getattr(importlib.import_module(module), fn)


STUDIES: dict[str, StudySpec] = {}


def register_study(name: str, target: str, presets: tuple[str, ...], description: str,
                   default_seeds: dict[str, int] | None = None) -> None:
    if name in STUDIES:
        raise ValueError(f"study {name!r} is already registered ({STUDIES[name].target})")
    if not presets:
        raise ValueError(f"study {name!r}: at least one preset is needed")
    unknown = set(default_seeds or {}) - set(presets)
    if unknown:
        raise ValueError(f"study {name!r}: default_seeds names presets it does not have: {sorted(unknown)}")
    STUDIES[name] = StudySpec(name, target, tuple(presets), description, tuple((default_seeds or {}).items()))


register_study("sft-vs-rl", "mechrl.studies.sft_vs_rl:run_study", ("tiny", "smoke", "full"),
               "tiny: SFT then GRPO (the demo); smoke/full: from one SFT checkpoint, more SFT vs GRPO vs GRPO "
               "seeing OOD at matched compute; probes, patching, ablation, SAEs", default_seeds={"full": 3})
register_study("reward-hacking-routing", "mechrl.studies.reward_hacking_routing:run_study",
               ("tiny", "smoke", "coverage", "coverage-smoke"),
               "GRPO with a hackable story reward: gradient routing vs filter, penalty, early stop, plain LoRA; "
               "coverage: hack vs detector coverage per method, and routing variants (absorption) at coverage 0.5",
               default_seeds={"coverage": 3})
register_study("rlhf-diffing", "mechrl.studies.rlhf_diffing:run_study", ("tiny", "smoke"),
               "GRPO on VADER sentiment + a no-signal control; divergence, paired SAEs, crosscoders, descriptions")
register_study("feature-control", "mechrl.studies.feature_control:run_study", ("tiny", "smoke"),
               "a SARM reward model with a labeller bias; RL penalising its bias features vs the true behaviour")


def get_study(name: str) -> StudySpec:
    if name not in STUDIES:
        import difflib

        close = difflib.get_close_matches(name, list(STUDIES), n=3, cutoff=0.5)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise UserError(f"unknown study {name!r}{hint}; studies: {', '.join(STUDIES)}")
    return STUDIES[name]


def run_study(name: str, out: str | Path | None = None, *, preset: str | None = None, seeds: int | None = None,
              force: bool = False) -> dict:
    """Run study `name` (see the module docstring); `out` defaults to `runs/study-<name>-<preset>`,
    `seeds` to the preset's default."""
    spec = get_study(name)
    preset = preset or spec.presets[0]
    if preset not in spec.presets:
        raise UserError(f"study {name}: unknown preset {preset!r}; presets: {', '.join(spec.presets)}")
    if seeds is None:
        seeds = dict(spec.default_seeds).get(preset, 1)
    if seeds < 1:
        raise UserError(f"study {name}: --seeds must be >= 1, got {seeds}")
    out = Path(out) if out is not None else Path("runs") / f"study-{name}-{preset}"
    return spec.load()(out, preset=preset, seeds=seeds, force=force)
