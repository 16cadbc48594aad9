"""GPU check of the model stage: the CUDA path of ModelRunner, and LLaVA-1.5-7B-sized throughput.

Run on a machine with a CUDA GPU (never part of the test suite)::

    python bench/gpu_check.py [--out DIR] [--quick]

1. The tiny model through ``ModelRunner`` with the defaults a GPU gets (float16 for its float32 checkpoint; flash-attention 2 when
   ``flash_attn`` is importable, else SDPA): every row answered, dtype/device as expected, and the
   answers equal those of an fp32 run on the same GPU for the first tokens where they agree.
2. The LLaVA-1.5-7B architecture (published dimensions; random weights, since real ones cannot be
   downloaded here) saved with ``save_pretrained`` in bf16 and loaded through ``ModelRunner`` exactly as
   ``--model DIR`` would: captioning throughput (tiles/s, one prompt per tile, 64 new tokens) for a sweep
   of batch sizes, with peak GPU memory. Random weights rarely emit EOS, so every sequence runs to the
   full 64 tokens: the figures are for a fixed amount of work.

Writes ``gpu_check.json`` to ``--out`` (default ``bench/results``) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsflow.models.runner import ModelRunner  # noqa: E402
from rsflow.models.spec import ModelSpec  # noqa: E402
from rsflow.models.tiny import build_tiny_llava  # noqa: E402

# LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf config, reference models.md 1.1 and 5.3)
LLAVA_7B_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       projection_dim=768)
LLAVA_7B_TEXT = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def _batch(n: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "tile_id": np.array([f"t{i}" for i in range(n)], dtype=object),
        "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "status": np.array(["ok"] * n, dtype=object),
        "error": np.array([None] * n, dtype=object),
    }


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--quick", action="store_true", help="batch sizes 1 and 16 only")
    p.add_argument("--workdir", default="/tmp/rsflow-gpu-check")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir)
    result: dict[str, object] = {
        "gpu": torch.cuda.get_device_name(),
        "versions": {k: _version(k) for k in ("torch", "transformers", "peft", "tokenizers", "flash_attn")},
    }
    print(json.dumps(result, indent=1), flush=True)

    # 1. tiny model, GPU defaults
    tiny = build_tiny_llava(work / "tiny")
    runner = ModelRunner(ModelSpec(model=str(tiny), max_new_tokens=16, batch_size=8), ["caption"])
    batch = _batch(16, 64)
    t = time.perf_counter()
    rows = runner(batch)
    tiny_s = time.perf_counter() - t
    ok = list(rows["status"]).count("ok")
    fp32 = ModelRunner(ModelSpec(model=str(tiny), max_new_tokens=16, batch_size=8, dtype="float32"), ["caption"])
    rows32 = fp32(batch)
    same = sum(a == b for a, b in zip(rows["text"], rows32["text"], strict=True))
    result["tiny"] = {
        "device": str(runner.loaded.device), "dtype": str(runner.loaded.dtype),
        "attn_implementation": runner.loaded.attn_implementation, "rows_ok": ok, "rows": len(rows["status"]),
        "seconds": round(tiny_s, 3), "half_equals_fp32_texts": same,
    }
    print(json.dumps(result["tiny"]), flush=True)
    assert ok == 16, rows["error"]
    del runner, fp32
    torch.cuda.empty_cache()

    # 2. LLaVA-1.5-7B architecture
    t = time.perf_counter()
    big = build_tiny_llava(work / "llava-7b-random", image_size=336, patch_size=14,
                           vision_overrides=LLAVA_7B_VISION, text_overrides=LLAVA_7B_TEXT, dtype="bfloat16",
                           init_device="cuda", card={"kind": "benchmark", "name": "llava-1.5-7b-random"})
    torch.cuda.empty_cache()
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    spec = ModelSpec(model=str(big), max_new_tokens=64, batch_size=1)
    runner = ModelRunner(spec, ["caption"])
    load_s = time.perf_counter() - t
    n_params = sum(p.numel() for p in runner.loaded.model.parameters())
    sweep = []
    sweep_multi: list[dict[str, object]] = []
    for bs in ([1, 16] if args.quick else [1, 8, 16, 32, 48]):
        runner.spec = dataclasses.replace(spec, batch_size=bs)
        runner.batch_size = bs  # the runner resolves its batch size once, at init
        runner(_batch(bs, 336, seed=1))  # warm-up: kernels, allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        n = max(2 * bs, 16)
        t = time.perf_counter()
        rows = runner(_batch(n, 336, seed=2))
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        entry = {
            "batch_size": bs, "tiles": n, "seconds": round(dt, 3), "tiles_per_s": round(n / dt, 3),
            "new_tokens_per_s": round(n * 64 / dt, 1), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "rows_ok": list(rows["status"]).count("ok"),
        }
        sweep.append(entry)
        print(json.dumps(entry), flush=True)
    # 4 prompts per tile (caption + 3 VQA questions): the tile is encoded once and shared by its prompts
    from rsflow.models.prompts import TaskPrompt, task_prompts, vqa_prompt

    questions = ["Is there water in the image?", "Is there a harbour in the image?", "How many ships are there?"]
    multi = [TaskPrompt("caption", task_prompts("caption", "llava")[0], key="")] + [
        TaskPrompt("vqa", vqa_prompt(q), key=q) for q in questions
    ]
    runner.prompts = tuple(multi)
    seen = {"images": 0}
    hook = runner.loaded.model.model.vision_tower.register_forward_hook(
        lambda m, a, o: seen.__setitem__("images", seen["images"] + int(a[0].shape[0]))
    )
    for bs in [32] if args.quick else [16, 32, 48]:
        runner.spec = dataclasses.replace(spec, batch_size=bs)
        runner.batch_size = bs  # the runner resolves its batch size once, at init
        runner(_batch(max(1, bs // 4), 336, seed=1))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        seen["images"] = 0
        n = 32
        t = time.perf_counter()
        rows = runner(_batch(n, 336, seed=3))
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        entry = {
            "batch_size": bs, "tiles": n, "prompts_per_tile": 4, "seconds": round(dt, 3),
            "tiles_per_s": round(n / dt, 3), "prompts_per_s": round(4 * n / dt, 3),
            "vision_tower_images": seen["images"], "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "rows_ok": list(rows["status"]).count("ok"),
        }
        sweep_multi.append(entry)
        print(json.dumps(entry), flush=True)
    hook.remove()
    result["llava_7b"] = {
        "parameters": n_params, "dtype": str(runner.loaded.dtype), "attn_implementation": runner.loaded.attn_implementation,
        "build_and_save_seconds": round(build_s, 1), "load_seconds": round(load_s, 1), "max_new_tokens": 64,
        "image_tokens": 576, "sweep": sweep, "sweep_4_prompts_per_tile": sweep_multi,
    }
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| batch | tiles/s | new tokens/s | peak GiB |\n|---|---|---|---|")
    for e in sweep:
        print(f"| {e['batch_size']} | {e['tiles_per_s']} | {e['new_tokens_per_s']} | {e['peak_gib']} |")
    print("| batch (4 prompts/tile) | tiles/s | prompts/s | vision-tower images for 32 tiles |\n|---|---|---|---|")
    for e in sweep_multi:
        print(f"| {e['batch_size']} | {e['tiles_per_s']} | {e['prompts_per_s']} | {e['vision_tower_images']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
