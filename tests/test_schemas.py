"""Record schemas: the spec's samples pass, strictness holds, errors point at the field."""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from devkit.samples import sample_requests
from gateway.cli import main
from gateway.config import ConfigError, TopicSettings
from gateway.errors import InvalidEnvelope
from gateway.schemas import (
    MAX_KEY_LENGTH,
    MAX_RECORDS,
    SCHEMA_BASE,
    is_rfc3339_date_time,
    load_record_types,
    records_of,
    schema_dir,
)
from tests.support.app import VALIDATOR
from tests.support.corpora import BAD_FIELDS, DATE_TIMES, NOT_OBJECTS, OPTIONAL, REQUIRED
from tests.support.keys import make_key_file
from tests.support.records import sample, set_at

TYPES = load_record_types(TopicSettings().by_record_type(), VALIDATOR)


@pytest.mark.parametrize("name", ["activity", "log", "profile"])
def test_the_spec_curl_samples_are_valid(name: str) -> None:
    assert TYPES[name].check(sample(name)) is None


@pytest.mark.parametrize("name", ["activity", "log"])
def test_the_spec_sample_requests_are_valid(name: str) -> None:
    (record,) = sample_requests()[name]["records"]
    assert TYPES[name].check(record) is None


def test_the_profile_sample_request_with_spaces_in_its_time_is_rejected() -> None:
    (record,) = sample_requests()["profile"]["records"]
    assert record["eventTime"] == "2019-01-21T11: 54: 37.805-08: 00"
    assert TYPES["profile"].check(record) == {
        "pointer": "/eventTime",
        "message": "record.eventTime must be date-time",
    }


@pytest.mark.parametrize(
    ("name", "field"), [(name, field) for name, fields in REQUIRED.items() for field in fields]
)
def test_each_required_field_is_required(name: str, field: str) -> None:
    record = sample(name)
    del record[field]
    error = TYPES[name].check(record)
    assert error is not None
    assert field in error["message"]


@pytest.mark.parametrize(("name", "field"), OPTIONAL)
def test_optional_fields_may_be_left_out(name: str, field: str) -> None:
    record = sample(name)
    del record[field]
    assert TYPES[name].check(record) is None


@pytest.mark.parametrize(("name", "pointer", "value", "error_pointer"), BAD_FIELDS)
def test_a_bad_field_is_rejected_with_a_pointer_to_it(
    name: str, pointer: str, value: Any, error_pointer: str
) -> None:
    error = TYPES[name].check(set_at(sample(name), pointer, value))
    assert error is not None
    assert error["pointer"] == error_pointer
    assert error["message"].startswith("record")


def test_an_ipv6_profile_address_is_valid() -> None:
    record = set_at(sample("profile"), "/location/ipAddress", "2001:db8::7")
    assert TYPES["profile"].check(record) is None


@pytest.mark.parametrize("record", NOT_OBJECTS)
def test_a_record_that_is_not_an_object_is_rejected(record: Any) -> None:
    assert TYPES["log"].check(record) == {
        "pointer": "",
        "message": "record must be object",
    }


@pytest.mark.parametrize(("value", "valid"), DATE_TIMES)
def test_date_times_follow_rfc_3339(value: str, valid: bool) -> None:
    assert is_rfc3339_date_time(value) is valid


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "body must be object"),
        ({}, "body must contain ['records'] properties"),
        ({"records": []}, "body.records must contain at least 1 items"),
        (
            {"records": [{}] * (MAX_RECORDS + 1)},
            "body.records must contain less than or equal to 500 items",
        ),
        ({"records": {}}, "body.records must be array"),
        ({"records": [{}], "extra": 1}, "body must not contain {'extra'} properties"),
    ],
)  # fmt: skip
def test_the_envelope_is_the_specs(body: Any, message: str) -> None:
    with pytest.raises(InvalidEnvelope) as info:
        records_of(body)
    assert info.value.detail == message


def test_an_envelope_of_any_records_passes_them_through() -> None:
    records = [{"a": 1}, "not even an object"]
    assert records_of({"records": records}) is records
    assert len(records_of({"records": [{}] * MAX_RECORDS})) == MAX_RECORDS


def test_every_schema_file_bounds_every_string_and_array() -> None:
    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "string" and "const" not in node and "enum" not in node:
                assert "maxLength" in node, f"{where} has no maxLength"
            if node.get("type") == "array":
                assert "maxItems" in node, f"{where} has no maxItems"
            if node.get("type") == "object":
                assert node.get("additionalProperties") is False, f"{where} is open"
            # The validators are compiled without the code that fills in defaults.
            assert "default" not in node, f"{where} sets a default"
            for key, value in node.items():
                walk(value, f"{where}/{key}")

    paths = sorted(schema_dir().glob("*/*.json"))
    assert len(paths) >= 4
    for path in paths:
        walk(orjson.loads(path.read_bytes()), str(path.relative_to(schema_dir())))


def test_a_broken_schema_stops_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(schema_dir(), tmp_path / "schemas")
    (tmp_path / "schemas" / "log" / "1.json").write_text(
        '{"$id": "https://cafe.example.com/v1/schema/log/1", "type": 5}'
    )
    monkeypatch.setattr("gateway.schemas.schema_dir", lambda: tmp_path / "schemas")
    with pytest.raises(
        ValueError, match=rf"schema \S*/log/1\.json does not compile with {VALIDATOR}"
    ):
        load_record_types(TopicSettings().by_record_type(), VALIDATOR)


def test_the_fast_validator_not_installed_is_named_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "jsonschema_rs", None)  # what an import finds: nothing
    with pytest.raises(ConfigError, match=r"CAFE_VALIDATOR=jsonschema-rs needs .*\[fast\]"):
        load_record_types(TopicSettings().by_record_type(), "jsonschema-rs")


Schema = dict[str, Any]


def _use_schema_copies(
    directory: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    edit: Callable[[Schema], object],
    version: int = 1,
) -> None:
    """Make the loader read copies of the real schemas, `name`'s `version` changed by
    `edit`."""
    shutil.copytree(schema_dir(), directory)
    path = directory / name / f"{version}.json"
    schema = orjson.loads(path.read_bytes())
    edit(schema)
    path.write_bytes(orjson.dumps(schema))
    monkeypatch.setattr("gateway.schemas.schema_dir", lambda: directory)


def _session_id(schema: Schema) -> Schema:
    session: Schema = schema["properties"]["sessionId"]
    return session


def test_the_real_schemas_promise_what_the_gateway_reads() -> None:
    assert set(TYPES) == {"activity", "log", "profile"}
    for record_type in TYPES.values():
        assert {"sessionId", "productPlatform"} <= set(record_type.schema["required"])
        assert record_type.max_key_length == MAX_KEY_LENGTH


def test_unedited_copies_of_the_schemas_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # So that the refusals below come from the edits, not from the copying.
    _use_schema_copies(tmp_path / "schemas", monkeypatch, "log", lambda schema: None)
    assert load_record_types(TopicSettings().by_record_type(), VALIDATOR).keys() == TYPES.keys()


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("log", lambda s: s["required"].remove("sessionId"),
         "does not require sessionId"),
        ("activity", lambda s: s["required"].remove("productPlatform"),
         "does not require productPlatform"),
        ("profile", lambda s: s.pop("required"), "does not require sessionId"),
        ("log", lambda s: _session_id(s).update(type="integer"),
         'must give sessionId "type": "string"'),
        ("activity", lambda s: _session_id(s).update(type=["string", "null"]),
         'must give sessionId "type": "string"'),
        ("profile", lambda s: s["properties"]["productPlatform"].pop("type"),
         'must give productPlatform "type": "string"'),
        ("log", lambda s: s["properties"]["productPlatform"].update(type="object"),
         'must give productPlatform "type": "string"'),
        ("activity", lambda s: s["properties"].update(sessionId={}),
         'must give sessionId "type": "string"'),
        ("log", lambda s: s.pop("type"), '"type": "object"'),
        ("profile", lambda s: _session_id(s).pop("maxLength"), "must bound sessionId"),
        ("activity", lambda s: _session_id(s).update(maxLength=MAX_KEY_LENGTH + 1),
         "must bound sessionId"),
        ("log", lambda s: _session_id(s).update(minLength=0), "must bound sessionId"),
        ("log", lambda s: s.update({"$id": SCHEMA_BASE + "log"}), "has $id"),
        ("log", lambda s: s["properties"]["messageFormatVersion"].update(const=2),
         "must require messageFormatVersion and fix it"),
        ("profile", lambda s: s["required"].remove("messageFormatVersion"),
         "must require messageFormatVersion and fix it"),
        ("activity", lambda s: s["properties"]["messageFormatVersion"].pop("const"),
         "must require messageFormatVersion and fix it"),
        # fastjsonschema and jsonschema-rs each have an email check of their own.
        ("log", lambda s: s["properties"]["logMessage"].update(format="email"),
         "uses the format 'email', which the validators do not check alike"),
    ],
)  # fmt: skip
def test_a_schema_without_what_the_gateway_reads_stops_start_up(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    edit: Callable[[Schema], object],
    message: str,
) -> None:
    _use_schema_copies(tmp_path / "schemas", monkeypatch, name, edit)
    with pytest.raises(ValueError, match=rf"schema \S*/{name}/1\.json .*{re.escape(message)}"):
        load_record_types(TopicSettings().by_record_type(), VALIDATOR)


def test_a_missing_schema_directory_is_named_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_schema_copies(tmp_path / "schemas", monkeypatch, "log", lambda s: None)
    shutil.rmtree(tmp_path / "schemas" / "profile")
    with pytest.raises(ValueError, match=r"schema directory .*profile cannot be read"):
        load_record_types(TopicSettings().by_record_type(), VALIDATOR)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "found none"),
        ({"2.json"}, r"found \[2\]"),
        ({"1.json", "3.json"}, r"found \[1, 3\]"),
        ({"1.json", "latest.json"}, "latest.json is not named <version>.json"),
        ({"1.json", "01.json"}, "01.json is not named <version>.json"),
    ],
)
def test_versions_must_run_from_1_with_none_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: set[str], message: str
) -> None:
    _use_schema_copies(tmp_path / "schemas", monkeypatch, "log", lambda s: None)
    log = tmp_path / "schemas" / "log"
    first = (log / "1.json").read_bytes()
    (log / "1.json").unlink()
    for name in files:
        (log / name).write_bytes(first)
    with pytest.raises(ValueError, match=message):
        load_record_types(TopicSettings().by_record_type(), VALIDATOR)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_names_the_schema_and_the_field_and_exits(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    workers: str,
) -> None:
    # With several workers, before any is forked: one line, not one failure per worker.
    _use_schema_copies(
        tmp_path / "schemas", monkeypatch, "log", lambda s: s["required"].remove("productPlatform")
    )
    monkeypatch.setenv("CAFE_KEYS_FILE", str(make_key_file(tmp_path).path))
    monkeypatch.setenv("CAFE_WORKERS", workers)
    monkeypatch.setenv("CAFE_PORT", "18080")  # several workers need a fixed port
    monkeypatch.setattr("gateway.cli.run_workers", _no_fork)
    # serve would point the root logger at stderr; the test's logging stays as it is.
    monkeypatch.setattr("gateway.cli.setup_logging", lambda level, log_format: None)
    assert main(["serve"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cafe-gateway: schema ")
    assert "log/1.json does not require productPlatform" in err


def _no_fork(count: int, serve: Callable[[Path], int]) -> int:
    raise AssertionError("forked workers although a schema is broken")
