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


# --- multi-task prompts -------------------------------------------------------------------------------

VQA_SUFFIX = "Answer the question using a single word or phrase."
SCENE_SUFFIX = "Classify the image from the following classes. Answer in one word or a short phrase."


def test_task_families() -> None:
    assert prompts.TASKS == ("caption", "vqa", "classify", "detect", "refer", "region-caption")
    assert prompts.TASKS_BY_FORMAT["geochat"] == prompts.TASKS
    assert prompts.TASKS_BY_FORMAT["llava"] == ("caption", "vqa", "classify")
    assert prompts.TASKS_BY_FORMAT["rsllava"] == ("caption", "vqa", "classify")
    assert set(prompts.TASKS_BY_FORMAT) == set(prompts.PROMPT_FORMATS)


def test_check_tasks_dedupes_and_keeps_order() -> None:
    assert prompts.check_tasks(["vqa", "caption", "vqa"], "llava") == ("vqa", "caption")


@pytest.mark.parametrize("task", ["detect", "refer", "region-caption"])
@pytest.mark.parametrize("fmt", ["llava", "rsllava"])
def test_box_tasks_need_geochat(task: str, fmt: str) -> None:
    with pytest.raises(
        RequestError, match=rf"--tasks: task '{task}' needs a model of the geochat family; '{fmt}' cannot"
    ):
        prompts.check_tasks(["caption", task], fmt)


def test_check_tasks_errors() -> None:
    with pytest.raises(RequestError, match=r"--tasks: unknown task 'segment'"):
        prompts.check_tasks(["segment"], "geochat")
    with pytest.raises(RequestError, match=r"--tasks: give at least one task"):
        prompts.check_tasks([], "geochat")
    with pytest.raises(RequestError, match="--prompt-format"):
        prompts.check_tasks(["caption"], "minigpt")


def test_exact_task_strings() -> None:
    assert prompts.vqa_prompt("Is there a road?") == "Is there a road?\n" + VQA_SUFFIX
    assert prompts.vqa_prompt("  How many ships are there? \n") == "How many ships are there?\n" + VQA_SUFFIX
    assert prompts.classify_prompt(["Church", "Beach", "Dense Residential", "Storage Tanks"]) == (
        "Classify the image in the following classes: Church, Beach, Dense Residential, Storage Tanks.\n"
        + SCENE_SUFFIX
    )
    assert prompts.refer_prompt("airplanes") == "[refer] Give me the location of <p> airplanes </p>"
    assert (
        prompts.region_prompt((8, 26, 22, 37)) == "[identify] What is the object present at {<8><26><22><37>}"
    )
    assert prompts.box_text((0, 0, 100, 100)) == "{<0><0><100><100>}"


def test_full_geochat_refer_prompt() -> None:
    text = prompts.build_prompt("geochat", prompts.refer_prompt("the white ship"))
    assert text == (
        HUMAN + " USER: <image>\n[refer] Give me the location of <p> the white ship </p> ASSISTANT:"
    )


@pytest.mark.parametrize(
    "bad", [(0, 0, 0, 10), (10, 0, 5, 10), (0, 0, 101, 10), (-1, 0, 5, 10), (0.0, 0, 5, 10), (0, 0, 5)]
)
def test_box_text_rejects_bad_boxes(bad: tuple) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError):
        prompts.box_text(bad)


def test_refer_rejects_tags_and_blank() -> None:
    with pytest.raises(RequestError, match="--refer"):
        prompts.refer_prompt("a <p>ship</p>")
    with pytest.raises(RequestError, match="--detect: an entry is empty"):
        prompts.refer_prompt("  ", flag="--detect")


def test_build_task_prompts_geochat_all() -> None:
    out = prompts.build_task_prompts(
        ["caption", "vqa", "classify", "detect", "refer", "region-caption"],
        "geochat",
        questions=["Is there a road?", "How many ships are there?", "Is there a road?"],
        classes=["Church", "Beach"],
        classes_key="mine",
        categories=["airplanes", "ships"],
        expressions=["the large white ship"],
        regions=["r1"],
    )
    assert [(t.task, t.key) for t in out] == [
        ("caption", ""),
        ("vqa", "Is there a road?"),
        ("vqa", "How many ships are there?"),
        ("classify", "mine"),
        ("detect", "airplanes"),
        ("detect", "ships"),
        ("refer", "the large white ship"),
    ]
    assert [t.prompt for t in out] == [
        "Describe the image in detail.",
        "Is there a road?\n" + VQA_SUFFIX,
        "How many ships are there?\n" + VQA_SUFFIX,
        "Classify the image in the following classes: Church, Beach.\n" + SCENE_SUFFIX,
        "[refer] Give me the location of <p> airplanes </p>",
        "[refer] Give me the location of <p> ships </p>",
        "[refer] Give me the location of <p> the large white ship </p>",
    ]
    assert all(t.region_id is None and t.box_0_100 is None for t in out)


def test_build_task_prompts_rsllava() -> None:
    out = prompts.build_task_prompts(
        ["caption", "classify", "vqa"], "rsllava", questions=["Q?"], classes=["A", "B"]
    )
    assert [t.prompt for t in out] == [
        "Provide a description of the image.",
        "Classify the image in the following classes: A, B.\n" + SCENE_SUFFIX,
        "Q?\n" + VQA_SUFFIX,
    ]
    assert out[1].key == "A, B"


@pytest.mark.parametrize(
    ("task", "flag"),
    [
        ("vqa", "--question"),
        ("classify", "--classes"),
        ("detect", "--detect"),
        ("refer", "--refer"),
        ("region-caption", "--regions"),
    ],
)
def test_build_task_prompts_missing_input_names_flag(task: str, flag: str) -> None:
    with pytest.raises(RequestError, match=rf"^{flag}: task '{task}' needs at least one value"):
        prompts.build_task_prompts([task], "geochat")


def test_build_task_prompts_blank_entries() -> None:
    with pytest.raises(RequestError, match="--question: a question is empty"):
        prompts.build_task_prompts(["vqa"], "geochat", questions=["Q?", " "])
    with pytest.raises(RequestError, match="--classes"):
        prompts.build_task_prompts(["classify"], "geochat", classes=["A", ""])
    with pytest.raises(RequestError, match="--regions: a region id is empty"):
        prompts.build_task_prompts(["region-caption"], "geochat", regions=["a", ""])


def test_build_task_prompts_warns_on_unused_input(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="rsflow.models.prompts"):
        prompts.build_task_prompts(["caption"], "llava", questions=["Q?"])
    assert "--question is given but task 'vqa' is not requested" in caplog.text


def test_region_task_prompts_per_tile() -> None:
    out = prompts.region_task_prompts([("field-7", (8, 26, 22, 37)), ("far-away", None)])
    assert out == [
        prompts.TaskPrompt(
            "region-caption",
            "[identify] What is the object present at {<8><26><22><37>}",
            key="field-7",
            region_id="field-7",
            box_0_100=(8, 26, 22, 37),
        )
    ]


def test_task_prompts_points_input_tasks_to_builder() -> None:
    with pytest.raises(RequestError, match="--tasks: task 'vqa' is built from user input"):
        prompts.task_prompts("vqa", "geochat")
