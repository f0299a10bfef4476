"""Per-key rate limits: token buckets for requests/s and records/s, set in the keys file.

A key without limits is not limited (the default), and costs nothing here. A limited
key's buckets live in a table in shared memory, made before the workers are forked and
inherited by all of them, so a key gets its configured rate whatever the connections:
one keep-alive connection always lands on one worker, which with buckets per worker
would cap it at that worker's share. The request check runs before the body is read,
so a refused request costs a few microseconds; the record check runs once the body is
parsed and before any record is validated.

These buckets are per host: behind a load balancer, N gateways give a key up to N times
its limit. With CAFE_RATELIMIT_STORAGE set to a Redis URL, `gateway.limits.fleet` keeps
the buckets in Redis for the whole fleet, and these stand in while Redis does not answer.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import mmap
import os
import struct
import time
import weakref
from typing import Protocol

from gateway.errors import RateLimited
from gateway.keys.model import ApiKey
from gateway.schemas import MAX_RECORDS

log = logging.getLogger(__name__)

# A bucket is known by its key's limit id (the same for a key and its rotations), kind
# ("requests" or "records") and rate, so a limit changed in the keys file starts a new
# bucket.
Bucket = tuple[str, str, float]

# A slot of the table: the bucket's digest (0: empty slot), then its tokens and stamp.
_DIGEST = struct.Struct("=Q")
_STATE = struct.Struct("=dd")
_SLOT_SIZE = _DIGEST.size + _STATE.size


class SharedBuckets(Protocol):
    """Buckets kept for the whole fleet (`gateway.limits.fleet.FleetBuckets`)."""

    # Why the shared buckets cannot be used now; None while they can.
    down: str | None

    async def take(self, bucket: Bucket, burst: float, count: int) -> float | None:
        """0.0 if taken, else the seconds until they would be; None if not asked now."""


def _refill_and_take(
    tokens: float, stamp: float, now: float, rate: float, burst: float, count: float
) -> tuple[float, float]:
    """The tokens left, and 0.0 if `count` were taken, else the seconds until they would be."""
    tokens = min(burst, tokens + (now - stamp) * rate)
    if tokens >= count:
        return tokens - count, 0.0
    return tokens, (count - tokens) / rate


class TokenBucket:
    """`rate` tokens a second, holding at most `burst`; starts full. One process's own."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = time.monotonic()

    def take(self, count: float, now: float) -> float:
        """Take `count` tokens: 0.0 if taken, else the seconds until they would be there."""
        self._tokens, wait_s = _refill_and_take(
            self._tokens, self._stamp, now, self.rate, self.burst, count
        )
        self._stamp = now
        return wait_s


class BucketTable:
    """Token buckets in shared memory, for every process forked after it was made.

    A fixed number of slots, found by open addressing on an 8-byte digest of the bucket.
    A slot, once given to a bucket, keeps it for the table's life (a rate changed in the
    keys file leaves its old bucket behind), so each process caches where its buckets are.
    """

    def __init__(self, slots: int = 16384) -> None:
        self.slots = slots
        # Anonymous memory with a file descriptor: mapped MAP_SHARED, so forked workers
        # see one table, and a file the lock below can be taken on.
        self._fd = os.memfd_create("cafe-gateway-ratelimit")
        weakref.finalize(self, os.close, self._fd)  # tests make a table per app
        os.ftruncate(self._fd, slots * _SLOT_SIZE)  # zero-filled: every slot empty
        self._mem = mmap.mmap(self._fd, slots * _SLOT_SIZE)
        self._offsets: dict[Bucket, int] = {}

    def take(
        self, bucket: Bucket, rate: float, burst: float, count: float, now: float
    ) -> float | None:
        """Take `count` tokens: 0.0 if taken, else the seconds until they would be there;
        None if the bucket is new and the table has no room for it."""
        # A POSIX record lock, not a multiprocessing.Lock: the kernel releases it when its
        # process dies, so a worker killed inside this section cannot block the others
        # forever. It belongs to the process, so it does not exclude threads; only the
        # event loop's thread checks limits.
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            offset = self._offsets.get(bucket)
            if offset is None:
                offset = self._claim(bucket, burst, now)
                if offset is None:
                    return None
            tokens, stamp = _STATE.unpack_from(self._mem, offset)
            # `now` was read before the lock, so it may be a hair older than the stamp
            # another worker just wrote: the refill is then a hair negative, and the next
            # one gives it back.
            tokens, wait_s = _refill_and_take(tokens, stamp, now, rate, burst, count)
            _STATE.pack_into(self._mem, offset, tokens, now)
            return wait_s
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _claim(self, bucket: Bucket, burst: float, now: float) -> int | None:
        """Where the bucket's tokens and stamp are, in the slot another process gave it or
        in an empty one; None if there is none. Called under the lock."""
        # blake2b, not hash(): the same in every process. 0 marks an empty slot.
        digest = int.from_bytes(hashlib.blake2b(repr(bucket).encode(), digest_size=8).digest())
        digest = digest or 1
        start = digest % self.slots
        for probe in range(self.slots):
            slot = (start + probe) % self.slots * _SLOT_SIZE
            (found,) = _DIGEST.unpack_from(self._mem, slot)
            if found not in (0, digest):
                continue
            if found == 0:  # a new bucket: it starts full
                _DIGEST.pack_into(self._mem, slot, digest)
                _STATE.pack_into(self._mem, slot + _DIGEST.size, burst, now)
            offset = self._offsets[bucket] = slot + _DIGEST.size
            return offset
        return None


class RateLimiter:
    """The rate limits of every key, checked against the buckets in `buckets`, or in
    Redis when `fleet` is given (and answers).

    `buckets` is shared with the other workers; a fresh table by default.
    """

    def __init__(
        self, workers: int, buckets: BucketTable | None = None, fleet: SharedBuckets | None = None
    ) -> None:
        self._workers = workers
        self._table = buckets if buckets is not None else BucketTable()
        self.fleet = fleet
        # Buckets the table had no room for: this process's own, at 1/workers of the
        # rate (the kernel spreads connections evenly, roughly, over the workers).
        self._fallback: dict[Bucket, TokenBucket] = {}

    async def check_request(self, key: ApiKey) -> None:
        """Raise RateLimited if the key has used up its requests for now."""
        if key.requests_per_second is None:
            return
        # A second's worth of burst, and always room for one request.
        await self._take(key.limit_id, "requests", key.requests_per_second, 1.0, 1)

    async def check_records(self, key: ApiKey, count: int) -> None:
        """Raise RateLimited if the key may not send `count` more records now."""
        if key.records_per_second is None:
            return
        # Always room for a full batch, or a low limit would refuse large batches forever.
        await self._take(key.limit_id, "records", key.records_per_second, float(MAX_RECORDS), count)

    async def _take(
        self, limit_id: str, what: str, rate: float, min_burst: float, count: int
    ) -> None:
        bucket = (limit_id, what, rate)
        burst = max(rate, min_burst)
        wait_s = None
        if self.fleet is not None:
            wait_s = await self.fleet.take(bucket, burst, count)
        if wait_s is None:  # local limits, or Redis did not answer
            wait_s = self._take_here(bucket, burst, min_burst, count)
        if wait_s:
            raise RateLimited(
                f"this API key is limited to {rate:g} {what}/s; retry later",
                retry_after=max(1, math.ceil(wait_s)),
            )

    def _take_here(self, bucket: Bucket, burst: float, min_burst: float, count: int) -> float:
        """Take from this host's buckets: the shared table, or past it this process's own."""
        rate = bucket[2]
        now = time.monotonic()
        fallback = self._fallback.get(bucket)
        if fallback is None:
            wait_s = self._table.take(bucket, rate, burst, count, now)
            if wait_s is not None:
                return wait_s
            fallback = self._fall_back(bucket, rate, min_burst)
        return fallback.take(count, now)

    def _fall_back(self, bucket: Bucket, rate: float, min_burst: float) -> TokenBucket:
        if not self._fallback:
            log.warning(
                "rate-limit table full (%d slots): further limits are kept by each "
                "worker, at 1/%d of the rate",
                self._table.slots,
                self._workers,
            )
        share = rate / self._workers
        fallback = self._fallback[bucket] = TokenBucket(share, max(share, min_burst))
        return fallback
