"""The examples of the CAFe API spec (docs/cafe-api-endpoints.md), read from the spec itself."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import orjson

SPEC = Path(__file__).resolve().parents[1] / "docs" / "cafe-api-endpoints.md"


@cache
def curl_bodies() -> dict[str, bytes]:
    """The body of each *Sample CURL* by record type, byte for byte as the spec writes it."""
    bodies = {}
    for block in re.findall(r"```bash\n(.*?)```", SPEC.read_text(), re.S):
        path = re.search(r"https://cafe\.example\.com/v1/(\w+)", block)
        data = re.search(r"(?:-d|--data) +'([^']*)'", block)
        if path and data:
            bodies[path.group(1)] = data.group(1).encode()
    return bodies


@cache
def sample_api_key() -> str:
    """The API key the spec's samples send: one teams have already shipped in their apps."""
    found: set[str] = set(re.findall(r"x-api-key: *([A-Za-z0-9]+)", SPEC.read_text()))
    (key,) = found
    return key


@cache
def sample_requests() -> dict[str, Any]:
    """The parsed *Sample Request* body of each POST section, by record type."""
    samples = {}
    for section in re.split(r"^# POST /", SPEC.read_text(), flags=re.M)[1:]:
        name = section.split("\n", 1)[0].strip()
        request = section.split("## Sample Request", 1)[1]
        block = re.search(r"```\w*\n(.*?)```", request, re.S)
        if block is None:
            raise ValueError(f"the spec's POST /{name} has no Sample Request block")
        samples[name] = orjson.loads(block.group(1))
    return samples
