"""The gateway's topics: created when missing, and checked for what a 2xx then means.

The producer asks for `acks=all`: a batch is acknowledged once every replica in the
partition's in-sync set has it. Kafka lets that set shrink, as brokers fall behind or
die, down to the topic's `min.insync.replicas` before it refuses writes
(NOT_ENOUGH_REPLICAS). Kafka's default for it is 1, and then a 2xx may rest on one
broker's disk however many replicas the topic has.
"""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    for_code,
)

from gateway.config import KafkaSettings
from gateway.kafka.auth import KafkaAuth
from gateway.kafka.metrics import KafkaMetrics

log = logging.getLogger(__name__)

# Created topics get this many replicas, or one per broker on a smaller cluster.
REPLICATION = 3
# ... and acks=all then needs this many of them in sync (or all, on a smaller cluster):
# one broker may be lost without refusing writes, and no 2xx rests on a single disk.
MIN_INSYNC = 2
_MIN_INSYNC_KEY = "min.insync.replicas"


async def prepare_topics(
    settings: KafkaSettings, auth: KafkaAuth, brokers: int, metrics: KafkaMetrics | None
) -> list[str]:
    """Create the topics that are missing (unless CAFE_KAFKA_CREATE_TOPICS=never), then
    check the durability of every one; return those that still do not exist."""
    topics = settings.topics
    admin = _admin(settings, auth)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics.all() if t not in existing]
        if missing and topics.create == "auto":
            missing = await _create(admin, missing, topics.partitions, brokers)
        try:
            await _check(admin, tuple(t for t in topics.all() if t not in missing), metrics)
        except KafkaError as exc:
            # Advice, not a condition of serving: a principal may lack DescribeConfigs.
            log.warning("could not read the topics' replication settings: %r", exc)
    finally:
        await admin.close()
    return missing


async def missing_topics(settings: KafkaSettings, auth: KafkaAuth) -> list[str]:
    """The gateway's topics that do not exist (or that it may not see)."""
    admin = _admin(settings, auth)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    return [t for t in settings.topics.all() if t not in existing]


def _admin(settings: KafkaSettings, auth: KafkaAuth) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap,
        client_id=settings.client_id,
        request_timeout_ms=settings.request_timeout_ms,
        **auth.options(),
    )


async def _create(
    admin: AIOKafkaAdminClient, names: list[str], partitions: int, brokers: int
) -> list[str]:
    """Create the topics; return those Kafka refused the gateway the right to create."""
    replicas = max(1, min(REPLICATION, brokers))
    min_insync = min(MIN_INSYNC, replicas)
    config = {_MIN_INSYNC_KEY: str(min_insync)}
    response = await admin.create_topics(
        [NewTopic(name, partitions, replicas, topic_configs=config) for name in names]
    )
    refused = []
    for name, code, *_ in response.topic_errors:
        error = for_code(code)
        if error in (TopicAuthorizationFailedError, ClusterAuthorizationFailedError):
            refused.append(name)  # a principal with the least rights: the sink says so
        # Another gateway may have created it first.
        elif code and error is not TopicAlreadyExistsError:
            raise error(f"cannot create topic {name}")
    created = [name for name in names if name not in refused]
    if created:
        log.info(
            "created topics %s (%d partitions, %d replicas, min.insync.replicas=%d)",
            ", ".join(created),
            partitions,
            replicas,
            min_insync,
        )
    return refused


async def _check(
    admin: AIOKafkaAdminClient, names: tuple[str, ...], metrics: KafkaMetrics | None
) -> None:
    """Warn of each topic where acks=all can succeed on one replica out of three or more."""
    replicas = {
        topic["topic"]: min(len(p["replicas"]) for p in topic["partitions"])
        for topic in await admin.describe_topics(list(names))
        if not topic["error_code"] and topic["partitions"]
    }
    resources = [
        ConfigResource(ConfigResourceType.TOPIC, name, {_MIN_INSYNC_KEY: None}) for name in names
    ]
    min_insync = {}
    for response in await admin.describe_configs(resources):
        for resource in response.to_object()["resources"]:
            for entry in resource["config_entries"]:
                if entry["config_names"] == _MIN_INSYNC_KEY:
                    min_insync[resource["resource_name"]] = int(entry["config_value"])
    for name in names:
        if name not in replicas or name not in min_insync:
            log.warning("could not read the replication settings of topic %s", name)
            continue
        weak = is_single_copy(replicas[name], min_insync[name])
        if metrics is not None:
            metrics.topic_single_copy.labels(name).set(int(weak))
        if weak:
            log.warning(
                "topic %s has %d replicas but min.insync.replicas=%d: a 2xx may rest on one "
                "broker's disk. Set it to %d (kafka-configs.sh --alter --entity-type topics "
                "--entity-name %s --add-config min.insync.replicas=%d)",
                name,
                replicas[name],
                min_insync[name],
                MIN_INSYNC,
                name,
                MIN_INSYNC,
            )


def is_single_copy(replicas: int, min_insync: int) -> bool:
    """Whether acks=all can succeed on one replica of a topic that has three or more.

    With two replicas, requiring both in sync would refuse every write while either
    broker is away; that trade is the operator's to make, so it is not warned of.
    """
    return replicas >= REPLICATION and min_insync < MIN_INSYNC
