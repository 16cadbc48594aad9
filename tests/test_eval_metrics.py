"""Benchmark metrics on hand-made cases with known results, and caption metrics against pycocoevalcap."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from rsflow.errors import RequestError
from rsflow.evaluate.benchmarks import get_benchmark
from rsflow.evaluate.caption_metrics import (
    EMPTY_CANDIDATE,
    check_caption_scorers,
    parse_metrics,
    rouge_1,
    score_captions,
    simple_tokenize,
)
from rsflow.evaluate.metrics import (
    BoxOutcome,
    accuracy_by_group,
    box_metrics,
    classification_metrics,
    demo_normal_form,
    geochat_normal_form,
    match_scene_class,
    objects_found,
    valid_polygon,
    vqa_metrics,
)
from rsflow.evaluate.report import markdown_table
from rsflow.evaluate.run import headline
from rsflow.evaluate.samples import Sample, polygon_json
from rsflow.evaluate.scoring import predicted_polygons, read_answer, seen_square
from rsflow.merge import rotated_iou
from rsflow.presets import AID_CLASSES, UCMERCED_CLASSES

JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not JAVA, reason="no `java` on PATH: pycocoevalcap's PTB tokenizer and METEOR run Java")

# ------------------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize(
    ("prediction", "reference", "correct"),
    [
        ("Yes", "yes", True),
        ("Yes.", "yes", True),
        (" no ", "no", True),
        ("Rural.", "rural", True),
        ("Urban area", "urban", False),  # exact match after normalisation, nothing fuzzy
        ("yes, there is", "yes", False),  # GeoChat's rule keeps the comma: "yes,thereis"
        ("7", "7", True),
        ("7.", "7", True),
        ("seven", "7", False),
        ("1250 m2", "1250m2", True),  # spaces removed on both sides
        ("", "no", False),
    ],
)
def test_rsvqa_answer_normalisation(prediction: str, reference: str, correct: bool) -> None:
    bench = get_benchmark("rsvqa-lr")
    sample = Sample("1", "/x.tif", "vqa", "q", (reference,), group="presence")
    assert read_answer(bench, sample, prediction).correct is correct


def test_scene_normalisation_is_geochats() -> None:
    # batch_geochat_scene.py: answer.replace(" ", "").lower().replace(".", "") == folder name, lower-cased
    assert geochat_normal_form("Dense Residential.") == "denseresidential"
    assert geochat_normal_form("Baseball Field") == "baseballfield"
    assert match_scene_class("Dense Residential.", UCMERCED_CLASSES) == "Dense Residential"
    assert match_scene_class("denseresidential", UCMERCED_CLASSES) == "Dense Residential"
    assert match_scene_class("baseball field", AID_CLASSES) == "Baseball Field"
    assert match_scene_class("The image shows a dense residential area.", UCMERCED_CLASSES) is None
    bench = get_benchmark("ucmerced")
    sample = Sample("denseresidential/denseresidential01.tif", "/x", "classify", "q", ("Dense Residential",))
    assert read_answer(bench, sample, "Dense Residential.").correct is True
    assert read_answer(bench, sample, "Medium Residential").correct is False
    assert read_answer(bench, sample, "residential").answer == "residential"


def test_demo_normal_form_matches_what_the_demo_recorded() -> None:
    assert demo_normal_form(" About 20%. ") == "About 20%"
    assert demo_normal_form("Yes.") == "Yes"
    assert demo_normal_form("yes") != demo_normal_form("Yes")  # case-sensitive, as evaluate_demo scored


# ------------------------------------------------------------------------------------------ accuracy


def test_vqa_accuracy_overall_average_and_reported_types() -> None:
    outcomes = (
        [("presence", True)] * 3 + [("presence", False)]  # 3/4
        + [("comp", True)] * 1 + [("comp", False)] * 1  # 1/2
        + [("rural_urban", True)] * 1  # 1/1
        + [("count", False)] * 4  # 0/4
    )
    m = vqa_metrics(outcomes, reported_types=("presence", "comp", "rural_urban"))
    assert (m["correct"], m["n"]) == (5, 11)
    assert m["accuracy"] == pytest.approx(5 / 11)
    assert m["average_accuracy"] == pytest.approx((0.75 + 0.5 + 1.0 + 0.0) / 4)
    assert m["per_type"]["comp"] == {"accuracy": 0.5, "correct": 1, "n": 2}
    assert m["accuracy_reported_types"] == pytest.approx(5 / 7)
    assert m["average_accuracy_reported_types"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    # the console leads with the paper's figure (GeoChat's LRBEN leaves count out), then all types
    assert headline(m) == "accuracy over presence/comp/rural_urban 71.43 (5/7); all types: accuracy 45.45 (5/11)"
    # none of the reported types scored (--question-types count, a small --limit): n/a, not 0.00 beside 90.70
    only_count = vqa_metrics([("count", True), ("count", False)], reported_types=("presence", "comp", "rural_urban"))
    assert only_count["accuracy_reported_types"] is None and only_count["average_accuracy_reported_types"] is None
    table = markdown_table("rsvqa-lr", "t", only_count, run_label="m")
    assert "| 0.00 | 90.70" not in table and "n/a | 90.70" in table, table
    assert headline(only_count) == ("accuracy 50.00 (1/2); over presence/comp/rural_urban: n/a "
                                    "(no presence, comp, rural_urban question scored)")
    overall, per = accuracy_by_group([("a", True), ("b", False), ("a", False)])
    assert (overall.correct, overall.n, per["a"].accuracy, per["b"].accuracy) == (1, 3, 0.5, 0.0)


@pytest.mark.parametrize("present", [("presence",), ("presence", "comp", "count")])
def test_reported_type_averages_are_na_unless_every_reported_type_was_scored(present: tuple[str, ...]) -> None:
    # --question-types presence, or a --limit draw without the rare rural_urban: 60 of 100 right is not
    # the papers' average over presence, comparison and rural/urban
    outcomes = [(t, i < 60) for t in present for i in range(100)]
    m = vqa_metrics(outcomes, reported_types=("presence", "comp", "rural_urban"))
    assert m["accuracy_reported_types"] is None and m["average_accuracy_reported_types"] is None
    assert m["missing_reported_types"] == [t for t in ("presence", "comp", "rural_urban") if t not in present]
    assert m["per_type"]["presence"]["accuracy"] == 0.6  # each type's own accuracy is still there
    assert "n/a (no " + ", ".join(m["missing_reported_types"]) + " question scored)" in headline(m)
    assert "60.00 (" not in headline(m).split(";")[1]
    table = markdown_table("rsvqa-lr", "t", m, run_label="m")
    assert "| avg. accuracy (presence, comparison, rural/urban; over all their questions) | n/a | 90.70 | 62.77 |" in table
    assert "| mean of the three type accuracies | n/a |" in table
    assert "| presence | 60.00 | 91.09 |" in table  # a type that was scored keeps its row
    assert f"no {', '.join(m['missing_reported_types'])} question was scored" in table, table


@pytest.mark.parametrize(("benchmark", "split", "shown"), [
    ("rsvqa-hr", "test_phili", True), ("rsvqa-hr", "test", False),  # HRBEN is test set 2, not test set 1
    ("rsvqa-lr", "test", True), ("rsvqa-lr", "val", False), ("rsvqa-lr", "train", False),
])
def test_published_numbers_are_shown_only_for_the_split_they_were_measured_on(
    benchmark: str, split: str, shown: bool
) -> None:
    m = vqa_metrics([("presence", True), ("comp", False), ("rural_urban", True)],
                    reported_types=("presence", "comp", "rural_urban"))
    table = markdown_table(benchmark, "t", m, run_label="m", split=split)
    assert ("GeoChat (paper)" in table) is shown and ("58.45" in table or "91.09" in table) is shown
    assert "| presence | 100.00 |" in table  # the run's own numbers either way
    measured = "test_phili" if benchmark == "rsvqa-hr" else "test"
    assert (f"measured on the `{measured}` split, and this run scored `{split}`: they are left out" in table) is not shown


def test_classification_accuracy_and_confusion_matrix() -> None:
    classes = ("Beach", "Forest", "River")
    refs = ["Beach", "Beach", "Forest", "River", "River"]
    preds = ["Beach", "Forest", "Forest", None, "River"]
    m = classification_metrics(refs, preds, classes)
    assert (m["accuracy"], m["correct"], m["n"], m["no_class"]) == (0.6, 3, 5, 1)
    assert m["confusion_matrix"]["predicted"] == ["Beach", "Forest", "River", "(no class)"]
    assert m["confusion_matrix"]["counts"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]
    assert m["per_class"]["Beach"] == {"accuracy": 0.5, "correct": 1, "n": 2}


# ------------------------------------------------------------------------------------------ rotated boxes

C = math.sqrt(0.5)


def _strip_45() -> list[list[float]]:
    """The 100 x 10 px strip centred at (50, 50) turned by +45 degrees, corners worked out by hand:
    offsets (-50,-5), (50,-5), (50,5), (-50,5) -> x = c(dx - dy) + 50, y = c(dx + dy) + 50, c = sqrt(1/2)."""
    return [[50 - 45 * C, 50 - 55 * C], [50 + 55 * C, 50 + 45 * C], [50 + 45 * C, 50 + 55 * C],
            [50 - 55 * C, 50 - 45 * C]]


def test_rotated_boxes_use_the_true_polygon_iou() -> None:
    truth = [valid_polygon(_strip_45())]
    # GeoChat's own box of that strip: the unrotated box 0..100 x 45..55 (0-100 grid of a 100 px image), +45
    rotated = [valid_polygon(p) for p in predicted_polygons("{<0><45><100><55>|<45>}", 100, 100)]
    assert objects_found(rotated, truth) == 1
    # the same numbers without the angle: a horizontal strip, which crosses the diagonal one
    assert objects_found([valid_polygon(p) for p in predicted_polygons("{<0><45><100><55>}", 100, 100)], truth) == 0
    # two strips crossing at 90 degrees (+45 and -45): their axis-aligned bounds are the same square
    # (IoU 1 if boxes were compared axis-aligned) but the true IoU is 100 / (1000 + 1000 - 100) = 1/19
    minus = [valid_polygon(p) for p in predicted_polygons("{<0><45><100><55>|<-45>}", 100, 100)]
    assert minus[0].bounds == pytest.approx(truth[0].bounds)
    from rsflow.merge import rotated_iou

    assert rotated_iou(minus[0], truth[0]) == pytest.approx(1 / 19)
    assert objects_found(minus, truth) == 0
    # a square and the same square turned 45 degrees about its centre: IoU = 1/sqrt(2) (the octagon
    # 2(sqrt2 - 1) a^2 over the union), found; their axis-aligned IoU would be exactly 0.5
    square = [valid_polygon([[40, 40], [60, 40], [60, 60], [40, 60]])]
    diamond = [valid_polygon(p) for p in predicted_polygons("{<40><40><60><60>|<45>}", 100, 100)]
    assert rotated_iou(diamond[0], square[0]) == pytest.approx(1 / math.sqrt(2))
    assert objects_found(diamond, square) == 1
    # IoU exactly 0.5 (a box and its left half) is not found: TEOChat's scorer counts IoU > 0.5 only
    half = [valid_polygon([[40, 40], [50, 40], [50, 60], [40, 60]])]
    assert rotated_iou(half[0], square[0]) == 0.5
    assert objects_found(half, square) == 0


def test_boxes_are_on_the_grid_of_the_square_the_model_saw_and_match_one_to_one() -> None:
    # a square image: the grid spans it, x * 2 and y * 2 on 200 x 200
    [poly] = predicted_polygons("{<10><20><30><60>|<0>}", 200, 200)
    assert poly == [(20.0, 40.0), (60.0, 40.0), (60.0, 120.0), (20.0, 120.0)]
    # 200 x 100 padded to a 200 px square (expand2square puts the image 50 px down): y = v * 2 - 50
    [poly] = predicted_polygons("{<10><35><30><55>|<0>}", 200, 100)
    assert [c for xy in poly for c in xy] == pytest.approx([20, 20, 60, 20, 60, 60, 20, 60])
    assert predicted_polygons("{<10><35><30><55>|<0>}", 200, 100, "pad") == [poly]
    # centre-cropped instead: the middle 100 px square, x = v + 50
    [poly] = predicted_polygons("{<10><20><30><60>|<0>}", 200, 100, "crop")
    assert [c for xy in poly for c in xy] == pytest.approx([60, 20, 80, 20, 80, 60, 60, 60])
    assert seen_square(600, 400) == (600, 0.0, -100.0) and seen_square(400, 600, "crop") == (400, 0.0, 100.0)
    # what a 600 x 400 image padded to its 600 px square shows at its top edge is at the image's top edge
    truth = valid_polygon([[300, 0], [360, 0], [360, 40], [300, 40]])
    [seen] = predicted_polygons("{<50><17><60><23>}", 600, 400)
    assert rotated_iou(valid_polygon(seen), truth) == pytest.approx(0.9)  # the grid rounds 40 px to 36
    a = valid_polygon([[0, 0], [10, 0], [10, 10], [0, 10]])
    b = valid_polygon([[50, 50], [60, 50], [60, 60], [50, 60]])
    near_a = valid_polygon([[1, 0], [11, 0], [11, 10], [1, 10]])  # IoU 9/11 with a
    # two predictions on one object find it once; the other object is not found
    assert objects_found([a, near_a], [a, b]) == 1
    assert objects_found([near_a, b, a], [a, b]) == 2
    # corners in a crossing order are repaired (convex hull), not scored as a bow tie
    bow_tie = valid_polygon([[0, 0], [10, 10], [10, 0], [0, 10]])
    assert bow_tie.area == pytest.approx(100.0)


def test_box_metrics_by_size_type_and_count() -> None:
    outcomes = [
        BoxOutcome("ref", "small", 1, 0, 1),
        BoxOutcome("ref", "small", 1, 1, 1),
        BoxOutcome("grounding", "large", 2, 1, 3),
        BoxOutcome("grounding", "medium", 1, 1, 0 + 1),
        BoxOutcome("ref", "medium", 1, 0, 0),
    ]
    m = box_metrics(outcomes)
    assert (m["found"], m["objects"], m["questions"], m["no_box"]) == (3, 6, 5, 1)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["by_size"]["small"]["accuracy"] == pytest.approx(0.5)
    assert m["by_size"]["large"] == {"accuracy": 0.5, "found": 1, "objects": 2, "questions": 1}
    assert m["by_type"]["ref"]["accuracy"] == pytest.approx(1 / 3)
    assert m["by_count"]["multiple"]["objects"] == 2 and m["by_count"]["single"]["accuracy"] == pytest.approx(0.5)


def test_read_answer_for_a_referring_sample() -> None:
    bench = get_benchmark("geochat-referring")
    truth = [[20, 20], [60, 20], [60, 60], [20, 60]], [[100, 10], [180, 10], [180, 50], [100, 50]]
    sample = Sample("q1", "/x.png", "refer", "p", tuple(polygon_json(t) for t in truth), group="ref",
                    size_group="small")
    ans = read_answer(bench, sample, "{<10><35><30><55>|<0>}{<50><30><90><50>|<0>}", 200, 100)
    assert ans.correct is True and ans.score == 1.0
    assert json.loads(ans.answer or "")[0] == [[20.0, 20.0], [60.0, 20.0], [60.0, 60.0], [20.0, 60.0]]  # rounded
    half = read_answer(bench, sample, "{<10><35><30><55>}", 200, 100)
    assert (half.correct, half.score) == (False, 0.5)
    assert read_answer(bench, sample, "no box here", 200, 100).score == 0.0


# ------------------------------------------------------------------------------------------ captions

CORPUS = {
    "1": ("A plane is parked at the airport.", [
        "Many planes are parked next to a long building in an airport .",
        "A plane at an airport.", "Several aircraft near a terminal building.",
        "An airport with a plane parked.", "A white plane is parked at the airport."]),
    "2": ("Many green trees.", [
        "There are many green trees .", "Trees, lots of them!", "A dense forest of green trees.",
        "Green trees cover the area.", "Many trees are green."]),
    "3": ("A river goes through the farmland", [
        "A river flows through green farmland .", "A curved river between fields.",
        "The river goes through the farmland.", "Farmland beside a river.", "A river with fields."]),
    "4": ("", ["A beach with white sand.", "Waves on a beach.", "A sandy beach.", "The sea meets the beach.",
               "White sand and blue sea."]),
}


def _direct_pycocoevalcap(tokenizer: str) -> dict[str, float]:
    """The toolkit's scorers called as its README says, on the same corpus."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {k: [{"caption": r} for r in refs] for k, (_, refs) in CORPUS.items()}
    res = {k: [{"caption": cand}] for k, (cand, _) in CORPUS.items() if cand}
    if tokenizer == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        gts_t, res_t = PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res)
    else:
        gts_t = {k: [simple_tokenize(c["caption"]) for c in v] for k, v in gts.items()}
        res_t = {k: [simple_tokenize(c["caption"]) for c in v] for k, v in res.items()}
    res_t = {k: res_t.get(k, [EMPTY_CANDIDATE]) for k in CORPUS}  # the empty caption: one placeholder token
    bleu, _ = Bleu(4).compute_score(gts_t, res_t, verbose=0)
    out = {f"Bleu_{i + 1}": b for i, b in enumerate(bleu)}
    out["ROUGE_L"] = Rouge().compute_score(gts_t, res_t)[0]
    out["CIDEr"] = Cider().compute_score(gts_t, res_t)[0]
    if tokenizer == "ptb":
        from pycocoevalcap.meteor.meteor import Meteor

        out["METEOR"] = Meteor().compute_score(gts_t, res_t)[0]
    return out


def _ours(tokenizer: str, metrics: tuple[str, ...]) -> dict[str, float]:
    return score_captions({k: c for k, (c, _) in CORPUS.items()}, {k: r for k, (_, r) in CORPUS.items()},
                          metrics=metrics, tokenizer=tokenizer)


@needs_java
def test_caption_metrics_equal_pycocoevalcap_with_its_ptb_tokenizer_and_meteor() -> None:
    ours = _ours("ptb", ("bleu", "meteor", "rouge-l", "cider"))
    direct = _direct_pycocoevalcap("ptb")
    assert ours["tokenizer"] == "ptb" and ours["n"] == 4
    for key, value in direct.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    assert 0.0 < ours["METEOR"] < 1.0 and ours["CIDEr"] > 0.0


def test_caption_metrics_without_java_equal_the_scorers_on_simple_tokens() -> None:
    # BLEU, ROUGE-L and CIDEr are pure Python: asserted here whether or not Java exists
    ours = _ours("simple", ("bleu", "rouge-l", "cider", "rouge-1"))
    direct = _direct_pycocoevalcap("simple")
    for key, value in direct.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    assert "METEOR" not in ours and ours["tokenizer"] == "simple"
    # hand case: one candidate, one reference, 3 of 4 unigrams shared, same length -> BLEU-1 = 0.75
    hand = score_captions({"a": "a b c d"}, {"a": ["a b c e"]}, metrics=("bleu", "rouge-1"), tokenizer="simple")
    assert hand["Bleu_1"] == pytest.approx(0.75)
    assert hand["ROUGE_1"] == pytest.approx(0.75)
    assert rouge_1("a a b", ["a b c"]) == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))


@pytest.mark.parametrize("tokenizer", ["simple", pytest.param("ptb", marks=needs_java)])
def test_a_failed_caption_is_one_placeholder_token_that_matches_no_reference(tokenizer: str) -> None:
    # "empty" is an ordinary caption word: a sample without an answer earns nothing for it
    refs = {"1": ["The parking lot is empty ."] * 5, "2": ["An empty square between buildings."] * 5}
    failed = score_captions({"1": "", "2": None}, refs, metrics=("bleu", "rouge-l", "rouge-1", "cider"),
                            tokenizer=tokenizer)
    assert failed["Bleu_1"] == pytest.approx(0.0, abs=1e-9)
    assert (failed["ROUGE_L"], failed["ROUGE_1"], failed["CIDEr"]) == (0.0, 0.0, 0.0)
    # and it is one word of the hypothesis length (BLEU's brevity penalty): 3 of 4 + 1 words right,
    # reference length 4 + 2
    hand = score_captions({"a": "a b c d", "b": ""}, {"a": ["a b c e"], "b": ["empty lot"]}, metrics=("bleu",),
                          tokenizer=tokenizer)
    assert hand["Bleu_1"] == pytest.approx(3 / 5 * math.exp(1 - 6 / 5))


def test_simple_tokenizer_mimics_ptb_on_plain_sentences() -> None:
    assert simple_tokenize("Many planes are parked next to a long building in an airport .") == (
        "many planes are parked next to a long building in an airport")
    assert simple_tokenize("Trees, lots of them!") == "trees lots of them"


def test_missing_java_or_bad_metric_fails_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RequestError, match=r"^--metrics: METEOR and the PTB tokenizer run Java .*no `java` is on PATH: "
                       r"install a Java runtime \(Debian/Ubuntu: apt-get install default-jre-headless"):
        check_caption_scorers(("bleu", "meteor"), "ptb")
    with pytest.raises(RequestError, match=r"^--metrics: METEOR run Java"):
        check_caption_scorers(("meteor",), "simple")
    check_caption_scorers(("bleu", "rouge-l", "cider"), "simple")  # nothing needs Java: fine
    with pytest.raises(RequestError, match=r"^--metrics: unknown spice"):
        parse_metrics("bleu,spice", ("bleu",))
    assert parse_metrics(None, ("rouge-1", "meteor")) == ("rouge-1", "meteor")
