"""Properties of POST /v1/<type> over generated input: never a 5xx, only valid records produced.

Hypothesis runs each example through one gateway per test (pytest-asyncio runs the
async test body once per example on the test's loop), so the sink is emptied at the
start of every example. Example counts are bounded to keep the file near ten seconds.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.schemas import schema_dir
from gateway.sink import MemorySink
from tests.support.app import Gateway, GatewayClient, gateway_settings
from tests.support.corpora import LIMIT
from tests.support.keys import KeyFile
from tests.support.records import DEAD, NAMES, sample, schema
from tests.support.strategies import JSON, PLATFORM, VALID_BATCHES, changed_records


def bounded(examples: int) -> settings:
    """Hypothesis settings for one property: `examples` runs, no deadline, no database."""
    return settings(
        max_examples=examples,
        deadline=None,
        # No .hypothesis/ directory in the work tree; failures print their reproducer.
        database=None,
        # One gateway serves every example of a test, on purpose: building one per
        # example would cost more than the examples.
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@pytest.fixture
async def gw(gateway_client: GatewayClient, key_file: KeyFile) -> Gateway:
    sink = MemorySink()
    client = await gateway_client(
        gateway_settings(keys_file=key_file.path, max_body_bytes=LIMIT), sink=sink
    )
    return Gateway(client, key_file, sink=sink)


# An independent judge of what reaches a record topic: the jsonschema package, not the
# fastjsonschema code the gateway validates with.
# One per format version on disk, picked by the version the record names.
JUDGES = {
    name: {
        int(path.stem): jsonschema.Draft7Validator(
            schema(name, int(path.stem)), format_checker=jsonschema.FormatChecker()
        )
        for path in (schema_dir() / name).glob("*.json")
    }
    for name in NAMES
}


async def post_and_check(gw: Gateway, name: str, body: bytes) -> int:
    """POST `body`, check the answer and what was produced agree; return the status."""
    gw.sink.records.clear()
    gw.sink.rejected.clear()
    status, answer, resp = await gw.post(f"/v1/{name}", body)
    assert status < 500, answer
    produced = gw.produced()
    accepted = produced.pop(f"cafe.{name}", [])
    dead = produced.pop(DEAD, [])
    assert produced == {}, "only this route's topic and the dead letters"
    if status in (200, 207, 422):
        assert resp.content_type == "application/json"
        assert len(accepted) == answer["accepted"]
        assert len(dead) == answer.get("rejected", 0)
        assert (status == 200) == (not dead) and (status == 422) == (not accepted)
    else:
        assert resp.content_type == "application/problem+json"
        assert (accepted, dead) == ([], [])
    for message in accepted:
        record = orjson.loads(message.value)
        version = record["messageFormatVersion"]
        JUDGES[name][version].validate(record)
        assert dict(message.headers or [])["cafe-schema-version"] == b"%d" % version
        assert message.key == record["sessionId"].encode()
        assert record["productPlatform"] == PLATFORM
    return status


def _bodies(name: str) -> st.SearchStrategy[Any]:
    records = st.lists(st.just(sample(name)) | changed_records(name) | JSON, min_size=0, max_size=4)
    return st.one_of(
        JSON,
        st.builds(lambda rs: {"records": rs}, records),
        st.builds(
            lambda rs, extra: {"records": rs, **extra},
            records,
            st.dictionaries(st.text(), JSON, max_size=2),
        ),
    )


@bounded(examples=300)
@given(data=st.data())
async def test_any_json_body_is_answered_below_500_and_only_valid_records_are_produced(
    gw: Gateway, data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(NAMES))
    body = data.draw(_bodies(name))
    await post_and_check(gw, name, json.dumps(body).encode())


BYTES = st.one_of(
    st.binary(max_size=512),
    st.builds(lambda b: b'{"records":[' + b, st.binary(max_size=256)),
    st.builds(lambda b: b'{"records":[{"' + b + b'"}]}', st.binary(max_size=64)),
)


@bounded(examples=300)
@given(name=st.sampled_from(NAMES), body=BYTES)
async def test_any_bytes_are_answered_below_500_and_produce_no_record(
    gw: Gateway, name: str, body: bytes
) -> None:
    status = await post_and_check(gw, name, body)
    assert status != 200 and gw.produced().get(f"cafe.{name}", []) == []


@bounded(examples=150)
@given(batch=VALID_BATCHES)
async def test_records_generated_from_the_schema_are_accepted_and_produced_once(
    gw: Gateway, batch: tuple[str, list[dict[str, Any]]]
) -> None:
    name, records = batch
    body = orjson.dumps({"records": records})
    assert await post_and_check(gw, name, body) == 200
    produced = gw.produced()
    assert [orjson.loads(m.value) for m in produced.pop(f"cafe.{name}")] == records
    assert produced == {}
