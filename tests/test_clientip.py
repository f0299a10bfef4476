"""The caller's address: socket peer, trusted proxies, forged headers, IPv4 and IPv6."""

from __future__ import annotations

import ipaddress
import logging
from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from devkit.samples import curl_bodies
from gateway.config import Settings
from gateway.http.clientip import client_ip
from gateway.sink import MemorySink
from tests.support.app import GatewayClient, access_lines, gateway_settings
from tests.support.keys import KeyFile

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


def _ip(
    peer: str | None,
    headers: list[tuple[str, str]],
    trusted: tuple = PROXIES,  # type: ignore[type-arg]
    header: str = "x-forwarded-for",
) -> str:
    transport = mock.Mock()
    transport.get_extra_info.return_value = (peer, 4711) if peer else None
    request = make_mocked_request(
        "GET", "/v1/ip", headers=CIMultiDict(headers), transport=transport
    )
    return client_ip(request, Settings(trusted_proxies=trusted, forwarded_header=header))


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
        # Forwarded is not the header our proxies write: whatever is in it came from the
        # client, so it is ignored, alone or beside X-Forwarded-For.
        ("10.0.0.2", [("Forwarded", "for=6.6.6.6")], "10.0.0.2"),
        ("10.0.0.2", [("Forwarded", "for=6.6.6.6"), ("X-Forwarded-For", "198.51.100.7")],
         "198.51.100.7"),
        # No peer address at all (a Unix socket).
        (None, [("X-Forwarded-For", "1.2.3.4")], "unknown"),
    ],
)  # fmt: skip
def test_client_ip(peer: str | None, headers: list[tuple[str, str]], expected: str) -> None:
    assert _ip(peer, headers) == expected


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        # An untrusted peer: the peer, whatever the headers say.
        ("203.0.113.9", [("Forwarded", "for=1.2.3.4")], "203.0.113.9"),
        # RFC 7239 Forwarded from a trusted proxy: the right-most untrusted for=.
        ("10.0.0.2", [("Forwarded", "for=198.51.100.7;proto=https")], "198.51.100.7"),
        ("10.0.0.2", [("Forwarded", 'for="[2001:db8::1]:4711"')], "2001:db8::1"),
        ("10.0.0.2", [("Forwarded", "for=6.6.6.6, for=198.51.100.7;by=10.0.0.2")],
         "198.51.100.7"),
        ("10.0.0.2", [("Forwarded", "for=6.6.6.6"), ("Forwarded", "for=198.51.100.7")],
         "198.51.100.7"),
        ("10.0.0.2", [("Forwarded", "for=198.51.100.7, for=10.1.1.1")], "198.51.100.7"),
        ("10.0.0.2", [("Forwarded", "For=198.51.100.7")], "198.51.100.7"),
        ("10.0.0.2", [("Forwarded", "for=_hidden")], "10.0.0.2"),
        ("10.0.0.2", [], "10.0.0.2"),
        # X-Forwarded-For is not the header our proxies write: the client's own is passed
        # through untouched, so it is ignored, alone or beside Forwarded.
        ("10.0.0.2", [("X-Forwarded-For", "6.6.6.6")], "10.0.0.2"),
        ("10.0.0.2", [("X-Forwarded-For", "6.6.6.6"), ("Forwarded", "for=198.51.100.7")],
         "198.51.100.7"),
        ("10.0.0.2", [("Forwarded", "for=198.51.100.7"), ("X-Forwarded-For", "6.6.6.6")],
         "198.51.100.7"),
    ],
)  # fmt: skip
def test_client_ip_from_forwarded(
    peer: str | None, headers: list[tuple[str, str]], expected: str
) -> None:
    assert _ip(peer, headers, header="forwarded") == expected


def test_with_no_trusted_proxies_headers_never_count() -> None:
    assert _ip("10.0.0.2", [("X-Forwarded-For", "198.51.100.7")], trusted=()) == "10.0.0.2"


@pytest.mark.parametrize(("host", "expected"), [("127.0.0.1", "127.0.0.1"), ("::1", "::1")])
async def test_get_ip_over_a_real_socket(
    gateway_client: GatewayClient, key_file: KeyFile, host: str, expected: str
) -> None:
    settings = gateway_settings(keys_file=key_file.path)
    client = await gateway_client(settings, sink=MemorySink(), server_kwargs={"host": host})
    headers = {"x-api-key": key_file.key}
    # The peer is not trusted, so a forged header changes nothing.
    resp = await client.get("/v1/ip", headers={**headers, "X-Forwarded-For": "6.6.6.6"})
    assert resp.status == 200
    assert await resp.json() == {"ip": expected}


LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize(
    ("header", "written", "forged"),
    [
        ("x-forwarded-for", "X-Forwarded-For", "Forwarded"),
        ("forwarded", "Forwarded", "X-Forwarded-For"),
    ],
)
async def test_get_ip_behind_a_trusted_proxy(
    gateway_client: GatewayClient,
    key_file: KeyFile,
    host: str,
    header: str,
    written: str,
    forged: str,
) -> None:
    settings = gateway_settings(
        keys_file=key_file.path, trusted_proxies=LOOPBACK, forwarded_header=header
    )
    client = await gateway_client(settings, sink=MemorySink(), server_kwargs={"host": host})
    key = {"x-api-key": key_file.key}

    def hops(*addresses: str) -> str:
        if written == "Forwarded":
            return ", ".join(f'for="{a}"' for a in addresses)
        return ", ".join(addresses)

    resp = await client.get("/v1/ip", headers={**key, written: hops("6.6.6.6", "2001:db8::5")})
    assert await resp.json() == {"ip": "2001:db8::5"}
    # The client's own copy of the other header, passed through by the proxy, counts
    # for nothing: not alone, and not beside the one the proxy wrote.
    forgery = "for=6.6.6.6" if forged == "Forwarded" else "6.6.6.6"
    resp = await client.get("/v1/ip", headers={**key, forged: forgery})
    assert await resp.json() == {"ip": host}
    resp = await client.get(
        "/v1/ip", headers={**key, forged: forgery, written: hops("198.51.100.7")}
    )
    assert await resp.json() == {"ip": "198.51.100.7"}


@pytest.mark.parametrize("header", ["x-forwarded-for", "forwarded"])
async def test_the_kafka_header_and_the_access_log_name_the_same_caller(
    gateway_client: GatewayClient,
    key_file: KeyFile,
    caplog: pytest.LogCaptureFixture,
    header: str,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    sink = MemorySink()
    settings = gateway_settings(
        keys_file=key_file.path, trusted_proxies=LOOPBACK, forwarded_header=header
    )
    client = await gateway_client(settings, sink=sink)
    resp = await client.post(
        "/v1/log",
        data=curl_bodies()["log"],
        headers={
            "x-api-key": key_file.key,
            "Content-Type": "application/json",
            # What a client sends in the other header is passed through by the proxy.
            "X-Forwarded-For": "198.51.100.7" if header == "x-forwarded-for" else "6.6.6.6",
            "Forwarded": "for=198.51.100.7" if header == "forwarded" else "for=6.6.6.6",
        },
    )
    assert resp.status == 200
    (record,) = sink.records["log"]
    assert record.context.client_ip == "198.51.100.7"
    (line,) = access_lines(caplog)
    assert line["client_ip"] == "198.51.100.7"


async def test_get_ip_needs_a_key(gateway_client: GatewayClient, key_file: KeyFile) -> None:
    client = await gateway_client(gateway_settings(keys_file=key_file.path), sink=MemorySink())
    resp = await client.get("/v1/ip")
    assert resp.status == 401
