"""Kafka's murmur2 partitioner: murmurhash2 against Kafka's own vectors and, on many
keys, against aiokafka's pure-Python murmur2 (tests/integration/test_kafka.py holds it
to the Java client itself)."""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as reference_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.kafka.partitioner import key_partition, murmur2

# The vectors of Kafka's own test of Utils.murmur2 (signed 32-bit results).
KAFKA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}

# Many examples, no deadline, no .hypothesis/ directory in the work tree (a failure
# prints its reproducer).
MANY = settings(max_examples=2000, deadline=None, database=None)

# Raw bytes of every length murmur2 treats apart (its tail of 0-3 bytes, blocks of 4),
# and text as a client's sessionId reaches us: UTF-8, of one to four bytes a character.
KEYS = st.binary(max_size=600) | st.text(max_size=200).map(str.encode)


@pytest.mark.parametrize(("key", "expected"), KAFKA_VECTORS.items())
def test_murmur2_matches_kafka(key: bytes, expected: int) -> None:
    assert murmur2(key) == expected & 0xFFFFFFFF


@MANY
@given(key=KEYS)
def test_murmur2_matches_aiokafkas_pure_python_murmur2(key: bytes) -> None:
    assert murmur2(key) == reference_murmur2(key)


@MANY
@given(key=KEYS, partitions=st.integers(1, 1000))
def test_key_partition_matches_aiokafkas_default_partitioner(key: bytes, partitions: int) -> None:
    all_partitions = list(range(partitions))
    expected = DefaultPartitioner()(key, all_partitions, all_partitions)
    assert key_partition(key, partitions) == expected


@pytest.mark.parametrize(
    "key",
    [b"", "ü".encode(), "日本".encode(), "🦊".encode(), b"\xff" * 4096],
    ids=["empty", "2-byte", "3-byte", "4-byte", "4 KiB"],
)
def test_keys_hypothesis_may_not_reach(key: bytes) -> None:
    assert murmur2(key) == reference_murmur2(key)
