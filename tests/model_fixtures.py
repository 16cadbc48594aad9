"""Session fixtures: a tiny real LLaVA checkpoint and a LoRA adapter for it, built by code.

Use them from a test module with ``from tests.model_fixtures import tiny_model_dir, tiny_adapter_dir``
(or list this module in ``pytest_plugins``). Both are saved in the real on-disk formats
(``save_pretrained`` safetensors) and are loaded by the tests exactly as ``--model DIR --adapter DIR``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from rsflow.models.tiny import build_tiny_llava

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""LLaMA projections a LLaVA LoRA adapts (GeoChat / LLaVA ``find_all_linear_names``)."""

# CLIP's attention also has q/k/v_proj; anchor on the language model so the vision tower stays untouched.
_LORA_TARGET_REGEX = r".*language_model.*\.(" + "|".join(LORA_TARGETS) + r")"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA-1.5-shaped checkpoint folder (random weights, seed 0, 64 px, prompt format llava)."""
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA adapter (r 4, alpha 8) on the language model's seven projections of ``tiny_model_dir``.

    ``lora_B`` is NOT zero (``init_lora_weights=False`` draws both matrices at random under a fixed
    seed), so merging it changes the logits and, in practice, the generated text.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=_LORA_TARGET_REGEX,
        init_lora_weights=False,
        bias="none",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 still asks transformers 5 for the deprecated `is_gradient_checkpointing`.
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
        torch.manual_seed(1234)
        peft_model = get_peft_model(base, config)
    out = tmp_path_factory.mktemp("tiny-llava-lora") / "adapter"
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def padded_embeddings_copy(model_dir: Path, folder: Path, extra: int = 8) -> tuple[Path, int]:
    """A copy of ``model_dir`` whose embeddings have ``extra`` rows no token has (llava-hf pads them to
    32,064 with random draws), made to win every greedy step (+-1000x the EOS row: one of them tops any
    other logit), ``<image>``'s row too, and whose generation config suppresses nothing.

    Returns:
        ``(folder, n_tokens)``: the copy, and the rows it had before (the first extra row).
    """
    import shutil

    import torch
    from transformers import LlavaForConditionalGeneration

    shutil.copytree(model_dir, folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    n_tokens = int(model.get_output_embeddings().weight.shape[0])
    model.resize_token_embeddings(n_tokens + extra, mean_resizing=False)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        eos_row = head[int(model.generation_config.eos_token_id)]
        head[n_tokens : n_tokens + extra // 2] = 1000 * eos_row
        head[n_tokens + extra // 2 :] = -1000 * eos_row
        head[int(model.config.image_token_index)] = 2000 * eos_row  # <image> too, were it allowed
    model.generation_config.suppress_tokens = None
    model.save_pretrained(folder)
    return folder, n_tokens
