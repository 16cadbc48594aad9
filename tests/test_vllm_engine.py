"""``--engine vllm`` (rsflow/models/vllm_engine.py) on a CPU, without vLLM.

vLLM itself never runs here (no GPU): these tests check the refusals, what the stages around Ray's
vLLM engine stage feed it (prompt text, token ids, padded image, sampling), and that the rows coming
out have exactly ModelRunner's columns. Ray's own ``wrap_preprocess``/``wrap_postprocess`` are used
so that the error-row bypass is Ray's, not a re-implementation.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from rsflow.cli import main
from rsflow.errors import RequestError
from rsflow.models import vllm_engine as V
from rsflow.models.formats import llava_chunked_ids
from rsflow.models.imaging import background_from_processor, expand2square
from rsflow.models.prompts import IMAGE_TOKEN, TaskPrompt, build_prompt
from rsflow.models.runner import ModelRunner
from rsflow.models.slots import _objects
from rsflow.models.spec import ModelSpec
from tests.model_fixtures import padded_embeddings_copy

_real_find_spec = importlib.util.find_spec


def _vllm(monkeypatch: pytest.MonkeyPatch, *, installed: bool) -> None:
    """Make ``find_spec("vllm")`` answer as if vLLM were (not) installed; other names unchanged."""

    def find_spec(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "vllm":
            return object() if installed else None
        return _real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_engine_vllm_without_vllm_exits_2_with_the_install_line_before_anything_else(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    _vllm(monkeypatch, installed=False)
    searched: list[object] = []
    monkeypatch.setattr("rsflow.pipeline.search_items", lambda *a, **k: searched.append(a))
    missing = str(tmp_path / "no-such-catalog.json")
    argv = ["region", "--engine", "vllm", "--stac", missing, "--bbox", "0,0,1,1", "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    # The engine is checked first: a bad --stac in the same command is not what it complains about.
    assert err == "rsflow region: error: --engine: " + V.VLLM_INSTALL
    assert "pip install -e '.[vllm]' in the rsflow checkout" in err and "--stac" not in err
    assert not searched and not (tmp_path / "out").exists()
    # With vLLM importable the same command gets as far as --stac (still nothing searched).
    _vllm(monkeypatch, installed=True)
    assert main(argv) == 2
    assert "--stac" in capsys.readouterr().err and not searched


def test_unknown_engine_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["region", "--engine", "tgi"])
    assert exc.value.code == 2 and "--engine" in capsys.readouterr().err


def test_run_region_refuses_vllm_before_search(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from rsflow.pipeline import run_region
    from rsflow.request import parse_request

    request = parse_request(
        bbox="-75.7,37.64,-75.66,37.67", output=str(tmp_path / "out"), model=ModelSpec(model="noop")
    )
    assert request.engine == "transformers" and request.to_json()["engine"] == "transformers"
    monkeypatch.setattr("rsflow.pipeline.search_items", lambda *a, **k: pytest.fail("searched"))
    request = dataclasses.replace(request, engine="vllm")  # e.g. a monitor built it without parse_request
    _vllm(monkeypatch, installed=False)
    with pytest.raises(RequestError, match=r"--engine: vllm is not installed"):
        run_region(request)
    _vllm(monkeypatch, installed=True)
    with pytest.raises(RequestError, match=r"--engine: the no-op model"):
        run_region(request)


def test_models_vllm_cannot_load_are_refused_with_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setattr(V, "describe_original_checkpoint", lambda spec: {"format": "llava-repo"})
    refused = r"--engine: .*transformers-format.*rsflow convert /ckpt/geochat DST"
    with pytest.raises(RequestError, match=refused):
        V.check_vllm_spec(ModelSpec(model="/ckpt/geochat"))
    monkeypatch.undo()
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "modules_to_save": ["multi_modal_projector"]})
    )
    with pytest.raises(RequestError, match=r"--adapter: .*modules_to_save.*merge"):
        V.check_vllm_spec(ModelSpec(model="smoke", adapter=str(adapter)))


def test_a_checkpoint_in_transformers_5s_layout_is_refused_and_the_llava_hf_layout_accepted(tmp_path) -> None:
    """vLLM 0.29's LLaVA loads the CLIP tower as ``vision_tower.vision_model.*`` (the published llava-hf
    checkpoints); transformers 5 saves it as ``vision_tower.embeddings...`` and vLLM fails when its engine
    starts (seen on vLLM's CPU build). The driver refuses it before any work. ``write_llava_hf_layout``
    (what ``rsflow convert``, stage 1's export and the smoke and demo builds apply) renames the tensors of a sharded save in place:
    the folder then passes, and transformers loads it to the same tensors."""
    import torch
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    from rsflow.models.formats import write_llava_hf_layout
    from rsflow.models.spec import resolve_model_dir

    smoke = Path(resolve_model_dir(ModelSpec(model="smoke")))
    V.check_vllm_spec(ModelSpec(model="smoke"))  # rsflow's own builds (smoke, demo) write the llava-hf names
    V.check_vllm_spec(ModelSpec(model="demo"))
    model = LlavaForConditionalGeneration.from_pretrained(smoke, dtype=torch.float32)
    fresh = LlavaForConditionalGeneration(model.config)  # saved as built, not as loaded: transformers 5's layout
    fresh.load_state_dict(model.state_dict())
    sharded = tmp_path / "sharded"
    fresh.save_pretrained(sharded, max_shard_size="300KB")
    for name in ("config.json", "generation_config.json"):
        assert (sharded / name).is_file()
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    with pytest.raises(RequestError, match=r"--engine: vLLM cannot load .*sharded: its vision tower is saved as "
                                           r"'vision_tower\.embeddings.*llava-hf layout"):
        V.check_vllm_spec(ModelSpec(model=str(sharded)))
    renamed = write_llava_hf_layout(sharded)
    names = []
    for shard in shards:
        with safe_open(str(shard), "pt") as f:  # still a valid safetensors file
            names += list(f.keys())
    tower = [n for n in names if n.startswith("vision_tower.")]
    assert renamed == len(tower) > 0 and all(n.startswith("vision_tower.vision_model.") for n in tower)
    V.check_vllm_spec(ModelSpec(model=str(sharded)))
    assert write_llava_hf_layout(sharded) == 0  # already in that layout
    a = model.state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(sharded, dtype=torch.float32).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_cluster_without_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _vllm(monkeypatch, installed=True)
    with pytest.raises(RequestError, match=r"--engine: vllm runs on GPUs and this Ray cluster has none"):
        V.add_vllm_stage(None, spec=ModelSpec(model="smoke"), prompts=["caption"], actors=1, gpus=0)


def test_adapter_becomes_an_unmerged_lora_request(tmp_path) -> None:
    adapter = tmp_path / "lora"
    adapter.mkdir()
    config = {"peft_type": "LORA", "r": 12, "target_modules": ["q_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    spec = ModelSpec(model="smoke", adapter=str(adapter), dtype="auto", batch_size=4)
    plan = V.plan_vllm(spec, ["caption"])
    assert plan.lora_for(None) == str(adapter.resolve()) != plan.model_source
    config = V.processor_config(spec, plan, actors=2, max_actors=4, resources={"rsflow_gpu_node": 0.001})
    engine = config["engine_kwargs"]
    assert engine["enable_lora"] is True and engine["max_lora_rank"] == 16 and engine["max_loras"] == 1
    assert engine["dtype"] == "float16"  # the transformers engine's choice on a GPU for a float32 checkpoint,
    # not vLLM's "auto" (float32)
    assert config["concurrency"] == (2, 4) and config["should_continue_on_error"] is True
    assert not config["chat_template_stage"] and not config["tokenize_stage"]
    # the detokenizer's actors hold no CPU: with one each, engine + detokenizer held a 2-CPU Ray's CPUs and
    # the reads never started (found running vLLM's CPU build)
    assert config["detokenize_stage"] == {"enabled": True, "num_cpus": 0}
    assert config["placement_group_config"]["bundle_per_worker"] == {"CPU": 1, "GPU": 1, "rsflow_gpu_node": 0.001}
    from ray.data.llm import DetokenizeStageConfig, vLLMEngineProcessorConfig

    vLLMEngineProcessorConfig(**config)  # the installed Ray accepts it
    assert DetokenizeStageConfig(**config["detokenize_stage"]).num_cpus == 0


def _tiles() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (64, 40, 3), dtype=np.uint8), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
              np.zeros((64, 64, 3), dtype=np.uint8), rng.integers(0, 256, (30, 64, 3), dtype=np.uint8)]
    return {
        "tile_id": _objects(["t0", "t1", "t2", "t3"]),
        "image": _objects(images),
        "status": _objects(["ok", "ok", "skipped", "ok"]),
        "error": _objects([None, None, "nodata 0.9", None]),
        "stage": _objects(["read", "read", "read", "read"]),
        "item_id": _objects(["i", "i", "i", "j"]),
        "region_boxes": _objects([[["r1", 10, 10, 50, 50], ["bad", 1.5, 0, 2, 2]], [], None, [["r2", 0, 0, 100, 100]]]),
    }


_PROMPTS = [TaskPrompt("caption", "Describe the image in detail.", key=""),
            TaskPrompt("vqa", "Is there water?\nAnswer the question using a single word or phrase.", key="water")]


def test_preprocess_feeds_the_prompts_and_padded_images_the_transformers_runner_feeds() -> None:
    from transformers import AutoProcessor

    spec = ModelSpec(model="smoke", prompt_format="geochat")
    plan = V.plan_vllm(spec, _PROMPTS)
    processor = AutoProcessor.from_pretrained(plan.model_source, backend="pil")
    background = background_from_processor(processor.image_processor)  # what ModelRunner pads with
    assert plan.background == background and plan.aspect == "pad"
    batch = _tiles()
    rows = V.expand_batch(batch, plan=plan)
    n = len(rows["tile_id"])
    for i in range(n):
        row = {k: rows[k][i] for k in rows}
        fields = V.preprocess_row(dict(row), plan=plan)
        if not row["_vllm_run"]:
            assert fields["__inference_error__"] == V.PASS_THROUGH and "multimodal_data" not in fields
            continue
        tile = int(row["tile_id"][1:])
        text = build_prompt("geochat", row["prompt"])
        assert fields["prompt"] == text and fields["_vllm_user_prompt"] == row["prompt"]
        expected = expand2square(batch["image"][tile], background)
        image = fields["multimodal_data"]["image"]
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), expected)
        # One <image> id that vLLM expands; expanded, the ids ModelRunner builds (llava_chunked_ids).
        ids = fields["tokenized_prompt"]
        assert ids.count(plan.image_token_id) == 1
        tokenizer = processor.tokenizer
        n_features = 16
        spliced = []
        for t in ids:
            spliced += [t] * n_features if t == plan.image_token_id else [t]
        assert spliced == llava_chunked_ids(tokenizer, text, plan.image_token_id, n_features)
        suppressed = {i: V.SUPPRESS_BIAS for i in V.suppressed_ids(plan.model_source)}
        assert plan.image_token_id in suppressed
        assert fields["sampling_params"] == {"temperature": 0.0, "max_tokens": spec.max_new_tokens, "detokenize": False,
                                             "logit_bias": suppressed}
        assert fields["model"] == plan.model_source  # no adapter: not a LoRA request
    # The malformed region fails alone; the skipped tile and the image-less row do not reach the engine.
    by_key = {(r, k): i for i, (r, k) in enumerate(zip(rows["tile_id"], rows["prompt_key"], strict=True))}
    bad = by_key[("t0", "bad")]
    assert rows["status"][bad] == "failed" and "integer" in rows["error"][bad] and not rows["_vllm_run"][bad]
    assert not rows["_vllm_run"][by_key[("t2", "")]] and rows["status"][by_key[("t2", "")]] == "skipped"


def test_output_columns_and_rows_are_those_of_model_runner() -> None:
    from ray.llm._internal.batch.stages.base import wrap_postprocess, wrap_preprocess

    batch = _tiles()
    reference = ModelRunner(ModelSpec(model="noop"), _PROMPTS)(dict(batch))  # empty answers, geochat family
    plan = V.plan_vllm(ModelSpec(model="smoke", prompt_format="geochat"), _PROMPTS)
    preprocess = wrap_preprocess(functools.partial(V.preprocess_row, plan=plan), "__data")
    postprocess = wrap_postprocess(functools.partial(V.postprocess_row, plan=plan), "__data", include_error_column=True)
    limit = dict(plan.sampling_params)["max_tokens"]
    assert 5 not in plan.eos_token_ids
    expanded = V.expand_batch(dict(batch), plan=plan)
    out_rows = []
    for i in range(len(expanded["tile_id"])):
        data = preprocess({k: expanded[k][i] for k in expanded})["__data"]
        if not data.get("__inference_error__"):  # what Ray's vLLMEngineStage and DetokenizeStage leave
            for key in ("tokenized_prompt", "multimodal_data", "sampling_params"):
                data.pop(key)
            if data["tile_id"] == "t3" and data["prompt_key"] == "r2":
                data.update(generated_text="", time_taken_llm=-1, __inference_error__="RuntimeError: CUDA error")
            elif data["tile_id"] == "t1" and data["prompt_key"] == "":  # stopped by max_tokens, not by EOS
                data.update(generated_text="", generated_tokens=[5] * limit, time_taken_llm=0.5, __inference_error__="")
            else:
                data.update(generated_text="", generated_tokens=[2], time_taken_llm=0.5, __inference_error__="")
        out_rows.append(postprocess({"__data": data}))
    keys = list(dict.fromkeys(k for r in out_rows for k in r))
    finished = V.finish_batch({k: _objects([r.get(k) for r in out_rows]) for k in keys})

    assert set(finished) == set(reference)
    cut = [(t, k) for t, k, c in zip(finished["tile_id"], finished["prompt_key"], finished["answer_cut"], strict=True)
           if c]
    assert cut == [("t1", "")] and finished["answer_cut"].dtype == bool
    for column in reference:
        if column in ("model_id", "infer_seconds", "answer_cut"):
            continue
        got, want = list(finished[column]), list(reference[column])
        if column == "status" or column == "error" or column == "text":
            failed = [i for i, (t, k) in enumerate(zip(finished["tile_id"], finished["prompt_key"], strict=True))
                      if (t, k) == ("t3", "r2")]
            for i in failed:  # the request the engine failed: a failed row with the engine's message
                assert (finished["status"][i], finished["error"][i], finished["text"][i]) == (
                    "failed", "RuntimeError: CUDA error", None)
                got[i] = want[i]
        assert got == want, column
    assert set(finished["model_id"]) == {plan.model_id_for(None)}
    ok = finished["status"] == "ok"
    assert np.all(finished["infer_seconds"][ok & (finished["stage"] == "infer")] == 0.5)
    assert np.all(finished["infer_seconds"][~ok] == 0.0)
    assert IMAGE_TOKEN not in "".join(str(p) for p in finished["prompt"])  # the user text, not the template


def test_vllm_requests_keep_out_the_ids_the_transformers_engine_suppresses(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint whose embeddings have rows no token has (llava-hf's 32,064) and a generation config
    that suppresses nothing: each vLLM request carries a logit_bias at vLLM's floor on exactly the ids
    the transformers engine suppresses (<image>, <pad>, the extra rows), never on end-of-sequence. With
    more than vLLM's GPU runner takes, none is sent (a request would fail) and the run says so."""
    from rsflow.models.runner import load_model

    folder, n_tokens = padded_embeddings_copy(tiny_model_dir, tmp_path / "padded", extra=8)
    spec = ModelSpec(model=str(folder))
    runner_side = set(load_model(spec, device="cpu").model.generation_config.suppress_tokens)
    plan = V.plan_vllm(spec, _PROMPTS)
    bias = dict(dict(plan.sampling_params)["logit_bias"])
    assert set(bias) == runner_side and set(bias.values()) == {-100.0}
    assert {*range(n_tokens, n_tokens + 8), plan.image_token_id} <= set(bias)
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert eos not in bias

    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["vocab_size"] = n_tokens + V.MAX_LOGIT_BIAS_TOKENS  # a vocabulary padded far past it
    (folder / "config.json").write_text(json.dumps(config))
    caplog.set_level("WARNING", logger=V.__name__)
    assert "logit_bias" not in dict(V.plan_vllm(spec, _PROMPTS).sampling_params)
    assert "are not suppressed" in caplog.text
