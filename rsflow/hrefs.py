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
"""

from __future__ import annotations

import functools
import ipaddress
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
        return cls(local_catalog=_is_loopback_name(host), allowed_hosts=hosts)

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


def _is_loopback_name(host: str) -> bool:
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


__all__ = ["REMOTE_SCHEMES", "HrefPolicy", "HrefRefused", "parse_allowed_hosts"]
