"""Kafka for the integration tests: brokers of their own, topics made, read back and frozen."""

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
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest
from aiokafka import ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from devkit.topics import read_to_end
from gateway.config import KafkaSettings, TopicSettings
from gateway.kafka.rdkafka import RdKafkaSink
from gateway.kafka.sink import KafkaSink
from gateway.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"
REDIS_SH = REPO / "deploy" / "redis" / "redis.sh"
TOPIC_PARTITIONS = 3


# The Kafka clients a sink may produce with (CAFE_KAFKA_CLIENT): the sink tests run on each.
KAFKA_CLIENTS = ("aiokafka", "librdkafka")


def kafka_sink(settings: KafkaSettings, metrics: Metrics | None = None) -> KafkaSink | RdKafkaSink:
    """The Kafka sink of the client `settings.client` names, as gateway/app.py makes it."""
    if settings.client == "librdkafka":
        return RdKafkaSink(settings, metrics)
    return KafkaSink(settings, metrics)


@dataclass(frozen=True)
class Broker:
    """The Kafka the integration tests use, and where it came from."""

    bootstrap: str
    source: str


# The broker the session's `kafka` fixture chose, for the run's last line.
BROKER_USED = pytest.StashKey[Broker]()


def docker_answers() -> bool:
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


class JavaRecord(NamedTuple):
    """A record as the Java client read it: its key and value as text, and its headers."""

    key: str
    value: str
    headers: dict[str, str]


async def java_consume(
    bootstrap: str, topic: str, count: int, client_properties: Path | None = None
) -> list[JavaRecord]:
    """The first `count` records of `topic` as the Java client reads them
    (tests/integration/Consume.java), with `client_properties`' security settings."""
    source = REPO / "tests" / "integration" / "Consume.java"
    args = [bootstrap, topic, str(count)]
    if client_properties is not None:
        args.append(str(client_properties))
    process = await asyncio.create_subprocess_exec(
        "java", "-cp", f"{kafka_libs()}/*", str(source), *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    records = []
    for line in out.decode().splitlines():
        key, value, *headers = line.split("\t")
        records.append(JavaRecord(key, value, dict(h.partition("=")[::2] for h in headers)))
    return records


def broker_pid(port: str) -> int:
    """The pid of the kafka.sh broker on `port`: the one java process whose command line
    ends `kafka.Kafka <run dir>/server.properties`, the run dir being `run-<port>`."""
    pids: list[int] = [
        proc.pid
        for proc in psutil.process_iter(["cmdline"])
        if (cmdline := proc.info["cmdline"] or [])[-2:-1] == ["kafka.Kafka"]
        and cmdline[-1].endswith(f"/run-{port}/server.properties")
    ]
    assert len(pids) == 1, f"not one kafka.sh broker on port {port}: pids {pids}"
    return pids[0]


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """Stop the process `pid` (SIGSTOP) for the block; it goes on (SIGCONT) however the
    block ends, or the spare broker would be left frozen for its teardown to kill.

    kill() returns before every thread has stopped: on a busy machine a broker thread
    could still answer a request sent at once. So wait until each thread shows stopped.
    """
    os.kill(pid, signal.SIGSTOP)
    try:
        _wait_until_stopped(pid)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone: nothing left to thaw
            os.kill(pid, signal.SIGCONT)


def _wait_until_stopped(pid: int, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not all(state in ("T", "t") for state in _thread_states(pid)):
        assert time.monotonic() < deadline, f"process {pid} did not stop within {within_s}s"
        time.sleep(0.01)


def _thread_states(pid: int) -> Iterator[str]:
    """The state letter of each thread of `pid`, from /proc (R running, S sleeping, T
    stopped...); the name before it is in parentheses and may hold spaces."""
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(FileNotFoundError):  # a thread that has just ended
            yield stat.read_text().rsplit(")", 1)[1].split()[0]


def unique_topics() -> TopicSettings:
    """Topic settings of names no other test uses, TOPIC_PARTITIONS partitions each."""
    prefix = f"it.{uuid.uuid4().hex[:10]}"
    return TopicSettings(
        activity=f"{prefix}.activity",
        log=f"{prefix}.log",
        profile=f"{prefix}.profile",
        deadletter=f"{prefix}.deadletter",
        partitions=TOPIC_PARTITIONS,
    )


def kafka_sh(
    *args: str, env: dict[str, str], timeout: float = 180, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """deploy/kafka/kafka.sh `args`, on the broker `env` names; with `check`, fails the
    test unless it succeeds."""
    done = subprocess.run(
        [str(KAFKA_SH), *args], env=env, capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip
    if check:
        assert done.returncode == 0, f"kafka.sh {' '.join(args)} failed:\n{done.stderr}"
    return done


async def kafka_sh_took(command: str, env: dict[str, str]) -> float:
    """`kafka.sh up` or `down` on a broker of the test's own, off the event loop; fails
    the test unless it succeeds; returns how long it took."""
    started = time.monotonic()
    await asyncio.to_thread(kafka_sh, command, env=env, timeout=120, check=True)
    return time.monotonic() - started
