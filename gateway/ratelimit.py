"""Per-key rate limits: token buckets for requests/s and records/s, set in the keys file.

A key without limits is not limited (the default). Buckets live in each process; with
several workers each gets 1/CAFE_WORKERS of a key's rate, since the kernel spreads
connections evenly across them, so the sum is the configured rate to within the
unevenness of that spread. The request check runs before the body is read, so a
refused request costs a hash lookup; the record check runs once the body is parsed
and before any record is validated.
"""

from __future__ import annotations

import math
import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.auth import API_KEY, ApiKey
from gateway.errors import RateLimited
from gateway.schemas import MAX_RECORDS


class TokenBucket:
    """`rate` tokens a second, holding at most `burst`; starts full."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = time.monotonic()

    def take(self, count: float, now: float) -> float:
        """Take `count` tokens: 0.0 if taken, else the seconds until they would be there."""
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= count:
            self._tokens -= count
            return 0.0
        return (count - self._tokens) / self.rate


class RateLimiter:
    """The buckets of every limited key, made when the key is first seen."""

    def __init__(self, workers: int) -> None:
        self._share = 1 / workers
        # By key id and rate, so a limit changed in the keys file starts a new bucket.
        self._requests: dict[tuple[str, float], TokenBucket] = {}
        self._records: dict[tuple[str, float], TokenBucket] = {}

    def check_request(self, key: ApiKey) -> None:
        """Raise RateLimited if the key has used up its requests for now."""
        if key.requests_per_second is None:
            return
        rate = key.requests_per_second * self._share
        # A second's worth of burst, and always room for one request.
        bucket = self._bucket(self._requests, key.id, rate, max(rate, 1.0))
        self._take(bucket, 1, "requests")

    def check_records(self, key: ApiKey, count: int) -> None:
        """Raise RateLimited if the key may not send `count` more records now."""
        if key.records_per_second is None:
            return
        rate = key.records_per_second * self._share
        # Always room for a full batch, or a low limit would refuse large batches forever.
        bucket = self._bucket(self._records, key.id, rate, max(rate, float(MAX_RECORDS)))
        self._take(bucket, count, "records")

    def middleware(self) -> Middleware:
        """A middleware that refuses a keyed request over its key's request rate, unread."""

        @web.middleware
        async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
            key = request.get(API_KEY)
            if key is not None:
                self.check_request(key)
            return await handler(request)

        return limit

    @staticmethod
    def _bucket(
        buckets: dict[tuple[str, float], TokenBucket], key_id: str, rate: float, burst: float
    ) -> TokenBucket:
        bucket = buckets.get((key_id, rate))
        if bucket is None:
            bucket = buckets[(key_id, rate)] = TokenBucket(rate, burst)
        return bucket

    @staticmethod
    def _take(bucket: TokenBucket, count: int, what: str) -> None:
        wait_s = bucket.take(count, time.monotonic())
        if wait_s:
            raise RateLimited(
                f"this API key is limited to {bucket.rate:g} {what}/s here; retry later",
                retry_after=max(1, math.ceil(wait_s)),
            )
