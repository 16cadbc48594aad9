"""rsflow.models.parse: VQA normal form, class matching and GeoChat's box grammar (models.md 3.4, 6.1)."""

from __future__ import annotations

import pytest

from rsflow.models.parse import Box, ClassMatch, VqaAnswer, match_class, normalize_vqa, parse_boxes
from rsflow.presets import AID_CLASSES, UCMERCED_CLASSES

# --- VQA ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer", "number"),
    [
        ("Yes", "yes", None),
        ("Yes.", "yes", None),
        ("yes, there is", "yes", None),
        (" NO! ", "no", None),
        ("no</s>", "no", None),
        ("3", "3", 3.0),
        ("3.", "3", 3.0),
        ("2.5", "2.5", 2.5),
        ("1,200", "1200", 1200.0),
        ("three", "3", 3.0),
        ("Twenty", "20", 20.0),
        ("zero", "0", 0.0),
        ("4 ships", "4", 4.0),
        ("There are 5 planes.", "5", 5.0),
        ("there is one", "1", 1.0),
        ("twenty-one", "twenty-one", None),  # number words stop at twenty
        ("Rural.", "rural", None),
        ("  Urban area ", "urban area", None),
        ("There are many planes.", "there are many planes", None),
    ],
)
def test_normalize_vqa(text: str, answer: str, number: float | None) -> None:
    assert normalize_vqa(text) == VqaAnswer(answer, number, None)


@pytest.mark.parametrize("text", ["", "   ", "\n", ".", "</s>"])
def test_normalize_vqa_empty(text: str) -> None:
    assert normalize_vqa(text) == VqaAnswer(None, None, "empty answer")


# --- classification -------------------------------------------------------------------------------------

UCM = list(UCMERCED_CLASSES)


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Dense Residential", "Dense Residential"),  # GeoChat rule
        ("Dense Residential.", "Dense Residential"),
        ("denseresidential", "Dense Residential"),
        ("dense residential.", "Dense Residential"),
        ("Golf course", "Golf Course"),
        ("The image shows a dense residential area.", "Dense Residential"),  # fallback: one whole phrase
        ("This is a parking lot next to a road", "Parking Lot"),
        ("airplanes", "Airplane"),  # plural
        ("Storage tanks", "Storage Tanks"),
        ("a mobile-home park", "Mobile Home Park"),
    ],
)
def test_match_class(text: str, label: str) -> None:
    assert match_class(text, UCM) == ClassMatch(label, None)


def test_match_class_whole_words_only() -> None:
    # AID has both "Park" and "Parking": "parking" must not count as "park", "airport" not as "port"
    assert match_class("a large parking area", list(AID_CLASSES)) == ClassMatch("Parking", None)
    assert match_class("an airport with runways", list(AID_CLASSES)) == ClassMatch("Airport", None)


def test_match_class_longer_phrase_wins() -> None:
    classes = ["Residential", "Dense Residential", "Forest"]
    assert match_class("mostly dense residential blocks", classes) == ClassMatch("Dense Residential", None)


def test_match_class_none_and_ambiguous() -> None:
    assert match_class("a city", UCM) == ClassMatch(None, "matches none of 21 classes")
    assert match_class("a river next to a forest", UCM) == ClassMatch(
        None, "ambiguous: matches River and Forest"
    )
    assert match_class("beach, river or forest", UCM) == ClassMatch(
        None, "ambiguous: matches Beach, River and Forest"
    )
    assert match_class("  ", UCM) == ClassMatch(None, "empty answer")
    assert match_class("Beach", []) == ClassMatch(None, "no classes given")


# --- boxes ------------------------------------------------------------------------------------------------


def test_single_box_with_angle() -> None:
    out = parse_boxes("{<16><55><24><63>|<11>}")
    assert out.boxes == [Box(16, 55, 24, 63, 11, None, has_angle=True)]
    assert out.phrases == []
    assert out.parse_error is None


def test_refer_answer_several_bare_boxes() -> None:
    out = parse_boxes("{<16><55><24><63>|<11>}{<40><10><52><22>|<-30>}")
    assert [(b.x1, b.y1, b.x2, b.y2, b.angle_deg, b.phrase) for b in out.boxes] == [
        (16, 55, 24, 63, 11, None),
        (40, 10, 52, 22, -30, None),
    ]
    assert out.parse_error is None


def test_grounded_text() -> None:
    text = (
        "There are <p>2 planes</p> {<16><55><24><63>|<11>}{<30><40><38><48>|<11>} parked near "
        "<p>a hangar</p> {<60><60><90><95>|<0>} on the apron."
    )
    out = parse_boxes(text)
    assert out.phrases == ["2 planes", "a hangar"]
    assert [b.phrase for b in out.boxes] == ["2 planes", "2 planes", "a hangar"]
    assert out.boxes[2] == Box(60, 60, 90, 95, 0, "a hangar")
    assert out.parse_error is None


def test_box_after_text_has_no_phrase() -> None:
    out = parse_boxes("<p>a ship</p> {<1><2><3><4>|<5>} and also {<10><20><30><40>|<0>}")
    assert [b.phrase for b in out.boxes] == ["a ship", None]


def test_identify_input_without_angle() -> None:
    out = parse_boxes("[identify] what is this {<8><26><22><37>}")
    assert out.boxes == [Box(8, 26, 22, 37, 0.0, None, has_angle=False)]
    assert out.parse_error is None  # all boxes angle-less: a legal form, no note


def test_missing_angle_among_angled_boxes_is_kept_and_noted() -> None:
    out = parse_boxes("<p>planes</p> {<16><55><24><63>|<11>}{<30><40><38><48>}")
    assert [(b.angle_deg, b.has_angle) for b in out.boxes] == [(11, True), (0.0, False)]
    assert out.parse_error == "box 2: no angle while other boxes have one; read as 0"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("I cannot find any airplane in this image.", "no box found"),
        ("", "no box found"),
        ("{}", "box 1 {}: expected 4 or 5 numbers, found 0"),
        ("{<1><2><3>}", "box 1 {<1><2><3>}: expected 4 or 5 numbers, found 3"),
        ("{<1><2><3><4>|<5><6>}", "box 1 {<1><2><3><4>|<5><6>}: expected 4 or 5 numbers, found 6"),
        ("{<10><20><130><40>|<0>}", "box 1 {<10><20><130><40>|<0>}: coordinate outside [0, 100]"),
        ("{<-2><20><30><40>|<0>}", "box 1 {<-2><20><30><40>|<0>}: coordinate outside [0, 100]"),
        # a 0-1 scale (another model's habit) read on GeoChat's grid was a box under a pixel in the corner
        ("{<0.16><0.55><0.24><0.63>|<11>}",
         "box 1 {<0.16><0.55><0.24><0.63>|<11>}: fractions within [0, 1] (a 0-1 scale?), not GeoChat's 0-100 grid"),
        ("{<ab><cd>|<ef>}", "box 1 {<ab><cd>|<ef>}: expected 4 or 5 numbers, found 0"),
        ("<<<}}}{{{", "no box found; unterminated box at the end (reply cut off?)"),
    ],
)
def test_malformed_never_raises(text: str, error: str) -> None:
    out = parse_boxes(text)
    assert out.boxes == []
    assert out.parse_error == error


def test_corners_in_either_order_are_one_box_and_a_zero_edge_is_one_grid_step() -> None:
    """As GeoChat's box -> polygon helper reads them (centre, |x2 - x1|, |y2 - y1|): reversed corners are the
    same box; an object under 1 % of the tile written with equal edges is kept, one grid step wide, with a
    note (at the grid's far edge it steps inwards)."""
    reversed_corners = parse_boxes("{<24><55><16><63>|<0>}{<10><40><30><20>|<0>}")
    assert [(b.x1, b.y1, b.x2, b.y2) for b in reversed_corners.boxes] == [(16, 55, 24, 63), (10, 20, 30, 40)]
    assert reversed_corners.parse_error is None
    thin = parse_boxes("{<30><20><30><40>|<0>}{<100><100><100><100>|<0>}")
    assert [(b.x1, b.y1, b.x2, b.y2) for b in thin.boxes] == [(30, 20, 31, 40), (99, 99, 100, 100)]
    assert thin.parse_error == (
        "box 1 {<30><20><30><40>|<0>}: zero width or height, widened to one grid step; "
        "box 2 {<100><100><100><100>|<0>}: zero width or height, widened to one grid step"
    )


def test_good_boxes_survive_bad_ones() -> None:
    out = parse_boxes("{<10><20><30><40>|<5>}{<10><20><130><40>|<0>}{<50><50><60><60>|<-5>}{<50><50><60>")
    assert [(b.x1, b.angle_deg) for b in out.boxes] == [(10, 5), (50, -5)]
    assert out.parse_error == (
        "box 2 {<10><20><130><40>|<0>}: coordinate outside [0, 100]; "
        "unterminated box at the end (reply cut off?)"
    )


def test_edge_values_and_decimals() -> None:
    out = parse_boxes("{<0><0><100><100>|<90>}{<1.5><2><3.25><4>}")
    assert [(b.x1, b.y1, b.x2, b.y2) for b in out.boxes] == [(0, 0, 100, 100), (1.5, 2, 3.25, 4)]


def test_box_rejects_bad_values_directly() -> None:
    with pytest.raises(ValueError, match="0 <= x1 < x2 <= 100"):
        Box(10, 10, 5, 20)
    with pytest.raises(ValueError, match="finite"):
        Box(1, 1, 5, 5, float("nan"))
