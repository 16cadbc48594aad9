"""The papers' published numbers, for the table beside a run's (``reference/models.md`` 6.2, 6.3).

Transcribed from third-party copies of the GeoChat paper's tables (CVPR 2024; not checked against the PDF)
and a third-party summary of the RS-LLaVA paper; values are percentages. Each row names the path of the
run's value in ``metrics.json`` (dots between keys; the run's 0-1 values are shown x100).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final


@dataclass(frozen=True)
class PublishedRow:
    """One line of the comparison table."""

    label: str
    """What the line measures, as the paper names it."""
    metric: str
    """Path of the run's value in ``metrics.json``, e.g. ``per_type.presence.accuracy``."""
    values: dict[str, float | None] = field(default_factory=dict)
    """Model (as the paper names it) -> published value in percent; None: not published / not transcribed."""


GEOCHAT: Final[str] = "GeoChat (paper)"
LLAVA15: Final[str] = "LLaVA-1.5 (GeoChat paper)"
MINIGPTV2: Final[str] = "MiniGPTv2 (GeoChat paper)"
RSLLAVA: Final[str] = "RS-LLaVA-7B (paper, joint)"

_SCENE_NOTE = "GeoChat: zero-shot on GeoChat-Bench's image list and prompts (UCmerced.jsonl / aid.jsonl), as here."
_FOLDER_SCENE_NOTE = (
    "Every image of the dataset, with rsflow's class-list prompt: not GeoChat-Bench's image list or prompts, "
    "so the papers' numbers (GeoChat {geochat}, LLaVA-1.5 {llava}) are not comparable with this run; "
    "--benchmark {bench} scores GeoChat-Bench's own."
)
_CAPTION_NOTE = (
    "RS-LLaVA reports BLEU-1..4, METEOR, ROUGE-L and CIDEr on UCM-captions; the values could not be "
    "transcribed offline (reference/models.md 6.3), so none are shown."
)

PUBLISHED: Final[dict[str, tuple[list[PublishedRow], str]]] = {
    "geochat-ucmerced": (
        [PublishedRow("accuracy", "accuracy", {GEOCHAT: 84.43, LLAVA15: 68.00})],
        _SCENE_NOTE,
    ),
    "geochat-aid": (
        [PublishedRow("accuracy", "accuracy", {GEOCHAT: 72.03, LLAVA15: 51.00})],
        _SCENE_NOTE,
    ),
    "ucmerced": (
        [PublishedRow("accuracy", "accuracy", {})],
        _FOLDER_SCENE_NOTE.format(geochat="84.43", llava="68.00", bench="geochat-ucmerced"),
    ),
    "aid": (
        [PublishedRow("accuracy", "accuracy", {})],
        _FOLDER_SCENE_NOTE.format(geochat="72.03", llava="51.00", bench="geochat-aid"),
    ),
    "resisc45": (
        [PublishedRow("accuracy", "accuracy", {})],
        (
            "Neither paper reports NWPU-RESISC45, and GeoChat trains on it (its instruction set is built from "
            "NWPU-RESISC-45 among others): a GeoChat score here is not zero-shot."
        ),
    ),
    "rsvqa-lr": (
        [
            PublishedRow("presence", "per_type.presence.accuracy", {GEOCHAT: 91.09}),
            PublishedRow("comparison", "per_type.comp.accuracy", {GEOCHAT: 90.33}),
            PublishedRow("rural/urban", "per_type.rural_urban.accuracy", {GEOCHAT: 94.00}),
            PublishedRow("count (not reported by GeoChat)", "per_type.count.accuracy", {}),
            PublishedRow(
                "avg. accuracy (presence, comparison, rural/urban; over all their questions)",
                "accuracy_reported_types",
                {GEOCHAT: 90.70, LLAVA15: 62.77},
            ),
            PublishedRow("mean of the three type accuracies", "average_accuracy_reported_types", {RSLLAVA: 88.13}),
        ],
        (
            "GeoChat's LRBEN is the LR test split, presence/comparison/rural-urban. Its 'Avg. Accuracy' (90.70) "
            "is not the mean of its three type accuracies (91.81), so it is compared with the accuracy over all "
            "questions of those types (unconfirmed). RS-LLaVA: 'average accuracy' 88.56 single-task, 88.13 joint "
            "(third-party summary, unconfirmed), compared with the mean of the per-type accuracies, the "
            "benchmark's average accuracy (AA)."
        ),
    ),
    "rsvqa-hr": (
        [
            PublishedRow("presence", "per_type.presence.accuracy", {GEOCHAT: 58.45}),
            PublishedRow("comparison", "per_type.comp.accuracy", {GEOCHAT: 83.19}),
            PublishedRow("count (not reported)", "per_type.count.accuracy", {}),
            PublishedRow("area (not reported)", "per_type.area.accuracy", {}),
            PublishedRow(
                "avg. accuracy (presence, comparison)", "accuracy_reported_types", {GEOCHAT: 72.30, LLAVA15: 68.40}
            ),
        ],
        "GeoChat's HRBEN is test set 2 (test_phili, Philadelphia), presence and comparison, zero-shot.",
    ),
    "geochat-referring": (
        [
            PublishedRow("small", "by_size.small.accuracy", {GEOCHAT: 2.9}),
            PublishedRow("medium", "by_size.medium.accuracy", {GEOCHAT: 13.6}),
            PublishedRow("large", "by_size.large.accuracy", {GEOCHAT: 21.7}),
            PublishedRow("single object", "by_count.single.accuracy", {GEOCHAT: 16.0}),
            PublishedRow("multiple objects", "by_count.multiple.accuracy", {GEOCHAT: 4.3}),
            PublishedRow("[refer]", "by_type.ref.accuracy", {GEOCHAT: 10.5}),
            PublishedRow("[grounding]", "by_type.grounding.accuracy", {GEOCHAT: 11.8}),
            PublishedRow("overall", "accuracy", {GEOCHAT: 10.6, MINIGPTV2: 7.6}),
        ],
        (
            "acc@0.5: a ground-truth object counts when a predicted rotated box has polygon IoU > 0.5 with it "
            "(one prediction per object, greedy by IoU); accuracy = objects found / objects. GeoChat published "
            "no scorer, so its matching rule is unconfirmed."
        ),
    ),
    "geochat-region-captioning": (
        [
            PublishedRow("ROUGE-1", "ROUGE_1", {GEOCHAT: 87.3}),
            PublishedRow("ROUGE-L", "ROUGE_L", {GEOCHAT: 87.2}),
            PublishedRow("METEOR", "METEOR", {GEOCHAT: 83.9}),
        ],
        (
            "GeoChat's ROUGE/METEOR tooling is unconfirmed (users could not reproduce it, GeoChat issue #40); "
            "here ROUGE-L and METEOR are pycocoevalcap's (its ROUGE-L is an F-measure with beta 1.2, weighted "
            "towards recall), ROUGE-1 the unigram F1 (beta 1) on the same tokens: the two are not the same "
            "kind of F, and third-party GeoChat scorers use the rouge_score package's F1 for both."
        ),
    ),
    **{
        name: (
            [
                PublishedRow("BLEU-1", "Bleu_1", {RSLLAVA: None}),
                PublishedRow("BLEU-2", "Bleu_2", {RSLLAVA: None}),
                PublishedRow("BLEU-3", "Bleu_3", {RSLLAVA: None}),
                PublishedRow("BLEU-4", "Bleu_4", {RSLLAVA: None}),
                PublishedRow("METEOR", "METEOR", {RSLLAVA: None}),
                PublishedRow("ROUGE-L", "ROUGE_L", {RSLLAVA: None}),
                PublishedRow("CIDEr", "CIDEr", {RSLLAVA: None}),
            ],
            _CAPTION_NOTE if name == "ucm-captions" else "No published number for this set is transcribed here.",
        )
        for name in ("ucm-captions", "sydney-captions", "rsicd")
    },
}
"""Benchmark name -> (table rows, a note printed under the table)."""

_GEOCHAT_VQA_NOTE = (
    "GeoChat-Bench's own question list and prompts ({file}), answers and question types from RSVQA: the "
    "questions GeoChat's numbers were measured on. "
)
PUBLISHED["geochat-lrben"] = (PUBLISHED["rsvqa-lr"][0],
                              _GEOCHAT_VQA_NOTE.format(file="lrben.jsonl") + PUBLISHED["rsvqa-lr"][1])
PUBLISHED["geochat-hrben"] = (PUBLISHED["rsvqa-hr"][0],
                              _GEOCHAT_VQA_NOTE.format(file="hrben.jsonl") + PUBLISHED["rsvqa-hr"][1])

PUBLISHED_SPLITS: Final[dict[str, str]] = {
    "rsvqa-lr": "test",  # GeoChat's LRBEN, RS-LLaVA's LR test
    "rsvqa-hr": "test_phili",  # GeoChat's HRBEN: test set 2 (Philadelphia), not test set 1 (`test`)
    "ucm-captions": "test",
    "sydney-captions": "test",
    "rsicd": "test",
    "rsflow-demo": "test",  # the held-out blocks the demo model's card recorded its figures on
}
"""Benchmark -> the split its published (or recorded) numbers were measured on (``reference/benchmarks.md``
1.6, 2.4, checklist 8). A run of another ``--split`` gets no published column: the same rows, its own
numbers only, and a note saying why. Benchmarks not named have a single question list (GeoChat-Bench's
files, scene folders)."""
