"""Creating tenants: where a new tenant goes and how its file comes to be (a mixin of
:class:`~shardlite.front.store.Store`).

* The ring *proposes* a node among the active ones; the catalog *decides* (the first process to register
  a key wins, the others adopt its record). A node whose disk has less than :data:`PLACEMENT_RESERVE` free
  gets no new tenant: the ring over the other active nodes proposes one instead.
* Creation is atomic: a template per key prefix (shardlite's tables and the app's schema, built once per
  process), personalised with the key and a fresh incarnation, written to a private temporary name and
  linked into place (see :mod:`shardlite.files.tenant`); a storage failure is a shardlite error naming the
  tenant and the file.
* The steps: allocate a generation (with a remote store, in the same call as the route's catalog lookup:
  :meth:`_lookup_creating`), link the file at ``(key, generation)``, register. A process killed
  between them leaves an unregistered file that nothing routes to (an orphan) and no row; the next creation
  of the key allocates a new generation. A generation may be handed out again after a crash of the
  metadata store itself (see :meth:`TenantCatalog.allocate_generation
  <shardlite.meta.tenants.TenantCatalog.allocate_generation>`: never one a row holds): a file already at
  the new path is such an orphan, or a racing creator's file, and is left alone (another generation is
  allocated); a registration refused with :class:`~shardlite.meta.tenants.GenerationTaken` removes this
  creator's own file and allocates again.
* The node list used for placement is cached while the metadata store promises to say when it changes
  (:meth:`MetaStore.node_list_token <shardlite.meta.store.MetaBase.node_list_token>`; PostgreSQL: a NOTIFY
  from a trigger on the node rows, every reconnect counting as a change). A stale list costs no rule: a
  registration takes the node's row lock for its foreign-key check, so a node removed meanwhile refuses it
  (the list is read again and the creation retried once), and a node drained meanwhile may still receive a
  tenant, as it already could when the list was read just before the drain committed.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..core.keys import prefix_of
from ..core.placement import tenant_relpath
from ..core.ring import Ring
from ..errors import ConfigurationError, MetaUnavailable, ShardliteError, StorageFull
from ..files.catalog import Node, TenantRecord
from ..files.copying import remove_db_files
from ..files.engine import Settings, free_bytes, storage_error
from ..files.schema import SchemaSpec
from ..files.tenant import Personaliser, build_template, write_new_file
from ..meta.tenants import GenerationTaken

if TYPE_CHECKING:
    from ..meta.store import MetaStore

__all__ = ["TenantCreation", "PLACEMENT_RESERVE", "CREATE_ATTEMPTS"]

#: A node whose disk has less free space than this gets no new tenant (see Store.propose).
PLACEMENT_RESERVE = 1024 * 1024

#: Generations one creation may allocate before it gives up: each extra one answers a file already at the
#: path or a generation taken, which only a crash of the metadata store can cause, once per lost allocation.
CREATE_ATTEMPTS = 16

#: A node-list token no store returns: the cached list must be read again.
_STALE = object()


def _free_bytes(path: str | None) -> float:
    """Free bytes (for this user) on the file system holding ``path``; infinite when unknown (a missing
    directory fails later, with its own error)."""
    if path is None:
        return float("inf")
    try:
        return float(free_bytes(path))
    except OSError:
        return float("inf")


class TenantCreation:
    """Mixin of :class:`~shardlite.front.store.Store`: placement and creation of new tenants."""

    settings: Settings
    spec: SchemaSpec
    meta: MetaStore
    _ring: Ring | None
    _ring_source: tuple[tuple[str, int], ...]
    _node_paths: dict[str, str]
    _templates: dict[str, Personaliser]
    _template_lock: threading.Lock
    _records: dict[str, TenantRecord]
    _nodes_lock: threading.Lock
    _nodes_token: object | None
    #: Test hook: ``create_fault(step)`` runs after each step of a creation ("allocated", "written",
    #: "registered"), as the mover's and the relay's ``fault`` do.
    create_fault: Callable[[str], None] | None = None

    # -- nodes and the ring -------------------------------------------------------------------------

    def _init_nodes(self) -> None:
        self._node_paths = {}
        self._ring = None
        self._ring_source = ()
        self._nodes_lock = threading.Lock()
        self._nodes_token = _STALE

    def _refresh_nodes(self) -> list[Node]:
        """The node list read afresh; the ring and the paths follow it."""
        nodes = self.meta.nodes.list()
        self._node_paths = {n.name: n.path for n in nodes}
        source = tuple((n.name, n.weight) for n in nodes if n.state == "active")
        if source != self._ring_source:
            self._ring = Ring(dict(source)) if source else None
            self._ring_source = source
        return nodes

    def _placement_nodes(self) -> None:
        """The ring and paths, read again unless the store's node-list token (read before the last read,
        under the lock: a list and its token are installed together) still stands."""
        token = self.meta.node_list_token()
        if token is not None and token == self._nodes_token:
            return
        with self._nodes_lock:
            token = self.meta.node_list_token()
            if token is not None and token == self._nodes_token:
                return
            self._refresh_nodes()
            self._nodes_token = token if token is not None else _STALE

    def node_path(self, name: str) -> str:
        path = self._node_paths.get(name)
        if path is None:
            self._refresh_nodes()
            path = self._node_paths.get(name)
            if path is None:
                raise ConfigurationError(f"the catalog names node {name!r} but does not know its path")
        return path

    def node_name_at(self, path: str) -> str | None:
        """The name of the node whose directory is ``path`` (as :meth:`node_path` gives it), None if unknown."""
        for name, found in self._node_paths.items():
            if found == path:
                return name
        return None

    def propose(self, key: str) -> str:
        """The node the ring proposes for a new tenant (active nodes only). A node whose disk has less
        than :data:`PLACEMENT_RESERVE` free gets no new tenant: the ring over the other active nodes
        proposes one instead (:class:`StorageFull` when every one is full)."""
        self._placement_nodes()
        if self._ring is None:
            raise ConfigurationError("no active node to place a new tenant on (`shardlite nodes add NAME`)")
        node = self._ring.node_for(key)
        if _free_bytes(self._node_paths.get(node)) >= PLACEMENT_RESERVE:
            return node
        room = {name: weight for name, weight in self._ring_source
                if name != node and _free_bytes(self._node_paths.get(name)) >= PLACEMENT_RESERVE}
        if not room:
            raise StorageFull(f"tenant {key!r} cannot be created: every active node's disk is full (less than "
                              f"{PLACEMENT_RESERVE} bytes free); free space there, or add a node on another disk "
                              "(shardlite nodes add NAME --path DIR)")
        return Ring(room).node_for(key)

    def template(self, prefix: str) -> Personaliser:
        """The (cached) template for new tenants of ``prefix``: call it with a key and an incarnation."""
        found = self._templates.get(prefix)
        if found is None:
            with self._template_lock:
                found = self._templates.get(prefix)
                if found is None:
                    found = self._templates[prefix] = Personaliser(build_template(self.spec.steps_for(prefix)))
        return found

    def _fault(self, step: str) -> None:
        if self.create_fault is not None:
            self.create_fault(step)

    def _lookup_creating(self, canon: str, revive: bool) -> tuple[TenantRecord | None, tuple[str, int] | None]:
        """The catalog's row of ``canon`` for a caller that creates it when absent, and then the node and
        generation of its creation's first attempt. With a store whose reads are round trips
        (``meta.local`` false) the lookup and the allocation are one call
        (:meth:`~shardlite.meta.tenants.TenantCatalog.lookup_or_allocate`); the node is proposed before it
        (from the cached ring: no round trip). A local store keeps the two calls, so a route-cache miss of
        an existing tenant costs no proposal; so does a store with no node to propose (the creation, if
        any, then fails as it did)."""
        if self.meta.local:
            return self.meta.tenants.lookup(canon), None
        try:
            node = self.propose(canon)
        except (ConfigurationError, StorageFull):
            return self.meta.tenants.lookup(canon), None
        record, generation = self.meta.tenants.lookup_or_allocate(canon, node, revive=revive)
        return record, None if generation is None else (node, generation)

    def _create(self, canon: str, first: tuple[str, int] | None = None) -> TenantRecord:
        """Create ``canon`` (or adopt the record of whoever registered it first); see the module doc.
        ``first``: the node and generation of the first attempt, allocated already for ``canon``."""
        prefix = prefix_of(canon)
        version = len(self.spec.steps_for(prefix))
        node_retried = False
        for _attempt in range(CREATE_ATTEMPTS):
            if first is not None:
                (node, generation), first = first, None
            else:
                node = self.propose(canon)
                generation = self.meta.tenants.allocate_generation(canon, node, "create")
            self._fault("allocated")
            incarnation = secrets.token_hex(16)
            data, seed = self.template(prefix)(canon, incarnation)
            path = os.path.join(self.node_path(node), tenant_relpath(canon, generation))
            try:
                write_new_file(path, data, fsync=self.settings.fsync_files, wal=seed)
            except FileExistsError:
                continue  # an orphan, or a racing creator's file, at a generation handed out again: not ours
            except OSError as exc:
                found = storage_error(exc, canon, path)
                if found is None:
                    raise
                raise found from exc
            self._fault("written")
            try:
                winner = self.meta.tenants.register(canon, node, generation, incarnation, version)
            except MetaUnavailable:
                # The registration's outcome is unknown: the connection may have been cut after it committed,
                # and then the catalog routes to this file, so it stays (removing it stranded the tenant: "the
                # catalog says PATH but the file is missing"). If it did not commit, nothing ever routes to it:
                # its generation is never given to a registered tenant.
                raise
            except GenerationTaken:
                remove_db_files(path)  # another key's row holds this generation (handed out again): ours is unrouted
                continue
            except ConfigurationError:
                remove_db_files(path)
                if node_retried or self.meta.node_list_token() is None:
                    raise
                node_retried = True  # the cached node list may name a node removed meanwhile: read it again
                with self._nodes_lock:
                    self._nodes_token = _STALE
                continue
            except BaseException:
                remove_db_files(path)
                raise
            if winner.generation != generation:
                remove_db_files(path)  # another process registered first; ours was never routed to
            self._fault("registered")
            self._records[canon] = winner
            return winner
        raise ShardliteError(f"tenant {canon!r} could not be created: {CREATE_ATTEMPTS} new generations in a row "
                             "met a file already at their path or a generation already taken (the metadata "
                             "store handing out generations again after a crash?); nothing was registered")
