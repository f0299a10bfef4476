"""Which partition a record goes to: Kafka's default partitioner, murmur2 of the key."""

from __future__ import annotations

import functools

from aiokafka.partitioner import murmur2


# Keys are sessionIds of at most 128 characters (schemas.MAX_KEY_LENGTH, which every
# schema is held to; ingest leaves longer ones off dead letters), so the cache holds at
# most 16,384 x 512 bytes of keys, 8 MiB, however clients choose them.
@functools.lru_cache(maxsize=16384)
def murmur2_cached(key: bytes) -> int:
    """aiokafka's pure-Python murmur2 costs microseconds; session keys repeat a lot."""
    result: int = murmur2(key)
    return result
