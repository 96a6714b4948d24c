"""Which metadata store a root uses: :func:`store_for` reads the root's record, the caller's ``meta=`` and
``SHARDLITE_META``, and builds the one backend they agree on (I/O: it reads the root; it opens nothing).

The rules, in the words of the public API:

* a root without ``meta.json`` keeps its metadata in ``<root>/global.db`` (the embedded default);
* the first router (or ``shardlite init``) on a *new* root given a PostgreSQL URL records it in the root,
  and every later ``Router(root)`` and CLI command finds it there without being told;
* a ``meta=`` (or ``SHARDLITE_META``) that names another store than the one the root uses is refused with
  :class:`~shardlite.ConfigurationError`; it never silently opens the wrong metadata. When it names the
  same database, its password (if any) is what the connection uses: the record holds none.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import cast

from ..errors import ConfigurationError
from ..files.engine import Settings, ensure_private_dir
from ..files.globaldb import GLOBAL_DB_NAME
from .location import MetaLocation, parse_location
from .record import RECORD_NAME, read_record, write_record
from .store import PARTS, MetaBase, MetaStore

__all__ = ["ENV_VAR", "store_for", "locate_store", "complete"]

#: The environment variable that gives ``meta=`` when the caller gives none.
ENV_VAR = "SHARDLITE_META"


def store_for(root: str, settings: Settings, meta: str | None = None, *, create: bool = True,
              environ: Mapping[str, str] | None = None) -> MetaStore:
    """The (unopened) metadata store of ``root``; see the module doc for the rules. A backend that does
    not implement every part of :class:`~shardlite.meta.store.MetaStore` yet is refused before anything
    is written."""
    return complete(locate_store(root, settings, meta, create=create, environ=environ, require_parts=True))


def locate_store(root: str, settings: Settings, meta: str | None = None, *, create: bool = True,
                 environ: Mapping[str, str] | None = None, require_parts: bool = False) -> MetaBase:
    """:func:`store_for`, without requiring every part unless ``require_parts`` (the conformance suite
    opens a backend whose parts are still being built)."""
    env = os.environ if environ is None else environ
    source = "meta=" if meta is not None else ENV_VAR
    given = meta if meta is not None else env.get(ENV_VAR) or None
    wanted = parse_location(given)
    record = read_record(root)
    if record is not None:
        if given is not None and not wanted.same_store(record.location):
            raise ConfigurationError(
                f"{root} keeps its metadata at {record.location.printable} (recorded in "
                f"{os.path.join(root, RECORD_NAME)}), but {source} names {wanted.printable}: leave {source} "
                "out, or give the recorded database")
        chosen = wanted if given is not None else record.location
        return _postgres(root, chosen, record.root_id, settings)
    if wanted.embedded:
        from .sqlite import SqliteMeta

        return SqliteMeta(root, settings)
    if os.path.exists(os.path.join(root, GLOBAL_DB_NAME)):
        raise ConfigurationError(
            f"{root} keeps its metadata in {GLOBAL_DB_NAME} (embedded), but {source} names {wanted.printable}: "
            f"move it with 'shardlite meta copy --root ROOT --to URL', or leave {source} out")
    if not create:
        raise ConfigurationError(f"{root} is not a shardlite root: create it first (shardlite init --root ROOT)")
    if require_parts:
        complete(_postgres(root, wanted, "0" * 32, settings))  # refused before the root is bound to it
    ensure_private_dir(root)
    record = write_record(root, wanted)
    if not wanted.same_store(record.location):  # another process made this root at the same moment, elsewhere
        raise ConfigurationError(
            f"{root} was just created by another process with its metadata at {record.location.printable}, "
            f"not {wanted.printable}")
    return _postgres(root, wanted, record.root_id, settings)


def complete(store: MetaBase) -> MetaStore:
    """``store`` as a :class:`MetaStore`, or :class:`~shardlite.ConfigurationError` naming the parts its
    backend does not implement yet."""
    missing = [f"meta.{name}" for name in PARTS if not hasattr(store, name)]  # plain attributes: no I/O
    if not missing:
        return cast(MetaStore, store)  # the parts are there; mypy checks each backend's whole class (_conforms)
    raise ConfigurationError(f"the metadata backend for {store.location} does not implement {', '.join(missing)} "
                             "yet: use the embedded default (leave meta= and SHARDLITE_META out)")


def _postgres(root: str, location: MetaLocation, root_id: str, settings: Settings) -> MetaBase:
    from .postgres import PgMeta  # imported only for roots that use it: psycopg is not loaded otherwise

    return PgMeta(root, location, root_id, settings)
