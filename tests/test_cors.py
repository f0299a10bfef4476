"""Browsers as clients: CORS preflights, origins per key, ?api_key= for sendBeacon,
text/plain and compressed bodies."""

from __future__ import annotations

import gzip
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import brotli
import orjson
import pytest
from aiohttp.test_utils import TestClient

from devkit.samples import curl_bodies
from gateway.cli import main
from gateway.keys.file import read_keys_file, write_keys_file
from gateway.keys.model import KeysFileError, mint_key
from gateway.sink import MemorySink
from tests.support.app import GatewayClient, gateway_settings

PAGE = "http://127.0.0.1:8123"
OTHER_PAGE = "http://127.0.0.1:9999"
LOG = curl_bodies()["log"]


class Browsers:
    """A gateway with a browser key for PAGE, a backend key without origins, and its sink."""

    def __init__(self, client: TestClient, sink: MemorySink, browser: str, backend: str) -> None:  # type: ignore[type-arg]
        self.client = client
        self.sink = sink
        self.browser_key = browser
        self.backend_key = backend

    async def post(self, path: str, body: bytes, **headers: str) -> Any:
        sent = {"Content-Type": "application/json"}
        sent.update({k.replace("_", "-"): v for k, v in headers.items()})
        return await self.client.post(path, data=body, headers=sent)

    def produced(self) -> int:
        return len(self.sink.records.get("log", []))


@pytest.fixture
async def gw(gateway_client: GatewayClient, tmp_path: Path) -> Browsers:
    browser, browser_record = mint_key(("analytics-portal",), origins=(PAGE,), browser=True)
    backend, backend_record = mint_key(("analytics-portal",))
    path = tmp_path / "keys.json"
    write_keys_file(path, [browser_record, backend_record])
    sink = MemorySink()
    client = await gateway_client(gateway_settings(keys_file=path), sink=sink)
    return Browsers(client, sink, browser, backend)


async def test_a_preflight_from_a_listed_origin_is_allowed(gw: Browsers) -> None:
    resp = await gw.client.options(
        "/v1/log",
        headers={"Origin": PAGE, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type, x-api-key, traceparent"},
    )  # fmt: skip
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == PAGE
    assert resp.headers["Access-Control-Allow-Methods"] == "POST"
    # A page's trace context may come along (docs/api.md, "Trace context").
    assert set(resp.headers["Access-Control-Allow-Headers"].split(", ")) >= {
        "content-type",
        "x-api-key",
        "traceparent",
        "tracestate",
    }
    assert resp.headers["Access-Control-Max-Age"] == "600"
    assert "Origin" in resp.headers.getall("Vary")


async def test_a_preflight_from_another_origin_gets_no_cors_headers(gw: Browsers) -> None:
    resp = await gw.client.options("/v1/log", headers={"Origin": OTHER_PAGE})
    assert resp.status == 204
    assert not [h for h in resp.headers if h.lower().startswith("access-control-")]


async def test_a_page_on_a_listed_origin_sends_with_the_header_and_reads_the_answer(
    gw: Browsers,
) -> None:
    resp = await gw.post("/v1/log", LOG, x_api_key=gw.browser_key, Origin=PAGE)
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == PAGE
    assert "X-Request-Id" in resp.headers["Access-Control-Expose-Headers"]
    assert gw.produced() == 1


@pytest.mark.parametrize("which", ["browser", "backend"])
async def test_an_origin_the_key_does_not_list_is_refused(gw: Browsers, which: str) -> None:
    key = gw.browser_key if which == "browser" else gw.backend_key
    resp = await gw.post("/v1/log", LOG, x_api_key=key, Origin=OTHER_PAGE)
    assert resp.status == 403
    assert (await resp.json(content_type=None))["code"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert gw.produced() == 0


async def test_sendbeacon_text_plain_with_the_key_in_the_query(gw: Browsers) -> None:
    resp = await gw.post(
        f"/v1/log?api_key={gw.browser_key}", LOG, Content_Type="text/plain;charset=UTF-8",
        Origin=PAGE,
    )  # fmt: skip
    assert resp.status == 200
    assert gw.produced() == 1


@pytest.mark.parametrize(
    ("key", "origin", "status", "code"),
    [
        ("browser", None, 403, "origin_not_allowed"),  # no Origin: not from a page
        ("browser", OTHER_PAGE, 403, "origin_not_allowed"),
        ("backend", PAGE, 403, "not_a_browser_key"),
        ("nonsense", PAGE, 401, "invalid_api_key"),
    ],
)
async def test_a_key_in_the_query_needs_a_browser_key_and_its_origin(
    gw: Browsers, key: str, origin: str | None, status: int, code: str
) -> None:
    plaintext = {"browser": gw.browser_key, "backend": gw.backend_key}.get(key, "cafe_nope")
    headers = {"Origin": origin} if origin else {}
    resp = await gw.post(f"/v1/log?api_key={plaintext}", LOG, **headers)
    assert (resp.status, (await resp.json(content_type=None))["code"]) == (status, code)
    assert gw.produced() == 0


async def test_a_browser_key_reads_nothing(gw: Browsers) -> None:
    resp = await gw.client.get("/v1/ip", headers={"x-api-key": gw.browser_key, "Origin": PAGE})
    assert (resp.status, (await resp.json(content_type=None))["code"]) == (403, "write_only_key")
    # In the query it is not even looked at outside the ingest routes.
    resp = await gw.client.get(f"/v1/ip?api_key={gw.browser_key}")
    assert (resp.status, (await resp.json(content_type=None))["code"]) == (401, "missing_api_key")


async def test_a_refusal_before_the_key_is_known_is_readable_by_a_listed_origin(
    gw: Browsers,
) -> None:
    resp = await gw.post("/v1/log", LOG, x_api_key="cafe_nope", Origin=PAGE)
    assert resp.status == 401
    assert resp.headers["Access-Control-Allow-Origin"] == PAGE


COMPRESSORS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
}


@pytest.mark.parametrize("encoding", [*COMPRESSORS, "zstd"])
async def test_compressed_bodies_are_accepted(gw: Browsers, encoding: str) -> None:
    if encoding == "zstd":
        from backports import zstd

        body = zstd.compress(LOG)
    else:
        body = COMPRESSORS[encoding](LOG)
    resp = await gw.post("/v1/log", body, x_api_key=gw.backend_key, Content_Encoding=encoding)
    assert resp.status == 200, await resp.text()
    assert gw.produced() == 1


async def test_a_body_that_decompresses_too_far_is_413(gw: Browsers) -> None:
    record = orjson.loads(LOG)["records"][0]
    padded = orjson.dumps({"records": [record]}).replace(b"{", b"{" + b" " * 500_000, 1)
    body = gzip.compress(padded)
    assert len(padded) / len(body) > 100
    resp = await gw.post("/v1/log", body, x_api_key=gw.backend_key, Content_Encoding="gzip")
    assert resp.status == 413
    assert "decompresses" in (await resp.json(content_type=None))["detail"]
    assert gw.produced() == 0


def test_keys_create_with_origins_and_browser(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "keys.json")
    create = ["keys", "--keys-file", path, "create", "--platform", "web"]
    assert (
        main([*create, "--origin", PAGE, "--origin", "https://shop.example.com", "--browser"]) == 0
    )
    (key,) = read_keys_file(Path(path))
    assert key.origins == (PAGE, "https://shop.example.com") and key.browser
    with pytest.raises(SystemExit):
        main([*create, "--origin", "https://shop.example.com/path"])
    assert main([*create, "--browser"]) == 1  # a browser key needs an origin
    assert "needs at least one origin" in capsys.readouterr().err


@pytest.mark.parametrize(
    "entry",
    [{"origins": "https://a.example"}, {"origins": ["https://a.example/"]}, {"browser": True},
     {"browser": "yes", "origins": ["https://a.example"]}],
)  # fmt: skip
def test_bad_origins_or_browser_flags_are_refused(tmp_path: Path, entry: dict[str, Any]) -> None:
    _, record = mint_key(("web",))
    doc = {"keys": [{**asdict(record), **entry}]}
    path = tmp_path / "keys.json"
    path.write_bytes(orjson.dumps(doc))
    with pytest.raises(KeysFileError, match=r"origins|browser"):
        read_keys_file(path)
