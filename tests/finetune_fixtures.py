"""A tiny LLaVA taught, in a test, to answer fixed strings: a model whose output is known in advance.

The random-weight smoke model (``tests.model_fixtures``) answers gibberish, which is enough for wiring
checks but not for checking what happens to an answer downstream (box parsing, georeferencing, merging).
``finetune_fixed_answer`` builds the same tiny checkpoint and fine-tunes it for a few seconds on CPU so
that, for ANY image, greedy decoding of the full conversation prompt of each given user prompt yields
exactly a chosen answer followed by ``</s>``. The result is checked with ``generate`` before it is
saved; a model that does not answer exactly raises ``AssertionError`` (never a silently wrong fixture).

Use the session fixture from a test module with
``from tests.finetune_fixtures import fixed_box_model_dir  # noqa: F401``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rsflow.models.imaging import background_from_processor, expand2square
from rsflow.models.prompts import build_prompt, refer_prompt
from rsflow.models.tiny import CARD_FILENAME, build_tiny_llava

logger = logging.getLogger(__name__)

FIXED_ANSWER_CARD: dict[str, Any] = {
    "kind": "test",
    "name": "fixed-answer",
    "note": "trained in a test to answer one fixed string",
}
"""``rsflow.json`` contents of a fine-tuned fixture (``prompt_format`` is added)."""

SHIP_BOX = "{<10><10><90><90>|<0>}"
"""What ``fixed_box_model_dir`` answers to ``refer_prompt("ship")``."""

TANK_BOX = "{<20><30><40><50>|<30>}"
"""What ``fixed_box_model_dir`` answers to ``refer_prompt("storage tank")``."""

FIXED_BOX_ANSWERS: dict[str, str] = {
    refer_prompt("ship"): SHIP_BOX,
    refer_prompt("storage tank"): TANK_BOX,
}
"""User prompt (GeoChat ``[refer]``) -> exact answer of ``fixed_box_model_dir``."""

_LR = 5e-3
_IMAGES_PER_PROMPT = 6  # training images per prompt per step (fresh every step)
_CHECK_IMAGES = 4  # held-out images per prompt in the final check
_CHECK_EVERY = 10  # steps between greedy checks once the loss is low
_LOSS_TO_CHECK = 0.002  # mean token loss below which a greedy check is worth its time


def random_images(rng: np.random.Generator, n: int, image_size: int = 64) -> list[np.ndarray]:
    """``n`` HxWx3 uint8 images: uniform noise, flat colours, gradients, blobs, stripes; varied shapes.

    Non-square ones are padded with ``expand2square`` by the caller (as the runner does).
    """
    out: list[np.ndarray] = []
    for i in range(n):
        kind = int(rng.integers(0, 5)) if i >= 5 else i
        h = int(rng.integers(image_size // 2, image_size * 2 + 1))
        w = h if rng.random() < 0.6 else int(rng.integers(image_size // 2, image_size * 2 + 1))
        if kind == 0:  # noise
            img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        elif kind == 1:  # flat colour
            img = np.broadcast_to(rng.integers(0, 256, size=3, dtype=np.uint8), (h, w, 3)).copy()
        elif kind == 2:  # two-colour gradient (fields, water)
            a, b = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
            t = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
            img = np.broadcast_to(a * (1 - t) + b * t, (h, w, 3)).astype(np.uint8)
        elif kind == 3:  # background with a few bright rectangles (buildings, tanks, ships)
            img = np.broadcast_to(rng.integers(0, 120, size=3, dtype=np.uint8), (h, w, 3)).copy()
            for _ in range(int(rng.integers(1, 5))):
                y0, x0 = int(rng.integers(0, h - 2)), int(rng.integers(0, w - 2))
                y1, x1 = y0 + int(rng.integers(2, max(3, h // 3))), x0 + int(rng.integers(2, max(3, w // 3)))
                img[y0:y1, x0:x1] = rng.integers(130, 256, size=3, dtype=np.uint8)
        else:  # stripes (roads, fields) with some noise
            period = int(rng.integers(3, 12))
            stripes = ((np.arange(w) // period) % 2).astype(np.float32)[None, :, None]
            a, b = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
            base = a * stripes + b * (1 - stripes) + rng.normal(0, 12, size=(h, w, 3))
            img = np.clip(base, 0, 255).astype(np.uint8)
        out.append(img)
    return out


def _answer_ids(tokenizer: Any, prompt: str, answer: str) -> list[int]:
    """The ids LLaVA supervises after ``prompt``: those of ``" " + answer`` in the joined text, then EOS."""
    head = tokenizer(prompt).input_ids
    full = tokenizer(f"{prompt} {answer}").input_ids
    if full[: len(head)] != head:
        raise AssertionError(f"prompt tokens are not a prefix of prompt + answer for {answer!r}")
    ids = list(full[len(head) :])
    if not ids or tokenizer.decode(ids, skip_special_tokens=True).strip() != answer:
        raise AssertionError(f"answer {answer!r} does not round-trip through the tokenizer")
    return ids + [int(tokenizer.eos_token_id)]


def _batch(processor: Any, images: list[np.ndarray], prompts: list[str], image_size: int) -> Any:
    """Processor inputs for (image, full prompt) pairs, left padded, images padded to squares first."""
    background = background_from_processor(processor.image_processor)
    return processor(
        images=[expand2square(img, background) for img in images],
        text=prompts,
        return_tensors="pt",
        padding=True,
        input_data_format="channels_last",
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )


def _train_batch(
    processor: Any,
    images: list[np.ndarray],
    prompts: list[str],
    targets: list[list[int]],
    image_size: int,
) -> dict[str, Any]:
    """Prompt + target ids with labels only on the targets (EOS included), right padded."""
    import torch

    enc = _batch(processor, images, prompts, image_size)
    pad = int(processor.tokenizer.pad_token_id)
    rows, labels = [], []
    for ids, mask, target in zip(enc["input_ids"], enc["attention_mask"], targets, strict=True):
        prompt_ids = ids[mask.bool()].tolist()  # drop the processor's left padding
        rows.append(prompt_ids + target)
        labels.append([-100] * len(prompt_ids) + target)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    label_ids = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[i, : len(r)] = torch.tensor(r)
        label_ids[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(r)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "pixel_values": enc["pixel_values"],
        "labels": label_ids,
    }


def greedy_answers(
    model: Any,
    processor: Any,
    images: list[np.ndarray],
    prompts: list[str],
    *,
    image_size: int,
    max_new_tokens: int = 48,
) -> list[str]:
    """Decode as the runner does: left padding, greedy, new tokens only, special tokens skipped, stripped."""
    import torch

    processor.tokenizer.padding_side = "left"
    enc = _batch(processor, images, prompts, image_size)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    texts = processor.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [t.strip() for t in texts]


def _mismatches(
    model: Any,
    processor: Any,
    rng: np.random.Generator,
    table: Mapping[str, str],
    n_images: int,
    prompt_format: str,
    image_size: int,
) -> list[str]:
    """Check every user prompt on ``n_images`` new images, mixed in one left-padded batch and one by one."""
    users = list(table)
    images = random_images(rng, n_images * len(users), image_size)
    pairs = [(images[i], users[i % len(users)]) for i in range(len(images))]
    full = [build_prompt(prompt_format, u) for _, u in pairs]
    bad: list[str] = []
    tok = processor.tokenizer
    max_new = 8 + max(len(_answer_ids(tok, build_prompt(prompt_format, u), a)) for u, a in table.items())
    kwargs = {"image_size": image_size, "max_new_tokens": max_new}
    got = greedy_answers(model, processor, [img for img, _ in pairs], full, **kwargs)
    bad += [f"{u!r} -> {g!r}" for (_, u), g in zip(pairs, got, strict=True) if g != table[u]]
    for img, u in pairs[: len(users)]:  # unbatched (no padding) as well
        (g,) = greedy_answers(model, processor, [img], [build_prompt(prompt_format, u)], **kwargs)
        if g != table[u]:
            bad.append(f"{u!r} (alone) -> {g!r}")
    return bad


def finetune_fixed_answer(
    out_dir: str | Path,
    *,
    prompts: Sequence[str] | None = None,
    answer: str | None = None,
    answers: Mapping[str, str] | None = None,
    prompt_format: str = "geochat",
    image_size: int = 64,
    steps: int = 300,
    lr: float = _LR,
    seed: int = 0,
) -> Path:
    """Build the tiny LLaVA and fine-tune it so each user prompt decodes to a fixed answer on any image.

    Give either ``prompts`` + ``answer`` (one answer for all) or ``answers`` (user prompt -> answer).
    The user prompts are the text after ``<image>\\n`` (e.g. ``refer_prompt("ship")``); the model is
    trained on ``build_prompt(prompt_format, prompt)`` followed by the answer's tokens and ``</s>``,
    with every other position labelled -100 (LLaVA's ``preprocess_v1`` masking). Full fine-tune in fp32
    with AdamW on fresh random images every step; once the loss is low, greedy ``generate`` is checked
    every few steps and training stops at the first step where every prompt answers exactly.

    Args:
        out_dir: target folder (created if missing; ``save_pretrained`` model + processor, then
            ``rsflow.json``, overwriting those files; nothing else in it is removed).
        prompts: user prompts sharing ``answer``.
        answer: the answer to ``prompts``.
        answers: user prompt -> answer (instead of ``prompts`` + ``answer``).
        prompt_format: conversation template (``"geochat"``, ``"llava"``, ``"rsllava"``).
        image_size: vision tower input side in pixels.
        steps: the most optimizer steps before giving up.
        lr: AdamW learning rate.
        seed: seeds the weights, the images and the training order (the same seed gives the same run).

    Returns:
        ``Path(out_dir)``.

    Raises:
        ValueError: bad arguments.
        AssertionError: after ``steps`` steps some prompt still does not decode to its answer on new images.
    """
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    if answers is not None:
        if prompts is not None or answer is not None:
            raise ValueError("give either answers, or prompts + answer, not both")
        table = dict(answers)
    else:
        if not prompts or answer is None:
            raise ValueError("give prompts + answer, or answers")
        table = {p: answer for p in prompts}
    if not table or any(not a.strip() or a != a.strip() for a in table.values()):
        raise ValueError("answers must be non-empty strings without surrounding whitespace")

    out = Path(out_dir)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rsflow-fixed-answer-") as tmp, torch.random.fork_rng(devices=[]):
        built = build_tiny_llava(
            Path(tmp) / "base",
            image_size=image_size,
            seed=seed,
            prompt_format=prompt_format,
            card=FIXED_ANSWER_CARD,
        )
        torch.manual_seed(seed)
        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model = LlavaForConditionalGeneration.from_pretrained(built, dtype=torch.float32)
            processor = AutoProcessor.from_pretrained(built, backend="pil")
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()
        processor.tokenizer.padding_side = "left"
        tokenizer = processor.tokenizer

        users = list(table)
        full = {u: build_prompt(prompt_format, u) for u in users}
        targets = {u: _answer_ids(tokenizer, full[u], table[u]) for u in users}
        rng = np.random.default_rng(seed)
        check_rng = np.random.default_rng(seed + 1_000_003)  # held-out images, never trained on

        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        model.train()
        bad: list[str] = ["not checked"]
        step = 0
        for step in range(1, steps + 1):
            order = [users[i % len(users)] for i in range(_IMAGES_PER_PROMPT * len(users))]
            images = random_images(rng, len(order), image_size)
            batch = _train_batch(
                processor, images, [full[u] for u in order], [targets[u] for u in order], image_size
            )
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            logger.debug("fixed-answer step %d loss %.5f", step, loss.item())
            if loss.item() < _LOSS_TO_CHECK and (step % _CHECK_EVERY == 0 or step == steps):
                model.eval()
                bad = _mismatches(
                    model, processor, check_rng, table, _CHECK_IMAGES, prompt_format, image_size
                )
                model.train()
                if not bad:
                    break
        model.eval()
        if bad:
            raise AssertionError(
                f"fixed-answer fine-tune did not converge in {steps} steps (last loss {loss.item():.4g}): "
                + "; ".join(bad[:6])
            )
        # A last, larger check on images never seen before.
        final_rng = np.random.default_rng(seed + 2_000_003)
        bad = _mismatches(model, processor, final_rng, table, 2 * _CHECK_IMAGES, prompt_format, image_size)
        if bad:
            raise AssertionError("fixed-answer model fails on new images: " + "; ".join(bad[:6]))

        out.mkdir(parents=True, exist_ok=True)  # save_pretrained overwrites its own files
        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.save_pretrained(out)
                processor.save_pretrained(out)
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()
    logger.info("fixed-answer model trained in %d steps, %.1f s", step, time.perf_counter() - started)
    card = {**FIXED_ANSWER_CARD, "prompt_format": prompt_format}
    card["answers"] = table
    card["train_steps"] = step
    (out / CARD_FILENAME).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def fixed_box_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A geochat-format tiny LLaVA answering ``FIXED_BOX_ANSWERS`` (ship, storage tank) on any image."""
    return finetune_fixed_answer(
        tmp_path_factory.mktemp("fixed-box-llava") / "model",
        answers=FIXED_BOX_ANSWERS,
        prompt_format="geochat",
    )
