"""Hypothesis strategies: any JSON, the spec's samples changed, valid batches from the OpenAPI."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode

from gateway.config import TopicSettings
from gateway.http.openapi import build_openapi
from gateway.schemas import load_record_types
from tests.support.app import VALIDATOR
from tests.support.records import NAMES, sample

# The platform the tests' keys may write (tests/support/keys.py).
PLATFORM = "analytics-portal"

# Any JSON value, with integers past 64 bits and NaN/Infinity (the standard library
# writes them as the non-JSON literals NaN and Infinity, which the gateway must refuse).
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def changed_records(name: str) -> st.SearchStrategy[dict[str, Any]]:
    """The spec sample of `name` with a few fields replaced by any JSON, or removed."""
    record = sample(name)
    fields = [*record, "extra"]
    replaced = st.dictionaries(st.sampled_from(fields), JSON, max_size=2)
    removed = st.sets(st.sampled_from(fields), max_size=1)
    return st.builds(
        lambda new, gone: {k: v for k, v in {**record, **new}.items() if k not in gone},
        replaced,
        removed,
    )


# Valid bodies come from schemathesis, generated from the gateway's own OpenAPI document
# (hypothesis-jsonschema 0.23.1 fails on this Hypothesis: 'many' object has no attribute
# 'more').
RECORD_TYPES = load_record_types(TopicSettings().by_record_type(), VALIDATOR)
OPENAPI = schemathesis.openapi.from_dict(build_openapi(RECORD_TYPES, "test"))


def _valid_batches(name: str) -> st.SearchStrategy[tuple[str, list[dict[str, Any]]]]:
    """Bodies the OpenAPI document calls valid, their records written by the key's platform."""
    cases = OPENAPI[f"/v1/{name}"]["POST"].as_strategy(generation_mode=GenerationMode.POSITIVE)
    return cases.map(lambda case: (name, _own_platform(case.body)))


def _own_platform(body: Any) -> list[dict[str, Any]]:
    return [{**record, "productPlatform": PLATFORM} for record in body["records"]]


# (record type, records) of a valid batch, of any record type.
VALID_BATCHES = st.one_of(*(_valid_batches(name) for name in NAMES))
