"""The one record every benchmark loader produces: an image, a prompt and what the answer should be."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from rsflow.errors import RequestError

SAMPLE_TASKS: Final[tuple[str, ...]] = ("vqa", "classify", "caption", "refer", "region-caption")
"""rsflow tasks a benchmark sample can be (``rsflow.models.prompts.TASKS``; ``refer`` also stands for
GeoChat's ``[grounding]`` queries, which answer with boxes too)."""


@dataclass(frozen=True)
class Sample:
    """One benchmark question about one image, with its reference answer(s)."""

    sample_id: str
    """Unique within the benchmark: the RSVQA question id, the caption file name, ``class/file`` for
    scene folders (GeoChat's ``question_id`` form), the GeoChat-Bench ``question_id``, ..."""
    image_path: str
    """Absolute path of the image file."""
    task: str
    """One of :data:`SAMPLE_TASKS`; decides the model family check and how answers are read."""
    prompt: str
    """The user text that follows ``<image>\\n`` (the benchmark's published wording)."""
    references: tuple[str, ...]
    """What a correct answer is: the answer (VQA), the class display name (scenes), every reference
    caption (captions: five), the reference phrase (region captioning), or one ground-truth object per
    element as a JSON polygon ``[[x, y], [x, y], [x, y], [x, y]]`` in pixels of the image (boxes)."""
    group: str = ""
    """The breakdown the benchmark reports: RSVQA question ``type``, the demo set's question key,
    GeoChat-Bench ``type`` (``ref`` / ``grounding``); empty where there is none."""
    size_group: str = ""
    """GeoChat-Bench ``size_group`` (``small``, ``medium``, ``large``); empty where not marked."""

    def __post_init__(self) -> None:
        if not self.sample_id:
            raise ValueError("a sample needs an id")
        if self.task not in SAMPLE_TASKS:
            raise ValueError(f"sample {self.sample_id!r}: task {self.task!r} is not one of {SAMPLE_TASKS}")
        if not self.prompt.strip():
            raise ValueError(f"sample {self.sample_id!r} has an empty prompt")
        if not self.references:
            raise ValueError(f"sample {self.sample_id!r} has no reference")


def polygon_json(points: Sequence[Sequence[float]]) -> str:
    """A polygon's corners as the JSON text stored in :attr:`Sample.references` for box tasks."""
    return json.dumps([[float(x), float(y)] for x, y in points])


def check_unique(samples: Sequence[Sample], *, field: str = "--data") -> None:
    """Refuse a benchmark whose sample ids repeat (predictions are keyed by id).

    Raises:
        RequestError: (``field``) the first repeated id.
    """
    seen: set[str] = set()
    for s in samples:
        if s.sample_id in seen:
            raise RequestError(field, f"sample id {s.sample_id!r} occurs twice; ids must be unique")
        seen.add(s.sample_id)
