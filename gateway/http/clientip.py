"""The caller's address: the socket peer, or what trusted proxies say it was.

A proxy appends the address it received a request from to `X-Forwarded-For`, or adds
a `for=` element to `Forwarded`: which of the two is a setting, and the other header is
ignored, since a proxy passes the client's own copy of it through untouched. Reading
that list from the right, every entry up to and including the first untrusted address
was written by a proxy we trust; anything further left was written by the client and
may be forged. So the caller is the right-most address that is not a trusted proxy.
Headers from an untrusted peer are ignored entirely.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Sequence

from aiohttp import web

from gateway.config import IPNetwork, Settings
from gateway.http.responses import json_response
from gateway.http.state import SETTINGS
from gateway.keys.model import ApiKey

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# One `for=` parameter of RFC 7239 Forwarded: a token or a quoted string.
_FORWARDED_FOR = re.compile(r'(?i)(?:^|[;,\s])for=("[^"]*"|[^;,\s]*)')


def client_ip(request: web.Request, settings: Settings) -> str:
    """The caller's IP address as text (IPv4-mapped IPv6 is shown as IPv4)."""
    # Given the settings whole, so no caller can pass the trusted proxies without the
    # one header they write.
    peer = _peer(request)
    if peer is None:
        return "unknown"
    trusted = settings.trusted_proxies
    if not _is_trusted(peer, trusted):
        return _text(peer)
    hops = _forwarded_chain(request, settings.forwarded_header)
    caller = peer
    for hop in reversed(hops):
        address = _parse(hop)
        if address is None:
            # A hop we cannot read: stop at the last address we could trust.
            break
        caller = address
        if not _is_trusted(address, trusted):
            break
    return _text(caller)


def kept_client_ip(request: web.Request, settings: Settings, key: ApiKey) -> str | None:
    """The caller's address as it is kept beside its records (the cafe-client-ip
    header); None: not kept."""
    return client_ip(request, settings)


def _peer(request: web.Request) -> IPAddress | None:
    peername = request.transport.get_extra_info("peername") if request.transport else None
    if not peername or not isinstance(peername, tuple):
        return None  # a Unix socket has no address
    return _parse(str(peername[0]))


def _forwarded_chain(request: web.Request, header: str) -> list[str]:
    """Addresses from `header` alone, in the order proxies added them."""
    lines = request.headers.getall(header, [])
    if header == "forwarded":
        return [
            match.group(1).strip('"') for line in lines for match in _FORWARDED_FOR.finditer(line)
        ]
    return [hop.strip() for line in lines for hop in line.split(",")]


# Every request asks for the same few peers and proxies again, and ipaddress parses and
# formats in pure Python: a few microseconds a request, saved by remembering them.
@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> IPAddress | None:
    """An address from a header hop: `1.2.3.4`, `1.2.3.4:80`, `[::1]:80`, `::1`, `fe80::1%eth0`."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    text = text.split("%", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


_text = functools.lru_cache(maxsize=4096)(str)


def _is_trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(address in network for network in trusted)


async def get_ip(request: web.Request) -> web.Response:
    """GET /v1/ip: the caller's address as the gateway sees it."""
    return json_response({"ip": client_ip(request, request.app[SETTINGS])})
