"""How tiles are read and handed on: only the blocks under a tile, overviews for coarse grids, chips as
raw uint8 tensors from the read stage to the model stage (issue 10).

The scenes are synthetic COGs (:mod:`rsflow.synthetic`: 512 px internal tiles, overviews), so the block
layout is known. Bytes are counted with a rasterio ``opener`` that hands GDAL Python file objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Resampling

from rsflow.read import read_batch, read_blocks, read_chip
from rsflow.synthetic import ASSETS, BLOCK_PX, CRS, RES_M, scene_transform, write_synthetic_scene
from tests.read_fixtures import CountingOpener

SCENE_PX = 2048


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("synthetic")
    write_synthetic_scene(folder, SCENE_PX, item_id="scene")
    return [folder / f"scene-{key}.tif" for key in ASSETS]


def _tile(hrefs: list[Path], col_off: int, row_off: int, size: int, res: float = RES_M) -> dict[str, Any]:
    t = scene_transform()
    return {
        "tile_id": f"r{row_off}c{col_off}",
        "crs": CRS,
        "transform": list(Affine(res, 0.0, t.c + col_off * RES_M, 0.0, -res, t.f - row_off * RES_M))[:6],
        "width": size,
        "height": size,
        "res": res,
        "hrefs": [str(h) for h in hrefs],
        "bands": [1, 1, 1],
        "scale": [1e-4] * 3,
        "offset": [0.0] * 3,
        "nodata": 0.0,
        "stretch_lo": 0.03,
        "stretch_hi": 0.20,
        "signing": "",
    }


def _block_bytes(path: Path, block_col: int, block_row: int) -> int:
    with rasterio.open(path) as src:
        return int(src.tags(1, "TIFF").get(f"BLOCK_SIZE_{block_col}_{block_row}")
                   or src.get_tag_item(f"BLOCK_SIZE_{block_col}_{block_row}", "TIFF", bidx=1))


def test_a_block_aligned_tile_reads_its_block_and_little_else(scene: list[Path]) -> None:
    aligned, straddling = CountingOpener(), CountingOpener()
    chip, _ = read_chip(_tile(scene, BLOCK_PX, BLOCK_PX, BLOCK_PX), opener=aligned)
    read_chip(_tile(scene, BLOCK_PX + BLOCK_PX // 2, BLOCK_PX + BLOCK_PX // 2, BLOCK_PX), opener=straddling)
    one_block = sum(_block_bytes(p, 1, 1) for p in scene)
    total = sum(p.stat().st_size for p in scene)
    print(f"aligned {aligned.bytes_read} B, straddling 4 blocks {straddling.bytes_read} B, "
          f"the tile's blocks {one_block} B, scene {total} B")
    # The tile's own compressed block plus the COG header (the IFDs, read once per open).
    assert one_block <= aligned.bytes_read < one_block + 3 * 64 * 1024
    assert straddling.bytes_read > aligned.bytes_read + 2 * one_block  # four blocks instead of one
    assert aligned.bytes_read < total / 8
    with rasterio.open(scene[0]) as src:  # and the chip is those pixels
        dn = src.read(1, window=((BLOCK_PX, 2 * BLOCK_PX), (BLOCK_PX, 2 * BLOCK_PX))).astype(float)
    np.testing.assert_array_equal(chip[..., 0], np.rint(np.clip((dn * 1e-4 - 0.03) / 0.17, 0, 1) * 255))


def test_a_coarser_grid_reads_an_overview(scene: list[Path]) -> None:
    """A 40 m tile over the 10 m scene (``--gsd 40``) averages the 4x overview, not every native pixel."""
    coarse, native = CountingOpener(), CountingOpener()
    size = 512  # 512 px at 40 m: one block of the 4x overview, 16 blocks of the native grid
    chip, frac = read_chip(_tile(scene, 0, 0, size, res=4 * RES_M), opener=coarse)
    read_chip(_tile(scene, 0, 0, 4 * size), opener=native)  # the same ground at native resolution
    print(f"40 m tile {coarse.bytes_read} B, the same ground at 10 m {native.bytes_read} B")
    assert frac == 0.0
    assert coarse.bytes_read < native.bytes_read / 3
    with rasterio.open(scene[0]) as src:  # GDAL's own average of the native pixels onto the 40 m grid
        dn = src.read(1, window=((0, 4 * size), (0, 4 * size)), out_shape=(size, size),
                      resampling=Resampling.average).astype(float)
    expected = np.rint(np.clip((dn * 1e-4 - 0.03) / 0.17, 0, 1) * 255)
    assert np.abs(chip[..., 0].astype(float) - expected).mean() < 1.0


def test_edge_tiles_past_the_scene_are_padded_on_the_aligned_path(scene: list[Path]) -> None:
    chip, frac = read_chip(_tile(scene, SCENE_PX - 100, SCENE_PX - 50, 200))
    assert (chip[:50, :100] > 0).all()
    assert (chip[50:, :] == 0).all() and (chip[:, 100:] == 0).all()
    assert frac == pytest.approx(1 - (100 * 50) / (200 * 200))


def test_a_replaced_file_is_reopened(tmp_path: Path, scene: list[Path]) -> None:
    """Workers keep datasets open between tiles; a file replaced on disk must not be read stale."""
    hrefs = [tmp_path / f"{i}.tif" for i in range(3)]
    for h, src in zip(hrefs, scene, strict=True):
        h.write_bytes(src.read_bytes())
    first, _ = read_chip(_tile(hrefs, 0, 0, 64))
    with rasterio.open(scene[0]) as src:
        profile = src.profile
        data = src.read(1, window=((0, SCENE_PX), (0, SCENE_PX)))
    replacement = tmp_path / "replacement.tif"
    with rasterio.open(replacement, "w", **{**profile, "driver": "GTiff"}) as dst:
        dst.write(np.full_like(data, 2000), 1)
    replacement.replace(hrefs[0])
    second, _ = read_chip(_tile(hrefs, 0, 0, 64))
    assert not np.array_equal(first[..., 0], second[..., 0])
    assert (second[..., 0] == 255).all()  # 0.2 reflectance is the top of the stretch


def _rows(tiles: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    batch = {k: np.array([t[k] for t in tiles], dtype=object) for k in tiles[0]}
    batch.update(status=np.array(["ok"] * len(tiles), dtype=object), error=np.array([None] * len(tiles), dtype=object),
                 stage=np.array(["plan"] * len(tiles), dtype=object))
    return batch


def test_a_block_checks_each_file_once_and_the_next_block_sees_a_replaced_file(
    tmp_path: Path, scene: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within a block of tiles an open dataset is checked for replacement once (not once per tile and
    band); a file replaced between two blocks of a unit is read afresh in the second."""
    import rsflow.read
    from rsflow.read import read_blocks

    hrefs = [tmp_path / f"{i}.tif" for i in range(3)]
    for h, src in zip(hrefs, scene, strict=True):
        h.write_bytes(src.read_bytes())
    stamps: list[str] = []
    real = rsflow.read._local_stamp

    def counting(url: str) -> Any:
        stamps.append(url)
        return real(url)

    monkeypatch.setattr(rsflow.read, "_local_stamp", counting)
    unit = _rows([_tile(hrefs, c, 0, 64) for c in range(0, 384, 64)])
    blocks = read_blocks(unit, tiles_per_block=3, max_nodata=0.5)
    first = next(blocks)
    # once when the unit's block cache is sized, once for the block of 3 tiles x 3 bands (not 9 times)
    assert sorted(stamps) == sorted(str(h) for h in hrefs * 2)
    with rasterio.open(scene[0]) as src:
        profile = src.profile
    replacement = tmp_path / "replacement.tif"
    with rasterio.open(replacement, "w", **{**profile, "driver": "GTiff"}) as dst:
        dst.write(np.full((1, profile["height"], profile["width"]), 2000, dtype=profile["dtype"]))
    replacement.replace(hrefs[0])
    second = next(blocks)
    assert sorted(stamps[6:]) == sorted(str(h) for h in hrefs)
    assert not (first["image"][..., 0] == 255).all()
    assert (second["image"][..., 0] == 255).all()  # the replacement's 0.2 reflectance: the top of the stretch


def test_chips_travel_to_the_model_stage_as_uint8_tensors(ray_local: Any, scene: list[Path]) -> None:
    """The read stage's output column is a raw ``[H, W, 3]`` uint8 tensor holding exactly the chip:
    no image encoding between the stages."""
    import ray

    from rsflow.pipeline import add_read_stage

    boxes = [[], [{"region_id": "r1", "x1": 10.0, "y1": 10.0, "x2": 50.0, "y2": 50.0}], []]
    tiles = [{**_tile(scene, c, r, 64), "status": "ok", "error": None, "stage": "plan", "region_boxes": b}
             for (r, c), b in zip(((0, 0), (640, 1280), (1984, 1984)), boxes, strict=True)]
    ds = add_read_stage(ray.data.from_items(tiles), max_nodata=1.0, size_px=64, read_max=1, block_tiles=3)
    schema = ds.schema().base_schema
    column = schema.field("image")
    print("image column:", column.type, "| region_boxes:", schema.field("region_boxes").type)
    assert str(column.type.storage_type.value_type) == "uint8"
    assert tuple(column.type.shape) == (64, 64, 3)
    # the other list column stays an Arrow list too: not pickled Python objects each later stage unpickles
    assert str(schema.field("region_boxes").type).startswith("list<"), schema.field("region_boxes").type
    rows = sorted(ds.take_all(), key=lambda row: row["tile_id"])
    for row in rows:
        tile = next(t for t in tiles if t["tile_id"] == row["tile_id"])
        assert isinstance(row["image"], np.ndarray) and row["image"].dtype == np.uint8
        np.testing.assert_array_equal(row["image"], read_chip(tile)[0])
    assert {"hrefs", "signing"}.isdisjoint(rows[0])  # the source description stays behind


def test_read_batch_keeps_one_array_for_the_batch(scene: list[Path]) -> None:
    batch = {k: np.array([v, v], dtype=object) for k, v in _tile(scene, 0, 0, 32).items()}
    batch["status"] = np.array(["ok", "ok"], dtype=object)
    batch["error"] = np.array([None, None], dtype=object)
    batch["stage"] = np.array(["plan", "plan"], dtype=object)
    for key in ("width", "height"):
        batch[key] = np.array([32, 32])
    out = read_batch(batch, max_nodata=1.0)
    assert out["image"].dtype == np.uint8 and out["image"].shape == (2, 32, 32, 3)
    assert out["image"].flags["C_CONTIGUOUS"]


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int, int]]:
    """Every window read through ``rsflow.read._read_aligned`` (col_off, row_off, width, height), in order."""
    import rsflow.read

    seen: list[tuple[int, int, int, int]] = []
    real = rsflow.read._read_aligned

    def counting(src: Any, band: int, window: Any, nodata: Any) -> Any:
        seen.append((int(window.col_off), int(window.row_off), int(window.width), int(window.height)))
        return real(src, band, window, nodata)

    monkeypatch.setattr(rsflow.read, "_read_aligned", counting)
    return seen


def _planned(tiles: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Tile rows as the read stage gets them: columns of objects, every tile planned and ok."""
    batch = {k: np.array([t[k] for t in tiles], dtype=object) for k in tiles[0]}
    n = len(tiles)
    batch.update(status=np.array(["ok"] * n, dtype=object), error=np.array([None] * n, dtype=object),
                 stage=np.array(["plan"] * n, dtype=object))
    return batch


def test_a_row_of_tiles_reads_the_windows_under_the_row_and_no_more(
    scene: list[Path], windows: list[tuple[int, int, int, int]]
) -> None:
    """read_batch reads a run of tiles on one grid row as one window per band: the windows read (counted)
    are exactly the row's span, one tile high, never the scene."""
    out = read_batch(_planned([_tile(scene, c, 256, 128) for c in (512, 640, 768, 896)]), max_nodata=1.0)
    assert list(out["status"]) == ["ok"] * 4
    assert windows == [(512, 256, 512, 128)] * 3  # one window per band across the four tiles
    assert sum(w * h for _, _, w, h in windows) == 3 * 4 * 128 * 128 < 3 * SCENE_PX * SCENE_PX


def test_a_planning_unit_read_by_its_read_task_reads_its_own_rows_of_tiles_and_no_more(
    scene: list[Path], windows: list[tuple[int, int, int, int]]
) -> None:
    """What a read task runs in production (read_blocks over a planning unit, yielded a block at a time):
    the windows read (counted) are one per band and row of the unit's tiles, spanning the unit's columns,
    so the pixels read are the unit's own, never the scene (issue 10: a scene is never read whole)."""
    size, cols, rows = 128, (256, 384, 512), (640, 768)  # a unit of 2 rows x 3 tiles, row by row
    batch = _planned([_tile(scene, c, r, size) for r in rows for c in cols])
    blocks = list(read_blocks(batch, tiles_per_block=3, max_nodata=1.0))
    assert [list(b["status"]) for b in blocks] == [["ok"] * 3] * 2
    assert sorted(windows) == sorted([(256, r, 3 * size, size) for r in rows] * 3)
    assert sum(w * h for _, _, w, h in windows) == 3 * 6 * size * size < 3 * SCENE_PX * SCENE_PX
