"""Format versions side by side: a new version of a record type may only add optional
fields or loosen bounds. So every record valid under version n is valid under version
n + 1 once it names n + 1, and an app that has not been updated is never cut off by
the one that has (docs/api.md, "Format versions").

Two kinds of records valid under the older version are tried on the newer: records at
its edges, derived from the spec's sample (each optional field left out, each bounded
string and number at its bounds, each bounded array at its longest), and records
Hypothesis generates from the older schema. A failure names the field. The fixtures in
tests/fixtures/incompatible/ are versions that break the rule, each in its own way:
the same checks must catch each of them, naming the field it breaks.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.schemas import FormatVersion, compile_version, load_record_types
from tests.support.app import VALIDATOR
from tests.support.records import NAMES, sample
from tests.support.strategies import records_valid_under

TYPES = load_record_types(NAMES, VALIDATOR)
FIXTURES = Path(__file__).parent / "fixtures" / "incompatible"

# Each version and the one before it, of every type that has more than one.
PAIRS = [
    (name, record_type.versions[number - 1], version)
    for name, record_type in TYPES.items()
    for number, version in record_type.versions.items()
    if number > 1
]


def refusal(old: FormatVersion, new: FormatVersion, record: Any) -> str | None:
    """Why `new` refuses `record`, valid under `old`, once the record names `new`'s
    number; None if it takes it (or `old` does not take it, so it proves nothing)."""
    if old.check(record) is not None:
        return None
    error = new.check({**record, "messageFormatVersion": new.number})
    if error is None:
        return None
    return (
        f"a record valid under version {old.number} is refused by version {new.number} "
        f"at {error['pointer'] or '/'}: {error['message']}"
    )


def _edges(schema: dict[str, Any], value: Any) -> Iterator[tuple[list[Any], Any]]:
    """(path, value) changes that take `value`, valid under `schema`, to its edges; a
    value of None at a path means "left out"."""
    kind = schema.get("type")
    if kind == "object" and isinstance(value, dict):
        required = set(schema.get("required", ()))
        for field, child in schema.get("properties", {}).items():
            if field not in value:
                continue
            if field not in required:
                yield [field], None
            for path, edge in _edges(child, value[field]):
                yield [field, *path], edge
    elif kind == "array" and isinstance(value, list) and value:
        if "maxItems" in schema:
            yield [], [copy.deepcopy(value[0]) for _ in range(schema["maxItems"])]
        yield [], value[:1]
        for path, edge in _edges(schema.get("items", {}), value[0]):
            yield [0, *path], edge
    elif kind == "string" and "const" not in schema and "enum" not in schema:
        for size in (schema.get("maxLength"), schema.get("minLength", 0)):
            if size is not None:
                # Kept only if the older schema takes it (a pattern or format may not).
                yield [], ("a" * size)
    elif kind in ("integer", "number"):
        for bound in ("minimum", "maximum"):
            if bound in schema:
                yield [], schema[bound]
    if "enum" in schema:
        for each in schema["enum"]:
            yield [], each


def _changed(record: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(record)
    if not path:
        return value  # type: ignore[no-any-return]
    here: Any = changed
    for step in path[:-1]:
        here = here[step]
    if value is None:
        del here[path[-1]]
    else:
        here[path[-1]] = value
    return changed


def edge_records(name: str, old: FormatVersion) -> list[dict[str, Any]]:
    """Records valid under `old` at its edges, derived from the spec's sample."""
    base = {**sample(name), "messageFormatVersion": old.number}
    assert old.check(base) is None, "the sample must be valid under every version"
    records = [base]
    for path, value in _edges(dict(old.schema), base):
        record = _changed(base, path, value)
        if old.check(record) is None:
            records.append(record)
    return records


def refusals(name: str, old: FormatVersion, new: FormatVersion) -> list[str]:
    """What `new` refuses of `old`'s edge records."""
    found = (refusal(old, new, record) for record in edge_records(name, old))
    return [why for why in found if why is not None]


@pytest.mark.parametrize(
    ("name", "old", "new"), PAIRS, ids=[f"{p[0]}-v{p[2].number}" for p in PAIRS]
)
def test_a_new_version_takes_the_edge_records_of_the_one_before(
    name: str, old: FormatVersion, new: FormatVersion
) -> None:
    tried = len(edge_records(name, old))
    print(f"{name} version {new.number}: {tried} edge records of version {old.number}")
    assert tried > 20
    assert refusals(name, old, new) == []


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@given(data=st.data())
def test_a_new_version_takes_generated_records_of_the_one_before(data: st.DataObject) -> None:
    assert PAIRS, "activity has versions 1 and 2"
    _, old, new = data.draw(st.sampled_from(PAIRS))
    record = data.draw(records_valid_under(dict(old.schema)))
    assume(old.check(record) is None)  # a format stricter than the generator's
    assert refusal(old, new, record) is None


def incompatible(fixture: Path) -> FormatVersion:
    return compile_version(orjson.loads(fixture.read_bytes()), 2, VALIDATOR)


@pytest.mark.parametrize(
    ("fixture", "field"),
    [
        ("requires-userSSOGUID", "userSSOGUID"),
        ("tightens-eventCategory", "/eventCategory"),
        ("drops-eventUri", "eventUri"),
    ],
)
def test_a_version_that_breaks_the_rule_is_caught_with_the_field_named(
    fixture: str, field: str
) -> None:
    new = incompatible(FIXTURES / "activity" / f"{fixture}.json")
    found = refusals("activity", TYPES["activity"].versions[1], new)
    assert found, f"{fixture} broke the rule unnoticed"
    assert all(field in why for why in found), found
    print(f"{fixture}: {found[0]}")


def test_the_fixtures_are_the_real_version_2_but_for_the_break() -> None:
    """So that each fixture breaks the rule in the one way its name says."""
    real = orjson.loads(orjson.dumps(TYPES["activity"].versions[2].schema))
    for path in sorted((FIXTURES / "activity").glob("*.json")):
        fixture = orjson.loads(path.read_bytes())
        fixture.pop("title"), real.pop("title", None)
        differences = [
            key for key in real.keys() | fixture.keys() if real.get(key) != fixture.get(key)
        ]
        assert differences in (["required"], ["properties"]), (path.name, differences)
