"""Loading configs: recipes, presets, dotted overrides, readable validation errors, run names.

The schema (every config class) is `mechrl.config`; this module turns YAML and command-line
overrides into those objects. Everything here is re-exported by `mechrl.config`, so callers import
`load_config`, `parse_overrides`, `run_name`, ... from there.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mechrl.config import RECIPES_DIR, RUN_KINDS, ConfigError, RunConfig, Strict, TaskConfig, _suggest

def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str] | None:
    """The valid field names of the model found by walking `loc` from `cls` (None when not a model)."""
    for part in loc:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        ann = cls.model_fields[part].annotation
        args = getattr(ann, "__args__", ()) or ()
        models = [a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        cls = models[0] if models else None
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return None


#: Sections that are tagged unions: pydantic puts the tag into error locations ("task.cards.x").
_UNION_SECTIONS = {"task"}


def _strip_union_tags(loc: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p for i, p in enumerate(loc) if not (i > 0 and loc[i - 1] in _UNION_SECTIONS and i == 1))


def format_errors(err: ValidationError, cls: type[BaseModel], source: str) -> str:
    lines = []
    for e in err.errors():
        loc = _strip_union_tags(tuple(str(p) for p in e["loc"]))
        key = ".".join(loc) or "<top level>"
        if e["type"] == "extra_forbidden":
            parent = loc[:-1]
            valid = _fields_at(cls, parent) or []
            full = [".".join((*parent, v)) for v in valid]
            close = difflib.get_close_matches(key, full, n=3, cutoff=0.5)
            hint = (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close
                    else f"; valid keys here: {', '.join(valid)}")
            lines.append(f"unknown key '{key}'{hint}")
        elif e["type"] == "union_tag_invalid":
            lines.append(f"{key}: {e['msg']}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg}{got_s}" if e["type"] != "value_error" else f"{key}: {msg}")
    return f"{source}: " + "; ".join(lines)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["train.lr=3e-4", "seed=7"]` -> `{"train.lr": 0.0003, "seed": 7}` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        out[key] = _parse_value(raw)
    return out


def _parse_value(raw: str) -> Any:
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse override value {raw!r}: {e}") from None
    # YAML 1.1 reads "3e-4" as a string; numbers in scientific notation are meant as floats.
    if isinstance(value, str):
        try:
            f = float(value)
            if math.isfinite(f) and any(ch.isdigit() for ch in value):
                return f
        except ValueError:
            pass
    return value


def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key!r}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _get_dotted(tree: dict, key: str) -> Any:
    node: Any = tree
    for p in key.split("."):
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def resolve_recipe(recipe: str | Path) -> Path:
    """A recipe path, or the bare name of a built-in recipe (`cards-sft`)."""
    p = Path(recipe)
    if p.is_file():
        return p
    builtin = RECIPES_DIR / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
    if builtin.is_file() and (p.parent == Path(".") or p.parent.name == "recipes"):
        return builtin
    names = sorted(q.stem for q in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"recipe not found: {recipe}{_suggest(p.stem, names)}; built-in recipes: {', '.join(names)}")


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def build_config(data: dict, overrides: dict[str, Any] | None = None, *, source: str = "config",
                 kind: str | None = None) -> tuple[RunConfig, RunConfig]:
    """Validate `data` + preset + `overrides`. Returns (config, recipe_default) where the default is
    the recipe with its preset but without the overrides (used for the run name)."""
    overrides = dict(overrides or {})
    data = _deepcopy(data)
    preset = overrides.pop("preset", data.get("preset"))
    if kind is not None:
        if data.get("kind", kind) != kind:
            raise ConfigError(f"{source}: this recipe is kind {data.get('kind')!r}, not {kind!r}")
        data["kind"] = kind
    k = data.get("kind")
    if k not in RUN_KINDS:
        raise ConfigError(f"{source}: 'kind' must be one of {sorted(RUN_KINDS)}, got {k!r}")
    cls = RUN_KINDS[k]
    if preset is not None:
        presets = data.get("presets") or {}
        if preset not in presets:
            raise ConfigError(f"{source}: unknown preset {preset!r}{_suggest(str(preset), presets)}; "
                              f"presets: {', '.join(presets) or 'none'}")
        for key, value in presets[preset].items():
            set_dotted(data, key, value)
        data["preset"] = preset
    base = _deepcopy(data)
    for key, value in overrides.items():
        set_dotted(data, key, value)
    try:
        cfg = cls.model_validate(data)
        default = cls.model_validate(base)
    except ValidationError as e:
        raise ConfigError(format_errors(e, cls, source)) from None
    return cfg, default


def load_config(recipe: str | Path, overrides: list[str] | dict | None = None, *,
                kind: str | None = None) -> tuple[RunConfig, str]:
    """Load a recipe with overrides. Returns (config, run name)."""
    path = resolve_recipe(recipe)
    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    cfg, default = build_config(read_yaml(path), ov, source=str(path), kind=kind)
    return cfg, run_name(cfg, default)


def _deepcopy(x):
    return yaml.safe_load(yaml.safe_dump(x)) if x is not None else x


# ----------------------------------------------------------------------------------------------
# Run names
# ----------------------------------------------------------------------------------------------

#: Short tags for common keys; any other key is tagged by its last component.
TAGS = {
    "train.lr": "lr", "train.batch_size": "bs", "train.max_steps": "steps", "train.beta": "beta",
    "train.num_generations": "G", "train.loss_type": "", "model.tiny.n_layer": "L",
    "model.tiny.d_model": "d", "task.answer_format": "", "train.lora_rank": "lora_r",
}
_SKIP_IN_NAME = {"seed", "name", "out_dir", "preset", "presets", "tracking", "kind"}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "T" if v else "F"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5):
            mant, exp = f"{v:.3e}".split("e")
            return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
        return f"{v:.4g}"
    if isinstance(v, dict):  # e.g. a reward component: its name (and weight when not 1)
        if "name" in v:
            w, params = v.get("weight", 1.0), v.get("params") or {}
            return (str(v["name"]) + "".join(f"-{k}{_fmt(x)}" for k, x in params.items())
                    + ("" if w == 1.0 else f"x{_fmt(w)}"))
        return "-".join(f"{k}{_fmt(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "-".join(_fmt(x) for x in v)
    if v is None:
        return "none"
    return str(v).replace("/", "-").replace(" ", "")


def _short_path(path: str) -> str:
    """A model path as a run-name tag: `<run>-step-N` for a mechrl checkpoint (`<run>/checkpoints/step-N`),
    else the folder's (or hub name's) last part. Two paths with the same tag are told apart by the
    run directory's config check, which refuses a different config under the same name."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-2] == "checkpoints":
        return _fmt(f"{parts[-3]}-{parts[-1]}")
    return _fmt(parts[-1] if parts else path)


def run_name(cfg: RunConfig, default: RunConfig | None = None) -> str:
    """`<name>[-<preset>]_<tag><value>..._s<seed>` with a tag per value that differs from `default`."""
    parts = [cfg.name + (f"-{cfg.preset}" if cfg.preset else "")]
    if default is not None:
        a, b = _flatten(cfg.model_dump()), _flatten(default.model_dump())
        for key in sorted(set(a) | set(b)):
            if key.split(".")[0] in _SKIP_IN_NAME or a.get(key) == b.get(key):
                continue
            if key == "model.path" and a.get(key) is not None:
                parts.append(f"from_{_short_path(a[key])}")
                continue
            tag = TAGS.get(key, key.split(".")[-1] + "_")
            parts.append(f"{tag}{_fmt(a.get(key))}")
    parts.append(f"s{cfg.seed}")
    name = "_".join(parts)
    if len(name) > MAX_NAME:  # keep it a valid file name; the hash keeps distinct configs distinct
        import hashlib

        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME - 20]}_{digest}_s{cfg.seed}"
    return name


#: Longest run name (file systems refuse names over 255 bytes).
MAX_NAME = 160


def config_to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


class _TaskOnly(Strict):
    task: TaskConfig


def build_task_config(data: dict, overrides: dict[str, Any] | None = None, *, source: str = "task") -> TaskConfig:
    """A task config from a mapping plus `task.`-prefixed dotted overrides."""
    tree = {"task": _deepcopy(data)}
    for key, value in (overrides or {}).items():
        if not key.startswith("task."):
            raise ConfigError(f"{source}: only task.* overrides apply here, got {key!r}")
        set_dotted(tree, key, value)
    try:
        return _TaskOnly.model_validate(tree).task
    except ValidationError as e:
        raise ConfigError(format_errors(e, _TaskOnly, source)) from None
