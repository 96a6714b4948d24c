"""Event topics follow the character rules of partition keys (``shardlite.core.outbox.check_topic``): what
``Router.handler``, ``tx.emit`` and ``tx.emit_many`` accept or refuse with ``ValueError``."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from typing import Any

import pytest
from helpers_routers import internal_rows
from hypothesis import given, settings
from hypothesis import strategies as st

from shardlite import InvalidKey, Router, canonical
from shardlite.core.keys import invisible_character
from shardlite.core.outbox import MAX_TOPIC_LENGTH, check_topic

# Same classes as the key tests: each character would make a topic that looks like "message".
LOOKALIKES = [
    "\u00a0", "\u2000", "\u2007", "\u200a", "\u202f", "\u205f", "\u3000", "\u1680",  # space separators
    "\ufe00", "\ufe0f", "\U000e0100", "\U000e01ef", "\u180b",  # variation selectors
    "\u034f",  # COMBINING GRAPHEME JOINER
    "\u115f", "\u1160", "\u3164", "\uffa0",  # Hangul fillers
    "\u2800",  # BRAILLE PATTERN BLANK
    "\u200b", "\u200d", "\u200f", "\u202e", "\u2066", "\ufeff", "\u00ad", "\U000e0041",  # format
    "\x00", "\x1b", "\n", "\r", "\t", "\x7f", "\x85",  # control
    "\u2028", "\u2029", "\ue000", "\u0378",
]


@pytest.mark.parametrize("ch", LOOKALIKES, ids=lambda c: f"U+{ord(c):04X}")
def test_topics_with_control_or_invisible_characters_are_refused_and_named(ch: str) -> None:
    assert check_topic("message") == "message"
    for topic in (f"mess{ch}age", f"message{ch}", f"{ch}message"):
        with pytest.raises(ValueError) as err:
            check_topic(topic)
        assert f"U+{ord(ch):04X}" in str(err.value)


def test_message_names_the_character() -> None:
    with pytest.raises(ValueError, match="U\\+00A0 NO-BREAK SPACE"):
        check_topic("new\u00a0message")
    with pytest.raises(ValueError, match="U\\+0000"):
        check_topic("message\x00")


@pytest.mark.parametrize("topic", [" message", "message ", " ", "message\u3000", "\tmessage"], ids=ascii)
def test_whitespace_at_either_end_is_refused(topic: str) -> None:
    with pytest.raises(ValueError):
        check_topic(topic)


def test_length_type_and_normal_form() -> None:
    assert check_topic("x" * MAX_TOPIC_LENGTH) == "x" * MAX_TOPIC_LENGTH
    for bad in ("", "x" * (MAX_TOPIC_LENGTH + 1), None, 5, b"message", "\ud800"):
        with pytest.raises(ValueError):
            check_topic(bad)
    assert check_topic("caf\u00e9") == "caf\u00e9"
    with pytest.raises(ValueError, match="NFC"):  # the decomposed twin of a valid topic
        check_topic("cafe\u0301")


def test_visible_topics_stay_valid() -> None:
    for topic in ["message", "new message", "user.created", "chat:room/1", "caf\u00e9", "\u6d88\u606f",
                  "\u2764", "\U0001f4ac", "\u0441\u043e\u043e\u0431\u0449\u0435\u043d\u0438\u0435", "a-b_c"]:
        assert check_topic(topic) == topic


ordinary = st.characters(codec="utf-8", categories=["L", "M", "N", "P", "S"])
any_topics = st.text(alphabet=ordinary | st.sampled_from(LOOKALIKES) | st.just(" ") | st.characters(), max_size=40)


@settings(max_examples=400, deadline=None)
@given(topic=any_topics)
def test_a_topic_is_valid_exactly_when_it_would_be_a_valid_key(topic: str) -> None:
    """Same character rules as keys: a topic in NFC within the length limit is valid iff it is a valid key."""
    try:
        valid_key = canonical(topic) == topic
    except InvalidKey:
        valid_key = False
    try:
        valid_topic = check_topic(topic) == topic
    except ValueError:
        valid_topic = False
    assert valid_topic == valid_key
    if valid_topic:
        assert invisible_character(topic) is None and topic.strip() == topic
        assert unicodedata.is_normalized("NFC", topic)


def test_handler_registration_and_emit_refuse_lookalike_topics(make_router: Callable[..., Router]) -> None:
    router = make_router(schema=["CREATE TABLE notes(body TEXT)"])
    for bad in ("message\u00a0", "message ", "mess\ufe0fage", "message\u3164", "message\x00", "\u2800"):
        with pytest.raises(ValueError):
            router.handler(bad)
        with router.transaction("user:alice") as tx:
            with pytest.raises(ValueError):
                tx.emit("user:bob", bad, {"n": 1})
            with pytest.raises(ValueError):
                tx.emit_many(["user:bob", "user:carol"], bad, {"n": 1})
    seen: list[Any] = []
    router.handler("message")(lambda tx, event: seen.append(event.topic))
    with router.transaction("user:alice") as tx:
        tx.emit("user:bob", "message", {"n": 1})
    assert internal_rows(router, "user:alice", "SELECT topic FROM _shardlite_outbox") == [("message",)]
