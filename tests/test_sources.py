"""Tests for rsflow.sources: profile files, profile lookup, scaling precedence and href signing."""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling

from rsflow.errors import RequestError, SourceError
from rsflow.sample import L8_COLLECTION_ID, L8_ITEM_ID, S2_COLLECTION_ID, S2_ITEM_ID
from rsflow.sources import (
    BandRef,
    SourceProfile,
    band_scaling,
    catalogs_dir,
    load_profiles,
    profiles_dir,
    resolve_profile,
    sign_href,
)
from tests.stac_fixtures import sample_catalog  # noqa: F401  (pytest fixture)

EARTH_SEARCH = "https://earth-search.aws.element84.com/v1"
PLANETARY_COMPUTER = "https://planetarycomputer.microsoft.com/api/stac/v1"
EXPECTED_PROFILES = {
    "earth-search-sentinel-2-l2a": "sentinel-2-l2a",
    "earth-search-landsat-c2-l2": "landsat-c2-l2",
    "planetary-computer-sentinel-2-l2a": "sentinel-2-l2a",
    "planetary-computer-landsat-c2-l2": "landsat-c2-l2",
    "planetary-computer-naip": "naip",
    "sample-sentinel-2": S2_COLLECTION_ID,
    "sample-landsat-8": L8_COLLECTION_ID,
}


def make_item(
    asset: dict[str, Any], properties: dict[str, Any] | None = None, key: str = "red"
) -> dict[str, Any]:
    """A minimal STAC item dict with one asset."""
    return {
        "type": "Feature",
        "id": "item-1",
        "properties": {"datetime": "2024-01-01T00:00:00Z", **(properties or {})},
        "assets": {key: {"href": "https://example.com/red.tif", **asset}},
    }


# --------------------------------------------------------------------------------------------- files


def test_profiles_folder_is_found_in_the_source_tree() -> None:
    assert catalogs_dir() == Path(__file__).resolve().parents[1] / "catalogs"
    assert profiles_dir() == catalogs_dir() / "profiles"


def test_the_shipped_profiles() -> None:
    profiles = load_profiles()
    assert {
        name: p.collection for name, p in profiles.items() if name in EXPECTED_PROFILES
    } == EXPECTED_PROFILES
    for profile in profiles.values():
        assert profile.description and profile.quantity, f"{profile.name} documents its stretch"
        assert len(profile.rgb) == 3 and all(isinstance(ref, BandRef) for ref in profile.rgb)
        low, high = profile.stretch
        assert low < high


def test_profile_values_of_the_public_sources() -> None:
    profiles = load_profiles()
    es2 = profiles["earth-search-sentinel-2-l2a"]
    assert [ref.asset for ref in es2.rgb] == ["red", "green", "blue"]
    assert (es2.nodata, es2.scale, es2.offset, es2.signing) == (0.0, 1e-4, -0.1, None)
    ls = profiles["earth-search-landsat-c2-l2"]
    assert (ls.nodata, ls.scale, ls.offset) == (0.0, 2.75e-5, -0.2)
    pc2 = profiles["planetary-computer-sentinel-2-l2a"]
    assert [ref.asset for ref in pc2.rgb] == ["B04", "B03", "B02"] and pc2.signing == "planetary-computer"
    pls = profiles["planetary-computer-landsat-c2-l2"]
    assert [ref.asset for ref in pls.rgb] == ["red", "green", "blue"] and pls.signing == "planetary-computer"
    assert (pls.nodata, pls.scale, pls.offset, pls.stretch) == (ls.nodata, ls.scale, ls.offset, ls.stretch)
    naip = profiles["planetary-computer-naip"]
    assert naip.rgb == (BandRef("image", 1), BandRef("image", 2), BandRef("image", 3))
    assert (naip.stretch, naip.scale, naip.offset, naip.nodata) == ((0.0, 255.0), 1.0, 0.0, None)
    assert naip.signing == "planetary-computer"


def _write_profile(folder: Path, name: str, **overrides: Any) -> Path:
    raw: dict[str, Any] = {
        "name": name,
        "collection": "c",
        "rgb": [{"asset": "r", "band": 1}, {"asset": "g", "band": 1}, {"asset": "b", "band": 1}],
        "nodata": 0,
        "scale": 1.0,
        "offset": 0.0,
        "stretch": [0, 1],
    }
    raw.update(overrides)
    raw = {k: v for k, v in raw.items() if v is not _DROP}
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


_DROP = object()


def test_a_profile_missing_a_key_names_it(tmp_path: Path) -> None:
    _write_profile(tmp_path, "p", stretch=_DROP)
    with pytest.raises(RequestError, match=r"p\.yaml.*misses the keys \['stretch'\]"):
        load_profiles(tmp_path)


def test_a_profile_name_must_match_its_file(tmp_path: Path) -> None:
    path = _write_profile(tmp_path, "p")
    path.rename(tmp_path / "other.yaml")
    with pytest.raises(RequestError, match="must equal the file name 'other'"):
        load_profiles(tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"stretch": [1, 0]}, "stretch"),
        ({"rgb": [{"asset": "r", "band": 1}]}, "rgb"),
        ({"rgb": [{"asset": "r", "band": 0}] * 3}, "band index >= 1"),
        ({"scale": "big"}, "scale"),
        ({"signing": "aws"}, "signing"),
    ],
)
def test_bad_profile_values_are_request_errors(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    _write_profile(tmp_path, "p", **overrides)
    with pytest.raises(RequestError, match=message):
        load_profiles(tmp_path)


def test_unknown_profile_keys_are_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_profile(tmp_path, "p", colour_map="viridis")
    with caplog.at_level(logging.WARNING, logger="rsflow.sources"):
        profiles = load_profiles(tmp_path)
    assert "p" in profiles
    assert "colour_map" in caplog.text


# --------------------------------------------------------------------------------------------- lookup


@pytest.mark.parametrize(
    "stac, collection, expected",
    [
        (EARTH_SEARCH, "sentinel-2-l2a", "earth-search-sentinel-2-l2a"),
        (EARTH_SEARCH + "/", "sentinel-2-l2a", "earth-search-sentinel-2-l2a"),
        (EARTH_SEARCH, "landsat-c2-l2", "earth-search-landsat-c2-l2"),
        (PLANETARY_COMPUTER, "sentinel-2-l2a", "planetary-computer-sentinel-2-l2a"),
        (PLANETARY_COMPUTER, "naip", "planetary-computer-naip"),
        (PLANETARY_COMPUTER, "landsat-c2-l2", "planetary-computer-landsat-c2-l2"),
        ("sample", S2_COLLECTION_ID, "sample-sentinel-2"),
        ("sample", L8_COLLECTION_ID, "sample-landsat-8"),
        # a collection only one profile reads: found whatever the URL (the tests' local rustac API)
        ("http://127.0.0.1:7822", S2_COLLECTION_ID, "sample-sentinel-2"),
        ("http://127.0.0.1:7822", "naip", "planetary-computer-naip"),
    ],
)
def test_resolve_by_url_and_collection(stac: str, collection: str, expected: str) -> None:
    assert resolve_profile(stac, collection).name == expected


def test_resolve_the_local_sample_catalog_path(sample_catalog: Path) -> None:  # noqa: F811
    assert resolve_profile(str(sample_catalog), L8_COLLECTION_ID).name == "sample-landsat-8"


def test_resolve_by_explicit_name_wins_over_the_url() -> None:
    chosen = resolve_profile(EARTH_SEARCH, "sentinel-2-l2a", "planetary-computer-sentinel-2-l2a")
    assert chosen.name == "planetary-computer-sentinel-2-l2a"


def test_an_explicit_name_reads_its_own_collection_and_items_without_one() -> None:
    """In a search of several collections, --profile picks the profile of its own collection (one with
    several profiles, on a URL none of them names) and the others are resolved as without it; items
    that name no collection (a static catalog's) use it too. A name for a collection the request does
    not search is refused by the request check (tests/test_request.py)."""
    mirror = "https://stac.mirror.example/v1"
    assert resolve_profile(mirror, "sentinel-2-l2a", "earth-search-sentinel-2-l2a").name == "earth-search-sentinel-2-l2a"
    local = "http://127.0.0.1:7822"
    assert resolve_profile(local, S2_COLLECTION_ID, "earth-search-sentinel-2-l2a").name == "sample-sentinel-2"
    with pytest.raises(RequestError, match="--profile: collection 'landsat-c2-l2' has several profiles"):
        resolve_profile(mirror, "landsat-c2-l2", "earth-search-sentinel-2-l2a")
    assert resolve_profile(mirror, "", "sample-sentinel-2").name == "sample-sentinel-2"
    with pytest.raises(RequestError, match="--profile: collection 'sentinel-2-l2a' has several profiles"):
        resolve_profile(mirror, "sentinel-2-l2a", "planetary-computer-naip")
    with pytest.raises(RequestError, match="--profile: items of .* name no collection; pass --profile NAME"):
        resolve_profile(mirror, "")


@pytest.mark.parametrize(
    "stac, collection, only",
    [
        (EARTH_SEARCH, "naip", "planetary-computer-naip"),  # S3 hrefs sent through PC signing
        (PLANETARY_COMPUTER, "landsat-c2-l2", "earth-search-landsat-c2-l2"),  # PC blobs read unsigned
        ("https://stac.mirror.example/v1/", "naip", "planetary-computer-naip"),
    ],
)
def test_the_only_profile_of_a_collection_is_not_used_for_another_web_host(stac: str, collection: str,
                                                                         only: str) -> None:
    """A collection id is shared by sources whose asset keys and signing differ. Its only profile was used
    for any URL, with an INFO line: Planetary Computer's landsat-c2-l2 got Earth Search's unsigned profile
    (every read failed), Earth Search's naip got Planetary Computer signing. (The shipped PC Landsat
    profile is left out here to show the rule; with it, the URL picks it.)"""
    known = {name: p for name, p in load_profiles().items() if name != "planetary-computer-landsat-c2-l2"}
    with pytest.raises(RequestError) as caught:
        resolve_profile(stac, collection, profiles=known)
    assert caught.value.field == "--profile"
    assert f"the only one for that collection, {only!r}, is made for " in caught.value.reason
    assert "Pass --profile NAME" in caught.value.reason
    for name, profile in known.items():
        assert f"{name}: {profile.collection}" in caught.value.reason
    assert resolve_profile(stac, collection, only, profiles=known).name == only  # naming it still works


@pytest.mark.parametrize("stac", ["http://127.0.0.1:7822", "http://localhost:7822/", "http://[::1]:7822",
                                  "/data/stac/catalog.json", "file:///data/stac/catalog.json",
                                  "HTTPS://PlanetaryComputer.Microsoft.com/api/stac/v2"])
def test_the_only_profile_of_a_collection_is_used_for_local_catalogs_loopback_and_its_own_host(stac: str) -> None:
    assert resolve_profile(stac, "naip").name == "planetary-computer-naip"


def test_a_profile_that_names_no_web_host_is_used_for_any_url() -> None:
    # the sample profiles name only "sample" and */sample-catalog/*: a copy served anywhere is still read
    assert resolve_profile("https://stac.example.com/v1", S2_COLLECTION_ID).name == "sample-sentinel-2"


def test_an_unknown_profile_name_lists_the_known_ones() -> None:
    with pytest.raises(RequestError, match="unknown profile 'nope'") as caught:
        resolve_profile(EARTH_SEARCH, "sentinel-2-l2a", "nope")
    assert caught.value.field == "--profile"
    for name in EXPECTED_PROFILES:
        assert name in caught.value.reason


def test_an_unknown_collection_lists_the_known_ones() -> None:
    with pytest.raises(RequestError) as caught:
        resolve_profile(EARTH_SEARCH, "sentinel-1-grd")
    assert caught.value.field == "--collections"
    assert "sentinel-1-grd" in caught.value.reason and "--profile" in caught.value.reason
    for name, collection in EXPECTED_PROFILES.items():
        assert f"{name}: {collection}" in caught.value.reason


def test_an_ambiguous_collection_asks_for_a_profile() -> None:
    with pytest.raises(
        RequestError, match="earth-search-sentinel-2-l2a, planetary-computer-sentinel-2-l2a"
    ) as caught:
        resolve_profile("https://stac.example.com/v1", "sentinel-2-l2a")
    assert caught.value.field == "--profile"


# --------------------------------------------------------------------------------------------- scaling


def test_item_raster_bands_override_the_profile_defaults() -> None:
    profile = resolve_profile(EARTH_SEARCH, "sentinel-2-l2a")
    item = make_item({"raster:bands": [{"scale": 0.0002, "offset": 0.05, "nodata": 65535}]})
    scaling = band_scaling(profile, item, BandRef("red", 1))
    assert (scaling.scale, scaling.offset, scaling.nodata, scaling.from_item) == (0.0002, 0.05, 65535.0, True)


def test_stac_1_1_bands_are_read_too() -> None:
    profile = resolve_profile(EARTH_SEARCH, "sentinel-2-l2a")
    item = make_item({"bands": [{"raster:scale": 0.0003, "raster:offset": 0.0, "nodata": "nan"}]})
    scaling = band_scaling(profile, item, BandRef("red", 1))
    assert (scaling.scale, scaling.offset) == (0.0003, 0.0)
    assert scaling.nodata is not None and np.isnan(scaling.nodata)


def test_stac_1_1_asset_level_scale_and_offset_are_read_after_the_bands() -> None:
    """Raster extension v2 puts values every band shares on the asset (``raster:scale``/``raster:offset``
    beside ``nodata``): they were ignored and the profile's defaults stretched the chips. A band's own
    entry still wins over them, and they win over the profile (its baseline rule too)."""
    profile = resolve_profile(EARTH_SEARCH, "sentinel-2-l2a")
    shared = {"raster:scale": 0.0002, "raster:offset": 0.05, "nodata": 0}
    item = make_item(shared, {"s2:processing_baseline": "03.01"})
    scaling = band_scaling(profile, item, BandRef("red", 1))
    assert (scaling.scale, scaling.offset, scaling.nodata, scaling.from_item) == (0.0002, 0.05, 0.0, True)
    per_band = make_item({**shared, "bands": [{"raster:scale": 0.0003}], "raster:bands": [{"offset": -0.2}]})
    scaling = band_scaling(profile, per_band, BandRef("red", 1))
    assert (scaling.scale, scaling.offset) == (0.0003, -0.2)


def test_what_the_item_does_not_say_comes_from_the_profile() -> None:
    profile = resolve_profile(EARTH_SEARCH, "sentinel-2-l2a")
    only_scale = make_item({"raster:bands": [{"scale": 0.0001}]}, {"s2:processing_baseline": "05.10"})
    scaling = band_scaling(profile, only_scale, BandRef("red", 1))
    assert (scaling.scale, scaling.offset, scaling.nodata) == (0.0001, -0.1, 0.0)
    silent = make_item({}, {})
    scaling = band_scaling(profile, silent, BandRef("red", 1))
    assert (scaling.scale, scaling.offset, scaling.nodata, scaling.from_item) == (1e-4, -0.1, 0.0, False)


@pytest.mark.parametrize(
    "baseline, offset", [("02.14", 0.0), ("03.01", 0.0), ("04.00", -0.1), ("05.10", -0.1)]
)
def test_sentinel_2_offset_follows_the_processing_baseline(baseline: str, offset: float) -> None:
    profile = resolve_profile(PLANETARY_COMPUTER, "sentinel-2-l2a")
    item = make_item({}, {"s2:processing_baseline": baseline}, key="B04")
    assert band_scaling(profile, item, BandRef("B04", 1)).offset == offset


def test_an_item_offset_beats_the_baseline_rule() -> None:
    profile = resolve_profile(EARTH_SEARCH, "sentinel-2-l2a")
    item = make_item({"raster:bands": [{"offset": -0.1}]}, {"s2:processing_baseline": "03.01"})
    assert band_scaling(profile, item, BandRef("red", 1)).offset == -0.1


def test_a_missing_asset_names_the_profile_and_the_assets() -> None:
    profile = resolve_profile(EARTH_SEARCH, "sentinel-2-l2a")
    with pytest.raises(RequestError, match=r"--profile: item 'item-1' has no asset 'red'.*\['B04'\]"):
        band_scaling(profile, make_item({}, key="B04"), BandRef("red", 1))


@pytest.mark.parametrize(
    "item_id, collection", [(S2_ITEM_ID, S2_COLLECTION_ID), (L8_ITEM_ID, L8_COLLECTION_ID)]
)
def test_sample_profiles_give_a_sensible_picture(
    sample_catalog: Path,  # noqa: F811
    item_id: str,
    collection: str,
) -> None:
    """The sample profiles' bands exist in the sample items, and their stretch neither crushes nor
    saturates the scene: most pixels land inside the 0..255 range, spread over it."""
    items = {f["id"]: f for f in json.loads((sample_catalog.parent / "items.json").read_text())["features"]}
    item = items[item_id]
    profile = resolve_profile("sample", collection)
    low, high = profile.stretch
    channels = []
    for ref in profile.rgb:
        scaling = band_scaling(profile, item, ref)
        assert scaling.from_item
        with rasterio.open(item["assets"][ref.asset]["href"]) as ds:
            dn = ds.read(ref.band, out_shape=(ds.height // 4, ds.width // 4), resampling=Resampling.nearest)
        physical = dn.astype("float64") * scaling.scale + scaling.offset
        channels.append(np.clip((physical - low) / (high - low) * 255.0, 0, 255))
    picture = np.stack(channels)
    assert (picture == 0).mean() < 0.02, "too dark: the stretch starts above most of the scene"
    assert (picture == 255).mean() < 0.10, "too bright: the stretch saturates the scene"
    p2, p98 = np.percentile(picture, [2, 98])
    assert p98 - p2 > 60, "the stretch leaves the picture flat"


# --------------------------------------------------------------------------------------------- signing


def test_public_profiles_do_not_sign() -> None:
    profile = resolve_profile(EARTH_SEARCH, "sentinel-2-l2a")
    assert sign_href("https://bucket/x.tif", profile) == "https://bucket/x.tif"


def test_signing_without_the_package_gives_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "planetary_computer", None)  # import raises ImportError
    profile = resolve_profile(PLANETARY_COMPUTER, "naip")
    with pytest.raises(RequestError, match=r"--profile: .*pip install 'planetary-computer"):
        sign_href("https://naipeuwest.blob.core.windows.net/naip/x.tif", profile)


def test_signing_uses_planetary_computer_sign(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("planetary_computer")
    fake.sign = lambda href: f"{href}?sig=token"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "planetary_computer", fake)
    profile = resolve_profile(PLANETARY_COMPUTER, "sentinel-2-l2a")
    assert (
        sign_href("https://x.blob.core.windows.net/a.tif", profile)
        == "https://x.blob.core.windows.net/a.tif?sig=token"
    )


def test_signing_failures_are_source_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(href: str) -> str:
        raise ConnectionError("token service unreachable")

    fake = types.ModuleType("planetary_computer")
    fake.sign = broken  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "planetary_computer", fake)
    profile = resolve_profile(PLANETARY_COMPUTER, "sentinel-2-l2a")
    with pytest.raises(SourceError, match=r"could not sign https://x/a\.tif"):
        sign_href("https://x/a.tif", profile)


def test_profiles_are_frozen() -> None:
    profile = load_profiles()["sample-sentinel-2"]
    assert isinstance(profile, SourceProfile)
    with pytest.raises(AttributeError):
        profile.scale = 2.0  # type: ignore[misc]
