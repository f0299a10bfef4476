"""Every error a client may be answered with is documented, from the one list of them.

The list is gateway/errors.py: each `GatewayError` class that sets its own `code`, and
the codes given to aiohttp's own HTTP errors (`HTTP_CODES`). The error table of
docs/api.md and the OpenAPI document must agree with it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway import errors
from gateway.config import TopicSettings
from gateway.http.openapi import build_openapi
from gateway.http.problems import HTTP_CODES
from gateway.schemas import load_record_types
from tests.support.app import VALIDATOR

PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _kinds(cls: type[errors.GatewayError]) -> Iterator[type[errors.GatewayError]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _kinds(sub)


def answerable() -> set[tuple[int, str]]:
    """(status, code) of every error a client may get."""
    own = {(c.status, c.code) for c in _kinds(errors.GatewayError) if "code" in vars(c)}
    return own | set(HTTP_CODES.items())


def documented_errors() -> set[tuple[int, str]]:
    """The (status, code) rows of the error table in docs/api.md."""
    text = PAGE.read_text()
    section = text[text.index("\n## Errors\n") + 1 :]
    section = section[: section.index("\n#")]
    rows = re.findall(r"^\| (\d{3}) \| `([a-z0-9_]+)` \|", section, re.MULTILINE)
    return {(int(status), code) for status, code in rows}


def test_the_docs_list_every_error_and_no_other() -> None:
    documented, known = documented_errors(), answerable()
    assert documented - known == set(), "in the error table of docs/api.md, but no error has them"
    assert known - documented == set(), "errors missing from the error table of docs/api.md"


def problems(operation: dict[str, Any]) -> set[int]:
    """The statuses an OpenAPI operation answers with a problem."""
    return {
        int(status)
        for status, response in operation["responses"].items()
        if "application/problem+json" in response.get("content", {})
    }


def test_openapi_documents_only_statuses_the_gateway_answers_with() -> None:
    document = build_openapi(
        load_record_types(TopicSettings().by_record_type(), VALIDATOR), "0.0.0"
    )
    statuses = {status for status, _ in answerable()}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            unknown = problems(operation) - statuses
            assert not unknown, f"{method.upper()} {path} documents {unknown}, which nothing raises"


def test_every_error_status_of_an_ingest_route_is_in_openapi() -> None:
    document = build_openapi(
        load_record_types(TopicSettings().by_record_type(), VALIDATOR), "0.0.0"
    )
    documented = problems(document["paths"]["/v1/activity"]["post"])
    # Not for a client to read: 499 is logged for a client that left; 404 and 405 are
    # the router's, for paths and methods that are not this operation.
    unanswered = {404, 405, 499}
    missing = {s for s, _ in answerable() if s not in unanswered} - documented
    assert not missing, f"POST /v1/activity does not document {sorted(missing)}"
