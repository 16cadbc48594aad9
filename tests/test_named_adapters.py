"""Several LoRA adapters on one base in one actor, chosen per prompt (peft named adapters)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from rsflow.errors import RequestError
from rsflow.models.prompts import TaskPrompt
from rsflow.models.runner import ModelRunner
from rsflow.models.spec import ModelSpec
from tests.model_fixtures import _LORA_TARGET_REGEX


@pytest.fixture(scope="module")
def second_adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=_LORA_TARGET_REGEX, init_lora_weights=False)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
        torch.manual_seed(99)
        peft_model = get_peft_model(base, config)
    out = tmp_path_factory.mktemp("second-lora") / "adapter"
    peft_model.save_pretrained(out)
    return out


def _batch(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "tile_id": np.array([f"t{i}" for i in range(n)], dtype=object),
        "image": rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8),
        "status": np.array(["ok"] * n, dtype=object),
    }


def test_each_prompt_is_answered_by_its_adapter(tiny_model_dir, tiny_adapter_dir, second_adapter_dir):
    q = "Describe the image in detail."
    spec = ModelSpec(model=str(tiny_model_dir), max_new_tokens=8,
                     adapters=(("first", str(tiny_adapter_dir)), ("second", str(second_adapter_dir))))
    prompts = [TaskPrompt("caption", q, key="", adapter=None), TaskPrompt("caption", q, key="", adapter="first"),
               TaskPrompt("caption", q, key="", adapter="second")]
    runner = ModelRunner(spec, prompts)
    assert runner.loaded.adapter_names == ("first", "second")
    batch = _batch(3)
    out = runner(batch)
    texts = np.array(out["text"], dtype=object).reshape(3, 3)  # tiles x (base, first, second)

    # each column equals a runner that loads only that adapter, merged
    plain = ModelRunner(ModelSpec(model=str(tiny_model_dir), max_new_tokens=8), ["caption"])(batch)
    first = ModelRunner(ModelSpec(model=str(tiny_model_dir), adapter=str(tiny_adapter_dir), max_new_tokens=8),
                        ["caption"])(batch)
    second = ModelRunner(ModelSpec(model=str(tiny_model_dir), adapter=str(second_adapter_dir), max_new_tokens=8),
                         ["caption"])(batch)
    assert list(texts[:, 0]) == list(plain["text"])
    assert list(texts[:, 1]) == list(first["text"])
    assert list(texts[:, 2]) == list(second["text"])
    assert len({tuple(texts[:, j]) for j in range(3)}) == 3  # three different models answered
    ids = np.array(out["model_id"], dtype=object).reshape(3, 3)
    assert "+adapter=first" in ids[0, 1] and "+adapter=second" in ids[0, 2] and "+adapter" not in ids[0, 0]
    # the base weights are held once: one set of base parameters, two sets of LoRA matrices
    names = [n for n, _ in runner.loaded.model.named_parameters()]
    assert sum(".lora_A.first." in n for n in names) == sum(".lora_A.second." in n for n in names) > 0


def test_unknown_adapter_name_is_refused_before_loading(tiny_model_dir, tiny_adapter_dir):
    spec = ModelSpec(model=str(tiny_model_dir), adapters=(("first", str(tiny_adapter_dir)),))
    with pytest.raises(RequestError, match="no adapter named 'third'"):
        ModelRunner(spec, [TaskPrompt("caption", "Describe the image in detail.", key="", adapter="third")])
    with pytest.raises(RequestError, match="either --adapter"):
        ModelSpec(model=str(tiny_model_dir), adapter=str(tiny_adapter_dir), adapters=(("a", str(tiny_adapter_dir)),))
