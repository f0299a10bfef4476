"""Reading a topic back: the benchmark's book check and the integration tests share it."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition


async def read_to_end(
    bootstrap: str, topic: str, partitions: int
) -> AsyncIterator[ConsumerRecord[bytes, bytes]]:
    """Every message on `topic`, from the beginning up to the end offsets it has when
    reading starts, as it arrives (so topics too large to hold at once can be read).

    Reading to the end offsets, not until a quiet period, proves positively that
    nothing else is there.
    """
    # Large fetches: a benchmark's topic holds millions of records.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, max_partition_fetch_bytes=8 << 20
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            batches = await consumer.getmany(*tps, timeout_ms=1000, max_records=50_000)
            for messages in batches.values():
                for message in messages:
                    yield message
    finally:
        await consumer.stop()
