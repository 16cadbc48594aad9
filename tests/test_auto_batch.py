"""The batch size a model replica picks by itself from its device's free memory (issue 10)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from rsflow.models.prompts import TaskPrompt
from rsflow.models.runner import AUTO_BATCH_CAP_CPU, AUTO_BATCH_CAP_GPU, ModelRunner, auto_batch_size, sequence_bytes
from rsflow.models.spec import ModelSpec

GiB = 1024**3


def _llava_7b() -> LlavaConfig:
    """LLaVA-1.5-7B's published dimensions (Vicuna-7B + CLIP ViT-L/14-336)."""
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    return LlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict())


def _loaded(device: str, config: Any = None, dtype: torch.dtype = torch.bfloat16) -> Any:
    return SimpleNamespace(device=torch.device(device), model=SimpleNamespace(config=config or _llava_7b()),
                           dtype=dtype, image_size=336)


def test_a_7b_sequence_costs_its_kv_cache_and_a_little_more() -> None:
    tokens = 576 + 64 + 64  # the image's 24 x 24 patches, the text, 64 new tokens
    kv = 2 * 32 * 4096 * tokens * 2  # keys and values, 32 layers, 4096 wide, bf16
    cost = sequence_bytes(_llava_7b(), torch.bfloat16, tokens)
    assert kv < cost < 1.1 * kv
    assert cost == pytest.approx(0.39e9, rel=0.05)


def test_gpu_batch_follows_free_memory_up_to_the_cap() -> None:
    # An 80 GB card with the 7B weights loaded (~66 GB free): more room than the cap.
    assert auto_batch_size(_loaded("cuda"), 64, free_bytes=66 * GiB) == AUTO_BATCH_CAP_GPU
    # A 24 GB card (~10 GB free): what 60 % of it holds at ~0.39 GB a sequence.
    assert auto_batch_size(_loaded("cuda"), 64, free_bytes=10 * GiB) == 16
    # Longer answers need more cache per sequence: fewer of them.
    assert auto_batch_size(_loaded("cuda"), 1024, free_bytes=10 * GiB) < 16
    assert auto_batch_size(_loaded("cuda"), 64, free_bytes=GiB // 10) == 1  # never zero


def test_cpu_batch_uses_a_share_of_available_ram() -> None:
    assert auto_batch_size(_loaded("cpu", dtype=torch.float32), 64, free_bytes=64 * GiB) == AUTO_BATCH_CAP_CPU
    assert auto_batch_size(_loaded("cpu", dtype=torch.float32), 64, free_bytes=4 * GiB) == 1


def test_a_replica_picks_its_batch_unless_told(tiny_model_dir: Any) -> None:
    prompts = [TaskPrompt("caption", "Describe the image.", key="")]
    auto = ModelRunner(ModelSpec(model=str(tiny_model_dir), max_new_tokens=4), prompts)
    told = ModelRunner(ModelSpec(model=str(tiny_model_dir), max_new_tokens=4, batch_size=3), prompts)
    assert auto.batch_size == AUTO_BATCH_CAP_CPU  # a tiny model's sequences take kilobytes: the cap
    assert told.batch_size == 3
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    batch = {"tile_id": np.array([f"t{i}" for i in range(5)], dtype=object), "image": images,
             "status": np.array(["ok"] * 5, dtype=object)}
    assert list(auto(batch)["text"]) == list(told(batch)["text"])  # the batch size never changes answers
