"""Outbox rules, pure (no I/O): events, payload encoding, delivery planning, retries (rules: outbox effects happen
exactly once).

* Events are numbered in the source file (``_shardlite_outbox.seq``) past every number it used before
  (``schema.EMIT_SQL``; whoever deletes events first keeps the highest number in ``_shardlite_relay``), so a
  drained outbox never hands out an old number again. Together with the source's
  *incarnation* (new on create, restore and import; kept across moves) ``(source, incarnation, seq)``
  identifies an event for ever.
* Order is kept per (source, destination): :func:`plan` delivers, for each destination, the longest prefix
  of its events that is due and has a handler; the first event that is waiting for a retry, or has no
  handler in this process ("unhandled"), holds back the events behind it for that destination only.
* Dead letters: after ``max_attempts`` failed attempts an event moves to the dead-letter table with its
  error text, and **later events on the same (source, destination) pair go on** (they are not held back by
  a dead event). ``shardlite relay retry`` re-emits a dead letter as a *new* event (a new seq), so it is
  applied after the events that went on without it. Choose idempotent handlers where that order matters.
* Retries back off exponentially: ``backoff_base * 2 ** (attempts - 1)``, capped at ``backoff_cap``
  (:func:`backoff`). A *source* that fails as a whole (its file cannot be claimed, read or acknowledged)
  backs off by the same rule, counted in consecutive failures of that source.
* A destination that is *unavailable* (being moved, or locked by another writer) is not a failure: its
  events stay in the outbox, in order, without counting an attempt, and it is tried again after
  :attr:`RetryPolicy.unavailable_delay`, which grows from ``unavailable_base`` to ``unavailable_cap`` while it
  stays unavailable.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..errors import PayloadTooLarge
from .keys import edge_whitespace, invisible_character

__all__ = ["Event", "OutboxRow", "RetryPolicy", "encode_payload", "from_json", "to_json", "plan", "Plan", "next_due",
           "backoff", "DEFAULT_MAX_PAYLOAD"]

DEFAULT_MAX_PAYLOAD = 64 * 1024
MAX_TOPIC_LENGTH = 200


#: Compact JSON as payloads are stored. Built once: json.dumps with any option but the defaults builds a
#: new encoder on every call (~2 µs).
to_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode

_decode = msgspec.json.Decoder().decode


def from_json(text: str) -> Any:
    """Decode a payload as stored (JSON written by :data:`to_json`): the value ``json.loads`` gives.

    msgspec's decoder, 2-3× faster than :mod:`json` (a feed page decodes fifty payloads), gives the same
    values for everything :data:`to_json` writes: integers of any size, floats (correctly rounded),
    strings; NaN and infinities are never written. A text it refuses goes to ``json.loads``, so what
    that accepts still decodes, and what it refuses raises its ``ValueError`` as before."""
    try:
        return _decode(text)
    except msgspec.DecodeError:
        return json.loads(text)


def encode_payload(payload: Any, limit: int) -> str:
    """Compact JSON of ``payload``; :class:`PayloadTooLarge` past ``limit`` UTF-8 bytes. Raises
    ``TypeError``/``ValueError`` (from :mod:`json`) for values JSON cannot represent."""
    text: str = to_json(payload)
    if len(text) * 4 <= limit:  # a character is at most 4 bytes in UTF-8: no need to count them
        return text
    size = len(text.encode("utf-8"))
    if size > limit:
        raise PayloadTooLarge(f"outbox payload is {size} bytes; the limit is {limit} (Router(max_payload=...))")
    return text


def check_topic(topic: object) -> str:
    """``topic`` itself when it is a valid event topic, else ``ValueError`` naming what is wrong.

    A topic follows the character rules of a partition key (:mod:`shardlite.core.keys`): text of 1 to
    :data:`MAX_TOPIC_LENGTH` characters, no control, format, invisible or look-alike character
    (:func:`~shardlite.core.keys.invisible_character`: NO-BREAK SPACE and the other space separators, variation
    selectors, zero-width and bidi characters, Hangul fillers, U+2800 ...), no whitespace at either end.
    Topics are compared as given (handlers are registered and events stored under the exact text), so a
    topic that is not in Unicode NFC is refused rather than normalised: two spellings of one topic would
    otherwise be two topics, one of them without a handler.
    """
    if not isinstance(topic, str) or not topic or len(topic) > MAX_TOPIC_LENGTH:
        raise ValueError(f"an event topic is non-empty text of at most {MAX_TOPIC_LENGTH} characters")
    if topic.isascii() and topic.isprintable():  # the common case: only the ends to check
        if topic[0] != " " and topic[-1] != " ":
            return topic
    else:
        bad = invisible_character(topic)
        if bad is not None:
            raise ValueError(f"an event topic cannot contain {bad} (control, invisible and look-alike "
                             "characters are refused)")
        if not unicodedata.is_normalized("NFC", topic):
            raise ValueError(f"an event topic must be in Unicode NFC: use {unicodedata.normalize('NFC', topic)!r}")
    edge = edge_whitespace(topic)
    if edge is not None:
        raise ValueError(f"an event topic cannot start or end with whitespace ({edge})")
    return topic


@dataclass(frozen=True, slots=True)
class Event:
    """What a handler receives. ``id`` is ``"<source>/<incarnation>/<seq>"``: unique for ever."""

    source: str
    dest: str
    topic: str
    payload: Any
    seq: int
    incarnation: str
    created: float
    attempts: int = 0

    @property
    def id(self) -> str:
        return f"{self.source}/{self.incarnation}/{self.seq}"


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One row of a source's outbox, as read by the relay."""

    seq: int
    dest: str
    topic: str
    payload: str
    created: float
    attempts: int
    next_at: float
    origin: str | None = None  # the emitting incarnation when it is not the file's current one

    def incarnation(self, current: str) -> str:
        return self.origin or current

    def event(self, source: str, incarnation: str) -> Event:
        return Event(source, self.dest, self.topic, from_json(self.payload), self.seq,
                     self.incarnation(incarnation), self.created, self.attempts)


def backoff(tries: int, base: float, cap: float) -> float:
    """The pause after ``tries`` consecutive failures (1 for the first): ``base * 2 ** (tries - 1)``, at most
    ``cap``."""
    return min(cap, base * (2.0 ** max(0, tries - 1)))


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts and backoff. Failed attempts of an event (and failures of a source as a whole) back off
    from ``backoff_base`` to ``backoff_cap``; an event dies after ``max_attempts``. An unavailable
    destination (moving, locked) is retried after ``unavailable_base`` growing to ``unavailable_cap``,
    counting nothing."""

    max_attempts: int = 5
    backoff_base: float = 0.05
    backoff_cap: float = 30.0
    unavailable_base: float = 0.2
    unavailable_cap: float = 1.0

    def next_at(self, now: float, attempts: int) -> float:
        return now + backoff(attempts, self.backoff_base, self.backoff_cap)

    def unavailable_delay(self, tries: int) -> float:
        """The pause before a tenant found unavailable ``tries`` times in a row is tried again."""
        return backoff(tries, self.unavailable_base, self.unavailable_cap)

    def dead(self, attempts: int) -> bool:
        return attempts >= self.max_attempts


@dataclass
class Plan:
    """What one relay pass over a source will deliver, per destination, in seq order."""

    deliver: dict[str, list[OutboxRow]] = field(default_factory=dict)
    waiting: int = 0  # events held back by a retry delay (theirs or an earlier one's on the same pair)
    unhandled: list[OutboxRow] = field(default_factory=list)  # first event of each pair with no handler
    next_due: float | None = None


def plan(rows: Iterable[OutboxRow], handlers: Mapping[str, Callable[..., Any]], now: float) -> Plan:
    """Split a source's outbox (``rows`` in seq order) into what can be delivered now."""
    result = Plan()
    blocked: set[str] = set()
    for row in rows:
        if row.dest in blocked:
            result.waiting += 1
            continue
        if row.next_at > now:
            blocked.add(row.dest)
            result.waiting += 1
            result.next_due = row.next_at if result.next_due is None else min(result.next_due, row.next_at)
            continue
        if row.topic not in handlers:
            blocked.add(row.dest)
            result.unhandled.append(row)
            continue
        result.deliver.setdefault(row.dest, []).append(row)
    return result


def next_due(now: float, *, remaining: int, held: int, retry_due: float | None, unhandled: bool,
             recheck: float) -> float:
    """When a source with ``remaining`` events after a pass needs its next pass.

    ``held`` events are known to wait (for a retry delay, behind one, or for a handler this process does
    not have). Any other remaining event (emitted during the pass, beyond the batch, or behind a handler
    that just failed) is due now; otherwise the earliest retry, and unhandled topics are looked at again
    every ``recheck`` seconds (another process may handle them).
    """
    if remaining > held:
        return now
    candidates = [retry_due] if retry_due is not None else []
    if unhandled:
        candidates.append(now + recheck)
    return min(candidates) if candidates else now
