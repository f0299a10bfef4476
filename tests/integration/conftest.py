"""A real Kafka for the integration tests, and a unique topic per test.

The broker is chosen once per session, in this order:
1. `CAFE_KAFKA_BOOTSTRAP` if set (what `make test` does, after starting the local broker);
2. testcontainers' Kafka, if a Docker daemon answers;
3. the local broker from `deploy/kafka/kafka.sh`, started if it is not running.
A broker that cannot be had fails the tests; it never skips them.

Tests that stop or kill brokers get their own: `spare_broker` (one node) or
`kafka_cluster` (3 brokers and a KRaft controller, marker `cluster`).

The rate-limit tests' Redis is `redis_url`: `CAFE_TEST_REDIS_URL` if set, else the local
one from `deploy/redis/redis.sh`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from devkit.net import free_ports
from tests.support.kafka import (
    BROKER_USED,
    KAFKA_SH,
    REDIS_SH,
    REPO,
    TOPIC_PARTITIONS,
    Broker,
    Cluster,
    SecureBroker,
    delete_topics,
    docker_answers,
)
from tests.support.net import consecutive_free_ports
from tests.support.summary import SUMMARY_LINES, summarise


@pytest.fixture(scope="session")
def kafka(pytestconfig: pytest.Config) -> Iterator[Broker]:
    """The session's broker (see the module docstring for the order of choice)."""
    bootstrap = os.environ.get("CAFE_KAFKA_BOOTSTRAP", "").strip()
    if bootstrap:
        broker = Broker(bootstrap, "CAFE_KAFKA_BOOTSTRAP")
        pytestconfig.stash[BROKER_USED] = broker
        yield broker
    elif docker_answers():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            broker = Broker(container.get_bootstrap_server(), "testcontainers")
            pytestconfig.stash[BROKER_USED] = broker
            yield broker
    else:
        subprocess.run([str(KAFKA_SH), "up"], check=True)
        port = os.environ.get("CAFE_KAFKA_PORT", "9092")
        broker = Broker(f"127.0.0.1:{port}", f"local broker ({KAFKA_SH.relative_to(REPO)})")
        pytestconfig.stash[BROKER_USED] = broker
        yield broker


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The session's Redis: `CAFE_TEST_REDIS_URL` if set (what `make test` does), else the
    local one on `CAFE_REDIS_PORT`, started if it is not running. Never skips: a Redis
    that cannot be had fails the tests with redis.sh's message."""
    url = os.environ.get("CAFE_TEST_REDIS_URL", "").strip()
    if url:
        return url
    up = subprocess.run(
        [str(REDIS_SH), "up"], capture_output=True, text=True, timeout=60, check=False
    )
    if up.returncode != 0:
        pytest.fail(f"deploy/redis/redis.sh up failed:\n{up.stderr}")
    return f"redis://127.0.0.1:{os.environ.get('CAFE_REDIS_PORT', '6390')}/0"


@pytest.fixture
async def topic(kafka: Broker, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A fresh topic of TOPIC_PARTITIONS partitions, named after the test; deleted afterwards."""
    name = f"test.{request.node.name[:60]}.{uuid.uuid4().hex[:8]}"
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, num_partitions=TOPIC_PARTITIONS, replication_factor=1)]
        )
        yield name
        await admin.delete_topics([name])
    finally:
        await admin.close()


@pytest.fixture
def spare_broker() -> Iterator[tuple[str, dict[str, str]]]:
    """A broker of our own on free ports, which a test may freeze or stop.

    Yields its bootstrap address and the environment that `kafka.sh up` / `down` need
    to act on it (and never on the session's broker).
    """
    port, controller_port = free_ports(2)
    env = {
        **os.environ,
        "CAFE_KAFKA_PORT": str(port),
        "CAFE_KAFKA_CONTROLLER_PORT": str(controller_port),
    }
    up = subprocess.run(
        [str(KAFKA_SH), "up"], env=env, capture_output=True, text=True, timeout=180, check=False
    )
    if up.returncode != 0:
        pytest.fail(f"the spare broker did not start:\n{up.stderr}")
    try:
        yield f"127.0.0.1:{env['CAFE_KAFKA_PORT']}", env
    finally:
        # Its data and logs go too: each test run would otherwise leave a directory.
        subprocess.run([str(KAFKA_SH), "destroy"], env=env, check=True, capture_output=True)


@pytest.fixture(scope="module")
def secure_broker() -> Iterator[SecureBroker]:
    """A `kafka.sh up --secure` broker on free ports for the module's tests (starting one
    takes 10-20 s); deleted afterwards, certificates and passwords with it."""
    port, controller_port, sasl_ssl_port, ssl_port, sasl_plaintext_port = consecutive_free_ports(5)
    env = {
        **os.environ,
        "CAFE_KAFKA_PORT": str(port),
        "CAFE_KAFKA_CONTROLLER_PORT": str(controller_port),
        "CAFE_KAFKA_SASL_SSL_PORT": str(sasl_ssl_port),
        "CAFE_KAFKA_SSL_PORT": str(ssl_port),
        "CAFE_KAFKA_SASL_PLAINTEXT_PORT": str(sasl_plaintext_port),
    }
    started = time.monotonic()
    try:
        up = subprocess.run(
            [str(KAFKA_SH), "up", "--secure"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if up.returncode != 0:
            pytest.fail(f"the secure broker did not start:\n{up.stderr}")
        started_in_s = time.monotonic() - started
        # The last line of kafka.sh's messages names client.env.
        client_env = Path(up.stderr.strip().splitlines()[-1].rpartition(": ")[2])
        settings = dict(
            shlex.split(line)[0].split("=", 1)
            for line in client_env.read_text().splitlines()
            if line and not line.startswith("#")
        )
        yield SecureBroker(
            plaintext=settings["PLAINTEXT_BOOTSTRAP"],
            sasl_ssl=settings["SASL_SSL_BOOTSTRAP"],
            ssl=settings["SSL_BOOTSTRAP"],
            sasl_plaintext=settings["SASL_PLAINTEXT_BOOTSTRAP"],
            ca_file=Path(settings["CA_FILE"]),
            client_cert_file=Path(settings["CLIENT_CERT_FILE"]),
            client_key_file=Path(settings["CLIENT_KEY_FILE"]),
            other_ca_file=Path(settings["OTHER_CA_FILE"]),
            other_client_cert_file=Path(settings["OTHER_CLIENT_CERT_FILE"]),
            other_client_key_file=Path(settings["OTHER_CLIENT_KEY_FILE"]),
            admin_password=Path(settings["ADMIN_PASSWORD_FILE"]).read_text().strip(),
            gateway_password=Path(settings["GATEWAY_PASSWORD_FILE"]).read_text().strip(),
            env=env,
            started_in_s=started_in_s,
        )
    finally:
        # Its data, logs, certificates and passwords go too (see spare_broker); also after
        # a failed start, which may have left them.
        subprocess.run([str(KAFKA_SH), "destroy"], env=env, check=True, capture_output=True)


@pytest.fixture(scope="module")
def kafka_cluster(pytestconfig: pytest.Config) -> Iterator[Cluster]:
    """A 3-broker cluster on free ports, deleted after the module's tests (a few minutes
    of their time: tests that use it are marked `cluster`). A test that kills brokers
    brings them back before it ends.

    Four JVMs at once on a shared machine: once in seven CI runs a node exited as it
    started, with nothing in its logs. A start that fails is said at the end of the run
    and made once more, from nothing; a second failure fails the tests."""
    brokers = 3
    *_, controller_port = ports = consecutive_free_ports(brokers + 1)
    env = {
        **os.environ,
        "CAFE_KAFKA_PORT": str(ports[0]),
        "CAFE_KAFKA_CONTROLLER_PORT": str(controller_port),
    }
    bootstrap = ",".join(f"127.0.0.1:{port}" for port in ports[:brokers])
    cluster = Cluster(bootstrap, env, brokers)
    try:
        try:
            cluster.started_in_s = cluster.up()
        except pytest.fail.Exception as first:
            summarise(pytestconfig, f"the 3-broker cluster's first start failed: {first}")
            cluster.kafka_sh("destroy")
            cluster.started_in_s = cluster.up()
        yield cluster
    finally:
        # Its data and logs go too (see spare_broker).
        cluster.kafka_sh("destroy")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the lines tests asked for, and say which real Kafka the integration tests
    talked to, if any ran."""
    for line in terminalreporter.config.stash.get(SUMMARY_LINES, []):
        terminalreporter.write_line(line)
    broker = terminalreporter.config.stash.get(BROKER_USED, None)
    if broker is not None:
        terminalreporter.write_line(
            f"integration tests ran against Kafka at {broker.bootstrap} ({broker.source})"
        )


@pytest.fixture
async def prefix(kafka: Broker) -> AsyncIterator[str]:
    """A topic prefix for one test's served gateway; its topics are deleted afterwards."""
    prefix = f"serve.{uuid.uuid4().hex[:8]}"
    yield prefix
    await delete_topics(kafka.bootstrap, lambda t: t.startswith(prefix + "."))
