"""shardlite's pytest plugin: routers on a temporary data root, delivery on demand, event assertions.

Installed with shardlite and loaded by pytest through the ``pytest11`` entry point (plugin name
``shardlite``; ``-p no:shardlite`` turns it off; with ``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` set, load it with
``pytest_plugins = ["shardlite.testing"]`` or ``-p shardlite.testing``). It only defines fixtures, all named
``shardlite_*``, none autouse, and no hooks: a test that requests none of them runs exactly as without it.

Fixtures (function scope):

``shardlite_root``            ``pathlib.Path`` of a data root under the test's ``tmp_path`` (not created yet).
``shardlite_schema``          the tenants' schema (default ``None``: no app tables). Override it.
``shardlite_global_schema``   the app's global tables (default ``None``). Override it.
``shardlite_router_kwargs``   more keyword arguments for both routers (default ``{}``); they win over the
                              test defaults below.
``shardlite_scrypt``          the password hashing cost set on the routers' accounts (default
                              :data:`~shardlite.testing.routers.FAST_SCRYPT`; ``None``: the library's).
``shardlite_router``          a :class:`~shardlite.Router`, closed at teardown.
``shardlite_async_router``    an :class:`~shardlite.AsyncRouter`, closed (``aclose()``) at teardown.
``shardlite_run``             ``shardlite_run(coro)``: run a coroutine from a *sync* test (one private event
                              loop per test) and return its result.
``shardlite_make_router``     factory ``(root=None, **overrides) -> Router`` (more routers, another root).
``shardlite_make_async_router`` the same for ``AsyncRouter``.
``shardlite_events``          an :class:`EventRecorder` watching every router these fixtures make in the test
                              (``.watch(router)`` for others): ``to()``, ``where()``, ``assert_emitted()``,
                              ``assert_nothing_emitted()``.
``shardlite_deliver``         :func:`deliver`: drain the relay on demand; ``AssertionError`` listing what
                              could not be delivered (dead letters, topics without a handler).
``shardlite_adeliver``        :func:`adeliver`, its async twin, for async tests.

Test defaults: ``synchronous="NORMAL"``, cheap scrypt (``n=2**4, r=1, p=1``), and relay retries that back off
from 1 ms (:data:`~shardlite.testing.routers.FAST_RETRY`: a failing handler is a dead letter within
milliseconds). The relay never runs in the background: events move when the test calls ``deliver``.

Schemas and options come from fixtures that a test module or ``conftest.py`` overrides by defining a
fixture of the same name::

    @pytest.fixture
    def shardlite_schema():
        return {"dm": ["CREATE TABLE messages(id INTEGER PRIMARY KEY, body TEXT)"], "user": []}

    @pytest.fixture
    def shardlite_router_kwargs():
        return {"max_payload": 1024}

Async: ``shardlite_async_router`` is a plain (sync) fixture: the router binds to the event loop that
first uses it. In a sync test, run coroutines with ``shardlite_run``; with pytest-asyncio (or anyio's
plugin), an ``async def`` test awaits the router directly, and uses ``shardlite_adeliver``. Either way the
router is closed after the test, on the plugin's private loop (no loop runs then). A relay the test itself
started on its own event loop (``ar.relay.start()`` inside an async test) must be stopped before the test
returns (``await ar.relay.stop()``); one started inside ``shardlite_run`` is stopped at teardown.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from ..files.schema import Step
from ..front.accounts import ScryptParams
from ..front.aio import AsyncRouter
from ..front.router import Router
from .delivery import Delivery, Undelivered, adeliver, deliver
from .events import ANY, EventRecorder, RecordedEvent
from .routers import FAST_RETRY, FAST_SCRYPT, AsyncRouterFactory, LoopRunner, RouterFactory, Schema, router_options

__all__ = ["EventRecorder", "RecordedEvent", "ANY", "deliver", "adeliver", "Delivery", "Undelivered", "LoopRunner",
           "RouterFactory", "AsyncRouterFactory", "FAST_SCRYPT", "FAST_RETRY", "router_options"]


@dataclass
class _TestState:
    """What the fixtures of one test share: the routers made, and the recorder once requested."""

    routers: list[Router | AsyncRouter] = field(default_factory=list)
    recorder: EventRecorder | None = None


_STATE = pytest.StashKey[_TestState]()


def _state(request: pytest.FixtureRequest) -> _TestState:
    node: pytest.Item = request.node
    return node.stash.setdefault(_STATE, _TestState())


def _on_made(request: pytest.FixtureRequest) -> Callable[[Router | AsyncRouter], None]:
    """Files each router a factory makes in the test's state; the recorder, once there, watches it."""
    state = _state(request)

    def made(router: Router | AsyncRouter) -> None:
        state.routers.append(router)
        if state.recorder is not None:
            state.recorder.watch(router)
    return made


@pytest.fixture
def shardlite_root(tmp_path: pathlib.Path) -> pathlib.Path:
    """A data root under the test's ``tmp_path``; it does not exist yet (the first router creates it)."""
    return tmp_path / "shardlite"


@pytest.fixture
def shardlite_schema() -> Schema:
    """The tenants' schema for the routers (``Router(schema=...)``): override this fixture."""
    return None


@pytest.fixture
def shardlite_global_schema() -> Sequence[Step] | None:
    """The app's global tables (``Router(global_schema=...)``): override this fixture."""
    return None


@pytest.fixture
def shardlite_router_kwargs() -> dict[str, Any]:
    """More keyword arguments for both routers; they win over the test defaults. Override this fixture."""
    return {}


@pytest.fixture
def shardlite_scrypt() -> ScryptParams | None:
    """Password hashing cost set on the routers' accounts (cheap; ``None`` keeps the library's)."""
    return FAST_SCRYPT


@pytest.fixture
def shardlite_make_router(request: pytest.FixtureRequest, shardlite_root: pathlib.Path, shardlite_schema: Schema,
                          shardlite_global_schema: Sequence[Step] | None, shardlite_router_kwargs: dict[str, Any],
                          shardlite_scrypt: ScryptParams | None) -> Iterator[RouterFactory]:
    """``make(root=None, **overrides) -> Router`` with the test's schema and defaults; every router made is
    closed at teardown."""
    factory = RouterFactory(shardlite_root, router_options(shardlite_schema, shardlite_global_schema,
                                                          shardlite_router_kwargs),
                            shardlite_scrypt, _on_made(request))
    yield factory
    factory.close_all()


@pytest.fixture
def shardlite_router(shardlite_make_router: RouterFactory) -> Router:
    """A :class:`~shardlite.Router` on ``shardlite_root`` with the test's schema (closed at teardown)."""
    return shardlite_make_router()


@pytest.fixture
def shardlite_run() -> Iterator[LoopRunner]:
    """``shardlite_run(coro)``: run a coroutine to completion from a sync test, on one event loop private to
    the test (created on first use, closed at teardown); returns its result."""
    runner = LoopRunner()
    yield runner
    runner.close()


@pytest.fixture
def shardlite_make_async_router(request: pytest.FixtureRequest, shardlite_root: pathlib.Path,
                                shardlite_schema: Schema, shardlite_global_schema: Sequence[Step] | None,
                                shardlite_router_kwargs: dict[str, Any], shardlite_scrypt: ScryptParams | None,
                                shardlite_run: LoopRunner) -> Iterator[AsyncRouterFactory]:
    """``make(root=None, **overrides) -> AsyncRouter`` with the test's schema and defaults; every router made
    is closed (``aclose()``) at teardown."""
    factory = AsyncRouterFactory(shardlite_root, router_options(shardlite_schema, shardlite_global_schema,
                                                               shardlite_router_kwargs),
                                 shardlite_scrypt, shardlite_run, _on_made(request))
    yield factory
    factory.close_all()


@pytest.fixture
def shardlite_async_router(shardlite_make_async_router: AsyncRouterFactory) -> AsyncRouter:
    """An :class:`~shardlite.AsyncRouter` on ``shardlite_root`` with the test's schema; usable from an async
    test's loop, or from a sync test through ``shardlite_run``; closed at teardown."""
    return shardlite_make_async_router()


@pytest.fixture
def shardlite_events(request: pytest.FixtureRequest) -> Iterator[EventRecorder]:
    """An :class:`EventRecorder` watching every router the plugin's fixtures made or make in this test,
    from now on (``.watch(router)`` adds one made elsewhere)."""
    state = _state(request)
    recorder = EventRecorder()
    for router in state.routers:
        if not router.closed:
            recorder.watch(router)
    state.recorder = recorder
    yield recorder
    state.recorder = None
    recorder.close()


@pytest.fixture
def shardlite_deliver() -> Callable[..., Delivery]:
    """:func:`deliver`: ``shardlite_deliver(router, *, timeout=30.0, check=True) -> Delivery``."""
    return deliver


@pytest.fixture
def shardlite_adeliver() -> Callable[..., Coroutine[Any, Any, Delivery]]:
    """:func:`adeliver`: ``await shardlite_adeliver(router, *, timeout=30.0, check=True)``."""
    return adeliver
