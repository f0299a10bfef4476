"""The Kafka sink: everything in the gateway that knows aiokafka lives here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from gateway.config import KafkaSettings
from gateway.errors import SinkUnavailable
from gateway.sink import Message

log = logging.getLogger(__name__)

# Reconnect attempts back off from the first to the last delay, doubling each time.
_FIRST_RETRY_S = 0.25
_LAST_RETRY_S = 5.0
# A readiness probe that cannot reach a broker within this time answers "not ready".
_READY_TIMEOUT_S = 2.0


class KafkaSink:
    """Produces to Kafka with acks from all in-sync replicas and idempotence.

    `start` returns at once and connects in the background, retrying until the cluster
    answers, so the gateway can boot (and report not-ready) while Kafka is down.
    """

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._connecting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._connecting = asyncio.create_task(self._connect(), name="kafka-connect")

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connecting
        if self._producer is not None:
            # stop() delivers what is buffered before closing connections.
            await self._producer.stop()
            self._producer = None

    async def ready(self) -> bool:
        producer = self._producer
        if producer is None:
            return False
        client = producer.client
        try:
            async with asyncio.timeout(_READY_TIMEOUT_S):
                for broker in client.cluster.brokers():
                    # Reuses the open connection; reconnects if the broker went away.
                    if await client.ready(broker.nodeId):
                        return True
        except TimeoutError:
            return False
        return False

    async def send(self, topic: str, messages: Sequence[Message]) -> None:
        producer = self._producer
        if producer is None:
            raise SinkUnavailable(f"not connected to Kafka at {self._settings.bootstrap}")
        try:
            # send() only enqueues (waiting for buffer space); the futures resolve on ack.
            acks = [await producer.send(topic, value, key=key) for key, value in messages]
            await asyncio.gather(*acks)
        except KafkaError as exc:
            raise SinkUnavailable(f"Kafka did not acknowledge the records: {exc}") from exc

    def _new_producer(self) -> AIOKafkaProducer:
        s = self._settings
        return AIOKafkaProducer(
            bootstrap_servers=s.bootstrap,
            client_id=s.client_id,
            # A record is acknowledged to the client only once every in-sync replica has
            # it, and retries never duplicate or reorder records of one partition.
            acks="all",
            enable_idempotence=True,
            linger_ms=s.linger_ms,
            request_timeout_ms=s.request_timeout_ms,
        )

    async def _connect(self) -> None:
        delay = _FIRST_RETRY_S
        while True:
            producer = self._new_producer()
            try:
                await producer.start()
            except (KafkaError, OSError) as exc:
                await producer.stop()
                log.warning(
                    "Kafka at %s unreachable (%s); retrying in %.2fs",
                    self._settings.bootstrap,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _LAST_RETRY_S)
                continue
            self._producer = producer
            log.info("connected to Kafka at %s", self._settings.bootstrap)
            return
