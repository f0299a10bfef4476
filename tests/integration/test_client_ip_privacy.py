"""What the records' `cafe-client-ip` header holds on a real topic, in each CAFE_CLIENT_IP
mode and with a key's own mode; GET /v1/ip still answers with the full address."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from devkit.samples import curl_bodies
from gateway.config import ClientIpSettings, KafkaSettings, SecretFile, TopicSettings
from gateway.keys.file import update_keys_file
from gateway.keys.model import ApiKey
from tests.support.app import GatewayClient, gateway_settings
from tests.support.kafka import Broker, consume_all, delete_topics, unique_topics
from tests.support.keys import KeyFile, json_headers
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

IPV4 = "198.51.100.7"
IPV6 = "2001:db8:1:2::7"
# The test client connects from loopback, trusted as a proxy, so X-Forwarded-For gives
# each request the caller's address the test wants.
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


def _secret() -> bytes:
    return secrets.token_hex(32).encode()


def _write(path: Path, secret: bytes) -> None:
    path.write_bytes(secret + b"\n")


def _hashed(secret: bytes, address: str) -> bytes:
    """The documented hashed form, worked out here."""
    digest = hmac.new(secret, address.encode(), hashlib.sha256).hexdigest()
    return f"{hashlib.sha256(secret).hexdigest()[:8]}:{digest}".encode()


class Gateway:
    """A gateway on the real broker, with topics of its own."""

    def __init__(self, client: TestClient, bootstrap: str, topics: TopicSettings) -> None:  # type: ignore[type-arg]
        self.client = client
        self.bootstrap = bootstrap
        self.topics = topics
        self.sent = 0

    async def send(self, key: str, address: str) -> str:
        """POST one activity record as the caller at `address`; returns its request id."""
        self.sent += 1
        request_id = f"client-ip-{self.sent}"
        headers = {**json_headers(key), "X-Forwarded-For": address, "X-Request-Id": request_id}
        resp = await self.client.post(
            "/v1/activity", data=curl_bodies()["activity"], headers=headers
        )
        assert resp.status == 200, await resp.text()
        return request_id

    async def kept(self) -> dict[str, bytes | None]:
        """The cafe-client-ip header of each record on the activity topic, by request id,
        after checking that no other topic holds anything and no request is missing."""
        by_request: dict[str, bytes | None] = {}
        for message in await consume_all(self.bootstrap, self.topics.activity):
            headers = dict(message.headers)
            request_id = headers["cafe-request-id"].decode()
            assert request_id not in by_request, "one record per request"
            by_request[request_id] = headers.get("cafe-client-ip")
        assert len(by_request) == self.sent
        for topic in (self.topics.log, self.topics.profile, self.topics.deadletter):
            assert await consume_all(self.bootstrap, topic) == []
        return by_request


# Starts a gateway on the broker with the client-IP settings given.
Start = Callable[[ClientIpSettings], Awaitable[Gateway]]


@pytest.fixture
def secret(tmp_path: Path) -> tuple[Path, bytes]:
    """A hash secret's file, and the secret it holds."""
    path, value = tmp_path / "client-ip-key", _secret()
    _write(path, value)
    return path, value


@pytest.fixture
async def start(
    gateway_client: GatewayClient, kafka: Broker, key_file: KeyFile
) -> AsyncIterator[Start]:
    """Starts gateways on the broker with the client-IP settings given; deletes their
    topics afterwards."""
    started: list[Gateway] = []

    async def gateway(client_ip: ClientIpSettings) -> Gateway:
        topics = unique_topics()
        settings = gateway_settings(
            keys_file=key_file.path,
            trusted_proxies=LOOPBACK,
            client_ip=client_ip,
            kafka=KafkaSettings(bootstrap=kafka.bootstrap, topics=topics),
        )
        client = await gateway_client(settings)

        async def ready() -> bool:
            return (await client.get("/readyz")).status == 200

        await eventually(ready)
        started.append(Gateway(client, kafka.bootstrap, topics))
        return started[-1]

    yield gateway
    names = {t for gw in started for t in gw.topics.all()}
    await delete_topics(kafka.bootstrap, lambda t: t in names)


@pytest.mark.parametrize("mode", ["full", "truncated", "hashed", "off"])
async def test_each_mode_on_the_topic(
    start: Start, key_file: KeyFile, secret: tuple[Path, bytes], mode: str
) -> None:
    secret_path, value = secret
    hash_key = SecretFile(secret_path)
    gateway = await start(ClientIpSettings(mode=mode, hash_key=hash_key))
    v4 = await gateway.send(key_file.key, IPV4)
    v6 = await gateway.send(key_file.key, IPV6)
    mapped = await gateway.send(key_file.key, f"::ffff:{IPV4}")

    # The caller is answered about itself in full, whatever is kept.
    for address in (IPV4, IPV6):
        headers = {"x-api-key": key_file.key, "X-Forwarded-For": address}
        resp = await gateway.client.get("/v1/ip", headers=headers)
        assert await resp.json() == {"ip": address}

    expected: dict[str, tuple[bytes | None, bytes | None]] = {
        "full": (IPV4.encode(), IPV6.encode()),
        "truncated": (b"198.51.100.0", b"2001:db8:1::"),
        "hashed": (_hashed(value, IPV4), _hashed(value, IPV6)),
        "off": (None, None),
    }
    as_v4, as_v6 = expected[mode]
    assert await gateway.kept() == {v4: as_v4, v6: as_v6, mapped: as_v4}


async def test_a_keys_own_mode_on_the_topic(
    start: Start, key_file: KeyFile, secret: tuple[Path, bytes]
) -> None:
    secret_path, value = secret
    follows, _ = key_file.add("analytics-portal")
    off, off_key = key_file.add("analytics-portal")
    hashed, hashed_key = key_file.add("analytics-portal")
    full, full_key = key_file.add("analytics-portal")

    modes = {off_key.id: "off", hashed_key.id: "hashed", full_key.id: "full"}

    def own_modes(keys: list[ApiKey]) -> list[ApiKey]:
        return [replace(k, client_ip=modes.get(k.id)) for k in keys]

    update_keys_file(key_file.path, own_modes)
    gateway = await start(ClientIpSettings(mode="truncated", hash_key=SecretFile(secret_path)))
    sent = {
        await gateway.send(follows, IPV4): b"198.51.100.0",
        await gateway.send(off, IPV4): None,
        await gateway.send(hashed, IPV4): _hashed(value, IPV4),
        await gateway.send(full, IPV6): IPV6.encode(),
    }
    assert await gateway.kept() == sent


async def test_a_rotated_secret_reaches_the_topic_without_a_restart(
    start: Start, key_file: KeyFile, secret: tuple[Path, bytes]
) -> None:
    secret_path, old = secret
    gateway = await start(ClientIpSettings(mode="hashed", hash_key=SecretFile(secret_path)))
    before = await gateway.send(key_file.key, IPV4)
    new = _secret()
    _write(secret_path, new)
    rotated_ids: list[str] = []

    async def rotated() -> bool:
        rotated_ids.append(await gateway.send(key_file.key, IPV4))
        kept = await gateway.kept()
        return kept[rotated_ids[-1]] == _hashed(new, IPV4)

    # Each gateway process reads the file every 2 s.
    await eventually(rotated, within=15)
    kept = await gateway.kept()
    assert kept[before] == _hashed(old, IPV4)
    # Each record is hashed with one secret or the other, and never again with the old
    # one once the new one is in use.
    values = [kept[request_id] for request_id in rotated_ids]
    assert set(values) <= {_hashed(old, IPV4), _hashed(new, IPV4)}
    assert values[-1] == _hashed(new, IPV4)
