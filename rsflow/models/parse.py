"""Model answers -> values: VQA answers, scene classes, and GeoChat's boxes.

Every function here is pure and never raises on what a model wrote: a reply that cannot be read gives
``None`` values plus a ``parse_error`` that says what was wrong, so a bad answer becomes a row with an
error, never a failed batch.

GeoChat's box grammar (``reference/models.md`` 3.4, 7 item 15)::

    {<x1><y1><x2><y2>|<theta>}        one box: integers on a 0-100 grid of the image width/height,
                                      x1,y1 = left,top and x2,y2 = right,bottom of the UNROTATED box,
                                      theta in degrees (rotation about the box centre)
    {<x1><y1><x2><y2>}                the angle-less form (input boxes of [identify]; read as theta = 0)
    {...}{...}                        several boxes, concatenated without separator
    <p>2 planes</p> {...}{...}        grounded text: a phrase, a space, then its boxes
    {...}{...}                        a [refer] answer: bare boxes, no <p> tags
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

from rsflow.presets import scene_normal_form

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------------------------------

_NUMBER_WORDS: dict[str, int] = {
    word: value
    for value, word in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        ]
    )
}
_EDGE_PUNCT = " \t\n.,;:!?\"'()[]{}`"
_NUMBER_RE = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$")
_THERE_IS_RE = re.compile(r"^there\s+(?:is|are)\s+(\S+)")


@dataclass(frozen=True)
class VqaAnswer:
    """A short VQA answer in normal form."""

    answer: str | None
    """``"yes"``/``"no"``; the number as text (``"3"``, ``"2.5"``) for a numeric answer; else the reply
    lower-cased with surrounding whitespace and punctuation removed. None when the reply is empty."""
    number: float | None
    """The numeric value when the answer is a number (digits, or a number word zero..twenty), else None."""
    parse_error: str | None
    """Why nothing could be read (empty reply), else None."""


def _as_number(word: str) -> float | None:
    if word in _NUMBER_WORDS:
        return float(_NUMBER_WORDS[word])
    if _NUMBER_RE.match(word):
        return float(word.replace(",", ""))
    return None


def _number_text(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def normalize_vqa(text: str) -> VqaAnswer:
    """Read a short VQA reply (asked with ``prompts.VQA_SUFFIX``).

    Rules, in order, on the reply stripped of whitespace and lower-cased:

    1. The first word (edge punctuation removed) is ``yes`` or ``no``: that is the answer
       (``"Yes."``, ``"yes, there is"`` -> ``"yes"``).
    2. The first word is a number (``3``, ``2.5``, ``1,200``, ``-1``) or a number word ``zero``..``twenty``,
       or the reply starts ``there is/are <number>``: ``number`` is its value and ``answer`` its digits
       (``"three"`` -> ``"3"``, 3.0).
    3. Otherwise the whole reply, edge punctuation removed (``"Rural."`` -> ``"rural"``).

    GeoChat's own RSVQA scoring (models.md 6.1) instead removes all spaces and dots and compares strings;
    ``answer`` keeps inner spaces so that rule can still be applied to it.

    Args:
        text: the decoded reply (a trailing ``</s>`` is dropped).

    Returns:
        The normal form; ``parse_error`` is set only for an empty reply.
    """
    stripped = text.strip()
    if stripped.endswith("</s>"):
        stripped = stripped[: -len("</s>")].strip()
    lowered = stripped.lower()
    words = lowered.split()
    if not words or not lowered.strip(_EDGE_PUNCT):
        return VqaAnswer(None, None, "empty answer")
    first = words[0].strip(_EDGE_PUNCT)
    if first in ("yes", "no"):
        return VqaAnswer(first, None, None)
    value = _as_number(first)
    if value is None:
        there = _THERE_IS_RE.match(lowered)
        if there:
            value = _as_number(there.group(1).strip(_EDGE_PUNCT))
    if value is not None:
        return VqaAnswer(_number_text(value), value, None)
    return VqaAnswer(lowered.strip(_EDGE_PUNCT), None, None)


# ---------------------------------------------------------------------------------------------------
# Scene classification
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassMatch:
    """The class a classification reply names."""

    label: str | None
    """The matched class, spelt as in the class list given; None when there is no single match."""
    parse_error: str | None
    """Why there is no label, else None; e.g. ``"matches none of 21 classes"`` or
    ``"ambiguous: matches A and B"``."""


def _class_pattern(name: str) -> re.Pattern[str]:
    # Words of the class name separated by any run of spaces/underscores/hyphens or nothing (so the folder
    # form "denseresidential" matches too), an optional plural "s"/"es", whole words only.
    words = [re.escape(w) for w in name.split()]
    body = r"[\s_-]*".join(words)
    return re.compile(rf"(?<![0-9A-Za-z]){body}(?:e?s)?(?![0-9A-Za-z])", re.IGNORECASE)


def _join_names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def match_class(text: str, classes: list[str] | tuple[str, ...]) -> ClassMatch:
    """Map a classification reply to one of ``classes``.

    1. GeoChat's scoring rule (batch_geochat_scene.py, models.md 6.1 and 7 item 18): the reply with all
       spaces removed, lower-cased, all dots removed, equals a class under the same normalisation
       (``"Dense Residential."`` -> ``"Dense Residential"``; ``"denseresidential"`` too).
    2. Fallback, for wordier replies: the reply contains exactly one class name as a whole phrase,
       case-insensitive, its words separated by spaces, ``_``, ``-`` or nothing, with an optional plural
       ``s``/``es`` (``"The image shows a dense residential area."``). A class found only inside a longer
       found class (``Residential`` in ``Dense Residential``) does not count.
    3. Else no label, with the reason.

    Args:
        text: the decoded reply.
        classes: the class names asked for (``presets.resolve_classes``).

    Returns:
        The label, or None with ``parse_error``: ``"empty answer"``, ``"no classes given"``,
        ``"matches none of N classes"`` or ``"ambiguous: matches A and B"``.
    """
    if not classes:
        return ClassMatch(None, "no classes given")
    stripped = text.strip()
    if not stripped:
        return ClassMatch(None, "empty answer")
    pred = scene_normal_form(stripped)
    for name in classes:
        if scene_normal_form(name) == pred:
            return ClassMatch(name, None)

    spans: list[tuple[int, int, str]] = []
    for name in classes:
        spans += [(m.start(), m.end(), name) for m in _class_pattern(name).finditer(stripped)]
    kept = [
        s
        for s in spans
        if not any(o[0] <= s[0] and s[1] <= o[1] and (o[1] - o[0]) > (s[1] - s[0]) for o in spans)
    ]
    found: list[str] = []
    for _, _, name in sorted(kept):
        if name not in found:
            found.append(name)
    if len(found) == 1:
        return ClassMatch(found[0], None)
    if not found:
        return ClassMatch(None, f"matches none of {len(classes)} classes")
    return ClassMatch(None, f"ambiguous: matches {_join_names(found)}")


# ---------------------------------------------------------------------------------------------------
# GeoChat boxes
# ---------------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\{([^{}]*)\}")
_PHRASE_RE = re.compile(r"<p>(.*?)</p>", re.DOTALL)
_BOX_NUMBER_RE = re.compile(r"[-+]?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Box:
    """One GeoChat box on the 0-100 grid (1/100 of the image width for x, of its height for y; y down)."""

    x1: float
    """Left edge of the unrotated box."""
    y1: float
    """Top edge of the unrotated box."""
    x2: float
    """Right edge of the unrotated box (> x1)."""
    y2: float
    """Bottom edge of the unrotated box (> y1)."""
    angle_deg: float = 0.0
    """Rotation about the box centre, degrees, as written (0 when the box has no angle). Sign and range are
    unconfirmed upstream (GeoChat issue #5); ``georef.rotated_rect_px`` applies geochat_demo's formula."""
    phrase: str | None = None
    """The ``<p>phrase</p>`` the box belongs to in grounded text, else None."""
    has_angle: bool = True
    """False when the box was written without ``|<theta>`` (``angle_deg`` is then 0)."""

    def __post_init__(self) -> None:
        if not (0 <= self.x1 < self.x2 <= 100 and 0 <= self.y1 < self.y2 <= 100):
            raise ValueError(
                f"box needs 0 <= x1 < x2 <= 100 and 0 <= y1 < y2 <= 100, got "
                f"({self.x1}, {self.y1}, {self.x2}, {self.y2})"
            )
        if not math.isfinite(self.angle_deg):
            raise ValueError(f"box angle must be finite, got {self.angle_deg}")


@dataclass(frozen=True)
class ParsedBoxes:
    """The boxes read from one reply."""

    boxes: list[Box] = field(default_factory=list)
    """The well-formed boxes, in the order written."""
    phrases: list[str] = field(default_factory=list)
    """Every ``<p>...</p>`` phrase, stripped, in the order written (also those without a box)."""
    parse_error: str | None = None
    """What was wrong or noteworthy (problems joined by ``"; "``), else None. Set when no box was found, for
    each dropped box (wrong count of numbers, a coordinate outside [0, 100]), for a box with an edge of zero
    length (kept, widened to one grid step), for a box without angle among boxes with angles (kept, angle
    0), and for an unterminated ``{`` at the end. Corners in reverse order are read as the same box, as
    GeoChat's box-to-polygon helper does."""


def _read_box(index: int, content: str, phrase: str | None) -> tuple[Box | None, str | None]:
    raw = "{" + content + "}"
    numbers = [float(n) for n in _BOX_NUMBER_RE.findall(content)]
    if len(numbers) not in (4, 5):
        return None, f"box {index} {raw}: expected 4 or 5 numbers, found {len(numbers)}"
    x1, y1, x2, y2 = numbers[:4]
    if not all(0 <= v <= 100 for v in (x1, y1, x2, y2)):
        return None, f"box {index} {raw}: coordinate outside [0, 100]"
    if all(v <= 1 for v in (x1, y1, x2, y2)) and any(v != int(v) for v in (x1, y1, x2, y2)):
        # GeoChat writes integers on its 0-100 grid; read on that grid, this would be a box under one grid
        # step in the tile's corner
        return None, f"box {index} {raw}: fractions within [0, 1] (a 0-1 scale?), not GeoChat's 0-100 grid"
    # GeoChat's own box -> polygon helper takes the centre and |x2 - x1|, |y2 - y1|: corners in either
    # order are the same box. An edge of zero length is an object under one grid step (1 % of the tile):
    # widened to one step, with a note, instead of losing the detection.
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    note = None
    if x1 == x2 or y1 == y2:
        if x1 == x2:
            x1, x2 = (x1, x1 + 1) if x1 < 100 else (99.0, 100.0)
        if y1 == y2:
            y1, y2 = (y1, y1 + 1) if y1 < 100 else (99.0, 100.0)
        note = f"box {index} {raw}: zero width or height, widened to one grid step"
    if len(numbers) == 5:
        return Box(x1, y1, x2, y2, numbers[4], phrase, has_angle=True), note
    return Box(x1, y1, x2, y2, 0.0, phrase, has_angle=False), note


def parse_boxes(text: str) -> ParsedBoxes:
    """Read every GeoChat box (and its grounding phrase) from a reply; never raises.

    A box belongs to a phrase when it follows ``<p>phrase</p>`` or another box of that phrase with only
    whitespace in between (``<p>2 planes</p> {..}{..}``); other boxes (``[refer]`` answers, boxes echoed
    after text) have ``phrase=None``. Numbers are read as in geochat_demo.py (any signed integer or decimal
    inside the braces; 4 numbers = no angle, 5 = the last is the angle), then checked.

    Decision on missing angles: ``{<x1><y1><x2><y2>}`` is a legal form (GeoChat's input boxes), so a reply
    whose boxes all lack angles is read with angle 0 and no note, as geochat_demo.py intends
    (``len == 4 -> angle 0``). A box without angle among boxes with angles is kept with angle 0, but noted
    in ``parse_error``: that mix suggests a cut or garbled answer. (The demo's own code drops the 4-number
    boxes in grounded text and ignores the angle of bare ``[refer]`` boxes because of an off-by-one
    ``integers[:-1]``; we do not copy that.)

    Args:
        text: the decoded reply.

    Returns:
        The good boxes, the phrases, and ``parse_error`` (see ``ParsedBoxes``).
    """
    events = [(m.start(), m.end(), "p", m.group(1)) for m in _PHRASE_RE.finditer(text)]
    events += [(m.start(), m.end(), "b", m.group(1)) for m in _BOX_RE.finditer(text)]
    events.sort()

    boxes: list[Box] = []
    phrases: list[str] = []
    box_numbers: list[int] = []  # 1-based position of each good box among all brace groups
    problems: list[str] = []
    current: str | None = None
    prev_end = 0
    index = 0
    for start, end, kind, content in events:
        if start < prev_end:  # a box written inside a phrase's tags: read the box, keep the phrase
            current = None
        if kind == "p":
            current = content.strip()
            phrases.append(current)
        else:
            index += 1
            if current is not None and text[prev_end:start].strip():
                current = None
            box, problem = _read_box(index, content, current)
            if box is not None:
                boxes.append(box)
                box_numbers.append(index)
            if problem is not None:
                problems.append(problem)
        prev_end = max(prev_end, end)

    if index == 0:
        problems.append("no box found")
    with_angle = [b for b in boxes if b.has_angle]
    if with_angle and len(with_angle) < len(boxes):
        missing = [str(n) for n, b in zip(box_numbers, boxes, strict=True) if not b.has_angle]
        problems.append(f"box {', '.join(missing)}: no angle while other boxes have one; read as 0")
    last_open, last_close = text.rfind("{"), text.rfind("}")
    if last_open > last_close:
        problems.append("unterminated box at the end (reply cut off?)")
    if problems:
        logger.debug("box parse problems: %s", "; ".join(problems))
    return ParsedBoxes(boxes, phrases, "; ".join(problems) if problems else None)
