"""The runner's key/value cache choice: in float32 a static cache answers exactly as the dynamic one.

``ModelRunner.kv_cache`` picks what ``generate`` keeps the keys and values in (``default_kv_cache``
per device; the bench times both on a GPU). Greedy decoding must not depend on it, with prompts of
different lengths left-padded in one call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rsflow.models import ModelSpec
from rsflow.models.prompts import TaskPrompt, vqa_prompt
from rsflow.models.runner import ModelRunner, default_kv_cache
from tests.model_fixtures import tiny_model_dir  # noqa: F401 - fixture

PROMPTS = [
    TaskPrompt("caption", "Describe the image in detail.", key=""),
    TaskPrompt("vqa", vqa_prompt("Is there water?"), key="water"),
    TaskPrompt("vqa", vqa_prompt("How many ships are docked in the harbor next to the industrial area?"), key="ships"),
]


def _batch(n: int) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    return {
        "tile_id": np.array([f"tile-{i}" for i in range(n)], dtype=object),
        "image": rng.integers(0, 256, (n, 40, 56, 3), dtype=np.uint8),
        "status": np.array(["ok"] * n, dtype=object),
    }


@pytest.fixture(scope="module")
def runner(tiny_model_dir: Path) -> ModelRunner:  # noqa: F811 - fixture
    spec = ModelSpec(model=str(tiny_model_dir), max_new_tokens=10, batch_size=4, dtype="float32")
    return ModelRunner(spec, PROMPTS)


def test_default_cache_is_static_on_a_gpu_and_dynamic_on_a_cpu(runner: ModelRunner) -> None:
    assert default_kv_cache(torch.device("cuda")) == "static"
    assert default_kv_cache(torch.device("cpu")) == "dynamic"
    assert runner.kv_cache == "dynamic"


def test_static_cache_gives_the_dynamic_caches_answers(runner: ModelRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _batch(5)  # 15 prompts in calls of 4: mixed lengths padded in each call, a short last call
    runner.kv_cache = "dynamic"
    dynamic = runner(batch)

    seen: list[Any] = []
    generate = runner.loaded.model.generate

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("cache_implementation"))
        return generate(*args, **kwargs)

    monkeypatch.setattr(runner.loaded.model, "generate", spy)
    runner.kv_cache = "static"
    try:
        static = runner(batch)
    finally:
        runner.kv_cache = "dynamic"
    assert seen == ["static"] * 4
    assert list(static["status"]) == ["ok"] * 15
    assert all(static["text"]), "every prompt answered"
    assert list(static["text"]) == list(dynamic["text"])
    assert list(static["tile_id"]) == list(dynamic["tile_id"])
