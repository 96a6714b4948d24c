"""A backup directory's ``manifest.json`` and the names of the files a backup writes: untrusted input.

A backup directory holds ``manifest.json``, ``global.<checksum>.db``, ``app_global.<checksum>.db`` and
``tenants/<2 hex>/<key digest>.<checksum>.db`` (:func:`tenant_file`, :func:`global_file`), where the
digest is :func:`shardlite.core.keys.key_digest` of the tenant's key and the checksum the copy's xxh3-128.

:func:`load` reads a manifest and checks it whole before anyone uses it, and refuses it whole
(:class:`~shardlite.ConfigurationError`, one line saying what is wrong and what to do) unless: it is JSON
(no duplicate fields, no NaN), of format 1, with exactly the fields a backup writes, each of its type;
every key is valid and canonical; every entry names exactly the file a backup would (so no path leaves
the directory); checksums are 32 lower-case hex digits. :func:`member` then resolves a named file with
no symlink on the way and its real path inside the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import stat
from collections.abc import Iterator
from typing import Any, Final

import xxhash

from ..core.keys import canonical, key_digest
from ..errors import ConfigurationError, InvalidKey, ManifestInvalid, ShardliteError

__all__ = ["MANIFEST", "FORMAT", "OURS", "tenant_file", "global_file", "file_checksum", "locked", "load",
           "member", "ManifestInvalid"]

MANIFEST: Final = "manifest.json"
FORMAT: Final = 1
#: The files a backup writes into its destination, and nothing else (the sweep removes only these).
OURS: Final = re.compile(r"(?:[0-9a-f]{32}(?:\.[0-9a-f]{32})?\.db|(?:app_)?global(?:\.[0-9a-f]{32})?\.db"
                         r"|\.(?:[0-9a-f]{32}|(?:app_)?global)\.tmp-[0-9a-f]{8})")
_CHECKSUM: Final = re.compile(r"[0-9a-f]{32}")
_TEXT_LIMIT: Final = 512
_INT_LIMIT: Final = 1 << 63
_TENANT_FIELDS: Final = {"file": str, "node": str, "generation": int, "incarnation": str, "schema_version": int,
                         "size": int, "checksum": str, "signature": list}
_TOP_FIELDS: Final = {"format": int, "created": float, "root": str, "tenants": dict, "global": dict,
                      "app_global": dict, "copied": int, "skipped": int}
_REQUIRED: Final = ("format", "tenants", "global")


def tenant_file(key: str, checksum: str) -> str:
    """Where a backup keeps ``key``'s copy of that checksum, relative to the backup directory."""
    digest = key_digest(key)
    return f"tenants/{digest[:2]}/{digest}.{checksum}.db"


def global_file(checksum: str, name: str = "global") -> str:
    """Where a backup keeps its copy of the root's ``global.db`` (or, with ``name="app_global"``, of
    ``app_global.db``, the app's own global tables) of that checksum."""
    return f"{name}.{checksum}.db"


def file_checksum(path: str) -> str:
    """xxh3-128 of a closed, standalone copy (never a live file), read without following a symlink."""
    digest = xxhash.xxh3_128()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def locked(directory: str, *, shared: bool) -> Iterator[None]:
    """Hold a lock on ``directory`` for the block: exclusive for a backup writing into it, shared for a
    restore reading from it (so a backup's sweep never removes a file a restore is about to read)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigurationError(f"{directory} is in use by another backup or restore; retry after it"
                                     ) from None
        yield
    finally:
        os.close(fd)


class _Bad(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise _Bad(f"the field {name!r} appears twice")
        result[name] = value
    return result


def _no_constant(name: str) -> Any:
    raise _Bad(f"{name} is not a number JSON allows")


def _check_type(where: str, value: Any, kind: type) -> None:
    if kind is float:
        ok = type(value) in (int, float) and math.isfinite(value)
    else:
        ok = type(value) is kind  # bool is not an int here
    if not ok:
        raise _Bad(f"{where} is {_shown(value)}, not {kind.__name__}")
    if kind is int and not 0 <= value < _INT_LIMIT:
        raise _Bad(f"{where} is {value}, not an integer from 0 to {_INT_LIMIT - 1}")
    if kind is str and not where.endswith(".root") and (not value or len(value) > _TEXT_LIMIT
                                                         or not value.isprintable()):
        raise _Bad(f"{where} is {_shown(value)}, not printable text of 1 to {_TEXT_LIMIT} characters")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fields(where: str, obj: dict[str, Any], spec: dict[str, type], required: tuple[str, ...]) -> None:
    for name in required:
        if name not in obj:
            raise _Bad(f"{where} has no {name!r}")
    for name, value in obj.items():
        if name not in spec:
            raise _Bad(f"{where} has an unexpected field {_shown(name)}")
        _check_type(f"{where}.{name}", value, spec[name])


def _checksum(where: str, value: str) -> None:
    if not _CHECKSUM.fullmatch(value):
        raise _Bad(f"{where} is {_shown(value)}, not 32 lower-case hex digits")


def _validate(manifest: Any) -> dict[str, Any]:
    if type(manifest) is not dict:
        raise _Bad("it is not a JSON object")
    _fields("the manifest", manifest, _TOP_FIELDS, _REQUIRED)
    if manifest["format"] != FORMAT:
        raise _Bad(f"its format is {manifest['format']}; this shardlite reads format {FORMAT} (use the "
                   "shardlite that wrote it)")
    for name in ("global", "app_global"):  # app_global: absent from backups made before it had its own file
        if name not in manifest:
            continue
        glob = manifest[name]
        _fields(name, glob, {"file": str, "checksum": str}, ("file", "checksum"))
        _checksum(f"{name}.checksum", glob["checksum"])
        if glob["file"] != global_file(glob["checksum"], name):
            raise _Bad(f"{name}.file is {_shown(glob['file'])}, not {global_file(glob['checksum'], name)!r}")
    for key, entry in manifest["tenants"].items():
        try:
            valid = canonical(key) == key
        except InvalidKey as exc:
            raise _Bad(f"the tenant key {_shown(key)} is invalid ({exc})") from None
        if not valid:
            raise _Bad(f"the tenant key {_shown(key)} is not in canonical form (NFC)")
        where = f"tenants[{_shown(key)}]"
        if type(entry) is not dict:
            raise _Bad(f"{where} is {_shown(entry)}, not an object")
        _fields(where, entry, _TENANT_FIELDS, tuple(_TENANT_FIELDS))
        _checksum(f"{where}.checksum", entry["checksum"])
        expected = tenant_file(key, entry["checksum"])
        if entry["file"] != expected:
            raise _Bad(f"{where}.file is {_shown(entry['file'])}, not {expected!r}")
        signature = entry["signature"]
        if len(signature) != 5:
            raise _Bad(f"{where}.signature has {len(signature)} items, not 5")
        for number, item in enumerate(signature):
            _check_type(f"{where}.signature[{number}]", item, int)
    return manifest


def load(directory: str, *, what_to_do: str) -> dict[str, Any] | None:
    """The validated manifest of ``directory``; None when it has none. Raises :class:`ManifestInvalid`
    (``what_to_do`` ends its message) when the manifest is not what a backup writes, or is not a regular
    file (a symlink is refused, never followed)."""
    path = os.path.join(directory, MANIFEST)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ManifestInvalid(f"{path} cannot be read ({exc.strerror}); {what_to_do}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ManifestInvalid(f"{path} is not a regular file; {what_to_do}")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read()
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8")
        parsed = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        return _validate(parsed)
    except UnicodeDecodeError:
        problem = "it is not UTF-8 text"
    except json.JSONDecodeError as exc:
        problem = f"it is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    except ValueError as exc:  # an integer of thousands of digits
        problem = f"it is not JSON shardlite reads ({exc})"
    except RecursionError:
        problem = "it nests too deeply"
    except _Bad as exc:
        problem = str(exc)
    raise ManifestInvalid(f"{path} is not a valid backup manifest: {problem}; {what_to_do}")


def member(directory: str, relative: str) -> str:
    """The path of ``relative`` (a name :func:`load` accepted) inside ``directory``: a regular file reached
    through real directories only (no symlink on the way, nor as the file itself) whose real path lies
    inside the directory's. Raises :class:`ShardliteError` otherwise."""
    base = os.path.realpath(directory)
    path = directory
    parts = relative.split("/")
    for number, part in enumerate(parts):
        if part in ("", ".", ".."):
            raise ShardliteError(f"{relative!r} is not a file name a backup writes")
        path = os.path.join(path, part)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            raise ShardliteError(f"{path} is missing: the backup in {directory} is damaged (restore from another "
                                 "backup)") from None
        last = number == len(parts) - 1
        if not (stat.S_ISREG(info.st_mode) if last else stat.S_ISDIR(info.st_mode)):
            kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a regular file" if last else "not a directory"
            raise ShardliteError(f"{path} is {kind}: the backup in {directory} was changed by hand; refusing it "
                                 "(restore from another backup)")
    real = os.path.realpath(path)
    if os.path.commonpath([real, base]) != base:
        raise ShardliteError(f"{path} lies outside {directory}: refusing it (restore from another backup)")
    return path
