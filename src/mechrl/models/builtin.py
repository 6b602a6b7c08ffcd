"""Models mechrl builds itself, by name (`model.builtin`): no download, built once and cached.

Each built-in model is defined with what it is for (the story model with the story task) and is
named here by the function that returns its folder, as an entry point: `"module:function"`,
imported only when that model is asked for. Loading a model therefore needs no task package, and
the task's model code may use `mechrl.models.loading` without an import circle.

    folder = builtin_model_folder("stories")     # pretrained tiny story Llama (minutes the first time)
"""

from __future__ import annotations

import importlib
from pathlib import Path

#: name -> "module:function"; the function takes no argument and returns the model's folder.
BUILTIN_MODELS: dict[str, str] = {
    "stories": "mechrl.tasks.stories.base_model:story_model_folder",
    "stories-fast": "mechrl.tasks.stories.base_model:fast_story_model_folder",
}


def builtin_model_folder(name: str) -> Path:
    """The folder of built-in model `name` (built and cached on first use)."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    module, fn = BUILTIN_MODELS[name].split(":")
    return Path(getattr(importlib.import_module(module), fn)())
