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
