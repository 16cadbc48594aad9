"""Conversation templates and per-task prompts of the LLaVA-1.5 family (LLaVA, RS-LLaVA, GeoChat).

The strings here are copied byte for byte from the original repositories (see
``reference/models.md`` section 2.1): a model answers noticeably differently when its system
sentence is off by one word, so nothing in this module is paraphrased.

A single-turn inference prompt renders as::

    <SYSTEM> USER: <image>\\n<question> ASSISTANT:

which is LLaVA's ``conv_llava_v1.get_prompt()`` (separator style TWO, ``sep=" "``) after
``append_message(USER, "<image>\\n" + question)`` and ``append_message(ASSISTANT, None)``.
"""

from __future__ import annotations

import logging
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
    if task not in TASK_PROMPTS:
        raise RequestError("--tasks", f"unknown task {task!r}; choose from {', '.join(sorted(TASK_PROMPTS))}")
    return list(TASK_PROMPTS[task][prompt_format])
