"""rsflow.models: spec checks, imaging, the tiny checkpoint, load_model and ModelRunner (no Ray).

Everything loads through ``ModelSpec`` -> ``load_model`` / ``ModelRunner`` exactly as
``--model DIR --adapter DIR`` would, on the tiny checkpoint of ``tests/model_fixtures.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
import torch

from rsflow.errors import ModelError, RequestError
from rsflow.models import (
    ModelSpec,
    background_from_processor,
    expand2square,
    model_card,
    model_id,
    model_input_size,
    resolve_adapter,
    resolve_model_dir,
    resolve_prompt_format,
)
from rsflow.models.prompts import TaskPrompt, build_prompt
from rsflow.models.runner import LoadedModel, ModelRunner, _clean_answer, load_model
from rsflow.models.tiny import SMOKE_LM_HEAD_STD, build_tiny_llava, ensure_smoke_model
from tests.model_fixtures import padded_embeddings_copy

RGB = (122, 116, 104)


# --------------------------------------------------------------------------- imaging


def test_expand2square_wide_image_is_centred_vertically() -> None:
    img = np.full((2, 5, 3), 9, dtype=np.uint8)  # H=2, W=5: offset (5-2)//2 = 1 row at the top
    out = expand2square(img, RGB)
    assert out.shape == (5, 5, 3) and out.dtype == np.uint8
    assert (out[0] == RGB).all()
    assert (out[1:3] == 9).all()
    assert (out[3:] == RGB).all()  # the odd extra row goes to the bottom


def test_expand2square_tall_image_is_centred_horizontally() -> None:
    img = np.arange(4 * 2 * 3, dtype=np.uint8).reshape(4, 2, 3)  # H=4, W=2: offset (4-2)//2 = 1 column
    out = expand2square(img, (0, 0, 0))
    assert out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out[:, 1:3], img)
    assert (out[:, 0] == 0).all() and (out[:, 3] == 0).all()


def test_expand2square_odd_offset_by_hand() -> None:
    img = np.full((1, 4, 3), 200, dtype=np.uint8)  # offset (4-1)//2 = 1: rows 0, 2, 3 are background
    out = expand2square(img, (1, 2, 3))
    assert [bool((out[r] == 200).all()) for r in range(4)] == [False, True, False, False]
    assert out[3, 0].tolist() == [1, 2, 3]


def test_expand2square_passes_a_square_on_without_a_copy() -> None:
    """A square chip (every tile of a grid) is the input itself: no copy per tile in a model actor,
    and a read-only view of the object store stays one."""
    img = np.random.default_rng(0).integers(0, 256, (3, 3, 3), dtype=np.uint8)
    img.flags.writeable = False
    out = expand2square(img, RGB)
    assert out is img
    np.testing.assert_array_equal(out, img)


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32)]
)
def test_expand2square_rejects_non_rgb_uint8(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        expand2square(bad, RGB)


def test_background_from_processor_openai_clip_mean() -> None:
    class Proc:
        image_mean = (0.48145466, 0.4578275, 0.40821073)

    assert background_from_processor(Proc()) == (122, 116, 104)


# --------------------------------------------------------------------------- spec


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"model": ""}, "--model"),
        ({"model": "   "}, "--model"),
        ({"model": "m", "adapter": ""}, "--adapter"),
        ({"model": "m", "prompt_format": "vicuna"}, "--prompt-format"),
        ({"model": "m", "image_size": 0}, "--image-size"),
        ({"model": "m", "image_size": 33.5}, "--image-size"),
        ({"model": "m", "dtype": "int8"}, "--dtype"),
        ({"model": "m", "attn_implementation": "flash3"}, "--attn-implementation"),
        ({"model": "m", "max_new_tokens": 0}, "--max-new-tokens"),
        ({"model": "m", "max_new_tokens": True}, "--max-new-tokens"),
        ({"model": "m", "max_new_tokens": 10**6}, "--max-new-tokens"),
        ({"model": "m", "batch_size": 0}, "--batch-size"),
        ({"model": "m", "batch_size": "8"}, "--batch-size"),
    ],
)
def test_bad_spec_values_name_the_flag(kwargs: dict[str, Any], flag: str) -> None:
    with pytest.raises(RequestError, match=f"^{flag}: ") as info:
        ModelSpec(**kwargs)
    assert info.value.field == flag


def test_spec_defaults_and_frozen() -> None:
    spec = ModelSpec(model="llava-hf/llava-1.5-7b-hf")
    assert (spec.adapter, spec.prompt_format, spec.image_size) == (None, None, None)
    assert (spec.dtype, spec.attn_implementation, spec.max_new_tokens, spec.batch_size) == (
        "auto",
        "auto",
        256,  # GeoChat's evaluation: one box is about 20 LLaMA tokens
        None,  # chosen by each replica from its device's free memory (tests/test_auto_batch.py)
    )
    with pytest.raises(AttributeError):
        spec.batch_size = 2  # type: ignore[misc]


def test_resolve_model_dir_local_and_hub(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_model_dir(ModelSpec(model=str(tiny_model_dir))) == str(tiny_model_dir.resolve())
    assert resolve_model_dir(ModelSpec(model="llava-hf/llava-1.5-7b-hf")) == "llava-hf/llava-1.5-7b-hf"
    with pytest.raises(RequestError, match=r"^--model: no such folder"):
        resolve_model_dir(ModelSpec(model=str(tmp_path / "missing")))
    with pytest.raises(RequestError, match=r"^--model: .* has no config.json"):
        resolve_model_dir(ModelSpec(model=str(tmp_path)))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(RequestError, match=r"^--model: .* is a file"):
        resolve_model_dir(ModelSpec(model=str(tmp_path / "weights.bin")))
    # A relative path under an existing local folder is a mistyped path, not a hub id.
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RequestError, match=r"^--model: no such folder 'models/foo'"):
        resolve_model_dir(ModelSpec(model="models/foo"))


def test_resolve_adapter(tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path) -> None:
    assert resolve_adapter(ModelSpec(model=str(tiny_model_dir))) is None
    spec = ModelSpec(model=str(tiny_model_dir), adapter=str(tiny_adapter_dir))
    assert resolve_adapter(spec) == str(tiny_adapter_dir.resolve())
    with pytest.raises(RequestError, match=r"^--adapter: .* has no adapter_config.json"):
        resolve_adapter(ModelSpec(model=str(tiny_model_dir), adapter=str(tmp_path)))
    with pytest.raises(RequestError, match=r"^--adapter: no such folder"):
        load_model(ModelSpec(model=str(tiny_model_dir), adapter=str(tmp_path / "nope")))


def _json_only_copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for path in src.iterdir():
        if path.suffix == ".json":
            shutil.copy(path, dst / path.name)
    return dst


def test_a_hub_id_of_an_original_llava_checkpoint_says_how_to_run_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """GeoChat's published repository is in the LLaVA repository's layout, which rsflow reads from a local
    folder beside its CLIP: the hub id is refused with how to get there, not with a --image-size hint that
    leads nowhere."""
    import rsflow.models.spec as spec_module

    config = {"model_type": "geochat", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
              "mm_projector_type": "mlp2x_gelu"}
    monkeypatch.setattr(spec_module, "_read_json", lambda ref, name: config if name == "config.json" else None)
    with pytest.raises(ModelError, match=r"LLaVA-repository checkpoint \(model_type 'geochat'\).*--vision-tower CLIP_DIR"):
        model_input_size(ModelSpec(model="MBZUAI/geochat-7B"))


def test_model_input_size_reads_config_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = _json_only_copy(tiny_model_dir, tmp_path / "cfg")  # no weights at all
    assert not list(folder.glob("*.safetensors"))
    assert model_input_size(ModelSpec(model=str(folder))) == 64
    assert model_input_size(ModelSpec(model=str(folder), image_size=64)) == 64
    # a size the tower was not built for is refused here, from the JSON, before any work (not by the actors)
    with pytest.raises(RequestError, match=r"^--image-size: 336 px does not match the vision tower's 64 px"):
        model_input_size(ModelSpec(model=str(folder), image_size=336))

    # processor crop size wins over the vision config ...
    proc = json.loads((folder / "processor_config.json").read_text())
    proc["image_processor"]["crop_size"] = {"height": 48, "width": 48}
    (folder / "processor_config.json").write_text(json.dumps(proc))
    assert model_input_size(ModelSpec(model=str(folder))) == 48
    # ... a standalone preprocessor_config.json (llava-hf layout) is read first ...
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"crop_size": 336, "size": {"shortest_edge": 336}})
    )
    assert model_input_size(ModelSpec(model=str(folder))) == 336
    # ... and with no processor files the vision config answers.
    (folder / "processor_config.json").unlink()
    (folder / "preprocessor_config.json").unlink()
    assert model_input_size(ModelSpec(model=str(folder))) == 64


def test_model_card_and_prompt_format(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = ModelSpec(model=str(tiny_model_dir))
    card = model_card(spec)
    assert card["kind"] == "smoke" and card["name"] == "smoke-tiny-llava" and card["prompt_format"] == "llava"
    assert "meaningless" in card["note"]
    assert resolve_prompt_format(spec) == "llava"
    assert resolve_prompt_format(ModelSpec(model=str(tiny_model_dir), prompt_format="rsllava")) == "rsllava"

    folder = _json_only_copy(tiny_model_dir, tmp_path / "geo")
    card["prompt_format"] = "geochat"
    (folder / "rsflow.json").write_text(json.dumps(card))
    assert resolve_prompt_format(ModelSpec(model=str(folder))) == "geochat"
    (folder / "rsflow.json").unlink()
    assert model_card(ModelSpec(model=str(folder))) == {}
    assert resolve_prompt_format(ModelSpec(model=str(folder))) == "llava"
    (folder / "rsflow.json").write_text(json.dumps({"prompt_format": "alpaca"}))
    with pytest.raises(ModelError, match="alpaca"):
        resolve_prompt_format(ModelSpec(model=str(folder)))


def test_model_id(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    base = model_id(ModelSpec(model=str(tiny_model_dir)))
    assert base.startswith("smoke-tiny-llava@") and len(base.split("@")[1]) == 8
    assert base == model_id(ModelSpec(model=str(tiny_model_dir), batch_size=1))  # stable
    with_adapter = model_id(ModelSpec(model=str(tiny_model_dir), adapter=str(tiny_adapter_dir)))
    assert with_adapter.startswith(base + "+adapter=adapter@")
    assert model_id(ModelSpec(model="llava-hf/llava-1.5-7b-hf", adapter="org/lora")) == (
        "llava-hf/llava-1.5-7b-hf+adapter=org/lora"
    )


# --------------------------------------------------------------------------- tiny checkpoint


def test_tiny_build_is_deterministic(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_llava(tmp_path / "again", seed=0)
    other = build_tiny_llava(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()


def test_tiny_checkpoint_layout(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    config = json.loads((tiny_model_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert [tok.convert_ids_to_tokens(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert config["image_token_index"] == tok.convert_tokens_to_ids("<image>")
    assert config["text_config"]["pad_token_id"] == tok.pad_token_id == tok.convert_tokens_to_ids("<pad>")
    assert config["text_config"]["vocab_size"] == len(tok)
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (-2, "default")
    assert config["projector_hidden_act"] == "gelu"
    ids = tok("héllo, 東京 harbor")["input_ids"]
    assert ids[0] == 1  # BOS prepended
    assert tok.decode(ids, skip_special_tokens=True) == "héllo, 東京 harbor"  # byte fallback round-trips


def test_ensure_smoke_model_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RSFLOW_CACHE", str(tmp_path / "cache"))
    first = ensure_smoke_model()
    assert first == tmp_path / "cache" / "models" / "smoke-tiny-llava-v3"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_smoke_model() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    assert resolve_model_dir(ModelSpec(model="smoke")) == str(first)
    assert model_id(ModelSpec(model="smoke")).startswith("smoke-tiny-llava@")
    assert ensure_smoke_model(tmp_path / "other") == tmp_path / "other" / "models" / "smoke-tiny-llava-v3"


def test_ensure_smoke_model_concurrent_builders_agree(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=3) as pool:
        paths = list(pool.map(lambda _: ensure_smoke_model(tmp_path), range(3)))
    assert len(set(paths)) == 1
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["smoke-tiny-llava-v3"]  # losers cleaned up
    reference = build_tiny_llava(tmp_path / "reference", lm_head_std=SMOKE_LM_HEAD_STD)
    assert (paths[0] / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_lm_head_std_redraws_only_the_head(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    wide = load_file(str(build_tiny_llava(tmp_path / "wide", lm_head_std=0.16) / "model.safetensors"))
    default = load_file(str(tiny_model_dir / "model.safetensors"))
    assert wide.keys() == default.keys()
    changed = {k for k in wide if not torch.equal(wide[k], default[k])}
    (head,) = changed  # saved as language_model.lm_head.weight (transformers 5 LLaVA layout)
    assert head.endswith("lm_head.weight")
    assert float(wide[head].std()) == pytest.approx(0.16, rel=0.05)
    assert float(default[head].std()) == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ValueError, match="lm_head_std"):
        build_tiny_llava(tmp_path / "bad", lm_head_std=0.0)


def test_ensure_smoke_model_refuses_a_foreign_folder(tmp_path: Path) -> None:
    target = tmp_path / "models" / "smoke-tiny-llava-v3"
    target.mkdir(parents=True)
    (target / "junk.txt").write_text("x")
    with pytest.raises(ModelError, match="not a complete smoke checkpoint"):
        ensure_smoke_model(tmp_path)
    assert sorted(p.name for p in target.parent.iterdir()) == ["smoke-tiny-llava-v3"]


# --------------------------------------------------------------------------- load_model


def test_load_model_resolves_auto_settings(tiny_model_dir: Path) -> None:
    loaded = load_model(ModelSpec(model=str(tiny_model_dir)), device="cpu")
    assert isinstance(loaded, LoadedModel)
    assert loaded.device == torch.device("cpu")
    assert loaded.dtype == torch.float32
    assert loaded.attn_implementation == "sdpa"
    assert (loaded.prompt_format, loaded.image_size) == ("llava", 64)
    assert loaded.tokenizer.padding_side == "left"
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32


def test_load_model_rejects_what_cpu_cannot_do(tiny_model_dir: Path) -> None:
    with pytest.raises(RequestError, match=r"^--attn-implementation: flash_attention_2 needs a CUDA"):
        load_model(
            ModelSpec(model=str(tiny_model_dir), attn_implementation="flash_attention_2"), device="cpu"
        )
    with pytest.raises(RequestError, match=r"^--image-size: 336 px does not match the vision tower's 64 px"):
        load_model(ModelSpec(model=str(tiny_model_dir), image_size=336), device="cpu")


def test_load_model_broken_weights_is_model_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = _json_only_copy(tiny_model_dir, tmp_path / "broken")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="cannot load --model"):
        load_model(ModelSpec(model=str(folder)), device="cpu")


def _logits(loaded: LoadedModel) -> torch.Tensor:
    image = np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    inputs = loaded.processor(
        images=[image], text=[build_prompt("llava", "Describe the image in detail.")], return_tensors="pt"
    )
    with torch.inference_mode():
        return loaded.model(**inputs).logits


def test_adapter_is_merged_and_changes_logits(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    base = load_model(ModelSpec(model=str(tiny_model_dir)), device="cpu")
    tuned = load_model(ModelSpec(model=str(tiny_model_dir), adapter=str(tiny_adapter_dir)), device="cpu")
    assert type(tuned.model) is LlavaForConditionalGeneration  # merged: no PEFT wrapper left
    assert not any("lora" in name for name, _ in tuned.model.named_parameters())
    diff = (_logits(base) - _logits(tuned)).abs().max().item()
    assert diff > 1e-3
    # The vision tower is not a target: its weights are untouched.
    for (name, p), (_, q) in zip(
        base.model.model.vision_tower.named_parameters(),
        tuned.model.model.vision_tower.named_parameters(),
        strict=True,
    ):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(("config", "expected"), [
    ({"dtype": "bfloat16"}, torch.bfloat16),  # a checkpoint saved in bfloat16
    ({"torch_dtype": "float16"}, torch.float16),  # the published LLaVA-1.5 / GeoChat / RS-LLaVA weights
    ({"text_config": {"torch_dtype": "bfloat16"}}, torch.bfloat16),
    ({"dtype": "float32"}, torch.float16),
    ({}, torch.float16),
])
def test_dtype_auto_on_a_gpu_keeps_the_checkpoint_half_precision(tmp_path: Path, config: dict, expected) -> None:
    """``--dtype auto`` on CUDA was always bfloat16: it re-rounded the published float16 weights (their
    evaluations ran in float16) and kept about 40 % of a typical LoRA change merged into them."""
    from rsflow.models.runner import _resolve_dtype

    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = ModelSpec(model=str(tmp_path))
    assert _resolve_dtype(spec, torch.device("cuda"), str(tmp_path)) == expected
    assert _resolve_dtype(spec, torch.device("cpu"), str(tmp_path)) == torch.float32
    assert _resolve_dtype(ModelSpec(model=str(tmp_path), dtype="bfloat16"), torch.device("cuda"), str(tmp_path)) == torch.bfloat16


def test_an_adapter_whose_weights_fit_no_layer_is_refused(tiny_model_dir: Path, tiny_adapter_dir: Path,
                                                          tmp_path: Path) -> None:
    """peft loads a LoRA whose tensor names fit no layer (here: the original LLaVA repository's
    ``model.layers...`` names in a peft folder, as an RS-LLaVA adapter without its config.json reads) with
    one UserWarning and its factors at their initial values: the merge changed nothing while every row
    named the adapter. It is refused now, as a single --adapter and as a named adapter."""
    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "repo-layout"
    shutil.copytree(tiny_adapter_dir, renamed)
    weights = load_file(renamed / "adapter_model.safetensors")
    assert any("language_model." in k for k in weights)
    save_file({k.replace("model.language_model.", "model."): v for k, v in weights.items()},
              renamed / "adapter_model.safetensors")
    with pytest.raises(ModelError, match=r"^--adapter .*repo-layout.*: its LoRA weights do not fit the model's layers"):
        load_model(ModelSpec(model=str(tiny_model_dir), adapter=str(renamed)), device="cpu")
    for named in ((("water", str(renamed)),), (("ok", str(tiny_adapter_dir)), ("water", str(renamed)))):
        with pytest.raises(ModelError, match=r"^adapter 'water' .*: its LoRA weights do not fit"):
            load_model(ModelSpec(model=str(tiny_model_dir), adapters=named), device="cpu")


# --------------------------------------------------------------------------- ModelRunner


def _images(n: int, seed: int = 0, shape: tuple[int, int] = (48, 64)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape, 3), dtype=np.uint8)


def _batch(images: Any, status: list[str], error: list[str | None] | None = None) -> dict[str, Any]:
    n = len(status)
    batch: dict[str, Any] = {
        "tile_id": np.array([f"tile-{i}" for i in range(n)], dtype=object),
        "image": images,
        "status": np.array(status, dtype=object),
        "bounds_px": np.arange(n * 4, dtype=np.int64).reshape(n, 4),
        "item_id": np.array([f"S2A_{i}" for i in range(n)]),
    }
    if error is not None:
        batch["error"] = np.array(error, dtype=object)
    return batch


# Three prompts per tile, of three different token lengths on the tiny checkpoint (49, 51 and 50
# tokens with the image): the fallback test relies on the order the runner sorts them in.
PROMPTS = [
    TaskPrompt("caption", "Describe the image in detail.", key=""),
    TaskPrompt("vqa", "How many boats?", key="boats"),
    TaskPrompt("vqa", "Is there water?", key="water"),
]


@pytest.fixture(scope="module")
def runner(tiny_model_dir: Path) -> ModelRunner:
    return ModelRunner(ModelSpec(model=str(tiny_model_dir), max_new_tokens=8, batch_size=4), PROMPTS)


def test_runner_rows_statuses_and_passthrough(runner: ModelRunner) -> None:
    status = ["ok", "skipped", "ok", "failed"]
    error = [None, "no data in window", None, "RasterioIOError: boom"]
    batch = _batch(_images(4), status, error)
    out = runner(batch)

    n_prompts = 3  # caption (1) + vqa (2)
    assert runner.prompts == tuple(PROMPTS)
    assert set(out) == {
        "tile_id",
        "status",
        "error",
        "bounds_px",
        "item_id",
        "task",
        "prompt",
        "prompt_key",
        "region_id",
        "text",
        "model_id",
        "stage",
        "infer_seconds",
        "prompt_index",
        "answer_cut",
    }
    assert all(len(v) == 4 * n_prompts for v in out.values())
    # rows the model ran are marked "infer"; passed-through rows keep no stage of their own here
    assert out["stage"].tolist() == [
        ("infer" if s == "ok" else None) for s in status for _ in range(n_prompts)
    ]
    assert all((t > 0) == (s == "ok") for t, s in zip(out["infer_seconds"], out["status"], strict=True))
    assert out["tile_id"].tolist() == [f"tile-{i}" for i in range(4) for _ in range(n_prompts)]
    assert out["prompt_index"].tolist() == list(range(n_prompts)) * 4
    np.testing.assert_array_equal(out["bounds_px"], np.repeat(batch["bounds_px"], n_prompts, axis=0))
    assert out["bounds_px"].dtype == np.int64 and out["item_id"].dtype == batch["item_id"].dtype
    assert out["task"].tolist() == ["caption", "vqa", "vqa"] * 4
    assert out["prompt_key"].tolist() == ["", "boats", "water"] * 4
    assert out["region_id"].tolist() == [None] * 12
    assert (
        out["prompt"].tolist() == ["Describe the image in detail.", "How many boats?", "Is there water?"] * 4
    )
    assert out["status"].tolist() == [s for s in status for _ in range(n_prompts)]
    assert out["error"].tolist() == [e for e in error for _ in range(n_prompts)]
    for col in ("task", "prompt", "prompt_key", "region_id", "text", "status", "error", "model_id"):
        assert out[col].dtype == object, col
    texts = out["text"].tolist()
    for i, s in enumerate(out["status"]):
        assert (texts[i] is None) == (s != "ok")
        if s == "ok":
            assert isinstance(texts[i], str) and texts[i] == texts[i].strip()
    assert set(out["model_id"]) == {runner.loaded.model_id}
    assert "image" not in out


def test_runner_without_error_column(runner: ModelRunner) -> None:
    out = runner(_batch(_images(1), ["skipped"]))
    assert out["error"].tolist() == [None] * 3 and out["text"].tolist() == [None] * 3


def test_runner_is_deterministic_across_loads(runner: ModelRunner, tiny_model_dir: Path) -> None:
    batch = _batch(_images(3, seed=3), ["ok"] * 3)
    other = ModelRunner(ModelSpec(model=str(tiny_model_dir), max_new_tokens=8, batch_size=1), PROMPTS)
    first, second = runner(batch)["text"].tolist(), other(batch)["text"].tolist()
    assert first == second  # same greedy answers, whatever the batch size and padding
    assert any(first)


def test_runner_adapter_changes_text(
    runner: ModelRunner, tiny_model_dir: Path, tiny_adapter_dir: Path
) -> None:
    spec = ModelSpec(model=str(tiny_model_dir), adapter=str(tiny_adapter_dir), max_new_tokens=8, batch_size=4)
    tuned = ModelRunner(spec, PROMPTS)
    batch = _batch(_images(2, seed=5), ["ok", "ok"])
    assert runner(batch)["text"].tolist() != tuned(batch)["text"].tolist()
    assert tuned(batch)["model_id"][0].startswith(runner.loaded.model_id + "+adapter=")


def test_runner_bad_image_fails_alone(runner: ModelRunner) -> None:
    good = _images(2, seed=9)
    images = np.empty(3, dtype=object)  # variable shapes arrive as an object column
    images[0], images[1], images[2] = good[0], np.zeros((64, 64), np.uint8), good[1]
    out = runner(_batch(images, ["ok", "ok", "ok"]))
    assert out["status"].tolist() == ["ok"] * 3 + ["failed"] * 3 + ["ok"] * 3
    assert all(e.startswith("ValueError: image must be an HxWx3 uint8 array") for e in out["error"][3:6])
    assert all(isinstance(t, str) for t in out["text"][[0, 1, 2, 6, 7, 8]])
    assert out["text"][3:6].tolist() == [None] * 3


def _prompt_length(runner: ModelRunner, question: str) -> int:
    """Token count of one prompt with its image, as the processor makes it."""
    inputs = runner.loaded.processor(
        images=[np.zeros((64, 64, 3), np.uint8)],
        text=[build_prompt(runner.loaded.prompt_format, question)],
    )
    return len(inputs["input_ids"][0])


def test_runner_generate_failure_retries_item_by_item(
    runner: ModelRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = runner.loaded.model
    real_generate = model.generate
    lengths = [_prompt_length(runner, p.prompt) for p in PROMPTS]
    assert lengths == [49, 51, 50]  # 16 image tokens each; sorted: caption < water < boats
    poison = lengths[2]  # "Is there water?" is the prompt that breaks generate
    calls: list[int] = []

    def flaky_generate(*args: Any, **kwargs: Any) -> Any:
        mask = kwargs["attention_mask"]
        calls.append(int(mask.shape[0]))
        if (mask.sum(dim=1) == poison).any():
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real_generate(*args, **kwargs)

    images = _images(3, seed=11, shape=(64, 64))
    expected = runner(_batch(images, ["ok"] * 3))["text"].tolist()
    monkeypatch.setattr(model, "generate", flaky_generate)
    out = runner(_batch(images, ["ok"] * 3))
    # 9 prompts sorted by length, batch_size 4: [3 caption + 1 water (poisoned) -> 4 singles],
    # [2 water + 2 boats (poisoned) -> 4 singles], [1 boats]
    assert calls == [4, 1, 1, 1, 1, 4, 1, 1, 1, 1, 1]
    assert out["status"].tolist() == ["ok", "ok", "failed"] * 3
    assert out["error"].tolist() == [None, None, "RuntimeError: CUDA error: device-side assert triggered"] * 3
    texts = out["text"].tolist()
    assert texts[2::3] == [None] * 3
    keep = [i for i in range(9) if i % 3 != 2]
    assert [texts[i] for i in keep] == [expected[i] for i in keep]  # the retry gives the same answers


def test_runner_encoding_failure_fails_that_tile_only(
    runner: ModelRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = runner.loaded.model
    real_features = model.get_image_features
    calls: list[int] = []

    def flaky_features(*args: Any, **kwargs: Any) -> Any:
        pixels = kwargs["pixel_values"]
        calls.append(int(pixels.shape[0]))
        if (pixels[:, 0].flatten(1).std(dim=1) < 1e-3).any():  # a flat image is "poison"
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real_features(*args, **kwargs)

    images = _images(3, seed=11, shape=(64, 64))
    expected = runner(_batch(images, ["ok"] * 3))["text"].tolist()
    images[1] = 0
    monkeypatch.setattr(model, "get_image_features", flaky_features)
    out = runner(_batch(images, ["ok"] * 3))
    assert calls == [3, 1, 1, 1]  # the three tiles at once, then one by one
    assert out["status"].tolist() == ["ok"] * 3 + ["failed"] * 3 + ["ok"] * 3
    assert out["error"][3:6].tolist() == ["RuntimeError: CUDA error: device-side assert triggered"] * 3
    assert out["stage"].tolist() == ["infer"] * 9
    texts = out["text"].tolist()
    assert texts[3:6] == [None] * 3
    assert texts[:3] == expected[:3] and texts[6:] == expected[6:]


def test_runner_rejects_unknown_task_before_loading(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rsflow.models.runner as runner_module

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights loaded before the tasks were checked")

    monkeypatch.setattr(runner_module, "load_model", no_load)
    with pytest.raises(RequestError, match=r"^--tasks: unknown task 'segment'"):
        ModelRunner(ModelSpec(model=str(tiny_model_dir)), ["caption", "segment"])
    with pytest.raises(RequestError, match=r"^--tasks"):
        ModelRunner(ModelSpec(model=str(tiny_model_dir)), [])


def test_runner_missing_column_is_a_bug_not_a_row(runner: ModelRunner) -> None:
    batch = _batch(_images(1), ["ok"])
    del batch["status"]
    with pytest.raises(ValueError, match="'status'"):
        runner(batch)


def test_clean_answer() -> None:
    assert _clean_answer("  A harbor with ships.</s>  ") == "A harbor with ships."
    assert _clean_answer(" Yes </s>") == "Yes"
    assert _clean_answer("</s>") == ""


@pytest.mark.parametrize("ends", [True, False], ids=["ends", "runs-on"])
def test_an_answer_stopped_by_max_new_tokens_is_marked_cut(ends: bool, tiny_model_dir: Path, tmp_path: Path) -> None:
    """``answer_cut`` says whether generation stopped at ``max_new_tokens`` rather than at end-of-sequence,
    and the result row's parse_error says it may be cut short (a detection's later boxes never written).
    The checkpoint's generation config leaves end-of-sequence as the only choice, or suppresses it."""
    from rsflow.interpret import ANSWER_CUT_NOTE, interpret_row

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    vocab = int(config["text_config"]["vocab_size"])
    eos = int(generation["eos_token_id"])
    generation["suppress_tokens"] = [i for i in range(vocab) if i != eos] if ends else [eos]
    (folder / "generation_config.json").write_text(json.dumps(generation))

    out = ModelRunner(ModelSpec(model=str(folder), max_new_tokens=4, batch_size=4), PROMPTS)(_batch(_images(2), ["ok", "ok"]))
    assert out["answer_cut"].dtype == bool and list(out["answer_cut"]) == [not ends] * 6
    assert all(t == "" for t in out["text"]) if ends else all(t for t in out["text"])
    row = {k: v[1] for k, v in out.items()}
    row.update(crs="EPSG:32618", col_off=0, row_off=0, width=64, height=64, res=10.0, collection="c",
               transform=[10.0, 0.0, 500000.0, 0.0, -10.0, 4200000.0], nodata_fraction=0.0,
               footprint_wkb=shapely.to_wkb(shapely.box(-75.0, 37.0, -74.99, 37.01)))
    note = interpret_row(row)[0]["parse_error"]
    assert (note is not None and ANSWER_CUT_NOTE in note) is (not ends)


def test_rows_past_the_tokenizer_and_the_image_token_are_never_generated(tiny_model_dir: Path,
                                                                         tmp_path: Path) -> None:
    """A transformers-format checkpoint whose embeddings have rows no token has (llava-hf pads them to
    32,064 with random draws) and whose generation config suppresses nothing: those rows and <image>
    are kept out of greedy decoding, so the answers are the model's own. Here the extra rows are made
    to win every step (+-1000x the EOS row: one of them tops any other logit)."""
    folder, n_tokens = padded_embeddings_copy(tiny_model_dir, tmp_path / "padded", extra=8)
    spec = ModelSpec(model=str(folder), max_new_tokens=8, batch_size=4)
    loaded = load_model(spec, device="cpu")
    suppressed = set(loaded.model.generation_config.suppress_tokens)
    assert {*range(n_tokens, n_tokens + 8), int(loaded.model.config.image_token_index)} <= suppressed
    assert int(loaded.model.generation_config.eos_token_id) not in suppressed
    images = _images(2)
    want = ModelRunner(ModelSpec(model=str(tiny_model_dir), max_new_tokens=8, batch_size=4), PROMPTS)(
        _batch(images, ["ok", "ok"]))
    got = ModelRunner(spec, PROMPTS)(_batch(images, ["ok", "ok"]))
    assert list(got["text"]) == list(want["text"]) and all(t for t in want["text"])
