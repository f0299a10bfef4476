"""The sink's partitioning: Kafka's murmur2, so Java consumers and producers agree."""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import DefaultPartitioner

from gateway.config import KafkaSettings
from gateway.kafka import KafkaSink, murmur2_cached

# The vectors of Kafka's own test of Utils.murmur2 (signed 32-bit results).
KAFKA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("key", "expected"), KAFKA_VECTORS.items())
def test_murmur2_matches_kafka(key: bytes, expected: int) -> None:
    assert murmur2_cached(key) & 0xFFFFFFFF == expected & 0xFFFFFFFF


def test_keyed_partitions_match_the_default_partitioner() -> None:
    sink = KafkaSink(KafkaSettings())
    rng = random.Random(7)
    keys = [f"session-{rng.randrange(10**9)}".encode() for _ in range(2000)]
    for partitions in (1, 3, 6, 7, 64):
        all_partitions = list(range(partitions))
        for key in keys:
            expected = DefaultPartitioner()(key, all_partitions, all_partitions)
            assert sink._partition(key, partitions) == expected


def test_unkeyed_messages_go_round_robin() -> None:
    sink = KafkaSink(KafkaSettings())
    assert [sink._partition(None, 3) for _ in range(6)] == [1, 2, 0, 1, 2, 0]


async def test_a_sink_that_has_not_connected_says_which_kafka_it_waits_for() -> None:
    sink = KafkaSink(KafkaSettings(bootstrap="kafka.invalid:9092"))
    assert await sink.unavailable() == "Kafka at kafka.invalid:9092 is not reachable"
