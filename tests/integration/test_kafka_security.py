"""The gateway on a secured Kafka (`kafka.sh up --secure`), configured as a user would,
from CAFE_* variables: each way in (SCRAM and PLAIN over SASL_SSL, mutual TLS,
OAUTHBEARER), the reasons it cannot connect told once and fixed without a restart, and a
principal with the least rights: a topic it may not create, or whose Write is revoked,
stops only its own record type; a password rotated while it runs is taken from its file."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from devkit.samples import curl_bodies
from gateway.kafka import health as kafka_health
from tests.support.app import GatewayClient, gateway_settings
from tests.support.kafka import (
    KAFKA_SH,
    SecureBroker,
    consume_all,
    create_topics,
    java_consume,
)
from tests.support.keys import KeyFile, json_headers
from tests.support.records import NAMES
from tests.support.scrape import scrape
from tests.support.wait import eventually

pytestmark = pytest.mark.integration


def _unsigned_jwt(subject: str) -> str:
    """A token the broker's unsecured OAUTHBEARER validator takes: `sub` is the user."""
    now = int(time.time())
    parts = [{"alg": "none"}, {"sub": subject, "iat": now, "exp": now + 3600}]
    encoded = [base64.urlsafe_b64encode(json.dumps(p).encode()).rstrip(b"=") for p in parts]
    return b".".join([*encoded, b""]).decode()


@dataclass(frozen=True)
class Topics:
    prefix: str

    def of(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def all(self) -> list[str]:
        return [self.of(name) for name in (*NAMES, "deadletter")]

    def env(self) -> dict[str, str]:
        return {f"CAFE_TOPIC_{name.upper()}": self.of(name) for name in (*NAMES, "deadletter")}


def _grant(broker: SecureBroker, topics: list[str], *operations: str) -> None:
    args = ["--allow-principal", "User:gateway"]
    for operation in operations:
        args += ["--operation", operation]
    for topic in topics:
        args += ["--topic", topic]
    broker.acls("--add", *args)


def _revoke(broker: SecureBroker, topic: str, operation: str) -> None:
    broker.acls(
        "--remove", "--force", "--allow-principal", "User:gateway",
        "--operation", operation, "--topic", topic,
    )  # fmt: skip


@pytest.fixture
def topics(secure_broker: SecureBroker) -> Iterator[Topics]:
    """Four topics of the test's own, made by a super user; `gateway` may Write and
    Describe them (and create none)."""
    made = Topics(f"sec.{uuid.uuid4().hex[:10]}")
    asyncio.run(create_topics(secure_broker.plaintext, made.all()))
    _grant(secure_broker, made.all(), "Write", "Describe")
    yield made


def _ways(broker: SecureBroker, tmp_path: Path) -> dict[str, dict[str, str]]:
    """The CAFE_KAFKA_* variables of each way in, secrets as files."""
    password = tmp_path / "password"
    password.write_text(broker.gateway_password + "\n")
    token = tmp_path / "token"
    token.write_text(_unsigned_jwt("gateway"))
    sasl_ssl = {
        "CAFE_KAFKA_BOOTSTRAP": broker.sasl_ssl,
        "CAFE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "CAFE_KAFKA_SSL_CA_FILE": str(broker.ca_file),
    }
    login = {"CAFE_KAFKA_SASL_USERNAME": "gateway", "CAFE_KAFKA_SASL_PASSWORD_FILE": str(password)}
    return {
        "scram-sha-512": {**sasl_ssl, **login, "CAFE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"},
        "plain": {**sasl_ssl, **login, "CAFE_KAFKA_SASL_MECHANISM": "PLAIN"},
        "oauthbearer": {
            **sasl_ssl,
            "CAFE_KAFKA_SASL_MECHANISM": "OAUTHBEARER",
            "CAFE_KAFKA_OAUTH_TOKEN_FILE": str(token),
        },
        "mtls": {
            "CAFE_KAFKA_BOOTSTRAP": broker.ssl,
            "CAFE_KAFKA_SECURITY_PROTOCOL": "SSL",
            "CAFE_KAFKA_SSL_CA_FILE": str(broker.ca_file),
            "CAFE_KAFKA_SSL_CERT_FILE": str(broker.client_cert_file),
            "CAFE_KAFKA_SSL_KEY_FILE": str(broker.client_key_file),
        },
    }


@asynccontextmanager
async def _gateway(
    gateway_client: GatewayClient, key_file: KeyFile, topics: Topics, kafka: dict[str, str]
) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    env = {"CAFE_KEYS_FILE": str(key_file.path), **topics.env(), **kafka}
    yield await gateway_client(gateway_settings(env))


async def _post(client: TestClient, key_file: KeyFile, name: str) -> tuple[int, Any]:  # type: ignore[type-arg]
    headers = json_headers(key_file.key)
    answer = await client.post(f"/v1/{name}", data=curl_bodies()[name], headers=headers)
    return answer.status, await answer.json()


async def _ready(client: TestClient) -> bool:  # type: ignore[type-arg]
    return (await client.get("/readyz")).status == 200


@pytest.mark.parametrize("way", ["scram-sha-512", "plain", "oauthbearer", "mtls"])
async def test_each_way_in_produces_what_a_client_sent(
    gateway_client: GatewayClient,
    key_file: KeyFile,
    secure_broker: SecureBroker,
    topics: Topics,
    tmp_path: Path,
    way: str,
) -> None:
    kafka = _ways(secure_broker, tmp_path)[way]
    async with _gateway(gateway_client, key_file, topics, kafka) as client:
        await eventually(lambda: _ready(client))
        for name in NAMES:
            assert await _post(client, key_file, name) == (200, {"accepted": 1})
    for name in NAMES:
        (message,) = await consume_all(secure_broker.plaintext, topics.of(name))
        (sent,) = orjson.loads(curl_bodies()[name])["records"]
        assert orjson.loads(message.value) == sent


async def test_the_java_client_reads_the_records_over_sasl_ssl(
    gateway_client: GatewayClient,
    key_file: KeyFile,
    secure_broker: SecureBroker,
    topics: Topics,
    tmp_path: Path,
) -> None:
    kafka = _ways(secure_broker, tmp_path)["scram-sha-512"]
    async with _gateway(gateway_client, key_file, topics, kafka) as client:
        await eventually(lambda: _ready(client))
        assert await _post(client, key_file, "activity") == (200, {"accepted": 1})
    # A downstream team's consumer: its own login (admin), over SASL_SSL too.
    properties = tmp_path / "consumer.properties"
    properties.write_text(
        "security.protocol=SASL_SSL\n"
        "sasl.mechanism=SCRAM-SHA-512\n"
        "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="admin" password="{secure_broker.admin_password}";\n'
        "ssl.truststore.type=PEM\n"
        f"ssl.truststore.location={secure_broker.ca_file}\n"
    )
    (read,) = await java_consume(secure_broker.sasl_ssl, topics.of("activity"), 1, properties)
    (sent,) = orjson.loads(curl_bodies()["activity"])["records"]
    assert (read.key, orjson.loads(read.value)) == (sent["sessionId"], sent)


class SecretFiles:
    """The password, CA bundle and client certificate the gateway reads, as files an
    operator gets wrong and then fixes in place."""

    def __init__(self, broker: SecureBroker, directory: Path) -> None:
        self.broker = broker
        self.password = directory / "password"  # the one _ways names
        self.ca = directory / "ca.pem"
        self.cert = directory / "client.pem"
        self.key = directory / "client.key"

    def env(self, *, mtls: bool) -> dict[str, str]:
        env = {"CAFE_KAFKA_SSL_CA_FILE": str(self.ca)}
        if mtls:
            env |= {
                "CAFE_KAFKA_SSL_CERT_FILE": str(self.cert),
                "CAFE_KAFKA_SSL_KEY_FILE": str(self.key),
            }
        return env

    def spoil(self, change: str) -> None:
        self.mend()
        if change == "wrong password":
            self.password.write_text("not-the-password\n")
        elif change == "unknown CA":
            self.ca.write_bytes(self.broker.other_ca_file.read_bytes())
        else:
            self.cert.write_bytes(self.broker.other_client_cert_file.read_bytes())
            self.key.write_bytes(self.broker.other_client_key_file.read_bytes())

    def mend(self) -> None:
        self.password.write_text(self.broker.gateway_password + "\n")
        self.ca.write_bytes(self.broker.ca_file.read_bytes())
        self.cert.write_bytes(self.broker.client_cert_file.read_bytes())
        self.key.write_bytes(self.broker.client_key_file.read_bytes())


@pytest.mark.parametrize(
    ("change", "cause", "words"),
    [
        ("wrong password", "sasl_authentication", "refused the gateway's SCRAM-SHA-512"),
        ("unknown CA", "tls_untrusted", "is not signed by a CA in"),
        ("client certificate of another CA", "tls_client_certificate", "client certificate"),
    ],
)
async def test_a_refused_connection_is_told_once_and_mended_without_a_restart(
    gateway_client: GatewayClient,
    key_file: KeyFile,
    secure_broker: SecureBroker,
    topics: Topics,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    change: str,
    cause: str,
    words: str,
) -> None:
    files = SecretFiles(secure_broker, tmp_path)
    kafka = _ways(secure_broker, tmp_path)["mtls" if "certificate" in change else "scram-sha-512"]
    kafka = {**kafka, **files.env(mtls="certificate" in change)}
    files.spoil(change)
    async with _gateway(gateway_client, key_file, topics, kafka) as client:

        async def told() -> bool:
            samples = await scrape(client)
            return samples.value("cafe_kafka_connection_problem", cause=cause) == 1

        await eventually(told)
        answer = await client.get("/readyz")
        assert answer.status == 503
        assert words in (await answer.json())["detail"]
        status, body = await _post(client, key_file, "activity")
        assert (status, body["code"]) == (503, "kafka_unavailable")
        await asyncio.sleep(6)  # past a retry: the same cause is not logged again
        errors = [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.ERROR and r.name.startswith("gateway.kafka.")
        ]
        assert len(errors) == 1, errors
        assert words in errors[0]

        # Fixed in place, as a rotated Secret is: ready again without a restart.
        files.mend()
        await eventually(lambda: _ready(client), within=30)
        assert await _post(client, key_file, "activity") == (200, {"accepted": 1})
        samples = await scrape(client)
        assert samples.value("cafe_kafka_connection_problem", cause=cause) == 0


async def test_write_revoked_on_one_topic_stops_only_its_type_until_granted_again(
    gateway_client: GatewayClient,
    key_file: KeyFile,
    secure_broker: SecureBroker,
    topics: Topics,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kafka_health, "FORBIDDEN_PROBE_S", 1.0)
    kafka = _ways(secure_broker, tmp_path)["scram-sha-512"]
    async with _gateway(gateway_client, key_file, topics, kafka) as client:
        await eventually(lambda: _ready(client))
        assert (await _post(client, key_file, "activity"))[0] == 200
        _revoke(secure_broker, topics.of("activity"), "Write")

        async def forbidden() -> bool:
            status, body = await _post(client, key_file, "activity")
            return (status, body.get("code")) == (503, "kafka_forbidden")

        await eventually(forbidden)
        # Refused at once from then on; the other types are served, and the gateway is
        # ready, saying which topic it cannot write to.
        for _ in range(20):
            status, body = await _post(client, key_file, "activity")
            assert (status, body["code"]) == (503, "kafka_forbidden")
            assert (await _post(client, key_file, "log"))[0] == 200
        readyz = await client.get("/readyz")
        assert readyz.status == 200
        assert await readyz.json() == {
            "status": "ready",
            "degraded": [f"Kafka refuses writes to topic {topics.of('activity')}"],
        }
        samples = await scrape(client)
        renewals = samples.value("cafe_kafka_producer_renewals_total")
        assert renewals <= 3  # one per probe at most, not one per request

        _grant(secure_broker, [topics.of("activity")], "Write")

        async def served() -> bool:
            return (await _post(client, key_file, "activity"))[0] == 200

        await eventually(served)
        assert await (await client.get("/readyz")).json() == {"status": "ready"}
        assert await _post(client, key_file, "log") == (200, {"accepted": 1})


async def test_a_topic_the_gateway_may_not_create_stops_only_its_type(
    gateway_client: GatewayClient,
    key_file: KeyFile,
    secure_broker: SecureBroker,
    tmp_path: Path,
) -> None:
    made = Topics(f"sec.{uuid.uuid4().hex[:10]}")
    # Every topic but the log one exists; the gateway may write all four, create none.
    await create_topics(secure_broker.plaintext, [t for t in made.all() if t != made.of("log")])
    _grant(secure_broker, made.all(), "Write", "Describe")
    kafka = _ways(secure_broker, tmp_path)["scram-sha-512"]
    async with _gateway(gateway_client, key_file, made, kafka) as client:
        await eventually(lambda: _ready(client))
        assert await (await client.get("/readyz")).json() == {
            "status": "ready",
            "degraded": [f"topic {made.of('log')} does not exist"],
        }
        status, body = await _post(client, key_file, "log")
        assert (status, body["code"]) == (503, "kafka_topic_missing")
        assert (await _post(client, key_file, "activity"))[0] == 200


def _set_password(broker: SecureBroker, password: str) -> None:
    broker.configs(
        "--alter", "--entity-type", "users", "--entity-name", "gateway",
        "--add-config", f"SCRAM-SHA-512=[password={password}]",
    )  # fmt: skip


def _restart(broker: SecureBroker) -> None:
    """Every connection dropped: the broker stopped and started again, on its ports."""
    for command in (["down"], ["up", "--secure"]):
        subprocess.run(
            [str(KAFKA_SH), *command], env=broker.env, check=True, capture_output=True, timeout=300
        )


async def test_a_password_rotated_while_running_is_taken_from_the_file_without_a_restart(
    gateway_client: GatewayClient,
    key_file: KeyFile,
    secure_broker: SecureBroker,
    topics: Topics,
    tmp_path: Path,
) -> None:
    kafka = _ways(secure_broker, tmp_path)["scram-sha-512"]
    password = Path(kafka["CAFE_KAFKA_SASL_PASSWORD_FILE"])
    async with _gateway(gateway_client, key_file, topics, kafka) as client:
        await eventually(lambda: _ready(client))
        assert (await _post(client, key_file, "activity"))[0] == 200
        try:
            # The password changes on the cluster; the producer's connections, made with
            # the old one, go on until they drop.
            _set_password(secure_broker, "rotated-" + secure_broker.gateway_password)
            await asyncio.to_thread(_restart, secure_broker)

            async def told() -> bool:
                answer = await client.get("/readyz")
                detail = (await answer.json()).get("detail", "")
                return answer.status == 503 and "refused the gateway's SCRAM-SHA-512" in detail

            await eventually(told, within=60)
            # The Secret is updated: the new password reaches the file.
            await asyncio.to_thread(
                password.write_text, "rotated-" + secure_broker.gateway_password
            )
            await eventually(lambda: _ready(client), within=60)
            assert (await _post(client, key_file, "activity"))[0] == 200
            samples = await scrape(client)
            assert samples.value("cafe_kafka_producer_renewals_total", error="stale_credentials")
        finally:
            _set_password(secure_broker, secure_broker.gateway_password)
