"""rsflow.finetune.data: records, templates, LLaVA label masking, PrepareBatch (without Ray), collate."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rsflow.errors import RequestError
from rsflow.finetune.data import (
    BAD_TURNS,
    EXTRA_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_DECODE_ERROR,
    MALFORMED,
    MISSING_IMAGE,
    NO_IMAGE,
    NO_IMAGE_TOKEN,
    TOKENIZATION_MISMATCH,
    PrepareBatch,
    RecordReport,
    TrainRecord,
    Turn,
    collate,
    is_legacy_tokenizer,
    load_llava_json,
    load_parquet_records,
    move_image_first,
    reason_code,
    records_to_rows,
    render_plain,
    render_v1,
    rows_from_batch,
    token_layout,
    tokenize_with_labels,
)
from rsflow.models.prompts import SYSTEM_VICUNA_V1
from tests.original_formats import VICUNA_CORPUS, write_sentencepiece

# Answers made of the tokenizers' training sentences, so that both tokenizers cut them into few pieces.
Q1, A1 = "What is in the image?", "Many buildings and some green trees are around a playground."
Q2, A2 = "Are there any ships?", "There are several white storage tanks next to the harbor."
TWO_TURNS: list[dict[str, str]] = [
    {"from": "human", "value": f"{Q1}\n<image>"},  # image last: preprocess_multimodal moves it first
    {"from": "gpt", "value": A1},
    {"from": "human", "value": Q2},
    {"from": "gpt", "value": A2},
]
IMAGE_ID = 999  # any id outside the text: easy to count
N_IMAGE = 7


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir, backend="pil").tokenizer  # type: ignore[no-untyped-call]


def _sp_tokenizer(folder: Path, *, legacy: bool) -> Any:
    from transformers import AutoTokenizer, LlamaConfig

    write_sentencepiece(folder, corpus=VICUNA_CORPUS, vocab_size=400)  # tokenizer_config: legacy false
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["legacy"] = legacy
    config_path.write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(folder, config=LlamaConfig())


@pytest.fixture(scope="module", params=["tiny-bpe", "sp-nonlegacy", "sp-legacy"])
def any_tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny model's BPE tokenizer and a LLaMA-style SentencePiece one (Vicuna's ``legacy: false``
    and the old legacy behaviour)."""
    if request.param == "tiny-bpe":
        return request.getfixturevalue("tiny_tokenizer")
    folder = tmp_path_factory.mktemp(request.param)
    return _sp_tokenizer(folder, legacy=request.param == "sp-legacy")


def _spans(labels: list[int]) -> list[list[int]]:
    """Maximal runs of supervised labels."""
    spans: list[list[int]] = []
    current: list[int] = []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    if current:
        spans.append(current)
    return spans


def _png(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------- templates


def test_render_v1_is_conv_vicuna_v1() -> None:
    expected = f"{SYSTEM_VICUNA_V1} USER: <image>\n{Q1} ASSISTANT: {A1}</s>USER: {Q2} ASSISTANT: {A2}</s>"
    assert render_v1(TWO_TURNS) == expected
    assert (
        render_v1([Turn(t["from"], t["value"]) for t in TWO_TURNS], system="S")
        == "S" + expected[len(SYSTEM_VICUNA_V1) :]
    )


def test_move_image_first_is_preprocess_multimodal() -> None:
    turns = move_image_first(
        [{"from": "human", "value": "  Look <image> here "}, {"from": "gpt", "value": "x"}]
    )
    assert turns[0].value == "<image>\nLook  here"
    assert move_image_first([{"from": "human", "value": "<image>"}])[0].value == "<image>"


def test_render_plain_is_image_caption_newline() -> None:
    assert render_plain([{"from": "human", "value": "Describe.\n<image>"}, {"from": "gpt", "value": A1}]) == (
        f"<image>{A1}\n"
    )
    with pytest.raises(ValueError, match="exactly one human turn"):
        render_plain(TWO_TURNS)


# ---------------------------------------------------------------------------------------- labels


def test_v1_labels_are_exactly_the_answers(any_tokenizer: Any) -> None:
    tok = any_tokenizer
    sample = tokenize_with_labels(
        TWO_TURNS, tok, template="v1", max_length=512, image_token_id=IMAGE_ID, n_image_tokens=N_IMAGE
    )
    assert not sample.mismatch and not sample.truncated
    assert len(sample.input_ids) == len(sample.labels)
    # Supervised: each answer and its </s>, nothing else (BOS, system, USER turns, headers masked).
    decoded = [tok.decode(span).strip() for span in _spans(sample.labels)]
    assert decoded == [A1 + "</s>", A2 + "</s>"]
    supervised = [i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX]
    assert all(sample.labels[i] == sample.input_ids[i] for i in supervised)
    assert sample.input_ids[0] == tok.bos_token_id and sample.labels[0] == IGNORE_INDEX
    # The image: one run of exactly N_IMAGE positions, all -100.
    image_positions = [i for i, t in enumerate(sample.input_ids) if t == IMAGE_ID]
    assert len(image_positions) == N_IMAGE
    assert image_positions == list(range(image_positions[0], image_positions[0] + N_IMAGE))
    assert all(sample.labels[i] == IGNORE_INDEX for i in image_positions)
    # The ids are LLaVA's chunked ids: the text before the image is BOS + system + " USER: ".
    prefix = tok.decode(sample.input_ids[1 : image_positions[0]])
    assert prefix.strip() == f"{SYSTEM_VICUNA_V1} USER:"


def test_llava_boundary_fix_agrees_where_llava_is_right(any_tokenizer: Any) -> None:
    """LLaVA's ``-1 if not legacy`` is right for SentencePiece LLaMA tokenizers (both modes give the same
    labels) and wrong for the tiny BPE one, where its safety check then drops the sample."""
    tok = any_tokenizer
    kwargs: dict[str, Any] = {
        "template": "v1",
        "max_length": 512,
        "image_token_id": IMAGE_ID,
        "n_image_tokens": N_IMAGE,
    }
    measured = tokenize_with_labels(TWO_TURNS, tok, boundary_fix="measured", **kwargs)
    llava = tokenize_with_labels(TWO_TURNS, tok, boundary_fix="llava", **kwargs)
    assert llava.input_ids == measured.input_ids
    if hasattr(tok, "legacy"):  # the SentencePiece LlamaTokenizer: probe agrees with its config
        assert is_legacy_tokenizer(tok) is bool(tok.legacy)
        assert llava == measured
    else:  # "▁USER:" is one piece standalone but "USER" + ":" after </s>: LLaVA's -1 is off by 2
        assert not is_legacy_tokenizer(tok)
        assert llava.mismatch and set(llava.labels) == {IGNORE_INDEX}
    # A single round never needs the fix.
    single = TWO_TURNS[:2]
    assert tokenize_with_labels(single, tok, boundary_fix="llava", **kwargs) == tokenize_with_labels(
        single, tok, boundary_fix="measured", **kwargs
    )


class _CharTokenizer:
    """One id per character (its code point), ``</s>`` = 2 as a special token, BOS 1 first."""

    bos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids: list[int] = []
        for k, part in enumerate(text.split("</s>")):
            if k:
                ids.append(2)
            ids += [ord(c) for c in part]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_v1_arithmetic_by_hand() -> None:
    """With one id per character the ``- 2`` rule leaves the space before each answer supervised (in
    LLaVA that space merges into the answer's first SentencePiece piece)."""
    conv = [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "ab"}]
    sample = tokenize_with_labels(
        conv, _CharTokenizer(), template="v1", max_length=100, image_token_id=9, n_image_tokens=2, system="S"
    )
    text_ids = [ord(c) for c in "S USER: "] + [9, 9] + [ord(c) for c in "\nq ASSISTANT: ab"] + [2]
    assert sample.input_ids == [1, *text_ids]
    n_masked = len(sample.input_ids) - 4  # supervised: " ab</s>"
    assert sample.labels == [IGNORE_INDEX] * n_masked + [ord(" "), ord("a"), ord("b"), 2]


def test_plain_supervises_caption_and_newline(any_tokenizer: Any) -> None:
    tok = any_tokenizer
    conv = [{"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": A2}]
    sample = tokenize_with_labels(
        conv, tok, template="plain", max_length=512, image_token_id=IMAGE_ID, n_image_tokens=N_IMAGE
    )
    assert not sample.mismatch
    # BOS + image masked, then everything supervised: the caption and its "\n" (the question is dropped).
    assert sample.input_ids[: 1 + N_IMAGE] == [tok.bos_token_id] + [IMAGE_ID] * N_IMAGE
    assert sample.labels[: 1 + N_IMAGE] == [IGNORE_INDEX] * (1 + N_IMAGE)
    assert sample.labels[1 + N_IMAGE :] == sample.input_ids[1 + N_IMAGE :]
    assert tok.decode(sample.labels[1 + N_IMAGE :]).lstrip(" ") == A2 + "\n"


def test_truncation_after_image_expansion(tiny_tokenizer: Any) -> None:
    kwargs: dict[str, Any] = {"template": "v1", "image_token_id": IMAGE_ID, "n_image_tokens": N_IMAGE}
    full = tokenize_with_labels(TWO_TURNS, tiny_tokenizer, max_length=4096, **kwargs)
    cut = tokenize_with_labels(TWO_TURNS, tiny_tokenizer, max_length=len(full.input_ids) - 5, **kwargs)
    assert cut.truncated and not cut.mismatch
    assert cut.input_ids == full.input_ids[: len(full.input_ids) - 5]
    assert cut.labels == full.labels[: len(full.labels) - 5]
    # Cut inside the image span: nothing supervised is left (PrepareBatch refuses such rows).
    start = full.input_ids.index(IMAGE_ID)
    tiny = tokenize_with_labels(TWO_TURNS, tiny_tokenizer, max_length=start + 3, **kwargs)
    assert len(tiny.input_ids) == start + 3 and tiny.n_supervised == 0


def test_geochat_truncation_counts_the_text_only(tiny_tokenizer: Any) -> None:
    """GeoChat's copy of LLaVA cuts the text (the image one position) at model_max_length and splices the
    image features in afterwards, with no second cut: a sample whose text fits keeps every answer token
    even where the expanded sequence is longer than max_length; a longer text is cut at max_length text
    positions, the image still expanded in full."""
    kwargs: dict[str, Any] = {"template": "v1", "image_token_id": IMAGE_ID, "n_image_tokens": N_IMAGE}
    full = tokenize_with_labels(TWO_TURNS, tiny_tokenizer, max_length=4096, **kwargs)
    n_text = len(full.input_ids) - N_IMAGE + 1  # the image as one position
    fits = tokenize_with_labels(TWO_TURNS, tiny_tokenizer, max_length=n_text, truncation="text", **kwargs)
    assert (fits.input_ids, fits.labels, fits.truncated) == (full.input_ids, full.labels, False)
    assert tokenize_with_labels(TWO_TURNS, tiny_tokenizer, max_length=n_text, **kwargs).truncated  # final LLaVA's cut
    cut = tokenize_with_labels(TWO_TURNS, tiny_tokenizer, max_length=n_text - 4, truncation="text", **kwargs)
    assert cut.truncated and len(cut.input_ids) == n_text - 4 + N_IMAGE - 1
    assert (cut.input_ids, cut.labels) == (full.input_ids[: len(cut.input_ids)], full.labels[: len(cut.labels)])
    with pytest.raises(ValueError, match="truncation"):
        tokenize_with_labels(TWO_TURNS, tiny_tokenizer, max_length=64, truncation="images", **kwargs)


def test_mismatch_masks_everything(tiny_tokenizer: Any) -> None:
    """An answer containing " ASSISTANT: " breaks LLaVA's round split: its safety check fires."""
    conv = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "x ASSISTANT: y"}]
    sample = tokenize_with_labels(
        conv, tiny_tokenizer, template="v1", max_length=512, image_token_id=IMAGE_ID, n_image_tokens=N_IMAGE
    )
    assert sample.mismatch and set(sample.labels) == {IGNORE_INDEX}
    assert len(sample.labels) == len(sample.input_ids)


def test_tokenize_refuses_bad_input(tiny_tokenizer: Any) -> None:
    kwargs: dict[str, Any] = {"max_length": 64, "image_token_id": IMAGE_ID, "n_image_tokens": N_IMAGE}
    with pytest.raises(ValueError, match="exactly one <image>"):
        tokenize_with_labels(
            [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
            tiny_tokenizer,
            template="v1",
            **kwargs,
        )
    with pytest.raises(ValueError, match="template"):
        tokenize_with_labels(TWO_TURNS, tiny_tokenizer, template="v2", **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- records


def _write_dataset(root: Path) -> Path:
    """A JSON file with two good records and one of each fault; images under ``root/images``."""
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.png").write_bytes(_png(40, 24))
    (images / "sub" / "b.png").write_bytes(_png(24, 24, (10, 200, 10)))
    good = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A field."}]
    records: list[Any] = [
        {"id": "good-a", "image": "a.png", "conversations": good},
        {"id": "good-b", "image": "sub/b.png", "conversations": TWO_TURNS},
        {"id": "gone", "image": "missing.png", "conversations": good},
        {"id": "noimg-token", "image": "a.png", "conversations": [{"from": "human", "value": "Q"}, good[1]]},
        {"id": "odd", "image": "a.png", "conversations": good[:1]},
        {"id": "gpt-first", "image": "a.png", "conversations": [good[1], good[0]]},
        {"id": "empty", "image": "a.png", "conversations": []},
        {"id": "blank-answer", "image": "a.png", "conversations": [good[0], {"from": "gpt", "value": "  "}]},
        {
            "id": "two-images",
            "image": "a.png",
            "conversations": [*good, {"from": "human", "value": "<image>"}, good[1]],
        },
        {"id": "text-only", "conversations": good},
        {"id": "bad-value", "image": "a.png", "conversations": [{"from": "human", "value": 3}]},
        "not a record",
    ]
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_json_report_counts_every_reason(tmp_path: Path) -> None:
    path = _write_dataset(tmp_path)
    records, report = load_llava_json(path, tmp_path / "images")
    assert [r.id for r in records] == ["good-a", "good-b"]
    assert records[1].image_path == str(tmp_path / "images" / "sub" / "b.png")
    assert records[1].conversations[0] == Turn("human", TWO_TURNS[0]["value"])
    assert isinstance(report, RecordReport)
    assert (report.n_records, report.n_ok, report.n_skipped) == (12, 2, 10)
    assert dict(report.skipped) == {
        BAD_TURNS: 4,
        EXTRA_IMAGE_TOKEN: 1,
        MALFORMED: 2,
        MISSING_IMAGE: 1,
        NO_IMAGE: 1,
        NO_IMAGE_TOKEN: 1,
    }
    assert report.examples[BAD_TURNS] == ("odd", "gpt-first", "empty", "blank-answer")
    assert report.examples[MISSING_IMAGE] == ("gone",)
    assert report.examples[NO_IMAGE_TOKEN] == ("noimg-token",)
    assert report.examples[MALFORMED] == ("bad-value", "#11")
    # The plain template takes one exchange: the two-turn record is refused at load time too.
    plain_records, plain_report = load_llava_json(path, tmp_path / "images", template="plain")
    assert [r.id for r in plain_records] == ["good-a"] and plain_report.skipped[
        BAD_TURNS
    ] == 6  # + good-b, two-images
    merged = report.merge(report)
    assert merged.n_records == 24 and merged.skipped[BAD_TURNS] == 8
    assert json.loads(json.dumps(report.to_dict()))["n_skipped"] == 10


def test_missing_data_file_is_a_request_error(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="^data: .*does not exist"):
        load_llava_json(tmp_path / "nope.json", tmp_path)
    with pytest.raises(RequestError, match="^data: "):
        load_parquet_records(tmp_path / "nope.parquet")
    (tmp_path / "list.json").write_text("{}")
    with pytest.raises(RequestError, match="^data: .*JSON list"):
        load_llava_json(tmp_path / "list.json", tmp_path)
    pq.write_table(pa.table({"id": ["x"]}), tmp_path / "cols.parquet")
    with pytest.raises(RequestError, match="lacks column"):
        load_parquet_records(tmp_path / "cols.parquet")


@pytest.mark.parametrize("as_structs", [False, True])
def test_parquet_and_json_give_the_same_records(tmp_path: Path, as_structs: bool) -> None:
    path = _write_dataset(tmp_path)
    from_json, json_report = load_llava_json(path, tmp_path / "images")
    raw = [r for r in json.loads(path.read_text()) if isinstance(r, dict)]

    def image_cell(record: dict[str, Any]) -> bytes | None:
        file = tmp_path / "images" / str(record.get("image", ""))
        return file.read_bytes() if record.get("image") and file.is_file() else None

    good = [r for r in raw if r["id"] in {"good-a", "good-b"}]
    conversations: Any = [r["conversations"] for r in good]
    if not as_structs:
        conversations = [json.dumps(c) for c in conversations]
    table = pa.table(
        {
            "id": [r["id"] for r in good],
            "image": [image_cell(r) for r in good],
            "conversations": conversations,
        }
    )
    pq.write_table(table, tmp_path / "data.parquet")
    from_parquet, report = load_parquet_records(tmp_path / "data.parquet")
    assert report.n_ok == 2 and report.n_skipped == 0
    assert [(r.id, r.conversations) for r in from_parquet] == [(r.id, r.conversations) for r in from_json]
    for p, j in zip(from_parquet, from_json, strict=True):
        assert j.image_path is not None and p.image_bytes == Path(j.image_path).read_bytes()
    # Faults are counted the same way (a null image is a missing image).
    bad = pa.table(
        {
            "id": ["no-bytes", "odd", "not-json"],
            "image": [None, image_cell(good[0]), image_cell(good[0])],
            "conversations": [json.dumps(good[0]["conversations"]), json.dumps(TWO_TURNS[:3]), "{oops"],
        }
    )
    pq.write_table(bad, tmp_path / "bad.parquet")
    _, bad_report = load_parquet_records(tmp_path / "bad.parquet")
    assert dict(bad_report.skipped) == {BAD_TURNS: 1, MALFORMED: 1, MISSING_IMAGE: 1}
    assert json_report.n_ok == 2


def test_train_record_takes_at_most_one_image_source() -> None:
    assert not TrainRecord(id="x", conversations=()).has_image  # a text-only record
    assert TrainRecord(id="x", conversations=(), image_bytes=b"b").has_image
    with pytest.raises(ValueError, match="at most one"):
        TrainRecord(id="x", conversations=(), image_path="a", image_bytes=b"b")


# ---------------------------------------------------------------------------------------- PrepareBatch


def _batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in rows[0]:
        column = np.empty(len(rows), dtype=object)
        for k, row in enumerate(rows):
            column[k] = row[name]
        out[name] = column
    return out


def test_prepare_batch_without_ray(tiny_model_dir: Path, tmp_path: Path) -> None:
    layout = token_layout(tiny_model_dir)
    assert (layout.n_image_tokens, layout.image_size) == (16, 64)  # 64 px / 16 px patches, CLS dropped
    records, _ = load_llava_json(_write_dataset(tmp_path), tmp_path / "images")
    rows = records_to_rows(records)
    rows.append({**rows[0], "id": "corrupt", "image_path": None, "image_bytes": b"\x89PNG not really"})
    rows.append({**rows[0], "id": "no-file", "image_path": str(tmp_path / "gone.png"), "image_bytes": None})
    rows.append({**rows[0], "id": "odd", "conversations": json.dumps(TWO_TURNS[:3])})
    wide = TrainRecord("wide", records[0].conversations, image_bytes=_png(96, 32, (255, 255, 255)))
    rows.append(wide.to_row())

    prepare = PrepareBatch(str(tiny_model_dir), template="v1", max_length=256)
    out = prepare(_batch(rows))
    n = len(rows)
    assert out["pixel_values"].shape == (n, 3, 64, 64) and out["pixel_values"].dtype == np.float32
    assert out["ok"].tolist() == [True, True, False, False, False, True]
    assert [reason_code(r) for r in out["reason"]] == [
        None,
        None,
        IMAGE_DECODE_ERROR,
        MISSING_IMAGE,
        BAD_TURNS,
        None,
    ]
    assert list(out["id"]) == [r["id"] for r in rows]
    for k in np.flatnonzero(out["ok"]):
        ids, labels = out["input_ids"][k], out["labels"][k]
        assert ids.dtype == np.int64 and ids.shape == labels.shape and ids.ndim == 1
        assert int((ids == layout.image_token_id).sum()) == 16
        assert (labels != IGNORE_INDEX).any()
    assert out["input_ids"][2].shape == (0,) and not out["pixel_values"][2].any()
    # The wide white image was padded to a square with the CLIP mean colour: top rows normalise to ~0.
    wide_pixels = out["pixel_values"][5]
    assert np.abs(wide_pixels[:, :8, :]).max() < 0.02
    assert wide_pixels[:, 32, :].min() > 1.5  # white, normalised

    # Same row through the plain template: the caption is supervised, the question is dropped.
    plain = PrepareBatch(str(tiny_model_dir), template="plain", max_length=256)(_batch(rows[:1]))
    assert plain["ok"].tolist() == [True]
    caption = plain["labels"][0][plain["labels"][0] != IGNORE_INDEX]
    assert prepare.tokenizer.decode(caption.tolist()).strip() == "A field."
    # A too-short max_length leaves nothing to learn: refused with a reason.
    short = PrepareBatch(str(tiny_model_dir), template="v1", max_length=20)(_batch(rows[:1]))
    assert reason_code(short["reason"][0]) == "no_supervised_tokens" and not short["truncated"][0]
    # One that cuts the answer short keeps the row and says so (the training loop counts it).
    n = len(out["input_ids"][0])
    part = PrepareBatch(str(tiny_model_dir), template="v1", max_length=n - 2)(_batch(rows[:1]))
    assert part["ok"].tolist() == [True] and part["truncated"].tolist() == [True]
    assert not out["truncated"][0]
    with pytest.raises(RequestError, match="image_size"):
        PrepareBatch(str(tiny_model_dir), template="v1", max_length=256, image_size=128)


def test_prepare_batch_flags_mismatch(tiny_model_dir: Path) -> None:
    conv = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "x ASSISTANT: y"}]
    row = {"id": "m", "image_bytes": _png(8, 8), "image_path": None, "conversations": json.dumps(conv)}
    out = PrepareBatch(str(tiny_model_dir), template="v1", max_length=256)(_batch([row]))
    assert reason_code(out["reason"][0]) == TOKENIZATION_MISMATCH and not out["ok"][0]


# ---------------------------------------------------------------------------------------- collate


def test_collate_pads_right() -> None:
    pixels = np.ones((3, 4, 4), dtype=np.float32)
    rows: list[dict[str, Any]] = [
        {
            "input_ids": np.array([1, 5, 6], np.int64),
            "labels": np.array([-100, 5, 6]),
            "pixel_values": pixels,
        },
        {"input_ids": [1, 7], "labels": [-100, 7], "pixel_values": pixels * 2, "ok": True},
    ]
    batch = collate(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].dtype == torch.long
    with pytest.raises(ValueError, match="not ok"):
        collate([{**rows[0], "ok": False, "id": "x", "reason": "bad"}], pad_token_id=0)


def test_rows_from_batch_reads_ray_nan_reasons() -> None:
    """Ray Data hands back an all-None ``reason`` column as float NaN."""
    batch = {
        "id": np.array(["a", "b"], dtype=object),
        "ok": np.array([True, False]),
        "reason": np.full(2, np.nan),
    }
    assert rows_from_batch(batch) == [{"id": "a", "ok": True, "reason": None}]
    assert len(rows_from_batch(batch, only_ok=False)) == 2
    assert reason_code(float("nan")) is None and reason_code("bad_turns: odd") == BAD_TURNS


def test_package_reexports_data_api() -> None:
    from rsflow import finetune

    assert finetune.collate is collate and finetune.PrepareBatch is PrepareBatch
    with pytest.raises(AttributeError):
        _ = finetune.nothing_here


def test_prepare_then_collate(tiny_model_dir: Path, tmp_path: Path) -> None:
    records, _ = load_llava_json(_write_dataset(tmp_path), tmp_path / "images")
    rows = records_to_rows(records)
    rows.append({**rows[0], "id": "corrupt", "image_path": None, "image_bytes": b"junk"})
    prepare = PrepareBatch(str(tiny_model_dir), template="v1", max_length=256)
    out = prepare(_batch(rows))
    kept = rows_from_batch(out)
    assert [r["id"] for r in kept] == ["good-a", "good-b"]
    batch = collate(kept, pad_token_id=prepare.layout.pad_token_id)
    lengths = [len(r["input_ids"]) for r in kept]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["pixel_values"].shape == (2, 3, 64, 64)


def test_text_only_records_are_trained_as_text_as_llava_does(tiny_model_dir: Path, tmp_path: Path) -> None:
    """mix665k (RS-LLaVA's stage 2) holds ~40k text-only ShareGPT conversations, some opening with the
    assistant. LLaVA trains them as text (no image span, no pixels) and drops a leading gpt turn; rsflow
    used to skip both. A record without an image whose text still says <image> is refused, and stage 1
    (plain) takes images only."""
    from transformers import LlavaForConditionalGeneration

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(_png(32, 32))
    chat = [{"from": "human", "value": "Name a river."}, {"from": "gpt", "value": "The Nile."}]
    with_image = [{"from": "human", "value": "<image>\nName a river."}, chat[1]]
    records_in = [
        {"id": "img", "image": "a.png", "conversations": with_image},
        {"id": "text", "conversations": chat},
        {"id": "gpt-opens", "conversations": [{"from": "gpt", "value": "Hello!"}, *chat]},
        {"id": "says-image", "conversations": with_image},
    ]
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(records_in))
    records, report = load_llava_json(path, images)
    assert [(r.id, r.has_image) for r in records] == [("img", True), ("text", False), ("gpt-opens", False)]
    assert records[2].conversations == records[1].conversations  # the opening gpt turn is dropped
    assert dict(report.skipped) == {NO_IMAGE: 1} and report.examples[NO_IMAGE] == ("says-image",)
    _, plain_report = load_llava_json(path, images, template="plain")
    assert plain_report.n_ok == 1 and dict(plain_report.skipped) == {NO_IMAGE: 2, BAD_TURNS: 1}
    # Parquet: a null image is a text-only record when the text names no image
    pq.write_table(pa.table({"id": ["t", "m"], "image": pa.array([None, None], pa.binary()),
                             "conversations": [json.dumps(chat), json.dumps(with_image)]}), tmp_path / "t.parquet")
    pq_records, pq_report = load_parquet_records(tmp_path / "t.parquet")
    assert [(r.id, r.has_image) for r in pq_records] == [("t", False)] and pq_report.skipped == {MISSING_IMAGE: 1}

    prepare = PrepareBatch(str(tiny_model_dir), template="v1", max_length=256)
    out = prepare(_batch(records_to_rows(records)))
    layout = prepare.layout
    assert out["ok"].tolist() == [True, True, True] and out["has_image"].tolist() == [True, False, False]
    image_ids, text_ids = out["input_ids"][0], out["input_ids"][1]
    assert int((image_ids == layout.image_token_id).sum()) == layout.n_image_tokens
    assert int((text_ids == layout.image_token_id).sum()) == 0
    assert np.array_equal(out["input_ids"][2], text_ids) and np.array_equal(out["labels"][2], out["labels"][1])
    # the same answer is supervised with or without the image: "The Nile." and its </s>
    supervised = [lab[lab != IGNORE_INDEX].tolist() for lab in out["labels"][:2]]
    assert supervised[0] == supervised[1]
    assert prepare.tokenizer.decode(supervised[1]).replace("</s>", "").strip() == "The Nile."
    # what LLaVA's preprocess_v1(has_image=False) gives: tokenizer(prompt), masked up to each answer
    prompt = render_v1(chat)
    assert text_ids.tolist() == prepare.tokenizer(prompt)["input_ids"]

    rows = rows_from_batch(out)
    batch = collate(rows, pad_token_id=layout.pad_token_id)
    assert batch["pixel_values"].shape == (1, 3, 64, 64)  # the image row's pixels only
    assert "pixel_values" not in collate(rows[1:], pad_token_id=layout.pad_token_id)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        mixed = model(**batch)
        text = model(**collate(rows[1:], pad_token_id=layout.pad_token_id))
    assert torch.isfinite(mixed.loss) and torch.isfinite(text.loss)


def test_fsdp_refuses_text_only_records_before_any_worker(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Under FSDP a rank whose micro-batch has no image would skip the vision tower's all-gathers while
    the other ranks run them (a hang); such data is refused up front, naming the strategy."""
    from rsflow.finetune.config import FinetuneConfig
    from rsflow.finetune.train import prepare_dataset

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(_png(16, 16))
    chat = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]
    seen = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A field."}]
    data = tmp_path / "mix.json"
    data.write_text(json.dumps([{"id": "t", "conversations": chat}, {"id": "i", "image": "a.png", "conversations": seen}]))
    config = FinetuneConfig(stage="instruct", base=str(tiny_model_dir), data=str(data), image_root=str(tmp_path / "images"),
                            strategy="fsdp", use_gpu=True, workers=2, global_batch=2)
    with pytest.raises(RequestError, match="1 text-only records, which fsdp cannot mix") as info:
        prepare_dataset(config)
    assert info.value.field == "strategy"


@pytest.mark.ray
def test_prepare_dataset_gives_the_same_rows_from_json_and_parquet(
    ray_local: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """``config.data`` as LLaVA JSON or as Parquet with image bytes: the same records reach the Ray Data
    preparation and come out as the same model-ready rows (skipped records counted, not prepared)."""
    from rsflow.finetune.config import FinetuneConfig
    from rsflow.finetune.train import prepare_dataset

    path = _write_dataset(tmp_path)
    good = [r for r in json.loads(path.read_text()) if isinstance(r, dict) and r["id"] in {"good-a", "good-b"}]
    pq.write_table(
        pa.table({
            "id": [r["id"] for r in good],
            "image": [(tmp_path / "images" / r["image"]).read_bytes() for r in good],
            "conversations": [json.dumps(r["conversations"]) for r in good],
        }),
        tmp_path / "data.parquet",
    )
    rows = {}
    for name, data in (("json", path), ("parquet", tmp_path / "data.parquet")):
        config = FinetuneConfig(stage="instruct", base=str(tiny_model_dir), data=str(data),
                                image_root=str(tmp_path / "images"), max_length=512, shuffle=False)
        dataset, n = prepare_dataset(config)
        assert n == 2  # 10 bad JSON records were counted and left out
        rows[name] = sorted(dataset.take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in rows["json"]] == ["good-a", "good-b"]
    for a, b in zip(rows["json"], rows["parquet"], strict=True):
        assert a["ok"] and b["ok"]
        assert np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["labels"], b["labels"])
        assert np.array_equal(a["pixel_values"], b["pixel_values"])
