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

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from aiokafka import ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from loadtest.topics import read_to_end
from tests.integration.tcp_proxy import consecutive_free_ports, free_ports

REPO = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"
REDIS_SH = REPO / "deploy" / "redis" / "redis.sh"
TOPIC_PARTITIONS = 3


@dataclass(frozen=True)
class Broker:
    """The Kafka the integration tests use, and where it came from."""

    bootstrap: str
    source: str


BROKER_USED = pytest.StashKey[Broker]()
SUMMARY_LINES = pytest.StashKey[list[str]]()


def _docker_answers() -> bool:
    """True if a Docker daemon answers `GET /_ping` at $DOCKER_HOST or the default socket.

    Asked with the standard library: the docker package leaks its socket when the
    daemon is absent, which `filterwarnings = error` would turn into a test error.
    """
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    address: str | tuple[str, int]
    if host.startswith("unix://"):
        family, address = socket.AF_UNIX, host.removeprefix("unix://")
    elif host.startswith("tcp://"):
        name, _, port = host.removeprefix("tcp://").rpartition(":")
        family, address = socket.AF_INET, (name, int(port))
    else:
        return False
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(3)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return sock.recv(64).split(b" ")[1:2] == [b"200"]
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka(pytestconfig: pytest.Config) -> Iterator[Broker]:
    """The session's broker (see the module docstring for the order of choice)."""
    bootstrap = os.environ.get("CAFE_KAFKA_BOOTSTRAP", "").strip()
    if bootstrap:
        broker = Broker(bootstrap, "CAFE_KAFKA_BOOTSTRAP")
        pytestconfig.stash[BROKER_USED] = broker
        yield broker
    elif _docker_answers():
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


@dataclass(frozen=True)
class SecureBroker:
    """A broker of `kafka.sh up --secure`: PLAINTEXT as on any other broker (its clients
    are super users), plus listeners that authenticate the users `admin` and `gateway`
    (SASL_SSL and SASL_PLAINTEXT: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, and OAUTHBEARER with
    unsigned tokens whose `sub` names the user; SSL: client certificates of `ca_file`,
    whose CN is the user), and ACLs. `gateway` may do nothing until a test grants it
    something with `acls`."""

    plaintext: str  # bootstrap addresses
    sasl_ssl: str
    ssl: str
    sasl_plaintext: str
    ca_file: Path  # the CA of the broker's certificate and of the client certificates it takes
    client_cert_file: Path  # CN=gateway, of ca_file: User:gateway on the SSL listener
    client_key_file: Path
    other_ca_file: Path  # a CA the broker neither has a certificate of nor trusts
    other_client_cert_file: Path  # CN=gateway, of other_ca_file: the broker refuses it
    other_client_key_file: Path
    admin_password: str
    gateway_password: str
    env: dict[str, str]  # what kafka.sh needs to act on this broker (and no other)
    started_in_s: float  # how long `kafka.sh up --secure` took

    def configs(self, *args: str) -> str:
        """Kafka's config command (kafka-configs) with `args` as a super user."""
        return self._tool("configs", *args)

    def acls(self, *args: str) -> str:
        """Kafka's ACL command (kafka-acls) with `args` as a super user, e.g. `"--add",
        "--allow-principal", "User:gateway", "--operation", "Write", "--topic", name`;
        returns what it printed. Fails the test if it fails."""
        return self._tool("acls", *args)

    def _tool(self, command: str, *args: str) -> str:
        done = subprocess.run(
            [str(KAFKA_SH), command, "--", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(
                f"kafka.sh {command} -- {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
            )
        return done.stdout


@pytest.fixture(scope="module")
def secure_broker() -> Iterator[SecureBroker]:
    """A `kafka.sh up --secure` broker on free ports for the module's tests (starting one
    takes 10-20 s); deleted afterwards, certificates and passwords with it."""
    import shlex

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


@dataclass
class Cluster:
    """A Kafka cluster of a test's own: `brokers` brokers and a KRaft controller, each a
    JVM on loopback, run by `kafka.sh --nodes`."""

    bootstrap: str  # every broker, comma-separated
    env: dict[str, str]  # what kafka.sh needs to act on this cluster (and no other)
    brokers: int
    started_in_s: float = 0.0  # how long the first `up` took

    def kafka_sh(self, command: str) -> subprocess.CompletedProcess[str]:
        """`kafka.sh COMMAND --nodes N` on this cluster; fails the test if it fails."""
        done = subprocess.run(
            [str(KAFKA_SH), command, "--nodes", str(self.brokers)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"kafka.sh {command} --nodes {self.brokers} failed:\n{done.stderr}")
        return done

    def pids(self) -> dict[str, int | None]:
        """Each node's pid (None if it is not running), keyed by name: controller,
        broker-1 .. broker-N. kafka.sh reads them from the nodes' pidfiles, and names only
        a live process that is that node."""
        done = subprocess.run(
            [str(KAFKA_SH), "status", "--nodes", str(self.brokers)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        nodes = {}
        for line in done.stdout.splitlines():
            name, _, pid = line.split()
            nodes[name] = None if pid == "-" else int(pid)
        return nodes

    def kill_broker(self, number: int) -> None:
        """SIGKILL broker `number` (1 .. brokers, also its node id); returns once it is gone."""
        pid = self.pids()[f"broker-{number}"]
        assert pid is not None, f"broker-{number} is not running"
        process = psutil.Process(pid)
        process.send_signal(signal.SIGKILL)
        # Gone, or a zombie its new parent has yet to reap: either way its sockets are
        # closed and its port is free.
        deadline = time.monotonic() + 30
        with contextlib.suppress(psutil.NoSuchProcess):
            while process.status() != psutil.STATUS_ZOMBIE:
                assert time.monotonic() < deadline, f"broker-{number} outlived SIGKILL"
                time.sleep(0.05)

    def up(self) -> float:
        """Start the nodes that are not running; returns once every broker is in sync and
        a record is acknowledged, with how long that took."""
        started = time.monotonic()
        self.kafka_sh("up")
        return time.monotonic() - started


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


async def create_topics(
    bootstrap: str, names: list[str], partitions: int = TOPIC_PARTITIONS
) -> None:
    """Make topics of one replica each, as a super user would (PLAINTEXT)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1) for name in names])
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, wanted: Callable[[str], bool]) -> None:
    """Delete the topics that exist and for whose names `wanted` is true (test clean-up)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if wanted(t)]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


def summarise(config: pytest.Config, line: str) -> None:
    """Have `line` printed at the end of the run, where `make test` shows it (pytest
    captures what a test prints)."""
    config.stash.setdefault(SUMMARY_LINES, []).append(line)


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


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = 30.0) -> None:
    """Poll `check` until it is true; fail after `within` seconds (a deadline, not a timing)."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within}s")
        await asyncio.sleep(0.1)


async def consume(
    bootstrap: str, topic: str, partitions: int = TOPIC_PARTITIONS
) -> AsyncIterator[ConsumerRecord]:
    """Every message on `topic`, read up to the end offsets it has now, as it arrives
    (see `read_to_end`)."""
    async for message in read_to_end(bootstrap, topic, partitions):
        yield message


async def consume_all(
    bootstrap: str, topic: str, partitions: int = TOPIC_PARTITIONS
) -> list[ConsumerRecord]:
    """Every message on `topic`, read up to the end offsets it has now (see `consume`)."""
    return [message async for message in consume(bootstrap, topic, partitions)]


def kafka_libs() -> Path:
    """The Kafka jars the local broker runs on (fetched if need be): the Java client."""
    subprocess.run([str(KAFKA_SH), "fetch"], check=True, capture_output=True, timeout=300)
    home = Path(
        os.environ.get("CAFE_KAFKA_HOME", Path.home() / ".cache" / "cafe-gateway" / "kafka")
    )
    version = re.search(
        r"<kafka.version>(.+)</kafka.version>", (KAFKA_SH.parent / "pom.xml").read_text()
    )
    assert version is not None
    return home / version.group(1) / "libs"


async def java_consume(
    bootstrap: str, topic: str, count: int, client_properties: Path | None = None
) -> list[str]:
    """The first `count` records of `topic` as the Java client reads them ("KEY\\tVALUE"
    lines; tests/integration/Consume.java), with `client_properties`' security settings."""
    source = Path(__file__).with_name("Consume.java")
    args = [bootstrap, topic, str(count)]
    if client_properties is not None:
        args.append(str(client_properties))
    process = await asyncio.create_subprocess_exec(
        "java", "-cp", f"{kafka_libs()}/*", str(source), *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode().splitlines()
