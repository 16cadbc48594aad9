"""Training data for LLaVA-style finetuning: records, templates, label masking, the Ray Data batch UDF.

Stages, in the order the training pipeline runs them:

1. **Records** (driver): ``load_llava_json`` / ``load_parquet_records`` read the LLaVA conversation
   format (reference ``models.md`` 2.1) into frozen ``TrainRecord`` s. Records that cannot be trained
   on are counted per reason in a ``RecordReport`` (with up to ``MAX_EXAMPLES`` ids each), never
   dropped silently.
2. **Templates** (pure): ``render_plain`` (stage 1, ``conv_llava_plain``) and ``render_v1`` (stage 2,
   ``conv_vicuna_v1``), byte for byte as LLaVA's ``preprocess_plain`` / ``preprocess_v1`` build them.
3. **Labels** (pure): ``tokenize_with_labels`` reproduces LLaVA's label arithmetic (``models.md`` 2.2)
   on the unexpanded sequence (the image is ONE placeholder position there, as in LLaVA), then expands
   the placeholder into ``n_image_tokens`` image-token positions and truncates.
4. **Batches** (Ray Data workers): ``PrepareBatch`` decodes images, pads them to a square with the
   processor's mean colour, runs the CLIP processor and tokenises; failures are rows with
   ``ok=False`` and a ``reason``.
5. **Collation** (training loop): ``collate`` right-pads a list of prepared rows into tensors.

The training loop therefore never decodes an image or calls the tokenizer.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, get_args

import numpy as np
import torch

from rsflow.errors import RequestError
from rsflow.models.formats import llava_chunked_ids
from rsflow.models.imaging import background_from_processor, expand2square
from rsflow.models.prompts import ASSISTANT_ROLE, IMAGE_TOKEN, SYSTEM_VICUNA_V1, USER_ROLE

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------- constants

IGNORE_INDEX: Final[int] = -100
"""Label of a position the loss ignores (LLaVA ``IGNORE_INDEX``; torch cross-entropy default)."""

IMAGE_PLACEHOLDER: Final[int] = -200
"""LLaVA's ``IMAGE_TOKEN_INDEX``: the single id standing for the image in the unexpanded sequence."""

Template = Literal["plain", "v1"]
"""``"plain"``: stage-1 projector alignment (``conv_llava_plain``); ``"v1"``: stage-2 instruction
tuning (``conv_vicuna_v1``, LLaVA's ``--version v1``)."""

TEMPLATES: Final[tuple[str, ...]] = get_args(Template)

BoundaryFix = Literal["measured", "llava"]
Truncation = Literal["expanded", "text"]
"""Where ``max_length`` counts (``tokenize_with_labels``): ``"expanded"``, the sequence with its image
features spliced in (final LLaVA: ``tokenizer_model_max_length``); ``"text"``, the text with the image
as one position, expanded afterwards without a second cut (GeoChat's copy of LLaVA: its collator's
cut only, so a 2048 limit leaves 2047 text positions beside 1296 image features)."""
TRUNCATIONS: Final[tuple[str, ...]] = get_args(Truncation)
"""How the length of a round that follows ``</s>`` is corrected (see ``tokenize_with_labels``)."""

HUMAN: Final[str] = "human"
GPT: Final[str] = "gpt"

V1_SEP: Final[str] = " "
"""``conv_vicuna_v1.sep``: after a USER message."""
V1_SEP2: Final[str] = "</s>"
"""``conv_vicuna_v1.sep2``: after an ASSISTANT message; also what rounds are split on."""
PLAIN_SEP: Final[str] = "\n"
"""``conv_llava_plain.sep``: ends the caption of a stage-1 sample."""

# Reasons a record or a prepared row is not trained on. A prepared row's ``reason`` is
# ``"<code>: <detail>"`` (or just the code); ``reason_code`` returns the code.
MALFORMED: Final[str] = "malformed"
"""Not a LLaVA record: not an object, ``conversations`` not a list of ``{"from", "value"}`` strings."""
BAD_TURNS: Final[str] = "bad_turns"
"""Empty or odd conversation, an empty message, a turn not ``human``/``gpt``, not alternating
human/gpt, not starting with human, or (plain template) not exactly one human + one gpt turn."""
NO_IMAGE_TOKEN: Final[str] = "no_image_token"
"""The first human turn has no ``<image>``."""
EXTRA_IMAGE_TOKEN: Final[str] = "extra_image_token"
"""``<image>`` in a turn other than the first: LLaVA would make a second placeholder for one image."""
NO_IMAGE: Final[str] = "no_image"
"""The record names no image but cannot be trained as text: its text holds ``<image>``, or the template is
``plain`` (stage 1 aligns images with captions). Text-only records of the ``v1`` template (mix665k's
ShareGPT conversations) are trained as text, as LLaVA does."""
MISSING_IMAGE: Final[str] = "missing_image"
"""The image file does not exist (JSON) or the image bytes are null/empty (Parquet)."""
IMAGE_DECODE_ERROR: Final[str] = "image_decode_error"
"""The image could not be opened/decoded/processed (``PrepareBatch``)."""
TOKENIZATION_MISMATCH: Final[str] = "tokenization_mismatch"
"""LLaVA's safety check failed: the label arithmetic does not add up to the sequence length."""
NO_SUPERVISED_TOKENS: Final[str] = "no_supervised_tokens"
"""Every answer token was cut by ``max_length``: the sample would contribute no loss."""

ROW_REASONS: Final[tuple[str, ...]] = (
    MALFORMED, BAD_TURNS, NO_IMAGE_TOKEN, EXTRA_IMAGE_TOKEN, NO_IMAGE, MISSING_IMAGE, IMAGE_DECODE_ERROR,
    TOKENIZATION_MISMATCH, NO_SUPERVISED_TOKENS,
)
"""Every reason code a ``PrepareBatch`` row can fail with (the training loop counts rows per code)."""

MAX_EXAMPLES: Final[int] = 20
"""Example ids kept per reason in a ``RecordReport``."""


# ---------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Turn:
    """One message of a LLaVA conversation."""

    role: str
    """``"human"`` or ``"gpt"`` (LLaVA's ``from``)."""
    value: str
    """The message text; the first human turn of a record with an image holds ``<image>``."""

    def to_llava(self) -> dict[str, str]:
        """``{"from": role, "value": value}``."""
        return {"from": self.role, "value": self.value}


ConversationLike = Sequence[Turn] | Sequence[Mapping[str, Any]]
"""``Turn`` s or LLaVA dicts ``{"from": "human"|"gpt", "value": str}``."""


@dataclass(frozen=True)
class TrainRecord:
    """One training sample: a conversation, about an image or (text-only, ``v1`` only) not."""

    id: str
    """The record's id (LLaVA ``id``; ``"#<index>"`` when the source has none)."""
    conversations: tuple[Turn, ...]
    """Alternating human/gpt turns, human first, ``<image>`` in the first human turn when there is an
    image and in no turn when there is none (checked)."""
    image_path: str | None = None
    """Image file (``image_root / image`` for JSON sources); at most one of path and bytes is set."""
    image_bytes: bytes | None = None
    """Encoded image (PNG/JPEG/...; Parquet sources). Neither set: a text-only record."""

    def __post_init__(self) -> None:
        if self.image_path is not None and self.image_bytes is not None:
            raise ValueError(f"record {self.id!r}: set at most one of image_path and image_bytes")

    @property
    def has_image(self) -> bool:
        """False for a text-only record (LLaVA trains those as text: no image span, no pixels)."""
        return self.image_path is not None or self.image_bytes is not None

    def to_row(self) -> dict[str, Any]:
        """The input row ``PrepareBatch`` takes: ``id``, ``image_path``, ``image_bytes``,
        ``conversations`` (JSON string of LLaVA dicts)."""
        return {
            "id": self.id,
            "image_path": self.image_path,
            "image_bytes": self.image_bytes,
            "conversations": json.dumps([t.to_llava() for t in self.conversations], ensure_ascii=False),
        }


@dataclass(frozen=True)
class RecordReport:
    """What a loader read: how many records are usable and, per reason, how many are not."""

    source: str
    """The data file (or files) read."""
    n_records: int
    """Records in the source."""
    n_ok: int
    """Records returned."""
    skipped: Mapping[str, int] = field(default_factory=dict)
    """Reason code (``MALFORMED``, ``BAD_TURNS``, ``NO_IMAGE_TOKEN``, ...) -> records skipped for it."""
    examples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Reason code -> up to ``MAX_EXAMPLES`` ids of skipped records, first ones first."""
    duration_seconds: float = 0.0
    """Wall time spent reading and checking, seconds."""

    @property
    def n_skipped(self) -> int:
        """Records not returned."""
        return sum(self.skipped.values())

    def merge(self, other: RecordReport) -> RecordReport:
        """The report of both sources together (counts added, examples concatenated and capped)."""
        skipped = dict(self.skipped)
        examples = {k: list(v) for k, v in self.examples.items()}
        for reason, count in other.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
        for reason, ids in other.examples.items():
            examples.setdefault(reason, []).extend(ids)
        return RecordReport(
            source=f"{self.source} + {other.source}",
            n_records=self.n_records + other.n_records,
            n_ok=self.n_ok + other.n_ok,
            skipped=dict(sorted(skipped.items())),
            examples={k: tuple(v[:MAX_EXAMPLES]) for k, v in sorted(examples.items())},
            duration_seconds=self.duration_seconds + other.duration_seconds,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the run manifest."""
        return {
            "source": self.source,
            "n_records": self.n_records,
            "n_ok": self.n_ok,
            "n_skipped": self.n_skipped,
            "skipped": dict(self.skipped),
            "examples": {k: list(v) for k, v in self.examples.items()},
            "duration_seconds": self.duration_seconds,
        }


class _ReportBuilder:
    def __init__(self, source: str) -> None:
        self.source = source
        self.n_records = 0
        self.n_ok = 0
        self.skipped: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.t0 = time.perf_counter()

    def skip(self, record_id: str, reason: str, detail: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < MAX_EXAMPLES:
            ids.append(record_id)
        logger.debug("skipping record %s: %s (%s)", record_id, reason, detail)

    def build(self) -> RecordReport:
        report = RecordReport(
            source=self.source,
            n_records=self.n_records,
            n_ok=self.n_ok,
            skipped=dict(sorted(self.skipped.items())),
            examples={k: tuple(v) for k, v in sorted(self.examples.items())},
            duration_seconds=time.perf_counter() - self.t0,
        )
        if report.n_skipped:
            logger.warning(
                "%s: %d of %d records skipped (%s)",
                self.source,
                report.n_skipped,
                report.n_records,
                ", ".join(f"{k}: {v}" for k, v in report.skipped.items()),
            )
        logger.info("%s: %d usable records", self.source, report.n_ok)
        return report


def as_turns(conversations: ConversationLike) -> tuple[Turn, ...]:
    """Normalise a conversation to ``Turn`` s.

    Args:
        conversations: ``Turn`` s or LLaVA dicts with string ``from`` and ``value``.

    Returns:
        The turns, in order (roles are not checked here; see ``conversation_problem``).

    Raises:
        TypeError: not a list of turns/dicts, or a ``from``/``value`` that is missing or not a string.
    """
    if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence | np.ndarray):
        raise TypeError(f"conversations must be a list of turns, got {type(conversations).__name__}")
    turns: list[Turn] = []
    for index, item in enumerate(conversations):
        if isinstance(item, Turn):
            turns.append(item)
            continue
        if not isinstance(item, Mapping):
            raise TypeError(f"turn {index} is a {type(item).__name__}, not an object")
        role, value = item.get("from"), item.get("value")
        if not isinstance(role, str) or not isinstance(value, str):
            raise TypeError(
                f"turn {index} needs string 'from' and 'value', got {role!r} and {type(value).__name__}"
            )
        turns.append(Turn(role, value))
    return tuple(turns)


def drop_leading_gpt(turns: Sequence[Turn], template: Template | None = None) -> tuple[Turn, ...]:
    """LLaVA's ``preprocess_v1``: a conversation whose first turn is not from the human starts at its
    second turn (ShareGPT records of mix665k open with the assistant). The plain template keeps it
    (LLaVA's ``preprocess_plain`` takes exactly one human and one gpt turn)."""
    if template != "plain" and turns and turns[0].role != HUMAN:
        return tuple(turns[1:])
    return tuple(turns)


def conversation_problem(
    turns: Sequence[Turn], template: Template | None = None, *, has_image: bool = True
) -> tuple[str, str] | None:
    """Why a conversation cannot be trained on, or None.

    Rules, checked in this order: at least one turn, an even number of turns, roles alternating
    ``human``, ``gpt``, ... (so it starts with human and ends with gpt), no message blank
    (``value.strip() == ""``), for ``template="plain"`` exactly two turns; then, with an image,
    ``<image>`` in the first human turn (several there are fine: LLaVA's ``preprocess_multimodal``
    collapses them into one) and in no other turn; without one (a text-only record), a template other
    than plain and no ``<image>`` anywhere.

    Args:
        turns: the conversation (after :func:`drop_leading_gpt`).
        template: also apply the template's rule (plain: one exchange); None: the general rules only.
        has_image: whether the record has an image.

    Returns:
        ``(reason code, detail)``: ``BAD_TURNS``, ``NO_IMAGE_TOKEN``, ``EXTRA_IMAGE_TOKEN`` or
        ``NO_IMAGE``; None if fine.
    """
    if not turns:
        return BAD_TURNS, "empty conversation"
    if len(turns) % 2:
        return BAD_TURNS, f"odd number of turns ({len(turns)}): every human turn needs a gpt answer"
    for index, turn in enumerate(turns):
        expected = HUMAN if index % 2 == 0 else GPT
        if turn.role != expected:
            return (
                BAD_TURNS,
                f"turn {index} is from {turn.role!r}, expected {expected!r} (alternating, human first)",
            )
        if not turn.value.strip():
            return BAD_TURNS, f"turn {index} ({turn.role}) is empty"
    if template == "plain" and len(turns) != 2:
        return BAD_TURNS, f"the plain template takes one human and one gpt turn, got {len(turns)} turns"
    if not has_image:
        if template == "plain":
            return NO_IMAGE, "no image: the plain template (stage 1) aligns images with their captions"
        with_token = [i for i, t in enumerate(turns) if IMAGE_TOKEN in t.value]
        if with_token:
            return NO_IMAGE, f"no image, but {IMAGE_TOKEN} in turn(s) {with_token}"
        return None
    if IMAGE_TOKEN not in turns[0].value:
        return NO_IMAGE_TOKEN, f"the first human turn has no {IMAGE_TOKEN}"
    later = [i for i, t in enumerate(turns) if i and IMAGE_TOKEN in t.value]
    if later:
        return EXTRA_IMAGE_TOKEN, f"{IMAGE_TOKEN} also in turn(s) {later}; one image per record"
    return None


def _record_id(raw: Any, index: int) -> str:
    rid = raw.get("id") if isinstance(raw, Mapping) else None
    return str(rid) if rid is not None and str(rid) != "" else f"#{index}"


def _checked_turns(
    raw_conversations: Any, rid: str, report: _ReportBuilder, template: Template | None, has_image: bool
) -> tuple[Turn, ...] | None:
    if isinstance(raw_conversations, str):
        try:
            raw_conversations = json.loads(raw_conversations)
        except json.JSONDecodeError as exc:
            report.skip(rid, MALFORMED, f"conversations is not valid JSON ({exc})")
            return None
    try:
        turns = as_turns(raw_conversations)
    except TypeError as exc:
        report.skip(rid, MALFORMED, str(exc))
        return None
    turns = drop_leading_gpt(turns, template)
    problem = conversation_problem(turns, template, has_image=has_image)
    if problem is not None:
        report.skip(rid, *problem)
        return None
    return turns


def load_llava_json(
    path: str | os.PathLike[str], image_root: str | os.PathLike[str], *, template: Template | None = None
) -> tuple[list[TrainRecord], RecordReport]:
    """Read a LLaVA conversation JSON file (GeoChat_Instruct, RS-instructions, LLaVA mixes).

    The file is a list of ``{"id", "image": path relative to image_root, "conversations":
    [{"from": "human"|"gpt", "value": ...}, ...]}``. Each record is checked (``conversation_problem``,
    then the image file must exist: one ``os.path.isfile`` per record); failures are counted in the
    report, not returned. A record without ``image`` (LLaVA's text-only conversations) is a text-only
    record, except for the plain template or with ``<image>`` in its text (``NO_IMAGE``); a first turn
    from ``gpt`` is dropped (:func:`drop_leading_gpt`).

    Args:
        path: the JSON file.
        image_root: folder the ``image`` paths are relative to (LLaVA's ``--image_folder``); an
            absolute ``image`` path is used as is.
        template: also count records the template cannot take (``"plain"``: more than one exchange)
            as ``BAD_TURNS``; None: the general rules only (``PrepareBatch`` still refuses them).

    Returns:
        The usable records in file order, and the report.

    Raises:
        RequestError: ``data`` when the file is missing, not JSON or not a list; ``image_root`` when
            that folder does not exist.
    """
    source = Path(path).expanduser()
    root = Path(image_root).expanduser()
    if not source.is_file():
        raise RequestError("data", f"{source} does not exist; give a LLaVA conversation JSON file")
    if not root.is_dir():
        raise RequestError(
            "image_root", f"{root} is not a folder; give the folder the 'image' paths are relative to"
        )
    try:
        raw = json.loads(source.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError("data", f"{source} is not valid JSON ({exc})") from exc
    if not isinstance(raw, list):
        raise RequestError("data", f"{source} must hold a JSON list of records, got {type(raw).__name__}")

    report = _ReportBuilder(str(source))
    records: list[TrainRecord] = []
    for index, item in enumerate(raw):
        report.n_records += 1
        rid = _record_id(item, index)
        if not isinstance(item, Mapping):
            report.skip(rid, MALFORMED, f"record is a {type(item).__name__}, not an object")
            continue
        image = item.get("image")
        turns = _checked_turns(item.get("conversations"), rid, report, template, image is not None and image != "")
        if turns is None:
            continue
        if image is None or image == "":  # a text-only record
            records.append(TrainRecord(id=rid, conversations=turns))
            report.n_ok += 1
            continue
        if not isinstance(image, str):
            report.skip(rid, MALFORMED, f"'image' must be a path string, got {type(image).__name__}")
            continue
        image_path = root / image
        if not image_path.is_file():
            report.skip(rid, MISSING_IMAGE, f"{image_path} does not exist")
            continue
        records.append(TrainRecord(id=rid, conversations=turns, image_path=str(image_path)))
        report.n_ok += 1
    return records, report.build()


_PARQUET_COLUMNS: Final[tuple[str, ...]] = ("id", "image", "conversations")


def _mentions_image(conversations: Any) -> bool:
    """Whether a raw conversation cell (JSON text or turn structs) holds ``<image>`` anywhere."""
    if isinstance(conversations, str):
        return IMAGE_TOKEN in conversations
    return any(isinstance(t, Mapping) and IMAGE_TOKEN in str(t.get("value", "")) for t in conversations or ())


def _image_bytes(value: Any) -> bytes | None:
    """Bytes of a Parquet ``image`` cell: binary, or a Hugging Face ``Image`` struct ``{"bytes", "path"}``."""
    if isinstance(value, Mapping):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return data or None
    return None


def load_parquet_records(
    path: str | os.PathLike[str], *, template: Template | None = None
) -> tuple[list[TrainRecord], RecordReport]:
    """Read training records from Parquet (a file or a folder of files).

    Columns: ``id`` (string or integer), ``image`` (binary: the encoded PNG/JPEG; a Hugging Face
    ``datasets`` Image struct ``{bytes, path}`` is also accepted) and ``conversations`` (a JSON string
    of LLaVA turns, or a list of ``{from, value}`` structs). Records are checked as in
    ``load_llava_json``; a null or empty image is a text-only record when no turn holds ``<image>``
    (and the template is not plain), else ``MISSING_IMAGE``. The image bytes are not decoded here
    (``PrepareBatch`` does, and reports undecodable ones).

    Args:
        path: a Parquet file or a folder of them.
        template: see ``load_llava_json``.

    Returns:
        The usable records in table order, and the report.

    Raises:
        RequestError: ``data`` when the path is missing, unreadable or lacks a required column.
    """
    import pyarrow.parquet as pq

    source = Path(path).expanduser()
    if not source.exists():
        raise RequestError("data", f"{source} does not exist; give a Parquet file or folder")
    try:
        schema_names = set(pq.read_schema(source).names) if source.is_file() else None
        if schema_names is not None and not set(_PARQUET_COLUMNS) <= schema_names:
            missing = sorted(set(_PARQUET_COLUMNS) - schema_names)
            raise RequestError("data", f"{source} lacks column(s) {missing}; needs {list(_PARQUET_COLUMNS)}")
        table = pq.read_table(source, columns=list(_PARQUET_COLUMNS))
    except RequestError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, KeyError... for the same fault
        raise RequestError(
            "data", f"{source}: cannot read {list(_PARQUET_COLUMNS)} as Parquet ({type(exc).__name__}: {exc})"
        ) from exc

    report = _ReportBuilder(str(source))
    records: list[TrainRecord] = []
    for index, row in enumerate(table.to_pylist()):
        report.n_records += 1
        rid = _record_id(row, index)
        data = _image_bytes(row.get("image"))
        if data is None and _mentions_image(row.get("conversations")):
            report.skip(rid, MISSING_IMAGE, "image is null or empty")
            continue
        turns = _checked_turns(row.get("conversations"), rid, report, template, data is not None)
        if turns is None:
            continue
        records.append(TrainRecord(id=rid, conversations=turns, image_bytes=data))
        report.n_ok += 1
    return records, report.build()


# ---------------------------------------------------------------------------------------- templates


def move_image_first(conversations: ConversationLike) -> tuple[Turn, ...]:
    """LLaVA's ``preprocess_multimodal`` (``mm_use_im_start_end=False``).

    Every message that contains ``<image>`` has all its ``<image>`` removed, is stripped, gets
    ``"<image>\\n"`` prepended and is stripped again (so a message that was only ``<image>`` becomes
    ``"<image>"``). Other messages are unchanged.
    """
    out: list[Turn] = []
    for turn in as_turns(conversations):
        value = turn.value
        if IMAGE_TOKEN in value:
            value = (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip()
        out.append(Turn(turn.role, value))
    return tuple(out)


def render_plain(conversations: ConversationLike) -> str:
    """Stage-1 text (``conv_llava_plain``, LLaVA ``preprocess_plain``): ``"<image>" + caption + "\\n"``.

    The human message is replaced by ``<image>`` whatever else it says; the caption (the gpt message)
    is used as is.

    Args:
        conversations: one human turn (with ``<image>``) and one gpt turn.

    Returns:
        The sample text.

    Raises:
        ValueError: not exactly two turns human then gpt, no ``<image>`` in the human turn, or an
            ``<image>`` in the caption.
    """
    turns = move_image_first(conversations)
    if len(turns) != 2 or turns[0].role != HUMAN or turns[1].role != GPT:
        raise ValueError("the plain template takes exactly one human turn and one gpt turn")
    if IMAGE_TOKEN not in turns[0].value:
        raise ValueError(f"the human turn of a plain sample must contain {IMAGE_TOKEN}")
    if IMAGE_TOKEN in turns[1].value:
        raise ValueError(f"the caption of a plain sample must not contain {IMAGE_TOKEN}")
    return IMAGE_TOKEN + turns[1].value + PLAIN_SEP


def render_v1(conversations: ConversationLike, system: str = SYSTEM_VICUNA_V1) -> str:
    """Stage-2 text (``conv_vicuna_v1.get_prompt()`` after ``preprocess_multimodal``).

    ``<SYSTEM> USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>``: the system string and
    a space, then per message ``ROLE + ": " + text`` followed by ``" "`` after a USER message and
    ``"</s>"`` after an ASSISTANT message. As in LLaVA's separator style TWO, an empty message renders
    as ``ROLE + ":"`` with no separator (the loaders never let one through).

    Args:
        conversations: alternating human/gpt turns, human first.
        system: the system sentence; LLaVA and GeoChat TRAINED with ``SYSTEM_VICUNA_V1``.

    Returns:
        The sample text.

    Raises:
        ValueError: turns that do not alternate human/gpt starting with human.
    """
    turns = move_image_first(conversations)
    roles = {HUMAN: USER_ROLE, GPT: ASSISTANT_ROLE}
    seps = (V1_SEP, V1_SEP2)
    text = system + V1_SEP
    for index, turn in enumerate(turns):
        expected = HUMAN if index % 2 == 0 else GPT
        if turn.role != expected:
            raise ValueError(f"turn {index} is from {turn.role!r}, expected {expected!r}")
        role = roles[turn.role]
        text += f"{role}: {turn.value}{seps[index % 2]}" if turn.value else f"{role}:"
    return text


# ---------------------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class TokenizedSample:
    """Token ids and labels of one sample, image span expanded and truncated."""

    input_ids: list[int]
    """Token ids; the image is ``n_image_tokens`` copies of ``image_token_id``."""
    labels: list[int]
    """Same length; ``IGNORE_INDEX`` (-100) wherever the loss is not taken."""
    mismatch: bool
    """LLaVA's "tokenization mismatch": the label arithmetic did not add up; every label is -100."""
    truncated: bool = False
    """``max_length`` cut the sequence (answer tokens may be lost; ``PrepareBatch`` reports it)."""

    @property
    def n_supervised(self) -> int:
        """Positions that carry a label."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _ids(tokenizer: Any, text: str) -> list[int]:
    """LLaVA's ``tokenizer_image_token``: chunks split at ``<image>``, first BOS only, -200 between."""
    return llava_chunked_ids(tokenizer, text, IMAGE_PLACEHOLDER, 1)


def is_legacy_tokenizer(tokenizer: Any) -> bool:
    """Whether text after a special token is tokenised as if it started the text (transformers' ``legacy``).

    LLaVA's ``-1`` fix keys on ``tokenizer.legacy`` (slow ``LlamaTokenizer``, transformers <= 4.37).
    In transformers 5 every tokenizer is ``tokenizers``-backed and most carry no ``legacy`` attribute
    (or one that only echoes ``tokenizer_config.json``), so the behaviour the flag controlled is probed
    directly: legacy means SentencePiece's dummy prefix ``▁`` is added to the text that follows a special
    token, i.e. ``"</s>USER"`` tokenises its ``USER`` exactly like a standalone ``"USER"``.

    Args:
        tokenizer: a transformers tokenizer.

    Returns:
        True for legacy behaviour (no fix in LLaVA), False otherwise (LLaVA subtracts 1).
    """
    alone = list(tokenizer(USER_ROLE, add_special_tokens=False)["input_ids"])
    after = list(tokenizer(V1_SEP2 + USER_ROLE, add_special_tokens=False)["input_ids"])
    return after[1:] == alone


def _boundary_delta(tokenizer: Any, round_text: str, boundary_fix: BoundaryFix, legacy: bool | None) -> int:
    """Tokens a round has after ``</s>`` in the full text minus tokens it has standalone (BOS excluded)."""
    if boundary_fix == "llava":
        # IS_TOKENIZER_GREATER_THAN_0_14 is always true here (transformers 5 needs tokenizers >= 0.21).
        return 0 if legacy else -1
    in_context = len(_ids(tokenizer, V1_SEP2 + round_text)) - len(_ids(tokenizer, V1_SEP2))
    standalone = len(_ids(tokenizer, round_text)) - 1
    return in_context - standalone


def _mask(labels: list[int], start: int, stop: int) -> None:
    for k in range(max(start, 0), min(stop, len(labels))):
        labels[k] = IGNORE_INDEX


def _v1_labels(
    prompt: str, ids: list[int], tokenizer: Any, max_length: int, boundary_fix: BoundaryFix
) -> tuple[list[int], bool]:
    """``preprocess_v1``'s masking of one unexpanded sequence; returns (labels, mismatch)."""
    labels = list(ids)
    total_len = len(ids)  # LLaVA: ids != pad (= unk); no pad exists yet, and byte fallback never emits unk
    sep = V1_SEP + ASSISTANT_ROLE + ": "
    legacy = is_legacy_tokenizer(tokenizer) if boundary_fix == "llava" else None
    cur_len = 1  # the BOS
    _mask(labels, 0, cur_len)
    for index, round_text in enumerate(prompt.split(V1_SEP2)):
        if round_text == "":
            break
        parts = round_text.split(sep)
        if len(parts) != 2:
            break
        instruction = parts[0] + sep
        # round_len counts a BOS that stands for the round's closing </s>; "- 2" drops the BOS and the
        # trailing-space token that, in the joined text, merges into the answer's first word.
        round_len = len(_ids(tokenizer, round_text))
        instruction_len = len(_ids(tokenizer, instruction)) - 2
        if index != 0:
            delta = _boundary_delta(tokenizer, round_text, boundary_fix, legacy)
            round_len += delta
            instruction_len += delta
        _mask(labels, cur_len, cur_len + instruction_len)
        cur_len += round_len
    _mask(labels, cur_len, len(labels))
    mismatch = cur_len < max_length and cur_len != total_len
    if mismatch:
        logger.debug("tokenization mismatch: %d vs. %d (sample ignored)", cur_len, total_len)
        labels = [IGNORE_INDEX] * len(labels)
    return labels, mismatch


def tokenize_with_labels(
    conversations: ConversationLike,
    tokenizer: Any,
    *,
    template: Template,
    max_length: int,
    image_token_id: int,
    n_image_tokens: int,
    system: str = SYSTEM_VICUNA_V1,
    boundary_fix: BoundaryFix = "measured",
    truncation: Truncation = "expanded",
    has_image: bool = True,
) -> TokenizedSample:
    """Token ids and training labels of one conversation, exactly as LLaVA masks them.

    Steps (reference ``models.md`` 2.2):

    1. Render the text (``render_plain`` / ``render_v1``) and tokenise it like
       ``tokenizer_image_token``: chunks split at ``<image>`` tokenised separately, the first BOS kept,
       ONE placeholder for the image.
    2. Mask on that unexpanded sequence, where the image counts as one position, as LLaVA does:

       - plain (``preprocess_plain``): the first ``len(ids("<image>"))`` = 2 positions (BOS, image)
         are -100; the caption and its ``"\\n"`` are supervised.
       - v1 (``preprocess_v1``): BOS masked; the text is split into rounds on ``"</s>"`` and each
         round on ``" ASSISTANT: "``; ``round_len = len(ids(round))`` (its BOS stands for the
         ``</s>`` split off), ``instruction_len = len(ids(instruction + " ASSISTANT: ")) - 2``;
         ``[cur_len, cur_len + instruction_len)`` is masked and ``cur_len += round_len``; everything
         from the final ``cur_len`` on is masked. Supervised: each answer and its ``</s>``.
       - Rounds after the first begin right after ``</s>``, where a tokenizer may split the text
         differently than standalone. LLaVA corrects both lengths of rounds ``i != 0`` by ``-1`` when
         the tokenizer is non-legacy (``is_legacy_tokenizer``) and tokenizers >= 0.14:
         ``boundary_fix="llava"`` does exactly that. ``"measured"`` (default) uses the actual
         difference ``len(ids("</s>" + round)) - len(ids("</s>")) - (len(ids(round)) - 1)``. That is 0
         for legacy SentencePiece and -1 for non-legacy LLaMA/Vicuna SentencePiece (``"USER"`` is
         ``▁`` + pieces standalone but loses the ``▁`` after ``</s>``), i.e. LLaVA's values, but +1 for
         BPE vocabularies with a merged ``▁USER:`` piece (the tiny test tokenizer), where LLaVA's rule
         would flag every multi-turn sample as a mismatch and train on nothing from it.
       - Safety check: if ``cur_len < max_length`` and ``cur_len`` differs from the sequence length,
         every label becomes -100 and ``mismatch`` is True (the caller counts it). LLaVA counts
         ``ids != pad`` with ``pad = unk``; here there is no padding yet and byte-fallback tokenizers
         emit no ``unk``, so the sequence length is used.

    3. Replace the placeholder by ``n_image_tokens`` copies of ``image_token_id`` (labels -100) and
       truncate ids and labels to ``max_length``. LLaVA's collator truncates the UNEXPANDED ids to
       ``model_max_length``; final LLaVA truncates again after splicing the image features, and since
       the image sits in the first few positions both equal one cut of the expanded sequence
       (``truncation="expanded"``). GeoChat's older copy has no second cut: ``truncation="text"``
       cuts the unexpanded ids, then expands.

    Args:
        conversations: alternating human/gpt turns, human first, ``<image>`` in the first human turn.
        tokenizer: the model's transformers tokenizer (adds a BOS, knows ``</s>`` as a special token).
        template: ``"plain"`` (stage 1) or ``"v1"`` (stage 2).
        max_length: longest sequence kept (LLaVA: 2048), counted as ``truncation`` says.
        image_token_id: the id ``LlavaForConditionalGeneration`` fills with image features.
        n_image_tokens: image features per image (576 at 336 px, 1296 for GeoChat at 504 px).
        system: v1 system sentence (``SYSTEM_VICUNA_V1``, what LLaVA and GeoChat trained with).
        boundary_fix: ``"measured"`` or ``"llava"`` (see step 2).
        truncation: ``"expanded"`` (final LLaVA) or ``"text"`` (GeoChat; see step 3).
        has_image: False for a text-only conversation (``v1`` only): no ``<image>`` and no image span,
            tokenised and masked as LLaVA's ``preprocess_v1(..., has_image=False)`` does.

    Returns:
        The sample; ``mismatch`` samples have every label -100.

    Raises:
        ValueError: an unknown template, ``max_length``/``n_image_tokens`` < 1, a conversation the
            template cannot render, not exactly one image, or a tokenizer that adds no BOS (LLaVA's
            arithmetic assumes one).
        TypeError: ``conversations`` is not a list of turns (see ``as_turns``).
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    if max_length < 1 or n_image_tokens < 1:
        raise ValueError(f"max_length ({max_length}) and n_image_tokens ({n_image_tokens}) must be >= 1")
    prompt = render_plain(conversations) if template == "plain" else render_v1(conversations, system)
    ids = _ids(tokenizer, prompt)
    if not ids or tokenizer.bos_token_id is None or ids[0] != tokenizer.bos_token_id:
        raise ValueError("the tokenizer adds no BOS token; LLaVA's label arithmetic needs one")
    if not has_image and template == "plain":
        raise ValueError("the plain template needs an image")
    if ids.count(IMAGE_PLACEHOLDER) != int(has_image):
        raise ValueError(
            f"expected {'exactly one' if has_image else 'no'} {IMAGE_TOKEN} in the rendered text, "
            f"found {ids.count(IMAGE_PLACEHOLDER)}"
        )

    if template == "plain":
        labels = list(ids)
        _mask(labels, 0, len(_ids(tokenizer, IMAGE_TOKEN)))
        mismatch = False
    else:
        labels, mismatch = _v1_labels(prompt, ids, tokenizer, max_length, boundary_fix)

    cut_text = truncation == "text" and len(ids) > max_length
    if truncation == "text":
        ids, labels = ids[:max_length], labels[:max_length]
    out_ids: list[int] = []
    out_labels: list[int] = []
    for token, label in zip(ids, labels, strict=True):
        if token == IMAGE_PLACEHOLDER:
            out_ids += [image_token_id] * n_image_tokens
            out_labels += [IGNORE_INDEX] * n_image_tokens
        else:
            out_ids.append(token)
            out_labels.append(label)
    if truncation == "text":
        return TokenizedSample(out_ids, out_labels, mismatch, cut_text)
    truncated = len(out_ids) > max_length
    return TokenizedSample(out_ids[:max_length], out_labels[:max_length], mismatch, truncated)


# ---------------------------------------------------------------------------------------- model layout


@dataclass(frozen=True)
class TokenLayout:
    """What the text side of a LLaVA checkpoint needs to know about its image span."""

    image_token_id: int
    """Id of the image token (``config.image_token_id``)."""
    n_image_tokens: int
    """Image features per image: ``(image_size // patch_size) ** 2``, +1 with the ``"full"`` strategy."""
    pad_token_id: int
    """Padding id for ``collate`` (the tokenizer's pad, else its unk as in LLaVA, else 0)."""
    image_size: int
    """Square model input side, pixels."""


def _layout(config: Any, tokenizer: Any, image_size: int | None) -> TokenLayout:
    vision = config.vision_config
    tower = int(vision.image_size)
    size = tower if image_size is None else int(image_size)
    if size != tower:
        raise RequestError(
            "image_size",
            f"{size} px does not match the vision tower's {tower} px; leave it out or convert the "
            "checkpoint for that size",
        )
    grid = size // int(vision.patch_size)
    extra = 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = config.image_token_index
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
    return TokenLayout(int(image_token_id), grid * grid + extra, int(pad), size)


def token_layout(model_dir: str | os.PathLike[str], image_size: int | None = None) -> TokenLayout:
    """Read a transformers LLaVA folder's image-token id, image span length and pad id.

    Args:
        model_dir: a ``LlavaForConditionalGeneration`` folder (converted or smoke checkpoint).
        image_size: expected input side in pixels; None: the vision tower's.

    Returns:
        The layout.

    Raises:
        RequestError: ``image_size`` differs from the vision tower's.
    """
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return _layout(config, tokenizer, image_size)


# ---------------------------------------------------------------------------------------- Ray Data UDF


def reason_code(reason: Any) -> str | None:
    """The code part of a ``PrepareBatch`` reason (``"image_decode_error: ..."`` -> ``"image_decode_error"``).

    Anything that is not a non-empty string (None, or the float NaN that Ray Data turns an all-None
    column into) gives None.
    """
    return reason.split(":", 1)[0] if isinstance(reason, str) and reason else None


def _cell(batch: Mapping[str, Any], name: str, row: int) -> Any:
    if name not in batch:
        return None
    value = batch[name][row]
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return None
    return value


def _decode_image(path: Any, data: Any) -> np.ndarray:
    """RGB uint8 ``H x W x 3`` from a path or encoded bytes (LLaVA: ``Image.open(...).convert("RGB")``)."""
    from PIL import Image

    if data is not None and len(data):
        with Image.open(io.BytesIO(bytes(data))) as img:
            return np.asarray(img.convert("RGB"))
    if path is not None and str(path):
        with Image.open(str(path)) as img:
            return np.asarray(img.convert("RGB"))
    raise FileNotFoundError("the row has neither image_bytes nor image_path")


def _conversation_cell(value: Any) -> tuple[Turn, ...]:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        value = json.loads(value)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return as_turns(value)


def _objects(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for k, v in enumerate(values):
        out[k] = v
    return out


class PrepareBatch:
    """Ray Data batch UDF: records in, model-ready rows out (images decoded, padded, tokenised).

    Use with ``map_batches(PrepareBatch, fn_constructor_kwargs={"model_dir": ..., "template": ...,
    "max_length": ...}, compute=ActorPoolStrategy(...), batch_size=...)``; the tokenizer and image
    processor load once per actor. Test it by calling it on a dict batch, without Ray.

    Input columns: ``id`` (str), ``conversations`` (JSON string of LLaVA turns; a list of dicts is
    also accepted), and ``image_bytes`` (encoded image) and/or ``image_path`` (file); per row the
    bytes win when both are set (``TrainRecord.to_row`` makes such rows), and a row with neither is
    text-only. A first turn from ``gpt`` is dropped (:func:`drop_leading_gpt`).

    Output columns (one row per input row, same order):

    - ``id``: object array of str;
    - ``input_ids``, ``labels``: object arrays of 1-D int64 arrays (empty for a failed row), see
      ``tokenize_with_labels``;
    - ``pixel_values``: float32 ``[B, 3, S, S]``: the image padded to a square with the processor's
      mean colour (``expand2square``), then the CLIP processor (PIL backend); zeros for a failed or a
      text-only row;
    - ``has_image``: bool, False for a text-only row (no ``image_bytes`` nor ``image_path``; ``v1``
      only): its ids hold no image span and :func:`collate` passes no pixels for it;
    - ``ok``: bool; ``reason``: None, or ``"<code>: <detail>"`` with the codes ``MALFORMED``,
      ``BAD_TURNS``, ``NO_IMAGE_TOKEN``, ``EXTRA_IMAGE_TOKEN``, ``MISSING_IMAGE``,
      ``IMAGE_DECODE_ERROR``, ``TOKENIZATION_MISMATCH``, ``NO_SUPERVISED_TOKENS`` (``reason_code``).
      Through Ray Data a ``reason`` column that is None in every row of a block comes back as float
      NaN; ``reason_code`` and ``rows_from_batch`` read that as None.
    - ``truncated``: bool, an ok row that ``max_length`` cut (trained on what is left; the training
      loop counts them per step in ``steps.csv``).

    Args:
        model_dir: a transformers LLaVA folder (its processor, tokenizer and config are read).
        template: ``"plain"`` (stage 1) or ``"v1"`` (stage 2).
        max_length: longest sequence, tokens, counted as ``truncation`` says.
        image_size: expected input side in pixels; None: the vision tower's.
        system: v1 system sentence.
        boundary_fix: see ``tokenize_with_labels``.
        truncation: see ``tokenize_with_labels`` (``"text"`` for GeoChat's recipe).

    Raises:
        RequestError: unknown template, ``max_length`` < 1, or ``image_size`` not the tower's.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        template: Template,
        max_length: int,
        image_size: int | None = None,
        system: str = SYSTEM_VICUNA_V1,
        boundary_fix: BoundaryFix = "measured",
        truncation: Truncation = "expanded",
    ) -> None:
        from transformers import AutoConfig, AutoProcessor

        if template not in TEMPLATES:
            raise RequestError(
                "template", f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}"
            )
        if max_length < 1:
            raise RequestError("max_length", f"must be >= 1, got {max_length}")
        self.template: Template = template
        self.max_length = int(max_length)
        self.system = system
        self.boundary_fix: BoundaryFix = boundary_fix
        if truncation not in TRUNCATIONS:
            raise RequestError("truncation", f"unknown truncation {truncation!r}; choose one of {', '.join(TRUNCATIONS)}")
        self.truncation: Truncation = truncation
        processor = AutoProcessor.from_pretrained(model_dir, backend="pil")  # type: ignore[no-untyped-call]
        self.tokenizer: Any = processor.tokenizer
        self.image_processor: Any = processor.image_processor
        self.layout = _layout(AutoConfig.from_pretrained(model_dir), self.tokenizer, image_size)
        self.background = background_from_processor(self.image_processor)
        size = self.layout.image_size
        self._image_kwargs: dict[str, Any] = {
            "size": {"shortest_edge": size},
            "crop_size": {"height": size, "width": size},
        }
        logger.info(
            "PrepareBatch ready: %s template, %d px, %d image tokens, max_length %d",
            template,
            size,
            self.layout.n_image_tokens,
            self.max_length,
        )

    def _pixels(self, squares: Sequence[np.ndarray]) -> np.ndarray:
        out = self.image_processor(list(squares), return_tensors="np", **self._image_kwargs)["pixel_values"]
        return np.asarray(out, dtype=np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Prepare every row of ``batch`` (see the class docstring for the columns).

        Raises:
            ValueError: the batch lacks ``id``/``conversations`` or has neither image column (wiring bugs,
                not row failures).
        """
        for name in ("id", "conversations"):
            if name not in batch:
                raise ValueError(f"PrepareBatch batch lacks the {name!r} column (has {sorted(batch)})")
        if "image_bytes" not in batch and "image_path" not in batch:
            raise ValueError(f"PrepareBatch batch needs image_bytes or image_path (has {sorted(batch)})")
        n_rows = len(batch["id"])
        size = self.layout.image_size
        ids: list[str] = [str(v) for v in batch["id"]]
        input_ids: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n_rows
        labels: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n_rows
        reasons: list[str | None] = [None] * n_rows
        truncated = np.zeros(n_rows, dtype=bool)
        has_image = np.ones(n_rows, dtype=bool)
        squares: dict[int, np.ndarray] = {}

        for row in range(n_rows):
            try:
                turns = _conversation_cell(batch["conversations"][row])
            except (ValueError, TypeError, UnicodeDecodeError) as exc:
                reasons[row] = f"{MALFORMED}: {exc}"
                continue
            path, data = _cell(batch, "image_path", row), _cell(batch, "image_bytes", row)
            has_image[row] = path is not None or data is not None  # neither: a text-only record
            turns = drop_leading_gpt(turns, self.template)
            problem = conversation_problem(turns, self.template, has_image=bool(has_image[row]))
            if problem is not None:
                reasons[row] = f"{problem[0]}: {problem[1]}"
                continue
            image = None
            try:
                if has_image[row]:
                    image = _decode_image(path, data)
            except FileNotFoundError as exc:
                reasons[row] = f"{MISSING_IMAGE}: {exc}"
                continue
            except Exception as exc:  # noqa: BLE001 - a bad image is data, not a crash
                reasons[row] = f"{IMAGE_DECODE_ERROR}: {type(exc).__name__}: {exc}"
                continue
            try:
                sample = tokenize_with_labels(
                    turns,
                    self.tokenizer,
                    template=self.template,
                    max_length=self.max_length,
                    image_token_id=self.layout.image_token_id,
                    n_image_tokens=self.layout.n_image_tokens,
                    system=self.system,
                    boundary_fix=self.boundary_fix,
                    truncation=self.truncation,
                    has_image=image is not None,
                )
            except ValueError as exc:
                reasons[row] = f"{BAD_TURNS}: {exc}"
                continue
            if sample.mismatch:
                reasons[row] = (
                    f"{TOKENIZATION_MISMATCH}: label arithmetic does not match {len(sample.input_ids)} tokens"
                )
                continue
            if sample.n_supervised == 0:
                reasons[row] = f"{NO_SUPERVISED_TOKENS}: max_length {self.max_length} cuts every answer token"
                continue
            if image is not None:
                squares[row] = expand2square(image, self.background)
            truncated[row] = sample.truncated
            input_ids[row] = np.asarray(sample.input_ids, dtype=np.int64)
            labels[row] = np.asarray(sample.labels, dtype=np.int64)

        pixel_values = np.zeros((n_rows, 3, size, size), dtype=np.float32)
        if squares:
            rows = list(squares)
            try:
                pixel_values[rows] = self._pixels([squares[r] for r in rows])
            except Exception:  # noqa: BLE001 - find the culprit row(s), keep the rest
                for r in rows:
                    try:
                        pixel_values[r] = self._pixels([squares[r]])[0]
                    except Exception as exc:  # noqa: BLE001
                        reasons[r] = f"{IMAGE_DECODE_ERROR}: {type(exc).__name__}: {exc}"
                        input_ids[r] = labels[r] = np.zeros(0, dtype=np.int64)

        ok = np.array([r is None for r in reasons], dtype=bool)
        if not ok.all():
            logger.debug("PrepareBatch: %d of %d rows not ok", int((~ok).sum()), n_rows)
        return {
            "id": _objects(ids),
            "input_ids": _objects(input_ids),
            "labels": _objects(labels),
            "pixel_values": pixel_values,
            "ok": ok,
            "reason": _objects(reasons),
            "truncated": truncated & ok,
            "has_image": has_image,
        }


# ---------------------------------------------------------------------------------------- collation


def rows_from_batch(batch: Mapping[str, Any], *, only_ok: bool = True) -> list[dict[str, Any]]:
    """Split a column batch (``PrepareBatch`` output, e.g. from ``iter_batches``) into row dicts.

    Args:
        batch: column name -> array of equal length.
        only_ok: drop rows whose ``ok`` is False (when there is an ``ok`` column).

    Returns:
        One dict per (kept) row.
    """
    names = list(batch)
    n_rows = len(batch[names[0]]) if names else 0
    rows = [{name: batch[name][k] for name in names} for k in range(n_rows)]
    for row in rows:
        if "reason" in row and not isinstance(row["reason"], str):
            row["reason"] = None  # Ray Data stores an all-None column as nulls that arrive as NaN
    if only_ok and "ok" in batch:
        rows = [r for r in rows if bool(r["ok"])]
    return rows


def collate(rows: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack prepared rows into a training batch (LLaVA's ``DataCollatorForSupervisedDataset``).

    ``input_ids`` are right-padded with ``pad_token_id``, ``labels`` with -100; ``attention_mask`` is 1
    on each row's own tokens (from its length, not ``ids != pad``, so a pad id that also occurs in the
    text cannot be masked by mistake); ``pixel_values`` of the rows with an image are stacked, in row
    order (LLaVA fills the image spans of the batch with them in that order; a text-only row has none).
    Nothing is truncated here (``PrepareBatch`` already cut at ``max_length`` after image expansion).

    Args:
        rows: dicts with ``input_ids`` and ``labels`` (1-D int sequences of equal length per row),
            ``pixel_values`` (``[3, S, S]``) and optionally ``has_image`` (default True), e.g. from
            ``rows_from_batch``.
        pad_token_id: padding id (``TokenLayout.pad_token_id``).

    Returns:
        ``input_ids`` and ``labels`` (int64 ``[B, L]``), ``attention_mask`` (int64 ``[B, L]``) and,
        unless every row is text-only, ``pixel_values`` (float32 ``[I, 3, S, S]``, one per row with an
        image); ``L`` = longest row.

    Raises:
        ValueError: no rows, a row with ``ok`` False, ids and labels of different lengths, or pixel
            arrays of different shapes.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    for row in rows:
        if "ok" in row and not bool(row["ok"]):
            raise ValueError(
                f"row {row.get('id')!r} is not ok ({row.get('reason')}); filter ok == False rows before collating"
            )
    # torch.tensor copies: arrays coming out of Ray Data are read-only views of its blocks.
    seqs = [torch.tensor(np.asarray(r["input_ids"], dtype=np.int64)) for r in rows]
    labs = [torch.tensor(np.asarray(r["labels"], dtype=np.int64)) for r in rows]
    for row, s, lab in zip(rows, seqs, labs, strict=True):
        if s.ndim != 1 or s.shape != lab.shape:
            raise ValueError(
                f"row {row.get('id')!r}: input_ids {tuple(s.shape)} and labels {tuple(lab.shape)} differ"
            )
    width = max(int(s.shape[0]) for s in seqs)
    input_ids = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, (s, lab) in enumerate(zip(seqs, labs, strict=True)):
        n = int(s.shape[0])
        input_ids[k, :n] = s
        labels[k, :n] = lab
        attention_mask[k, :n] = 1
    pixels = [np.asarray(r["pixel_values"], dtype=np.float32) for r in rows if bool(r.get("has_image", True))]
    if any(p.shape != pixels[0].shape for p in pixels):
        raise ValueError(f"pixel_values shapes differ: {sorted({p.shape for p in pixels})}")
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if pixels:
        out["pixel_values"] = torch.from_numpy(np.stack(pixels))
    return out


def records_to_rows(records: Iterable[TrainRecord]) -> list[dict[str, Any]]:
    """``[r.to_row() for r in records]``: the items for ``ray.data.from_items``."""
    return [r.to_row() for r in records]
