"""Inference batching: rsflow's ModelRunner against the original one-prompt-at-a-time loop.

Both answer 4 prompts (a caption and three VQA questions) about each of N tiles with the same loaded tiny
model (``ModelSpec(model="smoke")``, float32, ``max_new_tokens`` 16, greedy), in this process with the
same torch thread count: 1, as in a pipeline model actor (Ray gives a ``num_cpus=1`` actor
``OMP_NUM_THREADS=1``); several threads on a shared 2-core machine also made the figures swing tenfold
(OpenMP threads spin waiting for a descheduled peer). Tiles are random uint8 RGB at the model's input
size (what the pipeline feeds it).

- ModelRunner: one call over the N tiles (each tile encoded once, its prompts sharing the features,
  prompts generated ``batch_size`` at a time); the batch size it picks itself (``--batch-size`` not given:
  auto from free memory, capped) and a small sweep. The target is judged at its own choice.
- The loop of the original inference scripts (:func:`seed_loop`): for each tile, for each prompt, the tile
  through the image processor (padded to a square) and the prompt through LLaVA's ``tokenizer_image_token``,
  then ``model.generate(input_ids, pixel_values)``, one at a time (the image is preprocessed and encoded
  again for every prompt).

A forward hook on the vision tower counts the images each path encodes. Both paths get one untimed
warm-up call first, then the paths take turns for ``ROUNDS`` rounds and each keeps its fastest round
(other work on the machine only ever slows a round down).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.common import Section, Target, default_batch_size, set_batch_size

QUESTIONS = ("Is there water in the image?", "Is there a harbour in the image?", "How many ships are there?")
MAX_NEW_TOKENS = 16
TORCH_THREADS = 1
ROUNDS = 3


def _prompts(prompt_format: str) -> list[Any]:
    from rsflow.models.prompts import TaskPrompt, task_prompts, vqa_prompt

    return [TaskPrompt("caption", task_prompts("caption", prompt_format)[0], key="")] + [
        TaskPrompt("vqa", vqa_prompt(q), key=q) for q in QUESTIONS
    ]


def _batch(images: np.ndarray) -> dict[str, np.ndarray]:
    n = len(images)
    return {
        "tile_id": np.array([f"t{i}" for i in range(n)], dtype=object),
        "image": images,
        "status": np.array(["ok"] * n, dtype=object),
        "error": np.array([None] * n, dtype=object),
    }


class _TowerCounter:
    def __init__(self, model: Any) -> None:
        self.images = 0
        self.calls = 0
        self._h = model.model.vision_tower.register_forward_hook(self._hook)

    def _hook(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        self.calls += 1
        self.images += int(args[0].shape[0])

    def remove(self) -> None:
        self._h.remove()


def seed_loop(model: Any, processor: Any, images: np.ndarray, texts: list[str]) -> tuple[list[str], int]:
    """The original inference loop: per tile, per prompt, preprocess + generate, batch 1, as LLaVA's and
    GeoChat's scripts do it: the image through the image processor (padded to a square first) and the prompt
    through ``tokenizer_image_token`` (:func:`rsflow.models.formats.llava_chunked_ids`, which the runner
    uses too), then ``generate(input_ids, pixel_values)``, which encodes the image again for every prompt.
    Returns the answers (cleaned as the runner stores them) and the number of new tokens generated."""
    import torch

    from rsflow.models.formats import llava_chunked_ids
    from rsflow.models.imaging import background_from_processor, expand2square
    from rsflow.models.runner import _clean_answer

    answers: list[str] = []
    tokens = 0
    tok = processor.tokenizer
    vision = model.config.vision_config
    size = int(vision.image_size)
    n_image = (size // int(vision.patch_size)) ** 2
    background = background_from_processor(processor.image_processor)
    for image in images:
        for text in texts:  # the seeds' scripts load and preprocess the image with each question
            pixels = processor.image_processor(
                images=[expand2square(image, background)], return_tensors="pt", input_data_format="channels_last",
                size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            )["pixel_values"]
            ids = torch.tensor([llava_chunked_ids(tok, text, model.config.image_token_id, n_image)])
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                     max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                                     pad_token_id=tok.pad_token_id)
            new = out[0, ids.shape[1]:]
            tokens += int(new.numel())
            answers.append(_clean_answer(tok.decode(new, skip_special_tokens=True)))
    return answers, tokens


def run(quick: bool) -> Section:
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads_before)


def _run(quick: bool) -> Section:
    import torch

    from rsflow.models.prompts import build_prompt
    from rsflow.models.runner import ModelRunner
    from rsflow.models.spec import ModelSpec, resolve_prompt_format

    sec = Section("batching")
    n = 32 if quick else 128
    spec = ModelSpec(model="smoke", max_new_tokens=MAX_NEW_TOKENS, dtype="float32")
    prompts = _prompts(resolve_prompt_format(spec))
    t = time.perf_counter()
    runner = ModelRunner(spec, prompts)
    load_s = time.perf_counter() - t
    loaded = runner.loaded
    size = loaded.image_size
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    texts = [build_prompt(loaded.prompt_format, p.prompt) for p in prompts]
    model, processor = loaded.model, loaded.processor  # the loop runs the runner's own model and processor
    default_bs = default_batch_size(runner)  # what a pipeline actor would use (auto unless --batch-size)
    default_how = "given" if spec.batch_size else "auto"
    sizes = list(dict.fromkeys([default_bs, 8, 32] if quick else [default_bs, 4, 8, 16, 32, 64]))

    seed_loop(model, processor, images[:1], texts)  # warm-up
    for bs in sizes:
        set_batch_size(runner, bs)
        runner(_batch(images[: max(1, bs // 4)]))  # warm-up at this batch size
    loop_times: list[float] = []
    times: dict[int, list[float]] = {bs: [] for bs in sizes}
    counts: dict[str | int, tuple[int, int]] = {}
    rows_ok: dict[int, tuple[int, int]] = {}
    loop_tokens = 0
    loop_answers: list[str] = []
    same: dict[int, int] = {}
    for _ in range(ROUNDS):
        counter = _TowerCounter(model)
        t = time.perf_counter()
        loop_answers, loop_tokens = seed_loop(model, processor, images, texts)
        loop_times.append(time.perf_counter() - t)
        counter.remove()
        counts["loop"] = (counter.calls, counter.images)
        for bs in sizes:
            set_batch_size(runner, bs)
            counter = _TowerCounter(model)
            t = time.perf_counter()
            out = runner(_batch(images))
            times[bs].append(time.perf_counter() - t)
            counter.remove()
            counts[bs] = (counter.calls, counter.images)
            rows_ok[bs] = (list(out["status"]).count("ok"), len(out["status"]))
            # the same work: greedy answers equal to the loop's (rows are per tile, prompts in order)
            same[bs] = sum(a == b for a, b in zip(loop_answers, list(out["text"]), strict=True))
    set_batch_size(runner, default_bs)

    loop_s = min(loop_times)
    loop = {"seconds": round(loop_s, 3), "seconds_each_round": [round(x, 3) for x in loop_times],
            "tiles_per_second": round(n / loop_s, 3), "prompts_per_second": round(4 * n / loop_s, 3),
            "new_tokens": loop_tokens, "vision_tower_calls": counts["loop"][0],
            "images_encoded_per_tile": counts["loop"][1] / n}
    sweep = []
    for bs in sizes:
        dt = min(times[bs])
        sweep.append({"batch_size": bs, "seconds": round(dt, 3), "seconds_each_round": [round(x, 3) for x in times[bs]],
                      "tiles_per_second": round(n / dt, 3), "prompts_per_second": round(4 * n / dt, 3),
                      "rows_ok": rows_ok[bs][0], "rows": rows_ok[bs][1], "answers_equal_to_loop": same[bs],
                      "vision_tower_calls": counts[bs][0],
                      "images_encoded_per_tile": counts[bs][1] / n, "speed_up_vs_loop": round(loop_s / dt, 2)})
    default = sweep[0]
    best = max(sweep, key=lambda e: e["tiles_per_second"])
    sec.figures.update(
        tiles=n, prompts_per_tile=4, max_new_tokens=MAX_NEW_TOKENS, dtype="float32",
        torch_threads=torch.get_num_threads(), rounds=ROUNDS, timing="fastest of the rounds",
        model=loaded.model_id, image_size=size, load_seconds=round(load_s, 2), seed_loop=loop, runner_sweep=sweep,
        default_batch_size=default_bs, default_batch_size_is=default_how, best_batch_size=best["batch_size"],
        speed_up_default=default["speed_up_vs_loop"], speed_up_best=best["speed_up_vs_loop"],
    )
    sec.rows += [
        (f"seed loop tiles/s ({n} tiles x 4 prompts, batch 1)", f"{loop['tiles_per_second']:.1f}"),
        (f"ModelRunner tiles/s, default batch {default_bs} ({default_how})", f"{default['tiles_per_second']:.1f}"),
        (f"ModelRunner tiles/s, best batch {best['batch_size']} (of {', '.join(str(b) for b in sorted(sizes))})",
         f"{best['tiles_per_second']:.1f}"),
        ("answers equal to the seed loop's (greedy, float32), default batch",
         f"{default['answers_equal_to_loop']} of {4 * n}"),
        ("images encoded per tile: seed loop / ModelRunner",
         f"{loop['images_encoded_per_tile']:g} / {default['images_encoded_per_tile']:g}"),
        ("torch threads (both)", str(torch.get_num_threads())),
    ]
    sec.targets.append(Target("batching", f"ModelRunner (default batch {default_bs}, {default_how}) / seed loop tiles/s",
                              default["speed_up_vs_loop"], ">=", 4.0, "x",
                              f"best batch {best['batch_size']}: {best['speed_up_vs_loop']}x"))
    return sec
