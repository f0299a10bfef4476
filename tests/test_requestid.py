"""Request ids: unique within an app and between apps (forked workers make one each)."""

from __future__ import annotations

import re

from gateway.http.requestid import RequestIds


def test_ids_are_32_hex_digits_and_never_repeat() -> None:
    first, second = RequestIds(), RequestIds()
    ids = [first.next() for _ in range(1000)] + [second.next() for _ in range(1000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
