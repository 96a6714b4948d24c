"""Recording the events that code under test emits (``tx.emit``, ``tx.emit_many``, handlers that emit).

:class:`EventRecorder` watches routers (:meth:`EventRecorder.watch`). It listens to the router's commits
that emitted (the hook in-process relays are woken by) and, right after each such ``COMMIT``, in the
committing thread, reads the events that transaction added from the source tenant's outbox, where they stay
until a relay delivers them. So it records committed events only (a transaction that rolled back emitted
nothing), in commit order, each once, including events that handlers emit while
:func:`~shardlite.testing.deliver` runs. Events emitted before :meth:`~EventRecorder.watch` (still pending
or not) are not recorded.

The record is exact when delivery runs through :func:`~shardlite.testing.deliver` (nothing else takes events
out of an outbox while the recorder reads it). With a relay running in the background (``relay.start()``,
``Router(relay=True)``) the recorder reads each commit's events in the microseconds after its ``COMMIT``,
while a relay needs three transactions of its own to deliver and remove them: not a race it loses in
practice, but not a guarantee either.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..core.keys import canonical
from ..core.outbox import from_json, to_json
from ..errors import UnknownTenant
from ..front.aio import AsyncRouter
from ..front.router import Router
from ..front.store import Store

__all__ = ["EventRecorder", "RecordedEvent", "ANY"]

# The file's incarnation with the outbox rows past a seq (one row of NULLs when there are none).
_NEW_EVENTS = ("SELECT m.incarnation, o.seq, o.dest, o.topic, o.payload, o.origin FROM _shardlite_meta AS m "
               "LEFT JOIN _shardlite_outbox AS o ON o.seq > ? WHERE m.id = 1 ORDER BY o.seq")
_LAST_SEQ = ("SELECT m.incarnation, (SELECT max(seq) FROM _shardlite_outbox) FROM _shardlite_meta AS m "
             "WHERE m.id = 1")
#: Characters of a payload's JSON shown in a failure message before it is cut.
SHOWN_PAYLOAD = 300


class _Any:
    """A payload filter that matches every payload (the default)."""

    def __repr__(self) -> str:
        return "ANY"


#: ``payload=ANY``: any payload (the default of every filter).
ANY: Any = _Any()


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """One emitted event as committed: ``source`` (the emitting tenant), ``dest``, ``topic`` and ``payload``
    (decoded from its JSON, as a handler receives it); ``seq`` and ``incarnation`` identify it for ever
    (``id`` is the handler's ``event.id``)."""

    source: str
    dest: str
    topic: str
    payload: Any
    seq: int
    incarnation: str

    @property
    def id(self) -> str:
        return f"{self.source}/{self.incarnation}/{self.seq}"

    def __str__(self) -> str:
        return f"{self.source} -> {self.dest}  topic {self.topic!r}  payload {_shown(self.payload)}"


def _shown(payload: Any) -> str:
    try:
        text = to_json(payload)
    except (TypeError, ValueError):
        text = repr(payload)
    return text if len(text) <= SHOWN_PAYLOAD else text[:SHOWN_PAYLOAD] + f"... ({len(text)} characters)"


def _key(key: str | None) -> str | None:
    return None if key is None else canonical(key)


class EventRecorder:
    """Every event committed by the routers it watches, in commit order (see the module doc).

    Read it with iteration, ``len()``, :meth:`where`, :meth:`to`, :meth:`payloads`; check it with
    :meth:`assert_emitted` and :meth:`assert_nothing_emitted`, whose failures list what was emitted.
    Keys given to filters are canonicalised like router keys (``InvalidKey`` for an invalid one).
    Thread-safe: commits on worker threads (an ``AsyncRouter`` at ``synchronous="FULL"``, the relay) are
    recorded too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[RecordedEvent] = []
        self._ids: set[tuple[str, str, int]] = set()
        # per watched store and source: (the incarnation last read, the highest seq read)
        self._marks: dict[tuple[int, str], tuple[str, int]] = {}
        self._watched: dict[int, tuple[Store, Any]] = {}
        #: errors met while reading events after a commit (reported by every assertion)
        self.errors: list[str] = []

    # -- watching -------------------------------------------------------------------------------------

    def watch(self, router: Router | AsyncRouter) -> None:
        """Record the events committed through ``router`` (and through any router of the same process
        sharing its store) from now on. Idempotent. Events already in outboxes are not recorded."""
        store: Store = router._store
        ident = id(store)
        if ident in self._watched:
            return

        def listener(source: str) -> None:
            self._committed(store, source)

        store.emitter.listen(listener)
        self._watched[ident] = (store, listener)
        for source, *_ in store.meta.pending.all():  # what is pending now is not the test's
            try:
                found = store.read_internal(source, _LAST_SEQ)
            except UnknownTenant:
                continue
            if found:
                self._marks[(ident, source)] = (str(found[0][0]), int(found[0][1] or 0))

    def close(self) -> None:
        """Stop listening to every watched router (idempotent); what was recorded stays readable."""
        watched, self._watched = self._watched, {}
        for store, listener in watched.values():
            store.emitter.unlisten(listener)

    def _committed(self, store: Store, source: str) -> None:
        """After a COMMIT that emitted from ``source``: record its new events. Never raises (the commit has
        succeeded; its caller must not see an error): a failure to read is kept in :attr:`errors`."""
        try:
            self._read(store, source)
        except Exception as exc:  # noqa: BLE001 - reported by the assertions instead
            with self._lock:
                self.errors.append(f"could not read the events committed by {source!r}: {type(exc).__name__}: {exc}")

    def _read(self, store: Store, source: str) -> None:
        mark = (id(store), source)
        with self._lock:
            incarnation, last = self._marks.get(mark, ("", 0))
        rows = store.read_internal(source, _NEW_EVENTS, (last,))
        if rows and str(rows[0][0]) != incarnation and last:
            rows = store.read_internal(source, _NEW_EVENTS, (0,))  # a new file under the key: numbers restart
        if not rows:
            return
        current = str(rows[0][0])
        with self._lock:
            highest = last if current == incarnation else 0
            for _, seq, dest, topic, payload, origin in rows:
                if seq is None:
                    continue
                ident = (source, str(origin or current), int(seq))
                highest = max(highest, int(seq))
                if ident in self._ids:
                    continue
                self._ids.add(ident)
                self._events.append(RecordedEvent(source, str(dest), str(topic), from_json(str(payload)), int(seq),
                                                  ident[1]))
            self._marks[mark] = (current, highest)

    # -- reading --------------------------------------------------------------------------------------

    @property
    def events(self) -> list[RecordedEvent]:
        """A copy of everything recorded, in commit order."""
        with self._lock:
            return list(self._events)

    def __iter__(self) -> Iterator[RecordedEvent]:
        return iter(self.events)

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)

    def clear(self) -> None:
        """Forget what was recorded so far (for example what a test's setup emitted); keeps watching."""
        with self._lock:
            self._events.clear()
            self.errors.clear()

    def where(self, *, source: str | None = None, dest: str | None = None, topic: str | None = None,
              payload: Any = ANY, contains: dict[str, Any] | None = None) -> list[RecordedEvent]:
        """The recorded events matching every filter given: ``source``, ``dest`` (keys), ``topic``, ``payload``
        (equal to it) and ``contains`` (a dict payload holding each of these keys with an equal value)."""
        source, dest = _key(source), _key(dest)
        return [event for event in self.events if _matches(event, source, dest, topic, payload, contains)]

    def to(self, dest: str, *, topic: str | None = None) -> list[RecordedEvent]:
        """The events emitted to ``dest`` (of ``topic`` if given), in commit order."""
        return self.where(dest=dest, topic=topic)

    def payloads(self, *, source: str | None = None, dest: str | None = None,
                 topic: str | None = None) -> list[Any]:
        """The payloads of the events matching the filters, in commit order."""
        return [event.payload for event in self.where(source=source, dest=dest, topic=topic)]

    # -- assertions -----------------------------------------------------------------------------------

    def assert_emitted(self, *, source: str | None = None, dest: str | None = None, topic: str | None = None,
                       payload: Any = ANY, contains: dict[str, Any] | None = None,
                       count: int | None = None) -> list[RecordedEvent]:
        """Assert that events matching the filters (see :meth:`where`) were emitted: at least one, or
        exactly ``count``. Returns them. The ``AssertionError`` names the filters and lists every
        recorded event."""
        __tracebackhide__ = True
        self._check_errors()
        found = self.where(source=source, dest=dest, topic=topic, payload=payload, contains=contains)
        if (count is None and found) or len(found) == count:
            return found
        wanted = _describe_filters(source, dest, topic, payload, contains)
        expected = "at least one event" if count is None else f"{count} event{'s' if count != 1 else ''}"
        raise AssertionError(f"expected {expected} matching {wanted}, found {len(found)}\n{self._listing()}")

    def assert_nothing_emitted(self, *, source: str | None = None, dest: str | None = None,
                               topic: str | None = None) -> None:
        """Assert that no event (matching the filters, if any) was emitted; the ``AssertionError`` lists the
        ones that were."""
        __tracebackhide__ = True
        self._check_errors()
        found = self.where(source=source, dest=dest, topic=topic)
        if found:
            scope = _describe_filters(source, dest, topic, ANY, None)
            shown = "\n".join(f"  {n}. {event}" for n, event in enumerate(found, 1))
            raise AssertionError(f"expected no event{'' if scope == 'any event' else ' matching ' + scope}, "
                                 f"found {len(found)}:\n{shown}")

    def _check_errors(self) -> None:
        __tracebackhide__ = True
        with self._lock:
            errors = list(self.errors)
        if errors:
            raise AssertionError("the event recorder missed events:\n" + "\n".join(f"  {e}" for e in errors))

    def _listing(self) -> str:
        events = self.events
        if not events:
            return "no event was emitted"
        lines = [f"{len(events)} event{'s were' if len(events) != 1 else ' was'} emitted:"]
        lines += [f"  {n}. {event}" for n, event in enumerate(events, 1)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        count = len(self)
        return f"<EventRecorder: {count} event{'s' if count != 1 else ''}>"


def _matches(event: RecordedEvent, source: str | None, dest: str | None, topic: str | None, payload: Any,
             contains: dict[str, Any] | None) -> bool:
    if source is not None and event.source != source:
        return False
    if dest is not None and event.dest != dest:
        return False
    if topic is not None and event.topic != topic:
        return False
    if payload is not ANY and event.payload != payload:
        return False
    if contains is not None:
        if not isinstance(event.payload, dict):
            return False
        return all(name in event.payload and event.payload[name] == value for name, value in contains.items())
    return True


def _describe_filters(source: str | None, dest: str | None, topic: str | None, payload: Any,
                      contains: dict[str, Any] | None) -> str:
    parts = [f"{name}={value!r}" for name, value in (("source", source), ("dest", dest), ("topic", topic))
             if value is not None]
    if payload is not ANY:
        parts.append(f"payload={_shown(payload)}")
    if contains is not None:
        parts.append(f"payload containing {_shown(contains)}")
    return ", ".join(parts) if parts else "any event"
