"""Stored payloads decode to exactly what ``json.loads`` gives (shardlite.core.outbox.from_json, msgspec)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardlite.core.outbox import from_json, to_json
from shardlite.front.feed import items

json_values = st.recursive(
    st.none() | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)  # far past 64 bits: must stay exact ints
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=25,
)


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types all the way down (1 == 1.0 and 0.0 == -0.0 would hide a difference)."""
    return repr(a) == repr(b)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_from_json_gives_what_json_loads_gives(value: Any) -> None:
    text = to_json(value)
    assert same(from_json(text), json.loads(text))


@settings(max_examples=100, deadline=None)
@given(st.lists(json_values, min_size=1, max_size=20))
def test_a_feed_page_decodes_like_its_payloads_one_by_one(payloads: list[Any]) -> None:
    rows = [(i, "user:1", "t", to_json(p), f"user:1/x/{i}", 1.0) for i, p in enumerate(payloads)]
    decoded = [item.payload for item in items(rows)]
    assert same(decoded, [json.loads(row[3]) for row in rows])


def test_texts_msgspec_refuses_still_decode_like_json_loads() -> None:
    assert math.isnan(from_json("NaN")) and from_json("[Infinity]") == [math.inf]  # json's extensions
    with pytest.raises(ValueError):  # json's error type for a bad text, as before
        from_json("{not json")
    with pytest.raises(ValueError):
        items([(1, "user:1", "t", "{broken", "user:1/x/1", 1.0)])
