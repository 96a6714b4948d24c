"""The root's record of where its metadata lives: ``<root>/meta.json`` (absent for the embedded default).

A root whose metadata is in PostgreSQL holds this small file, written once by the first router or
``shardlite init`` on the new root, and read by every later router and CLI command, so ``Router(root)`` finds
the metadata without being told. It holds the location without its secrets
(:attr:`~shardlite.meta.location.MetaLocation.recordable`) and the root's id (the owner of its nodes in a
shared database). A root without the file keeps its metadata in ``<root>/global.db``, as always.

The file is input like any other: read with a size cap, not through a symlink, and checked field by field; a
damaged one is refused with a message saying what it is, never guessed around.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass

from ..errors import ConfigurationError
from ..files.engine import fsync_dir
from .location import MetaLocation, recorded_location

__all__ = ["RECORD_NAME", "RootRecord", "read_record", "write_record", "new_root_id"]

RECORD_NAME = "meta.json"
_FORMAT = 1
_MAX_BYTES = 64 * 1024
_ROOT_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True, slots=True)
class RootRecord:
    """What ``<root>/meta.json`` says: the metadata's location (no secrets) and this root's id."""

    location: MetaLocation
    root_id: str


def new_root_id() -> str:
    return secrets.token_hex(16)


def _path(root: str) -> str:
    return os.path.join(root, RECORD_NAME)


def read_record(root: str) -> RootRecord | None:
    """The root's record, or None when it has none (embedded metadata). A record that cannot be read or is
    not one raises :class:`~shardlite.ConfigurationError` naming the file and what to do."""
    path = _path(root)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _damaged(path, f"it cannot be opened ({exc.strerror})") from None
    try:
        data = os.read(fd, _MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_BYTES:
        raise _damaged(path, "it is too large")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _damaged(path, "it is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or doc.get("backend") != "postgresql":
        raise _damaged(path, f"it is not a format-{_FORMAT} record of a PostgreSQL metadata location")
    location, root_id = doc.get("location"), doc.get("root_id")
    if not isinstance(location, str) or not isinstance(root_id, str) or not _ROOT_ID.fullmatch(root_id):
        raise _damaged(path, "its location or root_id is missing or malformed")
    try:
        parsed = recorded_location(location)
    except ConfigurationError as exc:
        raise _damaged(path, str(exc)) from None
    if parsed.embedded or parsed.recordable != location:
        raise _damaged(path, "its location is not a recorded PostgreSQL location")
    return RootRecord(parsed, root_id)


def write_record(root: str, location: MetaLocation, *, root_id: str | None = None) -> RootRecord:
    """Record ``location`` as the root's metadata (``root_id``, or a new id), unless the root has a record
    already: the first writer wins (several processes opening a new root at once), and every caller gets
    the record that holds.
    The file is complete or absent (written aside, fsynced, then linked into place), mode 0600."""
    path = _path(root)
    if root_id is not None and not _ROOT_ID.fullmatch(root_id):
        raise ConfigurationError(f"invalid root id {root_id!r}")
    record = RootRecord(location, root_id or new_root_id())
    body = json.dumps({"format": _FORMAT, "backend": "postgresql", "location": location.recordable,
                       "root_id": record.root_id}, indent=1) + "\n"
    temp = f"{path}.{record.root_id}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.write(fd, body.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(temp)
    fsync_dir(root)
    found = read_record(root)
    if found is None:  # removed between our link and our read: say so rather than guess
        raise ConfigurationError(f"{path} disappeared while this root was being created; try again")
    return found


def _damaged(path: str, why: str) -> ConfigurationError:
    return ConfigurationError(
        f"{path} is not a valid shardlite metadata record: {why}. It says where this root's metadata lives "
        "(PostgreSQL) and which root this is there; put back the file from a backup or a copy of the root")
