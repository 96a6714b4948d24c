"""The chat example's domain (examples/chat/domain.py) tested with shardlite's pytest plugin.

What an application's own tests look like: the schema fixtures are overridden with the app's, the
``shardlite_async_router`` fixture is driven from plain sync tests through ``shardlite_run``, the events
each operation emits are checked with ``shardlite_events`` before anything is delivered, and
``shardlite_deliver`` runs the relay to completion (failing the test if an event cannot be delivered), so
feeds are read without polling.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import pytest

from shardlite import AsyncRouter, pair_key
from shardlite.testing import EventRecorder, LoopRunner, deliver

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `examples` is a top-level directory, not an installed package
    sys.path.insert(0, str(REPO))

from examples.chat.domain import GLOBAL_SCHEMA, SCHEMA, Chat, Forbidden, Invalid, NotFound, User  # noqa: E402

PASSWORD = "correct horse battery"


@pytest.fixture
def shardlite_schema() -> dict[str, list[Any]]:
    return SCHEMA


@pytest.fixture
def shardlite_global_schema() -> Sequence[Any]:
    return GLOBAL_SCHEMA


@pytest.fixture
def chat(shardlite_async_router: AsyncRouter) -> Chat:
    return Chat(shardlite_async_router)  # registers the feed handler for "message"


@pytest.fixture
def people(chat: Chat, shardlite_run: LoopRunner) -> tuple[User, User, User]:
    """Alice, Bob and Carol, registered (cheap password hashing: the plugin's default)."""
    async def register() -> tuple[User, User, User]:
        found = []
        for email, name in (("alice@example.com", "Alice"), ("bob@example.com", "Bob"),
                            ("carol@example.org", "Carol")):
            uid = await chat.ar.accounts.register(email, password=PASSWORD, name=name)
            found.append(await chat.user(uid))
        return found[0], found[1], found[2]
    return shardlite_run(register())


def feed_texts(chat: Chat, run: LoopRunner, user: User) -> list[str]:
    return [item["text"] for item in run(chat.feed(user))]


def test_a_dm_emits_one_event_to_each_participant(chat: Chat, people: tuple[User, User, User],
                                                  shardlite_run: LoopRunner, shardlite_events: EventRecorder) -> None:
    alice, bob, _ = people
    sent = shardlite_run(chat.send_dm(alice, bob.id, "  hi bob  "))
    conv = pair_key("dm", alice.id, bob.id)

    expected = {"kind": "dm", "conv": conv, "from": "Alice", "from_id": alice.id, "text": "hi bob",
                "message_id": sent["id"]}
    shardlite_events.assert_emitted(source=conv, dest=f"user:{bob.id}", topic="message",
                                    payload=expected | {"peer_id": alice.id}, count=1)
    shardlite_events.assert_emitted(source=conv, dest=f"user:{alice.id}", topic="message",
                                    payload=expected | {"peer_id": bob.id}, count=1)
    assert len(shardlite_events) == 2


def test_a_note_to_self_emits_once(chat: Chat, people: tuple[User, User, User], shardlite_run: LoopRunner,
                                   shardlite_events: EventRecorder) -> None:
    alice, _, _ = people
    shardlite_run(chat.send_dm(alice, alice.id, "remember the milk"))
    events = shardlite_events.assert_emitted(dest=f"user:{alice.id}", contains={"text": "remember the milk"},
                                             count=1)
    assert events[0].source == pair_key("dm", alice.id, alice.id)


def test_refused_messages_emit_nothing(chat: Chat, people: tuple[User, User, User], shardlite_run: LoopRunner,
                                       shardlite_events: EventRecorder) -> None:
    alice, bob, carol = people
    for text in ("", "   ", "x" * 2001, 42):
        with pytest.raises(Invalid):
            shardlite_run(chat.send_dm(alice, bob.id, text))  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        shardlite_run(chat.send_dm(alice, 10_000, "anyone?"))
    room = shardlite_run(chat.create_room(alice, "general"))
    with pytest.raises(Forbidden):  # Carol never joined: the transaction rolls back, its emits with it
        shardlite_run(chat.post_room(carol, room["id"], "let me in"))
    shardlite_events.assert_nothing_emitted()


def test_feeds_fill_exactly_once_after_delivery(chat: Chat, people: tuple[User, User, User],
                                                shardlite_run: LoopRunner, shardlite_events: EventRecorder) -> None:
    alice, bob, carol = people
    for text in ("one", "two", "three"):
        shardlite_run(chat.send_dm(alice, bob.id, text))
    shardlite_run(chat.send_dm(carol, bob.id, "hello from carol"))
    assert feed_texts(chat, shardlite_run, bob) == []  # nothing is delivered until the test says so

    report = deliver(chat.ar)
    assert report.delivered == len(shardlite_events) == 8
    assert feed_texts(chat, shardlite_run, bob) == ["hello from carol", "three", "two", "one"]
    assert feed_texts(chat, shardlite_run, alice) == ["three", "two", "one"]
    assert feed_texts(chat, shardlite_run, carol) == ["hello from carol"]
    assert deliver(chat.ar).delivered == 0  # a second run finds nothing: each event applied once


def test_room_messages_reach_the_members_at_posting_time(chat: Chat, people: tuple[User, User, User],
                                                         shardlite_run: LoopRunner,
                                                         shardlite_events: EventRecorder) -> None:
    alice, bob, carol = people
    room = shardlite_run(chat.create_room(alice, "general"))
    shardlite_run(chat.post_room(alice, room["id"], "welcome"))
    assert shardlite_run(chat.join_room(bob, room["id"]))["joined"] is True
    assert shardlite_run(chat.join_room(bob, room["id"]))["joined"] is False  # idempotent
    shardlite_run(chat.post_room(bob, room["id"], "hello all"))

    source = f"room:{room['id']}"
    assert [(e.dest, e.payload["text"]) for e in shardlite_events.where(source=source)] == [
        (f"user:{alice.id}", "welcome"), (f"user:{alice.id}", "hello all"), (f"user:{bob.id}", "hello all")]
    shardlite_events.assert_nothing_emitted(dest=f"user:{carol.id}")
    event = shardlite_events.assert_emitted(dest=f"user:{bob.id}", topic="message", count=1)[0]
    assert event.payload["room"] == "general" and event.payload["room_id"] == room["id"]

    deliver(chat.ar)
    assert feed_texts(chat, shardlite_run, alice) == ["hello all", "welcome"]
    assert feed_texts(chat, shardlite_run, bob) == ["hello all"]
    assert feed_texts(chat, shardlite_run, carol) == []


def test_conversations_are_indexed_once_per_pair(chat: Chat, people: tuple[User, User, User],
                                                 shardlite_run: LoopRunner) -> None:
    alice, bob, _ = people
    for text in ("a", "b"):
        shardlite_run(chat.send_dm(alice, bob.id, text))
        shardlite_run(chat.send_dm(bob, alice.id, text))
    conv = pair_key("dm", alice.id, bob.id)
    assert shardlite_run(chat.conversations(alice)) == [{"conv": conv, "kind": "dm", "title": "Bob"}]
    assert shardlite_run(chat.conversations(bob)) == [{"conv": conv, "kind": "dm", "title": "Alice"}]
    history = shardlite_run(chat.dm_history(bob, alice.id))
    assert [m["text"] for m in history] == ["b", "b", "a", "a"]
    assert shardlite_run(chat.dm_history(bob, alice.id, limit=1, before=history[1]["id"])) == history[2:3]


def test_a_second_chat_process_on_the_same_root(chat: Chat, people: tuple[User, User, User],
                                                shardlite_run: LoopRunner, shardlite_make_async_router: Any,
                                                shardlite_events: EventRecorder) -> None:
    """Two app processes (simulated by two routers on one root): one emits, the other's relay delivers;
    the recorder watches both (the factory's routers are watched like the fixture's)."""
    alice, bob, _ = people
    other = Chat(shardlite_make_async_router())
    shardlite_run(other.send_dm(bob, alice.id, "from the other process"))
    shardlite_events.assert_emitted(dest=f"user:{alice.id}", contains={"text": "from the other process"})
    deliver(chat.ar)
    assert feed_texts(other, shardlite_run, alice) == ["from the other process"]
