"""The CAFe record types: their JSON Schemas, compiled once, and per-record validation.

Records are checked by one of two validators (CAFE_VALIDATOR): fastjsonschema, the
design's, or jsonschema-rs, two to three times as fast per record and an optional
extra (`cafe-gateway[fast]`). Each record type carries the `check` its validator compiled.
Both compile the same schema files with the same format rules, and a record is refused
for the same violation in the same words whichever checks it: jsonschema-rs reports
every violation, and the one fastjsonschema would have stopped at is picked and worded
as fastjsonschema words it. tests/test_validators.py runs both over every test corpus.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fastjsonschema
import orjson

from gateway.config import ConfigError
from gateway.errors import InvalidEnvelope

if TYPE_CHECKING:
    from jsonschema_rs import ValidationError

MAX_RECORDS = 500
SCHEMA_BASE = "https://cafe.example.com/v1/schema/"
# The longest sessionId, and so Kafka key, a schema may allow: the partition cache in
# gateway/kafka/sink.py is sized for keys of at most this many characters (512 bytes).
MAX_KEY_LENGTH = 128

# The first schema violation of a record as a JSON pointer and a message; None if valid.
Check = Callable[[Any], dict[str, str] | None]
# How many of a batch's records, counted from its first, the schema passes: judged in one
# call into the validator, as most batches are wholly valid (see RecordType).
Prefix = Callable[[list[Any]], int]

# RFC 3339 section 5.6, strictly: a 'T', seconds, and an offset with a colon.
_DATE_TIME = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt]([0-9]{2}:[0-9]{2}):([0-9]{2})(\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-5][0-9])"
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


def _fastjsonschema_format(name: str) -> Callable[[str], bool]:
    """fastjsonschema's own check of the format `name`, for another validator to call."""
    validate = fastjsonschema.compile({"format": name})

    def check(value: str) -> bool:
        try:
            validate(value)
        except fastjsonschema.JsonSchemaValueException:
            return False
        return True

    return check


# fastjsonschema's built-in date-time accepts offsets without a colon; ours does not.
_FORMATS: dict[str, Callable[[str], bool]] = {"date-time": is_rfc3339_date_time}
# Every format a record schema may use, and its one meaning, which jsonschema-rs is given
# in place of its own: ours for date-time, fastjsonschema's (the design's) for the rest.
# Its own judge some values differently: its uri refuses "a:ü", which fastjsonschema's
# takes; its date-time takes year 0000, which ours refuses. Calls into Python were most
# of what jsonschema-rs cost, so a first pass checks a record with native stand-ins for
# these formats (_NATIVE_FORMATS), and only a record refused there meets this Python.
_SHARED_FORMATS = {
    **_FORMATS,
    **{name: _fastjsonschema_format(name) for name in ("uri", "ipv4", "ipv6")},
}


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
class FormatVersion:
    """One version of a record type's format: its schema (schemas/<type>/<n>.json) and
    the checks the validator the settings name compiled from it."""

    number: int
    schema: Mapping[str, Any]
    check: Check
    # The same schema applied to a whole batch at once: the records before the index it
    # gives are valid, and need no `check` of their own. One call for 500 records costs
    # 0.3 us a record less than 500 calls with fastjsonschema, and 0.4 us less with
    # jsonschema-rs (measured, W500 activity records).
    valid_prefix: Prefix


@dataclass(frozen=True)
class RecordType:
    """One record type: its name in URLs and the sink's calls, and its format versions.

    A record is judged by the version its messageFormatVersion names. Each version's
    schema fixes messageFormatVersion to its number, so a record is valid under at most
    one version. A record whose messageFormatVersion is no integer (or is missing) is
    judged by the newest version, whose schema says what is wrong with it."""

    name: str
    versions: Mapping[int, FormatVersion]  # by number, oldest first
    # The longest sessionId any version allows: a longer one is no Kafka key.
    max_key_length: int

    @property
    def newest(self) -> FormatVersion:
        return self.versions[max(self.versions)]

    @property
    def schema(self) -> Mapping[str, Any]:
        """The newest version's schema: what GET /v1/schema/<type> serves."""
        return self.newest.schema

    def version_of(self, record: Any) -> FormatVersion | None:
        """The version that judges `record`; None if it names a version not known here."""
        number = record.get("messageFormatVersion") if isinstance(record, dict) else None
        # 2.0 is the integer 2 to JSON Schema; true is no integer (though Python's 1).
        if isinstance(number, float) and number.is_integer():
            number = int(number)
        if not isinstance(number, int) or isinstance(number, bool):
            return self.newest
        return self.versions.get(number)

    def judge(self, record: Any) -> tuple[int | None, dict[str, str] | None]:
        """The number of the version that judged `record` (None: one not known here),
        and its first violation (None if it is valid)."""
        version = self.version_of(record)
        if version is None:
            known = ", ".join(str(number) for number in self.versions)
            return None, {
                "pointer": "/messageFormatVersion",
                "message": f"record.messageFormatVersion must be a version of {self.name} "
                f"this gateway knows: {known}",
            }
        return version.number, version.check(record)

    def check(self, record: Any) -> dict[str, str] | None:
        """The first violation of `record` (None if it is valid)."""
        return self.judge(record)[1]

    def valid_prefix(self, records: list[Any]) -> tuple[int, int | None]:
        """How many of `records`, from the first, are valid, and the number of their
        version: the first record's version is applied to the batch whole (a record of
        another version ends the prefix, as each version fixes messageFormatVersion)."""
        version = self.version_of(records[0]) if records else None
        if version is None:
            return 0, None
        return version.valid_prefix(records), version.number


def load_record_types(names: Iterable[str], validator: str) -> dict[str, RecordType]:
    """Read every format version of each named type (schemas/<name>/<n>.json) and compile
    it with `validator` (fastjsonschema or jsonschema-rs); a type with no version, or a
    version missing or broken, raises at start-up.

    A schema is broken, too, when it does not promise what the gateway reads of the
    records it passes, or uses a format the two validators would not check alike: the
    ValueError names the file and what is wrong.
    """
    _compiler(validator)  # an unknown or missing validator is named before any file
    types = {}
    for name in names:
        versions = {}
        for number, path in _version_files(name):
            try:
                schema = orjson.loads(path.read_bytes())
            except OSError as exc:
                raise ValueError(f"schema {path} cannot be read: {exc.strerror}") from None
            try:
                versions[number] = compile_version(schema, number, validator)
            except ValueError as exc:
                raise ValueError(
                    f"schema {path} does not compile with {validator}: {exc}"
                ) from None
            _check_what_the_gateway_reads(path, name, number, schema)
            _check_formats(path, schema)
        types[name] = RecordType(
            name=name,
            versions=versions,
            max_key_length=max(
                v.schema["properties"]["sessionId"]["maxLength"] for v in versions.values()
            ),
        )
    return types


def compile_version(schema: dict[str, Any], number: int, validator: str) -> FormatVersion:
    """Format version `number` of a record type, its schema compiled with `validator`;
    ValueError if it does not compile."""
    check, valid_prefix = _compiler(validator)(schema)
    return FormatVersion(number, schema, check, valid_prefix)


def _version_files(name: str) -> list[tuple[int, Path]]:
    """The format versions of record type `name` on disk, oldest first: schemas/<name>/1.json,
    2.json, ... with no version left out."""
    directory = schema_dir() / name
    try:
        files = sorted(directory.iterdir())
    except OSError as exc:
        raise ValueError(f"schema directory {directory} cannot be read: {exc.strerror}") from None
    versions = {}
    for path in files:
        if path.suffix != ".json":
            continue
        if not re.fullmatch(r"[1-9][0-9]{0,5}", path.stem):
            raise ValueError(f"schema {path} is not named <version>.json (1.json, 2.json, ...)")
        versions[int(path.stem)] = path
    numbers = sorted(versions)
    if not numbers or numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(
            f"the versions of {name} in {directory} must be 1 to the newest, each once: "
            f"found {numbers or 'none'}"
        )
    return [(number, versions[number]) for number in numbers]


def _compiler(validator: str) -> Callable[[dict[str, Any]], tuple[Check, Prefix]]:
    """What compiles a schema into a record's check and a batch's with the named
    validator."""
    if validator == "fastjsonschema":
        return _fastjsonschema_checks
    if validator != "jsonschema-rs":
        raise ConfigError(f"CAFE_VALIDATOR={validator!r} is not fastjsonschema or jsonschema-rs")
    # An optional extra: without it, a message that says how to install it.
    if importlib.util.find_spec("jsonschema_rs") is None:
        raise ConfigError(
            "CAFE_VALIDATOR=jsonschema-rs needs the jsonschema-rs package, an extra of the "
            "gateway: pip install 'cafe-gateway[fast]'"
        )
    return _jsonschema_rs_checks


def _check_what_the_gateway_reads(
    path: Path, name: str, number: int, schema: dict[str, Any]
) -> None:
    """Refuse a (well-formed) schema that does not promise what ingest reads of a record.

    Ingest takes the sessionId of every record the schema passes as its Kafka key and
    compares its productPlatform with the API key's platforms: a schema that let a record
    through without them would turn that record into a 500. And it picks a record's
    version by its messageFormatVersion, which the version's schema must require and fix
    to its number.
    """
    uri = f"{SCHEMA_BASE}{name}/{number}"
    if schema.get("$id") != uri:
        raise ValueError(f"schema {path} has $id {schema.get('$id')!r}, not {uri!r}")
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
    version = properties.get("messageFormatVersion", {})
    fixed = version.get("const")
    if "messageFormatVersion" not in required or fixed != number or isinstance(fixed, bool):
        raise ValueError(
            f'schema {path} must require messageFormatVersion and fix it ("const") to '
            f"{number}: a record is judged by the version it names"
        )


def _check_formats(path: Path, schema: dict[str, Any]) -> None:
    """Refuse a format outside _SHARED_FORMATS: fastjsonschema would ignore one it does
    not know, jsonschema-rs check it by its own rules, and the two would disagree."""
    for name in _formats_in(schema):
        if name not in _SHARED_FORMATS:
            raise ValueError(
                f"schema {path} uses the format {name!r}, which the validators do not check "
                f"alike; give it one meaning in _SHARED_FORMATS (gateway/schemas.py)"
            )


def _formats_in(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("format"), str):
            yield node["format"]
        for value in node.values():
            yield from _formats_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from _formats_in(value)


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


def _pointer(path: Sequence[str | int]) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


# fastjsonschema


def _fastjsonschema_check(schema: dict[str, Any]) -> Check:
    # Our schemas set no defaults: leaving out the code that fills them in saves a few
    # percent of every validation.
    validate = fastjsonschema.compile(schema, formats=_FORMATS, use_default=False)

    def check(record: Any) -> dict[str, str] | None:
        try:
            validate(record)
        except fastjsonschema.JsonSchemaValueException as exc:
            # Its path starts with the name "data" for the document itself.
            return {"pointer": _pointer(exc.path[1:]), "message": _message(exc, "record")}
        return None

    return check


def _fastjsonschema_checks(schema: dict[str, Any]) -> tuple[Check, Prefix]:
    validate = fastjsonschema.compile(
        {"type": "array", "items": schema}, formats=_FORMATS, use_default=False
    )

    def valid_prefix(records: list[Any]) -> int:
        try:
            validate(records)
        except fastjsonschema.JsonSchemaValueException as exc:
            # The first record it refused: its path is "data", then the record's index.
            return int(exc.path[1])
        return len(records)

    return _fastjsonschema_check(schema), valid_prefix


def _message(exc: fastjsonschema.JsonSchemaValueException, name: str) -> str:
    message: str = exc.message
    return name + message.removeprefix("data")


# jsonschema-rs


def _jsonschema_rs_checks(schema: dict[str, Any]) -> tuple[Check, Prefix]:
    import jsonschema_rs

    whole = jsonschema_rs.validator_for(
        _with_native_formats({"type": "array", "items": schema}),
        formats=_SHARED_FORMATS,
        validate_formats=True,
    )

    def valid_prefix(records: list[Any]) -> int:
        # It says only whether all pass: if not, each is checked on its own. Past its
        # depth of nesting it raises ValueError, which each record's check deals with.
        try:
            return len(records) if whole.is_valid(records) else 0
        except ValueError:
            return 0

    return _jsonschema_rs_check(schema), valid_prefix


def _jsonschema_rs_check(schema: dict[str, Any]) -> Check:
    import jsonschema_rs

    validator = jsonschema_rs.validator_for(schema, formats=_SHARED_FORMATS, validate_formats=True)
    # Most records are valid, and pass this one: the same schema with patterns in place
    # of the formats they stand in for, checked without a call into Python. It builds no
    # errors, and what it refuses (an IRI, say) the full validator judges.
    first_pass = jsonschema_rs.validator_for(
        _with_native_formats(schema), formats=_SHARED_FORMATS, validate_formats=True
    )
    # jsonschema-rs reads at most 255 levels of nesting, and raises ValueError past them;
    # orjson parses 1024. No valid record nests that deep: fastjsonschema finds its fault.
    too_deep = _fastjsonschema_check(schema)

    def check(record: Any) -> dict[str, str] | None:
        try:
            if first_pass.is_valid(record):
                return None
            errors = list(validator.iter_errors(record))
        except ValueError:
            return too_deep(record)
        if not errors:
            return None
        first = min(errors, key=lambda error: _fastjsonschema_rank(schema, error))
        return {"pointer": _pointer(first.instance_path), "message": _words(schema, record, first)}

    return check


# Native stand-ins for formats, in jsonschema-rs's pattern syntax: each accepts only
# values its format accepts (it may refuse more), so a record that passes with them
# passes with the formats. tests/test_validators.py holds each to that.
_YEAR = "(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"  # 0001 to 9999
_LEAP_YEAR = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_NATIVE_FORMATS = {
    # is_rfc3339_date_time: the calendar with its leap years, the clock with a leap
    # second, ASCII digits only.
    "date-time": (
        f"^(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
        "|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))"
        f"|{_LEAP_YEAR}-02-29)"
        "[Tt](?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:[.][0-9]{1,9})?"
        "(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$"
    ),
    # fastjsonschema's uri (a word, a colon, no white space) in printable ASCII: Python's
    # \w and \s are not Rust's.
    "uri": "^[A-Za-z0-9_]+:[!-~]+$",
    "ipv4": "^(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])[.]){3}"
    "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$",
}


def _with_native_formats(node: Any) -> Any:
    """A copy of a schema with each format of _NATIVE_FORMATS turned into its pattern."""
    if isinstance(node, list):
        return [_with_native_formats(value) for value in node]
    if not isinstance(node, dict):
        return node
    copy = {key: _with_native_formats(value) for key, value in node.items()}
    name = copy.get("format")
    pattern = _NATIVE_FORMATS.get(name) if isinstance(name, str) else None
    if pattern is not None and "pattern" not in copy:
        del copy["format"]
        copy["pattern"] = pattern
    return copy


# The order in which fastjsonschema checks the keywords of one schema (its draft-07 code
# generator: draft 4's keywords, then those drafts 6 and 7 added). It stops at the first
# violation, so this order decides which of several a record is refused for.
_KEYWORD_ORDER = (
    "type", "enum", "allOf", "anyOf", "oneOf", "not", "minLength", "maxLength", "pattern",
    "format", "minimum", "maximum", "multipleOf", "minItems", "maxItems", "uniqueItems",
    "items", "minProperties", "maxProperties", "required", "dependencies", "properties",
    "patternProperties", "additionalProperties", "exclusiveMinimum", "exclusiveMaximum",
    "propertyNames", "contains", "const", "if", "contentEncoding", "contentMediaType",
)  # fmt: skip
_KEYWORD_RANK = {keyword: rank for rank, keyword in enumerate(_KEYWORD_ORDER)}


def _fastjsonschema_rank(schema: Mapping[str, Any], error: ValidationError) -> list[int]:
    """When fastjsonschema would meet `error` in its walk of the record: depth first, a
    schema's keywords in _KEYWORD_ORDER, an object's properties in the order the schema
    lists them, an array's items in turn. Of several errors it reports the one it meets
    first, the smallest rank; jsonschema-rs reports them all, properties in the record's
    order. (Our schemas go down into a record through properties and items only.)"""
    rank = []
    node = schema
    depth = 0  # how far down error.instance_path the walk has gone
    steps = iter(error.schema_path)
    for keyword in steps:
        rank.append(_KEYWORD_RANK.get(str(keyword), len(_KEYWORD_RANK)))
        if keyword == "properties":
            name = next(steps)
            rank.append(list(node["properties"]).index(name))
            node = node["properties"][name]
            depth += 1
        elif keyword == "items":
            # One schema for every item: the item's index is in the instance path only.
            rank.append(int(error.instance_path[depth]))
            node = node["items"]
            depth += 1
    return rank


# fastjsonschema's words for each violation, given the keyword's value in the schema.
_WORDS = {
    "type": "must be {}",
    "enum": "must be one of {}",
    "const": "must be same as const definition: {}",
    "anyOf": "cannot be validated by any definition",
    "minLength": "must be longer than or equal to {} characters",
    "maxLength": "must be shorter than or equal to {} characters",
    "pattern": "must match pattern {}",
    "format": "must be {}",
    "minimum": "must be bigger than or equal to {}",
    "maximum": "must be smaller than or equal to {}",
    "minItems": "must contain at least {} items",
    "maxItems": "must contain less than or equal to {} items",
    "minProperties": "must contain at least {} properties",
    "maxProperties": "must contain less than or equal to {} properties",
    "required": "must contain {} properties",
    "additionalProperties": "must not contain {} properties",
}


def _words(schema: Mapping[str, Any], record: Any, error: ValidationError) -> str:
    """The message fastjsonschema gives for `error`, e.g. "record.tags[0].key must be
    longer than or equal to 1 characters". jsonschema-rs's own messages would repeat the
    value, which may be as long as the body."""
    *parents, keyword = error.schema_path
    node: Any = schema
    for step in parents:
        node = node[step]
    value = record
    for step in error.instance_path:
        value = value[step]
    rule = node[keyword]
    if keyword == "type":
        rule = " or ".join(rule) if isinstance(rule, list) else rule
    elif keyword == "required":
        rule = sorted(set(rule) - value.keys())
    elif keyword == "additionalProperties":
        # A set, built as fastjsonschema builds it, so that it lists the names in the
        # same order: the record's keys, less the schema's properties.
        rule = set(value.keys())
        rule.difference_update(node.get("properties", {}))
    where = "".join(
        f"[{step}]" if isinstance(step, int) else f".{step}" for step in error.instance_path
    )
    words = _WORDS.get(str(keyword), f"must satisfy {keyword}")
    return f"record{where} {words.format(rule)}"
