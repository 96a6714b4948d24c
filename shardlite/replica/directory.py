"""The directory replica target (``file:///path``): one file per object, ``<path>/<name>``.

How it keeps the contract of :class:`~shardlite.replica.target.ReplicaTarget`:

* ``put`` writes a temporary file ``.tmp-<random>`` in the object's folder, fsyncs it, renames it over the
  name and fsyncs the folder: a reader sees the old or the new file whole, and a writer killed midway leaves
  only a temporary file, which no listing shows (names never start with ``.``).
* ``put_if_absent`` links the fsynced temporary file to the name instead (a link fails when the name
  exists, so of two racing writers one wins), then removes the temporary name.
* Folders it creates are 0700 and object files 0600, whatever the umask (files are private, as everywhere in
  shardlite); folders that already exist keep their mode.
* ``delete_many`` removes the files, then the folders it left empty (up to the target's own directory), so
  a name can later be used again as a folder and the reverse; temporary files older than an hour (a killed
  writer's) do not keep a folder alive. A killed writer's temporary file in a folder that keeps objects
  stays until then (it is never listed).
* An ``OSError`` other than a missing file (a full or failing disk, a read-only mount) is
  :class:`~shardlite.ReplicaUnavailable`, naming the file and the cause.
"""

from __future__ import annotations

import builtins
import errno
import os
import secrets
import stat
import time
from collections.abc import Iterable, Iterator

from ..errors import ConfigurationError, ReplicaObjectMissing, ReplicaUnavailable
from ..files.engine import ensure_private_dir, fsync_dir
from .target import TargetLocation, check_name, check_prefix, is_name

__all__ = ["DirectoryTarget"]

_TEMP = ".tmp-"
STALE_TEMP_S = 3600.0
"""A temporary file this old belongs to a writer that died: ``delete_many`` removes it with its folder."""
_READ = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW


#: Tries at making a temporary file while concurrent deletes keep pruning its new folder (each try is a
#: mkdir and an open; under a busy machine five were not always enough for the shared-folders race test).
_FOLDER_ATTEMPTS = 100


class DirectoryTarget:
    """A replica target on a local directory (see the module doc)."""

    def __init__(self, location: TargetLocation) -> None:
        if location.scheme != "file":
            raise ConfigurationError(f"{location.url} is not a file:// location")
        self._location = location
        self._root = location.path

    @property
    def url(self) -> str:
        return self._location.url

    @property
    def path(self) -> str:
        """The directory holding the objects."""
        return self._root

    def __repr__(self) -> str:
        return f"DirectoryTarget({self.url!r})"

    def _path(self, name: str) -> str:
        return os.path.join(self._root, *check_name(name).split("/"))

    def _unavailable(self, op: str, name: str, exc: OSError) -> ReplicaUnavailable:
        why = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        return ReplicaUnavailable(
            f"the replica directory {self.url} failed to {op} {name!r}: {why} (errno {exc.errno}); fix the disk "
            "or the mount and retry")

    # -- writing ---------------------------------------------------------------------------------------------

    def _folder(self, name: str) -> str:
        """Create the folder of ``name`` (0700, fsyncing each new folder's parent); ``ValueError`` when a
        part of it is an object."""
        folder = os.path.dirname(self._path(name))
        try:
            created = ensure_private_dir(folder)
        except (FileExistsError, NotADirectoryError):
            if os.path.lexists(self._root) and not os.path.isdir(self._root):
                raise ConfigurationError(f"the replica directory {self.url} is not a directory") from None
            raise ValueError(f"replica object name {name!r} runs through an object of the same name: a name is "
                             "never also the folder of another name") from None
        except PermissionError as exc:
            raise ConfigurationError(f"the replica directory {self.url} cannot be created or written: "
                                     f"{os.strerror(exc.errno or errno.EACCES)}") from None
        for made in created:
            fsync_dir(os.path.dirname(made))
        return folder

    def _write_temp(self, name: str, data: bytes) -> tuple[str, str]:
        """Write ``data`` to a fresh fsynced 0600 temporary file in ``name``'s folder; ``(temp, final)``.
        Retries when a concurrent ``delete_many`` removed the folder it had just made."""
        final = self._path(name)
        for _attempt in range(_FOLDER_ATTEMPTS):
            try:
                folder = self._folder(name)
                temp = os.path.join(folder, f"{_TEMP}{secrets.token_hex(8)}")
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except FileNotFoundError:
                continue  # a concurrent delete_many pruned a folder between its creation and here: again
            except NotADirectoryError:
                if not os.path.isdir(self._root):
                    raise ConfigurationError(f"the replica directory {self.url} is not a directory") from None
                raise ValueError(f"replica object name {name!r} runs through an object of the same name: a name "
                                 "is never also the folder of another name") from None
            try:
                if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
                    os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                _unlink_quietly(temp)
                raise
            os.close(fd)
            return temp, final
        raise ReplicaUnavailable(f"the replica directory {self.url} kept losing the folder of {name!r} to "
                                 "concurrent deletes; retry")

    def put(self, name: str, data: bytes) -> None:
        data = bytes(data)
        try:
            temp, final = self._write_temp(name, data)
            try:
                os.replace(temp, final)
            except IsADirectoryError:
                _unlink_quietly(temp)
                raise ValueError(f"replica object name {name!r} is the folder of other objects: a name is never "
                                 "also the folder of another name") from None
            except BaseException:
                _unlink_quietly(temp)
                raise
            _fsync_folder(os.path.dirname(final))
        except OSError as exc:
            raise self._unavailable("write", name, exc) from exc

    def put_if_absent(self, name: str, data: bytes) -> bool:
        data = bytes(data)
        try:
            temp, final = self._write_temp(name, data)
            try:
                os.link(temp, final)
                won = True
            except FileExistsError:
                won = False
            finally:
                _unlink_quietly(temp)
            _fsync_folder(os.path.dirname(final))
        except OSError as exc:
            raise self._unavailable("write", name, exc) from exc
        if won:
            return True
        try:
            return self.get(name) == data
        except ReplicaObjectMissing:
            return False  # deleted meanwhile: it held something when the link was refused

    # -- reading ---------------------------------------------------------------------------------------------

    def _open(self, name: str) -> int:
        try:
            fd = os.open(self._path(name), _READ)
        except (FileNotFoundError, NotADirectoryError):
            raise ReplicaObjectMissing(f"no object {name!r} in the replica directory {self.url}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink: never followed, so never an object
                raise ReplicaObjectMissing(f"no object {name!r} in the replica directory {self.url}") from None
            raise self._unavailable("read", name, exc) from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ReplicaObjectMissing(f"no object {name!r} in the replica directory {self.url} (a folder)")
        return fd

    def get(self, name: str) -> bytes:
        fd = self._open(name)
        try:
            with os.fdopen(fd, "rb", closefd=True) as f:
                return f.read()
        except OSError as exc:
            raise self._unavailable("read", name, exc) from exc

    def get_range(self, name: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"a range starts at 0 or later and has a length of 0 or more, not {start}, {length}")
        fd = self._open(name)
        try:
            chunks = []
            offset, left = start, length
            while left > 0:
                chunk = os.pread(fd, left, offset)
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        except OSError as exc:
            raise self._unavailable("read", name, exc) from exc
        finally:
            os.close(fd)

    def head(self, name: str) -> int | None:
        try:
            st = os.lstat(self._path(name))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._unavailable("stat", name, exc) from exc
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        prefix = check_prefix(prefix)
        start = os.path.join(self._root, *prefix.split("/")[:-1])  # the deepest folder every match is under
        found: list[tuple[str, int]] = []
        try:
            self._walk(start, os.path.relpath(start, self._root), prefix, found)
        except OSError as exc:
            raise self._unavailable("list", prefix, exc) from exc
        found.sort()
        return iter(found)

    def _walk(self, folder: str, rel: str, prefix: str, found: builtins.list[tuple[str, int]]) -> None:
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if entry.name.startswith("."):  # temporary files, never objects
                continue
            name = entry.name if rel == "." else f"{rel}/{entry.name}"
            if not ((name + "/").startswith(prefix) or prefix.startswith(name + "/")):
                continue  # outside the prefix (no stat: a tail's listing names 100 of a folder of thousands)
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted meanwhile
            if stat.S_ISDIR(st.st_mode):
                self._walk(entry.path, name, prefix, found)
            elif stat.S_ISREG(st.st_mode) and name.startswith(prefix) and is_name(name):
                found.append((name, st.st_size))  # any other file (not a valid object name) is not ours

    # -- deleting --------------------------------------------------------------------------------------------

    def delete_many(self, names: Iterable[str]) -> None:
        paths = [(name, self._path(name)) for name in list(names)]  # every name checked before anything goes
        folders: set[str] = set()
        try:
            for _name, path in paths:
                try:
                    os.unlink(path)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                except IsADirectoryError:
                    continue  # a folder of other objects: no object has this name
                folders.add(os.path.dirname(path))
            for folder in sorted(folders, key=len, reverse=True):
                self._prune(folder)
        except OSError as exc:
            raise self._unavailable("delete", paths[0][0] if paths else "", exc) from exc

    def _prune(self, folder: str) -> None:
        """fsync ``folder`` (its unlinks become durable), then remove it and its parents while they are
        empty, up to the target's own directory. A folder that holds nothing but temporary files older than
        :data:`STALE_TEMP_S` (left by writers killed midway) counts as empty: they are removed with it."""
        while folder != self._root and folder.startswith(self._root + os.sep):
            try:
                fsync_dir(folder)
            except FileNotFoundError:
                pass
            if not self._remove_if_empty(folder):
                return
            folder = os.path.dirname(folder)
        if folder == self._root and os.path.isdir(folder):
            fsync_dir(folder)

    def _remove_if_empty(self, folder: str) -> bool:
        """Remove ``folder`` if it is empty (or holds only stale temporary files); whether it is gone."""
        for attempt in range(2):
            try:
                os.rmdir(folder)
                return True
            except FileNotFoundError:
                return True
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if attempt == 0 and not self._only_stale_temps(folder):
                return False
        return False  # a writer put something there meanwhile

    @staticmethod
    def _only_stale_temps(folder: str) -> bool:
        """Whether ``folder`` holds only stale temporary files; if so they are removed. Stops at the first
        other entry (a folder with objects costs one entry or a few)."""
        stale = []
        cutoff = time.time() - STALE_TEMP_S
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if not entry.name.startswith(_TEMP):
                        return False
                    try:
                        if entry.stat(follow_symlinks=False).st_mtime > cutoff:
                            return False  # a writer may still be filling it
                    except FileNotFoundError:
                        continue
                    stale.append(entry.path)
        except FileNotFoundError:
            return True  # a concurrent delete_many removed it meanwhile
        for path in stale:
            _unlink_quietly(path)
        return True

    def close(self) -> None:
        pass


def _fsync_folder(folder: str) -> None:
    """fsync ``folder`` after a rename or link into it; gone already means a concurrent ``delete_many``
    removed the object and its folder, which is then what is durable."""
    try:
        fsync_dir(folder)
    except FileNotFoundError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
