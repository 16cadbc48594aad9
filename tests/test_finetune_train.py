"""Tests of ``rsflow.finetune.train`` / ``rsflow.finetune.config`` and ``training/finetune.py``.

The Ray tests run the real loop on 2 CPU Ray Train workers (gloo) with the tiny LLaVA of
``tests.model_fixtures`` on a synthetic dataset built here (rows with exactly the columns of the data
stage: ``input_ids``, ``labels``, ``pixel_values``, ``ok``), so they do not depend on the data stage.
The target is learnable: the first answer token says whether the image is bright or dark.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rsflow.errors import RequestError
from rsflow.finetune.config import FinetuneConfig, check_config, load_config
from rsflow.finetune.train import _collate, get_lr, read_steps, row_digest, run_finetune

_REPO = Path(__file__).resolve().parents[1]
_BRIGHT, _DARK, _SECOND = 400, 500, 600  # answer token ids (< the tiny vocabulary)


# ---------------------------------------------------------------------------------------------- helpers


def _layout(base: Path) -> tuple[int, int, int]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    return int(config.image_token_index), int(config.image_seq_length), int(config.vision_config.image_size)


def _synthetic_rows(base: Path, n: int, *, failed: int = 0, truncated: int = 0, text_only: range = range(0),
                    seed: int = 0) -> list[dict[str, Any]]:
    """``n`` rows; the last ``failed`` are data-stage failures (``ok`` False, empty ids, black image, reason
    ``tokenization_mismatch``); the
    first ``truncated`` are marked as cut by ``max_length`` (``PrepareBatch``'s ``truncated``); those in
    ``text_only`` have no image (``has_image`` False, no image span: mix665k's text conversations),
    and answer as if dark."""
    image_token, n_image, size = _layout(base)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        if i >= n - failed:
            rows.append({"input_ids": np.zeros(0, np.int64), "labels": np.zeros(0, np.int64),
                         "pixel_values": np.zeros((3, size, size), np.float32), "ok": False, "truncated": False,
                         "has_image": True, "reason": "tokenization_mismatch: label arithmetic does not match"})
            continue
        bright = bool(i % 2) and i not in text_only
        pixels = rng.normal(0.8 if bright else -0.8, 0.3, (3, size, size)).astype(np.float32)
        prompt = rng.integers(300, 700, int(rng.integers(3, 7)))
        answer = [_BRIGHT if bright else _DARK, _SECOND, 2]  # 2 = </s>
        span = [] if i in text_only else [image_token] * n_image
        ids = np.array([1, *span, *prompt, *answer], dtype=np.int64)
        labels = ids.copy()
        labels[: len(ids) - len(answer)] = -100  # only the answer (and </s>) is supervised
        rows.append({"input_ids": ids, "labels": labels, "pixel_values": pixels * (i not in text_only), "ok": True,
                     "truncated": i < truncated, "has_image": i not in text_only, "reason": None})
    return rows


def _config(base: Path, out: Path, name: str, **overrides: Any) -> FinetuneConfig:
    values: dict[str, Any] = dict(
        base=str(base), output=str(out), name=name, workers=2, cpus_per_worker=0.5,
        per_worker_batch=2, grad_accum=2, global_batch=8, lr=5e-3, warmup_ratio=0.1,
        lora_r=4, lora_alpha=8, lora_dropout=0.05, checkpoint_every=5, keep_checkpoints=2,
        max_failures=1, shuffle=False,
    )
    values.update(overrides)
    return FinetuneConfig(**values)


def _changed(run_dir: str) -> tuple[set[str], set[str]]:
    """(names whose bytes changed, all names) from ``param_checksums.json``."""
    sums = json.loads((Path(run_dir) / "param_checksums.json").read_text())
    before, after = sums["before"], sums["after"]
    assert set(before) == set(after)
    return {k for k in before if before[k] != after[k]}, set(before)


def _finetune_cli() -> Any:
    spec = importlib.util.spec_from_file_location("training_finetune", _REPO / "training" / "finetune.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- pure parts


def test_get_lr_warms_up_linearly_then_decays_on_a_cosine() -> None:
    config = FinetuneConfig(lr=1.0, warmup_ratio=0.1, max_steps=20)
    # warmup = ceil(0.1 * 20) = 2 steps: 0/2, 1/2; then cosine over the 18 remaining steps
    assert get_lr(0, config) == pytest.approx(0.0)
    assert get_lr(1, config) == pytest.approx(0.5)
    assert get_lr(2, config) == pytest.approx(1.0)
    assert get_lr(11, config) == pytest.approx(0.5)  # half way: (11 - 2) / 18
    assert get_lr(19, config) == pytest.approx(0.5 * (1 + math.cos(math.pi * 17 / 18)))
    assert get_lr(19, config) > 0
    assert get_lr(0, FinetuneConfig(lr=2e-4, warmup_ratio=0.0), total_steps=10) == pytest.approx(2e-4)
    decay = [get_lr(s, config) for s in range(2, 20)]
    assert decay == sorted(decay, reverse=True)


@pytest.mark.parametrize(("warmup_ratio", "total"), [(0.03, 100), (0.1, 20), (0.0, 7), (0.03, 1)])
def test_get_lr_is_the_hugging_face_trainers_cosine_schedule(warmup_ratio, total) -> None:
    """The learning rate of every optimizer step equals the one LLaVA's and GeoChat's Trainer used
    (``lr_scheduler_type cosine``, warmup steps ``ceil(ratio * total)``, stepped after each step)."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    lr = 2e-4
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total), total)
    theirs = []
    for _ in range(total):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    config = FinetuneConfig(lr=lr, warmup_ratio=warmup_ratio)
    assert [get_lr(k, config, total_steps=total) for k in range(total)] == pytest.approx(theirs, rel=1e-9, abs=1e-15)


def test_collate_pads_right_and_turns_failed_rows_into_silent_fillers() -> None:
    rows = [
        {"input_ids": np.array([1, 9, 9, 5]), "labels": np.array([-100, -100, -100, 5]),
         "pixel_values": np.ones((3, 4, 4), np.float32), "ok": True},
        {"input_ids": np.array([1, 9, 9, 6, 7, 2]), "labels": np.array([-100, -100, -100, 6, 7, 2]),
         "pixel_values": np.ones((3, 4, 4), np.float32), "ok": True},
        {"input_ids": np.zeros(0, np.int64), "labels": np.zeros(0, np.int64),
         "pixel_values": np.zeros((3, 4, 4), np.float32), "ok": False},
    ]
    batch = _collate(rows, pad_id=0, image_token_id=9, image_tokens=2)
    assert batch["input_ids"].tolist() == [[1, 9, 9, 5, 0, 0], [1, 9, 9, 6, 7, 2], [0, 9, 9, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batch["labels"][0].tolist() == [-100, -100, -100, 5, -100, -100]
    assert (batch["labels"][2] == -100).all()  # the filler adds no loss
    assert batch["pixel_values"].shape == (3, 3, 4, 4)
    # a text-only row brings no pixels; a batch of them none at all
    text = {"input_ids": np.array([1, 5]), "labels": np.array([-100, 5]), "pixel_values": np.zeros((3, 4, 4), np.float32),
            "ok": True, "has_image": False}
    assert _collate([text, rows[0]], pad_id=0, image_token_id=9, image_tokens=2)["pixel_values"].shape == (1, 3, 4, 4)
    assert "pixel_values" not in _collate([text, text], pad_id=0, image_token_id=9, image_tokens=2)


# ---------------------------------------------------------------------------------------------- bad configs


def _write_yaml(path: Path, base: Path, data_path: Path, **extra: Any) -> Path:
    values = {"stage": "instruct", "base": str(base), "data": str(data_path),
              "output": str(path.parent / "runs"), "workers": 2, "per_worker_batch": 2, "grad_accum": 1,
              "global_batch": 4, **extra}
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    return path


@pytest.mark.parametrize(
    ("extra", "overrides", "key", "message"),
    [
        ({"learning_rate": 1e-4}, [], "learning_rate", "unknown config key"),
        ({}, ["lr_max=3"], "lr_max", "unknown config key"),
        ({}, ["global_batch=144"], "global_batch", "144 != per_worker_batch 2 x workers 2 x grad_accum 1"),
        ({"data": "/nonexistent/train.json"}, [], "data", "does not exist"),
        ({}, ["lora_targets=q_proj,qkv_proj"], "lora_targets", "'qkv_proj' matches no linear layer"),
        ({}, ["workers=two"], "workers", "expected int"),
        ({}, ["strategy=fsdp"], "strategy", "fsdp needs use_gpu"),
        ({}, ["lr=.nan"], "lr", "must be a finite number"),  # it trained to NaN weights and exited 0
        ({}, ["max_grad_norm=.inf"], "max_grad_norm", "must be a finite number"),
        ({}, ["cpus_per_worker=0"], "cpus_per_worker", "must be > 0"),
        ({}, ["epoch_shuffle_steps=-1"], "epoch_shuffle_steps", "must be a whole number >= 0"),
        ({}, ["base=..."], "base", "is not a YAML scalar"),  # the README's placeholder: was a traceback
        # Path() made s3://b/runs the local <cwd>/s3:/b/runs; an empty value the working directory
        ({}, ["output=s3://bucket/runs"], "output", "is a URL: runs are stored in a folder"),
        ({}, ["output="], "output", "give the folder runs are stored in"),
        ({"output": "__FILE__/runs"}, [], "output", "is a file"),  # was a traceback 20 s in, after Ray started
        # 16 image tokens + the v1 template leave no room for an answer token: every row failed in the workers
        ({}, ["max_length=40"], "max_length", "40 cannot hold even a one-word sample of stage instruct"),
    ],
)
def test_bad_configs_fail_in_one_line_naming_the_key_before_any_worker(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    extra: dict[str, Any], overrides: list[str], key: str, message: str,
) -> None:
    data = tmp_path / "train.json"
    data.write_text("[]")
    if extra.get("output", "").startswith("__FILE__"):
        extra = {**extra, "output": extra["output"].replace("__FILE__", str(data))}
    config_path = _write_yaml(tmp_path / "run.yaml", tiny_model_dir, data, **extra)
    with pytest.raises(RequestError, match=message) as info:
        load_config(config_path, overrides)
    assert info.value.field == key

    import rsflow.finetune.train as train_module

    def no_launch(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a worker would have started")

    monkeypatch.setattr(train_module, "run_finetune", no_launch)
    code = _finetune_cli().main(["--stage", "instruct", "--config", str(config_path), *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"finetune: error: {key}: ")
    assert not (tmp_path / "runs").exists()


def test_a_stage_override_against_the_stage_flag_is_named_as_an_override(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "train.json"
    data.write_text("[]")
    config_path = _write_yaml(tmp_path / "run.yaml", tiny_model_dir, data)  # stage: instruct
    code = _finetune_cli().main(["--stage", "instruct", "--config", str(config_path), "stage=align"])
    err = capsys.readouterr().err  # it said "run.yaml sets stage 'align'", which the file does not
    assert code == 2 and err.startswith("finetune: error: --stage: is instruct, but the override stage=align")
    assert not (tmp_path / "runs").exists()


def test_a_ray_address_where_nothing_answers_is_one_line_before_any_work(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """ray.init() waits on an address where nothing listens (a RAY_ADDRESS, or the record a killed
    `ray start` leaves behind); the launcher used to die later with a ConnectionError traceback."""
    from tests.stac_fixtures import free_port

    data = tmp_path / "train.json"
    data.write_text("[]")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    code = _finetune_cli().main(["--stage", "instruct", "--config", str(_write_yaml(tmp_path / "r.yaml", tiny_model_dir, data))])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("finetune: error: RAY_ADDRESS: nothing answers at 127.0.0.1:")


def test_run_finetune_checks_lora_targets_before_launching(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray.train.torch

    def no_trainer(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("TorchTrainer was built")

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", no_trainer)
    config = _config(tiny_model_dir, tmp_path, "bad", lora_targets=("q_proj", "lm_head"))
    with pytest.raises(RequestError, match="'lm_head' matches no linear layer") as info:
        run_finetune(config, None, num_rows=100)  # type: ignore[arg-type]
    assert info.value.field == "lora_targets"
    with pytest.raises(RequestError, match="make no whole step") as info:
        run_finetune(_config(tiny_model_dir, tmp_path, "small"), None, num_rows=7)  # type: ignore[arg-type]
    assert info.value.field == "global_batch"


@pytest.mark.parametrize(
    ("changes", "key", "message"),
    [
        ({"use_gpu": True}, "use_gpu", "asks one GPU for each of 2 worker(s), and this Ray has room for 0"),
        ({"cpus_per_worker": 64.0}, "cpus_per_worker", "2 worker(s) of 64 CPUs do not fit this Ray"),
        ({"cpus_per_worker": 1.5}, "cpus_per_worker", "room for 1"),  # 3 CPUs in all, but 1.5 + 1.5 > 2
        # the workers fit, but Ray Data's row-preparing actor (1 CPU) never gets one: it hung for ever
        ({"cpus_per_worker": 1.0}, "cpus_per_worker",
         "for the 1 data-preparation actor(s) that need 1 CPU each (--data-actors)"),
    ],
)
def test_workers_a_local_ray_cannot_place_are_refused_before_the_trainer_starts(
    ray_local: Any, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
    changes: dict[str, Any], key: str, message: str,
) -> None:
    """Ray Train waits for ever for a worker no node can hold; on a Ray nothing can join (no RAY_ADDRESS:
    this machine's 2 CPUs, no GPU) the run is refused instead, naming the key. It used to hang."""
    import ray.train.torch

    def no_trainer(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("TorchTrainer was built")

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", no_trainer)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = _config(tiny_model_dir, tmp_path, "big", **changes)
    with pytest.raises(RequestError, match=re.escape(message)) as info:
        run_finetune(config, None, num_rows=100)  # type: ignore[arg-type]
    assert info.value.field == key
    assert not config.run_dir.exists()
    # on a cluster `ray start` (or `ray up`) started on this machine, an autoscaler may add the nodes: it
    # goes on to the trainer (here the stand-in that refuses to be built) with a warning
    record = tmp_path / "ray-tmp" / "ray" / "ray_current_cluster"
    record.parent.mkdir(parents=True)
    record.write_text("127.0.0.1:6379")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray-tmp"))
    with pytest.raises(AssertionError, match="TorchTrainer was built"):
        run_finetune(config, None, num_rows=100)  # type: ignore[arg-type]


def test_a_base_in_the_llava_repository_format_is_told_to_convert_it(tmp_path: Path) -> None:
    """transformers cannot read ``model_type: llava_llama``; its error said to upgrade transformers."""
    base = tmp_path / "llava-v1.5-7b"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({
        "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu"}))
    for stage in ("align", "instruct"):
        with pytest.raises(RequestError, match=re.escape(f"convert it first with `rsflow convert {base} DST`")) as info:
            check_config(FinetuneConfig(stage=stage, base=str(base), output=str(tmp_path / "runs")))
        assert info.value.field == "base"
        assert "--image-size 504 --projector" in str(info.value) and "upgrade" not in str(info.value)


def test_max_length_is_checked_against_the_image_span_where_truncation_counts_it(tiny_model_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """GeoChat's 1296 image tokens with max_length 1024 and truncation 'expanded' made every row fail in
    the workers; here the tiny base's 16 image tokens and its one-word shortest sample set the floor."""
    from transformers import AutoTokenizer

    from rsflow.finetune.data import PrepareBatch

    def config(**kw: Any) -> FinetuneConfig:
        return FinetuneConfig(base=str(tiny_model_dir), output=str(tmp_path / "runs"), **kw)

    with pytest.raises(RequestError, match="with truncation 'expanded' it counts 16 image position") as info:
        check_config(config(stage="align", max_length=17))
    assert info.value.field == "max_length"
    check_config(config(stage="align", max_length=18))
    check_config(config(stage="align", max_length=17, truncation="text"))  # the image is one position there
    # the floor is exact: one below it, the shortest sample keeps no supervised token
    assert AutoTokenizer.from_pretrained(tiny_model_dir) is not None
    prepare = PrepareBatch(str(tiny_model_dir), template="plain", max_length=17)
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    batch = {"id": np.array(["a"], object), "image_path": np.array([str(image)], object),
             "conversations": np.array([json.dumps([{"from": "human", "value": "<image>\nA"},
                                                    {"from": "gpt", "value": "A"}])], object)}
    assert prepare(batch)["reason"][0].startswith("no_supervised_tokens")
    prepare = PrepareBatch(str(tiny_model_dir), template="plain", max_length=18)
    assert bool(prepare(batch)["ok"][0])


def test_align_export_keeps_every_frozen_tensor_of_the_base_bit_for_bit(tmp_path: Path) -> None:
    """With bf16 the training copy is bfloat16; export/model (stage 2's base, the region job's --model)
    used to be that copy, every float16 weight of the base rounded. It must be the base's own tensors,
    in the base's dtype, with only the projector replaced; the "before" checksums are the base's."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from rsflow.finetune.train import _build_model, _export_weights, _param_checksums
    from rsflow.models.tiny import build_tiny_llava

    base = build_tiny_llava(tmp_path / "base16", seed=1, dtype="float16")
    config = FinetuneConfig(stage="align", base=str(base), output=str(tmp_path / "runs"), name="a16",
                            use_gpu=True, bf16=True)  # the recipe's align.yaml; nothing here touches a GPU
    before: dict[str, str] = {}
    model = _build_model(config, before)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}  # the training copy is still bfloat16
    # "before" is the base as stored (float16), not the rounded copy
    assert before == _param_checksums(LlavaForConditionalGeneration.from_pretrained(base, dtype="auto"))
    trained = {n: p.detach() + 0.25 for n, p in model.named_parameters() if p.requires_grad}
    _export_weights(tmp_path / "export", model, trained, config)

    ours, theirs = load_file(str(tmp_path / "export" / "model" / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    projector = {k for k in theirs if "multi_modal_projector" in k}
    assert len(projector) == 4
    for key in sorted(set(theirs) - projector):
        assert ours[key].dtype == theirs[key].dtype == torch.float16, key
        assert torch.equal(ours[key], theirs[key]), key
    for key in projector:  # the trained values, as projector.safetensors holds them
        assert torch.equal(ours[key], trained[f"model.{key}"].float()), key
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export" / "model")
    assert reloaded.dtype == torch.float16


def test_param_checksums_after_are_the_bases_for_a_weight_training_left_alone() -> None:
    from rsflow.finetune.train import _checksums_after

    before = {"frozen": "f16", "proj": "p16"}  # the base's tensors, float16
    loaded = {"frozen": "bf", "proj": "p32"}  # the training copy, bfloat16 / float32
    assert _checksums_after(before, loaded, {"frozen": "bf", "proj": "p32-trained"}) == {
        "frozen": "f16", "proj": "p32-trained"}
    assert _checksums_after(before, loaded, {"frozen": "bf-moved", "proj": "p32"}) == {
        "frozen": "bf-moved", "proj": "p16"}


def test_failed_rows_are_counted_per_reason_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The data stage's reasons (tokenization mismatch, bad image, no supervised token) reached only a
    DEBUG line inside the Ray Data actors and a per-step count; now per reason in steps.csv, a WARNING
    on the driver and failed_rows.json, as the loader's skipped records are."""
    import logging

    from rsflow.finetune.train import _reason_codes, _reason_counts, _report_failed_rows, _step_row

    rows = [{"ok": True, "reason": float("nan")}, {"ok": False, "reason": "tokenization_mismatch: 5 vs 7"},
            {"ok": False, "reason": "image_decode_error: OSError: broken"}, {"ok": False},
            {"ok": False, "reason": "no_supervised_tokens: max_length 16 cuts every answer token"}]
    codes = _reason_codes()
    counts = _reason_counts(rows, codes)
    assert {c: n for c, n in zip(codes, counts, strict=True) if n} == {
        "tokenization_mismatch": 1, "image_decode_error": 1, "no_supervised_tokens": 1, "other": 1}
    sums = [0.0, 1.0, 0.0, 4.0, 0.0, *counts]
    line = _step_row(1, 0, 8, 1.0, {"lora": 1e-4}, sums, 1, time.perf_counter(), codes)
    assert line["failed_reasons"] == "image_decode_error:1;tokenization_mismatch:1;no_supervised_tokens:1;other:1"

    config = FinetuneConfig(base="b", data="train.json", output=str(tmp_path), name="r")
    config.run_dir.mkdir(parents=True)
    steps = [{**{k: str(v) for k, v in line.items()}, "samples": "8"},
             {"failed_rows": "2", "failed_reasons": "tokenization_mismatch:2", "samples": "16"},
             {"failed_rows": "0", "failed_reasons": "", "samples": "24"}]
    with caplog.at_level(logging.WARNING, logger="rsflow.finetune.train"):
        got = _report_failed_rows(config, steps)
    assert got == {"image_decode_error": 1, "no_supervised_tokens": 1, "other": 1, "tokenization_mismatch": 3}
    assert "6 of 24 rows read failed in the data stage" in caplog.text
    assert "tokenization_mismatch: 3" in caplog.text
    report = json.loads((config.run_dir / "failed_rows.json").read_text())
    assert (report["n_failed"], report["rows_read"], report["failed"]) == (6, 24, got)


def test_a_relaunch_with_other_training_settings_is_refused_naming_both_values(
    ray_local: Any, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A relaunch restores the optimizer and scheduler state from the checkpoint: a new lr was not used
    while every record claimed it, a new max_steps moved the schedule mid-run."""
    import ray.train.torch

    def no_trainer(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("TorchTrainer was built")

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", no_trainer)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = _config(tiny_model_dir, tmp_path, "relaunch", max_steps=20)
    with pytest.raises(AssertionError, match="TorchTrainer was built"):  # the first launch records its settings
        run_finetune(config, None, num_rows=100)  # type: ignore[arg-type]
    for changes, key, message in [
        ({"lr": 1e-4}, "lr", "was started with lr 0.005, now 0.0001"),
        ({"max_steps": 30}, "max_steps", "was started for 20 steps, now 30"),
        ({"max_length": 4096}, "max_length", "was started with max_length 2048, now 4096"),
        ({"lora_r": 8}, "lora_r", "was started with lora_r 4, now 8"),
        ({"base": str(tmp_path)}, "base", f"now {str(tmp_path)!r}"),
    ]:
        if key == "base":  # check_config needs a LLaVA there
            import shutil

            shutil.copytree(tiny_model_dir, tmp_path / "other-base")
            changes = {"base": str(tmp_path / "other-base")}
            message = f"now {str(tmp_path / 'other-base')!r}"
        with pytest.raises(RequestError, match=re.escape(message)) as info:
            run_finetune(replace(config, **changes), None, num_rows=100)  # type: ignore[arg-type]
        assert info.value.field == key
    # what changes neither the rows nor the arithmetic may change
    with pytest.raises(AssertionError, match="TorchTrainer was built"):
        run_finetune(replace(config, checkpoint_every=3, max_failures=2), None, num_rows=100)  # type: ignore[arg-type]


def test_run_folder_state_files_are_written_atomically_and_a_broken_one_is_named(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """A crash while writing _done.json (or run_meta.json, ...) left truncated JSON, and every relaunch then
    died in json.loads with a traceback."""
    from rsflow.finetune import train as train_module

    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "attempts.txt").write_text("1\n")
    real_write_text = Path.write_text

    def crash_half_way(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(Path, "write_text", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        train_module._next_attempt(run_dir)
    with pytest.raises(KeyboardInterrupt):
        train_module._write_atomic(run_dir / "_done.json", json.dumps({"result": {"steps": 1}}))
    monkeypatch.undo()
    assert (run_dir / "attempts.txt").read_text() == "1\n"  # the old file, whole
    assert not (run_dir / "_done.json").exists()
    assert train_module._next_attempt(run_dir) == 2

    # a truncated one (from before): one line naming the file, no traceback
    (run_dir / "_done.json").write_text('{"config": {"lr": 0.')
    config = _config(tiny_model_dir, tmp_path / "runs", "r")
    with pytest.raises(RequestError, match="cannot be read .*delete it and relaunch") as info:
        run_finetune(config, None)  # type: ignore[arg-type]
    assert info.value.field == str(run_dir / "_done.json")
    (run_dir / "_done.json").unlink()
    (run_dir / "run_meta.json").write_text('{"rows": 1')
    with pytest.raises(RequestError, match="cannot be read") as info:
        train_module._check_relaunch(run_dir / "run_meta.json", {})
    assert info.value.field == str(run_dir / "run_meta.json")
    (run_dir / "_done.json").write_text("")
    data = tmp_path / "train.json"
    data.write_text("[]")
    config_path = _write_yaml(tmp_path / "run.yaml", tiny_model_dir, data, name="r")
    assert _finetune_cli().main(["--stage", "instruct", "--config", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"finetune: error: {run_dir / '_done.json'}: cannot be read")


# ---------------------------------------------------------------------------------------------- Ray runs


@pytest.mark.slow
@pytest.mark.ray
def test_align_trains_only_the_projector(ray_local: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    import ray.data
    import torch

    config = _config(tiny_model_dir, tmp_path, "align", stage="align", grad_accum=1, global_batch=4,
                     lr=1e-2, max_steps=4, checkpoint_every=2)
    dataset = ray.data.from_items(_synthetic_rows(tiny_model_dir, 32), override_num_blocks=4)
    result = run_finetune(config, dataset, num_rows=32)

    assert (result.steps, result.samples, result.attempts) == (4, 16, 1)
    changed, names = _changed(result.run_dir)
    projector = {n for n in names if "multi_modal_projector" in n}
    assert len(projector) == 4
    assert changed == projector  # vision tower and language model untouched, every projector tensor moved
    export = Path(result.export_dir)
    assert not (export / "adapter").exists()
    mm = torch.load(export / "llava_repo" / "mm_projector.bin", weights_only=True)
    assert sorted(mm) == [f"model.mm_projector.{i}.{w}" for i in (0, 2) for w in ("bias", "weight")]
    # stage 1's result is a complete model folder (stage 2's base; --model in the region job)
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    aligned = LlavaForConditionalGeneration.from_pretrained(export / "model")
    trained = load_file(export / "projector.safetensors")
    got = dict(aligned.named_parameters())
    for name, tensor in trained.items():
        match = [p for n, p in got.items() if n.endswith(name.split("multi_modal_projector.", 1)[-1])
                 and "multi_modal_projector" in n]
        assert match and torch.equal(match[0].detach(), tensor), name
    assert json.loads((export / "model" / "rsflow.json").read_text())["stage"] == "align"
    # the published llava-hf tensor names, which --engine vllm (vLLM 0.29) loads
    from rsflow.models.spec import ModelSpec
    from rsflow.models.vllm_engine import check_vllm_spec

    check_vllm_spec(ModelSpec(model=str(export / "model")))


@pytest.mark.slow
@pytest.mark.ray
def test_instruct_run_survives_a_killed_worker_and_does_every_step_once(
    ray_local: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import ray.data
    import torch
    from safetensors.torch import load_file

    # a block of text-only rows: micro-batches without any image, where the trained projector gets no
    # gradient from the forward pass (DDP still needs one from every rank)
    rows = _synthetic_rows(tiny_model_dir, 160, failed=2, truncated=3, text_only=range(20, 40))
    dataset = ray.data.from_items(rows, override_num_blocks=8)
    # 160 rows / (2 per worker x 2 workers x 2 accumulated) = 20 steps per epoch; 2 epochs
    config = _config(tiny_model_dir, tmp_path, "instruct", train_projector=True, projector_lr=2e-3,
                     max_steps=40, checkpoint_every=10)
    run_dir = config.run_dir
    killed: dict[str, int] = {}

    def registered_checkpoint_step() -> int:
        """Step of the last checkpoint Ray Train has registered (its controller polls every ~2 s)."""
        try:
            snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
            return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def kill_rank1() -> None:
        # Kill once a checkpoint is registered: one reported in the last poll interval before a failure
        # is not, and the run would (correctly) restart from the one before, here from scratch.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if registered_checkpoint_step() >= config.checkpoint_every:
                pid = int((run_dir / "workers" / "rank1.pid").read_text())
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, last_step=max(int(r["step"]) for r in read_steps(run_dir)))
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_rank1, daemon=True)
    killer.start()
    result = run_finetune(config, dataset, num_rows=len(rows))
    killer.join(timeout=5)

    # the kill happened mid-run and the run recovered by itself
    assert killed, "the worker was never killed"
    assert killed["last_step"] < 40
    assert result.attempts == 2 and result.steps == 40 and result.samples == 320

    # every step once, in order, samples continuous
    steps = read_steps(run_dir)
    assert [int(r["step"]) for r in steps] == list(range(1, 41))
    assert [int(r["samples"]) for r in steps] == [8 * s for s in range(1, 41)]
    resumed_at = next(int(r["step"]) for r in steps if r["attempt"] == "2")
    assert resumed_at - 1 >= config.checkpoint_every  # from a checkpoint, not from scratch
    assert (resumed_at - 1) % config.checkpoint_every == 0 and resumed_at - 1 <= killed["last_step"]
    assert all(r["attempt"] == "1" for r in steps[: resumed_at - 1])

    # every row consumed exactly once per epoch, across the restart (sums of per-row CRCs)
    all_rows = sum(row_digest(r["input_ids"]) for r in rows)
    for epoch in (0, 1):
        in_epoch = [r for r in steps if int(r["epoch"]) == epoch]
        assert len(in_epoch) == 20
        assert sum(int(r["rows_digest"]) for r in in_epoch) == all_rows
        assert sum(int(r["failed_rows"]) for r in in_epoch) == 2
        assert sum(int(r["truncated_rows"]) for r in in_epoch) == 3
    # the second epoch's micro-batches are made of other rows than the first's (reshuffled, seeded: the
    # restart replayed its epoch exactly, as the sums above show)
    by_epoch = [[int(r["rows_digest"]) for r in steps if int(r["epoch"]) == epoch] for epoch in (0, 1)]
    assert sum(a != b for a, b in zip(*by_epoch, strict=True)) >= 15, by_epoch
    # the failed rows' reasons, all workers, every step once: in the result, the model card and a file
    assert result.failed_rows == {"tokenization_mismatch": 4}
    failed_report = json.loads((run_dir / "failed_rows.json").read_text())
    assert (failed_report["n_failed"], failed_report["failed"]) == (4, {"tokenization_mismatch": 4})

    # the loss goes down on the learnable target
    losses = [float(r["loss"]) for r in steps]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses

    # only the LoRA factors and the projector changed
    changed, names = _changed(result.run_dir)
    # the projector trains as peft's modules_to_save copy; the original beside it stays frozen
    trainable = {n for n in names if ".lora_" in n or ".modules_to_save." in n}
    assert len(trainable) == 2 * 7 * 2 + 4, sorted(trainable)  # (lora_A, lora_B) x 7 projections x 2 layers + the projector
    assert changed == trainable
    assert len({n for n in names if "multi_modal_projector.original_module." in n}) == 4

    # outputs
    export = Path(result.export_dir)
    adapter = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 8)
    lora = load_file(str(export / "adapter" / "adapter_model.safetensors"))
    assert len(lora) == 32 and not any("vision" in k for k in lora)
    assert sum(".lora_" in k for k in lora) == 28
    assert len(torch.load(export / "llava_repo" / "adapter_model.bin", weights_only=True)) == 28
    projector = load_file(str(export / "projector.safetensors"))
    # the adapter carries the trained projector (modules_to_save), so --adapter alone reproduces the model
    in_adapter = {k.removeprefix("base_model.model."): v for k, v in lora.items() if ".lora_" not in k}
    assert sorted(in_adapter) == sorted(projector)
    assert all(torch.equal(in_adapter[k], projector[k]) for k in projector)
    non_lora = torch.load(export / "llava_repo" / "non_lora_trainables.bin", weights_only=True)
    assert torch.equal(non_lora["base_model.model.model.mm_projector.0.weight"],
                       projector["model.multi_modal_projector.linear_1.weight"])
    assert (export / "llava_repo" / "adapter_model.bin").is_file()
    card = (run_dir / "MODEL_CARD.md").read_text()
    assert "40 (320 samples) in 2 attempt(s)" in card
    assert "could not build (not trained on): tokenization_mismatch: 4" in card
    assert (run_dir / "loss.csv").read_text().count("\n") == 41

    # the restart changed nothing: an uninterrupted run (same rows, seeds and schedule) is identical
    reference = run_finetune(replace(config, name="reference", checkpoint_every=40), dataset,
                             num_rows=len(rows))
    assert reference.attempts == 1
    assert [r["loss"] for r in read_steps(reference.run_dir)] == [r["loss"] for r in steps]
    for name in ("projector.safetensors", "adapter/adapter_model.safetensors"):
        ours, theirs = load_file(str(export / name)), load_file(str(Path(reference.export_dir) / name))
        assert sorted(ours) == sorted(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name

    # relaunching the finished run does nothing and says so
    before = (run_dir / "steps.csv").read_bytes()
    again = run_finetune(config, dataset, num_rows=len(rows))
    assert again.already_done and again.steps == 40
    assert (run_dir / "steps.csv").read_bytes() == before
