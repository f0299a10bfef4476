"""The public description of the API: record schemas and an OpenAPI 3.1 document.

The document is generated from the same schema files the validators are compiled
from, so it cannot drift from what the gateway enforces.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from gateway.listener import URI_LIMIT
from gateway.schemas import MAX_RECORDS, RecordType, envelope_schema
from gateway.state import OPENAPI, RECORD_TYPES

_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def _component(name: str) -> str:
    return name.capitalize() + "Record"


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": _PROBLEM_REF}},
    }


def _json(
    description: str, schema: Mapping[str, Any], media_type: str = "application/json"
) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": schema}}}


def _request_body(record_type: str) -> dict[str, Any]:
    """The spec's envelope for one record type, its items pointing at our component."""
    envelope = envelope_schema(record_type)
    del envelope["$schema"], envelope["definitions"]
    envelope["properties"]["records"]["items"] = {
        "$ref": f"#/components/schemas/{_component(record_type)}"
    }
    return envelope


def build_openapi(record_types: Mapping[str, RecordType], version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route the gateway serves."""
    components: dict[str, Any] = {
        _component(name): {k: v for k, v in rt.schema.items() if k not in ("$schema", "$id")}
        for name, rt in record_types.items()
    }
    components["Problem"] = {
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
    components["IngestResult"] = {
        "type": "object",
        "required": ["accepted"],
        "properties": {
            "accepted": {"type": "integer", "minimum": 0},
            "rejected": {"type": "integer", "minimum": 1},
            "rejections": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "reason", "errors"],
                    "properties": {
                        "index": {"type": "integer", "minimum": 0},
                        "eventId": {"type": "string"},
                        "reason": {"enum": ["invalid", "forbidden"]},
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
                },
            },
        },
    }

    paths: dict[str, Any] = {}
    for name in record_types:
        paths[f"/v1/{name}"] = {
            "post": {
                "summary": f"Send 1-{MAX_RECORDS} {name} records",
                "operationId": f"post{name.capitalize()}",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _request_body(name)},
                        # What navigator.sendBeacon sends a string as: the same JSON.
                        "text/plain": {"schema": _request_body(name)},
                    },
                },
                "responses": {
                    "200": _json(
                        "Every record acknowledged by Kafka",
                        {"$ref": "#/components/schemas/IngestResult"},
                    ),
                    "207": _json(
                        "Some records accepted (acknowledged by Kafka), the others rejected",
                        {"$ref": "#/components/schemas/IngestResult"},
                    ),
                    "422": _json(
                        "No record accepted; each rejection says why",
                        {"$ref": "#/components/schemas/IngestResult"},
                    ),
                    "400": _problem(
                        "Not JSON, not UTF-8, not the records envelope, or not valid HTTP/1.1"
                    ),
                    "401": _problem("Missing, unknown or disabled API key"),
                    "403": _problem("A web origin, or a use, the key does not allow"),
                    "408": _problem("The body did not arrive in time"),
                    "413": _problem(
                        "Body over the limit, a compression bomb, or a record too large for Kafka"
                    ),
                    "414": _problem(f"Request target over {URI_LIMIT:,} bytes"),
                    "415": _problem("Content type other than JSON"),
                    "429": _problem("Over the key's rate limit; retry after Retry-After"),
                    "431": _problem("A header line too long, or too many headers"),
                    "500": _problem("A bug: the log line with the requestId says more"),
                    "503": _problem(
                        "Kafka unavailable or not acknowledging, or the gateway over capacity; "
                        "retry after Retry-After"
                    ),
                },
            }
        }
    paths["/v1/ip"] = {
        "get": {
            "summary": "The caller's IP address as the gateway sees it",
            "operationId": "getIp",
            "responses": {
                "200": _json(
                    "The address",
                    {
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
                    },
                ),
                "401": _problem("Missing, unknown or disabled API key"),
                "403": _problem("A browser key, which may only send records"),
                "429": _problem("Over the key's rate limit; retry after Retry-After"),
            },
        }
    }
    paths["/v1/schema/{recordType}"] = {
        "get": {
            "summary": "The JSON Schema (draft-07) of one record type",
            "operationId": "getSchema",
            "security": [],
            "parameters": [
                {
                    "name": "recordType",
                    "in": "path",
                    "required": True,
                    "schema": {"enum": list(record_types)},
                }
            ],
            "responses": {
                "200": _json("The schema", {"type": "object"}, "application/schema+json"),
                "404": _problem("No such record type"),
            },
        }
    }
    paths["/v1/openapi.json"] = {
        "get": {
            "summary": "This document",
            "operationId": "getOpenapi",
            "security": [],
            "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "CAFe API (cafe-gateway)",
            "version": version,
            "description": "Client analytics ingestion: activity events, log lines and "
            "device profiles, validated and produced to Kafka. A 2xx means Kafka has "
            "acknowledged every accepted record.",
        },
        "security": [{"apiKey": []}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
        },
    }


async def get_openapi(request: web.Request) -> web.Response:
    """GET /v1/openapi.json"""
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def get_schema(request: web.Request) -> web.Response:
    """GET /v1/schema/{record_type}: the item schema the envelopes `$ref`."""
    record_type = request.app[RECORD_TYPES][request.match_info["record_type"]]
    return web.Response(
        body=orjson.dumps(record_type.schema), content_type="application/schema+json"
    )
