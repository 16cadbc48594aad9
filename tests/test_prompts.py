"""rsflow.models.prompts: templates compared byte for byte with strings written out here."""

from __future__ import annotations

import pytest

from rsflow.errors import RequestError
from rsflow.models import prompts

HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
RSLLAVA = (
    "The assistant provides helpful, detailed, and polite responses to the human's questions. "
    "If the assistant is unsure about the answer, it will respectfully communicate, "
    "'I'm sorry, I do not know the answer' to maintain clarity and honesty in the interaction."
)


def test_system_strings_are_the_published_ones() -> None:
    assert prompts.SYSTEM_LLAVA_V1 == HUMAN
    assert prompts.SYSTEM_VICUNA_V1 == USER
    assert prompts.SYSTEM_RSLLAVA == RSLLAVA
    assert prompts.SYSTEM_PROMPTS == {"llava": HUMAN, "geochat": HUMAN, "rsllava": RSLLAVA}


def test_build_prompt_llava() -> None:
    expected = (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions. USER: <image>\n"
        "Describe the image in detail. ASSISTANT:"
    )
    assert prompts.build_prompt("llava", "Describe the image in detail.") == expected


def test_build_prompt_geochat_uses_llava_v1_system() -> None:
    expected = (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions. USER: <image>\n"
        "How many ships are there? ASSISTANT:"
    )
    assert prompts.build_prompt("geochat", "How many ships are there?") == expected


def test_build_prompt_rsllava() -> None:
    expected = (
        "The assistant provides helpful, detailed, and polite responses to the human's questions. "
        "If the assistant is unsure about the answer, it will respectfully communicate, "
        "'I'm sorry, I do not know the answer' to maintain clarity and honesty in the interaction. "
        "USER: <image>\nProvide a description of the image. ASSISTANT:"
    )
    assert prompts.build_prompt("rsllava", "Provide a description of the image.") == expected


def test_build_prompt_shape_details() -> None:
    text = prompts.build_prompt("llava", "Q")
    assert text.endswith(" USER: <image>\nQ ASSISTANT:")  # one space separators, none after the last colon
    assert text.count("<image>") == 1
    assert not text.endswith(" ")


def test_task_prompts_caption() -> None:
    assert prompts.task_prompts("caption", "llava") == ["Describe the image in detail."]
    assert prompts.task_prompts("caption", "geochat") == ["Describe the image in detail."]
    assert prompts.task_prompts("caption", "rsllava") == ["Provide a description of the image."]


def test_task_table_covers_every_format() -> None:
    for task, per_format in prompts.TASK_PROMPTS.items():
        assert set(per_format) == set(prompts.PROMPT_FORMATS), task
        assert all(per_format[f] for f in prompts.PROMPT_FORMATS), task


def test_unknown_task_names_the_flag() -> None:
    with pytest.raises(RequestError, match=r"--tasks: unknown task 'segment'"):
        prompts.task_prompts("segment", "llava")


@pytest.mark.parametrize(
    "call", [lambda: prompts.build_prompt("vicuna", "Q"), lambda: prompts.task_prompts("caption", "x")]
)
def test_unknown_format_names_the_flag(call: object) -> None:
    with pytest.raises(RequestError, match="--prompt-format"):
        call()  # type: ignore[operator]
