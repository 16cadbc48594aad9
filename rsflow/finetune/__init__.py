"""LoRA / projector finetuning of LLaVA-family models on remote-sensing instruction data.

Modules: ``data`` (records, templates, label masking, the Ray Data ``PrepareBatch`` UDF, ``collate``),
``train`` (the training loop) and ``demo_data`` (a small instruction set built from the sample scene).
The data API is re-exported here and imported on first access, so ``import rsflow.finetune`` stays
cheap (no torch/transformers) for the CLI and the Ray driver.
"""

from __future__ import annotations

import importlib
from typing import Any

_DATA_EXPORTS = (
    "IGNORE_INDEX",
    "PrepareBatch",
    "RecordReport",
    "TokenLayout",
    "TokenizedSample",
    "TrainRecord",
    "Turn",
    "collate",
    "conversation_problem",
    "is_legacy_tokenizer",
    "load_llava_json",
    "load_parquet_records",
    "reason_code",
    "render_plain",
    "render_v1",
    "rows_from_batch",
    "token_layout",
    "tokenize_with_labels",
)

__all__ = list(_DATA_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _DATA_EXPORTS:
        return getattr(importlib.import_module("rsflow.finetune.data"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
