"""Creating tenants: where a new tenant goes and how its file comes to be (a mixin of
:class:`~shardlite.front.store.Store`).

* The ring *proposes* a node among the active ones; the catalog *decides* (the first process to register
  a key wins, the others adopt its record). A node whose disk has less than :data:`PLACEMENT_RESERVE` free
  gets no new tenant: the ring over the other active nodes proposes one instead.
* Creation is atomic: a template per key prefix (shardlite's tables and the app's schema, built once per
  process), personalised with the key and a fresh incarnation, written to a private temporary name and
  linked into place (see :mod:`shardlite.files.tenant`); a storage failure is a shardlite error naming the
  tenant and the file.
"""

from __future__ import annotations

import os
import secrets
import threading
from typing import TYPE_CHECKING

from ..core.keys import prefix_of
from ..core.placement import tenant_relpath
from ..core.ring import Ring
from ..errors import ConfigurationError, MetaUnavailable, StorageFull
from ..files.catalog import TenantRecord
from ..files.copying import remove_db_files
from ..files.engine import Settings, free_bytes, storage_error
from ..files.schema import SchemaSpec
from ..files.tenant import Personaliser, build_template, write_new_file

if TYPE_CHECKING:
    from ..meta.store import MetaStore

__all__ = ["TenantCreation", "PLACEMENT_RESERVE"]

#: A node whose disk has less free space than this gets no new tenant (see Store.propose).
PLACEMENT_RESERVE = 1024 * 1024


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

    def _refresh_nodes(self) -> object:
        raise NotImplementedError

    def node_path(self, name: str) -> str:
        raise NotImplementedError

    def propose(self, key: str) -> str:
        """The node the ring proposes for a new tenant (active nodes only). A node whose disk has less
        than :data:`PLACEMENT_RESERVE` free gets no new tenant: the ring over the other active nodes
        proposes one instead (:class:`StorageFull` when every one is full)."""
        self._refresh_nodes()
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

    def _create(self, canon: str) -> TenantRecord:
        prefix = prefix_of(canon)
        steps = self.spec.steps_for(prefix)
        node = self.propose(canon)
        generation = self.meta.tenants.allocate_generation(canon, node, "create")
        incarnation = secrets.token_hex(16)
        data, seed = self.template(prefix)(canon, incarnation)
        path = os.path.join(self.node_path(node), tenant_relpath(canon, generation))
        try:
            write_new_file(path, data, fsync=self.settings.fsync_files, wal=seed)
        except OSError as exc:
            found = storage_error(exc, canon, path)
            if found is None:
                raise
            raise found from exc
        try:
            winner = self.meta.tenants.register(canon, node, generation, incarnation, len(steps))
        except MetaUnavailable:
            # The registration's outcome is unknown: the connection may have been cut after it committed,
            # and then the catalog routes to this file, so it stays (removing it stranded the tenant: "the
            # catalog says PATH but the file is missing"). If it did not commit, nothing ever routes to it:
            # its generation is never reused.
            raise
        except BaseException:
            remove_db_files(path)
            raise
        if winner.generation != generation:
            remove_db_files(path)  # another process registered first; ours was never routed to
        self._records[canon] = winner
        return winner

