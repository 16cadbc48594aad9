"""Benchmark loaders on tiny files in each distributed format: they give the same Sample records."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rsflow.errors import RequestError
from rsflow.evaluate.benchmarks import BENCHMARKS, LoadRequest, get_benchmark
from rsflow.evaluate.captions import load_captions
from rsflow.evaluate.demo import load_demo
from rsflow.evaluate.geochat_bench import load_referring, load_region_captions
from rsflow.evaluate.rsvqa import load_rsvqa
from rsflow.evaluate.samples import Sample
from rsflow.evaluate.scenes import load_scene_folders
from rsflow.models.prompts import classify_prompt, vqa_prompt
from rsflow.presets import AID_CLASSES, RESISC45_CLASSES, UCMERCED_CLASSES
from tests import eval_fixtures as fx


@pytest.mark.parametrize("hr", [False, True])
@pytest.mark.parametrize("text_in_split", [True, False])
def test_rsvqa_reads_active_records_and_joins_answers_by_id(tmp_path: Path, hr: bool, text_in_split: bool) -> None:
    info = fx.write_rsvqa(tmp_path, hr=hr, text_in_split=text_in_split)
    samples = load_rsvqa(tmp_path, prefix="USGS" if hr else "LR")
    assert len(samples) == 20  # the six inactive placeholders are dropped
    for s in samples:
        img_id, qtype, text, answer = info["questions"][int(s.sample_id)]
        assert s == Sample(
            sample_id=s.sample_id,
            image_path=str((tmp_path / info["image_dir"] / f"{img_id}.tif").resolve()),
            task="vqa",
            prompt=vqa_prompt(text),
            references=(answer,),
            group=qtype,
        )
    assert {s.group for s in samples} == set(fx._HR_TYPES if hr else fx._LR_TYPES)


def test_rsvqa_question_types_and_wrong_layout(tmp_path: Path) -> None:
    fx.write_rsvqa(tmp_path)
    kept = load_rsvqa(tmp_path, prefix="LR", question_types=["presence", "comp"])
    assert kept and {s.group for s in kept} == {"presence", "comp"}
    with pytest.raises(RequestError, match=r"--question-types: area not in this split"):
        load_rsvqa(tmp_path, prefix="LR", question_types=["area"])
    with pytest.raises(RequestError, match=r"--data: .*USGS_split_test_phili_questions.json is missing"):
        load_rsvqa(tmp_path, prefix="USGS")
    with pytest.raises(RequestError, match=r"--split: .*got 'test_phili'"):
        load_rsvqa(tmp_path, prefix="LR", split="test_phili")
    moved = tmp_path / "elsewhere"
    (tmp_path / "Images_LR").rename(moved)
    with pytest.raises(RequestError, match=r"--data: .* has no Images_LR/ image folder .*; or give --images"):
        load_rsvqa(tmp_path, prefix="LR")
    assert Path(load_rsvqa(tmp_path, prefix="LR", images=moved)[0].image_path).parent == moved.resolve()
    moved.rename(tmp_path / "Images_LR")
    (tmp_path / "LR_split_test_answers.json").write_text(json.dumps([{"id": 1}]))
    with pytest.raises(RequestError, match=r"--data: .*expected a JSON object \{'answers'"):
        load_rsvqa(tmp_path, prefix="LR")


def _edit(path: Path, key: str, index: int, **fields: object) -> None:
    doc = json.loads(path.read_text())
    doc[key][index].update(fields)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(("file", "key", "fields", "match"), [
    ("questions", "questions", {"img_id": None},
     r"^--data: the img_id of question 7 of LR_split_test_questions.json is None, not a whole number$"),
    ("answers", "answers", {"id": None}, r"^--data: LR_split_test_answers.json: the id of answers\[7\] is None"),
    ("questions", "questions", {"answers_ids": 7},
     r"^--data: question 7 of LR_split_test_questions.json has answers_ids 7: expected a list of answer ids$"),
    ("questions", "questions", {"answers_ids": [None]},
     r"^--data: answers_ids\[0\] of question 7 of LR_split_test_questions.json is None"),
    ("questions", "questions", {"question": " "},  # not vqa_prompt's --question: rsflow eval has no such flag
     r"^--data: question 7 of LR_split_test_questions.json has question ' ': expected non-empty text$"),
    ("questions", "questions", {"type": None}, r"^--data: question 7 of .* has type None"),
    ("answers", "answers", {"answer": None}, r"^--data: the answer of question 7 of .* is None"),
    ("questions", "questions", {"id": None}, r"^--data: LR_split_test_questions.json: the id of questions\[7\] is None"),
    ("questions", "questions", {"id": 8}, r"^--data: LR_split_test_questions.json: question id 8 occurs twice"),
    ("images", "images", {"id": "two"}, r"^--data: LR_split_test_images.json: the id of images\[2\] is 'two'"),
])
def test_rsvqa_fields_of_the_wrong_kind_are_one_data_error(
    tmp_path: Path, file: str, key: str, fields: dict[str, object], match: str
) -> None:
    fx.write_rsvqa(tmp_path)
    _edit(tmp_path / f"LR_split_test_{file}.json", key, 7 if key != "images" else 2, **fields)
    with pytest.raises(RequestError, match=match):
        load_rsvqa(tmp_path, prefix="LR")


@pytest.mark.parametrize("hr", [False, True])
def test_rsvqa_answers_from_the_whole_dataset_table_by_question_id(tmp_path: Path, hr: bool) -> None:
    # split records without answers_ids and answers without text: the table's answer whose question_id is
    # the question's (reference/benchmarks.md 1.4, 8: "fallback question_id")
    info = fx.write_rsvqa(tmp_path, hr=hr, text_in_split=False)
    name = "USGS_split_test_phili" if hr else "LR_split_test"
    questions = json.loads((tmp_path / f"{name}_questions.json").read_text())
    table = tmp_path / ("USGSquestions.json" if hr else "all_questions.json")
    for doc, path in ((questions, tmp_path / f"{name}_questions.json"), (json.loads(table.read_text()), table)):
        for q in doc["questions"]:
            q.pop("answers_ids", None)
        path.write_text(json.dumps(doc))
    answers = json.loads((tmp_path / f"{name}_answers.json").read_text())
    answers["answers"] = [{"id": a["id"], "active": a["active"]} for a in answers["answers"]]
    (tmp_path / f"{name}_answers.json").write_text(json.dumps(answers))
    samples = load_rsvqa(tmp_path, prefix="USGS" if hr else "LR")
    assert {s.sample_id: s.references for s in samples} == {str(q): (v[3],) for q, v in info["questions"].items()}


@pytest.mark.parametrize("hr", [False, True])
def test_geochat_bench_vqa_lines_are_asked_as_written_and_answered_from_rsvqa(tmp_path: Path, hr: bool) -> None:
    name = "geochat-hrben" if hr else "geochat-lrben"
    info = fx.write_geochat_vqa(tmp_path, hr=hr)
    samples = get_benchmark(name).load(LoadRequest(tmp_path, "geochat"))
    assert [s.sample_id for s in samples] == [str(line["question_id"]) for line in info["lines"]]  # file order
    for s, line in zip(samples, info["lines"], strict=True):
        img_id, qtype, text, answer = info["questions"][line["question_id"]]
        assert s == Sample(sample_id=str(line["question_id"]),
                           image_path=str((tmp_path / info["image_dir"] / f"{img_id}.tif").resolve()),
                           task="vqa", prompt=vqa_prompt(text), references=(answer,), group=qtype)
    # the file elsewhere (--questions), and a type filter over RSVQA's types
    other = fx.write_geochat_vqa(tmp_path / "other", hr=hr, file_in=tmp_path / "bench")
    kept = get_benchmark(name).load(LoadRequest(tmp_path / "other", "geochat", questions=other["path"],
                                                question_types=("presence",)))
    assert kept and {s.group for s in kept} == {"presence"}


def test_geochat_bench_vqa_refusals(tmp_path: Path) -> None:
    info = fx.write_geochat_vqa(tmp_path)
    bench = get_benchmark("geochat-lrben")
    with pytest.raises(RequestError, match=r"--questions: .* holds no hrben.jsonl: give GeoChat-Bench's hrben.jsonl"):
        get_benchmark("geochat-hrben").load(LoadRequest(tmp_path, "geochat"))
    with pytest.raises(RequestError, match=r"--questions: no such file"):
        bench.load(LoadRequest(tmp_path, "geochat", questions=tmp_path / "nope.jsonl"))
    with pytest.raises(RequestError, match=r"--split: .*one split"):
        bench.load(LoadRequest(tmp_path, "geochat", split="test"))
    lines = info["lines"]
    for bad, match in [
        ({**lines[0], "question_id": 999}, r"--data: lrben.jsonl line 1: question 999 is not an active question"),
        ({**lines[0], "image": "3.tif" if lines[0]["image"] != "3.tif" else "2.tif"}, r"--data: .* not the same dataset"),
        ({"question_id": 7, "image": "2.tif"}, r"--questions: lrben.jsonl line 1 lacks text"),
    ]:
        info["path"].write_text(json.dumps(bad) + "\n")
        with pytest.raises(RequestError, match=match):
            bench.load(LoadRequest(tmp_path, "geochat"))
    info["path"].write_text("{not json\n")
    with pytest.raises(RequestError, match=r"--questions: lrben.jsonl line 1 is not JSON"):
        bench.load(LoadRequest(tmp_path, "geochat"))


@pytest.mark.parametrize("flavour", ["ucm", "sydney", "rsicd"])
def test_karpathy_captions_one_sample_per_test_image_with_every_raw_sentence(tmp_path: Path, flavour: str) -> None:
    info = fx.write_karpathy(tmp_path, flavour=flavour)
    samples = load_captions(tmp_path, flavour=flavour, prompt_format="llava")
    assert [s.sample_id for s in samples] == list(info["references"])  # file order, test split only
    for s in samples:
        assert s.task == "caption" and s.prompt == "Describe the image in detail."
        assert list(s.references) == info["references"][s.sample_id] and len(s.references) == 5
        assert Path(s.image_path).is_file() and Path(s.image_path).name == s.sample_id
    rsllava = load_captions(tmp_path, flavour=flavour, prompt_format="rsllava")
    assert rsllava[0].prompt == "Provide a description of the image."
    assert len(load_captions(tmp_path, flavour=flavour, prompt_format="llava", split="train")) == 3


def test_caption_loader_refuses_other_layouts(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match=r"--data: .* none of dataset.json found"):
        load_captions(tmp_path, flavour="ucm", prompt_format="llava")
    (tmp_path / "dataset.json").write_text(json.dumps([{"filename": "1.tif"}]))
    with pytest.raises(RequestError, match=r"not a Karpathy-style caption file"):
        load_captions(tmp_path, flavour="ucm", prompt_format="llava")
    fx.write_karpathy(tmp_path)
    _edit(tmp_path / "dataset.json", "images", 3, filename=None)  # not sample 'None' with a missing image
    with pytest.raises(RequestError, match=r"^--data: .*dataset.json: images\[3\] \(split 'test'\) has filename None: "
                                           r"expected the image's file name$"):
        load_captions(tmp_path, flavour="ucm", prompt_format="llava")


def test_caption_images_without_five_references_are_scored_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    info = fx.write_karpathy(tmp_path)
    with caplog.at_level(logging.WARNING):
        load_captions(tmp_path, flavour="ucm", prompt_format="llava")
    assert not caplog.records  # five each: nothing to say
    doc = json.loads((tmp_path / "dataset.json").read_text())
    for sentence in doc["images"][0]["sentences"][:2]:
        del sentence["raw"]  # dropped, not silently
    doc["images"][1]["sentences"][0]["raw"] = None  # not the reference "None"
    doc["images"][2]["sentences"].append({"raw": "A sixth one.", "tokens": ["a", "sixth", "one"]})
    doc["images"][-1]["sentences"].pop()  # a train image: not this split's business
    (tmp_path / "dataset.json").write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        samples = load_captions(tmp_path, flavour="ucm", prompt_format="llava")
    assert [len(s.references) for s in samples[:4]] == [3, 4, 6, 5] and len(samples) == 20
    assert samples[1].references == tuple(info["references"]["2.tif"][1:])
    [warning] = caplog.records
    assert "3 of 20 images of split 'test' do not have exactly 5 reference sentences" in warning.getMessage()


def test_scene_folders_ucmerced_and_aid(tmp_path: Path) -> None:
    ucm = fx.write_ucmerced(tmp_path / "ucm")
    for data in (tmp_path / "ucm", tmp_path / "ucm" / "UCMerced_LandUse", tmp_path / "ucm" / "UCMerced_LandUse" / "Images"):
        samples = load_scene_folders(data, classes=UCMERCED_CLASSES, dataset="UCMerced_LandUse")
        assert {s.sample_id: s.references[0] for s in samples} == ucm
    assert samples[0].prompt == classify_prompt(list(UCMERCED_CLASSES))  # every class, even those absent
    aid = fx.write_aid(tmp_path / "aid")
    samples = load_scene_folders(tmp_path / "aid", classes=AID_CLASSES, dataset="AID")
    assert {s.sample_id: s.references[0] for s in samples} == aid
    assert "Baseball Field" in samples[0].prompt
    (tmp_path / "aid" / "AID" / "Volcano").mkdir()
    with pytest.raises(RequestError, match=r"--data: .*Volcano is not a class folder of AID"):
        load_scene_folders(tmp_path / "aid", classes=AID_CLASSES, dataset="AID")
    with pytest.raises(RequestError, match=r"--data: .*agricultural is not a class folder of AID"):
        load_scene_folders(tmp_path / "ucm", classes=AID_CLASSES, dataset="AID")  # beach/ is in both
    with pytest.raises(RequestError, match=r"--data: .* holds no class folder of this dataset"):
        load_scene_folders(tmp_path / "aid" / "AID" / "Volcano", classes=AID_CLASSES, dataset="AID")


def test_scene_folders_resisc45_snake_case_folders(tmp_path: Path) -> None:
    expected = fx.write_resisc45(tmp_path)
    for data in (tmp_path, tmp_path / "NWPU-RESISC45"):
        samples = get_benchmark("resisc45").load(LoadRequest(data, "geochat"))
        assert {s.sample_id: s.references[0] for s in samples} == expected
    assert samples[0].prompt == classify_prompt(list(RESISC45_CLASSES))  # all 45, though four are here
    assert "Ground Track Field, Harbor" in samples[0].prompt
    (tmp_path / "NWPU-RESISC45" / "volcano").mkdir()
    with pytest.raises(RequestError, match=r"--data: .*volcano is not a class folder of NWPU-RESISC45"):
        get_benchmark("resisc45").load(LoadRequest(tmp_path, "geochat"))


def test_geochat_referring_and_region_captioning(tmp_path: Path) -> None:
    lines = fx.write_referring(tmp_path)
    samples = load_referring(tmp_path)
    assert len(samples) == 20
    for s, line in zip(samples, lines, strict=True):
        assert s.sample_id == line["question_id"] and s.task == "refer"
        assert s.image_path == str((tmp_path / "final_images_llava" / f"{line['image_id']}.png").resolve())
        assert [json.loads(r) for r in s.references] == line["ground_truth"]
        assert (s.group, s.size_group) == (line["type"], line["size_group"])
        if line["type"] == "ref":
            assert s.prompt == f"[refer] Give me the location of <p> {line['question']} </p>"
        else:
            assert s.prompt == f"[grounding]{line['question']}"
    rc_lines = fx.write_region_captioning(tmp_path)
    rc = load_region_captions(tmp_path)
    assert [s.prompt for s in rc] == [f"[identify] What is the object present at {x['question']}" for x in rc_lines]
    assert [s.references for s in rc] == [(x["ground_truth"],) for x in rc_lines]
    assert [s.sample_id for s in rc] == [x["question_id"] for x in rc_lines]
    assert Path(rc[0].image_path).parent.name == "images"
    # question_ids that repeat (the file's per-line keys are unconfirmed) do not refuse the benchmark
    for x in rc_lines:
        x["question_id"] = "0"
    (tmp_path / "region_captioning.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rc_lines))
    renamed = load_region_captions(tmp_path)
    assert [s.sample_id for s in renamed] == [f"{x['image_id']}:{k}" for k, x in enumerate(rc_lines, start=1)]


def test_geochat_referring_refuses_bad_ground_truth(tmp_path: Path) -> None:
    lines = fx.write_referring(tmp_path, n=2)
    lines[1]["ground_truth"] = [[1, 2, 3, 4]]
    (tmp_path / "referring.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(RequestError, match=r"--data: referring.jsonl line 2: ground_truth expected 4"):
        load_referring(tmp_path)
    lines[1]["ground_truth"] = [[[None, 10], [40, 10], [40, 40], [10, 40]]]  # not a TypeError traceback
    (tmp_path / "referring.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(RequestError, match=r"^--data: referring.jsonl line 2: ground_truth corner \[None, 10\] is "
                                           r"not two numbers$"):
        load_referring(tmp_path)
    lines[1] = {**lines[0], "image_id": None}
    (tmp_path / "referring.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(RequestError, match=r"^--data: referring.jsonl line 2 has null image_id$"):
        load_referring(tmp_path)
    with pytest.raises(RequestError, match=r"--data: .*region_captioning.jsonl is missing"):
        load_region_captions(tmp_path)


def test_demo_set_records(tmp_path: Path) -> None:
    (tmp_path / "card.json").write_text("{}")
    records = [
        {"id": "r00c04-has_water", "image": "r00c04.png", "conversations": [
            {"from": "human", "value": "<image>\nIs there water in this image?\nAnswer the question using a single word or phrase."},
            {"from": "gpt", "value": "No"}]},
        {"id": "r00c04-caption", "image": "r00c04.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in detail."}, {"from": "gpt", "value": "Water."}]},
    ]
    (tmp_path / "instruct_test.json").write_text(json.dumps(records))
    [s] = load_demo(tmp_path)
    assert s == Sample("r00c04-has_water", str((tmp_path / "images" / "r00c04.png").resolve()), "vqa",
                       vqa_prompt("Is there water in this image?"), ("No",), group="has_water")
    with pytest.raises(RequestError, match=r"--data: .* is not a demo set"):
        load_demo(tmp_path, split="train")


def test_registry_names_and_errors(tmp_path: Path) -> None:
    assert set(BENCHMARKS) == {
        "rsvqa-lr", "rsvqa-hr", "ucm-captions", "sydney-captions", "rsicd", "ucmerced", "aid", "resisc45",
        "geochat-ucmerced", "geochat-aid", "geochat-lrben", "geochat-hrben", "geochat-referring", "geochat-region-captioning", "rsflow-demo",
    }
    with pytest.raises(RequestError, match=r"^--benchmark: unknown benchmark 'rsvqa'; choose from rsvqa-lr"):
        get_benchmark("rsvqa")
    fx.write_ucmerced(tmp_path)
    with pytest.raises(RequestError, match=r"--question-types: only the RSVQA"):
        get_benchmark("ucmerced").load(LoadRequest(tmp_path, "llava", question_types=("presence",)))


@pytest.mark.parametrize("dataset", ["ucmerced", "aid"])
def test_geochat_bench_scene_files_are_read_as_its_scorer_reads_them(dataset: str, tmp_path: Path) -> None:
    """GeoChat-Bench's own image list and prompts: the line's text is the prompt, the class is the folder
    its question_id starts with (not aid.jsonl's 'MediumResidentialgt' ground truth), and aid.jsonl's
    '.png' names are read as AID's '.jpg' files."""
    written = fx.write_geochat_scenes(tmp_path, dataset=dataset)
    name = f"geochat-{dataset}"
    samples = get_benchmark(name).load(LoadRequest(data=tmp_path, split=None, images=None, prompt_format="llava"))
    assert {s.sample_id: s.references[0] for s in samples} == written["references"]
    assert {s.sample_id: s.prompt for s in samples} == written["prompts"]
    assert all(Path(s.image_path).is_file() and s.task == "classify" for s in samples)
    assert len(samples) < len(list(tmp_path.rglob("*.jpg" if dataset == "aid" else "*.tif")))  # its list, not all

    jsonl = tmp_path / ("UCmerced.jsonl" if dataset == "ucmerced" else "aid.jsonl")
    lines = jsonl.read_text().splitlines()
    row = json.loads(lines[1])
    row["question_id"] = "Volcano/volcano_1.jpg"
    jsonl.write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")
    with pytest.raises(RequestError, match=r"line 2: 'Volcano' .* is not a class"):
        get_benchmark(name).load(LoadRequest(data=tmp_path, split=None, images=None, prompt_format="llava"))
