"""The confirmation socket of ``durability="replicated"`` (shardlite/services/confirmations.py) on its own: the
server and both clients over a real Unix socket, hostile bytes on either side, node paths too long for
``sun_path``, a stale socket of a dead replicator. No tenant files are involved."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from shardlite.services import confirmations as c


def _node(tmp_path: Path, long: bool = False) -> str:
    path = tmp_path / ("n" * 120 if long else "n1")
    path.mkdir()
    return str(path)


def _answer_all(server: c.ConfirmServer, error: str | None, stop: threading.Event) -> list[str]:
    """A stand-in replication loop: answers every request it takes; returns the keys it saw."""
    seen: list[str] = []

    def loop() -> None:
        while not stop.is_set():
            for request in server.take():
                seen.append(request.key)
                server.answer(request, error)
            time.sleep(0.01)
    threading.Thread(target=loop, daemon=True).start()
    return seen


@pytest.mark.parametrize("long", [False, True])
def test_a_request_is_answered_over_the_socket(tmp_path: Path, long: bool) -> None:
    node = _node(tmp_path, long)
    woken = threading.Event()
    server = c.ConfirmServer(node, woken.set)
    stop = threading.Event()
    try:
        assert len(os.fsencode(c.socket_path(node))) > 100 or not long
        mode = os.stat(c.socket_path(node)).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        seen = _answer_all(server, None, stop)
        c.ask_shipped(node, "user:é", 10.0)
        asyncio.run(c.ask_shipped_async(node, "user:b", 10.0))
        assert seen == ["user:é", "user:b"] and woken.is_set()
    finally:
        stop.set()
        server.close()
    assert not os.path.exists(c.socket_path(node))  # closing removes the name


def test_an_error_answer_reaches_both_clients(tmp_path: Path) -> None:
    node = _node(tmp_path)
    server = c.ConfirmServer(node, lambda: None)
    stop = threading.Event()
    try:
        _answer_all(server, "the upload to the replica failed (connection refused)", stop)
        with pytest.raises(c.Unconfirmed, match="upload to the replica failed"):
            c.ask_shipped(node, "user:a", 10.0)
        with pytest.raises(c.Unconfirmed, match="upload to the replica failed"):
            asyncio.run(c.ask_shipped_async(node, "user:a", 10.0))
    finally:
        stop.set()
        server.close()


def test_no_replicator_and_a_stale_socket_end_at_the_bound(tmp_path: Path) -> None:
    node = _node(tmp_path)
    os.makedirs(os.path.join(node, ".replica"), mode=0o700)
    began = time.monotonic()
    with pytest.raises(c.Unconfirmed, match="no replicator is running"):
        c.ask_shipped(node, "user:a", 0.3)
    assert time.monotonic() - began < 0.3 + 5
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # bound, then closed: a dead replicator's name
    stale.bind(c.socket_path(node))
    stale.close()
    with pytest.raises(c.Unconfirmed, match="no replicator is running"):
        asyncio.run(c.ask_shipped_async(node, "user:a", 0.3))
    server = c.ConfirmServer(node, lambda: None)  # a new owner takes the stale name over
    stop = threading.Event()
    try:
        _answer_all(server, None, stop)
        c.ask_shipped(node, "user:a", 10.0)
    finally:
        stop.set()
        server.close()


def test_a_replicator_that_never_answers_ends_at_the_bound(tmp_path: Path) -> None:
    node = _node(tmp_path)
    server = c.ConfirmServer(node, lambda: None)  # takes requests, answers none
    try:
        with pytest.raises(c.Unconfirmed, match="within 0.3 s"):
            c.ask_shipped(node, "user:a", 0.3)
        with pytest.raises(c.Unconfirmed, match="within 0.3 s"):
            asyncio.run(c.ask_shipped_async(node, "user:a", 0.3))
    finally:
        server.close()


@pytest.mark.parametrize("junk", [
    b"HTTP/1.1 GET /\r\n\r\n", b"SLAK\xff\xff" + b"x" * 10, b"SLAK\x00\x02\xff\xfe", b"",
    # requests naming the file written to: cut short, an incarnation that is not UTF-8, a key past its bound
    b"SLAI\x00\x01a\x20abc", b"SLAI\x00\x01a\x02\xff\xfe" + bytes(8),
    b"SLAI\x04\x01" + b"k" * 1025 + b"\x00" + bytes(8)])
def test_hostile_requests_are_dropped_and_the_server_goes_on(tmp_path: Path, junk: bytes) -> None:
    node = _node(tmp_path)
    server = c.ConfirmServer(node, lambda: None)
    stop = threading.Event()
    try:
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bad.connect(c.socket_path(node))
        bad.sendall(junk)
        bad.shutdown(socket.SHUT_WR)
        bad.settimeout(10.0)
        assert bad.recv(100) == b""  # closed without an answer
        bad.close()
        assert server.take() == []
        seen = _answer_all(server, None, stop)
        c.ask_shipped(node, "user:ok", 10.0)
        assert seen == ["user:ok"]
    finally:
        stop.set()
        server.close()


def test_a_request_names_the_file_written_and_an_erased_answer_is_its_own(tmp_path: Path) -> None:
    """A request may name the file the writer committed to (incarnation, generation): the server hands it on
    whole; the answer "erased" raises ErasedAnswer (an Unconfirmed) on both clients, and is sent only to a
    request that named its file (a key-only request gets a plain error)."""
    node = _node(tmp_path)
    server = c.ConfirmServer(node, lambda: None)
    seen: list[c.Request] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for request in server.take():
                seen.append(request)
                server.answer(request, "erased on purpose", erased=True)
            time.sleep(0.01)
    threading.Thread(target=loop, daemon=True).start()
    try:
        identity = c.Identity("ab" * 16, 2**40 + 3)
        with pytest.raises(c.ErasedAnswer, match="erased on purpose"):
            c.ask_shipped(node, "user:é", 10.0, identity)
        with pytest.raises(c.ErasedAnswer, match="erased on purpose"):
            asyncio.run(c.ask_shipped_async(node, "user:b", 10.0, c.Identity("x", 1)))
        with pytest.raises(c.Unconfirmed, match="erased on purpose") as caught:
            c.ask_shipped(node, "user:c", 10.0)
        assert not isinstance(caught.value, c.ErasedAnswer)
        assert [(r.key, r.identity) for r in seen] == [("user:é", identity), ("user:b", ("x", 1)), ("user:c", None)]
        with pytest.raises(c.Unconfirmed, match="does not fit"):
            c.ask_shipped(node, "user:d", 1.0, c.Identity("i" * 256, 1))
    finally:
        stop.set()
        server.close()


def test_a_hostile_answer_is_not_a_confirmation(tmp_path: Path) -> None:
    node = _node(tmp_path)
    os.makedirs(os.path.join(node, ".replica"), mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(c.socket_path(node))
    listener.listen(8)

    def answer_junk() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(100)
            conn.sendall(b"\x01\xff\xff" + b"x" * 10)  # a message longer than allowed
            conn.close()
    threading.Thread(target=answer_junk, daemon=True).start()
    try:
        with pytest.raises(c.Unconfirmed, match="not a confirmation"):
            c.ask_shipped(node, "user:a", 0.5)
    finally:
        listener.close()
