"""Faults during a run: a model actor killed mid-run is replaced and its tiles run again, once."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import geopandas as gpd
import pytest

from rsflow.cli import main
from rsflow.errors import EXIT_OK
from tests.conftest import SHORE_BBOX as BBOX
from tests.conftest import SHORE_FLAGS as FLAGS

pytestmark = [pytest.mark.slow, pytest.mark.ray]



def test_a_killed_model_actor_is_replaced_and_every_tile_is_written_once(
    ray_local: Any, sample_catalog: Path, shore_run: Path, tmp_path: Path
) -> None:
    import psutil
    import ray

    # this session's raylet forks the workers: its children are ours (other Rays may share the machine)
    raylet = psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)

    def model_actor_pids() -> list[int]:
        pids = []
        for proc in raylet.children(recursive=True):
            try:
                if "ModelRunner" in " ".join(proc.cmdline()):
                    pids.append(proc.pid)
            except psutil.Error:
                continue
        return pids

    out = tmp_path / "run"
    result: dict[str, int] = {}
    runner = threading.Thread(
        target=lambda: result.update(code=main(["--log-level", "WARNING", "region", "--stac", str(sample_catalog),
                                                "--bbox", BBOX, *FLAGS, "--output", str(out)])),
        daemon=True,
    )
    runner.start()
    killed: list[int] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and runner.is_alive() and not killed:
        if list(tmp_path.glob(".run.staging-*/_parts/raw-*.parquet")):  # mid-run: some rows are done
            for pid in model_actor_pids()[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.1)
    runner.join(timeout=600)
    assert killed, "no model actor was found alive mid-run"
    assert result.get("code") == EXIT_OK

    manifest = json.loads((out / "_manifest.json").read_text())
    gdf = gpd.read_parquet(out)
    print(f"\nkilled model actor pid {killed[0]}; {len(gdf)} rows, {manifest['counts']['tiles_planned']} tiles planned")
    assert gdf["tile_id"].is_unique  # one prompt per tile: no tile twice
    assert len(gdf) == manifest["counts"]["tiles_planned"] == manifest["counts"]["tiles_ok"]
    assert (gdf["status"] == "ok").all()
    ref = gpd.read_parquet(shore_run)  # and the same rows as a run whose actor was never killed
    assert dict(zip(gdf["tile_id"], gdf["text"], strict=True)) == dict(zip(ref["tile_id"], ref["text"], strict=True))
