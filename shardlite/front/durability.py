"""A router's acknowledgement policy: when a write transaction returns (``durability=`` on ``Router`` and
``AsyncRouter``; docs/replication.md, "durability=replicated").

- ``"local"`` (the default): a transaction returns once it is committed to its tenant's file (``synchronous``
  says how durable that is on this machine). On a replicated root its commit ships with the replicator's next
  round: ``shardlite replicate status`` reports the lag.
- ``"replicated"``: a transaction returns only once its commit is also durable in the root's replica: after
  ``COMMIT`` the writer asks the node's replicator to ship the tenant's commits and waits for its answer
  (:mod:`shardlite.services.confirmations`; the replicator serves every request that arrived before a round in
  that round: one upload per batch of writers, and the AsyncRouter asks once per group-commit batch). Past
  ``durability_timeout`` seconds, or at once when the replicator reports a failed upload, the transaction
  raises :class:`~shardlite.ReplicationUnavailable`: **committed locally, not confirmed in the replica**
  (never rolled back). Needs a root that replicates (``ConfigurationError`` otherwise) and a replicator
  running for its nodes (``replicator=True``, or ``shardlite replicate run``).

The request names the file the transaction committed to (its connection's tenant incarnation and file
generation, and the node that file is on), not the tenant's current route: a tenant dropped right after the
write is still answered, by whether the drop's pack, which holds the write (services/drop_tail.py), has
shipped; dropped with ``erase``, the answer is :class:`~shardlite.TenantErased` (the write was removed from
the replica on purpose). ``wait_replicated(key)`` names the tenant's file the catalog knows, dropped or not.

The policy belongs to the router (this process's promise to its callers), not to the root: two processes on
one root may acknowledge differently.
"""

from __future__ import annotations

import asyncio
import os

from ..errors import ConfigurationError, ReplicationUnavailable, TenantErased, TenantMoving, UnknownTenant
from ..files.catalog import TenantRecord
from ..files.pool import Handle
from ..services import confirmations
from .store import Store

__all__ = ["Durability", "DURABILITY_MODES", "DEFAULT_TIMEOUT"]

DURABILITY_MODES = ("local", "replicated")
#: Seconds a write of ``durability="replicated"`` waits for the replica before ReplicationUnavailable: a round
#: and an upload take well under a second; the S3 client's own retries of a failing upload take a few.
DEFAULT_TIMEOUT = 10.0


class Durability:
    """The acknowledgement policy of one router (module docstring)."""

    __slots__ = ("store", "replicated", "timeout")

    def __init__(self, store: Store, mode: str, timeout: float) -> None:
        if mode not in DURABILITY_MODES:
            raise ConfigurationError(f"durability must be one of {', '.join(map(repr, DURABILITY_MODES))} "
                                     f"(got {mode!r})")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigurationError(f"durability_timeout must be a number of seconds > 0 (got {timeout!r})")
        if mode == "replicated" and store.replicate is None:
            raise ConfigurationError(f"durability='replicated' needs a root that replicates: {store.root} has no "
                                     "replica; create it with replicate=URL (or `shardlite init --replicate URL`)")
        self.store, self.replicated, self.timeout = store, mode == "replicated", float(timeout)

    def _written(self, canon: str, handle: Handle | None) -> tuple[str | None, str, confirmations.Identity]:
        """(node name, None when not looked up yet; node path; identity) of the file a confirmation asks about:
        ``handle``'s (the file the transaction committed to), else the file the catalog knows for ``canon``,
        live or dropped."""
        if handle is not None:
            # a tenant's file is <node path>/<2 hex digits>/<digest>.<generation>.db (core.placement)
            path = os.path.dirname(os.path.dirname(handle.path))
            return None, path, confirmations.Identity(handle.incarnation, handle.generation)
        record = self._record(canon)
        return (record.node, self.store.node_path(record.node),
                confirmations.Identity(record.incarnation, record.generation))

    def _record(self, canon: str) -> TenantRecord:
        try:
            record = self.store.resolve(canon, create=False)  # the cached route when live
        except TenantMoving:  # being dropped: its file is still the one to ask about
            record = None
        if record is None:
            record = self.store.meta.tenants.lookup(canon)  # a tombstone: its last file's drop answers
        if record is None:
            raise UnknownTenant.for_key(canon)
        return record

    def _error(self, canon: str, node: str | None, path: str, why: str) -> ReplicationUnavailable:
        node = node or self.store.node_name_at(path) or path
        return ReplicationUnavailable(
            f"tenant {canon!r}: the write is committed locally but not confirmed durable in the replica "
            f"{self.store.replicate} (waited at most durability_timeout={self.timeout:g} s): {why}. It ships "
            f"once the replica is reachable and a replicator runs for node {node!r}; check `shardlite replicate "
            f"status --root {self.store.root}` and the replicator's log. Waiting again is safe "
            "(wait_replicated); repeating the transaction applies it twice unless it is idempotent")

    def _erased(self, canon: str, why: str) -> TenantErased:
        return TenantErased(f"tenant {canon!r}: the write was committed, then erased before it was confirmed "
                            f"durable in the replica {self.store.replicate}: {why}. This is final: waiting again "
                            "gives the same answer")

    def wait(self, canon: str, timeout: float | None = None, *, handle: Handle | None = None) -> None:
        """Block until every commit to ``canon`` made so far (``handle``: through that connection) is in the
        replica (ReplicationUnavailable past ``timeout``, default the router's; TenantErased when the tenant
        was dropped with erase first)."""
        node, path, identity = self._written(canon, handle)
        try:
            confirmations.ask_shipped(path, canon, self.timeout if timeout is None else timeout, identity)
        except confirmations.ErasedAnswer as exc:
            raise self._erased(canon, str(exc)) from None
        except confirmations.Unconfirmed as exc:
            raise self._error(canon, node, path, str(exc)) from None

    async def wait_async(self, canon: str, timeout: float | None = None, *, handle: Handle | None = None) -> None:
        """:meth:`wait` for the event loop (it never blocks the loop: a route not cached in this process is
        looked up on a worker thread when the metadata is a network round trip away)."""
        if handle is not None or self.store.meta.local or self.store.cached(canon):
            node, path, identity = self._written(canon, handle)
        else:
            node, path, identity = await asyncio.get_running_loop().run_in_executor(None, self._written, canon,
                                                                                    None)
        try:
            await confirmations.ask_shipped_async(path, canon, self.timeout if timeout is None else timeout,
                                                  identity)
        except confirmations.ErasedAnswer as exc:
            raise self._erased(canon, str(exc)) from None
        except confirmations.Unconfirmed as exc:
            raise self._error(canon, node, path, str(exc)) from None
