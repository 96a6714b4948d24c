"""Running replication for a root: one :class:`~shardlite.services.replicator.NodeReplicator` per node,
fed by the writers' change notes, one round per interval (``shardlite replicate run``).

A node is replicated by one process at a time: the process that holds ``flock`` on
``<node>/.replica/replicator.lock`` (a file of its own: the lock never touches a tenant's files, and
``flock`` locks do not interact with SQLite's POSIX locks on Linux). Another process started for the same
root waits as a standby and takes a node over within one interval of its owner's death.

The loop (:meth:`Replication.run`) ticks :data:`CAPTURE_TICKS` times per interval; at each tick, for each node
this process owns:

1. the notes written since the last tick are read (:mod:`shardlite.files.notesfile`) and each noted
   tenant is marked with its commits' frame counts and times;
2. the marked tenants are captured and staged (checkpointing big logs), for at most one interval of work
   (a first pass over a large node ships as it goes; the tenants not reached stay marked);
3. once per interval (and at once when a writer asks for a confirmation) what is staged is uploaded as one
   pack: an upload waits only for the captures of the last tick, so a commit's lag is at most about one
   interval, one tick's captures and the upload, and PUTs stay one per interval;
4. the notes' read offsets are stored when they moved, and notes files of dead writers read to their end
   removed, only when no marked tenant is left over (a busy tenant keeps the offsets where they were, so a
   crash never loses a note of a tenant not captured yet);
5. after an upload, every :data:`RECONCILE_EVERY` seconds (and at start; less often on a node so large that a
   pass would take more than :data:`RECONCILE_SHARE` of a core) every live tenant of the node without a
   cursor is marked, and the size and time of every tenant's log are compared with the last look (at the
   first look in this process, its time with the tenant's last capture): a log that changed without a note
   (its writer could not write one) is marked too, for the next tick. The pass reads the catalog and the
   cursors once each and stats each log: no query per tenant; it runs after the upload so that its cost
   (~0.1 s at 5,000 tenants) never delays one.

:meth:`Replication.run_round` (``replicate run --once``) is one whole round: the reconcile pass when due,
every marked tenant captured, one upload. A round or tick whose wall time exceeds the interval is logged
(INFO) with the seconds of each of its phases (``RoundStats.phases``).

The root's metadata (catalog, nodes, accounts, sessions: a ``global.db``-schema export, whichever backend
holds it) and the app's global tables go to the replica as snapshots (:mod:`shardlite.core.metasnap`) at the
first round and then every :data:`META_EVERY` seconds when they changed, and in between, with the metadata
embedded, as deltas (the pages changed since the last snapshot: :mod:`shardlite.core.metadelta`) at the
uploads that see them changed (with PostgreSQL metadata, whose changes a file's
size and time do not show: snapshots every :data:`META_EVERY` seconds). The one process that holds
``<root>/.replica/meta.lock`` uploads them (:mod:`shardlite.services.replica_meta`). A whole root restored
from the replica takes its metadata from the newest snapshot or delta at or before the restore time.

The same process compacts the replica by its retention windows (:mod:`shardlite.services.replica_retention`)
every :data:`~shardlite.services.replica_retention.COMPACT_EVERY` seconds (the time of the last compaction is
in the replica, so restarts do not postpone it), under ``<root>/.replica/compact.lock``; a failed compaction
is logged and tried again at the next interval. Between compactions it writes the key index's segment every
:data:`~shardlite.services.replica_index.SEGMENT_EVERY` seconds (the packs shipped since), and before this
process's first upload for a node, the node's marker (:func:`~shardlite.services.replica_index.node_marker`).

Before its first upload a process checks that the replica is this root's (:func:`~shardlite.services.
replica_owners.claim`): a location another root replicates to raises :class:`~shardlite.ConfigurationError`
and :meth:`Replication.run` stops with it; a replica that cannot be reached leaves uploads for later.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigurationError, ReplicaUnavailable, ShardliteError
from ..files import notesfile
from ..files.replica_locks import STAGING_DIR
from ..front.store import Store
from ..replica.target import ReplicaTarget, open_target
from . import confirm_answers, replica_index, replica_meta, replica_owners
from .confirmations import ConfirmServer, Request
from .replica_meta import MetaUploader
from .replicator import NodeReplicator, RoundStats

__all__ = ["Replication", "INTERVAL", "CAPTURE_TICKS", "RECONCILE_EVERY", "RECONCILE_SHARE", "META_EVERY",
           "META_DELTA_EVERY"]

log = logging.getLogger("shardlite.replicate")

#: Seconds between uploads: the lag of a commit is at most about one interval, a tick's captures and an upload
#: (README, "Replication figures": p99 under 1 s at 5,000 tenants and 200 writes/s with 0.5 s, two PUTs a
#: second at most, and idle CPU within issue 16's budget at 100,000 tenants).
INTERVAL = 0.5
#: Capture ticks per interval: the noted tenants are captured and staged every ``interval / CAPTURE_TICKS``
#: seconds and what is staged is uploaded once per interval, so an upload waits only for the captures of
#: the last tick (a commit's lag: up to one interval, one tick's captures and the upload).
CAPTURE_TICKS = 4
#: Seconds between reconcile passes (tenants without a cursor, logs that changed without a note), at least.
RECONCILE_EVERY = 30.0
#: The share of a core the reconcile passes may take: after a pass that cost ``c`` seconds of CPU, the next
#: waits ``max(RECONCILE_EVERY, c / RECONCILE_SHARE)`` (a pass stats every log of the node: ~0.8 s at 100,000
#: tenants, so 200 s between passes there instead of 30).
RECONCILE_SHARE = 0.004
#: Catalog tenants per slice of a reconcile pass in the loop (one slice after each upload).
RECONCILE_SLICE = 1000
#: Seconds between metadata snapshots (taken only when the metadata changed, where that can be seen).
META_EVERY = 30.0
#: Seconds between checks that the replica's owner marker still names this root (one GET): a root restored from
#: the replica that takes it over stops this one's uploads within this time.
OWNER_RECHECK = 30.0
#: Seconds between metadata deltas at least: 0, a delta at every upload that sees the metadata changed (less
#: often when they cost more than a share of a core: :mod:`shardlite.services.replica_meta`).
META_DELTA_EVERY = 0.0
#: A log last written this long before its tenant's last capture is taken as captured at the reconcile
#: pass's first look at it (the file's time is coarser than the capture's clock).
FIRST_LOOK_MARGIN_NS = 1_000_000_000


@dataclass
class _Node:
    name: str
    path: str
    lock_fd: int
    replicator: NodeReplicator
    offsets: dict[str, int] = field(default_factory=dict)
    #: the offsets last written to the staging file
    stored_offsets: dict[str, int] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    #: per tenant, its log's time and size at the last look, as one int (``_look``: at 100,000 tenants a
    #: tuple of two per tenant held 23 MB)
    seen_logs: dict[str, int] = field(default_factory=dict)
    reconciled_at: float = 0.0
    #: seconds from one reconcile pass to the next (RECONCILE_EVERY, or longer when a pass costs more)
    reconcile_every: float = RECONCILE_EVERY
    #: a pass in slices (the loop): the key its next slice starts after (None: no pass under way), the keys
    #: it found live so far, and its CPU seconds so far
    pass_after: str | None = None
    pass_live: set[str] = field(default_factory=set)
    pass_spent: float = 0.0
    last: RoundStats | None = None
    confirm: ConfirmServer | None = None
    #: confirmation requests taken into a round and not answered yet (their tenant stayed busy)
    waiting: list[Request] = field(default_factory=list)


class Replication:
    """Replicates the nodes of ``store``'s root that this process can own (module docstring)."""

    def __init__(self, store: Store, target: ReplicaTarget | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if store.replicate is None:
            raise ConfigurationError(f"{store.root} does not replicate: create it with `shardlite init "
                                     "--replicate URL` (or Router(root, replicate=URL))")
        self.store = store
        self.target = target if target is not None else open_target(store.replicate)
        self._owns_target = target is None
        self.clock = clock
        self.nodes: dict[str, _Node] = {}
        self.standby: set[str] = set()
        #: the root's metadata snapshots and deltas (uploaded while this process holds the metadata lock)
        self.meta = MetaUploader(store, self.target, lambda: _try_lock(os.path.join(store.root, STAGING_DIR),
                                                                       "meta.lock"), clock)
        #: set when a writer asks for a confirmation (or the loop must stop): the next round starts at once
        self._wake = threading.Event()
        self.confirmed = 0  #: confirmation requests answered "shipped"
        self._compact_checked: float | None = None
        self._segments = replica_index.SegmentWriter()  #: the key index's segments (_compact_round)
        self._unmarked: set[str] = set()  #: nodes taken whose key index marker is not written yet
        #: seconds of the last round's root-wide phases (metadata snapshot, compaction or index refresh)
        self.last_extra: dict[str, float] = {}
        self.compactions: list[Any] = []  #: reports of the compactions this process ran
        #: this root's owner id once the replica's owner marker said it may write there (None: not checked yet;
        #: nothing is uploaded before, :mod:`shardlite.services.replica_owners`)
        self.owner: str | None = None
        #: why the last check of the owner marker could not be made (the replica unreachable), else None
        self._claim_exc: ReplicaUnavailable | None = None
        #: when the owner marker was last found to name this root (``clock``)
        self._owner_checked = 0.0
        #: the refusal of the replica's owner marker (another root's location), once one was raised
        self.refused: ConfigurationError | None = None

    @property
    def meta_snapshots(self) -> int:
        """Metadata snapshots this process uploaded."""
        return self.meta.snapshots

    def close(self) -> None:
        for node in self.nodes.values():
            if node.confirm is not None:
                node.confirm.close()
                for request in node.waiting:
                    request.conn.close()
            node.replicator.close()
            os.close(node.lock_fd)  # releases the node for a standby
        self.nodes.clear()
        self.meta.close()
        if self._owns_target:
            self.target.close()

    # -- ownership -------------------------------------------------------------------------------------

    def _claim(self, name: str, path: str) -> None:
        fd = _try_lock(os.path.join(path, STAGING_DIR), "replicator.lock")
        if fd is None:
            self.standby.add(name)
            return
        self.standby.discard(name)
        try:
            replicator = NodeReplicator(self.store, name, self.target)
        except BaseException:
            os.close(fd)
            raise
        confirm: ConfirmServer | None = None
        try:
            confirm = ConfirmServer(path, self._wake.set)
        except OSError as exc:  # replication goes on; durability="replicated" writers get their error at the bound
            log.warning("replicate: node %r: cannot serve confirmations on %s (%s); writers with "
                        "durability='replicated' will not be confirmed", name, path, exc)
        offsets = replicator.staging.notes_offsets()
        node = self.nodes[name] = _Node(name, path, fd, replicator, offsets, dict(offsets), confirm=confirm)
        replicator.read_notes = lambda: self._read_notes(node)
        self._unmarked.add(name)
        log.info("replicate: this process replicates node %r", name)

    def _mark_nodes(self) -> None:
        """The key index's marker of each node taken since (replica_index.node_marker), before its first
        upload by this process, so a one-tenant restore finds a node no index covers yet. A target that
        cannot be reached now: again at the next upload (its uploads fail then too)."""
        for name in sorted(self._unmarked):
            try:
                self.target.put_if_absent(replica_index.node_marker(name), b"shardlite node\n")
            except ShardliteError as exc:
                log.warning("replicate: node %r: cannot write its key index marker (%s); trying again", name, exc)
                return
            self._unmarked.discard(name)

    def _claim_nodes(self) -> None:
        for node in self.store.meta.nodes.list():
            if node.name not in self.nodes:
                self._claim(node.name, self.store.node_path(node.name))

    # -- rounds ----------------------------------------------------------------------------------------

    def run_round(self) -> dict[str, RoundStats]:
        """One round on every node this process owns (claiming the ones free now): the reconcile pass when
        due, every marked tenant captured, one upload; then the metadata snapshot when one is due."""
        return self._tick(upload=True, budget=None, loop=False)

    def _tick(self, *, upload: bool, budget: float | None, loop: bool) -> dict[str, RoundStats]:
        """Captures on every node, and (``upload``, or on a node with confirmation requests) the upload;
        the root-wide work (claiming free nodes, the metadata snapshot, compaction) only with ``upload``.
        ``loop``: a tick of :meth:`run`, whose reconcile pass runs after the upload (module docstring)."""
        wanted = upload
        if upload:
            self._claim_nodes()  # local (the nodes' locks and confirmation sockets), whatever the replica says
        if upload and not self._owned():
            upload = False
        if upload:
            self._mark_nodes()
        out = {}
        for node in self.nodes.values():
            out[node.name] = self._round(node, upload=upload, budget=budget, loop=loop)
        if wanted and not upload:  # the replica's owner could not be checked: nothing was uploaded
            for stats in out.values():
                stats.upload_error = stats.upload_error or self._claim_error()
            if not loop and self._claim_exc is not None:
                raise self._claim_exc  # run_round (`replicate run --once`): the captures are staged, the upload not
        if upload:
            t = time.perf_counter()
            self._meta_round()
            t1 = time.perf_counter()
            self._compact_round()
            self.last_extra = {"meta": t1 - t, "compact": time.perf_counter() - t1}
        return out

    def _owned(self) -> bool:
        """Whether this root may upload to the replica, checking its owner marker if it was not yet
        (:func:`~shardlite.services.replica_owners.claim`; :class:`~shardlite.ConfigurationError` when the
        location is another root's). False while the replica cannot be reached (:meth:`_claim_error` says so)."""
        url = self.store.replicate or ""
        try:
            if self.owner is None:
                self.owner = replica_owners.claim(self.target, self.store.meta.kv, url)
                self._owner_checked = self.clock()
            elif self.clock() - self._owner_checked >= OWNER_RECHECK:
                # a root restored from this replica may have taken it over since: stop writing there then
                replica_owners.still_ours(self.target, self.owner, url)
                self._owner_checked = self.clock()
            self._claim_exc = None
        except ConfigurationError as exc:
            self.refused = exc
            raise
        except ReplicaUnavailable as exc:
            if self.owner is not None:
                return True  # checked before; this round's uploads meet the same error and report it
            self._claim_exc = exc
            log.warning("replicate: %s; captures go on, uploads wait", self._claim_error())
        return self.owner is not None

    def _claim_error(self) -> str | None:
        """Why the owner marker could not be checked at the last try (None: it was, or it was not tried)."""
        if self._claim_exc is None:
            return None
        return f"the replica could not be reached to check whose it is ({self._claim_exc})"

    def _meta_round(self) -> None:
        self.meta.round(every=META_EVERY, delta_every=META_DELTA_EVERY)

    def _compact_round(self) -> None:
        """Compact when due, else write the key index's segment (checked every SEGMENT_EVERY seconds by this
        process, which holds the root's metadata lock, so one process per root does it)."""
        from . import replica_retention as rr

        now = self.clock()
        if self.meta.fd is None or (self._compact_checked is not None
                                     and now - self._compact_checked < replica_index.SEGMENT_EVERY):
            return
        self._compact_checked = now
        fd: int | None = None
        try:
            due = rr.compaction_due(self.target, time.time_ns())
            fd = rr.compact_lock(self.store)
            if fd is None:
                return  # `replicate compact` is running
            if due:
                self.compactions.append(rr.compact(self.store, self.target))
            # the packs shipped since the last segment, for one-tenant restores (after a compaction: since it)
            rr.refresh_index(self.store, self.target, writer=self._segments)
        except Exception as exc:  # noqa: BLE001 - a failed compaction never stops replication
            log.warning("replicate: compaction or key index segment failed (%s: %s); trying again in %.0f s",
                        type(exc).__name__, exc, replica_index.SEGMENT_EVERY)
        finally:
            if fd is not None:
                os.close(fd)

    def _read_notes(self, node: _Node) -> None:
        for name in notesfile.list_notes(node.path):
            if name in node.finished:
                continue
            got = notesfile.read_notes(node.path, name, node.offsets.get(name, 0))
            if got.bad:
                node.finished.add(name)
                continue
            for note in got.notes:
                node.replicator.mark(note.key, [(note.frames, note.time_ns)])
            node.offsets[name] = got.offset
            if got.finished:
                node.finished.add(name)

    def _reconcile(self, node: _Node, limit: int | None = None) -> None:
        """The reconcile pass, or (``limit``) its next slice of that many catalog tenants: a pass over 5,000
        tenants took 0.6 s at load 8, delaying every capture behind it. The pass's CPU is summed over its slices
        and spaces the next pass (RECONCILE_SHARE)."""
        spent = time.thread_time()
        done = self._reconcile_logs(node, limit)
        node.pass_spent += time.thread_time() - spent
        if done:
            node.reconcile_every = max(RECONCILE_EVERY, node.pass_spent / RECONCILE_SHARE)
            node.pass_spent = 0.0

    def _reconcile_logs(self, node: _Node, limit: int | None) -> bool:
        replicator = node.replicator
        live: dict[str, str] = {}
        after = node.pass_after or ""
        # one read of the catalog's slice and of its cursors: no lookup per tenant below
        _marked, node.pass_after = replicator.reconcile_slice(after, limit, live)
        upto = node.pass_after
        captured = replicator.staging.captured_times(after, upto) if live.keys() - node.seen_logs.keys() else {}
        node.pass_live.update(live)
        for key, path in live.items():
            try:
                info = os.stat(path + "-wal")
                look = _look(info.st_size, info.st_mtime_ns)
            except FileNotFoundError:
                look = 0
            seen = node.seen_logs.get(key)
            if seen == look:
                continue
            node.seen_logs[key] = look
            if seen is None:
                # The first look at this log in this process (at start, or after its first capture): it is
                # as its cursor's capture saw it when it was last written well before that capture (file
                # times are coarse: FIRST_LOOK_MARGIN_NS). Marking it anyway re-captured every tenant of
                # the node once after each start (a full pass: ~0.5 ms of CPU per tenant).
                at = captured.get(key)
                if look and at is not None and look >> _SIZE_BITS < at - FIRST_LOOK_MARGIN_NS:
                    continue
            replicator.mark(key)
        if node.pass_after is not None:
            return False
        for key in node.seen_logs.keys() - node.pass_live:  # dropped, moved away, or marked for a new file
            del node.seen_logs[key]
        node.pass_live = set()
        node.reconciled_at = self.clock()
        return True

    def _round(self, node: _Node, *, upload: bool, budget: float | None, loop: bool) -> RoundStats:
        # Confirmation requests received before this round: their tenants are captured in it, after the
        # request arrived, so the capture holds the writer's commit (shardlite.services.confirmations); a
        # round with requests uploads, whatever the tick.
        t0 = time.perf_counter()
        requests = node.waiting + (node.confirm.take() if node.confirm is not None else [])
        node.waiting = []
        wanted = upload or bool(requests)
        upload = wanted and self._owned()
        for request in requests:
            node.replicator.mark(request.key)
        self._read_notes(node)
        t1 = time.perf_counter()
        reconcile = (node.pass_after is not None or not node.reconciled_at
                     or self.clock() - node.reconciled_at >= node.reconcile_every)
        if reconcile and not loop:
            self._reconcile(node)
        t2 = time.perf_counter()
        stats = node.replicator.run_round(upload=upload, budget=budget)
        if wanted and not upload and stats.upload_error is None:
            stats.upload_error = self._claim_error()
        stats.phases["notes"] = t1 - t0
        if reconcile and not loop:
            stats.phases["reconcile"] = t2 - t1
        node.last = stats
        t = time.perf_counter()
        if requests:
            self._answer(node, requests, stats)
            t = stats.timed("answer", t)
        if not node.replicator.marked():
            gone = sorted(node.finished)
            offsets = {name: at for name, at in node.offsets.items() if name not in node.finished}
            if gone or offsets != node.stored_offsets:  # an idle tick writes nothing
                node.replicator.staging.set_notes_offsets(offsets, gone)
                node.stored_offsets = offsets
            for name in gone:
                notesfile.remove(node.path, name)
                node.offsets.pop(name, None)
            node.finished.clear()
            t = stats.timed("offsets", t)
        if reconcile and loop and upload:
            # after the upload, and in slices of RECONCILE_SLICE tenants, one per upload: the pass (~0.1 s at
            # 5,000 tenants idle, 0.6 s at load 8) never delays an upload and holds up the captures of a tick
            # by a slice at most; what it marks is captured by the next tick
            self._reconcile(node, RECONCILE_SLICE)
            stats.timed("reconcile", t)
        return stats

    def _answer(self, node: _Node, requests: list[Request], stats: RoundStats) -> None:
        """Answer the confirmation requests of a round (:mod:`shardlite.services.confirm_answers` decides);
        those it keeps wait in ``node.waiting``: for the next round at once, or for the next tick."""
        decided = confirm_answers.decide(self.store, node.name, node.replicator, requests, stats)
        for request, error, erased in decided.answers:
            if error is None:
                self.confirmed += 1
            if node.confirm is not None:
                node.confirm.answer(request, error, erased=erased)
        node.waiting = decided.again + decided.later
        if decided.again:
            self._wake.set()

    def run(self, stop: threading.Event, *, interval: float = INTERVAL, parent: int | None = None) -> None:
        """Ticks every ``interval / CAPTURE_TICKS`` seconds, with an upload every ``interval`` (module
        docstring), until ``stop`` is set, or, given ``parent``, until ``os.getppid()`` is no longer ``parent``
        (checked before every tick: a replicator started by an app never outlives it). A tick that fails as a
        whole (the metadata unreachable) is logged and the next one tries again. A confirmation request
        (:mod:`shardlite.services.confirmations`) starts the next tick at once, and its node uploads in it."""
        def relay_stop() -> None:
            stop.wait()
            self._wake.set()
        threading.Thread(target=relay_stop, name="shardlite-replicate-stop", daemon=True).start()
        tick = interval / CAPTURE_TICKS
        uploaded: float | None = None
        while not stop.is_set():
            if parent is not None and os.getppid() != parent:
                log.warning("replicate: the process that started this replicator (pid %d) is gone: stopping", parent)
                return
            started = self.clock()
            upload = uploaded is None or started - uploaded >= interval - tick / 2
            try:
                stats = self._tick(upload=upload, budget=interval, loop=True)
            except ConfigurationError as exc:
                if exc is self.refused:
                    raise  # the replica belongs to another root (replica_owners.claim): nothing to retry
                log.warning("replicate: round failed (%s); retrying in %.1f s", exc, interval)
            except Exception as exc:  # noqa: BLE001 - one failed round never stops replication
                log.warning("replicate: round failed (%s: %s); retrying in %.1f s", type(exc).__name__, exc,
                            interval)
            else:
                took = self.clock() - started
                if took > interval:
                    _log_slow_round(took, stats, self.last_extra if upload else {})
            if upload:
                uploaded = started
            if stop.is_set():
                break
            self._wake.wait(max(0.0, tick - (self.clock() - started)))
            self._wake.clear()

    # -- status ----------------------------------------------------------------------------------------

    def status(self, now_ns: int | None = None) -> dict[str, Any]:
        """Per node and per tenant: the last captured commit, what is staged, packs shipped."""
        return status(self.store, now_ns, owned=set(self.nodes), standby=set(self.standby))


_SIZE_BITS = 48


def _look(size: int, mtime_ns: int) -> int:
    """A log's size and time in one int (time in the high bits: ``look >> _SIZE_BITS`` is the time); 0 for
    no log. Sizes of 2**48 bytes and more share their low bits, which a changed time still tells apart."""
    return (mtime_ns << _SIZE_BITS) | (size & ((1 << _SIZE_BITS) - 1)) or 1


def _log_slow_round(took: float, stats: dict[str, RoundStats], extra: dict[str, float]) -> None:
    """Log where a round longer than its interval went (its phases, slowest first, per node)."""
    parts = [f"{name}: {s.captured} captured, {s.uploaded_packs} packs, " + ", ".join(
        f"{phase} {secs:.3f}" for phase, secs in sorted(s.phases.items(), key=lambda x: -x[1]) if secs >= 0.001)
        for name, s in stats.items()]
    parts += [f"{phase} {secs:.3f}" for phase, secs in extra.items() if secs >= 0.001]
    log.info("replicate: slow round, %.3f s (%s)", took, "; ".join(parts))


def _try_lock(directory: str, name: str) -> int | None:
    """A descriptor holding ``flock(LOCK_EX)`` on ``directory/name`` (made 0600 in a 0700 directory), or None
    when another process holds it."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def status(store: Store, now_ns: int | None = None, *, owned: set[str] | None = None,
           standby: set[str] | None = None) -> dict[str, Any]:
    """What every node's staging says (read from its file; no replicator needs to run in this process)."""
    from ..files.staging import Staging

    now = time.time_ns() if now_ns is None else now_ns
    nodes: dict[str, Any] = {}
    tenants: dict[str, Any] = {}
    for node in store.meta.nodes.list():
        path = os.path.join(store.node_path(node.name), STAGING_DIR, "staging.db")
        if not os.path.exists(path):
            nodes[node.name] = {"staged": 0, "staged_bytes": 0, "packs": 0, "pack_bytes": 0, "last_pack": None,
                                "drops_staged": 0}
            continue
        staging = Staging(store.node_path(node.name))
        try:
            count, size = staging.staged_count()
            packs = list(staging.packs())
            pending = staging.pending_by_key()
            nodes[node.name] = {"staged": count, "staged_bytes": size, "packs": len(packs),
                                "pack_bytes": sum(p[4] for p in packs),
                                "last_pack": packs[-1][1] if packs else None,
                                "last_upload_ns": packs[-1][3] if packs else None,
                                # drop records of plain drops waiting for the next pack (a dropped tenant has no
                                # cursor: it is not listed below)
                                "drops_staged": staging.drops_count()}
            for key, found in staging.cursors().items():
                oldest = pending.get(key)
                tenants[key] = {"node": node.name, "last_commit_ns": found.last_commit_ns,
                                "captured_ns": found.captured_ns, "shipped": oldest is None,
                                "lag_s": 0.0 if oldest is None else max(0, now - oldest) / 1e9}
        finally:
            staging.close()
    lags = [t["lag_s"] for t in tenants.values()]
    return {"target": store.replicate, "nodes": nodes, "tenants": tenants,
            "total": {"tenants": len(tenants), "max_lag_s": max(lags, default=0.0),
                      "staged": sum(n["staged"] for n in nodes.values()),
                      "drops_staged": sum(n["drops_staged"] for n in nodes.values()),
                      "packs": sum(n["packs"] for n in nodes.values())},
            "metadata": replica_meta.shipped(store, now),
            "owned": sorted(owned or ()), "standby": sorted(standby or ())}
