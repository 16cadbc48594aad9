"""ModelRunner encodes each tile once and shares the features across that tile's prompts.

The reference for the answers is the previous implementation, written out here on purpose (not
imported from the runner): ``LlavaProcessor(images=..., text=...)`` + ``generate(**inputs)`` per
sub-batch of (tile, prompt) pairs in output order, which runs the vision tower once per prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rsflow.errors import RequestError
from rsflow.models import ModelSpec
from rsflow.models.imaging import background_from_processor, expand2square
from rsflow.models.prompts import TaskPrompt, build_prompt, classify_prompt, vqa_prompt
from rsflow.models.runner import ModelRunner, _clean_answer

MAX_NEW_TOKENS = 12

# Four prompts of clearly different token lengths, so sub-batches of 4 mix lengths and need padding.
PROMPTS = [
    TaskPrompt("caption", "Describe the image in detail.", key=""),
    TaskPrompt("vqa", vqa_prompt("Is there water?"), key="Is there water?"),
    TaskPrompt("classify", classify_prompt(["forest", "river", "dense residential", "airport"]), key="four"),
    TaskPrompt(
        "vqa",
        vqa_prompt("How many ships are docked in the harbor next to the industrial area?"),
        key="ships",
    ),
]


def _identify(x1: int, y1: int, x2: int, y2: int) -> str:
    return f"[identify] What is the object present at {{<{x1}><{y1}><{x2}><{y2}>}}"


def _images(n: int, seed: int = 0, shape: tuple[int, int] = (48, 64)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape, 3), dtype=np.uint8)


def _batch(n: int, *, seed: int = 0, status: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "tile_id": np.array([f"tile-{i}" for i in range(n)], dtype=object),
        "image": _images(n, seed),
        "status": np.array(status or ["ok"] * n, dtype=object),
    }
    batch.update(extra)
    return batch


@pytest.fixture(scope="module")
def runners(tiny_model_dir: Path) -> dict[int, ModelRunner]:
    """GeoChat-format runners (so region-caption is allowed) in fp32, by batch size."""

    def spec(batch_size: int) -> ModelSpec:
        return ModelSpec(
            model=str(tiny_model_dir),
            prompt_format="geochat",
            max_new_tokens=MAX_NEW_TOKENS,
            batch_size=batch_size,
            dtype="float32",
        )

    return {batch_size: ModelRunner(spec(batch_size), PROMPTS) for batch_size in (1, 4)}


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> tuple[Any, Any]:
    """The tiny checkpoint loaded straight through transformers: (model, processor)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir, backend="pil")
    processor.tokenizer.padding_side = "left"
    return model, processor


def _tokenizer_image_token(tokenizer: Any, prompt: str, image_token_id: int, n_image: int) -> list[int]:
    """LLaVA's ``tokenizer_image_token`` (llava/mm_utils.py), written out for the test: chunks split at
    ``<image>`` are tokenised separately, the BOS of the first chunk is kept and the first id of every
    chunk dropped, and the placeholder becomes ``n_image`` image-token ids (HF LLaVA's splice)."""
    chunks = [tokenizer(c)["input_ids"] for c in prompt.split("<image>")]
    ids = [chunks[0][0]]
    for i, chunk in enumerate(chunks):
        if i:
            ids += [image_token_id] * n_image
        ids += chunk[1:]
    return ids


def _reference_answers(
    reference: tuple[Any, Any], pairs: list[tuple[np.ndarray, str]], batch_size: int
) -> list[str]:
    """Answers the plain way: generate(input_ids, pixel_values) per sub-batch, in order, with the
    prompt ids made as LLaVA makes them and left padding."""
    model, processor = reference
    background = background_from_processor(processor.image_processor)
    size = model.config.vision_config.image_size
    n_image = (size // model.config.vision_config.patch_size) ** 2
    tok = processor.tokenizer
    answers: list[str] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        pixels = processor.image_processor(
            images=[expand2square(image, background) for image, _ in chunk],
            return_tensors="pt",
            input_data_format="channels_last",
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
        )["pixel_values"]
        rows = [
            _tokenizer_image_token(tok, build_prompt("geochat", q), model.config.image_token_id, n_image)
            for _, q in chunk
        ]
        length = max(map(len, rows))
        ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, length - len(r) :] = torch.tensor(r)
            mask[i, length - len(r) :] = 1
        with torch.inference_mode():
            output = model.generate(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=pixels,
                do_sample=False,
                num_beams=1,
                max_new_tokens=MAX_NEW_TOKENS,
                pad_token_id=tok.pad_token_id,
            )
        decoded = tok.batch_decode(output[:, length:], skip_special_tokens=True)
        # the runner stores text made safe (control characters replaced): compare like with like
        answers += [_clean_answer(text) for text in decoded]
    return answers


class _VisionCounter:
    """Forward hook on the vision tower: how many calls and how many images it saw."""

    def __init__(self, model: Any) -> None:
        self.calls = 0
        self.images = 0
        self._handle = model.model.vision_tower.register_forward_hook(self._hook)

    def _hook(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        self.calls += 1
        self.images += int(args[0].shape[0])

    def remove(self) -> None:
        self._handle.remove()


# --------------------------------------------------------------------------- sharing


@pytest.mark.parametrize("batch_size", [1, 4])
def test_vision_tower_runs_once_per_tile(
    runners: dict[int, ModelRunner], reference: tuple[Any, Any], batch_size: int
) -> None:
    runner = runners[batch_size]
    counter = _VisionCounter(runner.loaded.model)
    try:
        out = runner(_batch(3))
    finally:
        counter.remove()
    assert len(out["text"]) == 3 * 4 and set(out["status"]) == {"ok"}
    assert counter.images == 3  # one encoding per tile, not one per (tile, prompt)
    assert counter.calls == (3 if batch_size == 1 else 1)  # tiles are encoded batch_size at a time

    # Control: the per-prompt path the runner replaced does run the tower once per prompt.
    control = _VisionCounter(reference[0])
    try:
        images = _images(3)
        _reference_answers(reference, [(images[i], p.prompt) for i in range(3) for p in PROMPTS], 4)
    finally:
        control.remove()
    assert control.images == 12


@pytest.mark.parametrize("batch_size", [1, 4])
def test_answers_equal_plain_generate_with_llava_ids(
    runners: dict[int, ModelRunner], reference: tuple[Any, Any], batch_size: int
) -> None:
    regions = [[["r-1", 10, 20, 30, 40]], [], [["r-2", 0, 0, 100, 100], ["r-3", 5, 55, 45, 95]]]
    batch = _batch(3, seed=21, region_boxes=regions)
    out = runners[batch_size](batch)

    pairs: list[tuple[np.ndarray, str]] = []
    for row, boxes in enumerate(regions):
        pairs += [(batch["image"][row], p.prompt) for p in PROMPTS]
        pairs += [(batch["image"][row], _identify(*box[1:])) for box in boxes]
    assert out["prompt"].tolist() == [question for _, question in pairs]
    expected = _reference_answers(reference, pairs, batch_size)
    assert all(expected) and len(set(expected)) > 1  # real, varied answers (random weights)
    assert out["text"].tolist() == expected  # fp32 greedy: identical, token for token


def test_answers_do_not_depend_on_batch_size(runners: dict[int, ModelRunner]) -> None:
    batch = _batch(2, seed=5, region_boxes=[[["a", 1, 2, 3, 4]], [["b", 50, 50, 99, 99]]])
    assert runners[1](batch)["text"].tolist() == runners[4](batch)["text"].tolist()


# --------------------------------------------------------------------------- regions


def test_region_rows_follow_the_static_prompts(runners: dict[int, ModelRunner]) -> None:
    regions = np.empty(4, dtype=object)  # as Ray hands a list column over: an object array
    regions[0] = [["harbour", 8, 26, 22, 37], ["pier", 0, 0, 100, 100]]
    regions[1] = None
    regions[2] = np.array([[3, 10, 20, 30, 40]])  # numeric ids are written as strings
    regions[3] = [["skipped-region", 1, 2, 3, 4]]
    batch = _batch(4, status=["ok", "ok", "ok", "skipped"], region_boxes=regions)
    batch["error"] = np.array([None, None, None, "no data in window"], dtype=object)
    out = runners[4](batch)

    n_static = len(PROMPTS)
    counts = [n_static + 2, n_static, n_static + 1, n_static + 1]
    assert len(out["task"]) == sum(counts)
    assert out["tile_id"].tolist() == [f"tile-{i}" for i, n in enumerate(counts) for _ in range(n)]
    static_tasks = [p.task for p in PROMPTS]
    assert out["task"].tolist() == (
        static_tasks
        + ["region-caption"] * 2
        + static_tasks
        + static_tasks
        + ["region-caption"]
        + static_tasks
        + ["region-caption"]
    )
    region_rows = [i for i, t in enumerate(out["task"]) if t == "region-caption"]
    assert [out["prompt"][i] for i in region_rows] == [
        "[identify] What is the object present at {<8><26><22><37>}",
        "[identify] What is the object present at {<0><0><100><100>}",
        "[identify] What is the object present at {<10><20><30><40>}",
        "[identify] What is the object present at {<1><2><3><4>}",
    ]
    assert [out["region_id"][i] for i in region_rows] == ["harbour", "pier", "3", "skipped-region"]
    assert [out["prompt_key"][i] for i in region_rows] == ["harbour", "pier", "3", "skipped-region"]
    assert [out["region_id"][i] for i in range(len(out["task"])) if i not in region_rows] == [None] * 16
    # ok rows are answered; the skipped tile's rows (its region included) pass through
    assert out["status"].tolist() == ["ok"] * (sum(counts) - counts[3]) + ["skipped"] * counts[3]
    assert out["error"].tolist()[-counts[3] :] == ["no data in window"] * counts[3]
    assert [t is None for t in out["text"]] == [s != "ok" for s in out["status"]]
    assert out["stage"].tolist() == ["infer"] * (sum(counts) - counts[3]) + [None] * counts[3]
    # the region boxes are consumed by this stage, not carried on
    assert "region_boxes" not in out


def test_malformed_region_fails_alone(runners: dict[int, ModelRunner]) -> None:
    regions = [
        [
            ["bad", 30, 20, 10, 40],
            ["good", 10, 20, 30, 40],
            ["short", 1, 2, 3],
            ["float", 1.5, 2, 3, 4],
            ["text", "1", 2, 3, 4],
            ["whole", 10.0, 20, 30, 40],  # an integral float is an integer
        ]
    ]
    out = runners[4](_batch(1, region_boxes=regions))
    n_static = len(PROMPTS)
    assert out["region_id"].tolist()[n_static:] == ["bad", "good", "short", "float", "text", "whole"]
    assert out["status"].tolist()[n_static:] == ["failed", "ok", "failed", "failed", "failed", "ok"]
    assert out["status"].tolist()[:n_static] == ["ok"] * n_static
    errors = out["error"].tolist()[n_static:]
    assert errors[0].startswith("ValueError: box must satisfy 0 <= x1 < x2 <= 100")
    assert errors[2].startswith("ValueError: a region must be [region_id, x1, y1, x2, y2]")
    assert errors[3].startswith("ValueError: box coordinate must be an integer")
    assert errors[4].startswith("TypeError: box coordinate must be an integer")
    assert errors[1] is None and errors[5] is None
    good = _identify(10, 20, 30, 40)
    assert out["prompt"].tolist()[n_static:] == [None, good, None, None, None, good]
    assert out["text"][n_static + 1] == out["text"][n_static + 5]  # same tile, same prompt
    assert out["stage"].tolist() == ["infer"] * (n_static + 6)


def test_region_boxes_as_mappings(runners: dict[int, ModelRunner]) -> None:
    """An Arrow list<struct> column arrives as dicts: the same regions, the same answers."""
    as_lists = [[["r", 10, 20, 30, 40]], [["s", 1, 2, 3, 4], ["t", 5, 6, 7, 8]]]
    as_dicts = [
        [{"region_id": rid, "x1": x1, "y1": y1, "x2": x2, "y2": y2} for rid, x1, y1, x2, y2 in row]
        for row in as_lists
    ]
    first = runners[4](_batch(2, seed=3, region_boxes=as_lists))
    second = runners[4](_batch(2, seed=3, region_boxes=as_dicts))
    for column in ("task", "prompt", "prompt_key", "region_id", "text", "status"):
        assert first[column].tolist() == second[column].tolist(), column
    broken = runners[4](_batch(1, region_boxes=[[{"region_id": "r", "x1": 1, "y1": 2, "x2": 3}]]))
    assert broken["status"][-1] == "failed" and broken["region_id"][-1] == "r"
    assert broken["error"][-1].startswith(
        "ValueError: a region must be [region_id, x1, y1, x2, y2] or a mapping"
    )


def test_region_only_job_keeps_every_row(tiny_model_dir: Path) -> None:
    spec = ModelSpec(model=str(tiny_model_dir), prompt_format="geochat", max_new_tokens=2, batch_size=4)
    runner = ModelRunner(spec, [])  # region-caption only: every prompt comes from region_boxes
    assert runner.prompts == ()
    batch = _batch(
        3,
        status=["ok", "ok", "failed"],
        region_boxes=[[["a", 1, 2, 3, 4], ["b", 10, 10, 90, 90]], [], []],
        error=np.array([None, None, "RasterioIOError: boom"], dtype=object),
    )
    out = runner(batch)
    assert out["tile_id"].tolist() == ["tile-0", "tile-0", "tile-1", "tile-2"]
    assert out["task"].tolist() == ["region-caption", "region-caption", None, None]
    assert out["region_id"].tolist() == ["a", "b", None, None]
    assert out["prompt_key"].tolist() == ["a", "b", None, None]
    assert out["status"].tolist() == ["ok", "ok", "ok", "failed"]
    assert out["error"].tolist() == [None, None, None, "RasterioIOError: boom"]
    assert [isinstance(t, str) for t in out["text"]] == [True, True, False, False]
    assert out["stage"].tolist() == ["infer", "infer", None, None]  # nothing ran for the last two
    assert out["infer_seconds"][2:].tolist() == [0.0, 0.0]


def test_region_boxes_need_a_geochat_model(tiny_model_dir: Path) -> None:
    llava = ModelRunner(ModelSpec(model=str(tiny_model_dir), max_new_tokens=2), PROMPTS[:2])
    out = llava(_batch(2, region_boxes=[[], None]))  # no regions: fine
    assert len(out["task"]) == 4 and "region-caption" not in set(out["task"])
    with pytest.raises(RequestError, match=r"^--tasks: task 'region-caption' needs a model of the geochat"):
        llava(_batch(2, region_boxes=[[], [["r", 1, 2, 3, 4]]]))


# --------------------------------------------------------------------------- timing and constructor


def test_infer_seconds_for_rows_that_ran(runners: dict[int, ModelRunner]) -> None:
    batch = _batch(3, status=["ok", "failed", "ok"], region_boxes=[[["r", 1, 2, 3, 4]], [], []])
    out = runners[4](batch)
    ran = [s == "ok" for s in out["status"]]
    assert sum(ran) == 2 * len(PROMPTS) + 1
    assert all((t > 0) == r for t, r in zip(out["infer_seconds"].tolist(), ran, strict=True))
    assert out["infer_seconds"].dtype == np.float64


def test_task_names_still_work(tiny_model_dir: Path) -> None:
    runner = ModelRunner(ModelSpec(model=str(tiny_model_dir), max_new_tokens=2), ["caption"])
    assert runner.prompts == (TaskPrompt("caption", "Describe the image in detail.", key=""),)
    out = runner(_batch(1))
    assert out["prompt_key"].tolist() == [""] and out["region_id"].tolist() == [None]


def test_prompts_are_checked_before_loading(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rsflow.models.runner as runner_module

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights loaded before the prompts were checked")

    monkeypatch.setattr(runner_module, "load_model", no_load)
    spec = ModelSpec(model=str(tiny_model_dir))  # prompt format llava
    detect = TaskPrompt("detect", "[refer] Give me the location of <p> ships </p>", key="ships")
    with pytest.raises(RequestError, match=r"^--tasks: task 'detect' needs a model of the geochat family"):
        ModelRunner(spec, [PROMPTS[0], detect])
    with pytest.raises(RequestError, match=r"^--tasks: unknown task 'segment'"):
        ModelRunner(spec, [TaskPrompt("segment", "Segment it.", key="")])
    with pytest.raises(RequestError, match=r"^--tasks: a 'vqa' prompt has no text"):
        ModelRunner(spec, [TaskPrompt("vqa", "  ", key="q")])
    with pytest.raises(RequestError, match=r"^--tasks: task 'vqa' is built from user input"):
        ModelRunner(spec, ["vqa"])
    with pytest.raises(TypeError, match="all task names"):
        ModelRunner(spec, [PROMPTS[0], "caption"])  # type: ignore[list-item]
