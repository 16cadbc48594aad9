"""The rsflow demo set (``rsflow.finetune.demo_data``) as a benchmark: its held-out questions.

Layout (what :func:`rsflow.finetune.demo_data.build_demo_dataset` writes)::

    DATA/card.json                  the set's card (its presence marks a demo set)
    DATA/instruct_test.json         held-out blocks (``--split test``, the default); instruct_train.json
    DATA/images/<tile id>.png       64 px chips

Records are LLaVA conversations ``{"id": "r03c12-has_water", "image": "r03c12.png", "conversations":
[{"from": "human", "value": "<image>\\n<question>\\nAnswer ..."}, {"from": "gpt", "value": "Yes"}]}``;
one sample per record of a demo question (:data:`rsflow.finetune.demo_data.QUESTIONS`; captions are
skipped), the prompt being the record's own human turn. Scored per question key with
:func:`rsflow.evaluate.metrics.demo_normal_form`, as :func:`rsflow.finetune.demo.evaluate_demo` scores
the demo model (both use this loader and that form).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Final

from rsflow.errors import RequestError
from rsflow.evaluate.samples import Sample
from rsflow.models.prompts import IMAGE_TOKEN

logger = logging.getLogger(__name__)

SPLIT_FILES: Final[dict[str, str]] = {"test": "instruct_test.json", "train": "instruct_train.json"}
"""``--split`` -> the demo set's record file."""


def load_demo(data: Path, *, split: str | None = None, split_file: str | None = None) -> list[Sample]:
    """The demo set's question records of one split as samples, in file order.

    Args:
        data: a folder written by ``build_demo_dataset``.
        split: ``test`` (held-out blocks, default) or ``train``.
        split_file: a record file name instead of ``split`` (``evaluate_demo``'s argument).

    Returns:
        Samples with ``group`` = the question key (``has_water``, ``more_cover``, ``veg_percent``).

    Raises:
        RequestError: (``--data``) not a demo set or a malformed record; (``--split``) unknown split.
    """
    from rsflow.finetune.demo_data import QUESTIONS

    if split_file is None:
        split = split or "test"
        if split not in SPLIT_FILES:
            raise RequestError("--split", f"the demo set has splits {', '.join(SPLIT_FILES)}; got {split!r}")
        split_file = SPLIT_FILES[split]
    path = data / split_file
    if not (data / "card.json").is_file() or not path.is_file():
        raise RequestError(
            "--data", f"{data} is not a demo set (card.json and {split_file}, from rsflow.finetune.demo_data)"
        )
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RequestError("--data", f"cannot read {path}: {exc}") from exc
    if not isinstance(records, list):
        raise RequestError("--data", f"{path} is not a list of LLaVA conversation records")
    samples = []
    for i, rec in enumerate(records):
        try:
            key = str(rec["id"]).rsplit("-", 1)[1]
            human, answer = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
            image = rec["image"]
        except (KeyError, IndexError, TypeError) as exc:
            raise RequestError("--data", f"{path.name} record {i} is not a LLaVA conversation record: {exc!r}") from exc
        if key not in QUESTIONS:
            continue
        samples.append(
            Sample(
                sample_id=str(rec["id"]),
                image_path=str((data / "images" / str(image)).resolve()),
                task="vqa",
                prompt=str(human).removeprefix(f"{IMAGE_TOKEN}\n"),
                references=(str(answer),),
                group=key,
            )
        )
    if not samples:
        raise RequestError("--data", f"{path} holds no record of the demo questions")
    return samples
