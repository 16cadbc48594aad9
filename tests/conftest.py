"""Shared fixtures: a sample catalog, a real STAC API (rustac serve), tiny models, a local Ray."""

from __future__ import annotations

import logging
import os
import tempfile

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local test clusters only
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Built models and catalogs go to a throwaway cache, never the user's ~/.cache (set before Ray starts,
# so that its workers inherit it).
os.environ.setdefault("RSFLOW_CACHE", tempfile.mkdtemp(prefix="rsflow-test-cache-"))

# Ray Data logs every operator's metrics at DEBUG; a failing test should show our logs, not those.
logging.getLogger("ray").setLevel(logging.INFO)

pytest_plugins = ["tests.stac_fixtures", "tests.model_fixtures"]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, like CI)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


SHORE_BBOX = "-75.6846,37.6629,-75.5920,37.7374"
"""Land, shore and water of the sample scene: about 170 tiles of 64 px (a run long enough to interrupt)."""
SHORE_FLAGS = ["--tasks", "vqa", "--question", "Is there water in this image?", "--max-new-tokens", "4",
               "--batch-size", "8", "--no-preview"]


@pytest.fixture(scope="session")
def shore_run(ray_local, sample_catalog, tmp_path_factory):
    """An uninterrupted region run over SHORE_BBOX (default demo model): the reference the fault tests'
    runs (a killed driver resumed, a killed model actor) must equal."""
    from rsflow.cli import main

    out = tmp_path_factory.mktemp("shore") / "reference"
    assert main(["--log-level", "WARNING", "region", "--stac", str(sample_catalog), "--bbox", SHORE_BBOX,
                 *SHORE_FLAGS, "--output", str(out)]) == 0
    return out
