"""The caller's address: the socket peer, or what trusted proxies say it was.

A proxy appends the address it received a request from to `X-Forwarded-For`, or adds
a `for=` element to `Forwarded`: which of the two is a setting, and the other header is
ignored, since a proxy passes the client's own copy of it through untouched. Reading
that list from the right, every entry up to and including the first untrusted address
was written by a proxy we trust; anything further left was written by the client and
may be forged. So the caller is the right-most address that is not a trusted proxy.
Headers from an untrusted peer are ignored entirely.

What is kept of that address beside the caller's records (the cafe-client-ip header) is
CAFE_CLIENT_IP, or the key's own `client_ip`: `full`, the address; `truncated`, the
network it is in, as an address (192.0.2.0, 2001:db8:1::); `hashed`, the fingerprint of
the secret, a colon, and the lowercase hex HMAC-SHA-256 of the address as GET /v1/ip shows
it, keyed with that secret (`1a2b3c4d:` and 64 hex digits); `off`, nothing. An address
the gateway cannot read stays `unknown`, but with `off`.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Sequence

from aiohttp import web

from gateway.config import IPNetwork, Settings, fingerprint
from gateway.http.responses import json_response
from gateway.http.state import SETTINGS
from gateway.keys.model import ApiKey

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The address of a caller on a Unix socket, which has none.
UNKNOWN = "unknown"

# One `for=` parameter of RFC 7239 Forwarded: a token or a quoted string.
_FORWARDED_FOR = re.compile(r'(?i)(?:^|[;,\s])for=("[^"]*"|[^;,\s]*)')


def client_ip(request: web.Request, settings: Settings) -> str:
    """The caller's IP address as text (IPv4-mapped IPv6 is shown as IPv4)."""
    # Given the settings whole, so no caller can pass the trusted proxies without the
    # one header they write.
    peer = _peer(request)
    if peer is None:
        return UNKNOWN
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
    header), in the key's mode or else the gateway's; None: not kept."""
    policy = settings.client_ip
    mode = key.client_ip or policy.mode
    if mode == "off":
        return None
    address = client_ip(request, settings)
    if mode == "full" or address == UNKNOWN:
        return address
    if mode == "truncated":
        return _truncated(address, policy.ipv4_prefix, policy.ipv6_prefix)
    secret = policy.hash_key
    if secret is None:
        # A key that asks for `hashed` without a secret set: the gateway refuses such a
        # keys file (KeyStore), so only a key made in code gets here. Nothing is kept,
        # rather than the address.
        return None
    return _hashed(address, secret.value)


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


# Kept as the addresses are, for the same few callers asking again.
@functools.lru_cache(maxsize=4096)
def _truncated(address: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The network of `address` (as `client_ip` gives it) to the prefix of its version,
    written as an address."""
    parsed = ipaddress.ip_address(address)
    prefix = ipv4_prefix if parsed.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network((parsed, prefix), strict=False).network_address)


# Keyed by the secret too: once it is rotated, every address is hashed anew, and the
# entries of the old secret are never served again, only pushed out.
@functools.lru_cache(maxsize=4096)
def _hashed(address: str, secret: bytes) -> str:
    """`address` (as `client_ip` gives it) hashed with `secret`: the secret's fingerprint,
    so consumers can tell which secret made it, a colon, and the HMAC-SHA-256 in hex."""
    digest = hmac.new(secret, address.encode("ascii"), hashlib.sha256).hexdigest()
    return f"{fingerprint(secret)}:{digest}"


def _is_trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(address in network for network in trusted)


async def get_ip(request: web.Request) -> web.Response:
    """GET /v1/ip: the caller's address as the gateway sees it."""
    return json_response({"ip": client_ip(request, request.app[SETTINGS])})
