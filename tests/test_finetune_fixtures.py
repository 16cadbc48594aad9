"""The fixed-answer fixture: a tiny LLaVA trained in the test session to answer known box strings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rsflow.models.imaging import background_from_processor, expand2square
from rsflow.models.prompts import build_prompt, refer_prompt
from tests.finetune_fixtures import (  # noqa: F401  (fixed_box_model_dir is a fixture)
    FIXED_BOX_ANSWERS,
    SHIP_BOX,
    TANK_BOX,
    finetune_fixed_answer,
    fixed_box_model_dir,
)


@pytest.fixture(scope="module")
def loaded(fixed_box_model_dir: Path):
    """The saved checkpoint loaded the way the runner loads a ``--model DIR``."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(fixed_box_model_dir, dtype=torch.float32)
    model.eval()
    processor = AutoProcessor.from_pretrained(fixed_box_model_dir, backend="pil")
    processor.tokenizer.padding_side = "left"
    return model, processor


def _answers(model, processor, images: list[np.ndarray], questions: list[str]) -> list[str]:
    """Greedy answers as the runner computes them (square padding, left padding, new tokens, stripped)."""
    import torch

    background = background_from_processor(processor.image_processor)
    inputs = processor(
        images=[expand2square(img, background) for img in images],
        text=[build_prompt("geochat", q) for q in questions],
        return_tensors="pt",
        padding=True,
        input_data_format="channels_last",
    )
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            do_sample=False,
            num_beams=1,
            max_new_tokens=40,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    new = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def test_fixture_targets_are_geochat_refer_prompts():
    assert FIXED_BOX_ANSWERS == {
        "[refer] Give me the location of <p> ship </p>": "{<10><10><90><90>|<0>}",
        "[refer] Give me the location of <p> storage tank </p>": "{<20><30><40><50>|<30>}",
    }


def test_saved_dir_has_card_and_loads(fixed_box_model_dir: Path, loaded):
    card = json.loads((fixed_box_model_dir / "rsflow.json").read_text(encoding="utf-8"))
    assert card["prompt_format"] == "geochat"
    assert card["kind"] == "test"
    assert card["name"] == "fixed-answer"
    assert (fixed_box_model_dir / "model.safetensors").is_file()
    model, processor = loaded
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert processor.tokenizer.eos_token == "</s>"


def test_answers_exactly_on_new_images(loaded):
    model, processor = loaded
    rng = np.random.default_rng(20240611)  # not a seed the fixture trains or checks with
    noise = [rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8) for _ in range(2)]
    wide = rng.integers(0, 256, size=(40, 90, 3), dtype=np.uint8)  # padded to a square, like the runner
    images = [*noise, wide]
    questions = [refer_prompt("ship"), refer_prompt("storage tank")]
    pairs = [(img, q) for img in images for q in questions]  # one batch, prompts of different lengths
    got = _answers(model, processor, [img for img, _ in pairs], [q for _, q in pairs])
    assert got == [SHIP_BOX, TANK_BOX] * len(images)


def test_unrelated_prompt_still_decodes(loaded):
    model, processor = loaded
    image = np.full((64, 64, 3), 90, dtype=np.uint8)
    (text,) = _answers(model, processor, [image], ["Describe the image in detail."])
    assert isinstance(text, str)


def test_bad_arguments_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="either"):
        finetune_fixed_answer(tmp_path, prompts=["a"], answer="b", answers={"a": "b"})
    with pytest.raises(ValueError, match="prompts"):
        finetune_fixed_answer(tmp_path, prompts=["a"])
    with pytest.raises(ValueError, match="non-empty"):
        finetune_fixed_answer(tmp_path, answers={"a": " "})
