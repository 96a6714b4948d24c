"""A backup's node layout, brought into a new data root (for :func:`shardlite.services.restore.restore_root`).

The backup's copy of ``global.db`` lists the old root's nodes (``_shardlite_nodes``: name, path, weight,
state). That copy is untrusted like the rest of the backup: :func:`read_layout` checks every row (a
node name shardlite accepts, a path of printable text, a weight from 1 to 1000, ``active`` or
``draining``, at least one active node) and :func:`plan_layout` decides where each node goes in the new
root: a path inside the old root (relative, as shardlite records it, or absolute under the manifest's
``root``) keeps its place under the new root; any other path (a disk outside the old root, or a path that
tries to leave it) becomes ``<new root>/<name>``, unless the caller names a directory for that node. The
result is refused whole (:class:`~shardlite.ConfigurationError`) when two nodes would overlap, a node
would hold the root or the backup (or lie inside the backup), a node would take the name of the root's
own files, or a path exists and is not a directory.

:func:`root_state` tells a new root (no ``global.db``, no ``meta.json``) from an empty one (nothing registered
ever, only the default node, no account, session or row in the app's tables) and a live one, and
:func:`install_layout` replaces the node list of a new or empty root in one transaction.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

import apsw

from ..errors import ConfigurationError, MetaConflict, ShardliteError
from ..files.catalog import Node
from ..files.engine import Settings, ensure_private_dir
from ..files.globaldb import APP_DB_NAME, GLOBAL_DB_NAME
from ..files.sanitize import shown
from ..front.store import Store
from ..meta import MetaStore
from ..meta.choose import store_for
from ..meta.nodes import NODE_NAME_RE
from ..meta.record import RECORD_NAME, read_record
from . import manifest as mf

__all__ = ["NodePlan", "read_layout", "plan_layout", "stored_path", "root_state", "not_empty", "install_layout",
           "reset_layout", "RootUndo", "RootChanged", "claimed_root", "open_root_with_layout", "DEFAULT_LAYOUT"]

#: The node list of a root made without ``nodes=`` (``shardlite init``): (name, stored path, weight, state).
DEFAULT_LAYOUT: Final = [("n1", "n1", 1, "active")]
_MAX_NODES: Final = 1000
_MAX_PATH: Final = 4096
#: Names a node directory directly under the root may not take: the root's own files.
_ROOT_FILES: Final = re.compile(
    rf"(?:{re.escape(GLOBAL_DB_NAME)}|{re.escape(APP_DB_NAME)})(?:-.*)?|{re.escape(RECORD_NAME)}")


@dataclass(frozen=True)
class NodePlan:
    """One node of the new root: ``path`` is its directory there (absolute), ``was`` the path the
    backup recorded for it."""

    name: str
    path: str
    weight: int
    state: str
    was: str


def read_layout(conn: apsw.Connection, label: str, what_to_do: str) -> list[tuple[str, str, int, str]]:
    """The checked rows (name, path, weight, state) of the backup's node list, read from the global DB
    copy open on ``conn`` (``label`` names it in errors, ``what_to_do`` ends them)."""
    try:
        rows = conn.execute("SELECT name, path, weight, state FROM _shardlite_nodes ORDER BY name").fetchall()
    except apsw.Error as exc:
        raise ShardliteError(f"{label} has no readable node list ({exc}); {what_to_do}") from None
    if not rows or len(rows) > _MAX_NODES:
        raise ShardliteError(f"{label} lists {len(rows)} nodes, not 1 to {_MAX_NODES}; {what_to_do}")
    layout = []
    for name, path, weight, state in rows:
        if type(name) is not str or not NODE_NAME_RE.fullmatch(name):
            raise ShardliteError(f"{label} lists a node named {shown(name)}, not a node name; {what_to_do}")
        if type(path) is not str or not path or len(path) > _MAX_PATH or not path.isprintable():
            raise ShardliteError(f"{label} gives node {name} the path {shown(path)}; {what_to_do}")
        if type(weight) is not int or not 1 <= weight <= 1000:
            raise ShardliteError(f"{label} gives node {name} the weight {shown(weight)}; {what_to_do}")
        if state not in ("active", "draining"):
            raise ShardliteError(f"{label} gives node {name} the state {shown(state)}; {what_to_do}")
        layout.append((name, path, weight, state))
    if len({name for name, *_ in layout}) != len(layout):
        raise ShardliteError(f"{label} lists a node twice; {what_to_do}")
    if not any(state == "active" for *_, state in layout):
        raise ShardliteError(f"{label} lists no active node; {what_to_do}")
    return layout


def _inside(path: str, other: str) -> bool:
    """``path`` is ``other`` or lies under it (real paths, so a symlink does not hide an overlap)."""
    path, other = os.path.realpath(path), os.path.realpath(other)
    return path == other or path.startswith(other.rstrip(os.sep) + os.sep)


def _kept_place(was: str, old_root: str | None) -> str | None:
    """``was`` relative to the old root when it lies inside it (normalised, never leaving it); else None."""
    if os.path.isabs(was):
        if not old_root or not os.path.isabs(old_root):
            return None
        was, old_root = os.path.normpath(was), os.path.normpath(old_root)
        if os.path.commonpath([was, old_root]) != old_root or was == old_root:
            return None
        return os.path.relpath(was, old_root)
    norm = os.path.normpath(was)
    if norm in (".", "..") or norm.startswith(".." + os.sep):
        return None
    return norm


def plan_layout(layout: list[tuple[str, str, int, str]], root: str, *, old_root: str | None, backup: str,
                node_paths: Mapping[str, str] | None = None) -> list[NodePlan]:
    """Where each node of ``layout`` goes under the new ``root`` (module docstring); ``node_paths`` maps
    node names to directories chosen by the caller. Checks everything before anything exists."""
    given = dict(node_paths or {})
    names = [name for name, *_ in layout]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ConfigurationError(f"the backup has no node {', '.join(map(shown, unknown))} (its nodes: "
                                 f"{', '.join(names)}); name one of those in --node-path NAME=DIR")
    plans = []
    for name, was, weight, state in layout:
        if name in given:
            target = os.path.abspath(given[name])
        else:
            kept = _kept_place(was, old_root)
            target = os.path.join(root, kept if kept is not None else name)
        plans.append(NodePlan(name, target, weight, state, was))
    for plan in plans:
        _check_target(plan, root, backup)
    for number, plan in enumerate(plans):
        for other in plans[number + 1:]:
            if _inside(plan.path, other.path) or _inside(other.path, plan.path):
                raise ConfigurationError(f"nodes {plan.name} and {other.name} would overlap in the new root "
                                         f"({plan.path}, {other.path}); give one its own directory with "
                                         f"--node-path {other.name}=DIR")
    return plans


def _check_target(plan: NodePlan, root: str, backup: str) -> None:
    fix = f"give it another directory with --node-path {plan.name}=DIR"
    if _inside(root, plan.path):
        raise ConfigurationError(f"node {plan.name} would be at {plan.path}, which holds the data root {root}; {fix}")
    if _inside(plan.path, backup) or _inside(backup, plan.path):
        raise ConfigurationError(f"node {plan.name} would be at {plan.path}, which overlaps the backup {backup}; "
                                 f"{fix}")
    if _inside(plan.path, root):
        first = os.path.relpath(os.path.realpath(plan.path), os.path.realpath(root)).split(os.sep)[0]
        if _ROOT_FILES.fullmatch(first):
            raise ConfigurationError(f"node {plan.name} would be at {plan.path}, a name the data root's own files "
                                     f"take; {fix}")
    if os.path.lexists(plan.path) and not os.path.isdir(plan.path):
        raise ConfigurationError(f"node {plan.name} would be at {plan.path}, which exists and is not a directory; "
                                 f"{fix}")
    if _holds_files(plan.path):
        raise ConfigurationError(f"node {plan.name} would be at {plan.path}, which already holds files (another "
                                 f"root's node?); {fix} naming a new or empty directory")


def _holds_files(path: str) -> bool:
    """``path`` is a directory with anything but (empty) directories below it."""
    if not os.path.isdir(path):
        return False
    for _, _, files in os.walk(path):
        if files:
            return True
    return False


def _clear(path: str) -> None:
    """Remove everything below the directory ``path``, keeping ``path`` itself."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(path):
            target = os.path.join(path, entry)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(target)


def stored_path(path: str, root: str) -> str:
    """How the catalog records a node directory: relative to the root when inside it (so the root can
    move), else absolute (as :meth:`shardlite.services.nodes.Nodes.add` does)."""
    return os.path.relpath(path, root) if _inside(path, root) else path


def root_state(root: str) -> str:
    """``"new"`` when ``root`` holds no metadata (no ``global.db``, no ``meta.json``: it may not exist at
    all), ``"empty"`` for a root
    where nothing was ever registered (no tenant row, not even a tombstone; only the default node; no
    account, session or row in the app's global tables), else ``"live"``. Raises
    :class:`ConfigurationError` when ``root`` exists and is not a directory."""
    root = os.path.abspath(root)
    if os.path.lexists(root) and not os.path.isdir(root):
        raise ConfigurationError(f"{root} exists and is not a directory: choose another root")
    if not any(os.path.lexists(os.path.join(root, name)) for name in (GLOBAL_DB_NAME, RECORD_NAME)):
        return "new"  # a root on PostgreSQL has no global.db: its meta.json makes it an existing root
    store = Store(root, create=False)
    try:
        return "live" if not_empty(store) else "empty"
    finally:
        store.close()


def not_empty(store: Store) -> str | None:
    """Why the root of ``store`` is not empty (:func:`root_state`), or None when it is."""
    if store.meta.tenants.has_rows():
        return "it holds tenants (or tombstones of dropped ones)"
    if _recorded(store.meta, store.root) != _DEFAULT_NODES:
        return "its nodes are not the default one"
    if store.meta.accounts.has_rows():
        return "it holds accounts or sessions"
    table = store.meta.app_globals.table_with_rows()
    if table is not None:
        return f"its app table {shown(table)} holds rows"
    return None


_DEFAULT_NODES: Final = [Node(*row) for row in DEFAULT_LAYOUT]


def _recorded(meta: MetaStore, root: str) -> list[Node]:
    """The node list of ``meta`` as :func:`stored_path` records it (relative to ``root`` when inside it)."""
    return [Node(n.name, stored_path(n.path, root), n.weight, n.state) for n in meta.nodes.list()]


def install_layout(meta: MetaStore, plans: list[NodePlan], root: str) -> None:
    """Replace the node list of a new or empty root with ``plans``, in one transaction that first checks
    the root still has no tenant and no node but the default one (another process may have used it:
    :class:`RootChanged`)."""
    nodes = [Node(plan.name, stored_path(plan.path, root), plan.weight, plan.state) for plan in plans]
    try:
        meta.nodes.replace_all(nodes, only_if_pristine=True, expect=[[], _DEFAULT_NODES])
    except MetaConflict:
        what = "tenants" if meta.tenants.has_rows() else "other nodes"
        raise RootChanged(f"{root} got {what} meanwhile (a router on it?); restore into another root") from None


def reset_layout(meta: MetaStore) -> None:
    """Put the default node list back in a root that holds no tenant (undoing :func:`install_layout`);
    :class:`~shardlite.MetaConflict` when it holds one now."""
    meta.nodes.replace_all(_DEFAULT_NODES, only_if_pristine=True)


#: The root's own files a restore into a new root creates (with SQLite's companions).
_ROOT_FILE_NAMES: Final = tuple(f"{db}{suffix}" for db in (GLOBAL_DB_NAME, APP_DB_NAME)
                                for suffix in ("", "-wal", "-shm", "-journal")) + (RECORD_NAME,)


def _missing_top(path: str) -> str | None:
    """The outermost directory of ``path`` that does not exist yet (None when ``path`` exists)."""
    top = None
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        top = probe
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return top


class RootUndo:
    """What filling a new or empty root adds, recorded before anything is made, to take back when the
    restore fails: for a new root everything it created (the root itself, or its files and the node
    directories), for an empty root the node list, accounts, credentials, sessions and app rows it
    added (none were there), as long as no tenant was registered yet."""

    def __init__(self, root: str, plans: list[NodePlan], *, new: bool, made_root: str | None,
                 app_version: int = 0) -> None:
        self.root, self.new, self.app_version = root, new, app_version
        #: a new root's metadata in a database shared with other roots (PostgreSQL) held no account or
        #: session before the restore: taking back clears the account space too (set by the opener)
        self.accounts_were_empty = False
        self.made_root = made_root  # the outermost directory of the root this restore created, if any
        self.files = [name for name in _ROOT_FILE_NAMES if not os.path.lexists(os.path.join(root, name))]
        tops = (_missing_top(plan.path) for plan in plans)
        self.made = sorted({top for top in tops if top is not None and not (self.new and made_root is not None
                                                                          and _inside(top, root))})
        #: node directories that were there already (without files: _check_target): emptied again
        self.found = [plan.path for plan in plans if os.path.isdir(plan.path)]

    def run(self, store: Store | None) -> bool:
        """Take back what was added (``store``: open on the root, or None; closed here). False when it
        cannot (an empty root where tenants were already registered, or a new root whose metadata database
        cannot be reached to take its rows back): the root stays as it is."""
        if not self.new:
            try:
                if store is None or store.closed:
                    store = Store(self.root, create=False)
                if store.meta.tenants.has_rows():
                    return False
                _clear_globals(store, self.app_version)
                try:
                    reset_layout(store.meta)
                except MetaConflict:
                    return False  # a tenant was registered meanwhile: the root stays as it is
            finally:
                if store is not None:
                    store.close()
        if store is not None:
            store.close()
        try:
            self._forget_outside()
        except ShardliteError:  # the database is unreachable: the root (its record) stays, to be removed later
            return False
        if self.new and self.made_root is not None:
            shutil.rmtree(self.made_root, ignore_errors=True)
        elif self.new:
            for name in self.files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.root, name))
        for top in self.made:
            shutil.rmtree(top, ignore_errors=True)
        for path in self.found:
            _clear(path)
        if not self.new:
            default = os.path.join(self.root, DEFAULT_LAYOUT[0][1])
            ensure_private_dir(default)
            for entry in os.listdir(default):  # the <2 hex> directories of copies prepared and discarded
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(default, entry))  # only an empty one goes
        return True


    def _forget_outside(self) -> None:
        """A new root whose metadata lives outside it (a database: the root's record names it) leaves rows
        there that removing the directory does not: its tenants, nodes and own record go first, and the
        accounts and sessions it imported when the database had none."""
        if not self.new or read_record(self.root) is None:
            return
        meta = store_for(self.root, Settings(), create=False)
        try:
            meta.open(create=False)
            meta.nodes.forget_all()
            if self.accounts_were_empty:
                meta.accounts.clear()
        finally:
            meta.close()


def _clear_globals(store: Store, app_version: int) -> None:
    """Remove the accounts, credentials, sessions and app rows a restore added to an empty root."""
    store.meta.accounts.clear()
    store.meta.app_globals.clear(app_version)


class RootChanged(ConfigurationError):
    """Another process (not a restore: those hold the root's lock) used the root while this restore was
    filling it: nothing is taken back, since what is there now is not this restore's alone."""


@contextlib.contextmanager
def claimed_root(root: str) -> Iterator[str | None]:
    """Create ``root`` (0700, with missing parents) unless it exists, and hold an exclusive lock on it for
    the block, so no other restore fills it meanwhile (:class:`ConfigurationError` at once when one does).
    Yields the outermost directory this call created (None when ``root`` was there): only that may be
    removed again."""
    if os.path.lexists(root) and not os.path.isdir(root):
        raise ConfigurationError(f"{root} exists and is not a directory: choose another root")
    top = _missing_top(root)
    ensure_private_dir(root)
    try:
        with mf.locked(root, shared=False):
            yield top
    except BaseException:
        if top is not None and not _holds_files(top):
            shutil.rmtree(top, ignore_errors=True)
        raise


def open_root_with_layout(root: str, plans: list[NodePlan], made_root: str | None) -> tuple[Store, RootUndo]:
    """A Store on ``root`` made new, or found empty, with the node list ``plans`` (their directories
    created), and the :class:`RootUndo` that takes it back. Call it under :func:`claimed_root` (whose
    ``made_root`` it takes). A live root is refused (:class:`ConfigurationError`) and left alone; when this
    fails, what it made is taken back (not after :class:`RootChanged`)."""
    new = root_state(root) == "new"
    store: Store | None = None
    if not new:
        store = Store(root, create=False)
        why = not_empty(store)
        if why:
            store.close()
            raise ConfigurationError(f"{root} is a live data root ({why}); restore into it without creating it "
                                     "(`shardlite restore SRC` keeps its nodes), or choose a new root")
    app_version = 0 if store is None else store.meta.app_globals.version()
    undo = RootUndo(root, plans, new=new, made_root=made_root, app_version=app_version)
    try:
        if store is None:  # the new root's metadata where SHARDLITE_META says (the embedded one by default)
            meta = store_for(root, Settings())
            try:
                meta.open(create=True)
                undo.accounts_were_empty = not meta.accounts.has_rows()
                install_layout(meta, plans, root)
            finally:
                meta.close()
        else:
            install_layout(store.meta, plans, root)
            store.close()
            default = os.path.join(root, DEFAULT_LAYOUT[0][1])
            if all(plan.path != default for plan in plans):
                with contextlib.suppress(OSError):
                    os.rmdir(default)  # the empty root's default node (only when empty), not in the backup's layout
        store = Store(root, create=False)  # creates the node directories
    except RootChanged:
        if store is not None:
            store.close()
        raise
    except BaseException:
        undo.run(store)
        raise
    return store, undo
