"""Which asset hrefs a catalog may make rsflow read: a catalog is input from the outside.

A remote STAC API chooses the hrefs rsflow opens. Left unchecked, a hostile or broken one could point
the readers at this machine's files (``file:///etc/...``, ``/home/...``, ``../../``) or at services
only this machine can reach: the cloud metadata endpoint (``169.254.169.254``, ``fd00:ec2::254``,
``metadata.google.internal``), loopback and private addresses. The rule, per asset:

- a **local catalog** (a folder, file, stac-geoparquet, ``sample``) is the user's own: every href
  is read, local paths included;
- a STAC API on a **loopback address** (``127.0.0.1``, ``localhost``, ``::1``) is a catalog on this
  machine, run by its user, and is treated as local;
- any other catalog is **remote**: its hrefs must be ``http``, ``https`` or object-store URLs
  (``s3``, ``gs``/``gcs``, ``az``/``abfs``/``abfss``) whose path has no ``..`` segment and whose host is
  not loopback, link-local, private, unspecified, multicast or reserved (a host name is resolved
  once and all its addresses are checked), unless the host is listed with ``--allow-host``.

A refused href fails its item with the reason (recorded as a failed row, never dropped).

Signed hrefs carry their credentials in the query string (Azure SAS ``sig``, S3 presigned
``X-Amz-Signature``, Google ``X-Goog-Signature``, ``token``...), and GDAL's error messages quote the
URL they failed on. :func:`redact` takes the credentials out of any text (error rows, log lines,
manifests) and keeps the path, so a message still names the asset.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

from rsflow.errors import RequestError

REMOTE_SCHEMES: frozenset[str] = frozenset({"http", "https", "s3", "gs", "gcs", "az", "abfs", "abfss"})
"""Schemes a remote catalog's hrefs may use."""
OBJECT_STORE_SCHEMES: frozenset[str] = frozenset({"s3", "gs", "gcs", "az", "abfs", "abfss"})
"""Schemes whose "host" is a bucket or container name, resolved by the storage client, not by DNS."""
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal"})


class HrefRefused(ValueError):
    """An asset href the policy does not let rsflow read (the message is the reason)."""


@dataclass(frozen=True)
class HrefPolicy:
    """What a catalog's hrefs may point at (see the module docstring)."""

    local_catalog: bool
    """The catalog is the user's own (local path, or an API on loopback): every href is read."""
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    """Hosts (lower case, without port) whose hrefs are read even where the rules would refuse them."""

    @classmethod
    def for_catalog(cls, stac: str, allowed_hosts: Iterable[str] = ()) -> HrefPolicy:
        """The policy for a ``--stac`` value and the ``--allow-host`` list."""
        hosts = frozenset(h.strip().lower().strip("[]") for h in allowed_hosts if h.strip())
        if not stac.startswith(("http://", "https://")):
            return cls(local_catalog=True, allowed_hosts=hosts)
        host = (urlparse(stac).hostname or "").lower()
        return cls(local_catalog=is_loopback_name(host), allowed_hosts=hosts)

    def check(self, href: str) -> None:
        """Raise :class:`HrefRefused` with the reason when ``href`` may not be read."""
        if self.local_catalog:
            return
        parsed = urlparse(href)
        scheme = parsed.scheme.lower()
        if scheme in ("", "file") or (len(scheme) == 1 and href[1:3] in (":\\", ":/")):  # C:\ is a path
            raise HrefRefused(f"a local path ({_short(href)}) from a remote catalog; local hrefs are read "
                              "only from local catalogs")
        if scheme not in REMOTE_SCHEMES:
            raise HrefRefused(f"scheme {scheme!r} is not allowed ({', '.join(sorted(REMOTE_SCHEMES))})")
        segments = unquote(unquote(parsed.path)).replace("\\", "/").split("/")
        if ".." in segments:
            raise HrefRefused(f"'..' in the path of {_short(href)}")
        host = (parsed.hostname or "").lower()
        if not host:
            raise HrefRefused(f"no host in {_short(href)}")
        if host in self.allowed_hosts or scheme in OBJECT_STORE_SCHEMES:
            return
        if host in _METADATA_HOSTS:
            raise HrefRefused(f"host {host} is a cloud metadata service")
        for address in _addresses(host):
            reason = _private_reason(address)
            if reason:
                shown = host if host == str(address) else f"{host} ({address})"
                raise HrefRefused(f"host {shown} is {reason}; pass --allow-host {host} to read it anyway")


def _short(href: str, limit: int = 120) -> str:
    return href if len(href) <= limit else href[: limit - 3] + "..."


def is_loopback_name(host: str) -> bool:
    """``localhost`` (or a name under it) or a loopback address."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _private_reason(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "a loopback address (this machine)"
    if address.is_link_local:
        return "a link-local address (cloud metadata services live there)"
    if address.is_unspecified:
        return "the unspecified address (this machine)"
    if address.is_private:
        return "a private-network address"
    if address.is_multicast or address.is_reserved:
        return "a reserved or multicast address"
    return None


@functools.lru_cache(maxsize=1024)
def _addresses(host: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """The host as an IP literal, or every address it resolves to (none when it does not resolve:
    the read then fails on its own and is recorded)."""
    if host == "localhost" or host.endswith(".localhost"):
        return (ipaddress.ip_address("127.0.0.1"),)
    try:
        return (ipaddress.ip_address(host),)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return ()
    out = []
    for info in infos:
        try:
            out.append(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
        except ValueError:
            continue
    return tuple(dict.fromkeys(out))


def parse_allowed_hosts(values: Iterable[str]) -> tuple[str, ...]:
    """``--allow-host`` values (a host name or IP, no scheme, port or path) -> lower-case hosts.

    Raises:
        RequestError: (``--allow-host``) a value with a scheme, path, port or spaces, or empty.
    """
    out = []
    for value in values:
        host = value.strip().lower()
        bare = host.strip("[]")
        if not bare or any(c in host for c in "/ @?#") or (":" in bare and not _is_ip(bare)):
            raise RequestError("--allow-host", f"give a bare host name or IP address, got {value!r}")
        out.append(bare)
    return tuple(dict.fromkeys(out))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------- redact

REDACTED = "REDACTED"
"""What :func:`redact` writes in place of a credential."""

CREDENTIAL_PARAMS: frozenset[str] = frozenset(
    name.lower()
    for name in (
        # Azure SAS
        "sig", "se", "sv", "sp", "skoid", "sktid", "skt", "ske", "sks", "skv", "st", "spr", "srt", "ss",
        # S3 presigned (V4 and V2)
        "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token",
        "Signature", "AWSAccessKeyId", "Expires",
        # Google Cloud Storage signed URLs
        "X-Goog-Signature", "X-Goog-Credential", "GoogleAccessId",
        # bearer tokens and API keys in queries
        "token", "access_token", "key", "signature", "api_key", "apikey", "password",
    )
)
"""Query parameters (case-insensitive) whose values :func:`redact` removes wherever they appear, even
outside a recognisable URL (GDAL quotes ``B04.tif?se=...&sig=...`` without the scheme)."""

# A URL (scheme://...) or a GDAL virtual path (/vsicurl/..., /vsis3/...) up to a space, quote or bracket.
_URL = re.compile(r"""(?:\b[A-Za-z][A-Za-z0-9+.-]*://|/vsi[a-z0-9_]+[/?])[^\s'"<>`]*""")
# user:password@ in a URL's authority.
_USERINFO = re.compile(r"(?P<pre>://[^/?#\s:@]*):[^/?#\s@]+@")
# A query string after any path-like word: "?name=value..." (a bare "image?" is not a query).
_QUERY = re.compile(r"""(?<=[^\s?])\?(?P<query>[A-Za-z0-9_.~%+-]+=[^\s'"<>`#]*)""")
# name=value of a known credential parameter anywhere in text.
_PARAM = re.compile(r"""(?<![A-Za-z0-9_.~%-])(?P<name>[A-Za-z0-9_-]+)=(?P<value>[^&;\s'"<>`,)\]]+)""")
_TRAILING = ".,;:)]}"


def redact(text: str) -> str:
    """``text`` with the credentials of the URLs in it replaced by ``REDACTED``; paths are kept.

    - every value in the query string (and fragment) of a URL or ``/vsi...`` path:
      ``https://host/B04.tif?se=2030&sig=abc`` -> ``https://host/B04.tif?se=REDACTED&sig=REDACTED``
      (a value-less query becomes ``?REDACTED``);
    - the password of ``user:password@host``;
    - every value in a query string after a path-like word without a scheme (``B04.tif?sig=abc``);
    - the value of a known credential parameter (:data:`CREDENTIAL_PARAMS`) anywhere, e.g. a
      ``&sig=abc`` left after a cut.

    Idempotent, and leaves text without URLs or credential parameters as it was.
    """
    if not text:
        return text
    text = _URL.sub(_redact_url_match, text)
    text = _QUERY.sub(_redact_query_match, text)
    return _PARAM.sub(
        lambda m: f"{m['name']}={REDACTED}" if m["name"].lower() in CREDENTIAL_PARAMS else m[0], text
    )


def _split_trailing(text: str) -> tuple[str, str]:
    """``"x?a=b)."`` -> ``("x?a=b", ").")``: punctuation that ends the sentence, not the URL (a ``)``
    is kept when it closes a ``(`` inside)."""
    end = len(text)
    while end and text[end - 1] in _TRAILING:
        if text[end - 1] == ")" and text[:end].count("(") >= text[:end].count(")"):
            break
        end -= 1
    return text[:end], text[end:]


def _redact_url_match(match: re.Match[str]) -> str:
    url, tail = _split_trailing(match[0])
    url = _USERINFO.sub(lambda m: f"{m['pre']}:{REDACTED}@", url)
    url, hash_, fragment = url.partition("#")
    path, question, query = url.partition("?")
    return path + (question + _redact_query(query)) + (hash_ + _redact_query(fragment)) + tail


def _redact_query_match(match: re.Match[str]) -> str:
    query, tail = _split_trailing(match["query"])
    return "?" + _redact_query(query) + tail


def _redact_query(query: str) -> str:
    """Each ``name=value`` -> ``name=REDACTED``; a part without ``=`` (an opaque token) -> ``REDACTED``."""
    if not query:
        return query
    out = []
    for part in re.split(r"([&;])", query):
        if part in ("&", ";") or not part:
            out.append(part)
        elif "=" in part:
            out.append(part.split("=", 1)[0] + "=" + REDACTED)
        else:
            out.append(REDACTED)
    return "".join(out)


class RedactingFilter(logging.Filter):
    """A logging filter that passes every record with :func:`redact` applied to its message and
    traceback (GDAL's messages, which rasterio logs, quote signed URLs whole)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def redact_logs(*prefixes: str) -> None:
    """Add a :class:`RedactingFilter` (once) to the loggers named ``prefix`` and to every logger
    under it that exists now (a logger's filters see only the records logged on it, not those of
    its children; loggers created later are not covered)."""
    names = [
        name for name in list(logging.Logger.manager.loggerDict)
        if any(name == p or name.startswith(p + ".") for p in prefixes)
    ]
    for name in dict.fromkeys([*prefixes, *names]):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())


__all__ = [
    "CREDENTIAL_PARAMS", "REDACTED", "REMOTE_SCHEMES", "HrefPolicy", "HrefRefused", "RedactingFilter",
    "parse_allowed_hosts", "redact", "redact_logs",
]
