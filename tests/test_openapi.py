"""The public API description: schema endpoints and the OpenAPI document."""

from __future__ import annotations

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


@pytest.mark.parametrize("name", ["activity", "log", "profile"])
async def test_each_record_schema_is_served_without_a_key(client: TestClient, name: str) -> None:  # type: ignore[type-arg]
    resp = await client.get(f"/v1/schema/{name}")
    assert resp.status == 200
    assert resp.content_type == "application/schema+json"
    served = await resp.json(content_type=None)
    assert served == orjson.loads((schema_dir() / f"{name}.json").read_bytes())
    # The envelopes $ref the item schemas at this address.
    assert served["$id"] == f"https://cafe.example.com/v1/schema/{name}"


async def test_an_unknown_schema_is_404(client: TestClient) -> None:  # type: ignore[type-arg]
    assert (await client.get("/v1/schema/metrics")).status == 404


async def test_the_openapi_document_is_valid_3_1_and_matches_the_schema_files(
    client: TestClient,  # type: ignore[type-arg]
) -> None:
    resp = await client.get("/v1/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    validate(doc)  # raises on an invalid OpenAPI document
    assert doc["openapi"] == "3.1.0"
    for name in ("activity", "log", "profile"):
        on_disk = orjson.loads((schema_dir() / f"{name}.json").read_bytes())
        del on_disk["$schema"], on_disk["$id"]
        assert doc["components"]["schemas"][f"{name.capitalize()}Record"] == on_disk
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
    assert public == {"/v1/schema/{recordType}", "/v1/openapi.json"}
