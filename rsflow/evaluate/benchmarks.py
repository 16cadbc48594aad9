"""The benchmarks ``rsflow eval`` knows: name -> how to load it, what it asks, how it is scored.

=============================  =========================================  ============  ================
name                           distributed as                             task          scored by
=============================  =========================================  ============  ================
``rsvqa-lr``                   RSVQA-LR Zenodo files (LR_split_*.json)   vqa           accuracy per type
``rsvqa-hr``                   RSVQA-HR Zenodo files (USGS_split_*.json) vqa           accuracy per type
``ucm-captions``               Karpathy JSON (dataset.json) + imgs/      caption       BLEU/METEOR/ROUGE-L/CIDEr
``sydney-captions``            Karpathy JSON (dataset.json) + imgs/      caption       BLEU/METEOR/ROUGE-L/CIDEr
``rsicd``                      Karpathy JSON (dataset_rsicd.json)        caption       BLEU/METEOR/ROUGE-L/CIDEr
``ucmerced``                   UCMerced_LandUse/Images/<class>/          classify      accuracy, confusion
``aid``                        AID/<Class>/                              classify      accuracy, confusion
``resisc45``                   NWPU-RESISC45/<class>/                    classify      accuracy, confusion
``geochat-ucmerced``           GeoChat-Bench UCmerced.jsonl + UCMerced   classify      accuracy, confusion
``geochat-aid``                GeoChat-Bench aid.jsonl + AID images      classify      accuracy, confusion
``geochat-lrben``              GeoChat-Bench lrben.jsonl + RSVQA-LR      vqa           accuracy per type
``geochat-hrben``              GeoChat-Bench hrben.jsonl + RSVQA-HR      vqa           accuracy per type
``geochat-referring``          GeoChat-Bench referring.jsonl + PNGs      refer         acc@0.5 (rotated IoU)
``geochat-region-captioning``  GeoChat-Bench region_captioning.jsonl     region-caption ROUGE-1/L, METEOR
``rsflow-demo``                rsflow's demo set (demo_data)             vqa           accuracy per question
=============================  =========================================  ============  ================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from rsflow.errors import RequestError
from rsflow.evaluate.captions import SPLITS as CAPTION_SPLITS
from rsflow.evaluate.captions import load_captions
from rsflow.evaluate.demo import SPLIT_FILES as DEMO_SPLITS
from rsflow.evaluate.demo import load_demo
from rsflow.evaluate.geochat_bench import (
    load_referring,
    load_region_captions,
    load_scene_jsonl,
    load_vqa_jsonl,
)
from rsflow.evaluate.metrics import demo_normal_form, geochat_normal_form
from rsflow.evaluate.rsvqa import REPORTED_TYPES, load_rsvqa
from rsflow.evaluate.samples import Sample
from rsflow.evaluate.scenes import load_scene_folders
from rsflow.presets import AID_CLASSES, RESISC45_CLASSES, UCMERCED_CLASSES

Kind = Literal["vqa", "classify", "caption", "boxes"]
"""How answers are read and scored."""


@dataclass(frozen=True)
class LoadRequest:
    """What a loader needs besides the benchmark."""

    data: Path
    """``--data``: the benchmark folder as distributed."""
    prompt_format: str
    """The model family (caption prompts depend on it)."""
    split: str | None = None
    """``--split`` (None: the benchmark's default)."""
    images: Path | None = None
    """``--images``: the image folder, where it is not found under ``data``."""
    question_types: tuple[str, ...] = ()
    """``--question-types`` (RSVQA): keep only these; empty: all."""
    questions: Path | None = None
    """``--questions``: GeoChat-Bench's VQA file, where it is not in ``data``."""


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: how to load it, decode for it and score it."""

    name: str
    """``--benchmark`` value."""
    title: str
    """Human name."""
    kind: Kind
    """How answers are read and scored."""
    task: str
    """rsflow task of its prompts (checked against the model family before inference)."""
    load: Callable[[LoadRequest], list[Sample]]
    """Reads the distributed files (raises ``RequestError`` naming ``--data`` for a wrong layout)."""
    splits: tuple[str, ...] = ()
    """Accepted ``--split`` values, the default first; empty: the benchmark has no splits."""
    normal_form: Callable[[str | None], str] = geochat_normal_form
    """VQA/scene answer normal form applied to prediction and reference alike."""
    reported_types: tuple[str, ...] = ()
    """VQA: the question types the paper reports (their own OA/AA are added to the metrics)."""
    classes: tuple[str, ...] = ()
    """Scene classification: every class of the dataset."""
    caption_metrics: tuple[str, ...] = ()
    """Caption kinds: the default ``--metrics``."""
    max_new_tokens: int = 256
    """Default generation budget (GeoChat's eval scripts: 256)."""
    batch_size: int = 8
    """Default prompts per generate call."""
    questions_file: str | None = None
    """GeoChat-Bench VQA: the file of questions (``--questions`` may point at it); None: no such file."""


def _no_extra(req: LoadRequest, *, images: bool = True) -> None:
    if req.question_types:
        raise RequestError("--question-types", "only the RSVQA benchmarks have question types")
    if req.images is not None and not images:
        raise RequestError("--images", "this benchmark reads its images from --data itself; leave --images out")


def _rsvqa(prefix: str) -> Callable[[LoadRequest], list[Sample]]:
    def load(req: LoadRequest) -> list[Sample]:
        return load_rsvqa(req.data, prefix=prefix, split=req.split, question_types=req.question_types or None,
                          images=req.images)

    return load


def _captions(flavour: str) -> Callable[[LoadRequest], list[Sample]]:
    def load(req: LoadRequest) -> list[Sample]:
        _no_extra(req)
        return load_captions(req.data, flavour=flavour, prompt_format=req.prompt_format, split=req.split,
                             images=req.images)

    return load


def _scenes(classes: tuple[str, ...], dataset: str) -> Callable[[LoadRequest], list[Sample]]:
    def load(req: LoadRequest) -> list[Sample]:
        _no_extra(req, images=False)
        if req.split is not None:
            raise RequestError("--split", f"{dataset} has no official split; leave --split out (use --limit)")
        return load_scene_folders(req.data, classes=classes, dataset=dataset)

    return load


def _geochat_scenes(file: str, classes: tuple[str, ...], dataset: str) -> Callable[[LoadRequest], list[Sample]]:
    def load(req: LoadRequest) -> list[Sample]:
        _no_extra(req)
        if req.split is not None:
            raise RequestError("--split", f"GeoChat-Bench's {file} has no split; leave --split out")
        return load_scene_jsonl(req.data, file=file, classes=classes, dataset=dataset, images=req.images)

    return load


def _geochat_vqa(file: str, prefix: str) -> Callable[[LoadRequest], list[Sample]]:
    def load(req: LoadRequest) -> list[Sample]:
        if req.split is not None:
            raise RequestError("--split", f"GeoChat-Bench's {file} is one split (GeoChat's); leave --split out")
        return load_vqa_jsonl(req.data, file=file, prefix=prefix, questions=req.questions, images=req.images,
                              question_types=req.question_types)

    return load


def _no_split(load_fn: Callable[..., list[Sample]], name: str) -> Callable[[LoadRequest], list[Sample]]:
    def load(req: LoadRequest) -> list[Sample]:
        _no_extra(req)
        if req.split is not None:
            raise RequestError("--split", f"{name} has one file and no split; leave --split out")
        return load_fn(req.data, images=req.images)

    return load


def _demo(req: LoadRequest) -> list[Sample]:
    _no_extra(req, images=False)
    return load_demo(req.data, split=req.split)


_ALL: Final[tuple[Benchmark, ...]] = (
    Benchmark("rsvqa-lr", "RSVQA-LR (GeoChat's LRBEN on the test split)", "vqa", "vqa", _rsvqa("LR"),
              splits=("test", "val", "train"), reported_types=REPORTED_TYPES["LR"]),
    Benchmark("rsvqa-hr", "RSVQA-HR (GeoChat's HRBEN on test_phili)", "vqa", "vqa", _rsvqa("USGS"),
              splits=("test_phili", "test", "val", "train"), reported_types=REPORTED_TYPES["USGS"]),
    Benchmark("ucm-captions", "UCM-captions", "caption", "caption", _captions("ucm"), splits=CAPTION_SPLITS,
              caption_metrics=("bleu", "meteor", "rouge-l", "cider")),
    Benchmark("sydney-captions", "Sydney-captions", "caption", "caption", _captions("sydney"),
              splits=CAPTION_SPLITS, caption_metrics=("bleu", "meteor", "rouge-l", "cider")),
    Benchmark("rsicd", "RSICD", "caption", "caption", _captions("rsicd"), splits=CAPTION_SPLITS,
              caption_metrics=("bleu", "meteor", "rouge-l", "cider")),
    Benchmark("ucmerced", "UC Merced Land Use (21 classes)", "classify", "classify",
              _scenes(UCMERCED_CLASSES, "UCMerced_LandUse"), classes=UCMERCED_CLASSES),
    Benchmark("aid", "AID (30 classes)", "classify", "classify", _scenes(AID_CLASSES, "AID"), classes=AID_CLASSES),
    Benchmark("resisc45", "NWPU-RESISC45 (45 classes)", "classify", "classify",
              _scenes(RESISC45_CLASSES, "NWPU-RESISC45"), classes=RESISC45_CLASSES),
    Benchmark("geochat-ucmerced", "GeoChat-Bench UCMerced (its images and prompts)", "classify", "classify",
              _geochat_scenes("UCmerced.jsonl", UCMERCED_CLASSES, "UCMerced_LandUse"), classes=UCMERCED_CLASSES),
    Benchmark("geochat-aid", "GeoChat-Bench AID (its images and prompts)", "classify", "classify",
              _geochat_scenes("aid.jsonl", AID_CLASSES, "AID"), classes=AID_CLASSES),
    Benchmark("geochat-lrben", "GeoChat-Bench LRBEN (lrben.jsonl; answers from RSVQA-LR test)", "vqa", "vqa",
              _geochat_vqa("lrben.jsonl", "LR"), reported_types=REPORTED_TYPES["LR"], questions_file="lrben.jsonl"),
    Benchmark("geochat-hrben", "GeoChat-Bench HRBEN (hrben.jsonl; answers from RSVQA-HR test_phili)", "vqa", "vqa",
              _geochat_vqa("hrben.jsonl", "USGS"), reported_types=REPORTED_TYPES["USGS"], questions_file="hrben.jsonl"),
    Benchmark("geochat-referring", "GeoChat-Bench referring and grounding", "boxes", "refer",
              _no_split(load_referring, "geochat-referring")),
    Benchmark("geochat-region-captioning", "GeoChat-Bench region captioning", "caption", "region-caption",
              _no_split(load_region_captions, "geochat-region-captioning"),
              caption_metrics=("rouge-1", "rouge-l", "meteor")),
    # evaluate_demo's decoding (8 new tokens, 32 prompts per generate call): what the recorded figures used
    Benchmark("rsflow-demo", "rsflow demo set, held-out blocks", "vqa", "vqa", _demo, splits=tuple(DEMO_SPLITS),
              normal_form=demo_normal_form, max_new_tokens=8, batch_size=32),
)

BENCHMARKS: Final[dict[str, Benchmark]] = {b.name: b for b in _ALL}
"""``--benchmark`` name -> benchmark."""


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name``.

    Raises:
        RequestError: (``--benchmark``) unknown name; the message lists the known ones.
    """
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise RequestError("--benchmark", f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}") from None
