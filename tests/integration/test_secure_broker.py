"""deploy/kafka/kafka.sh up --secure: the broker the tests of the gateway's Kafka security
use, proven with aiokafka alone.

As `gateway`, once a test has granted Write and Describe on a topic, every way in produces
and is acknowledged: SCRAM-SHA-512, SCRAM-SHA-256, PLAIN and OAUTHBEARER over SASL_SSL (and
SASL_PLAINTEXT), a client certificate over SSL. A wrong password, a client certificate of
another CA, no client certificate, and a CA bundle without the broker's CA are refused; so
is producing without Write. An idempotent producer needs no IdempotentWrite on the cluster
as long as it may Write on some topic; one that may write nowhere needs it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.abc import AbstractTokenProvider
from aiokafka.conn import create_conn
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaConnectionError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
)

from tests.support.kafka import SecureBroker, create_topics

pytestmark = pytest.mark.integration


class UnsignedToken(AbstractTokenProvider):  # type: ignore[misc]
    """An unsecured JWT naming `subject`: header {"alg": "none"}, no signature, valid for
    ten minutes. The broker's built-in OAUTHBEARER validator takes it; `sub` is the user."""

    def __init__(self, subject: str) -> None:
        self._subject = subject

    async def token(self) -> str:
        now = int(time.time())
        parts = [{"alg": "none"}, {"sub": self._subject, "iat": now, "exp": now + 600}]
        encoded = [
            base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()
            for part in parts
        ]
        return ".".join([*encoded, ""])


@dataclass(frozen=True)
class Topics:
    writable: str  # gateway: Write and Describe
    describable: str  # gateway and nobody: Describe only
    hidden: str  # no ACL at all


@pytest.fixture(scope="module")
def topics(secure_broker: SecureBroker) -> Topics:
    """Three topics made by a super user over PLAINTEXT, with the ACLs their names say."""
    suffix = uuid.uuid4().hex[:8]
    made = Topics(
        f"secure.writable.{suffix}", f"secure.describable.{suffix}", f"secure.hidden.{suffix}"
    )
    asyncio.run(
        create_topics(
            secure_broker.plaintext, [made.writable, made.describable, made.hidden], partitions=1
        )
    )
    # `nobody` (an OAUTHBEARER subject) only may Describe: it has Write on no topic at all.
    secure_broker.acls(
        "--add", "--allow-principal", "User:gateway", "--operation", "Write",
        "--operation", "Describe", "--topic", made.writable,
    )  # fmt: skip
    secure_broker.acls(
        "--add", "--allow-principal", "User:gateway", "--allow-principal", "User:nobody",
        "--operation", "Describe", "--topic", made.describable,
    )  # fmt: skip
    return made


def _tls(cafile: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def _client(broker: SecureBroker, way: str, *, user: str = "gateway") -> dict[str, Any]:
    """aiokafka's options for connecting to `broker` as `user` in `way`:
    "PROTOCOL" or "PROTOCOL/MECHANISM"."""
    protocol, _, mechanism = way.partition("/")
    options: dict[str, Any] = {
        "bootstrap_servers": {
            "SASL_SSL": broker.sasl_ssl,
            "SSL": broker.ssl,
            "SASL_PLAINTEXT": broker.sasl_plaintext,
        }[protocol],
        "security_protocol": protocol,
    }
    if protocol == "SSL":
        options["ssl_context"] = _tls(
            broker.ca_file, broker.client_cert_file, broker.client_key_file
        )
    elif protocol == "SASL_SSL":
        options["ssl_context"] = _tls(broker.ca_file)
    if mechanism == "OAUTHBEARER":
        options |= {"sasl_mechanism": mechanism, "sasl_oauth_token_provider": UnsignedToken(user)}
    elif mechanism:
        password = {"gateway": broker.gateway_password, "admin": broker.admin_password}[user]
        options |= {
            "sasl_mechanism": mechanism,
            "sasl_plain_username": user,
            "sasl_plain_password": password,
        }
    return options


@pytest.mark.parametrize(
    "way",
    [
        "SASL_SSL/SCRAM-SHA-512",
        "SASL_SSL/SCRAM-SHA-256",
        "SASL_SSL/PLAIN",
        "SASL_SSL/OAUTHBEARER",
        "SSL",
        "SASL_PLAINTEXT/SCRAM-SHA-512",
    ],
)
async def test_gateway_produces_once_granted_write(
    secure_broker: SecureBroker, topics: Topics, way: str
) -> None:
    producer = AIOKafkaProducer(**_client(secure_broker, way), acks="all")
    try:
        await producer.start()
        sent = await producer.send_and_wait(topics.writable, f"via {way}".encode())
    finally:
        await producer.stop()
    assert (sent.topic, sent.offset >= 0) == (topics.writable, True)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"])
async def test_a_wrong_password_is_refused(secure_broker: SecureBroker, mechanism: str) -> None:
    # Over SASL_PLAINTEXT: aiokafka closes a connection whose login failed without awaiting
    # the close, and over TLS the close waits on a round trip with the broker. When the test's
    # loop ended first, the socket was left to the garbage collector, whose ResourceWarning
    # this suite treats as an error (a CI run failed so). The login is the same on both.
    options = _client(secure_broker, f"SASL_PLAINTEXT/{mechanism}")
    options["sasl_plain_password"] = "not-" + secure_broker.gateway_password
    host, _, port = options.pop("bootstrap_servers").rpartition(":")
    with pytest.raises(SaslAuthenticationFailed) as refused:
        await create_conn(host, int(port), **options)
    print(f"{mechanism}, wrong password: {type(refused.value).__name__}: {refused.value}")
    assert "Authentication failed" in str(refused.value)
    # A producer only says it could not bootstrap (and logs the reason).
    producer = AIOKafkaProducer(bootstrap_servers=f"{host}:{port}", **options)
    try:
        with pytest.raises(KafkaConnectionError, match="Unable to bootstrap from") as failed:
            await producer.start()
    finally:
        await producer.stop()
    print(f"the producer's start(): {type(failed.value).__name__}: {failed.value}")


@pytest.mark.parametrize("certificate", ["of another CA", "none"])
async def test_the_ssl_listener_refuses_a_client_without_a_certificate_of_its_ca(
    secure_broker: SecureBroker, certificate: str
) -> None:
    if certificate == "none":
        context = _tls(secure_broker.ca_file)
    else:
        context = _tls(
            secure_broker.ca_file,
            secure_broker.other_client_cert_file,
            secure_broker.other_client_key_file,
        )
    host, _, port = secure_broker.ssl.rpartition(":")
    # With TLS 1.3 the client's handshake is over before the broker has checked the
    # client's certificate: the broker's alert ends the connection while the client
    # awaits its first answer, and aiokafka says only that the connection closed. The
    # alert is the exception's cause.
    with pytest.raises(KafkaConnectionError, match=r"Connection at \S+ closed") as e:
        conn = await create_conn(
            host, int(port), ssl_context=context, security_protocol="SSL", request_timeout_ms=10_000
        )
        conn.close()
    alert = e.value.__cause__
    print(f"client certificate {certificate}: {type(e.value).__name__}: {e.value}; {alert!r}")
    assert isinstance(alert, ssl.SSLError)
    assert "ALERT" in str(alert.reason)


async def test_a_ca_bundle_without_the_brokers_ca_is_refused(secure_broker: SecureBroker) -> None:
    options = _client(secure_broker, "SASL_SSL/SCRAM-SHA-512")
    options["ssl_context"] = _tls(secure_broker.other_ca_file)
    host, _, port = options.pop("bootstrap_servers").rpartition(":")
    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        await create_conn(host, int(port), **options)
    print(f"unknown CA: {type(refused.value).__name__}: {refused.value}")
    assert refused.value.verify_message == "unable to get local issuer certificate"


async def test_without_write_the_ack_fails(secure_broker: SecureBroker, topics: Topics) -> None:
    """Describe only: the topic's metadata comes, the record is sent, the broker refuses it."""
    producer = AIOKafkaProducer(**_client(secure_broker, "SASL_SSL/SCRAM-SHA-512"))
    try:
        await producer.start()
        delivery = await producer.send(topics.describable, b"refused")
        with pytest.raises(TopicAuthorizationFailedError) as refused:
            await delivery
    finally:
        await producer.stop()
    print(f"Describe without Write, at the ack: {type(refused.value).__name__}: {refused.value}")
    assert str(refused.value) == f"[Error 29] TopicAuthorizationFailedError: {topics.describable}"


async def test_without_describe_the_send_fails(secure_broker: SecureBroker, topics: Topics) -> None:
    """No ACL: the topic's metadata is refused, and send() raises before any record goes."""
    producer = AIOKafkaProducer(**_client(secure_broker, "SASL_SSL/SCRAM-SHA-512"))
    try:
        await producer.start()
        with pytest.raises(TopicAuthorizationFailedError) as refused:
            await producer.send(topics.hidden, b"refused")
    finally:
        await producer.stop()
    print(f"no ACL, at send(): {type(refused.value).__name__}: {refused.value}")
    assert str(refused.value) == f"[Error 29] TopicAuthorizationFailedError: {topics.hidden}"


async def test_an_idempotent_producer_needs_write_not_idempotent_write(
    secure_broker: SecureBroker, topics: Topics
) -> None:
    """Since Kafka 3.0 (KIP-679), Write on any topic lets a producer get a producer id;
    IdempotentWrite on the cluster is needed only by one that may write nowhere."""
    producer = AIOKafkaProducer(
        **_client(secure_broker, "SASL_SSL/SCRAM-SHA-512"), enable_idempotence=True, acks="all"
    )
    try:
        await producer.start()
        sent = await producer.send_and_wait(topics.writable, b"idempotent")
    finally:
        await producer.stop()
    assert sent.offset >= 0

    def nowhere() -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **_client(secure_broker, "SASL_SSL/OAUTHBEARER", user="nobody"),
            enable_idempotence=True,
            acks="all",
        )

    refused_producer = nowhere()
    try:
        with pytest.raises(ClusterAuthorizationFailedError) as refused:
            await refused_producer.start()
    finally:
        await refused_producer.stop()
    print(f"idempotent, Write nowhere, at start(): {type(refused.value).__name__}: {refused.value}")
    secure_broker.acls(
        "--add", "--allow-principal", "User:nobody", "--operation", "IdempotentWrite", "--cluster"
    )  # fmt: skip
    admitted = nowhere()
    try:
        await admitted.start()  # has its producer id
    finally:
        await admitted.stop()
