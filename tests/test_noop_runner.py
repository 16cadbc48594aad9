"""The no-op model's runner shapes rows exactly as a model's runner does, without torch.

``--model noop`` measures the read path and checks loads; its actors run ``NoopRunner`` (no weights,
no torch import). Its rows must line up with a real model's: same slots in the same order, same
statuses and failures (unusable chips, malformed region boxes, rows that arrive skipped or failed),
empty answers where a model would answer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rsflow.models import ModelSpec
from rsflow.models.prompts import TaskPrompt, vqa_prompt
from rsflow.models.runner import ModelRunner
from rsflow.models.slots import NoopRunner
from tests.model_fixtures import tiny_model_dir  # noqa: F401 - fixture

PROMPTS = [
    TaskPrompt("caption", "Describe the image in detail.", key=""),
    TaskPrompt("vqa", vqa_prompt("Is there water?"), key="water"),
]


def _batch() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    images = np.empty(5, dtype=object)
    for i in range(5):
        images[i] = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    images[3] = np.zeros((24, 32), dtype=np.uint8)  # an unusable chip: fails its prompts
    regions = np.empty(5, dtype=object)
    regions[:] = [[], [["r1", 10, 10, 50, 50]], None, [], [["r2", 10, 10, 50], ["r3", 0, 0, 100, 100]]]
    return {
        "tile_id": np.array([f"t{i}" for i in range(5)], dtype=object),
        "image": images,
        "status": np.array(["ok", "ok", "skipped", "ok", "ok"], dtype=object),
        "error": np.array([None, None, "nodata fraction 0.9", None, None], dtype=object),
        "stage": np.array(["read", "read", "read", "read", "read"], dtype=object),
        "region_boxes": regions,
        "footprint_wkb": np.array([b"x"] * 5, dtype=object),
    }


def test_noop_rows_line_up_with_a_models_rows(tiny_model_dir: Path) -> None:  # noqa: F811 - fixture
    model = ModelRunner(ModelSpec(model=str(tiny_model_dir), prompt_format="geochat", max_new_tokens=4,
                                  batch_size=4, dtype="float32"), PROMPTS)
    noop = NoopRunner(ModelSpec(model="noop"), PROMPTS)
    want, got = model(_batch()), noop(_batch())
    assert set(got) == set(want)
    for column in ("tile_id", "task", "prompt", "prompt_key", "region_id", "prompt_index", "status", "stage",
                   "footprint_wkb"):
        assert list(got[column]) == list(want[column]), column
    # errors: the same rows fail, for the same reasons (the model's texts for them are None too)
    assert list(got["error"]) == list(want["error"])
    assert [t is None for t in got["text"]] == [t is None for t in want["text"]]
    assert all(t == "" for t in got["text"] if t is not None)
    assert set(got["model_id"]) == {"noop"}
    statuses = list(got["status"])
    assert statuses.count("failed") == 3 and statuses.count("skipped") == 2, statuses  # chip x2, box x1


def test_model_runner_of_the_noop_model_is_the_noop_runner() -> None:
    batch = _batch()
    a = ModelRunner(ModelSpec(model="noop"), PROMPTS)(batch)
    b = NoopRunner(ModelSpec(model="noop"), PROMPTS)(_batch())
    for column in a:
        if column != "infer_seconds":
            assert list(a[column]) == list(b[column]), column


def test_noop_runner_needs_no_torch() -> None:
    code = ("import sys; from rsflow.models.slots import NoopRunner; from rsflow.models import ModelSpec; "
            "NoopRunner(ModelSpec(model='noop'), ['caption']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_noop_runner_refuses_other_models_and_adapters() -> None:
    with pytest.raises(ValueError, match="noop"):
        NoopRunner(ModelSpec(model="smoke"), ["caption"])
    with pytest.raises(Exception, match="no adapter named 'x'"):
        NoopRunner(ModelSpec(model="noop"), [TaskPrompt("caption", "Describe.", key="", adapter="x")])
