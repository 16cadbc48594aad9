"""Tests for rsflow.search against a real STAC API (``rustac serve``) and the local catalog files."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from shapely.geometry import box, mapping

from rsflow.errors import RequestError, SourceError
from rsflow.sample import L8_COLLECTION_ID, L8_ITEM_ID, S2_COLLECTION_ID, S2_ITEM_ID, serve_hrefs
from rsflow.search import SearchQuery, SearchResult, normalize_datetime, search_items
from tests.stac_fixtures import free_port, sample_catalog, serve_stac, stac_api  # noqa: F401  (fixtures)

BOTH = (S2_COLLECTION_ID, L8_COLLECTION_ID)
AOI_S2 = mapping(box(-75.62, 37.66, -75.60, 37.68))  # inside the Sentinel-2 scene (Virginia)
AOI_L8 = mapping(box(-87.41, 30.72, -87.39, 30.74))  # inside the Landsat 8 scene (Gulf coast)
AOI_BOTH = mapping(box(-90.0, 25.0, -70.0, 40.0))
AOI_NONE = mapping(box(10.0, 45.0, 10.5, 45.5))  # the Alps
AOI_EDGE_S2 = mapping(box(-75.80, 37.55, -75.727, 37.59))  # overlaps only the south-west corner


def query(stac: str, **overrides: Any) -> SearchQuery:
    fields: dict[str, Any] = {"stac": stac, "collections": BOTH, "intersects": AOI_BOTH, "max_items": 50}
    fields.update(overrides)
    return SearchQuery(**fields)


def ids(result: SearchResult) -> list[str]:
    return [item["id"] for item in result.items]


# Queries with their expected ids (sorted by datetime: Landsat 2016-05-15 before Sentinel-2 2016-05-28).
CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "everything": ({}, [L8_ITEM_ID, S2_ITEM_ID]),
    "bbox-s2": ({"intersects": AOI_S2}, [S2_ITEM_ID]),
    "bbox-l8": ({"intersects": AOI_L8}, [L8_ITEM_ID]),
    "bbox-corner": ({"intersects": AOI_EDGE_S2}, [S2_ITEM_ID]),
    "bbox-miss": ({"intersects": AOI_NONE}, []),
    "month": ({"datetime": normalize_datetime("2016-05")}, [L8_ITEM_ID, S2_ITEM_ID]),
    "day-s2": ({"datetime": normalize_datetime("2016-05-28")}, [S2_ITEM_ID]),
    "until-l8": ({"datetime": normalize_datetime("../2016-05-20")}, [L8_ITEM_ID]),
    "from-s2": ({"datetime": normalize_datetime("2016-05-20/..")}, [S2_ITEM_ID]),
    "year-miss": ({"datetime": normalize_datetime("2017")}, []),
    "collection-l8": ({"collections": (L8_COLLECTION_ID,)}, [L8_ITEM_ID]),
    "collection-s2-aoi-l8": ({"collections": (S2_COLLECTION_ID,), "intersects": AOI_L8}, []),
    "cloud-5": ({"max_cloud": 5.0}, [S2_ITEM_ID]),
    "cloud-100": ({"max_cloud": 100.0}, [L8_ITEM_ID, S2_ITEM_ID]),
    "cloud-0": ({"max_cloud": 0}, [S2_ITEM_ID]),
}


# --------------------------------------------------------------------------------------------- API


@pytest.mark.parametrize("case", sorted(CASES))
def test_api_search(stac_api: str, case: str) -> None:  # noqa: F811
    overrides, expected = CASES[case]
    result = search_items(query(stac_api, **overrides))
    assert ids(result) == expected
    assert result.source_kind == "api" and result.source == stac_api
    assert result.n_duplicates == 0 and result.n_skipped == 0
    assert result.duration_seconds > 0


def test_cloud_filter_is_inclusive_and_client_side(stac_api: str) -> None:  # noqa: F811
    l8 = search_items(query(stac_api, collections=(L8_COLLECTION_ID,)))
    cover = l8.items[0]["properties"]["eo:cloud_cover"]
    at = search_items(query(stac_api, max_cloud=cover))
    below = search_items(query(stac_api, max_cloud=cover - 0.01))
    assert ids(at) == [L8_ITEM_ID, S2_ITEM_ID]
    assert ids(below) == [S2_ITEM_ID] and below.n_cloud_filtered == 1
    # rustac's memory backend does not conform to the query extension: the filter ran here
    assert below.cloud_filter_on_server is False


def test_max_items_bounds_the_search(stac_api: str) -> None:  # noqa: F811
    result = search_items(query(stac_api, max_items=1))
    assert len(result.items) == 1 and result.reached_max_items
    assert not search_items(query(stac_api, max_items=3)).reached_max_items


def test_api_duplicates_are_dropped(sample_catalog: Path, tmp_path: Path) -> None:  # noqa: F811
    """rustac's memory backend keeps an item loaded twice twice, as a paging API can repeat items."""
    hrefs = serve_hrefs(sample_catalog)
    with serve_stac([*hrefs, hrefs[-1]], tmp_path / "serve.log") as url:
        raw = json.loads(urllib.request.urlopen(f"{url}/search?limit=10", timeout=5).read())
        assert len(raw["features"]) == 4, "the server repeats each item"
        result = search_items(query(url))
    assert ids(result) == [L8_ITEM_ID, S2_ITEM_ID]
    assert result.n_duplicates == 2


def test_api_items_are_the_catalog_items(stac_api: str, sample_catalog: Path) -> None:  # noqa: F811
    local = {item["id"]: item for item in search_items(query(str(sample_catalog))).items}
    for item in search_items(query(stac_api)).items:
        assert item["assets"] == local[item["id"]]["assets"]
        assert item["properties"]["datetime"] == local[item["id"]]["properties"]["datetime"]


# --------------------------------------------------------------------------------------------- local


@pytest.fixture(params=["catalog.json", "items.parquet", "items.json", "sample"])
def local_source(
    request: pytest.FixtureRequest,
    sample_catalog: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> str:
    if request.param == "sample":
        monkeypatch.setenv("RSFLOW_CACHE", str(sample_catalog.parents[2]))
        return "sample"
    return str(sample_catalog.parent / request.param)


@pytest.mark.parametrize("case", sorted(CASES))
def test_local_search_gives_the_api_ids(stac_api: str, local_source: str, case: str) -> None:  # noqa: F811
    overrides, expected = CASES[case]
    local = search_items(query(local_source, **overrides))
    assert local.source_kind == "local"
    assert ids(local) == expected == ids(search_items(query(stac_api, **overrides)))


def test_a_collection_the_source_does_not_have_is_refused_not_an_empty_result(
    stac_api: str, local_source: str  # noqa: F811
) -> None:
    """A typo in --collections finds nothing; it is refused, naming the flag, not run as an empty AOI."""
    for source in (stac_api, local_source):
        with pytest.raises(RequestError, match=r"^--collections: .* has no collection 'sentinel-2-l2z'") as err:
            search_items(query(source, collections=(S2_COLLECTION_ID, "sentinel-2-l2z")))
        if source == local_source:
            assert f"it has: {L8_COLLECTION_ID}, {S2_COLLECTION_ID}" in str(err.value)
    # a collection that exists but has nothing in the AOI is an empty result, as before
    assert ids(search_items(query(stac_api, collections=(S2_COLLECTION_ID,), intersects=AOI_L8))) == []


def test_an_item_in_the_last_second_of_a_day_is_in_that_day(tmp_path: Path) -> None:
    features = [_feature("late", properties={"datetime": "2024-01-10T23:59:59.500Z"}),
                _feature("next", properties={"datetime": "2024-01-11T00:00:00Z"})]
    path = tmp_path / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    result = search_items(query(str(path), collections=("c",), intersects=mapping(box(0, 0, 1, 1)),
                                datetime=normalize_datetime("2024-01-10")))
    assert ids(result) == ["late"]


@pytest.mark.parametrize("source", ["local", "api"])
def test_the_cloud_filter_applies_before_max_items(source: str, tmp_path: Path) -> None:
    """As an API with the query extension: the clear scenes are kept even when cloudy ones are newer, from
    a local catalog and from an API without the extension (rustac serve), where rsflow filters them itself."""
    features = [_feature(f"i{k:02d}", properties={"datetime": f"2024-05-{k + 1:02d}T00:00:00Z",
                                                   "eo:cloud_cover": 90.0 if k >= 5 else 1.0})
                for k in reversed(range(10))]  # newest first, as APIs page (rustac: in this order)
    path = tmp_path / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))

    def search(stac: str, **changes: Any) -> SearchResult:
        return search_items(query(stac, collections=("c",), intersects=mapping(box(0, 0, 1, 1)), max_cloud=10.0,
                                  **changes))

    if source == "local":
        result = search(str(path), max_items=5)
        assert ids(result) == [f"i{k:02d}" for k in range(5)] and not result.reached_max_items
        assert result.n_cloud_filtered == 5
        return
    collection = tmp_path / "c.json"
    collection.write_text(json.dumps({
        "type": "Collection", "stac_version": "1.1.0", "id": "c", "description": "clouds", "license": "other",
        "links": [], "extent": {"spatial": {"bbox": [[0, 0, 1, 1]]},
                                "temporal": {"interval": [["2024-05-01T00:00:00Z", None]]}},
    }))
    with serve_stac([collection, path], tmp_path / "serve.log") as url:
        result = search(url, max_items=5)
        assert not result.cloud_filter_on_server
        assert ids(result) == [f"i{k:02d}" for k in range(5)] and result.reached_max_items
        assert result.n_cloud_filtered == 5  # the five newer, cloudy ones, seen before the clear ones
        fewer = search(url, max_items=2)  # the newest two that pass
        assert ids(fewer) == ["i03", "i04"] and fewer.reached_max_items


def test_local_assets_have_absolute_hrefs(local_source: str) -> None:
    for item in search_items(query(local_source)).items:
        for asset in item["assets"].values():
            assert Path(asset["href"]).is_absolute() and Path(asset["href"]).is_file()


def test_local_max_items_keeps_the_newest(sample_catalog: Path) -> None:  # noqa: F811
    result = search_items(query(str(sample_catalog), max_items=1))
    assert ids(result) == [S2_ITEM_ID] and result.reached_max_items


def _feature(item_id: str, **changes: Any) -> dict[str, Any]:
    feature: dict[str, Any] = {
        "type": "Feature",
        "stac_version": "1.1.0",
        "id": item_id,
        "collection": "c",
        "geometry": mapping(box(0, 0, 1, 1)),
        "bbox": [0, 0, 1, 1],
        "properties": {"datetime": "2024-01-10T00:00:00Z"},
        "links": [],
        "assets": {"data": {"href": "data.tif"}},
    }
    feature.update(changes)
    return feature


def test_local_screening_names_the_skipped_items(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    features = [
        _feature("b"),
        _feature("a"),
        _feature("a"),
        _feature("no-geometry", geometry=None),
        _feature("no-assets", assets={}),
        _feature("a", properties={"datetime": "2024-02-01T00:00:00Z"}),  # another acquisition, the same id
    ]
    path = tmp_path / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with caplog.at_level(logging.WARNING, logger="rsflow.search"):
        result = search_items(SearchQuery(str(path), ("c",), mapping(box(0.2, 0.2, 0.4, 0.4)), max_items=10))
    assert ids(result) == ["a", "b"]  # same datetime: sorted by id
    assert (result.n_duplicates, result.n_skipped) == (2, 2)
    assert "no-geometry" in caplog.text and "no-assets" in caplog.text
    # refused with the reason (the region job writes a failed row for each); the repeated identical "a" is not
    reasons = {(item["id"], (item["properties"] or {}).get("datetime")): why for item, why in result.refused}
    assert reasons[("no-geometry", "2024-01-10T00:00:00Z")] == "the item has no geometry"
    assert reasons[("no-assets", "2024-01-10T00:00:00Z")] == "the item has no assets"
    assert "another item with id 'a'" in reasons[("a", "2024-02-01T00:00:00Z")] and len(reasons) == 3
    assert result.items[0]["assets"]["data"]["href"] == str(tmp_path / "data.tif")


def test_local_time_ranges_overlap(tmp_path: Path) -> None:
    ranged = _feature(
        "ranged",
        properties={
            "datetime": None,
            "start_datetime": "2024-01-01T00:00:00Z",
            "end_datetime": "2024-01-31T23:59:59.999999Z",
        },
    )
    path = tmp_path / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [ranged]}))

    def found(interval: str) -> list[str]:
        return ids(
            search_items(
                SearchQuery(
                    str(path), ("c",), mapping(box(0, 0, 1, 1)), normalize_datetime(interval), max_items=5
                )
            )
        )

    assert found("2024-01-15") == ["ranged"]
    assert found("2023-12-01/2024-01-01") == ["ranged"]  # touches the start
    assert found("2024-02") == []
    assert found("../2023-12-31") == []


def test_local_items_without_cloud_cover_are_dropped_by_max_cloud(tmp_path: Path) -> None:
    path = tmp_path / "items.json"
    features = [
        _feature("clear", properties={"datetime": "2024-01-01T00:00:00Z", "eo:cloud_cover": 3}),
        _feature("unknown"),
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    result = search_items(SearchQuery(str(path), ("c",), mapping(box(0, 0, 1, 1)), max_cloud=10, max_items=5))
    assert ids(result) == ["clear"] and result.n_cloud_filtered == 1


def test_a_static_catalog_with_links_by_url_is_refused_before_any_work(tmp_path: Path) -> None:
    """Items a local static catalog links by URL (a catalog published with absolute links, then downloaded)
    were skipped with a log line only: the run succeeded on the rest. The search refuses it, naming --stac,
    how many links are remote and the first (its token redacted), and what to pass instead."""
    (tmp_path / "a.json").write_text(json.dumps(_feature("local")))
    child = {"type": "Catalog", "stac_version": "1.1.0", "id": "child", "description": "",
             "links": [{"rel": "item", "href": "s3://bucket/catalog/c.json"}]}
    (tmp_path / "child").mkdir()
    (tmp_path / "child" / "catalog.json").write_text(json.dumps(child))
    root = {"type": "Catalog", "stac_version": "1.1.0", "id": "root", "description": "", "links": [
        {"rel": "self", "href": "https://example.com/catalog/catalog.json"},  # not followed: not a refusal
        {"rel": "item", "href": "./a.json"},
        {"rel": "item", "href": "https://example.com/catalog/b.json?token=secret"},
        {"rel": "child", "href": "child/catalog.json"},
    ]}
    (tmp_path / "catalog.json").write_text(json.dumps(root))
    search = SearchQuery(str(tmp_path / "catalog.json"), ("c",), mapping(box(0.2, 0.2, 0.4, 0.4)))
    refusal = r"^--stac: the static catalog .* has 2 child/item link\(s\) by URL rather than local path"
    with pytest.raises(RequestError, match=refusal) as caught:
        search_items(search)
    message = str(caught.value)
    assert "https://example.com/catalog/b.json" in message and "secret" not in message
    assert "read from local files only" in message and "STAC API URL" in message
    root["links"] = root["links"][:2]  # the same catalog with its local links only is searched
    (tmp_path / "catalog.json").write_text(json.dumps(root))
    assert ids(search_items(search)) == ["local"]


def test_a_missing_local_file_is_a_request_error(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match=r"--stac: .*not a file.*'sample'"):
        search_items(query(str(tmp_path / "nope.json")))


# --------------------------------------------------------------------------------------------- failures


def test_http_404_is_a_source_error_naming_the_url(stac_api: str) -> None:  # noqa: F811
    url = f"{stac_api}/no-such-api"
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"no-such-api.*HTTP 404") as caught:
        search_items(query(url), timeout_seconds=5, max_retries=2)
    assert caught.value.status_code == 404
    assert time.monotonic() - started < 10


def test_unreachable_endpoint_is_a_source_error_within_bounded_time() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(SourceError, match=url.replace(".", r"\.")):
        search_items(query(url), timeout_seconds=2, max_retries=2, backoff_factor=0.05)
    assert time.monotonic() - started < 10


def test_a_silent_server_times_out_within_bounded_time() -> None:
    """A server that accepts connections but never answers: each try ends after ``timeout_seconds``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(SourceError, match=url.replace(".", r"\.")):
            search_items(query(url), timeout_seconds=0.5, max_retries=1, backoff_factor=0.05)
        assert time.monotonic() - started < 5


class _FlakyProxy(BaseHTTPRequestHandler):
    """Answers the first request of each (method, path) with 503, then forwards to the real API."""

    upstream = ""
    seen: ClassVar[set[tuple[str, str]]] = set()
    failures = 0

    def _handle(self) -> None:
        key = (self.command, self.path.split("?")[0])
        body = (
            self.rfile.read(int(self.headers.get("Content-Length") or 0)) if self.command == "POST" else None
        )
        if key not in self.seen:
            self.seen.add(key)
            type(self).failures += 1
            if self.stall_seconds:  # say nothing for a while (the client gives up), then drop it
                time.sleep(self.stall_seconds)
                self.close_connection = True
                return
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        request = urllib.request.Request(self.upstream + self.path, data=body, method=self.command)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=5) as response:
            payload = response.read().replace(self.upstream.encode(), self.proxy_url.encode())
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = _handle
    do_POST = _handle
    proxy_url = ""
    stall_seconds = 0.0

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def flaky_api(stac_api: str) -> Iterator[type[_FlakyProxy]]:  # noqa: F811
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyProxy)
    proxy_url = f"http://127.0.0.1:{server.server_address[1]}"
    handler: type[_FlakyProxy] = type(
        "Flaky", (_FlakyProxy,), {"upstream": stac_api, "proxy_url": proxy_url, "seen": set(), "failures": 0}
    )
    server.RequestHandlerClass = handler
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def test_503_is_retried_for_get_and_post(flaky_api: type[_FlakyProxy]) -> None:
    result = search_items(query(flaky_api.proxy_url), max_retries=3, backoff_factor=0.01)
    assert ids(result) == [L8_ITEM_ID, S2_ITEM_ID]
    assert ("GET", "/") in flaky_api.seen and ("POST", "/search") in flaky_api.seen
    assert flaky_api.failures >= 2


def test_a_stalled_request_is_retried_after_its_timeout(flaky_api: type[_FlakyProxy]) -> None:
    flaky_api.stall_seconds = 1.5
    started = time.monotonic()
    result = search_items(query(flaky_api.proxy_url), timeout_seconds=0.5, max_retries=3, backoff_factor=0.01)
    assert ids(result) == [L8_ITEM_ID, S2_ITEM_ID]
    assert flaky_api.failures >= 2 and time.monotonic() - started < 10


def test_past_the_retry_budget_one_line_names_the_endpoint_and_status(stac_api: str) -> None:  # noqa: F811
    """Every request answered 503: after the retries, one line with the endpoint and the status."""

    class Always503(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Always503)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(SourceError) as caught:
            search_items(query(url), max_retries=2, backoff_factor=0.01)
    finally:
        server.shutdown()
        server.server_close()
    message = str(caught.value)
    assert url in message and "HTTP 503" in message and "\n" not in message
    assert caught.value.status_code == 503


def test_503_without_retries_keeps_the_status(flaky_api: type[_FlakyProxy]) -> None:
    with pytest.raises(SourceError, match="HTTP 503") as caught:
        search_items(query(flaky_api.proxy_url), max_retries=0)
    assert caught.value.status_code == 503


# --------------------------------------------------------------------------------------------- query


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        ("2024", "2024-01-01T00:00:00Z/2024-12-31T23:59:59.999999Z"),
        ("2024-02", "2024-02-01T00:00:00Z/2024-02-29T23:59:59.999999Z"),
        ("2023-02", "2023-02-01T00:00:00Z/2023-02-28T23:59:59.999999Z"),
        ("2024-01-15", "2024-01-15T00:00:00Z/2024-01-15T23:59:59.999999Z"),
        ("2024-01-15T10:30:00Z", "2024-01-15T10:30:00Z/2024-01-15T10:30:00Z"),
        ("2024-01-15T10:30:00", "2024-01-15T10:30:00Z/2024-01-15T10:30:00Z"),  # naive = UTC
        ("2024-01-15T10:30:00+02:00", "2024-01-15T08:30:00Z/2024-01-15T08:30:00Z"),
        ("2024-01/2024-03", "2024-01-01T00:00:00Z/2024-03-31T23:59:59.999999Z"),
        ("2024-01-01T00:00:00Z/..", "2024-01-01T00:00:00Z/.."),
        ("../2024", "../2024-12-31T23:59:59.999999Z"),
        ("/2024", "../2024-12-31T23:59:59.999999Z"),
        ("2024-01-01T00:00:00Z/2024-03-31T23:59:59.999999Z", "2024-01-01T00:00:00Z/2024-03-31T23:59:59.999999Z"),
    ],
)
def test_normalize_datetime_spellings(value: str | None, expected: str | None) -> None:
    assert normalize_datetime(value) == expected
    if expected is not None:
        assert normalize_datetime(expected) == expected  # idempotent


@pytest.mark.parametrize(
    "value, message",
    [
        ("../..", "open at both ends"),
        ("2025/2024", "starts after it ends"),
        ("May 2024", "cannot read"),
        ("2024-13", "cannot read"),
        ("a/b/c", "more than one"),
    ],
)
def test_normalize_datetime_refusals(value: str, message: str) -> None:
    with pytest.raises(RequestError, match=f"--datetime: .*{message}"):
        normalize_datetime(value)


@pytest.mark.parametrize(
    "overrides, flag",
    [
        ({"stac": " "}, "--stac"),
        ({"stac": "https://stac.example.com/v1", "collections": ()}, "--collections"),
        ({"collections": ["a"]}, "--collections"),
        ({"datetime": "2024"}, "--datetime"),
        ({"max_cloud": 101}, "--max-cloud"),
        ({"max_cloud": -1}, "--max-cloud"),
        ({"max_items": 0}, "--max-items"),
        ({"max_items": True}, "--max-items"),
        ({"intersects": {"type": "Polygon"}}, "--intersects"),
        ({"intersects": mapping(box(500000, 4000000, 510000, 4010000))}, "--intersects"),  # UTM metres
        (
            {"intersects": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}},
            "--intersects",
        ),
        ({"intersects": [0, 0, 1, 1]}, "--intersects"),
    ],
)
def test_query_checks_name_the_flag(overrides: dict[str, Any], flag: str) -> None:
    fields = dict(overrides)
    with pytest.raises(RequestError) as caught:
        query(fields.pop("stac", "sample"), **fields)
    assert caught.value.field == flag


def test_unnormalised_datetime_error_gives_the_normalised_form() -> None:
    with pytest.raises(RequestError, match="2024-01-01T00:00:00Z/2024-12-31T23:59:59.999999Z"):
        query("sample", datetime="2024")


class _ItemSearchOnly(BaseHTTPRequestHandler):
    """A STAC API of core and item search only (no collections endpoint) whose search finds nothing."""

    conforms: ClassVar[list[str]] = ["https://api.stacspec.org/v1.0.0/core",
                                     "https://api.stacspec.org/v1.0.0/item-search"]

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, body: dict[str, Any], code: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # http.server's name
        base = f"http://127.0.0.1:{self.server.server_port}"
        if self.path.split("?")[0] == "/":
            links = [{"rel": rel, "href": f"{base}/"} for rel in ("self", "root")]
            links += [{"rel": "search", "href": f"{base}/search", "method": m} for m in ("GET", "POST")]
            return self._send({"type": "Catalog", "id": "x", "description": "x", "stac_version": "1.0.0",
                               "conformsTo": self.conforms, "links": links})
        if self.path.startswith("/search"):
            return self._send({"type": "FeatureCollection", "features": [], "links": []})
        return self._send({"code": "NotFound"}, 404)

    do_POST = do_GET


def test_an_api_without_collections_endpoint_gives_an_empty_result_not_an_unknown_collection() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ItemSearchOnly)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = search_items(query(f"http://127.0.0.1:{server.server_port}/", collections=("sentinel-2-l2a",)))
    finally:
        server.shutdown()
    assert result.items == []


class _FeaturesApi(_ItemSearchOnly):
    """The same with OGC API Features: ``/collections/{id}`` exists (and answers 404 for an unknown id)."""

    conforms: ClassVar[list[str]] = [*_ItemSearchOnly.conforms, "https://api.stacspec.org/v1.0.0/ogcapi-features"]


def test_an_ogc_features_api_names_an_unknown_collection() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FeaturesApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RequestError, match="^--collections: .* has no collection 'no-such-collection'"):
            search_items(query(f"http://127.0.0.1:{server.server_port}/", collections=("no-such-collection",)))
    finally:
        server.shutdown()
