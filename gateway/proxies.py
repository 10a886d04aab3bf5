"""Who is calling, and which URL they called, behind reverse proxies we trust.

``server.trusted_proxies`` lists addresses or CIDRs (default empty). ``X-Forwarded-For``,
``X-Forwarded-Proto`` and ``X-Forwarded-Host`` are read only when the socket's peer is one of
them; from anyone else they are ignored, so a client cannot choose its own address or the URL
a signature is checked against. Malformed values never raise: they count as absent.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:  # imported by the configuration check, which never loads the web stack
    from aiohttp import web

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

# host[:port]: a DNS name (underscores tolerated), an IPv4 address, or an [IPv6] literal.
_HOST = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\])(?::(\d{1,5}))?")


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """``entries`` (addresses or CIDRs) as networks; ValueError names the first bad one."""
    networks: list[Network] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or CIDR") from None
    return tuple(networks)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "192.0.2.1:443"
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket's ::ffff:192.0.2.1 is 192.0.2.1
    return address


def is_trusted(address: str | None, trusted: Collection[Network]) -> bool:
    """Whether ``address`` (an IP, maybe with a port) lies in one of ``trusted``."""
    if not address or not trusted:
        return False
    parsed = _address(address)
    return parsed is not None and any(parsed in network for network in trusted)


def peer_is_trusted(request: web.Request, trusted: Collection[Network]) -> bool:
    """Whether the socket's peer is one of our reverse proxies."""
    return is_trusted(request.remote, trusted)


def client_address(request: web.Request, trusted: Collection[Network]) -> str:
    """The client's address: the socket's peer; when the peer is a trusted proxy, the nearest
    untrusted hop of ``X-Forwarded-For`` (read right to left: each trusted proxy appends the
    address it saw, and everything left of the first untrusted hop is the client's say).
    "" when unknown (a Unix socket)."""
    peer = request.remote or ""
    if not peer_is_trusted(request, trusted):
        return peer
    hops = [hop.strip() for value in request.headers.getall("X-Forwarded-For", ()) for hop in value.split(",")]
    hops = [hop for hop in hops if hop]
    for hop in reversed(hops):
        if not is_trusted(hop, trusted):
            address = _address(hop)
            return str(address) if address is not None else hop[:64]
    return str(_address(hops[0]) or peer) if hops else peer


def valid_host(host: str) -> bool:
    """Whether ``host`` is a usable ``host[:port]`` (port 1-65535) for a URL."""
    match = _HOST.fullmatch(host)
    if match is None:
        return False
    port = match.group(1)
    return port is None or 0 < int(port) <= 65535


def public_url(request: web.Request, configured: str | None, trusted: Collection[Network]) -> str:
    """The URL the platform called (Twilio signs it): ``server.public_url`` + path + query;
    without it, the socket's scheme and the ``Host`` header, or ``X-Forwarded-Proto`` /
    ``X-Forwarded-Host`` when the peer is a trusted proxy. "" when the host is malformed (a
    signature over it can then only fail)."""
    path_qs = request.raw_path  # path and query string, as sent (not re-encoded)
    if configured:
        return configured + path_qs
    scheme = request.scheme
    host = request.headers.get("Host", "")
    if peer_is_trusted(request, trusted):
        forwarded_proto = _first(request.headers.get("X-Forwarded-Proto")).lower()
        if forwarded_proto in ("http", "https"):
            scheme = forwarded_proto
        host = _first(request.headers.get("X-Forwarded-Host")) or host
    if not valid_host(host):
        return ""
    return f"{scheme}://{host}{path_qs}"


def _first(value: str | None) -> str:
    return value.split(",")[0].strip() if value else ""
