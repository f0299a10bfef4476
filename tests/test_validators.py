"""The two record validators agree: each record of every test corpus is accepted by both,
or refused by both for the same violation (pointer) in the same words (message).

CAFE_VALIDATOR picks fastjsonschema, the design's, or jsonschema-rs. gateway/schemas.py
gives both the same format rules, picks of jsonschema-rs's errors the one fastjsonschema
stops at, and words it as fastjsonschema does. The corpora: the spec's samples, the tables
tests/test_schemas.py and tests/test_hostile.py send (tests/support/corpora.py), records
breaking several rules at once, format values the two libraries' own checks judge
differently, nesting at jsonschema-rs's limit, and the hypothesis strategies
tests/test_ingest_properties.py sends (tests/support/strategies.py).
Every record is also tried with the keys of each object reversed: jsonschema-rs reports
properties in the record's order, fastjsonschema in the schema's. Last, each pattern that
jsonschema-rs's first pass uses in place of a format is held to accepting only what the
format accepts.
"""

from __future__ import annotations

import itertools
import reprlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import orjson
import pytest
from fastjsonschema.draft07 import CodeGeneratorDraft07
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from devkit.samples import sample_requests
from gateway.errors import InvalidEnvelope
from gateway.schemas import (
    _KEYWORD_ORDER,
    _NATIVE_FORMATS,
    _SHARED_FORMATS,
    load_record_types,
    records_of,
)
from tests.support import corpora
from tests.support.records import NAMES, envelope, nested, properties, sample, schema, set_at
from tests.support.strategies import JSON, VALID_BATCHES, changed_records

FAST = load_record_types(NAMES, "fastjsonschema")
RUST = load_record_types(NAMES, "jsonschema-rs")
TIME_FIELD = {"activity": "/eventTime", "log": "/logTime", "profile": "/eventTime"}


class Case(NamedTuple):
    """One record of a corpus as ingest gets it (parsed by orjson), and the type whose
    schema it is checked against."""

    name: str
    record: Any


def disagreement(name: str, record: Any) -> str | None:
    """How the validators' answers for `record` differ; None if they are the same."""
    fast = FAST[name].check(record)
    rust = RUST[name].check(record)
    if fast == rust:
        return None
    return f"{name} {reprlib.repr(record)}\n  fastjsonschema: {fast}\n  jsonschema-rs:  {rust}"


def parsed(name: str, record: Any) -> Case:
    """The record as ingest gets it: sent as JSON, parsed by orjson."""
    return Case(name, orjson.loads(envelope(record))["records"][0])


def records_in(body: bytes) -> list[Any]:
    """The records ingest would validate of a body: none if it is not JSON or no envelope."""
    try:
        return records_of(orjson.loads(body))
    except (orjson.JSONDecodeError, InvalidEnvelope):
        return []


def keys_reversed(value: Any, depth: int = 0) -> Any:
    """`value` with the keys of each object in reverse order (down to 100 levels)."""
    if depth == 100:
        return value
    if isinstance(value, dict):
        return {key: keys_reversed(value[key], depth + 1) for key in reversed(value)}
    if isinstance(value, list):
        return [keys_reversed(item, depth + 1) for item in value]
    return value


# The corpora.


def spec_samples() -> Iterator[Case]:
    for name in NAMES:
        yield parsed(name, sample(name))
        for record in sample_requests()[name]["records"]:
            yield parsed(name, record)


def schema_tables() -> Iterator[Case]:
    """The cases of tests/test_schemas.py."""
    for name, fields in corpora.REQUIRED.items():
        for field in fields:
            yield parsed(name, _without(sample(name), field))
    for name, field in corpora.OPTIONAL:
        yield parsed(name, _without(sample(name), field))
    for name, pointer, value, _ in corpora.BAD_FIELDS:
        yield parsed(name, set_at(sample(name), pointer, value))
    for name, record in itertools.product(NAMES, corpora.NOT_OBJECTS):
        yield parsed(name, record)
    for name, (value, _) in itertools.product(NAMES, corpora.DATE_TIMES):
        yield parsed(name, set_at(sample(name), TIME_FIELD[name], value))
    address = set_at(sample("profile"), "/location/ipAddress", "2001:db8::7")
    yield parsed("profile", address)


def _without(record: dict[str, Any], field: str) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key != field}


def hostile_tables() -> Iterator[Case]:
    """The records of tests/test_hostile.py: its refused batches, strings at and past each
    maxLength, a value of each wrong type in each field, and the records of its bodies."""
    for batch in corpora.REJECTED:
        for record in batch.records:
            yield parsed(batch.name, record)
    for name, pointer, max_length, over in corpora.BOUNDS:
        sub = dict(properties(schema(name)))[pointer]
        value = corpora.string_of(max_length + over, pointer, sub)
        yield parsed(name, set_at(sample(name), pointer, value))
    for name, pointer, types in corpora.WRONG_TYPES:
        for json_type in types:
            value = corpora.JSON_TYPES[json_type]
            yield parsed(name, set_at(sample(name), pointer, value))
    for name, bad in corpora.BAD_CASES:
        for record in records_in(bad.body):
            yield Case(name, record)
    for name, field in itertools.product(NAMES, ("productPlatform", "sessionId")):
        for record in records_in(corpora.with_duplicate(sample(name), field, "x y")):
            yield Case(name, record)


def several_violations() -> Iterator[Case]:
    """Records that break two rules or more, where the order each library walks a schema
    in decides which violation is reported."""
    for name in NAMES:
        record = sample(name)
        for first, second in itertools.combinations(record, 2):
            yield parsed(name, {**record, first: None, second: None})
            yield parsed(name, {**_without(record, first), second: [], "extra": 1})
        yield parsed(name, {**record, **{f"extra{i}": i for i in range(20)}})
        yield parsed(name, {"extra": 1, **{key: 1.5 for key in record}})
        yield parsed(name, {**record, "messageFormatVersion": "1", "x": None})
    tags = [{"key": ""}, {"value": 1}, {"key": "k", "value": "v", "x": 1}, {}]
    yield parsed("activity", {**sample("activity"), "tags": tags})
    for count in range(1, 4):
        yield parsed("activity", {**sample("activity"), "tags": tags[-count:]})
    platform = {"language": "x_y", "screenResolution": {"width": 0}, "osName": "", "z": 1}
    yield parsed("profile", {**sample("profile"), "platform": platform})
    location = {"ipAddress": "x" * 46, "timeZone": "/", "y": 2}
    yield parsed("profile", {**sample("profile"), "location": location})


# Where the libraries' own format checks differ (jsonschema-rs's uri is stricter, for one):
# both must apply the gateway's.
FORMAT_VALUES = {
    "/eventUri": [
        "https://analytics-portal.example.com/", "a:ü", "é:x", "fe80::1%eth0", "a:%zz",
        "a:b#c#d", "mailto:x", "urn:a:b", "a:\x00", "no-scheme", "", "https://x y", "a: b",
        "http://[::1]/", "1:2:3:4:5:6:7:8",
    ],
    "/location/ipAddress": [
        "1.2.3.4", "01.2.3.4", "1.2.3.4\n", "256.1.1.1", "::1", "::ffff:1.2.3.4",
        "fe80::1%eth0", "1:2:3:4:5:6:7:8", "1::2::3", "::", "1.2.3", "",
        "\u0661.\u0662.\u0663.\u0664",  # Arabic-Indic digits
    ],
}  # fmt: skip


def format_values() -> Iterator[Case]:
    for name, (pointer, values) in itertools.product(NAMES, FORMAT_VALUES.items()):
        if pointer in dict(properties(schema(name))):
            for value in values:
                yield parsed(name, set_at(sample(name), pointer, value))


def nesting() -> Iterator[Case]:
    """Values nested around the 255 levels jsonschema-rs reads (orjson parses 1024)."""
    for name, depth, brackets in itertools.product(
        NAMES, (100, 253, 254, 255, 256, 300, 1000), ((b"[", b"]"), (b'{"a":', b"}"))
    ):
        value = nested(depth, *brackets, leaf=b'"leaf"')
        good = orjson.dumps(sample(name))[:-1]
        for record in (
            value,
            good + b',"sessionId":' + value + b"}",
            good + b',"x":' + value + b"}",
        ):
            yield Case(name, orjson.loads(record))


def format_versions() -> Iterator[Case]:
    """Records of each version, of versions not known, and of one version's fields under
    another: activity has versions 1 and 2 (2 adds eventValue and referrer)."""
    for name in NAMES:
        for number in (0, -1, 2, 3, 2.0, 1.0, "2", None, 2**63, 1e300):
            yield parsed(name, {**sample(name), "messageFormatVersion": number})
    v2 = {**sample("activity"), "messageFormatVersion": 2}
    values: list[Any] = [3.5, -1, 0, 1e300, "3", None, True, [], "https://shop.example.com/p?q=1",
                         "not a uri", "https://e.example/" + "x" * 2040]  # fmt: skip
    for field, value in itertools.product(("eventValue", "referrer"), values):
        yield parsed("activity", {**v2, field: value})
        yield parsed("activity", {**sample("activity"), field: value})  # not in version 1


CORPORA = {
    "spec": list(spec_samples()),
    "test_schemas": list(schema_tables()),
    "test_hostile": list(hostile_tables()),
    "several": list(several_violations()),
    "formats": list(format_values()),
    "nesting": list(nesting()),
    "versions": list(format_versions()),
}


@pytest.mark.parametrize("corpus", CORPORA)
def test_both_validators_answer_each_record_alike(corpus: str) -> None:
    # Each record as it arrives, and again with its keys reversed.
    records = CORPORA[corpus] + [Case(c.name, keys_reversed(c.record)) for c in CORPORA[corpus]]
    differences = [d for name, record in records if (d := disagreement(name, record))]
    refused = sum(1 for name, record in records if FAST[name].check(record))
    print(f"{corpus}: {len(records)} records, {refused} refused by both")
    assert not differences, f"{len(differences)} of {len(records)}:\n" + "\n".join(differences)


def test_the_corpora_hold_every_case() -> None:
    """The case count (shown here so a shrinking corpus is noticed)."""
    counts = {corpus: len(cases) for corpus, cases in CORPORA.items()}
    print(f"validator corpora: {sum(counts.values())} records (twice: keys reversed) {counts}")
    assert sum(counts.values()) >= 1000, counts


@settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@given(data=st.data())
def test_both_validators_answer_generated_records_alike(data: st.DataObject) -> None:
    """tests/test_ingest_properties.py's records: the spec's samples with fields replaced by
    any JSON or removed, and any JSON at all."""
    name = data.draw(st.sampled_from(NAMES))
    record = data.draw(changed_records(name) | JSON)
    try:
        case = parsed(name, record)
    except orjson.JSONDecodeError:
        assume(False)  # NaN or Infinity: never parsed, so never validated
    assert disagreement(case.name, case.record) is None
    assert disagreement(case.name, keys_reversed(case.record)) is None


@settings(max_examples=100, deadline=None, database=None)
@given(batch=VALID_BATCHES)
def test_both_validators_accept_records_generated_from_the_schemas(
    batch: tuple[str, list[dict[str, Any]]],
) -> None:
    name, records = batch
    for record in records:
        assert FAST[name].check(record) is None
        assert RUST[name].check(record) is None


def prefix_end(name: str, records: list[Any]) -> int:
    """Where a batch check must stop: at the first record the record check refuses, or
    the first of another format version than the first record's (their count if none)."""
    versions = [FAST[name].judge(record)[0] for record in records]
    return next(
        (
            i
            for i, record in enumerate(records)
            if FAST[name].check(record) or versions[i] != versions[0]
        ),
        len(records),
    )


def prefix_disagreement(name: str, records: list[Any]) -> str | None:
    """How a batch check differs from checking each record: fastjsonschema's must stop
    where `prefix_end` says; jsonschema-rs's passes all or none."""
    (fast, _), (rust, _) = FAST[name].valid_prefix(records), RUST[name].valid_prefix(records)
    end = prefix_end(name, records)
    # jsonschema-rs's may refuse a valid batch (its first pass is stricter on formats).
    if fast == end and (rust == 0 or rust == end == len(records)):
        return None
    return (
        f"{name} batch of {len(records)}: the batch check must stop at {end}; "
        f"fastjsonschema's passes {fast}, jsonschema-rs's {rust}"
    )


def test_a_batch_check_passes_exactly_the_records_each_check_passes() -> None:
    """ingest checks a batch whole first (RecordType.valid_prefix), and checks a record on
    its own only from the first one the batch check could not pass."""
    differences, batches = [], 0
    for corpus, cases in CORPORA.items():
        by_name: dict[str, list[Any]] = {name: [] for name in NAMES}
        for case in cases:
            by_name[case.name].append(case.record)
        for name, records in by_name.items():
            good = [sample(name)] * 3
            # Each record alone, at the end of valid ones, and the corpus in batches of 7.
            batches_of = [[*good, record] for record in records]
            batches_of += [good + records[i : i + 7] for i in range(0, len(records), 7)]
            batches_of += [good, [record for record in records if not FAST[name].check(record)]]
            for batch in batches_of:
                batches += 1
                if (difference := prefix_disagreement(name, batch)) is not None:
                    differences.append(f"{corpus}: {difference}")
    print(f"batch checks: {batches} batches")
    assert not differences, f"{len(differences)}:\n" + "\n".join(differences[:20])


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.data())
def test_a_batch_check_passes_exactly_the_records_each_check_passes_generated(
    data: st.DataObject,
) -> None:
    name = data.draw(st.sampled_from(NAMES))
    versions = st.sampled_from([1, 2, 3]).map(lambda n: {**sample(name), "messageFormatVersion": n})
    records = data.draw(
        st.lists(st.just(sample(name)) | changed_records(name) | versions, max_size=12)
    )
    try:
        records = orjson.loads(envelope(*records))["records"]  # as ingest gets them
    except orjson.JSONDecodeError:
        assume(False)  # NaN or Infinity: never parsed, so never validated
    assert prefix_disagreement(name, records) is None


def test_the_keyword_order_is_fastjsonschemas() -> None:
    # gateway/schemas.py ranks jsonschema-rs's errors by the order fastjsonschema's draft-07
    # code generator checks keywords in (a private table of fastjsonschema's). If it
    # changes, so does which of several violations fastjsonschema reports.
    generator = CodeGeneratorDraft07({})  # type: ignore[no-untyped-call]
    assert tuple(generator._json_keywords_to_function) == _KEYWORD_ORDER


# jsonschema-rs first checks a record with a native pattern in place of each of these
# formats, and only a record refused there meets the formats' Python. So a pattern must
# never accept a value its format refuses; and, to be worth its place, it should accept
# what records usually carry.


def date_times() -> Iterator[str]:
    """Every field of a date-time through its range and past it, the others kept valid."""
    for number in range(10_000):  # every year's 29 February: the leap years
        yield f"{number:04d}-02-29T00:00:00Z"
    for year, month, day in itertools.product(
        ("0000", "0001", "1900", "2000", "2023", "2024", "2100", "9999", "10000", "202"),
        [f"{m:02d}" for m in range(14)] + ["1", "001"],
        [f"{d:02d}" for d in range(33)] + ["1", "001"],
    ):
        yield f"{year}-{month}-{day}T12:00:00Z"
    for unit in range(100):
        yield f"2024-05-06T{unit:02d}:00:00Z"
        yield f"2024-05-06T00:{unit:02d}:00Z"
        yield f"2024-05-06T23:59:{unit:02d}Z"
    for hours, minutes in itertools.product(range(30), range(100)):
        for sign in "+-":
            yield f"2024-05-06T00:00:00{sign}{hours:02d}:{minutes:02d}"
    for digits in range(13):
        yield f"2024-05-06T00:00:00{'.' if digits else ''}{'1' * digits}+05:30"
    for separator, zone in itertools.product("Tt _", ("Z", "z", "", "+0530", "+05", "UTC")):
        yield f"2024-05-06{separator}00:00:00{zone}"
    yield from (
        "2019-01-21T13:09:07.049+05:30", "2024-05-06T00:00:00Z\n", " 2024-05-06T00:00:00Z",
        "\uff12\uff10\uff12\uff14-05-06T00:00:00Z", "2024-05-06T00:00:00.Z", "2024-05-06T00:00Z",
        "2024-05-06T00:00:00,5Z", "2024-W19-1T00:00:00Z", "\u0662024-05-06T00:00:00Z", "",
    )  # fmt: skip


NATIVE_CORPORA: dict[str, Callable[[], Iterable[str]]] = {
    "date-time": date_times,
    "uri": lambda: [*FORMAT_VALUES["/eventUri"], "a\u0301:x", "ab:x\x1c", "a:x\u00a0", "A_1:x"],
    "ipv4": lambda: [
        *FORMAT_VALUES["/location/ipAddress"],
        *(f"{n}.{n}.1.{n}" for n in range(300)), *(f"0{n}.1.1.1" for n in range(10)),
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(_NATIVE_FORMATS))
def test_each_native_format_accepts_only_what_its_format_accepts(name: str) -> None:
    import jsonschema_rs

    pattern = jsonschema_rs.validator_for({"type": "string", "pattern": _NATIVE_FORMATS[name]})
    check = _SHARED_FORMATS[name]
    values = list(NATIVE_CORPORA[name]())
    looser = [value for value in values if pattern.is_valid(value) and not check(value)]
    assert looser == [], f"the {name} pattern accepts values the format refuses"
    # Stricter only outside printable ASCII (an IRI, say): such values take the slow way.
    stricter = [
        value
        for value in values
        if check(value) and not pattern.is_valid(value) and value.isascii() and value.isprintable()
    ]
    assert stricter == [], f"the {name} pattern refuses plain values the format accepts"
    assert sum(map(check, values)) > len(values) // 10  # the corpus is not all refusals
