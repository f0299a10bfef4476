"""Records and bodies made from the spec's samples, and the record schemas walked."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import orjson

from devkit.samples import curl_bodies
from gateway.config import TopicSettings
from gateway.schemas import SCHEMA_BASE, schema_dir
from gateway.sink import Context, Record, Rejected

NAMES = ("activity", "log", "profile")
# The dead-letter topic of the default settings (an in-memory sink's too).
DEAD = TopicSettings().deadletter


# The request the records a test gives a sink straight come from.
CONTEXT = Context("k_0123456789ab", "127.0.0.1", "test-request", "2026-12-01T00:00:00.000Z")


def record(session: str | bytes, value: bytes, context: Context = CONTEXT) -> Record:
    """A valid record as a sink is given it (a bytes session is read as UTF-8)."""
    return Record(session.decode() if isinstance(session, bytes) else session, value, context)


def rejected(
    value: bytes, session: str | None = "s", position: int = 0, context: Context = CONTEXT
) -> Rejected:
    """A rejected record as a sink is given it: invalid, for a made-up reason."""
    errors = [{"pointer": "", "message": "rejected by the test"}]
    return Rejected(value, position, "invalid", errors, session, context)


def sample(name: str, **changes: Any) -> dict[str, Any]:
    """The record of the spec's curl sample for record type `name`, with `changes`."""
    record: dict[str, Any] = orjson.loads(curl_bodies()[name])["records"][0]
    return {**record, **changes}


def envelope(*records: Any) -> bytes:
    """A request body of `records`, compact, in the standard library's encoder: orjson's
    refuses integers past 64 bits."""
    return json.dumps(
        {"records": list(records)}, ensure_ascii=False, separators=(",", ":")
    ).encode()


def nested(depth: int, open_: bytes = b"[", close: bytes = b"]", leaf: bytes = b"") -> bytes:
    """`leaf` inside `depth` levels of `open_` ... `close`."""
    return open_ * depth + leaf + close * depth


def set_at(record: dict[str, Any], pointer: str, value: Any) -> dict[str, Any]:
    """A copy of `record` with `value` at the JSON pointer `pointer`, making the objects
    on the way."""
    record = copy.deepcopy(record)
    *path, last = pointer.strip("/").split("/")
    here: Any = record
    for part in path:
        here = here[int(part)] if isinstance(here, list) else here.setdefault(part, {})
    if isinstance(here, list):
        here[int(last)] = value
    else:
        here[last] = value
    return record


def schema(name: str, version: int = 1) -> dict[str, Any]:
    """The JSON Schema of format version `version` of record type `name`, as shipped."""
    path = schema_dir() / name / f"{version}.json"
    found: dict[str, Any] = orjson.loads(path.read_bytes())
    assert found["$id"] == f"{SCHEMA_BASE}{name}/{version}"
    return found


def properties(of: dict[str, Any], pointer: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every property of a record schema, nested ones too, as (JSON pointer, subschema)."""
    for prop, sub in of.get("properties", {}).items():
        yield f"{pointer}/{prop}", sub
        yield from properties(sub, f"{pointer}/{prop}")
        if "items" in sub:
            yield f"{pointer}/{prop}/0", sub["items"]
            yield from properties(sub["items"], f"{pointer}/{prop}/0")
