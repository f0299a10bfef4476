"""Per-key rate limits: token buckets shared by forked workers, and 429 + Retry-After."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import orjson
import pytest

from devkit.samples import curl_bodies
from gateway.cli import main
from gateway.errors import RateLimited
from gateway.keys.file import read_keys_file, write_keys_file
from gateway.keys.model import ApiKey, KeysFileError, mint_key, rotate_key
from gateway.limits.local import BucketTable, RateLimiter, TokenBucket
from gateway.sink import MemorySink
from tests.support.app import GatewayClient, gateway_settings
from tests.support.keys import KeyFile, json_headers


def test_a_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=10, burst=20)
    start = bucket._stamp
    assert bucket.take(20, start) == 0.0
    assert bucket.take(1, start) == pytest.approx(0.1)
    assert bucket.take(5, start + 0.5) == 0.0  # 5 tokens came back in half a second
    assert bucket.take(20, start + 100) == 0.0  # never more than the burst
    assert bucket.take(1, start + 100) > 0


def test_a_shared_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    table = BucketTable()
    bucket = ("k_000000000000", "records", 10.0)
    start = 1000.0

    def take(count: float, now: float) -> float | None:
        return table.take(bucket, 10, 20, count, now)

    assert take(20, start) == 0.0  # a new bucket starts full
    assert take(1, start) == pytest.approx(0.1)
    assert take(5, start + 0.5) == 0.0  # 5 tokens came back in half a second
    assert take(20, start + 100) == 0.0  # never more than the burst
    assert take(1, start + 100) == pytest.approx(0.1)
    # Another kind or rate of the same key is another bucket.
    assert table.take(("k_000000000000", "records", 11.0), 11, 20, 20, start + 100) == 0.0


def limited_key(
    requests_per_second: float | None = None, records_per_second: float | None = None
) -> ApiKey:
    _, key = mint_key(
        ("analytics-portal",),
        requests_per_second=requests_per_second,
        records_per_second=records_per_second,
    )
    return key


async def test_a_key_without_limits_is_never_refused() -> None:
    limiter = RateLimiter(workers=1)
    key = limited_key()
    for _ in range(10_000):
        await limiter.check_request(key)
        await limiter.check_records(key, 500)


def test_workers_share_a_key_s_buckets() -> None:
    # Two workers, as `cafe-gateway serve` forks them: the table is made before the fork.
    buckets = BucketTable()
    limiter = RateLimiter(workers=2, buckets=buckets)
    key = limited_key(requests_per_second=10)
    pid = os.fork()
    if pid == 0:  # the other worker: one connection gets the key's whole rate
        code = 1
        try:
            for _ in range(10):
                asyncio.run(limiter.check_request(key))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # Within the next token's 0.1 s, the parent finds the bucket drained.
    with pytest.raises(RateLimited) as info:
        asyncio.run(limiter.check_request(key))
    assert "limited to 10 requests/s;" in info.value.detail


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail with TimeoutError instead of hanging (SIGALRM interrupts a waiting lock)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still waiting after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_worker_killed_holding_the_lock_blocks_no_one() -> None:
    buckets = BucketTable()
    limiter = RateLimiter(workers=2, buckets=buckets)
    key = limited_key(requests_per_second=10)
    ready, tell = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker that dies inside the critical section
        try:
            fcntl.lockf(buckets._fd, fcntl.LOCK_EX)
            os.write(tell, b"locked")
            time.sleep(60)
        finally:
            os._exit(1)
    try:
        assert os.read(ready, 6) == b"locked"
        with pytest.raises(OSError):  # the child does hold it
            fcntl.lockf(buckets._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(ready)
        os.close(tell)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    with deadline(5):
        asyncio.run(limiter.check_request(key))


def test_past_a_full_table_buckets_fall_back_to_each_worker_s_share(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = RateLimiter(workers=2, buckets=BucketTable(slots=1))
    first, second, third = (limited_key(requests_per_second=4) for _ in range(3))
    with caplog.at_level(logging.WARNING, logger="gateway.limits.local"):
        asyncio.run(limiter.check_request(first))  # takes the one slot
        for _ in range(2):  # no room: this worker's half of 4/s, burst 2
            asyncio.run(limiter.check_request(second))
        with pytest.raises(RateLimited) as info:
            asyncio.run(limiter.check_request(second))
        asyncio.run(limiter.check_request(third))
    assert "limited to 4 requests/s;" in info.value.detail
    assert [r.getMessage() for r in caplog.records] == [
        "rate-limit table full (1 slots): further limits are kept by each worker, "
        "at 1/2 of the rate"
    ]


def test_a_rotated_key_and_its_successors_share_one_limit() -> None:
    limiter = RateLimiter(workers=1)
    old = limited_key(requests_per_second=2)
    _, new, _ = rotate_key([old], old.id, 3600, time.time())
    _, newer, _ = rotate_key([new], new.id, 3600, time.time())
    assert new.rotated_from == newer.rotated_from == old.id
    asyncio.run(limiter.check_request(old))
    asyncio.run(limiter.check_request(new))
    with pytest.raises(RateLimited):  # the grace period does not double the limit
        asyncio.run(limiter.check_request(newer))


def test_a_full_batch_fits_even_under_a_low_record_rate() -> None:
    limiter = RateLimiter(workers=1)
    key = limited_key(records_per_second=10)
    asyncio.run(limiter.check_records(key, 500))
    with pytest.raises(RateLimited) as info:
        asyncio.run(limiter.check_records(key, 1))
    assert info.value.headers() == {"Retry-After": "1"}


@pytest.fixture
def limited_key_file(tmp_path: Path) -> KeyFile:
    plaintext, record = mint_key(
        ("analytics-portal",), requests_per_second=2, records_per_second=600
    )
    path = tmp_path / "keys.json"
    write_keys_file(path, [record])
    return KeyFile(path, plaintext, record)


async def test_over_the_request_rate_is_429_with_retry_after_and_unread(
    gateway_client: GatewayClient, limited_key_file: KeyFile
) -> None:
    sink = MemorySink()
    client = await gateway_client(gateway_settings(keys_file=limited_key_file.path), sink=sink)
    headers = json_headers(limited_key_file.key)
    statuses = []
    for _ in range(3):
        resp = await client.post("/v1/log", data=curl_bodies()["log"], headers=headers)
        statuses.append(resp.status)
    assert statuses == [200, 200, 429]
    body = await resp.json(content_type=None)
    assert body["code"] == "rate_limited"
    assert resp.headers["Retry-After"] == "1"
    assert resp.headers["Connection"] == "close"  # the body was not read
    assert len(sink.records["log"]) == 2


async def test_over_the_record_rate_is_429_and_nothing_is_produced(
    gateway_client: GatewayClient, limited_key_file: KeyFile
) -> None:
    sink = MemorySink()
    client = await gateway_client(gateway_settings(keys_file=limited_key_file.path), sink=sink)
    record = orjson.loads(curl_bodies()["log"])["records"][0]
    batch = orjson.dumps({"records": [record] * 500})
    headers = json_headers(limited_key_file.key)
    first = await client.post("/v1/log", data=batch, headers=headers)
    assert first.status == 200
    second = await client.post("/v1/log", data=batch, headers=headers)
    assert second.status == 429
    assert (await second.json(content_type=None))["code"] == "rate_limited"
    assert len(sink.records["log"]) == 500


@pytest.mark.parametrize("value", [0, -1, "fast", True])
def test_a_bad_limit_in_the_keys_file_is_refused(tmp_path: Path, value: object) -> None:
    _, record = mint_key(("web",))
    doc = {"keys": [{**asdict(record), "requests_per_second": value}]}
    path = tmp_path / "keys.json"
    path.write_bytes(orjson.dumps(doc))
    with pytest.raises(KeysFileError, match="requests_per_second must be a positive number"):
        read_keys_file(path)


def test_limits_survive_a_round_trip_through_the_file(tmp_path: Path) -> None:
    _, record = mint_key(("web",), requests_per_second=5, records_per_second=2.5)
    write_keys_file(tmp_path / "keys.json", [record])
    assert read_keys_file(tmp_path / "keys.json") == [record]


def test_keys_create_sets_limits_and_list_shows_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "keys.json")
    create = ["keys", "--keys-file", path, "create", "--platform", "web"]
    assert main([*create, "--requests-per-second", "5", "--records-per-second", "2000"]) == 0
    assert main(create) == 0
    capsys.readouterr()
    assert main(["keys", "--keys-file", path, "list"]) == 0
    limited, unlimited = capsys.readouterr().out.splitlines()
    assert limited.endswith("\t5 requests/s, 2000 records/s")
    assert unlimited.endswith("\tunlimited")
    with pytest.raises(SystemExit):
        main([*create, "--records-per-second", "0"])
