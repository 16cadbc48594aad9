"""Conversation templates and per-task prompts of the LLaVA-1.5 family (LLaVA, RS-LLaVA, GeoChat).

The strings here are copied byte for byte from the original repositories (see
``reference/models.md`` section 2.1): a model answers noticeably differently when its system
sentence is off by one word, so nothing in this module is paraphrased.

A single-turn inference prompt renders as::

    <SYSTEM> USER: <image>\\n<question> ASSISTANT:

which is LLaVA's ``conv_llava_v1.get_prompt()`` (separator style TWO, ``sep=" "``) after
``append_message(USER, "<image>\\n" + question)`` and ``append_message(ASSISTANT, None)``.

Tasks (``--tasks``) and the user text each one sends (the ``<question>`` above; ``reference/models.md``
sections 3.4, 3.5 and 7 item 16)::

    caption         TASK_PROMPTS["caption"][prompt_format]
    vqa             <question> + "\\n" + "Answer the question using a single word or phrase."
    classify        "Classify the image in the following classes: " + ", ".join(classes) + "." + "\\n"
                    + "Classify the image from the following classes. Answer in one word or a short phrase."
    detect          "[refer] Give me the location of <p> " + category + " </p>"              (geochat only)
    refer           "[refer] Give me the location of <p> " + expression + " </p>"            (geochat only)
    region-caption  "[identify] What is the object present at " + "{<x1><y1><x2><y2>}"      (geochat only)

Only GeoChat was trained on the box grammar and the ``[refer]``/``[identify]`` task tokens, so the
three box tasks need a model of the geochat family (``TASKS_BY_FORMAT``, ``check_tasks``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args

from rsflow.errors import RequestError

logger = logging.getLogger(__name__)

PromptFormat = Literal["llava", "rsllava", "geochat"]
"""Which conversation template a checkpoint was trained/evaluated with."""

PROMPT_FORMATS: Final[tuple[str, ...]] = get_args(PromptFormat)
"""All accepted ``prompt_format`` values, in a stable order."""

SYSTEM_LLAVA_V1: Final[str] = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
"""``conv_llava_v1`` system string (LLaVA and GeoChat ``--conv-mode llava_v1``): used at inference."""

SYSTEM_VICUNA_V1: Final[str] = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
"""``conv_vicuna_v1`` system string (``--version v1``): what LLaVA and GeoChat were TRAINED with."""

SYSTEM_RSLLAVA: Final[str] = (
    "The assistant provides helpful, detailed, and polite responses to the human's questions. "
    "If the assistant is unsure about the answer, it will respectfully communicate, "
    "'I'm sorry, I do not know the answer' to maintain clarity and honesty in the interaction."
)
"""RS-LLaVA's vendored ``llava_v1`` system string (BigData-KSU/RS-LLaVA llava/conversation.py)."""

SYSTEM_PROMPTS: Final[dict[str, str]] = {
    "llava": SYSTEM_LLAVA_V1,
    "geochat": SYSTEM_LLAVA_V1,
    "rsllava": SYSTEM_RSLLAVA,
}
"""Inference system string per prompt format (``llava_v1`` conv mode of each repository)."""

IMAGE_TOKEN: Final[str] = "<image>"
"""The image placeholder in the text; the processor expands it to one token per image patch."""

USER_ROLE: Final[str] = "USER"
ASSISTANT_ROLE: Final[str] = "ASSISTANT"

# Caption prompts. GeoChat's README/demo and LLaVA's own examples ask for a detailed description with
# "Describe the image in detail."; RS-LLaVA's captioning instructions (RS-instructions, UCM/UAV
# captions) are phrased "Provide a description of the image.", so each model gets the wording it was
# tuned on. Other tasks (vqa, grounding, ...) are added here as they are implemented.
TASK_PROMPTS: Final[dict[str, dict[str, tuple[str, ...]]]] = {
    "caption": {
        "llava": ("Describe the image in detail.",),
        "geochat": ("Describe the image in detail.",),
        "rsllava": ("Provide a description of the image.",),
    },
}
"""task -> prompt format -> the user questions asked for that task (one output row each)."""


def _check_format(prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise RequestError(
            "--prompt-format",
            f"unknown prompt format {prompt_format!r}; choose one of {', '.join(PROMPT_FORMATS)}",
        )


def build_prompt(prompt_format: str, question: str) -> str:
    """Render the full single-turn, image-first inference prompt.

    Args:
        prompt_format: ``"llava"``, ``"rsllava"`` or ``"geochat"``.
        question: the user's question text, without ``<image>``.

    Returns:
        ``"<SYSTEM> USER: <image>\\n<question> ASSISTANT:"`` (no space after the final colon).

    Raises:
        RequestError: unknown ``prompt_format``.
    """
    _check_format(prompt_format)
    user_text = f"{IMAGE_TOKEN}\n{question}"
    # Style TWO: system + " ", then "ROLE: text" + sep after a USER turn, and a None message is "ROLE:".
    return f"{SYSTEM_PROMPTS[prompt_format]} {USER_ROLE}: {user_text} {ASSISTANT_ROLE}:"


def task_prompts(task: str, prompt_format: str) -> list[str]:
    """The user questions asked for ``task`` under ``prompt_format``.

    Args:
        task: a key of ``TASK_PROMPTS`` (e.g. ``"caption"``).
        prompt_format: ``"llava"``, ``"rsllava"`` or ``"geochat"``.

    Returns:
        The question texts (not the full template), in a stable order.

    Raises:
        RequestError: unknown task (``--tasks``) or prompt format (``--prompt-format``).
    """
    _check_format(prompt_format)
    if task in TASKS and task not in TASK_PROMPTS:
        raise RequestError(
            "--tasks", f"task {task!r} is built from user input; use build_task_prompts, not task_prompts"
        )
    if task not in TASK_PROMPTS:
        raise RequestError("--tasks", f"unknown task {task!r}; choose from {', '.join(sorted(TASK_PROMPTS))}")
    return list(TASK_PROMPTS[task][prompt_format])


# ---------------------------------------------------------------------------------------------------
# Multi-task prompts
# ---------------------------------------------------------------------------------------------------

Task = Literal["caption", "vqa", "classify", "detect", "refer", "region-caption"]
"""A value of ``--tasks``."""

TASKS: Final[tuple[str, ...]] = get_args(Task)
"""All tasks, in a stable order."""

# Which family can do what. The box grammar ``{<x1><y1><x2><y2>|<theta>}`` and the task tokens
# ``[refer]``/``[identify]`` are GeoChat's own (models.md 3.4): only GeoChat_Instruct taught a model to read
# and write them. LLaVA-1.5 and RS-LLaVA never saw them, so asking them would give free text that no parser
# can turn into boxes; we refuse the request up front instead of producing empty detections.
TASKS_BY_FORMAT: Final[dict[str, tuple[str, ...]]] = {
    "geochat": TASKS,
    "llava": ("caption", "vqa", "classify"),
    "rsllava": ("caption", "vqa", "classify"),
}
"""prompt format -> the tasks a model of that family can run (geochat: all six)."""

_TASK_VERBS: Final[dict[str, str]] = {
    "detect": "locate objects",
    "refer": "locate a referred object",
    "region-caption": "describe a given box",
}

VQA_SUFFIX: Final[str] = "Answer the question using a single word or phrase."
"""Appended on its own line after a VQA question.

GeoChat's RSVQA evaluation text (docs/Evaluation.md, models.md 3.5). It is also LLaVA-1.5's own short-answer
instruction (the VQAv2/GQA part of ``llava_v1_5_mix665k.json`` and its eval prompts), so llava gets it too.
RS-LLaVA's stage 2 trained on that same mix665k file plus RS-instructions (whose RSVQA-LR wording is not
published), so it gets the same suffix (models.md 4.4)."""

CLASSIFY_LEAD: Final[str] = "Classify the image in the following classes: "
"""First line of a classification prompt, followed by the class list and a full stop.

The GeoChat-Bench jsonl question wording is unconfirmed (models.md 3.5); this is the only published GeoChat
wording that carries a class list: the demo example (geochat_demo.py)
``Classify the image in the following classes: Church, Beach, Dense Residential, Storage Tanks.``"""

CLASSIFY_SUFFIX: Final[str] = (
    "Classify the image from the following classes. Answer in one word or a short phrase."
)
"""Appended on its own line after the class-list question (GeoChat docs/Evaluation.md, models.md 3.5/7.16)."""

REFER_PREFIX: Final[str] = "[refer] Give me the location of <p> "
"""Start of a ``[refer]`` prompt (geochat/eval/batch_geochat_grounding.py); note the space inside ``<p>``."""

REFER_SUFFIX: Final[str] = " </p>"
"""End of a ``[refer]`` prompt (space before ``</p>``)."""

IDENTIFY_PREFIX: Final[str] = "[identify] What is the object present at "
"""Start of a region-caption prompt (geochat/eval/batch_geochat_referring.py); the box text follows."""

BoxInt = tuple[int, int, int, int]
"""An axis-aligned box ``(x1, y1, x2, y2)`` on GeoChat's 0-100 grid (1/100 of the tile width/height;
x1, y1 = left, top; y grows downwards)."""


@dataclass(frozen=True)
class TaskPrompt:
    """One question asked of every tile (or, for region-caption, of one tile)."""

    task: str
    """A value of ``TASKS``."""
    prompt: str
    """The exact user text that follows ``"<image>\\n"`` (pass it to ``build_prompt``)."""
    key: str
    """The user-facing input it came from: the question (vqa), the class-list preset name or the list as given
    (classify), the category (detect), the expression (refer), the region id (region-caption); ``""`` for
    caption, which takes no input."""
    region_id: str | None = None
    """Region id (region-caption only)."""
    box_0_100: BoxInt | None = None
    """The region's box on the tile, 0-100 grid, as written into ``prompt`` (region-caption only)."""
    adapter: str | None = None
    """Name of the model's named adapter that answers this prompt (``ModelSpec.adapters``); None: the
    model as loaded (with its merged ``--adapter``, if any)."""


def check_tasks(tasks: Iterable[str], prompt_format: str) -> tuple[str, ...]:
    """Check that every task exists and that the model family can run it.

    Args:
        tasks: task names as given (``--tasks``); repeats are dropped, first occurrence kept.
        prompt_format: ``"llava"``, ``"rsllava"`` or ``"geochat"``.

    Returns:
        The tasks, de-duplicated, in the order given.

    Raises:
        RequestError: unknown format (``--prompt-format``); no task, an unknown task, or a task the family
            cannot do (``--tasks``), e.g. ``task 'detect' needs a model of the geochat family; 'rsllava'
            cannot locate objects ...``.
    """
    _check_format(prompt_format)
    out: list[str] = []
    for task in tasks:
        if task not in TASKS:
            raise RequestError("--tasks", f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        if task not in TASKS_BY_FORMAT[prompt_format]:
            raise RequestError(
                "--tasks",
                f"task {task!r} needs a model of the geochat family; {prompt_format!r} cannot "
                f"{_TASK_VERBS[task]} (GeoChat's box grammar and [refer]/[identify] task tokens are not in "
                f"its training). Use a geochat model or drop the task; {prompt_format!r} can do "
                f"{', '.join(TASKS_BY_FORMAT[prompt_format])}",
            )
        if task not in out:
            out.append(task)
    if not out:
        raise RequestError("--tasks", f"give at least one task; choose from {', '.join(TASKS)}")
    return tuple(out)


def vqa_prompt(question: str) -> str:
    """``question + "\\n" + VQA_SUFFIX`` (the question is stripped of surrounding whitespace).

    Raises:
        RequestError: blank question (``--question``).
    """
    text = question.strip()
    if not text:
        raise RequestError("--question", "a question is empty")
    return f"{text}\n{VQA_SUFFIX}"


def classify_prompt(classes: Sequence[str]) -> str:
    """``CLASSIFY_LEAD + ", ".join(classes) + "." + "\\n" + CLASSIFY_SUFFIX``.

    Raises:
        RequestError: no classes or a blank class name (``--classes``).
    """
    names = [c.strip() for c in classes]
    if not names or not all(names):
        raise RequestError("--classes", "give a non-empty list of class names (or a preset: aid, resisc45, ucmerced)")
    return f"{CLASSIFY_LEAD}{', '.join(names)}.\n{CLASSIFY_SUFFIX}"


def refer_prompt(expression: str, *, flag: str = "--refer") -> str:
    """``REFER_PREFIX + expression + REFER_SUFFIX``: GeoChat's ``[refer]`` prompt for locating objects.

    Used for both detect (the expression is a category such as ``"airplanes"``) and refer.

    Args:
        expression: what to locate; stripped of surrounding whitespace.
        flag: the flag named in errors (``--refer`` or ``--detect``).

    Raises:
        RequestError: blank expression, or one holding ``<p>``/``</p>`` (it would break the grammar).
    """
    text = expression.strip()
    if not text:
        raise RequestError(flag, "an entry is empty")
    if "<p>" in text or "</p>" in text:
        raise RequestError(flag, f"{text!r} must not contain <p> or </p>")
    return f"{REFER_PREFIX}{text}{REFER_SUFFIX}"


def box_text(box_0_100: BoxInt) -> str:
    """GeoChat's angle-less input box ``{<x1><y1><x2><y2>}`` (integers, 0-100 grid, as the demo's mask2bbox).

    Raises:
        ValueError: not four integers with ``0 <= x1 < x2 <= 100`` and ``0 <= y1 < y2 <= 100``.
    """
    if len(box_0_100) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in box_0_100):
        raise ValueError(f"box must be four integers on the 0-100 grid, got {box_0_100!r}")
    x1, y1, x2, y2 = box_0_100
    if not (0 <= x1 < x2 <= 100 and 0 <= y1 < y2 <= 100):
        raise ValueError(f"box must satisfy 0 <= x1 < x2 <= 100 and 0 <= y1 < y2 <= 100, got {box_0_100!r}")
    return f"{{<{x1}><{y1}><{x2}><{y2}>}}"


def region_prompt(box_0_100: BoxInt) -> str:
    """``IDENTIFY_PREFIX + box_text(box_0_100)``.

    Example: ``(8, 26, 22, 37)`` -> ``[identify] What is the object present at {<8><26><22><37>}``.

    Raises:
        ValueError: see ``box_text``.
    """
    return f"{IDENTIFY_PREFIX}{box_text(box_0_100)}"


def region_task_prompts(boxes: Sequence[tuple[str, BoxInt | None]]) -> list[TaskPrompt]:
    """Region-caption prompts for one tile.

    Args:
        boxes: ``(region_id, box)`` pairs, the box on this tile's 0-100 grid (``georef.region_to_box``);
            ``None`` means the region misses the tile and is skipped.

    Returns:
        One ``TaskPrompt`` per region that meets the tile, in the order given.

    Raises:
        ValueError: a malformed box (see ``box_text``).
    """
    return [
        TaskPrompt("region-caption", region_prompt(box), key=rid, region_id=rid, box_0_100=box)
        for rid, box in boxes
        if box is not None
    ]


def _unique(values: Iterable[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        if v.strip() not in out:
            out.append(v.strip())
    return out


def build_task_prompts(
    tasks: Iterable[str],
    prompt_format: str,
    *,
    questions: Sequence[str] = (),
    classes: Sequence[str] = (),
    classes_key: str | None = None,
    categories: Sequence[str] = (),
    expressions: Sequence[str] = (),
    regions: Sequence[str] = (),
) -> list[TaskPrompt]:
    """Check a multi-task request and build the prompts that are the same for every tile.

    Args:
        tasks: ``--tasks`` values (checked with ``check_tasks``).
        prompt_format: ``"llava"``, ``"rsllava"`` or ``"geochat"``.
        questions: vqa questions (``--question``), one prompt each.
        classes: class names for classify (``--classes``, already resolved by ``presets.resolve_classes``).
        classes_key: ``key`` of the classify prompt (the preset name); default the classes joined by ``", "``.
        categories: object categories for detect (``--detect``), one prompt each.
        expressions: referring expressions for refer (``--refer``), one prompt each.
        regions: region ids for region-caption (``--regions``); only checked here.

    Returns:
        Prompts in task order, then input order (repeated inputs dropped). Region-caption prompts are NOT in
        the list: their text holds the region's box on the tile, so build them per tile with
        ``region_task_prompts``.

    Raises:
        RequestError: a bad ``--tasks``/``--prompt-format`` (``check_tasks``), or a task without its input:
            vqa without ``--question``, classify without ``--classes``, detect without ``--detect``
            categories, refer without ``--refer``, region-caption without ``--regions``; or a blank entry.
    """
    checked = check_tasks(tasks, prompt_format)
    inputs = {
        "vqa": questions,
        "classify": classes,
        "detect": categories,
        "refer": expressions,
        "region-caption": regions,
    }
    flags = {
        "vqa": "--question",
        "classify": "--classes",
        "detect": "--detect",
        "refer": "--refer",
        "region-caption": "--regions",
    }
    for task, values in inputs.items():
        if task in checked and not [v for v in values if v.strip()]:
            raise RequestError(flags[task], f"task {task!r} needs at least one value of {flags[task]}")
        if task not in checked and values:
            logger.warning("%s is given but task %r is not requested; it is ignored", flags[task], task)
    if "region-caption" in checked and any(not r.strip() for r in regions):
        raise RequestError("--regions", "a region id is empty")

    out: list[TaskPrompt] = []
    for task in checked:
        if task == "caption":
            out += [TaskPrompt("caption", q, key="") for q in task_prompts("caption", prompt_format)]
        elif task == "vqa":
            out += [TaskPrompt("vqa", vqa_prompt(q), key=q) for q in _unique(questions)]
        elif task == "classify":
            names = [c.strip() for c in classes]
            key = classes_key if classes_key is not None else ", ".join(names)
            out.append(TaskPrompt("classify", classify_prompt(names), key=key))
        elif task == "detect":
            out += [
                TaskPrompt("detect", refer_prompt(c, flag="--detect"), key=c) for c in _unique(categories)
            ]
        elif task == "refer":
            out += [TaskPrompt("refer", refer_prompt(e), key=e) for e in _unique(expressions)]
    return out
