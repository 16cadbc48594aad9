"""``rsflow eval``: one benchmark, one model, the papers' metrics, resumable.

Steps (every check before any inference):

1. the benchmark (``--benchmark``), the caption scorers it needs (pycocoevalcap; ``java`` for METEOR and
   the PTB tokenizer), the model (``--model``/``--adapter``) and whether its family can do the task;
2. the samples, read from the benchmark's files as distributed (``--data``), then ``--limit`` of them
   chosen with ``--seed`` (a seeded shuffle, so a larger limit gives a superset), and their images;
3. the output folder: a new one, or one holding an earlier run of the same benchmark, data (``--data``,
   ``--images``, ``--questions``), split, model and decoding (``run.json``), whose predictions are reused
   (status ok, same prompt, same model id, same image file): no inference for them;
4. inference on the rest through :func:`rsflow.pipeline.infer_images` (the region job's ``ModelRunner``
   actors; images from files, each image asking its own samples' prompts), each batch of predictions
   written as a part file as soon as it arrives (a killed run keeps what it finished);
5. the metrics over all chosen samples at once, and the files::

       OUTPUT/predictions.parquet   one row per sample: id, prompt, raw text, parsed answer, reference, ...
       OUTPUT/metrics.json          the benchmark's metrics (0-1), counts, the run's settings
       OUTPUT/results.md            the numbers beside the papers' published ones (x100)
       OUTPUT/confusion_matrix.csv, confusion_matrix.png   (scene classification)
       OUTPUT/run.json              what ran: benchmark, data, model, decoding, counts, timings

Every file is renamed into place when complete; ``OUTPUT/_parts/`` holds the part files until the
predictions file is written.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import random
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rsflow.errors import RequestError
from rsflow.evaluate.benchmarks import BENCHMARKS, Benchmark, LoadRequest, get_benchmark
from rsflow.evaluate.caption_metrics import TOKENIZERS, check_caption_scorers, parse_metrics
from rsflow.evaluate.metrics import round_floats
from rsflow.evaluate.published import PUBLISHED_SPLITS, PublishedRow
from rsflow.evaluate.report import (
    markdown_table,
    write_atomic,
    write_confusion_matrix,
    write_json_atomic,
    write_text_atomic,
)
from rsflow.evaluate.samples import Sample, check_unique
from rsflow.evaluate.scoring import read_answer, score
from rsflow.models.prompts import check_tasks
from rsflow.models.spec import (
    ModelSpec,
    check_image_size,
    image_aspect,
    model_card,
    model_id,
    resolve_adapter,
    resolve_model_dir,
    resolve_prompt_format,
)
from rsflow.request import refuse_output_in_job_copy

logger = logging.getLogger(__name__)

PREDICTIONS: Final[str] = "predictions.parquet"
METRICS: Final[str] = "metrics.json"
TABLE: Final[str] = "results.md"
RUN_RECORD: Final[str] = "run.json"
PARTS: Final[str] = "_parts"
_OWNED: Final[tuple[str, ...]] = (PREDICTIONS, METRICS, TABLE, RUN_RECORD, "confusion_matrix.csv",
                                  "confusion_matrix.png")

PREDICTION_SCHEMA: Final[pa.Schema] = pa.schema(
    [
        ("sample_id", pa.string()),
        ("image", pa.string()),
        ("task", pa.string()),
        ("group", pa.string()),
        ("size_group", pa.string()),
        ("prompt", pa.string()),
        ("text", pa.string()),
        ("answer", pa.string()),
        ("correct", pa.bool_()),
        ("score", pa.float64()),
        ("reference", pa.list_(pa.string())),
        ("status", pa.string()),
        ("error", pa.string()),
        ("model_id", pa.string()),
        ("run_id", pa.string()),
        ("image_width", pa.int64()),
        ("image_height", pa.int64()),
        ("infer_seconds", pa.float64()),
        ("image_stamp", pa.string()),
    ]
)
"""Columns of ``predictions.parquet`` (plus ``scored``: whether this run's metrics counted the row)."""


@dataclass(frozen=True)
class EvalConfig:
    """One ``rsflow eval`` run; checked on construction."""

    benchmark: str
    """``--benchmark``: a name of :data:`rsflow.evaluate.benchmarks.BENCHMARKS`."""
    data: str
    """``--data``: the benchmark's folder, as its authors distribute it."""
    model: ModelSpec
    """``--model``, ``--adapter`` and the decoding settings."""
    output: str
    """``--output``: a new folder, or one of an earlier run to resume."""
    images: str | None = None
    """``--images``: the image folder where it is not found under ``data``."""
    split: str | None = None
    """``--split`` (None: the benchmark's default)."""
    question_types: tuple[str, ...] = ()
    """``--question-types`` (RSVQA): only these types; empty: all."""
    questions: str | None = None
    """``--questions`` (GeoChat-Bench VQA): its ``lrben.jsonl`` / ``hrben.jsonl`` where it is not in ``data``."""
    limit: int | None = None
    """``--limit``: score only this many samples (chosen with ``seed``); None: all."""
    seed: int = 0
    """``--seed`` of the sample choice under ``limit``."""
    metrics: tuple[str, ...] = ()
    """``--metrics`` (caption benchmarks); empty: the benchmark's."""
    tokenizer: str = "ptb"
    """``--tokenizer`` of caption metrics: ``ptb`` (pycocoevalcap, Java) or ``simple``."""
    overwrite: bool = False
    """``--overwrite``: discard an earlier run's files in ``output`` instead of resuming it."""
    model_actors: int | None = None
    """``--model-actors`` (default: one per GPU, else 1)."""
    read_workers: int | None = None
    """``--read-workers`` (default: the CPUs the actors leave)."""
    require_gpu: bool = False
    """``--require-gpu``: model actors wait for a GPU node rather than run on CPU when none has joined yet."""

    def __post_init__(self) -> None:
        if not isinstance(self.data, str) or not self.data.strip():
            raise RequestError("--data", "give the benchmark's folder")
        if not isinstance(self.output, str) or not self.output.strip():
            raise RequestError("--output", "give a folder for the predictions and metrics")
        if "://" in self.output:  # Path() would make s3://b/x the local folder <cwd>/s3:/b/x (deleted with a Ray job)
            raise RequestError("--output", f"{self.output!r} is a URL: rsflow eval writes a local folder (or one on a "
                                           "filesystem the cluster mounts); copy it to object storage afterwards")
        refuse_output_in_job_copy(self.output, "--output")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1):
            raise RequestError("--limit", f"must be a whole number >= 1, got {self.limit!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise RequestError("--seed", f"must be a whole number, got {self.seed!r}")
        if self.tokenizer not in TOKENIZERS:
            raise RequestError("--tokenizer", f"{self.tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
        if self.images is not None and not Path(self.images).is_dir():
            raise RequestError("--images", f"no such folder {self.images!r}")
        if self.questions is not None and not Path(self.questions).is_file():
            raise RequestError("--questions", f"no such file {self.questions!r}")
        for flag, value, most in (("--model-actors", self.model_actors, 1024), ("--read-workers", self.read_workers, 4096)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most):
                raise RequestError(flag, f"must be between 1 and {most}, got {value!r}")  # as the region job's


@dataclass(frozen=True)
class EvalResult:
    """What an evaluation run did."""

    output: str
    """The output folder."""
    metrics: dict[str, Any]
    """The metrics as written to ``metrics.json``."""
    counts: dict[str, int] = field(default_factory=dict)
    """``samples`` scored, ``inferred`` (sent to the model by this run), ``reused`` (from an earlier run),
    ``failed`` (no answer)."""
    files: list[str] = field(default_factory=list)
    """Files written into ``output``."""


def select_samples(samples: Sequence[Sample], limit: int | None, seed: int) -> list[Sample]:
    """``limit`` samples chosen by a seeded shuffle, kept in benchmark order (all when ``limit`` is None).

    The choice for a limit is a prefix of the shuffled order, so a larger limit with the same seed
    contains the smaller one's samples (a resumed run with a larger ``--limit`` reuses them all).
    """
    if limit is None or limit >= len(samples):
        return list(samples)
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    return [samples[i] for i in sorted(order[:limit])]


def _check_images(samples: Sequence[Sample]) -> None:
    for path in dict.fromkeys(s.image_path for s in samples):
        if not Path(path).is_file():
            first = next(s for s in samples if s.image_path == path)
            raise RequestError("--data", f"image {path} of sample {first.sample_id!r} is missing (or give --images)")


def _identity(config: EvalConfig, bench: Benchmark, mid: str, prompt_format: str) -> dict[str, Any]:
    """What must match for an earlier run's predictions to be reused.

    ``images`` (``--images``) is part of the data: predictions made on another image folder are not this
    run's (None where the images are found under ``--data``, as in records written before it was here).
    """
    return {
        "benchmark": bench.name,
        "data": str(Path(config.data).resolve()),
        "images": str(Path(config.images).resolve()) if config.images else None,
        "split": config.split or (bench.splits[0] if bench.splits else None),
        "model_id": mid,
        "prompt_format": prompt_format,
        "max_new_tokens": config.model.max_new_tokens,
        "image_aspect": config.model.image_aspect,
        "image_size": config.model.image_size,
        "dtype": config.model.dtype,
        # only where there is such a file: earlier runs' identities stay as they were
        **({"questions": str((Path(config.questions) if config.questions else Path(config.data) / bench.questions_file)
                             .resolve())} if bench.questions_file else {}),
    }


def _read_predictions(out: Path) -> dict[str, dict[str, Any]]:
    """Earlier prediction rows by sample id: the predictions file, then part files (later wins)."""
    files = [out / PREDICTIONS] if (out / PREDICTIONS).is_file() else []
    files += sorted((out / PARTS).glob("part-*.parquet")) if (out / PARTS).is_dir() else []
    rows: dict[str, dict[str, Any]] = {}
    for f in files:
        try:
            table = pq.read_table(f)
        except Exception as exc:  # noqa: BLE001 - a damaged part is not trusted; its samples are inferred again
            logger.warning("ignoring unreadable %s: %s", f, exc)
            continue
        for r in table.to_pylist():
            rows[str(r["sample_id"])] = r
    return rows


def _prepare_output(out: Path, identity: Mapping[str, Any], overwrite: bool) -> dict[str, dict[str, Any]]:
    """Check ``out`` and return the earlier predictions it holds (none for a new folder).

    Raises:
        RequestError: (``--output``) a folder that is not an eval output, or one of another benchmark,
            data (``--data``, ``--images``, ``--questions``), split, model or decoding (unless ``overwrite``).
    """
    import json

    record = out / RUN_RECORD
    if out.exists() and not out.is_dir():
        raise RequestError("--output", f"{out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not record.is_file():
        raise RequestError("--output", f"{out} is not empty and holds no rsflow eval run ({RUN_RECORD}); pick another")
    if not record.is_file():
        return {}
    for folder in (out, out / PARTS):  # temporary files of a killed run's writes: never trusted
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
            tmp.unlink(missing_ok=True)
    if overwrite:
        for name in _OWNED:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / PARTS, ignore_errors=True)
        return {}
    try:
        earlier = json.loads(record.read_text(encoding="utf-8")).get("identity", {})
    except (OSError, ValueError):
        earlier = {}
    diff = [k for k in identity if earlier.get(k) != identity[k]]
    if diff:
        k = diff[0]
        raise RequestError(
            "--output",
            f"{out} holds a run with another {k} ({earlier.get(k)!r}, now {identity[k]!r}); "
            "use another --output, or --overwrite to discard it",
        )
    return _read_predictions(out)


def _reusable(row: Mapping[str, Any] | None, sample: Sample, mid: str) -> bool:
    """Whether an earlier prediction answers ``sample`` as this run would ask it: the same prompt, model
    and image file (a sample whose image path changed, e.g. a record written before ``--images`` was part
    of the identity, is inferred again, not scored on another picture), unchanged since (its
    :func:`image_stamp`; a row written before stamps were recorded has none and is trusted)."""
    return (
        row is not None
        and row.get("status") == "ok"
        and row.get("text") is not None
        and row.get("prompt") == sample.prompt
        and row.get("model_id") == mid
        and row.get("image") == sample.image_path
        and same_image(row.get("image_stamp"), sample.image_path)
    )


def image_stamp(path: str) -> str | None:
    """``"<size>:<mtime ns>:<blake2b>"`` of an image file (None when it cannot be read), recorded with each
    prediction: an image replaced at the same path (a re-downloaded or re-exported benchmark) is another
    picture, and its predictions are made again (:func:`same_image`)."""
    try:
        st = Path(path).stat()
        return f"{st.st_size}:{st.st_mtime_ns}:{_digest(path, st.st_size, st.st_mtime_ns)}"
    except OSError:
        return None


def same_image(recorded: str | None, path: str) -> bool:
    """Whether ``path`` is still the picture a prediction recorded (:func:`image_stamp`): the same size and
    modification time, or, where only the time differs (a copy without ``-p``, a re-extracted archive), the same
    content. A prediction written before stamps were recorded (None) is trusted."""
    if recorded is None:
        return True
    try:
        st = Path(path).stat()
        size, mtime, *digest = recorded.split(":")
        if int(size) != st.st_size:
            return False
        return int(mtime) == st.st_mtime_ns or digest == [_digest(path, st.st_size, st.st_mtime_ns)]
    except (OSError, ValueError):
        return False


@functools.lru_cache(maxsize=4096)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """BLAKE2b (16 bytes) of a file's content, once per (path, size, modification time): several samples share
    an image."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _str_or_none(value: Any) -> str | None:
    """A string cell from a model batch (Ray Data turns an all-None object column into NaN floats)."""
    if value is None or (isinstance(value, float | np.floating) and math.isnan(value)):
        return None
    return str(value)


def _prediction_row(bench: Benchmark, sample: Sample, model_row: Mapping[str, Any], run_id: str,
                    aspect: str) -> dict[str, Any]:
    text = _str_or_none(model_row.get("text"))
    status = _str_or_none(model_row.get("status")) or "failed"
    width, height = int(model_row.get("image_width") or 0), int(model_row.get("image_height") or 0)
    ans = read_answer(bench, sample, text if status == "ok" else None, width, height, aspect)
    return {
        "sample_id": sample.sample_id,
        "image": sample.image_path,
        "task": sample.task,
        "group": sample.group,
        "size_group": sample.size_group,
        "prompt": sample.prompt,
        "text": text,
        "answer": ans.answer,
        "correct": ans.correct,
        "score": ans.score,
        "reference": list(sample.references),
        "status": status,
        "error": _str_or_none(model_row.get("error")),
        "model_id": _str_or_none(model_row.get("model_id")) or "",
        "run_id": run_id,
        "image_width": width,
        "image_height": height,
        "infer_seconds": float(model_row.get("infer_seconds") or 0.0),
        "image_stamp": image_stamp(sample.image_path),
    }


def _write_parquet(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def _infer(
    bench: Benchmark,
    todo: Sequence[Sample],
    config: EvalConfig,
    out: Path,
    run_id: str,
    address: str | None,
) -> dict[str, dict[str, Any]]:
    """Run the model on ``todo`` (one pipeline row per image, asking its samples' prompts); write each
    batch of predictions as a part file; return the prediction rows by sample id."""
    from rsflow.pipeline import infer_images

    by_id = {s.sample_id: s for s in todo}
    aspect = image_aspect(config.model)  # boxes are on the grid of the square the model saw
    images: dict[str, list[Sample]] = {}
    for s in todo:
        images.setdefault(s.image_path, []).append(s)
    rows = [
        {
            "tile_id": path,
            "image_path": path,
            "row_prompts": [{"task": s.task, "prompt": s.prompt, "key": s.sample_id} for s in group],
        }
        for path, group in images.items()
    ]
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    part = 0
    for batch in infer_images(rows, spec=config.model, model_actors=config.model_actors,
                              read_workers=config.read_workers, address=address, require_gpu=config.require_gpu):
        n = len(batch["prompt_key"])
        records = [{k: batch[k][i] for k in batch} for i in range(n)]
        preds = [
            _prediction_row(bench, by_id[key], r, run_id, aspect)
            for r in records
            if (key := _str_or_none(r.get("prompt_key"))) is not None and key in by_id
        ]
        if not preds:
            continue
        _write_parquet(out / PARTS / f"part-{run_id}-{part:05d}.parquet", preds, PREDICTION_SCHEMA)
        part += 1
        done.update({p["sample_id"]: p for p in preds})
        logger.info("predictions: %d of %d samples", len(done), len(todo))
    missing = [s for s in todo if s.sample_id not in done]
    for s in missing:  # never silently dropped: a sample the pipeline lost is a failed prediction
        done[s.sample_id] = _prediction_row(
            bench, s, {"status": "failed", "error": "no prediction came back from the pipeline"}, run_id, aspect
        )
    return done


def _recorded_rows(card: Mapping[str, Any]) -> list[PublishedRow] | None:
    """The demo model's held-out figures recorded by its training run (``rsflow.json`` ``heldout``)."""
    heldout = card.get("heldout")
    if not isinstance(heldout, Mapping) or not heldout:
        return None
    source = "recorded by its training run (rsflow.json)"
    rows = [
        PublishedRow(f"{v.get('question', k)} ({k})", f"per_type.{k}.accuracy", {source: 100.0 * float(v["accuracy"])})
        for k, v in heldout.items()
        if isinstance(v, Mapping) and "accuracy" in v
    ]
    return rows or None


def run_eval(config: EvalConfig, *, address: str | None = None) -> EvalResult:
    """Evaluate one model on one benchmark (see the module docstring).

    Args:
        config: the checked run settings.
        address: Ray address (default: ``RAY_ADDRESS``, else a local Ray).

    Returns:
        Where the files went, the metrics and the counts.

    Raises:
        RequestError: bad input, before any inference (unknown benchmark, data in the wrong format,
            a missing Java runtime for METEOR or the PTB tokenizer, a model family that cannot do the
            task, an output folder of another run, ...).
    """
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    run_id = f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    bench = get_benchmark(config.benchmark)
    if bench.kind == "caption":
        caption_metrics = parse_metrics(config.metrics, bench.caption_metrics)
        check_caption_scorers(caption_metrics, config.tokenizer)
    else:
        if config.metrics:
            raise RequestError("--metrics", f"{bench.name} is scored by its own accuracy; --metrics picks caption metrics")
        caption_metrics = ()
    spec = config.model
    resolve_adapter(spec)
    resolve_model_dir(spec)
    check_image_size(spec)  # before any file is written: a run.json of a run that cannot start blocks the next
    from rsflow.pipeline import refuse_require_gpu_here

    refuse_require_gpu_here(config.require_gpu, spec, address)
    prompt_format = resolve_prompt_format(spec)
    try:
        check_tasks([bench.task], prompt_format)
    except RequestError as exc:
        raise RequestError("--benchmark", f"{bench.name} asks the {bench.task!r} task: {exc.reason}") from None
    data = Path(config.data)
    if not data.is_dir():
        raise RequestError("--data", f"no such folder {config.data!r}")
    if bench.splits and config.split is not None and config.split not in bench.splits:
        raise RequestError("--split", f"{bench.name} has splits {', '.join(bench.splits)}; got {config.split!r}")
    if config.questions is not None and bench.questions_file is None:
        with_file = ", ".join(b.name for b in BENCHMARKS.values() if b.questions_file)
        raise RequestError("--questions", f"only {with_file} read a questions file; leave --questions out")
    samples = bench.load(
        LoadRequest(
            data=data,
            prompt_format=prompt_format,
            split=config.split,
            images=Path(config.images) if config.images else None,
            question_types=config.question_types,
            questions=Path(config.questions) if config.questions else None,
        )
    )
    check_unique(samples)
    chosen = select_samples(samples, config.limit, config.seed)
    _check_images(chosen)
    mid = model_id(spec)
    card = model_card(spec)
    aspect = image_aspect(spec)
    out = Path(config.output)
    identity = _identity(config, bench, mid, prompt_format)
    earlier = _prepare_output(out, identity, config.overwrite)
    reused = {s.sample_id: earlier[s.sample_id] for s in chosen if _reusable(earlier.get(s.sample_id), s, mid)}
    todo = [s for s in chosen if s.sample_id not in reused]
    logger.info("%s: %d of %d samples chosen; %d reused from %s, %d to infer",
                bench.name, len(chosen), len(samples), len(reused), out, len(todo))
    if card.get("kind") in ("smoke", "demo"):
        logger.warning("model %s is a %s model: %s", mid, str(card["kind"]).upper(), card.get("note", ""))

    record: dict[str, Any] = {
        "run_id": run_id,
        "status": "running",
        "started": started.isoformat(),
        "identity": identity,
        "benchmark": {"name": bench.name, "title": bench.title, "kind": bench.kind, "task": bench.task},
        "model": {"id": mid, "kind": card.get("kind"), "name": card.get("name")},
        "settings": {
            "limit": config.limit, "seed": config.seed, "question_types": list(config.question_types),
            "images": config.images, "caption_metrics": list(caption_metrics), "tokenizer": config.tokenizer,
            "batch_size": spec.batch_size,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RUN_RECORD, record)

    t_infer = time.perf_counter()
    inferred = _infer(bench, todo, config, out, run_id, address) if todo else {}
    infer_seconds = time.perf_counter() - t_infer
    by_id = {**{k: dict(v) for k, v in reused.items()}, **inferred}
    chosen_ids = {s.sample_id for s in chosen}
    # Reused rows are re-read with today's answer reading; rows of earlier runs not chosen now are kept.
    final_rows = [
        {**_prediction_row(bench, s, by_id[s.sample_id], str(by_id[s.sample_id].get("run_id") or run_id), aspect),
         "scored": True}
        for s in chosen
    ]
    final_rows += [{**{c: r.get(c) for c in PREDICTION_SCHEMA.names}, "scored": False}
                   for sid, r in earlier.items() if sid not in chosen_ids]
    _write_parquet(out / PREDICTIONS, final_rows, PREDICTION_SCHEMA.append(pa.field("scored", pa.bool_())))
    shutil.rmtree(out / PARTS, ignore_errors=True)

    metrics = score(bench, chosen, by_id, caption_metrics=caption_metrics, tokenizer=config.tokenizer, aspect=aspect)
    counts = {
        "samples": len(chosen),
        "samples_in_benchmark": len(samples),
        "inferred": len(todo),
        "reused": len(reused),
        "failed": int(metrics["failed"]),
    }
    files = [PREDICTIONS, METRICS, TABLE, RUN_RECORD]
    if bench.kind == "classify":
        files += write_confusion_matrix(metrics["confusion_matrix"], out, title=f"{bench.title}: {mid}")
    metrics_doc = {
        "benchmark": bench.name,
        "split": identity["split"],
        "model_id": mid,
        "prompt_format": prompt_format,
        "counts": counts,
        "metrics": round_floats(metrics),
    }
    write_json_atomic(out / METRICS, metrics_doc)
    context = [
        f"benchmark `{bench.name}`"
        + (f", split `{identity['split']}`" if identity["split"] else "")
        + f", data `{identity['data']}`",
        f"model `{mid}` (prompt format `{prompt_format}`), greedy, max {spec.max_new_tokens} new tokens",
        f"{len(chosen)} of {len(samples)} samples"
        + (f" (--limit {config.limit}, --seed {config.seed})" if config.limit else "")
        + f"; {len(todo)} inferred by this run, {len(reused)} reused; {counts['failed']} without an answer",
    ]
    if bench.kind == "caption":
        context.append(f"caption tokenizer: {config.tokenizer}" + ("" if config.tokenizer == "ptb" else
                       " (not pycocoevalcap's PTBTokenizer: numbers differ slightly from the papers')"))
    recorded = _recorded_rows(card) if bench.name == "rsflow-demo" else None
    table = markdown_table(
        bench.name, f"{bench.title}: {mid}", metrics, run_label=str(card.get("name") or mid), context=context,
        recorded=recorded, split=identity["split"],
        recorded_note="The model's own held-out figures, as its training run recorded them "
        "(rsflow.finetune.demo.evaluate_demo)." if recorded else "",
    )
    write_text_atomic(out / TABLE, table)
    measured = PUBLISHED_SPLITS.get(bench.name)
    if measured is not None and identity["split"] not in (None, measured):
        logger.warning("%s: the published numbers are of the %s split, not %s: %s shows none beside this run",
                       bench.name, measured, identity["split"], TABLE)
    record.update(
        status="complete",
        finished=datetime.now(UTC).isoformat(),
        counts=counts,
        files=files,
        timings={"infer_seconds": round(infer_seconds, 3), "total_seconds": round(time.perf_counter() - t0, 3)},
    )
    write_json_atomic(out / RUN_RECORD, record)
    logger.info("%s: %d samples scored (%d inferred, %d reused) -> %s", bench.name, len(chosen), len(todo),
                len(reused), out)
    return EvalResult(output=str(out), metrics=metrics_doc, counts=counts, files=files)


def headline(metrics: Mapping[str, Any]) -> str:
    """One phrase with the run's main number(s), for the console."""
    m = metrics
    if "CIDEr" in m or "ROUGE_L" in m or "ROUGE_1" in m:
        keys = [k for k in ("Bleu_4", "METEOR", "ROUGE_1", "ROUGE_L", "CIDEr") if k in m]
        return ", ".join(f"{k} {100 * float(m[k]):.2f}" for k in keys)
    if "iou_threshold" in m:
        return f"acc@{m['iou_threshold']} {100 * float(m['accuracy']):.2f} ({m['found']}/{m['objects']} objects)"
    overall = f"accuracy {100 * float(m['accuracy']):.2f} ({m['correct']}/{m['n']})"
    types = "/".join(m.get("reported_types") or ())
    if m.get("accuracy_reported_types") is None:
        missing = m.get("missing_reported_types") or ()
        if not types or not missing:
            return overall
        # not an average over some of the types under the papers' name for all of them
        return f"{overall}; over {types}: n/a (no {', '.join(missing)} question scored)"
    # the paper's headline first: GeoChat's LRBEN/HRBEN leave count (and area) out
    return (f"accuracy over {types} {100 * float(m['accuracy_reported_types']):.2f} "
            f"({m['correct_reported_types']}/{m['n_reported_types']}); all types: {overall}")
