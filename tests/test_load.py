"""Load: 20,000 tiles of a synthetic scene through the whole region pipeline with the no-op model (issue 11).

Every stage but inference runs for real (plan, windowed reads, the model stage's rows, interpret, the
staging parts, the final sorted GeoParquet). The driver is this pytest process: its resident memory is
sampled through the run, and must stay bounded (the tiles never come back to the driver; only the final
sort holds the result rows, which are small without images).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import geopandas as gpd
import psutil
import pytest

from rsflow.cli import main
from rsflow.errors import EXIT_OK
from rsflow.synthetic import scene_bbox, write_synthetic_scene

SCENE_PX = 4544  # 142 x 142 tiles of 32 px
TILE_PX = 32
TILES = (SCENE_PX // TILE_PX) ** 2
DRIVER_GROWTH_LIMIT_MB = 400


class _PeakRss:
    """Samples this process's RSS every 50 ms while running."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def test_twenty_thousand_tiles_with_bounded_driver_memory(ray_local: Any, tmp_path_factory: pytest.TempPathFactory,
                                                          tmp_path: Path) -> None:
    assert TILES >= 20_000
    items = write_synthetic_scene(tmp_path_factory.mktemp("load-scene"), SCENE_PX)
    bbox = ",".join(f"{v:.7f}" for v in scene_bbox(items))
    out = tmp_path / "load"
    with _PeakRss() as rss:
        code = main(["--log-level", "WARNING", "region", "--stac", str(items), f"--bbox={bbox}", "--model", "noop",
                     "--tile-size", str(TILE_PX), "--tasks", "caption", "--max-tiles", "25000", "--no-preview",
                     "--output", str(out)])
    growth_mb = (rss.peak - rss.start) / 2**20
    manifest = json.loads((out / "_manifest.json").read_text())
    counts = manifest["counts"]
    print(f"\n{counts['tiles_planned']} tiles in {manifest['timings']['pipeline_seconds']} s "
          f"({manifest['throughput']['tiles_per_second']} tiles/s); driver RSS {rss.start / 2**20:.0f} MiB -> "
          f"peak {rss.peak / 2**20:.0f} MiB (+{growth_mb:.0f}); manifest driver_max_rss_mb "
          f"{manifest['driver_max_rss_mb']}; {len(manifest['files'])} file(s)")
    assert code == EXIT_OK
    # The AOI is the scene's lon/lat bbox, wider than the UTM square: every tile of the grid touches it.
    assert counts["tiles_planned"] == TILES
    assert counts["tiles_ok"] == TILES and counts["tiles_failed"] == 0
    assert manifest["driver_max_rss_mb"] > 0
    # 32 px chips of a whole block fit in one read call: units stay one block (taller ones would leave as one
    # large block, see test_tall_units_are_read_a_call_at_a_time).
    assert manifest["planning"]["unit_tiles"] == manifest["planning"]["block_tiles"] == manifest["planning"]["read_call_tiles"]
    assert growth_mb < DRIVER_GROWTH_LIMIT_MB, f"driver grew by {growth_mb:.0f} MiB for {TILES} tiles"
    frame = gpd.read_parquet(out)
    assert len(frame) == TILES and frame["tile_id"].is_unique
    assert (frame["status"] == "ok").all() and (frame["text"] == "").all()
    assert frame.geometry.is_valid.all()


def test_tall_units_are_read_a_call_at_a_time(ray_local: Any, tmp_path_factory: pytest.TempPathFactory,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a read call's chips fill a block by themselves (336 px chips with the no-op model), units grow to
    a few blocks of tiles: here with blocks of 64 tiles of 32 px and a 64 KiB block limit (22 tiles a call),
    so that a 2,500-tile scene plans units of about 209 tiles, each read in about ten calls."""
    import rsflow.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_BLOCK_PIXELS", 64 * TILE_PX**2)  # driver-side settings: read when the run plans
    monkeypatch.setattr(pipeline, "_MAX_BLOCK_BYTES", 64 * 1024)
    items = write_synthetic_scene(tmp_path_factory.mktemp("tall-units"), 1600)
    bbox = ",".join(f"{v:.7f}" for v in scene_bbox(items))
    out = tmp_path / "tall"
    code = main(["--log-level", "WARNING", "region", "--stac", str(items), f"--bbox={bbox}", "--model", "noop",
                 "--tile-size", str(TILE_PX), "--tasks", "caption", "--no-preview", "--output", str(out)])
    assert code == EXIT_OK
    manifest = json.loads((out / "_manifest.json").read_text())
    planning, tiles = manifest["planning"], (1600 // TILE_PX) ** 2
    assert planning["read_call_tiles"] == 22 and planning["block_tiles"] == 64
    slots = manifest["placement"]["read_max"]
    assert planning["unit_tiles"] == min(4 * 64, -(-tiles // (6 * slots)))
    assert planning["units"] < tiles / 64  # fewer, taller units than blocks of tiles
    frame = gpd.read_parquet(out)
    assert len(frame) == tiles and frame["tile_id"].is_unique and (frame["status"] == "ok").all()


def test_a_synthetic_scene_of_another_grid_is_written_again(tmp_path):
    """Files of an earlier call are reused only for the same size and grid: a call with another res_m
    kept the 10 m files while its item claimed 30 m pixels."""
    import rasterio

    write_synthetic_scene(tmp_path, 600)
    items = write_synthetic_scene(tmp_path, 600, res_m=30.0)
    href = json.loads(items.read_text())["features"][0]["assets"]["B04"]["href"]
    with rasterio.open(href) as src:
        assert src.transform.a == 30.0 and src.width == 600
    assert not list(tmp_path.glob("*.part.tif")) and not list(tmp_path.glob("*.tmp.tif"))
    # a file cut short (by an interrupted write of an older rsflow) keeps a whole header: written again
    path = Path(href)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    write_synthetic_scene(tmp_path, 600, res_m=30.0)
    with rasterio.open(href) as src:
        assert src.read(1).shape == (600, 600)
