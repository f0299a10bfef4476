"""The CAFe record types: their JSON Schemas, compiled once, and per-record validation."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import fastjsonschema
import orjson

from gateway.errors import InvalidEnvelope

SCHEMA_VERSION = 1
MAX_RECORDS = 500
SCHEMA_BASE = "https://cafe.example.com/v1/schema/"
# The longest sessionId, and so Kafka key, a schema may allow: the partition cache in
# gateway/kafka.py is sized for keys of at most this many characters (512 bytes).
MAX_KEY_LENGTH = 128

# RFC 3339 section 5.6, strictly: a 'T', seconds, and an offset with a colon.
_DATE_TIME = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt]([0-9]{2}:[0-9]{2}):([0-9]{2})(\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def is_rfc3339_date_time(value: str) -> bool:
    """True for a real RFC 3339 date-time (the calendar and clock are checked too)."""
    match = _DATE_TIME.fullmatch(value)
    if match is None:
        return False
    try:
        # The common case in one C call; what it refuses is looked at again below.
        datetime.fromisoformat(value)
    except ValueError:
        pass
    else:
        return True
    date, hour_minute, second, fraction, offset = match.groups()
    # RFC 3339 allows a leap second, which datetime cannot hold; check it as :59. It
    # also allows lower-case t and z, and any number of fraction digits.
    second = "59" if second == "60" else second
    offset = "+00:00" if offset in "Zz" else offset
    try:
        datetime.fromisoformat(f"{date}T{hour_minute}:{second}{(fraction or '')[:7]}{offset}")
    except ValueError:
        return False
    return True


# fastjsonschema's built-in date-time accepts offsets without a colon; ours does not.
_FORMATS: dict[str, Callable[[str], bool]] = {"date-time": is_rfc3339_date_time}


def schema_dir() -> Path:
    """The record schemas: packaged inside an installed wheel, else the source tree's."""
    packaged = Path(__file__).parent / "schema_files"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "schemas"


def envelope_schema(record_type: str) -> dict[str, Any]:
    """The request body schema of POST /v1/<record_type>, as the spec writes it."""
    return {
        "type": "object",
        "definitions": {},
        "$schema": "http://json-schema.org/draft-07/schema#",
        "properties": {
            "records": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_RECORDS,
                "items": {"$ref": SCHEMA_BASE + record_type},
            }
        },
        "required": ["records"],
        "additionalProperties": False,
    }


@dataclass(frozen=True)
class RecordType:
    """One record type: its name in URLs and the sink's calls, its schema and validator."""

    name: str
    schema: Mapping[str, Any]
    validate: Callable[[Any], Any]
    # The longest sessionId the schema allows: a longer one is no Kafka key.
    max_key_length: int


def load_record_types(names: Iterable[str]) -> dict[str, RecordType]:
    """Read and compile the schema of each named type (schemas/<name>.json); a missing or
    broken one raises at start-up.

    A schema is broken, too, when it does not promise what the gateway reads of the
    records it passes: the ValueError names the file and what is missing.
    """
    types = {}
    for name in names:
        path = schema_dir() / f"{name}.json"
        try:
            schema = orjson.loads(path.read_bytes())
        except OSError as exc:
            raise ValueError(f"schema {path} cannot be read: {exc.strerror}") from None
        # Our schemas set no defaults: leaving out the code that fills them in saves a
        # few percent of every validation.
        validate = fastjsonschema.compile(schema, formats=_FORMATS, use_default=False)
        _check_what_the_gateway_reads(path, name, schema)
        types[name] = RecordType(
            name=name,
            schema=schema,
            validate=validate,
            max_key_length=schema["properties"]["sessionId"]["maxLength"],
        )
    return types


def _check_what_the_gateway_reads(path: Path, name: str, schema: dict[str, Any]) -> None:
    """Refuse a (well-formed) schema that does not promise what ingest reads of a record.

    Ingest takes the sessionId of every record the schema passes as its Kafka key and
    compares its productPlatform with the API key's platforms: a schema that let a record
    through without them would turn that record into a 500.
    """
    if schema.get("$id") != SCHEMA_BASE + name:
        raise ValueError(f"schema {path} has $id {schema.get('$id')!r}, not {SCHEMA_BASE + name!r}")
    if schema.get("type") != "object":
        raise ValueError(f'schema {path} must say "type": "object": ingest reads fields of records')
    required = schema.get("required", [])
    properties = schema.get("properties", {})
    for field in ("sessionId", "productPlatform"):
        if field not in required:
            raise ValueError(
                f"schema {path} does not require {field}: ingest reads it of every record"
            )
        if properties.get(field, {}).get("type") != "string":
            raise ValueError(f'schema {path} must give {field} "type": "string"')
    shortest = properties["sessionId"].get("minLength")
    longest = properties["sessionId"].get("maxLength")
    if not (
        isinstance(shortest, int)
        and isinstance(longest, int)
        and 1 <= shortest <= longest <= MAX_KEY_LENGTH
    ):
        raise ValueError(
            f"schema {path} must bound sessionId, the Kafka key, to minLength >= 1 and "
            f"maxLength <= {MAX_KEY_LENGTH}, not {shortest!r} and {longest!r}"
        )


# The spec's envelope with its items left to the per-record validators, so one bad
# record rejects that record, not the whole request.
_envelope = envelope_schema("any")
_envelope["properties"]["records"]["items"] = {}
_validate_envelope = fastjsonschema.compile(_envelope)


def records_of(body: Any) -> list[Any]:
    """The records of a request body, or InvalidEnvelope naming what is wrong."""
    try:
        _validate_envelope(body)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise InvalidEnvelope(_message(exc, "body")) from None
    records: list[Any] = body["records"]
    return records


def record_error(record_type: RecordType, record: Any) -> dict[str, str] | None:
    """The first schema violation of one record, as a JSON pointer and a message."""
    try:
        record_type.validate(record)
    except fastjsonschema.JsonSchemaValueException as exc:
        return {"pointer": _pointer(exc.path), "message": _message(exc, "record")}
    return None


def _pointer(path: Sequence[object]) -> str:
    # fastjsonschema's path starts with the name "data" for the document itself.
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path[1:])


def _message(exc: fastjsonschema.JsonSchemaValueException, name: str) -> str:
    message: str = exc.message
    return name + message.removeprefix("data")
