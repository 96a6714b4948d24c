"""shardlite's pytest plugin (shardlite/testing/): its fixtures used directly (the plugin is loaded in this
suite through the package's ``pytest11`` entry point), and small user test files run with ``pytester``:
passing cases, failures and their messages, async tests under anyio's and pytest-asyncio's plugins where
installed, and a file that uses none of the fixtures, whose run must be the same with the plugin as without.
"""

from __future__ import annotations

import asyncio
import pathlib
import re
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

import shardlite.testing
from shardlite import AsyncRouter, Router
from shardlite.testing import FAST_RETRY, FAST_SCRYPT, EventRecorder, LoopRunner, adeliver, deliver

pytest_plugins = ["pytester"]

SCHEMA = {"dm": ["CREATE TABLE messages(id INTEGER PRIMARY KEY, body TEXT)"], "room": [],
          "user": ["CREATE TABLE inbox(source TEXT, body TEXT)"]}


@pytest.fixture
def shardlite_schema() -> dict[str, list[str]]:
    return SCHEMA


@pytest.fixture
def pytester(pytester: pytest.Pytester) -> pytest.Pytester:
    """The user projects these tests run configure pytest-asyncio's loop scope (a dev dependency: unset,
    it warns in every inner run)."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    return pytester


def send(router: Router, key: str, *events: tuple[str, str, Any]) -> None:
    with router.transaction(key) as tx:
        tx.execute("INSERT INTO messages(body) VALUES ('x')")
        for dest, topic, payload in events:
            tx.emit(dest, topic, payload)


# -- the fixtures, used directly ---------------------------------------------------------------------------

def test_router_fixtures_use_the_test_defaults(shardlite_root: pathlib.Path, tmp_path: pathlib.Path,
                                               shardlite_router: Router, shardlite_async_router: AsyncRouter,
                                               shardlite_run: LoopRunner) -> None:
    assert shardlite_root.parent == tmp_path
    assert pathlib.Path(shardlite_router.root) == pathlib.Path(shardlite_async_router.root) == shardlite_root
    assert shardlite_router.settings.synchronous == "NORMAL"
    assert shardlite_router.accounts.scrypt == FAST_SCRYPT
    assert shardlite_async_router.accounts.sync.scrypt == FAST_SCRYPT
    assert shardlite_router.relay.policy == FAST_RETRY == shardlite_async_router.relay.sync.policy
    assert not shardlite_router.relay.running and not shardlite_async_router.relay.running

    async def write_and_read() -> list[tuple[Any, ...]]:
        async with shardlite_async_router.transaction("dm:a:b") as tx:
            await tx.execute("INSERT INTO messages(body) VALUES ('hi')")
        uid = await shardlite_async_router.accounts.register("a@example.com", password="long enough")
        assert await shardlite_async_router.accounts.authenticate("A@example.com", "long enough") == uid
        return await shardlite_async_router.query("dm:a:b", "SELECT body FROM messages")

    assert shardlite_run(write_and_read()) == [("hi",)]
    assert shardlite_router.query("dm:a:b", "SELECT body FROM messages") == [("hi",)]  # one root, two routers


def test_the_recorder_keeps_committed_events_only(shardlite_router: Router, shardlite_events: EventRecorder) -> None:
    send(shardlite_router, "dm:a:b", ("user:b", "message", {"text": "kept", "n": [1, 2.5, None]}))
    with pytest.raises(RuntimeError), shardlite_router.transaction("dm:a:b") as tx:
        tx.emit("user:b", "message", {"text": "rolled back"})
        raise RuntimeError("the block fails")
    with shardlite_router.transaction("room:1") as tx:
        tx.emit_many(["user:a", "user:b", "user:c"], "posted", {"text": "to all"})

    assert [(e.source, e.dest, e.topic, e.payload) for e in shardlite_events] == [
        ("dm:a:b", "user:b", "message", {"text": "kept", "n": [1, 2.5, None]}),
        ("room:1", "user:a", "posted", {"text": "to all"}),
        ("room:1", "user:b", "posted", {"text": "to all"}),
        ("room:1", "user:c", "posted", {"text": "to all"})]
    assert len({e.id for e in shardlite_events}) == 4
    assert shardlite_events.payloads(dest="user:b") == [{"text": "kept", "n": [1, 2.5, None]}, {"text": "to all"}]
    assert [e.source for e in shardlite_events.to("user:b", topic="posted")] == ["room:1"]
    assert shardlite_events.where(contains={"text": "to all"}, dest="user:c")[0].seq == 3  # numbered per source file
    shardlite_events.assert_nothing_emitted(topic="never")
    shardlite_events.clear()
    assert list(shardlite_events) == []
    shardlite_events.assert_nothing_emitted()


def test_events_emitted_before_the_recorder_are_not_recorded(shardlite_router: Router,
                                                             request: pytest.FixtureRequest) -> None:
    send(shardlite_router, "dm:a:b", ("user:b", "message", {"n": 1}))  # the test's setup, still pending
    events: EventRecorder = request.getfixturevalue("shardlite_events")
    send(shardlite_router, "dm:a:b", ("user:b", "message", {"n": 2}))
    assert events.payloads() == [{"n": 2}]


def test_handlers_emits_during_delivery_are_recorded(shardlite_router: Router,
                                                     shardlite_events: EventRecorder) -> None:
    router = shardlite_router

    @router.handler("message")
    def on_message(tx: Any, event: Any) -> None:
        tx.execute("INSERT INTO inbox(source, body) VALUES (?, ?)", (event.source, event.payload["text"]))
        tx.emit("user:audit", "seen", {"by": tx.key, "event": event.id})

    router.handler("seen")(lambda tx, event: None)
    send(router, "dm:a:b", ("user:b", "message", {"text": "hi"}))
    first = shardlite_events.assert_emitted(dest="user:b", count=1)[0]
    shardlite_events.assert_nothing_emitted(topic="seen")

    report = deliver(router)
    assert report.ok and report.delivered == 2 and report.undelivered == []
    assert router.query("user:b", "SELECT source, body FROM inbox") == [("dm:a:b", "hi")]
    shardlite_events.assert_emitted(source="user:b", dest="user:audit", topic="seen",
                                    payload={"by": "user:b", "event": first.id}, count=1)
    assert deliver(router).delivered == 0


def test_the_recorder_follows_a_recreated_source(shardlite_router: Router, shardlite_events: EventRecorder) -> None:
    """A dropped and re-created tenant numbers its events from 1 again, under a new incarnation."""
    shardlite_router.use_feed("message")
    send(shardlite_router, "dm:a:b", ("user:b", "message", {"n": 1}), ("user:b", "message", {"n": 2}))
    deliver(shardlite_router)
    shardlite_router.drop("dm:a:b")
    send(shardlite_router, "dm:a:b", ("user:b", "message", {"n": 3}))
    events = list(shardlite_events)
    assert [(e.payload["n"], e.seq) for e in events] == [(1, 1), (2, 2), (3, 1)]
    assert events[0].incarnation == events[1].incarnation != events[2].incarnation


def test_the_recorder_under_group_commit(shardlite_async_router: AsyncRouter, shardlite_run: LoopRunner,
                                         shardlite_events: EventRecorder) -> None:
    ar = shardlite_async_router
    ar.use_feed("message")

    async def one(i: int) -> None:
        async with ar.transaction("dm:a:b") as tx:
            await tx.emit(f"user:{i % 3}", "message", {"i": i})

    async def many() -> None:
        await asyncio.gather(*(one(i) for i in range(30)))

    shardlite_run(many())
    assert sorted(p["i"] for p in shardlite_events.payloads()) == list(range(30))
    shardlite_events.assert_emitted(dest="user:2", count=10)
    assert deliver(ar).delivered == 30
    assert len(shardlite_run(ar.feed("user:0"))) == 10


def test_the_recorder_watches_routers_made_elsewhere(shardlite_root: pathlib.Path, shardlite_events: EventRecorder,
                                                     shardlite_make_router: Callable[..., Router],
                                                     tmp_path: pathlib.Path) -> None:
    made = shardlite_make_router(tmp_path / "other")  # the factory's routers are watched at once
    send(made, "dm:a:b", ("user:b", "message", {"from": "factory"}))
    with Router(shardlite_root, schema=SCHEMA) as own:
        shardlite_events.watch(own)
        shardlite_events.watch(own)  # idempotent
        send(own, "dm:c:d", ("user:d", "message", {"from": "own"}))
    assert shardlite_events.payloads() == [{"from": "factory"}, {"from": "own"}]


def test_deliver_lists_what_it_could_not_deliver(shardlite_router: Router) -> None:
    router = shardlite_router

    @router.handler("message")
    def failing(tx: Any, event: Any) -> None:
        raise ValueError(f"cannot take {event.payload['n']}")

    router.use_feed("seen")
    send(router, "dm:a:b", ("user:b", "message", {"n": 1}), ("user:b", "mention", {"n": 2}),
         ("user:b", "seen", {"n": 3}), ("user:c", "seen", {"n": 4}))
    with pytest.raises(AssertionError) as failed:
        deliver(router)
    assert str(failed.value).splitlines() == [
        "3 events could not be delivered (1 delivered):",
        "  dead: dm:a:b -> user:b  topic 'message'  payload {\"n\":1}",
        "      dead letter after 5 attempts: ValueError: cannot take 1",
        "  pending: dm:a:b -> user:b  topic 'mention'  payload {\"n\":2}",
        "      no handler for topic 'mention' on this router (handlers: message, seen)",
        "  pending: dm:a:b -> user:b  topic 'seen'  payload {\"n\":3}",
        "      held behind event #2 of the same source and destination (order is kept)"]
    report = deliver(router, check=False)  # what is left is still left; the dead letter was reported once
    assert not report.ok and report.delivered == 0
    assert [(u.state, u.topic, u.payload) for u in report.undelivered] == [("pending", "mention", {"n": 2}),
                                                                          ("pending", "seen", {"n": 3})]
    router.handler("mention")(lambda tx, event: None)
    assert deliver(router).delivered == 2


def test_deliver_refuses_a_relay_running_in_the_background(shardlite_router: Router) -> None:
    shardlite_router.relay.start()
    with pytest.raises(RuntimeError, match="running in the background"):
        deliver(shardlite_router)
    shardlite_router.relay.stop()
    deliver(shardlite_router)


def test_async_helpers_refuse_the_wrong_context(shardlite_async_router: AsyncRouter,
                                                shardlite_run: LoopRunner) -> None:
    ar = shardlite_async_router
    ar.use_feed("message")

    async def inside_a_loop() -> None:
        async with ar.transaction("dm:a:b") as tx:
            await tx.emit("user:b", "message", {})
        with pytest.raises(RuntimeError, match="shardlite_adeliver"):
            deliver(ar)
        with pytest.raises(RuntimeError, match="await the coroutine instead"):
            shardlite_run(ar.exists("user:b"))
        assert (await adeliver(ar)).delivered == 1

    shardlite_run(inside_a_loop())
    assert [item.payload for item in shardlite_run(ar.feed("user:b"))] == [{}]


def test_a_relay_started_through_shardlite_run_is_stopped_at_teardown(shardlite_async_router: AsyncRouter,
                                                                      shardlite_run: LoopRunner) -> None:
    ar = shardlite_async_router
    ar.use_feed("message")

    async def start_and_send() -> None:
        ar.relay.start()  # on shardlite_run's loop: it goes on running between calls
        async with ar.transaction("dm:a:b") as tx:
            await tx.emit("user:b", "message", {})

    async def delivered() -> bool:
        for _ in range(500):
            if await ar.exists("user:b") and await ar.feed("user:b"):
                return True
            await asyncio.sleep(0.01)
        return False

    shardlite_run(start_and_send())
    assert shardlite_run(delivered())
    assert ar.relay.running  # the fixture's teardown stops it and closes the router


def test_assertion_messages_list_what_was_emitted(shardlite_router: Router, shardlite_events: EventRecorder) -> None:
    send(shardlite_router, "dm:a:b", ("user:b", "message", {"text": "hi"}), ("user:a", "message", {"text": "x" * 400}))
    with pytest.raises(AssertionError) as failed:
        shardlite_events.assert_emitted(dest="user:b", contains={"text": "bye"})
    assert str(failed.value).splitlines() == [
        "expected at least one event matching dest='user:b', payload containing {\"text\":\"bye\"}, found 0",
        "2 events were emitted:",
        "  1. dm:a:b -> user:b  topic 'message'  payload {\"text\":\"hi\"}",
        f"  2. dm:a:b -> user:a  topic 'message'  payload {{\"text\":\"{'x' * 291}... (411 characters)"]
    wanted = r"^expected 2 events matching source='dm:a:b', dest='user:a', topic='message', found 1\n"
    with pytest.raises(AssertionError, match=wanted):
        shardlite_events.assert_emitted(topic="message", source="dm:a:b", dest="user:a", count=2)
    with pytest.raises(AssertionError) as failed:
        shardlite_events.assert_nothing_emitted(dest="user:a")
    assert str(failed.value).startswith("expected no event matching dest='user:a', found 1:\n  1. dm:a:b -> user:a")


# -- user test files, run with pytester -------------------------------------------------------------------

CONFTEST = '''
import pytest

@pytest.fixture
def shardlite_schema():
    return {"dm": ["CREATE TABLE messages(id INTEGER PRIMARY KEY, body TEXT)"], "user": []}

@pytest.fixture
def shardlite_global_schema():
    return ["CREATE TABLE rooms(id INTEGER PRIMARY KEY, name TEXT)"]

@pytest.fixture
def shardlite_router_kwargs():
    return {"max_payload": 1000}
'''

PASSING = '''
import pytest
from shardlite import PayloadTooLarge

SEEN = []

def test_sync(shardlite_router, shardlite_events, shardlite_deliver):
    shardlite_router.use_feed("message")
    with shardlite_router.transaction("dm:alice:bob") as tx:
        tx.execute("INSERT INTO messages(body) VALUES ('hi')")
        tx.emit("user:bob", "message", {"text": "hi"})
    shardlite_events.assert_emitted(dest="user:bob", topic="message", payload={"text": "hi"})
    assert shardlite_deliver(shardlite_router).delivered == 1
    assert [i.payload for i in shardlite_router.feed("user:bob")] == [{"text": "hi"}]
    with shardlite_router.globals.transaction() as gtx:
        gtx.execute("INSERT INTO rooms(name) VALUES ('general')")
    with pytest.raises(PayloadTooLarge), shardlite_router.transaction("dm:alice:bob") as tx:
        tx.emit("user:bob", "message", {"text": "x" * 2000})
    SEEN.append(shardlite_router)

def test_async(shardlite_async_router, shardlite_run, shardlite_events, shardlite_deliver):
    ar = shardlite_async_router
    ar.use_feed("message")
    async def body():
        async with ar.transaction("dm:alice:bob") as tx:
            await tx.emit("user:bob", "message", {"text": "hi"})
        return await ar.accounts.register("bob@example.com", password="long enough")
    assert shardlite_run(body()) == 1
    shardlite_events.assert_emitted(dest="user:bob", count=1)
    shardlite_deliver(ar)
    assert len(shardlite_run(ar.feed("user:bob"))) == 1
    SEEN.append(ar)

def test_teardown_closed_them():
    assert len(SEEN) == 2 and all(router.closed for router in SEEN)
'''


def test_a_user_suite_overriding_the_schema_passes(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_app=PASSING)
    result = pytester.runpytest("-W", "error::ResourceWarning")
    result.assert_outcomes(passed=3)


FAILING = '''
def test_wrong_destination(shardlite_router, shardlite_events):
    with shardlite_router.transaction("dm:alice:bob") as tx:
        tx.emit("user:bob", "message", {"text": "hi"})
    shardlite_events.assert_emitted(dest="user:carol", topic="message")

def test_unexpected_event(shardlite_router, shardlite_events):
    with shardlite_router.transaction("dm:alice:bob") as tx:
        tx.emit("user:bob", "message", {"text": "hi"})
    shardlite_events.assert_nothing_emitted()

def test_undeliverable(shardlite_router, shardlite_deliver):
    @shardlite_router.handler("message")
    def broken(tx, event):
        raise KeyError("recipient")
    with shardlite_router.transaction("dm:alice:bob") as tx:
        tx.emit("user:bob", "message", {"text": "hi"})
        tx.emit("user:bob", "typing", {})
    shardlite_deliver(shardlite_router)
'''


def test_failures_say_what_was_emitted_and_what_was_not_delivered(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_app=FAILING)
    result = pytester.runpytest()
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines([
        "*_ test_wrong_destination _*",
        ">*shardlite_events.assert_emitted(dest=\"user:carol\", topic=\"message\")",
        "E*AssertionError: expected at least one event matching dest='user:carol', topic='message', found 0",
        "E*1 event was emitted:",
        "E*  1. dm:alice:bob -> user:bob  topic 'message'  payload {\"text\":\"hi\"}",
        "*_ test_unexpected_event _*",
        "E*AssertionError: expected no event, found 1:",
        "E*  1. dm:alice:bob -> user:bob  topic 'message'  payload {\"text\":\"hi\"}",
        "*_ test_undeliverable _*",
        ">*shardlite_deliver(shardlite_router)",
        "E*AssertionError: 2 events could not be delivered (0 delivered):",
        "E*  dead: dm:alice:bob -> user:bob  topic 'message'  payload {\"text\":\"hi\"}",
        "E*      dead letter after 5 attempts: KeyError: 'recipient'",
        "E*  pending: dm:alice:bob -> user:bob  topic 'typing'  payload {}",
        "E*      no handler for topic 'typing' on this router (handlers: message)",
    ])
    # the failure points at the test's line, not into the plugin
    assert "shardlite/testing" not in result.stdout.str()


UNRELATED = '''
import warnings
import pytest

@pytest.fixture
def router():
    return "my own router"

@pytest.fixture
def root(tmp_path):
    return tmp_path / "mine"

@pytest.fixture
def events():
    return []

def test_own_fixtures(router, root, events):
    assert router == "my own router" and root.name == "mine" and events == []

def test_no_fixture_is_added(request):
    print("fixtures:", request.fixturenames)  # compared between the two runs (other plugins may add some)
    assert not [name for name in request.fixturenames if name.startswith("shardlite")]

def test_output_and_warnings():
    print("hello from the test")
    warnings.warn("a user warning", UserWarning)

def test_failing():
    assert 1 + 1 == 3

@pytest.mark.skip(reason="skipped on purpose")
def test_skipped():
    pass
'''
# header lines that name the plugins loaded (or a duration) differ by design; everything else must not
_VARYING = re.compile(r"^(plugins: |rootdir: |platform |cachedir: )|\d+\.\d+s")


def _lines(result: pytest.RunResult) -> list[str]:
    return [line for line in result.outlines if not _VARYING.search(line)]


def test_a_suite_that_uses_no_fixture_is_unaffected(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_unrelated=UNRELATED)
    with_plugin = pytester.runpytest("-rA")
    without = pytester.runpytest("-rA", "-p", "no:shardlite")
    with_plugin.assert_outcomes(passed=3, failed=1, skipped=1, warnings=1)
    without.assert_outcomes(passed=3, failed=1, skipped=1, warnings=1)
    assert _lines(with_plugin) == _lines(without)
    assert any("shardlite" in line for line in with_plugin.outlines if line.startswith("plugins: "))


def test_the_plugin_defines_prefixed_fixtures_and_no_hooks(pytester: pytest.Pytester) -> None:
    assert [name for name in vars(shardlite.testing) if name.startswith("pytest_")] == []
    result = pytester.runpytest("--fixtures")
    out = result.stdout.str()
    section = out.split("fixtures defined from shardlite.testing", 1)[1].split("\n---", 1)[0]
    names = re.findall(r"^(\w+)(?: \[\w+ scope\])? -- ", section, re.M)
    assert set(names) == {
        "shardlite_root", "shardlite_schema", "shardlite_global_schema", "shardlite_router_kwargs",
        "shardlite_scrypt", "shardlite_make_router", "shardlite_router", "shardlite_run",
        "shardlite_make_async_router", "shardlite_async_router", "shardlite_events", "shardlite_deliver",
        "shardlite_adeliver"}


ASYNC_TEST = '''
import pytest

MARK = pytest.mark.{mark}

@MARK
async def test_async_router_in_an_async_test(shardlite_async_router, shardlite_events, shardlite_adeliver):
    ar = shardlite_async_router
    ar.use_feed("message")
    async with ar.transaction("dm:alice:bob") as tx:
        await tx.execute("INSERT INTO messages(body) VALUES ('hi')")
        await tx.emit("user:bob", "message", {{"text": "hi"}})
    shardlite_events.assert_emitted(dest="user:bob", count=1)
    assert (await shardlite_adeliver(ar)).delivered == 1
    assert [i.payload for i in await ar.feed("user:bob")] == [{{"text": "hi"}}]

@MARK
async def test_a_relay_stopped_by_the_test(shardlite_async_router):
    shardlite_async_router.relay.start()
    await shardlite_async_router.relay.stop()
'''


def test_async_tests_under_anyio(pytester: pytest.Pytester) -> None:
    pytest.importorskip("anyio")
    pytester.makeconftest(CONFTEST + textwrap.dedent('''
        @pytest.fixture
        def anyio_backend():
            return "asyncio"
    '''))
    pytester.makepyfile(test_app=ASYNC_TEST.format(mark="anyio"))
    result = pytester.runpytest("-W", "error::ResourceWarning", "-p", "anyio")
    result.assert_outcomes(passed=2)


def test_async_tests_under_pytest_asyncio(pytester: pytest.Pytester) -> None:
    pytest.importorskip("pytest_asyncio")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_app=ASYNC_TEST.format(mark="asyncio"))
    result = pytester.runpytest("-W", "error::ResourceWarning")
    result.assert_outcomes(passed=2)
