"""The caller's address: socket peer, trusted proxies, forged headers, IPv4 and IPv6."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from unittest import mock

import pytest
from aiohttp.test_utils import TestClient, make_mocked_request
from multidict import CIMultiDict

from gateway.app import create_app
from gateway.clientip import client_ip
from gateway.config import Settings
from gateway.sink import MemorySink
from tests.keys import KeyFile

AiohttpClient = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


def _ip(peer: str | None, headers: list[tuple[str, str]], trusted: tuple = PROXIES) -> str:  # type: ignore[type-arg]
    transport = mock.Mock()
    transport.get_extra_info.return_value = (peer, 4711) if peer else None
    request = make_mocked_request(
        "GET", "/v1/ip", headers=CIMultiDict(headers), transport=transport
    )
    return client_ip(request, trusted)


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        # No proxy trusted or involved: the peer, whatever the headers say.
        ("203.0.113.9", [], "203.0.113.9"),
        ("203.0.113.9", [("X-Forwarded-For", "1.2.3.4")], "203.0.113.9"),
        ("203.0.113.9", [("Forwarded", "for=1.2.3.4")], "203.0.113.9"),
        ("2001:db8::9", [("X-Forwarded-For", "1.2.3.4")], "2001:db8::9"),
        ("::ffff:203.0.113.9", [], "203.0.113.9"),
        # A trusted proxy: the right-most untrusted hop.
        ("10.0.0.2", [("X-Forwarded-For", "198.51.100.7")], "198.51.100.7"),
        ("10.0.0.2", [("X-Forwarded-For", "6.6.6.6, 198.51.100.7")], "198.51.100.7"),
        ("10.0.0.2", [("X-Forwarded-For", "6.6.6.6, 198.51.100.7, 10.1.1.1")], "198.51.100.7"),
        ("10.0.0.2", [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "198.51.100.7")],
         "198.51.100.7"),
        ("10.0.0.2", [("X-Forwarded-For", "2001:db8::1")], "2001:db8::1"),
        ("10.0.0.2", [("X-Forwarded-For", "[2001:db8::1]:443")], "2001:db8::1"),
        ("10.0.0.2", [("X-Forwarded-For", "198.51.100.7:5000")], "198.51.100.7"),
        ("fd00::2", [("X-Forwarded-For", "198.51.100.7")], "198.51.100.7"),
        # Every hop trusted: the left-most, the nearest to the client we can see.
        ("10.0.0.2", [("X-Forwarded-For", "10.9.9.9, 10.1.1.1")], "10.9.9.9"),
        # An unreadable hop ends the walk at the last address we could read.
        ("10.0.0.2", [("X-Forwarded-For", "198.51.100.7, garbage")], "10.0.0.2"),
        ("10.0.0.2", [("X-Forwarded-For", "garbage, 10.1.1.1")], "10.1.1.1"),
        # No header from a trusted proxy: the proxy itself.
        ("10.0.0.2", [], "10.0.0.2"),
        # RFC 7239 Forwarded, used when X-Forwarded-For is absent.
        ("10.0.0.2", [("Forwarded", "for=198.51.100.7;proto=https")], "198.51.100.7"),
        ("10.0.0.2", [("Forwarded", 'for="[2001:db8::1]:4711"')], "2001:db8::1"),
        ("10.0.0.2", [("Forwarded", "for=6.6.6.6, for=198.51.100.7;by=10.0.0.2")],
         "198.51.100.7"),
        ("10.0.0.2", [("Forwarded", "For=198.51.100.7")], "198.51.100.7"),
        ("10.0.0.2", [("Forwarded", "for=_hidden")], "10.0.0.2"),
        # No peer address at all (a Unix socket).
        (None, [("X-Forwarded-For", "1.2.3.4")], "unknown"),
    ],
)  # fmt: skip
def test_client_ip(peer: str | None, headers: list[tuple[str, str]], expected: str) -> None:
    assert _ip(peer, headers) == expected


def test_with_no_trusted_proxies_headers_never_count() -> None:
    assert _ip("10.0.0.2", [("X-Forwarded-For", "198.51.100.7")], trusted=()) == "10.0.0.2"


@pytest.mark.parametrize(("host", "expected"), [("127.0.0.1", "127.0.0.1"), ("::1", "::1")])
async def test_get_ip_over_a_real_socket(
    aiohttp_client: AiohttpClient, key_file: KeyFile, host: str, expected: str
) -> None:
    app = create_app(Settings(keys_file=key_file.path), sink=MemorySink())
    client = await aiohttp_client(app, server_kwargs={"host": host})
    headers = {"x-api-key": key_file.key}
    # The peer is not trusted, so a forged header changes nothing.
    resp = await client.get("/v1/ip", headers={**headers, "X-Forwarded-For": "6.6.6.6"})
    assert resp.status == 200
    assert await resp.json() == {"ip": expected}


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_get_ip_behind_a_trusted_proxy(
    aiohttp_client: AiohttpClient, key_file: KeyFile, host: str
) -> None:
    loopback = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    settings = Settings(keys_file=key_file.path, trusted_proxies=loopback)
    client = await aiohttp_client(
        create_app(settings, sink=MemorySink()), server_kwargs={"host": host}
    )
    headers = {"x-api-key": key_file.key}
    resp = await client.get(
        "/v1/ip", headers={**headers, "X-Forwarded-For": "6.6.6.6, 2001:db8::5"}
    )
    assert await resp.json() == {"ip": "2001:db8::5"}
    resp = await client.get("/v1/ip", headers={**headers, "Forwarded": "for=198.51.100.7"})
    assert await resp.json() == {"ip": "198.51.100.7"}


async def test_get_ip_needs_a_key(aiohttp_client: AiohttpClient, key_file: KeyFile) -> None:
    client = await aiohttp_client(create_app(Settings(keys_file=key_file.path), sink=MemorySink()))
    resp = await client.get("/v1/ip")
    assert resp.status == 401
