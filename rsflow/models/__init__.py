"""Vision-language models: specs, prompt templates, image preparation, the batched model actor.

The light parts (``ModelSpec``, prompts, imaging) import eagerly. ``load_model``, ``ModelRunner``,
``LoadedModel`` and the tiny-model builders pull in torch and transformers, so they are imported
on first access; ``import rsflow.models`` stays cheap for the CLI and the Ray driver.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rsflow.models.imaging import background_from_processor, expand2square
from rsflow.models.prompts import (
    PROMPT_FORMATS,
    SYSTEM_LLAVA_V1,
    SYSTEM_RSLLAVA,
    SYSTEM_VICUNA_V1,
    TASK_PROMPTS,
    PromptFormat,
    build_prompt,
    task_prompts,
)
from rsflow.models.spec import (
    SMOKE_MODEL,
    ModelSpec,
    model_card,
    model_id,
    model_input_size,
    resolve_adapter,
    resolve_model_dir,
    resolve_prompt_format,
)

if TYPE_CHECKING:
    from rsflow.models.runner import LoadedModel, ModelRunner, load_model
    from rsflow.models.tiny import build_tiny_llava, ensure_smoke_model

_LAZY = {
    "LoadedModel": "rsflow.models.runner",
    "ModelRunner": "rsflow.models.runner",
    "load_model": "rsflow.models.runner",
    "build_tiny_llava": "rsflow.models.tiny",
    "ensure_smoke_model": "rsflow.models.tiny",
}

__all__ = [
    "PROMPT_FORMATS",
    "SMOKE_MODEL",
    "SYSTEM_LLAVA_V1",
    "SYSTEM_RSLLAVA",
    "SYSTEM_VICUNA_V1",
    "TASK_PROMPTS",
    "LoadedModel",
    "ModelRunner",
    "ModelSpec",
    "PromptFormat",
    "background_from_processor",
    "build_prompt",
    "build_tiny_llava",
    "ensure_smoke_model",
    "expand2square",
    "load_model",
    "model_card",
    "model_id",
    "model_input_size",
    "resolve_adapter",
    "resolve_model_dir",
    "resolve_prompt_format",
    "task_prompts",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
