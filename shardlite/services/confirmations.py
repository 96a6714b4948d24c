"""Replication confirmations: how a writer with ``durability="replicated"`` learns that its commit is durable in
the replica (docs/replication.md, "durability=replicated").

The channel is a Unix stream socket per node, ``<node>/.replica/replicator.sock`` (0600 in the 0700 directory:
only the root's own user can connect), bound by the process that replicates the node (the holder of its
``replicator.lock``; a standby binds nothing). A writer that committed to a tenant connects, sends one
request naming the tenant, and waits for one answer; one request per connection.

The contract that makes an answer true: **a request is answered "shipped" only after a capture of its tenant
that began after the request was received, and after every staged capture of that tenant (that one included)
was uploaded.** The writer sends its request after its ``COMMIT`` returned, so such a capture holds the commit
(a capture, lock-free or under the tenant's write lock, reads the log up to the wal-index header's last commit,
``mxFrame``, which the writer's ``COMMIT`` wrote before returning: :mod:`shardlite.files.walcapture`), and
the commit is in an uploaded pack when the answer comes. No log position needs to cross the channel: what the
replicator captures after the request is at least the writer's commit, whichever log generation it lands in.
The replicator takes every request received before a round into that round (one capture per tenant, one
upload for all: the group commit of confirmations) and starts the round at once instead of waiting for its
interval.

A request names the file the writer committed to as well: the tenant's (key, incarnation, generation), from
the writer's own connection. The replicator confirms a request only for that file: by a capture of it while
it is live on the node, or, once it was dropped, by its drop's pack (the drop staged the file's uncaptured
log tail with its drop record, :mod:`shardlite.services.drop_tail`: every commit made before the drop's fence
ships in that pack or before it). So a later tenant under the same key never confirms an earlier one's write,
nor the reverse (:mod:`shardlite.services.confirm_answers` decides every answer).

Answers: ``OK``, or an error with its cause (the upload failed, the capture failed, the tenant moved
meanwhile), or **erased**: the tenant was dropped with ``erase`` before the write was confirmed, and its
whole history, this write included, was removed from the replica on purpose. A writer that gets no answer
within its bound (no replicator runs for the node, the socket is stale, the target hangs) stops waiting. An
error, or no answer, makes the writer raise :class:`~shardlite.ReplicationUnavailable`: its commit stands
locally and is *not confirmed* in the replica; erased raises :class:`~shardlite.TenantErased`.

Wire format (hostile input on both sides: sizes are bounded, anything else closes the connection):
request ``b"SLAI" + >H length + key (UTF-8, at most 1,024 bytes) + >B length + incarnation (UTF-8, at most
255 bytes) + >Q generation``, or (the key only, for any file of the tenant now on the node) ``b"SLAK" + >H
length + key``; answer ``b"\\x00"`` (shipped), ``b"\\x01" + >H length + message (UTF-8)`` (not confirmed) or
``b"\\x02" + >H length + message`` (erased).

Socket paths longer than ``sun_path`` allows (about 107 bytes: deep test directories) are reached through
``/proc/self/fd/<descriptor of the directory>/replicator.sock`` (Linux). The descriptors this module opens
are of the ``.replica`` directory and the socket only, never of a tenant's files (docs/replication.md,
"the -shm trap").
"""

from __future__ import annotations

import asyncio
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from ..files.engine import ensure_private_dir
from ..files.replica_locks import STAGING_DIR

__all__ = ["SOCKET_NAME", "MAX_KEY_BYTES", "Request", "ConfirmServer", "ask_shipped", "ask_shipped_async",
           "Unconfirmed", "ErasedAnswer", "Identity", "socket_path"]

log = logging.getLogger("shardlite.replicate")

SOCKET_NAME = "replicator.sock"
MAGIC = b"SLAK"
#: A request naming the file written to (module docstring)
MAGIC_IDENTITY = b"SLAI"
_HEAD = struct.Struct(">H")
_GENERATION = struct.Struct(">Q")
#: Longest key a request may carry (shardlite's keys are at most 512 bytes).
MAX_KEY_BYTES = 1024
#: Longest incarnation a request may carry (shardlite's are 32 hex digits).
MAX_INCARNATION_BYTES = 255
#: Longest request: magic, key, incarnation, generation.
MAX_REQUEST_BYTES = 4 + 2 + MAX_KEY_BYTES + 1 + MAX_INCARNATION_BYTES + 8
#: Longest error message an answer may carry.
MAX_MESSAGE_BYTES = 4096
#: Connections the server keeps at once (requests being read plus requests waiting for their round).
MAX_CONNECTIONS = 4096
#: A connection that has not sent its whole request after this many seconds is closed.
READ_DEADLINE = 10.0
#: Pause between two tries to reach a replicator that is not there (yet): a replicator started with the app
#: takes a moment to bind, a standby takes over within one round.
RETRY_PAUSE = 0.05
_SUN_PATH_MAX = 100


class Unconfirmed(Exception):  # noqa: N818 - internal: turned into ReplicationUnavailable by the front ends
    """A confirmation did not come: ``args[0]`` says why, for the writer's error message."""


class ErasedAnswer(Unconfirmed):
    """The answer "erased": the written file's tenant was dropped with ``erase`` before the write was confirmed
    (turned into :class:`~shardlite.TenantErased` by the front ends)."""


class Identity(NamedTuple):
    """The file a writer committed to: its tenant's incarnation and the generation of its file."""

    incarnation: str
    generation: int


def socket_path(node_path: str) -> str:
    """The confirmation socket of a node."""
    return os.path.join(node_path, STAGING_DIR, SOCKET_NAME)


class _Address:
    """A socket path usable by ``bind``/``connect``: the path itself, or, when too long for ``sun_path``, the
    same file through ``/proc/self/fd`` and a descriptor of its directory (kept open by this object)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._dir_fd: int | None = None
        self.address = path
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            try:
                self._dir_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                return  # no directory yet (so no socket either): connecting to the path fails, and is retried
            self.address = f"/proc/self/fd/{self._dir_fd}/{os.path.basename(path)}"

    def close(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


def _request(key: str, identity: Identity | None) -> bytes:
    raw = key.encode("utf-8")
    if len(raw) > MAX_KEY_BYTES:
        raise Unconfirmed("the key is too long for a confirmation request")
    if identity is None:
        return MAGIC + _HEAD.pack(len(raw)) + raw
    inc = identity.incarnation.encode("utf-8")
    if len(inc) > MAX_INCARNATION_BYTES or not 0 <= identity.generation < 1 << 64:
        raise Unconfirmed("the tenant's identity does not fit a confirmation request")
    return (MAGIC_IDENTITY + _HEAD.pack(len(raw)) + raw + bytes([len(inc)]) + inc
            + _GENERATION.pack(identity.generation))


def _parse_request(data: bytes) -> tuple[str, Identity | None] | bool:
    """A request read so far: (key, identity or None) when whole, False while incomplete, True when malformed
    (hostile input: a wrong magic, a size past its bound, text that is not UTF-8)."""
    magic = data[:4]
    if not (MAGIC.startswith(magic) or MAGIC_IDENTITY.startswith(magic)):
        return True
    if len(data) < 6:
        return False
    (size,) = _HEAD.unpack_from(data, 4)
    if size > MAX_KEY_BYTES:
        return True
    end = 6 + size
    if magic == MAGIC:
        if len(data) < end:
            return False
        identity = None
    else:
        if len(data) < end + 1:
            return False
        inc_size = data[end]
        if len(data) < end + 1 + inc_size + 8:
            return False
        try:
            incarnation = data[end + 1:end + 1 + inc_size].decode("utf-8")
        except UnicodeDecodeError:
            return True
        (generation,) = _GENERATION.unpack_from(data, end + 1 + inc_size)
        identity = Identity(incarnation, generation)
    try:
        return data[6:end].decode("utf-8"), identity
    except UnicodeDecodeError:
        return True


def _parse_answer(data: bytes) -> tuple[bool, str | None, bool]:
    """(complete, error message or None, erased) of an answer read so far; ValueError for a malformed one."""
    if not data:
        return False, None, False
    if data[:1] == b"\x00":
        return True, None, False
    if data[:1] not in (b"\x01", b"\x02"):
        raise ValueError("not a confirmation answer")
    if len(data) < 3:
        return False, None, False
    (size,) = _HEAD.unpack_from(data, 1)
    if size > MAX_MESSAGE_BYTES:
        raise ValueError("a confirmation answer too long")
    if len(data) < 3 + size:
        return False, None, False
    return True, data[3:3 + size].decode("utf-8", "replace"), data[:1] == b"\x02"


def _raise_for(error: str | None, erased: bool) -> None:
    if error is not None:
        raise ErasedAnswer(error) if erased else Unconfirmed(error)


_NOBODY = (FileNotFoundError, ConnectionRefusedError)
_LOST = (ConnectionResetError, BrokenPipeError, EOFError)


def _why_not(exc: BaseException) -> str:
    """What a failed attempt to ask the replicator says (kept for the error if the bound passes)."""
    if isinstance(exc, _NOBODY):
        return "no replicator is running for this node (start `shardlite replicate run`, or use replicator=True)"
    if isinstance(exc, _LOST):
        return "the node's replicator stopped while the write waited"
    if isinstance(exc, ValueError):  # UnicodeError included
        return "the node's replicator answered something that is not a confirmation"
    return f"the node's replicator socket cannot be reached ({exc})"


def ask_shipped(node_path: str, key: str, timeout: float, identity: Identity | None = None) -> None:
    """Ask the replicator of ``node_path`` to ship ``key``'s commits made so far (``identity``: those of that
    file of the tenant, dropped meanwhile or not) and wait for its answer, at most ``timeout`` seconds (module
    docstring). Returns once they are in the replica; :class:`ErasedAnswer` when they were erased on purpose,
    :class:`Unconfirmed` otherwise. A replicator that is not there, or goes away while the request waits, is
    tried again until the bound (the next one captures after receiving the request: the contract holds across
    restarts)."""
    deadline = time.monotonic() + timeout
    request = _request(key, identity)
    address = _Address(socket_path(node_path))
    why = "no replicator answered for this node"
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unconfirmed(why)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(left)
                sock.connect(address.address)
                sock.sendall(request)
                data = b""
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise EOFError
                    data += chunk
                    done, error, erased = _parse_answer(data)
                    if done:
                        _raise_for(error, erased)
                        return
            except TimeoutError:
                raise _timed_out(why, timeout) from None
            except (OSError, EOFError, ValueError) as exc:  # TimeoutError (an OSError) is caught above
                why = _why_not(exc)
            finally:
                sock.close()
            time.sleep(min(RETRY_PAUSE, max(0.0, deadline - time.monotonic())))
    finally:
        address.close()


def _timed_out(why: str, timeout: float) -> Unconfirmed:
    """The bound went by: the last reason seen (no replicator at all says how long it was waited for)."""
    return Unconfirmed(f"{why} within {timeout:g} s" if why.startswith("no ") else why)


async def ask_shipped_async(node_path: str, key: str, timeout: float, identity: Identity | None = None) -> None:
    """:func:`ask_shipped` for the event loop: the socket is non-blocking and every wait is awaited, so the
    loop serves other tasks meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    request = _request(key, identity)
    address = _Address(socket_path(node_path))
    why = "no replicator answered for this node"

    async def once(sock: socket.socket) -> tuple[str | None, bool]:
        await loop.sock_connect(sock, address.address)
        await loop.sock_sendall(sock, request)
        data = b""
        while True:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                raise EOFError
            data += chunk
            done, error, erased = _parse_answer(data)
            if done:
                return error, erased

    try:
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise Unconfirmed(why)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                error, erased = await asyncio.wait_for(once(sock), left)
                _raise_for(error, erased)
                return
            except TimeoutError:
                raise _timed_out(why, timeout) from None
            except (OSError, EOFError, ValueError) as exc:  # TimeoutError (an OSError) is caught above
                why = _why_not(exc)
            finally:
                sock.close()
            await asyncio.sleep(min(RETRY_PAUSE, max(0.0, deadline - loop.time())))
    finally:
        address.close()


# -- the replicator's side ---------------------------------------------------------------------------------


@dataclass
class Request:
    """A request received whole: the tenant (with the file written to, when the writer named it), and the
    connection its answer goes to."""

    key: str
    conn: socket.socket
    identity: Identity | None = None
    received: float = field(default_factory=time.monotonic)


@dataclass
class _Reading:
    data: bytes
    since: float


class ConfirmServer:
    """The confirmation socket of one node, served by a thread of the replicator that owns the node.

    Requests received whole are queued; :meth:`take` hands them to the replication thread, which answers
    each with :meth:`answer` (and owns its connection from then on). ``on_request`` is called (from the
    server thread) for every request: it wakes the replication loop."""

    def __init__(self, node_path: str, on_request: Callable[[], None]) -> None:
        directory = os.path.join(node_path, STAGING_DIR)
        ensure_private_dir(directory)
        self._address = _Address(socket_path(node_path))
        self._on_request = on_request
        self._queue: list[Request] = []
        self._lock = threading.Lock()
        self._closing = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            try:  # a stale socket of a replicator that died: the node's lock is ours now, so is the name
                os.unlink(self._address.path)
            except FileNotFoundError:
                pass
            old = os.umask(0o177)
            try:
                self._listener.bind(self._address.address)
            finally:
                os.umask(old)
            os.chmod(self._address.path, 0o600)
            self._listener.listen(128)
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            self._address.close()
            raise
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread = threading.Thread(target=self._serve, name="shardlite-confirm", daemon=True)
        self._thread.start()

    def take(self) -> list[Request]:
        """Every request received whole since the last call (the caller answers each)."""
        with self._lock:
            out, self._queue = self._queue, []
        return out

    def answer(self, request: Request, error: str | None, *, erased: bool = False) -> None:
        """Answer ``request`` (``error`` None: shipped; ``erased``: the error says the write was erased on
        purpose) and close its connection. A writer that is gone (it stopped waiting) is no error."""
        if error is None:
            data = b"\x00"
        else:
            raw = error.encode("utf-8")[:MAX_MESSAGE_BYTES]
            data = (b"\x02" if erased and request.identity is not None else b"\x01") + _HEAD.pack(len(raw)) + raw
        try:
            request.conn.setblocking(True)
            request.conn.settimeout(1.0)  # a local socket with an empty buffer: one small write never waits
            request.conn.sendall(data)
        except OSError:
            pass
        finally:
            request.conn.close()

    def close(self) -> None:
        """Stop serving: requests not answered yet lose their connection (their writers try again, then give
        up at their bound); the socket's name is removed."""
        self._closing = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(5.0)
        for request in self.take():
            request.conn.close()
        try:
            os.unlink(self._address.path)
        except FileNotFoundError:
            pass
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self._address.close()

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        reading: dict[socket.socket, _Reading] = {}
        selector.register(self._listener, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._closing:
                timeout = None
                if reading:
                    oldest = min(r.since for r in reading.values())
                    timeout = max(0.0, oldest + READ_DEADLINE - time.monotonic())
                for found, _events in selector.select(timeout):
                    sock = found.fileobj
                    if sock is self._wake_r:
                        continue
                    if sock is self._listener:
                        self._accept(selector, reading)
                        continue
                    assert isinstance(sock, socket.socket)
                    self._read(selector, reading, sock)
                now = time.monotonic()
                for sock in [s for s, r in reading.items() if now - r.since >= READ_DEADLINE]:
                    selector.unregister(sock)
                    del reading[sock]
                    sock.close()
        except Exception:  # noqa: BLE001 - writers then wait their bound and get the error
            log.exception("replicate: the confirmation socket stopped")
        finally:
            for sock in reading:
                sock.close()
            selector.close()

    def _accept(self, selector: selectors.BaseSelector, reading: dict[socket.socket, _Reading]) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        with self._lock:
            queued = len(self._queue)
        if len(reading) + queued >= MAX_CONNECTIONS:
            conn.close()  # its writer tries again until its bound
            return
        conn.setblocking(False)
        reading[conn] = _Reading(b"", time.monotonic())
        selector.register(conn, selectors.EVENT_READ)

    def _read(self, selector: selectors.BaseSelector, reading: dict[socket.socket, _Reading],
              sock: socket.socket) -> None:
        state = reading[sock]
        try:
            chunk = sock.recv(MAX_REQUEST_BYTES - len(state.data))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        state.data += chunk
        got = _parse_request(state.data)
        if got is False and chunk and len(state.data) < MAX_REQUEST_BYTES:
            return  # more to come
        selector.unregister(sock)
        del reading[sock]
        if not isinstance(got, tuple):  # malformed, or the writer closed (or filled the bound) before the end
            sock.close()
            return
        key, identity = got
        with self._lock:
            self._queue.append(Request(key, sock, identity))
        self._on_request()
