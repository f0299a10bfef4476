"""The public API description: schema endpoints and the OpenAPI document."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

from gateway.schemas import schema_dir
from gateway.sink import MemorySink
from tests.support.app import GatewayClient, gateway_settings
from tests.support.keys import KeyFile


@pytest.fixture
async def client(gateway_client: GatewayClient, key_file: KeyFile) -> TestClient:  # type: ignore[type-arg]
    return await gateway_client(gateway_settings(keys_file=key_file.path), sink=MemorySink())


def on_disk(name: str, version: int) -> dict[str, Any]:
    found: dict[str, Any] = orjson.loads((schema_dir() / name / f"{version}.json").read_bytes())
    return found


# Each type's versions as shipped: activity has two.
VERSIONS = {"activity": [1, 2], "log": [1], "profile": [1]}


@pytest.mark.parametrize("name", ["activity", "log", "profile"])
async def test_each_record_schema_is_served_without_a_key(client: TestClient, name: str) -> None:  # type: ignore[type-arg]
    for version in VERSIONS[name]:
        resp = await client.get(f"/v1/schema/{name}/{version}")
        assert resp.status == 200
        assert resp.content_type == "application/schema+json"
        served = await resp.json(content_type=None)
        assert served == on_disk(name, version)
        assert served["$id"] == f"https://cafe.example.com/v1/schema/{name}/{version}"
    # Without a version: the newest.
    resp = await client.get(f"/v1/schema/{name}")
    assert resp.status == 200
    assert await resp.json(content_type=None) == on_disk(name, VERSIONS[name][-1])


@pytest.mark.parametrize("path", ["/v1/schema/metrics", "/v1/schema/log/2", "/v1/schema/activity/0",
                                  "/v1/schema/activity/3", "/v1/schema/activity/1.json",
                                  "/v1/schema/activity/9999999"])  # fmt: skip
async def test_an_unknown_schema_is_404(client: TestClient, path: str) -> None:  # type: ignore[type-arg]
    resp = await client.get(path)
    assert resp.status == 404
    problem = await resp.json(content_type=None)
    assert problem["code"] == "not_found"


async def test_the_openapi_document_is_valid_3_1_and_matches_the_schema_files(
    client: TestClient,  # type: ignore[type-arg]
) -> None:
    resp = await client.get("/v1/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    validate(doc)  # raises on an invalid OpenAPI document
    assert doc["openapi"] == "3.1.0"
    for name, versions in VERSIONS.items():
        component = f"{name.capitalize()}Record"
        for version in versions:
            schema = on_disk(name, version)
            del schema["$schema"], schema["$id"]
            assert doc["components"]["schemas"][f"{component}V{version}"] == schema
        assert doc["components"]["schemas"][component]["oneOf"] == [
            {"$ref": f"#/components/schemas/{component}V{version}"} for version in versions
        ]
        body = doc["paths"][f"/v1/{name}"]["post"]["requestBody"]["content"]["application/json"]
        records = body["schema"]["properties"]["records"]
        assert (records["minItems"], records["maxItems"]) == (1, 500)
        assert body["schema"]["additionalProperties"] is False
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "x-api-key",
    }
    public = {
        path
        for path, ops in doc["paths"].items()
        if ops["get" if "get" in ops else "post"].get("security") == []
    }
    assert public == {
        "/v1/schema/{recordType}",
        "/v1/schema/{recordType}/{version}",
        "/v1/openapi.json",
    }
