"""What a record becomes in Kafka: its key and headers, and a dead letter cut to fit."""

from __future__ import annotations

import orjson

from gateway.kafka.messages import DEAD_LETTER_MAX_BYTES, DEAD_LETTER_MAX_ERROR_CHARS, Framer
from gateway.sink import Context, Record, Rejected

FIRST = Context("k_0123456789ab", "127.0.0.1", "req-1", "2026-12-01T00:00:00.000Z")
SECOND = Context("k_0123456789ab", "127.0.0.2", "req-2", "2026-12-01T00:00:01.000Z")


def test_a_requests_records_share_one_header_list_and_each_request_has_its_own() -> None:
    framer = Framer("log")
    records = [Record("s", b"1", FIRST), Record("s", b"2", FIRST), Record("t", b"3", SECOND)]
    first, second, third = framer.records(records)
    assert first.headers is second.headers and third.headers is not first.headers
    assert dict(third.headers or [])["cafe-client-ip"] == b"127.0.0.2"
    assert dict(first.headers or [])["cafe-schema"] == b"log"
    assert (first.key, third.key) == (b"s", b"t")
    assert framer.records(records) == [framer.record(r) for r in records]


def _errors_header(rejected: Rejected) -> list[dict[str, str]]:
    message = Framer("log").dead_letter(rejected)
    errors: list[dict[str, str]] = orjson.loads(dict(message.headers or [])["cafe-errors"])
    return errors


def test_an_error_text_that_only_looks_cut_is_cut_all_the_same() -> None:
    # A client chooses the names of unknown properties, which an error quotes: one that
    # ends as a cut text does must not pass uncut, whatever its length.
    forged = "p" * 900_000 + "... (cut from 5 characters)"
    (error,) = _errors_header(
        Rejected(b"{}", 0, "invalid", [{"pointer": "", "message": forged}], "s", FIRST)
    )
    limit = DEAD_LETTER_MAX_ERROR_CHARS
    assert error["message"] == "p" * limit + f"... (cut from {len(forged)} characters)"


def test_a_text_cut_once_is_not_cut_again() -> None:
    # A dead letter spooled by a version that cut its errors before spooling.
    text = "x" * 5000
    (once,) = _errors_header(
        Rejected(b"{}", 0, "invalid", [{"pointer": "", "message": text}], "s", FIRST)
    )
    (twice,) = _errors_header(Rejected(b"{}", 0, "invalid", [once], "s", FIRST))
    assert twice == once


def test_a_record_cut_before_it_came_keeps_what_it_was_cut_from() -> None:
    framer = Framer("log")
    cut = Rejected(b"x" * 10, 3, "invalid", [], "s", FIRST, (9_000_000, "ab" * 32))
    headers = dict(framer.dead_letter(cut).headers or [])
    assert headers["cafe-original-bytes"] == b"9000000"
    assert headers["cafe-original-sha256"] == b"ab" * 32
    assert headers["cafe-truncated"] == b"true"
    whole = Rejected(b"\xc3\xa9" * DEAD_LETTER_MAX_BYTES, 3, "invalid", [], None, FIRST)
    message = framer.dead_letter(whole)
    # Cut on a whole character, at most the limit.
    assert len(message.value) == DEAD_LETTER_MAX_BYTES and message.value.decode()
    assert message.key is None and "cafe-key-omitted" not in dict(message.headers or [])


def test_the_headers_say_the_records_version_and_leave_out_what_is_not_kept() -> None:
    framer = Framer("activity")
    v2 = Context("k_0123456789ab", "192.0.2.0", "r1", "2026-12-01T00:00:00.000Z", 2)
    neither = v2._replace(client_ip=None, schema_version=None)
    assert framer.headers(v2) == [
        ("cafe-key-id", b"k_0123456789ab"),
        ("cafe-client-ip", b"192.0.2.0"),
        ("cafe-received-at", b"2026-12-01T00:00:00.000Z"),
        ("cafe-request-id", b"r1"),
        ("cafe-schema", b"activity"),
        ("cafe-schema-version", b"2"),
    ]
    names = [name for name, _ in framer.headers(neither)]
    assert names == ["cafe-key-id", "cafe-received-at", "cafe-request-id", "cafe-schema"]
    # A batch of mixed versions: each record with its own version's headers.
    messages = framer.records(
        [Record("s", b"{}", v2), Record("s", b"{}", v2._replace(schema_version=1))]
    )
    assert [dict(m.headers or [])["cafe-schema-version"] for m in messages] == [b"2", b"1"]
