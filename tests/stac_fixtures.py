"""STAC fixtures built by code: the embedded sample catalog and a real ``rustac serve`` STAC API over it.

Import the fixtures into a test module (``from tests.stac_fixtures import sample_catalog, stac_api``).
The sample catalog is built once per test session under pytest's base temp folder; every module that
imports the fixture reuses that folder, so it is built only once.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from rsflow.sample import ensure_sample_catalog, serve_hrefs

SERVER_START_TIMEOUT_SECONDS = 20.0
"""How long ``rustac serve`` may take to answer ``GET /`` before the fixture gives up."""


def rustac_executable() -> str | None:
    """The ``rustac`` CLI installed with the rustac wheel (beside this Python, else on PATH)."""
    beside = Path(sys.executable).parent / "rustac"
    if beside.is_file():
        return str(beside)
    return shutil.which("rustac")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200 and json.loads(response.read()).get("type") == "Catalog")
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextlib.contextmanager
def serve_stac(hrefs: Sequence[Path], log_path: Path) -> Iterator[str]:
    """Run ``rustac serve HREFS --addr 127.0.0.1:PORT`` until the block ends; yields the API's root URL.

    Args:
        hrefs: collection JSON files, then item / FeatureCollection JSON files, loaded into memory.
        log_path: where the server's stdout and stderr go (shown when it fails to start).
    """
    executable = rustac_executable()
    if executable is None:
        pytest.skip("the rustac CLI is not installed (pip install rustac)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [executable, "serve", *map(str, hrefs), "--addr", f"127.0.0.1:{port}"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_SECONDS
        while not _answers(url + "/"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rustac serve did not start on {url}; its log:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="session")
def sample_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the sample ``catalog.json``, built into a session-wide temporary cache."""
    cache = tmp_path_factory.getbasetemp() / "rsflow-cache"
    return ensure_sample_catalog(cache)


@pytest.fixture(scope="session")
def stac_api(sample_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real STAC API (``rustac serve``, memory backend) over the sample collections and items."""
    log_path = tmp_path_factory.mktemp("rustac-serve") / "serve.log"
    with serve_stac(serve_hrefs(sample_catalog), log_path) as url:
        yield url
