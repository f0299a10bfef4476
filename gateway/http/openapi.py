"""The public description of the API: record schemas and an OpenAPI 3.1 document.

The document is generated from the same schema files the validators are compiled
from, so it cannot drift from what the gateway enforces.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from gateway.http.listener import URI_LIMIT
from gateway.http.state import OPENAPI, RECORD_TYPES
from gateway.schemas import MAX_RECORDS, RecordType, envelope_schema


def _ref(component: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{component}"}


def _component(name: str, version: int | None = None) -> str:
    """ActivityRecord (any version), or ActivityRecordV2 (that version)."""
    return name.capitalize() + "Record" + ("" if version is None else f"V{version}")


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": _ref("Problem")}},
    }


def _json(
    description: str, schema: Mapping[str, Any], media_type: str = "application/json"
) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": schema}}}


def build_openapi(record_types: Mapping[str, RecordType], version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route the gateway serves."""
    return {
        "openapi": "3.1.0",
        "info": _info(version),
        "security": [{"apiKey": []}],
        "paths": _paths(record_types),
        "components": {
            "schemas": _schemas(record_types),
            "securitySchemes": _security_schemes(),
        },
    }


def _info(version: str) -> dict[str, Any]:
    return {
        "title": "CAFe API (cafe-gateway)",
        "version": version,
        "description": "Client analytics ingestion: activity events, log lines and "
        "device profiles, validated and produced to Kafka. A 2xx means Kafka has "
        "acknowledged every accepted record.",
    }


def _security_schemes() -> dict[str, Any]:
    """The API key every route asks for, unless its operation says `security: []`."""
    return {"apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}}


# The paths.


def _paths(record_types: Mapping[str, RecordType]) -> dict[str, Any]:
    """One POST route per record type, then the routes that take no records."""
    paths: dict[str, Any] = {
        f"/v1/{name}": {"post": _ingest_operation(name)} for name in record_types
    }
    paths["/v1/ip"] = {"get": _ip_operation()}
    paths["/v1/schema/{recordType}"] = {"get": _schema_operation(record_types)}
    paths["/v1/schema/{recordType}/{version}"] = {"get": _version_operation(record_types)}
    paths["/v1/openapi.json"] = {"get": _openapi_operation()}
    return paths


def _ingest_operation(record_type: str) -> dict[str, Any]:
    """POST /v1/{record_type}: records to validate and produce to Kafka."""
    return {
        "summary": f"Send 1-{MAX_RECORDS} {record_type} records",
        "operationId": f"post{record_type.capitalize()}",
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _request_body(record_type)},
                # What navigator.sendBeacon sends a string as: the same JSON.
                "text/plain": {"schema": _request_body(record_type)},
            },
        },
        "responses": {**_ingest_results(), **_ingest_problems()},
    }


def _request_body(record_type: str) -> dict[str, Any]:
    """The spec's envelope for one record type, its items pointing at our component."""
    envelope = envelope_schema(record_type)
    del envelope["$schema"], envelope["definitions"]
    envelope["properties"]["records"]["items"] = _ref(_component(record_type))
    return envelope


def _ingest_results() -> dict[str, Any]:
    """The answers that count the records: all, some or none of them accepted."""
    return {
        "200": _json("Every record acknowledged by Kafka", _ref("IngestResult")),
        "207": _json(
            "Some records accepted (acknowledged by Kafka), the others rejected",
            _ref("IngestResult"),
        ),
        "422": _json("No record accepted; each rejection says why", _ref("IngestResult")),
    }


def _ingest_problems() -> dict[str, Any]:
    """The answers that refuse the request as a whole, so no record is counted."""
    return {
        "400": _problem("Not JSON, not UTF-8, not the records envelope, or not valid HTTP/1.1"),
        "401": _problem("Missing, unknown or disabled API key"),
        "403": _problem("A web origin, or a use, the key does not allow"),
        "408": _problem("The body did not arrive in time"),
        "413": _problem("Body over the limit, a compression bomb, or a record too large for Kafka"),
        "414": _problem(f"Request target over {URI_LIMIT:,} bytes"),
        "415": _problem("Content type other than JSON"),
        "429": _problem("Over the key's rate limit; retry after Retry-After"),
        "431": _problem("A header line too long, or too many headers"),
        "500": _problem("A bug: the log line with the requestId says more"),
        "503": _problem(
            "Kafka unavailable or not acknowledging, or the gateway over capacity; "
            "retry after Retry-After"
        ),
    }


def _ip_operation() -> dict[str, Any]:
    """GET /v1/ip"""
    address = {
        "type": "object",
        "required": ["ip"],
        "additionalProperties": False,
        "properties": {
            "ip": {
                "anyOf": [
                    {"type": "string", "format": "ipv4"},
                    {"type": "string", "format": "ipv6"},
                ]
            }
        },
    }
    return {
        "summary": "The caller's IP address as the gateway sees it",
        "operationId": "getIp",
        "responses": {
            "200": _json("The address", address),
            "401": _problem("Missing, unknown or disabled API key"),
            "403": _problem("A browser key, which may only send records"),
            "429": _problem("Over the key's rate limit; retry after Retry-After"),
        },
    }


def _schema_operation(record_types: Mapping[str, RecordType]) -> dict[str, Any]:
    """GET /v1/schema/{recordType}: public, like this document, so no API key."""
    return {
        "summary": "The JSON Schema (draft-07) of the newest format version of a record type",
        "operationId": "getSchema",
        "security": [],
        "parameters": [_record_type_parameter(record_types)],
        "responses": {
            "200": _json("The schema", {"type": "object"}, "application/schema+json"),
            "404": _problem("No such record type"),
        },
    }


def _version_operation(record_types: Mapping[str, RecordType]) -> dict[str, Any]:
    """GET /v1/schema/{recordType}/{version}: one format version, public too."""
    return {
        "summary": "The JSON Schema (draft-07) of one format version of a record type",
        "operationId": "getSchemaVersion",
        "security": [],
        "parameters": [
            _record_type_parameter(record_types),
            {
                "name": "version",
                "in": "path",
                "required": True,
                "description": "A messageFormatVersion",
                "schema": {"type": "integer", "minimum": 1},
            },
        ],
        "responses": {
            "200": _json("The schema", {"type": "object"}, "application/schema+json"),
            "404": _problem("No such record type, or no such version of it"),
        },
    }


def _record_type_parameter(record_types: Mapping[str, RecordType]) -> dict[str, Any]:
    return {
        "name": "recordType",
        "in": "path",
        "required": True,
        "schema": {"enum": list(record_types)},
    }


def _openapi_operation() -> dict[str, Any]:
    """GET /v1/openapi.json: public, so a client can read it before it has a key."""
    return {
        "summary": "This document",
        "operationId": "getOpenapi",
        "security": [],
        "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})},
    }


# The components the paths `$ref`.


def _schemas(record_types: Mapping[str, RecordType]) -> dict[str, Any]:
    """Each record type's schema of each format version, and the type as one of them
    (each version fixes messageFormatVersion to its number, so a record is valid under
    one version at most); then the bodies the gateway answers with."""
    schemas: dict[str, Any] = {}
    for name, record_type in record_types.items():
        for number, version in record_type.versions.items():
            schemas[_component(name, number)] = {
                k: v for k, v in version.schema.items() if k not in ("$schema", "$id")
            }
        schemas[_component(name)] = {
            "description": f"A {name} record of any format version this gateway knows, "
            "chosen by its messageFormatVersion",
            "oneOf": [_ref(_component(name, number)) for number in record_type.versions],
        }
    schemas["Problem"] = _problem_schema()
    schemas["IngestResult"] = _ingest_result_schema()
    return schemas


def _problem_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "RFC 9457 problem details; `code` is the stable machine-readable reason.",
        "required": ["type", "title", "status", "code", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "code": {"type": "string"},
            "detail": {"type": "string"},
        },
    }


def _ingest_result_schema() -> dict[str, Any]:
    """What the ingest routes answer: how many records were accepted, and why the rest not."""
    return {
        "type": "object",
        "required": ["accepted"],
        "properties": {
            "accepted": {"type": "integer", "minimum": 0},
            "rejected": {"type": "integer", "minimum": 1},
            "rejections": {"type": "array", "items": _rejection_schema()},
        },
    }


def _rejection_schema() -> dict[str, Any]:
    """One rejected record: its place in the batch, and each error a JSON pointer to it."""
    return {
        "type": "object",
        "required": ["index", "reason", "errors"],
        "properties": {
            "index": {"type": "integer", "minimum": 0},
            "eventId": {"type": "string"},
            "reason": {"enum": ["invalid", "unknown_format_version", "forbidden"]},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["pointer", "message"],
                    "properties": {
                        "pointer": {"type": "string"},
                        "message": {"type": "string"},
                    },
                },
            },
        },
    }


async def get_openapi(request: web.Request) -> web.Response:
    """GET /v1/openapi.json"""
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def get_schema(request: web.Request) -> web.Response:
    """GET /v1/schema/{record_type}[/{version}]: a format version's schema, by default
    the newest."""
    record_type = request.app[RECORD_TYPES][request.match_info["record_type"]]
    number = request.match_info.get("version")
    if number is None:
        version = record_type.newest
    else:
        found = record_type.versions.get(int(number))
        if found is None:
            raise web.HTTPNotFound(reason=f"{record_type.name} has no format version {number}")
        version = found
    return web.Response(body=orjson.dumps(version.schema), content_type="application/schema+json")
