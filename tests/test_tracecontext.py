"""W3C trace context: which traceparents are passed on as sent, and the trace a request
without a valid one gets; both reach the records' Kafka headers and the access log."""

from __future__ import annotations

import logging
import re

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.http.context import RequestContext
from gateway.http.tracecontext import MAX_TRACESTATE_CHARS, new_trace, trace_of
from gateway.sink import MemorySink
from tests.support.app import Gateway, GatewayClient, access_lines, gateway_settings
from tests.support.keys import KeyFile
from tests.support.records import DEAD, sample

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
PARENT = f"00-{TRACE}-{SPAN}-01"
NEW = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00")


def read(*headers: tuple[str, str]) -> tuple[str, str | None]:
    request = make_mocked_request("POST", "/v1/activity", headers=CIMultiDict(headers))
    trace = trace_of(request, RequestContext("r"))
    return trace.traceparent, trace.tracestate


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (PARENT, PARENT),
        (f"00-{TRACE}-{SPAN}-00", f"00-{TRACE}-{SPAN}-00"),
        (f" {PARENT}\t", PARENT),  # optional white space around a header's value
        # A later version: its known fields, passed on as version 00.
        (f"01-{TRACE}-{SPAN}-01-more-fields", PARENT),
        (f"cc-{TRACE}-{SPAN}-09", f"00-{TRACE}-{SPAN}-09"),
    ],
)
def test_a_valid_traceparent_is_passed_on(sent: str, kept: str) -> None:
    assert read(("traceparent", sent)) == (kept, None)


@pytest.mark.parametrize(
    "sent",
    [
        "",
        PARENT.upper(),
        f"00-{'0' * 32}-{SPAN}-01",  # the invalid trace id
        f"00-{TRACE}-{'0' * 16}-01",  # the invalid span id
        f"ff-{TRACE}-{SPAN}-01",  # a version that may never be
        f"00-{TRACE}-{SPAN}-01-x",  # version 00 ends at its flags
        f"00-{TRACE[:-1]}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-1",
        f"00_{TRACE}_{SPAN}_01",
        "\u00e9" * 55,
    ],
)
def test_a_traceparent_that_is_not_valid_gives_the_request_a_new_trace(sent: str) -> None:
    traceparent, tracestate = read(("traceparent", sent), ("tracestate", "a=1"))
    assert NEW.fullmatch(traceparent) and TRACE not in traceparent
    assert tracestate is None  # a state belongs to the trace it came with


def test_tracestate_is_kept_whole_or_not_at_all() -> None:
    # Several headers are one list.
    assert read(("traceparent", PARENT), ("tracestate", "a=1"), ("tracestate", "b=2")) == (
        PARENT,
        "a=1,b=2",
    )
    longest = "a=" + "x" * (MAX_TRACESTATE_CHARS - 2)
    assert read(("traceparent", PARENT), ("tracestate", longest))[1] == longest
    assert read(("traceparent", PARENT), ("tracestate", longest + "x"))[1] is None
    assert read(("traceparent", PARENT), ("tracestate", "a=\u00e9"))[1] is None


def test_new_traces_are_valid_and_differ() -> None:
    traces = {new_trace().traceparent for _ in range(1000)}
    assert len(traces) == 1000
    assert all(NEW.fullmatch(t) for t in traces)


def test_a_request_reads_its_trace_once() -> None:
    request = make_mocked_request("POST", "/v1/log")
    context = RequestContext("r")
    assert trace_of(request, context) is trace_of(request, context)


@pytest.fixture
async def gw(gateway_client: GatewayClient, key_file: KeyFile) -> Gateway:
    sink = MemorySink()
    client = await gateway_client(gateway_settings(keys_file=key_file.path), sink=sink)
    return Gateway(client, key_file, sink=sink)


async def test_a_requests_trace_reaches_its_records_dead_letters_and_access_log_line(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    batch = [sample("activity"), sample("activity", eventTime="yesterday")]
    traced = {"traceparent": PARENT, "tracestate": "vendor=opaque"}
    status, _, _ = await gw.post("/v1/activity", {"records": batch}, **traced)
    assert status == 207
    status, _, _ = await gw.post("/v1/activity", {"records": batch[:1]})
    assert status == 200
    produced = gw.produced()
    first, second = (dict(m.headers or ()) for m in produced["cafe.activity"])
    (dead,) = (dict(m.headers or ()) for m in produced[DEAD])
    for headers in (first, dead):
        assert (headers["traceparent"], headers["tracestate"]) == (
            PARENT.encode(),
            b"vendor=opaque",
        )
    assert NEW.fullmatch(second["traceparent"].decode()) and "tracestate" not in second
    lines = [line for line in access_lines(caplog) if line["route"] == "/v1/activity"]
    assert [line["trace_id"] for line in lines] == [TRACE, second["traceparent"][3:35].decode()]
