"""Source profiles: how to turn the items of one (STAC source, collection) into an RGB picture.

A profile is a YAML file in ``catalogs/profiles/`` (installed as ``rsflow/_catalogs/profiles/`` in a wheel).
It names the three assets/bands that make red, green and blue, how stored values become physical values
(``scale``/``offset``/``nodata``, used only where the item's own ``raster:bands`` are silent), the physical
range stretched to 0..255, and whether hrefs must be signed (Planetary Computer) before reading.

Profiles are looked up by explicit name, else by the source URL (``url_patterns``) and collection id, else
by a collection id that only one profile claims, unless that profile is made for another web host than the
``--stac`` URL's. See ``catalogs/README.md`` for the YAML schema.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast
from urllib.parse import urlsplit

import yaml

from rsflow.errors import RequestError, SourceError
from rsflow.hrefs import is_loopback_name, redact
from rsflow.yamlio import load_yaml

logger = logging.getLogger(__name__)

__all__ = [
    "BandRef",
    "BandScaling",
    "OffsetRule",
    "SourceProfile",
    "band_scaling",
    "catalogs_dir",
    "check_signing",
    "load_profiles",
    "profiles_dir",
    "resolve_profile",
    "sign_href",
]

Signing = Literal["planetary-computer"]
_SIGNING_CHOICES: tuple[str, ...] = ("planetary-computer",)
_PC_INSTALL = "pip install 'planetary-computer>=1.0' (or pip install -e '.[planetary-computer]' in the rsflow checkout)"


class BandRef(NamedTuple):
    """One band of one asset: ``(asset key, 1-based band index)``."""

    asset: str
    """Asset key in the STAC item, e.g. ``"red"`` or ``"B04"``."""
    band: int
    """1-based band index inside that asset's file (rasterio's convention)."""


@dataclass(frozen=True)
class OffsetRule:
    """A default offset that applies to older products, chosen by an item property.

    Sentinel-2 processing baseline 04.00 (January 2022) added a -1000 DN offset: newer L2A products need
    ``offset = -0.1`` after ``scale = 1e-4``, older ones ``0``. Used only when the item's ``raster:bands``
    do not state an offset.
    """

    property: str
    """Item property compared, e.g. ``"s2:processing_baseline"``."""
    below: str
    """Dotted version; the rule applies when the property's value is lower, e.g. ``"04.00"``."""
    offset: float
    """Offset (physical units) used for those items instead of the profile's ``offset``."""


@dataclass(frozen=True)
class SourceProfile:
    """How to make an RGB picture from the items of one collection of one STAC source."""

    name: str
    """Profile name, equal to the YAML file's stem, e.g. ``"earth-search-sentinel-2-l2a"``."""
    collection: str
    """STAC collection id the profile reads."""
    rgb: tuple[BandRef, BandRef, BandRef]
    """Red, green and blue bands, as (asset key, 1-based band index)."""
    nodata: float | None
    """Stored value marking missing pixels, when the item's ``raster:bands`` does not give one; None: none."""
    scale: float
    """Default multiplier from stored value to physical value (the item's ``raster:bands`` scale wins)."""
    offset: float
    """Default offset added after ``scale``, in physical units (the item's ``raster:bands`` offset wins)."""
    stretch: tuple[float, float]
    """Physical-value range (low, high) mapped linearly onto 0..255; values outside are clipped."""
    quantity: str = ""
    """What the physical values are, e.g. ``"surface reflectance (unitless)"``; documents ``stretch``."""
    signing: Signing | None = None
    """``"planetary-computer"``: hrefs must be signed at read time with :func:`sign_href`; None: public."""
    url_patterns: tuple[str, ...] = ()
    """Shell-style patterns (``fnmatch``) matched against the ``--stac`` value, e.g. ``"https://host/v1*"``."""
    offset_rules: tuple[OffsetRule, ...] = ()
    """Per-item exceptions to ``offset`` (first matching rule wins)."""
    description: str = ""
    """One line about the source and collection."""

    def __post_init__(self) -> None:
        where = f"profile {self.name!r}"
        if len(self.rgb) != 3:
            raise RequestError(
                f"{where}: rgb", f"needs exactly 3 bands (red, green, blue), got {len(self.rgb)}"
            )
        for ref in self.rgb:
            if not ref.asset or ref.band < 1:
                raise RequestError(
                    f"{where}: rgb", f"{tuple(ref)} must be (non-empty asset key, band index >= 1)"
                )
        low, high = self.stretch
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise RequestError(f"{where}: stretch", f"needs finite low < high, got [{low}, {high}]")
        if not math.isfinite(self.scale) or self.scale == 0:
            raise RequestError(f"{where}: scale", f"needs a finite, non-zero number, got {self.scale}")
        if not math.isfinite(self.offset):
            raise RequestError(f"{where}: offset", f"needs a finite number, got {self.offset}")
        if self.signing is not None and self.signing not in _SIGNING_CHOICES:
            raise RequestError(
                f"{where}: signing", f"must be one of {list(_SIGNING_CHOICES)} or null, got {self.signing!r}"
            )


@dataclass(frozen=True)
class BandScaling:
    """Scale, offset and nodata in effect for one band of one item."""

    scale: float
    """Multiplier from stored value to physical value."""
    offset: float
    """Added after ``scale``, physical units."""
    nodata: float | None
    """Stored value marking missing pixels; None: every value is data."""
    from_item: bool
    """True when at least one of the three came from the item's own metadata."""


# --------------------------------------------------------------------------------------------- files


def catalogs_dir() -> Path:
    """The ``catalogs`` folder: ``rsflow/_catalogs`` inside an installed wheel, else ``<repo>/catalogs``.

    Raises:
        RequestError: ``--profile`` when neither exists (a broken install).
    """
    package_dir = Path(__file__).resolve().parent
    candidates = (package_dir / "_catalogs", package_dir.parent / "catalogs")
    for candidate in candidates:
        if (candidate / "profiles").is_dir():
            return candidate
    raise RequestError(
        "--profile",
        f"no catalogs folder with profiles at {candidates[0]} or {candidates[1]}; reinstall rsflow",
    )


def profiles_dir() -> Path:
    """Folder of the profile YAML files (``catalogs_dir() / "profiles"``)."""
    return catalogs_dir() / "profiles"


_KNOWN_KEYS = frozenset(
    {
        "name",
        "collection",
        "description",
        "url_patterns",
        "rgb",
        "nodata",
        "scale",
        "offset",
        "offset_rules",
        "stretch",
        "quantity",
        "signing",
    }
)
_REQUIRED_KEYS = ("name", "collection", "rgb", "nodata", "scale", "offset", "stretch")


def load_profiles(directory: Path | str | None = None) -> dict[str, SourceProfile]:
    """Read every ``*.yaml`` profile of ``directory``.

    Args:
        directory: folder of profile files; default :func:`profiles_dir`.

    Returns:
        Profiles by name, sorted by name.

    Raises:
        RequestError: a file is not valid YAML, misses a key, has a wrong type, or two files share a name.
    """
    folder = Path(directory) if directory is not None else profiles_dir()
    profiles: dict[str, SourceProfile] = {}
    for path in sorted(folder.glob("*.yaml")):
        profile = _parse_profile_file(path)
        if profile.name in profiles:
            raise RequestError(
                f"profile file {path}", f"name {profile.name!r} is used by another profile file"
            )
        profiles[profile.name] = profile
    if not profiles:
        raise RequestError("--profile", f"no profile files (*.yaml) in {folder}")
    return dict(sorted(profiles.items()))


def _parse_profile_file(path: Path) -> SourceProfile:
    field = f"profile file {path}"
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise RequestError(field, f"is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise RequestError(field, "must be a YAML mapping of profile keys")
    missing = [key for key in _REQUIRED_KEYS if key not in raw]
    if missing:
        raise RequestError(field, f"misses the keys {missing}; see catalogs/README.md for the schema")
    unknown = sorted(set(raw) - _KNOWN_KEYS)
    if unknown:
        logger.warning("profile file %s: ignoring unknown keys %s (newer rsflow?)", path, unknown)
    if raw["name"] != path.stem:
        raise RequestError(f"{field}: name", f"{raw['name']!r} must equal the file name {path.stem!r}")

    def number(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RequestError(f"{field}: {key}", f"must be a number, got {value!r}")
        return float(value)

    rgb_raw = raw["rgb"]
    if not isinstance(rgb_raw, list) or len(rgb_raw) != 3:
        raise RequestError(
            f"{field}: rgb", "must be a list of 3 entries {asset: KEY, band: N} (red, green, blue)"
        )
    refs: list[BandRef] = []
    for entry in rgb_raw:
        if not isinstance(entry, dict) or not isinstance(entry.get("asset"), str):
            raise RequestError(f"{field}: rgb", f"entry {entry!r} must be {{asset: KEY, band: N}}")
        band = entry.get("band", 1)
        if isinstance(band, bool) or not isinstance(band, int):
            raise RequestError(f"{field}: rgb", f"band of {entry!r} must be a 1-based integer")
        refs.append(BandRef(entry["asset"], band))

    stretch_raw = raw["stretch"]
    if not isinstance(stretch_raw, list) or len(stretch_raw) != 2:
        raise RequestError(f"{field}: stretch", f"must be [low, high] in physical units, got {stretch_raw!r}")
    stretch = (number("stretch", stretch_raw[0]), number("stretch", stretch_raw[1]))

    nodata = None if raw["nodata"] is None else number("nodata", raw["nodata"])
    patterns = raw.get("url_patterns") or []
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise RequestError(f"{field}: url_patterns", "must be a list of strings")
    rules: list[OffsetRule] = []
    for rule in raw.get("offset_rules") or []:
        if not isinstance(rule, dict) or not {"property", "below", "offset"} <= set(rule):
            raise RequestError(
                f"{field}: offset_rules", f"entry {rule!r} must be {{property, below, offset}}"
            )
        rules.append(
            OffsetRule(str(rule["property"]), str(rule["below"]), number("offset_rules", rule["offset"]))
        )
    signing = raw.get("signing")
    if signing is not None and signing not in _SIGNING_CHOICES:
        raise RequestError(
            f"{field}: signing", f"must be one of {list(_SIGNING_CHOICES)} or null, got {signing!r}"
        )

    return SourceProfile(
        name=str(raw["name"]),
        collection=str(raw["collection"]),
        rgb=(refs[0], refs[1], refs[2]),
        nodata=nodata,
        scale=number("scale", raw["scale"]),
        offset=number("offset", raw["offset"]),
        stretch=stretch,
        quantity=str(raw.get("quantity") or ""),
        signing=cast(Signing | None, signing),
        url_patterns=tuple(patterns),
        offset_rules=tuple(rules),
        description=str(raw.get("description") or "").strip(),
    )


# --------------------------------------------------------------------------------------------- lookup


def resolve_profile(
    stac: str,
    collection: str,
    name: str | None = None,
    *,
    profiles: dict[str, SourceProfile] | None = None,
) -> SourceProfile:
    """Pick the profile for a STAC source and collection.

    Order: the profile called ``name`` (for its own collection, and for items without one); else the one
    whose ``url_patterns`` match ``stac`` and whose
    collection is ``collection``; else the only profile for ``collection`` (e.g. the sample collections
    served by a local test API), but not when ``stac`` is a web API on another host than the one its
    ``url_patterns`` name: a collection id is shared by sources whose asset keys and signing differ
    (Planetary Computer's ``landsat-c2-l2`` read with Earth Search's unsigned profile failed every read,
    Earth Search's ``naip`` was sent through Planetary Computer signing). Local catalogs and loopback
    APIs still get it.

    Args:
        stac: the ``--stac`` value (API URL, local catalog path, or ``"sample"``).
        collection: STAC collection id.
        name: explicit ``--profile`` name, or None.
        profiles: profiles to choose from; default :func:`load_profiles`.

    Returns:
        The profile.

    Raises:
        RequestError: ``--profile`` for an unknown name or a name made for another collection, when
            several profiles fit, or when the only one for the collection is made for another host;
            ``--collections`` when no profile reads the collection; each lists the known profiles.
    """
    known = profiles if profiles is not None else load_profiles()
    if name is not None:
        if name not in known:
            raise RequestError("--profile", f"unknown profile {name!r}; known profiles: {_describe(known)}")
        chosen = known[name]
        # The named profile reads its own collection, and items that name none (a static catalog's); the
        # other collections of a multi-collection search are resolved as without it.
        if chosen.collection == collection or not collection:
            return chosen

    if not collection:
        raise RequestError("--profile", f"items of {redact(stac)} name no collection; pass --profile NAME to say "
                                        f"how to read them ({_describe(known)})")
    for_collection = _for_collection(known, collection)
    by_url = [p for p in for_collection if _matches(stac, p.url_patterns)]
    if len(by_url) == 1:
        return by_url[0]
    if len(by_url) > 1:
        raise RequestError(
            "--profile",
            f"several profiles match {redact(stac)} and {collection!r}: {_describe_list(by_url)}; name one",
        )
    if len(for_collection) == 1:
        only = for_collection[0]
        hosts = _other_hosts(stac, only.url_patterns)
        if hosts:
            raise RequestError(
                "--profile",
                f"no profile is made for {redact(stac)} and collection {collection!r}: the only one for that "
                f"collection, {only.name!r}, is made for {', '.join(hosts)}, whose asset keys, scaling and "
                f"signing need not fit this source. Pass --profile NAME to choose one (known profiles: "
                f"{_describe(known)}), or add a profile YAML for this source under catalogs/profiles/",
            )
        logger.info(
            "no profile URL pattern matches %s; using %s, the only profile for %r",
            redact(stac),
            only.name,
            collection,
        )
        return only
    if for_collection:
        raise RequestError(
            "--profile",
            f"collection {collection!r} has several profiles and none matches {redact(stac)}: "
            f"{_describe_list(for_collection)}; pass --profile NAME",
        )
    raise RequestError(
        "--collections",
        f"no source profile for collection {collection!r}; known (profile: collection): "
        f"{_describe(known)}. Use one of these collections, or add a profile YAML under "
        "catalogs/profiles/ and pass --profile NAME",
    )


def _matches(stac: str, patterns: tuple[str, ...]) -> bool:
    candidates = {stac.strip(), stac.strip().rstrip("/")}
    if "://" not in stac and stac != "sample":
        candidates.add(str(Path(stac).expanduser().resolve()))
    return any(fnmatch.fnmatchcase(c, pattern) for c in candidates for pattern in patterns)


def _other_hosts(stac: str, patterns: tuple[str, ...]) -> list[str]:
    """The web hosts that ``patterns`` name, when ``stac`` is an http(s) URL on none of them and not on a
    loopback address; ``[]`` otherwise (a local catalog, ``sample``, a test API on 127.0.0.1, a profile
    that names no web host, or one that names this host)."""
    url = urlsplit(stac.strip())
    host = (url.hostname or "").lower()
    if url.scheme.lower() not in ("http", "https") or not host or is_loopback_name(host):
        return []
    named = []
    for pattern in patterns:
        parts = urlsplit(pattern)
        if parts.scheme.lower() in ("http", "https") and parts.hostname:
            named.append(parts.hostname.lower())
    if any(fnmatch.fnmatchcase(host, name) for name in named):
        return []
    return sorted(set(named))


def _for_collection(profiles: dict[str, SourceProfile], collection: str) -> list[SourceProfile]:
    return [p for p in profiles.values() if p.collection == collection]


def _describe(profiles: dict[str, SourceProfile]) -> str:
    return ", ".join(f"{n}: {p.collection}" for n, p in profiles.items())


def _describe_list(profiles: list[SourceProfile]) -> str:
    return ", ".join(p.name for p in profiles)


# --------------------------------------------------------------------------------------------- values


def band_scaling(profile: SourceProfile, item: dict[str, Any], ref: BandRef) -> BandScaling:
    """Scale, offset and nodata for one band of one item: the item's own metadata wins over the profile.

    Looks at the asset's ``raster:bands[band - 1]`` (``scale``/``offset``/``nodata``), then STAC 1.1
    ``bands[band - 1]`` (``raster:scale``/``raster:offset``/``nodata``), then the asset's own
    ``raster:scale``/``raster:offset``/``nodata`` (STAC 1.1 puts values all bands share there); what none
    of them states comes from the profile (``offset`` after its ``offset_rules``).

    Args:
        profile: the source profile.
        item: STAC item dict.
        ref: the band.

    Returns:
        The values in effect.

    Raises:
        RequestError: ``--profile`` when the item has no such asset.
    """
    assets = item.get("assets") or {}
    asset = assets.get(ref.asset)
    if not isinstance(asset, dict):
        raise RequestError(
            "--profile",
            f"item {item.get('id')!r} has no asset {ref.asset!r}, which profile {profile.name!r} reads; "
            f"its assets: {sorted(assets)}",
        )
    scale: float | None = None
    offset: float | None = None
    nodata: float | None = None
    nodata_given = False
    raster_band = _band_entry(asset.get("raster:bands"), ref.band)
    if raster_band is not None:
        scale = _as_float(raster_band.get("scale"))
        offset = _as_float(raster_band.get("offset"))
        if "nodata" in raster_band:
            nodata, nodata_given = _nodata(raster_band["nodata"]), True
    common_band = _band_entry(asset.get("bands"), ref.band)
    if common_band is not None:
        scale = scale if scale is not None else _as_float(common_band.get("raster:scale"))
        offset = offset if offset is not None else _as_float(common_band.get("raster:offset"))
        if not nodata_given and "nodata" in common_band:
            nodata, nodata_given = _nodata(common_band["nodata"]), True
    # Raster extension v2 (STAC 1.1) puts what every band shares on the asset itself.
    scale = scale if scale is not None else _as_float(asset.get("raster:scale"))
    offset = offset if offset is not None else _as_float(asset.get("raster:offset"))
    if not nodata_given and "nodata" in asset:
        nodata, nodata_given = _nodata(asset["nodata"]), True

    from_item = scale is not None or offset is not None or nodata_given
    if offset is None:
        offset = _default_offset(profile, item)
    return BandScaling(
        scale=scale if scale is not None else profile.scale,
        offset=offset,
        nodata=nodata if nodata_given else profile.nodata,
        from_item=from_item,
    )


def _band_entry(bands: Any, band: int) -> dict[str, Any] | None:
    if isinstance(bands, list) and 0 < band <= len(bands) and isinstance(bands[band - 1], dict):
        return cast(dict[str, Any], bands[band - 1])
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _nodata(value: Any) -> float | None:
    """STAC nodata may be a number or ``"nan"``/``"inf"``/``"-inf"``."""
    if isinstance(value, str):
        return float(value)
    return _as_float(value)


def _default_offset(profile: SourceProfile, item: dict[str, Any]) -> float:
    properties = item.get("properties") or {}
    for rule in profile.offset_rules:
        value = properties.get(rule.property)
        if value is not None and _version_key(str(value)) < _version_key(rule.below):
            return rule.offset
    return profile.offset


def _version_key(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.strip().split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


# --------------------------------------------------------------------------------------------- signing


def check_signing(profile: SourceProfile) -> None:
    """Fail before any work when the profile's signing scheme cannot be used here.

    Raises:
        RequestError: ``--profile`` when signing needs the ``planetary-computer`` package and it is missing.
    """
    if profile.signing == "planetary-computer" and importlib.util.find_spec("planetary_computer") is None:
        raise RequestError(
            "--profile",
            f"profile {profile.name!r} reads Planetary Computer data, whose hrefs must be signed with the "
            f"planetary-computer package: {_PC_INSTALL}",
        )


def sign_href(href: str, profile: SourceProfile | str | None) -> str:
    """Return ``href`` ready to read: signed for Planetary Computer profiles, unchanged otherwise.

    Call this right before opening the file, never at search time, and do not store the result:
    Planetary Computer SAS tokens expire.

    Args:
        href: the asset href from the item.
        profile: the item's source profile, or just its signing scheme (``"planetary-computer"``,
            or ``None``/``""`` for none) as tiles carry it.

    Returns:
        The href to open.

    Raises:
        RequestError: ``--profile`` when signing needs the ``planetary-computer`` package and it is missing.
        SourceError: the signing service could not be reached.
    """
    if isinstance(profile, SourceProfile):
        name, signing = profile.name, profile.signing
    else:
        name, signing = "", profile or None
    if signing is None:
        return href
    if signing not in _SIGNING_CHOICES:
        raise ValueError(f"unknown signing scheme {signing!r}")
    try:
        pc = importlib.import_module("planetary_computer")
    except ImportError as err:
        raise RequestError(
            "--profile",
            f"profile {name!r} reads Planetary Computer data, whose hrefs must be signed with the "
            f"planetary-computer package: {_PC_INSTALL}",
        ) from err
    try:
        signed = pc.sign(href)
    except Exception as err:  # requests errors, HTTP errors of the token service
        status = getattr(getattr(err, "response", None), "status_code", None)
        raise SourceError(
            f"could not sign {href} with planetary-computer: {err}", status_code=status
        ) from err
    return str(signed)
