"""Which root a replica location belongs to: its owner marker's contents, and the verdict on it.

A replica location holds one root's history. Two roots replicating to one location would share it: their
packs no longer overwrite each other (uploads are conditional, :mod:`shardlite.services.pack_upload`), but
their histories and metadata snapshots would mix, and a whole-root restore would bring back some of both.
So each root has an owner id (a random 32-hex-digit value in its metadata,
:func:`shardlite.meta.replica_record.replica_owner`), and the location's owner marker names the root that
writes there (:mod:`shardlite.services.replica_owners` reads and writes it):

* no marker yet: this root writes its own (atomically) and replicates;
* a marker naming this root: it replicates;
* a marker naming a root this one *adopted* (it was restored from this replica, or ``replicate adopt`` said
  it continues that root): this root takes the location over (rewrites the marker);
* any other (another root's, or contents no shardlite wrote): this root is refused, with an error that says
  what to do; nothing of it is uploaded there, its writes go on locally.

Pure: no I/O.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import NamedTuple

__all__ = ["marker", "owner_in", "Verdict", "Judged", "judge", "valid_owner", "refusal"]

_MARKER = re.compile(rb"shardlite replica\nowner ([0-9a-f]{32})\n")
_OWNER = re.compile(r"[0-9a-f]{32}")


def valid_owner(owner: object) -> bool:
    """Whether ``owner`` is an owner id (32 lowercase hex digits)."""
    return isinstance(owner, str) and _OWNER.fullmatch(owner) is not None


def marker(owner: str) -> bytes:
    """The marker naming root ``owner`` (``ValueError`` for a value that is not an owner id)."""
    if not valid_owner(owner):
        raise ValueError(f"not an owner id: {owner!r}")
    return b"shardlite replica\nowner " + owner.encode("ascii") + b"\n"


def owner_in(data: bytes) -> str | None:
    """The owner id a marker names; None for contents no shardlite wrote."""
    found = _MARKER.fullmatch(data)
    return found.group(1).decode("ascii") if found else None


class Verdict(Enum):
    OURS = "ours"  #: the marker names this root
    TAKE = "take"  #: the marker names a root this root adopted: rewrite it with this root's id
    FOREIGN = "foreign"  #: another root's, or unrecognised contents: refuse this root


class Judged(NamedTuple):
    verdict: Verdict
    found: str | None  #: the owner id the marker names (None: unrecognised contents)


def judge(data: bytes, owner: str, adopted: frozenset[str]) -> Judged:
    """The verdict on an owner marker holding ``data`` for root ``owner``, which adopted the roots ``adopted``
    (module docstring)."""
    found = owner_in(data)
    if found == owner:
        return Judged(Verdict.OURS, found)
    if found is not None and found in adopted:
        return Judged(Verdict.TAKE, found)
    return Judged(Verdict.FOREIGN, found)


def refusal(url: str, found: str | None) -> str:
    """The error for a replica location ``url`` that another root (``found``; None: unrecognised contents of
    its owner marker) owns."""
    whose = f"another root's history (owner {found})" if found else "an owner marker no shardlite wrote"
    return (f"the replica {url} holds {whose}: this root writes nothing there (its writes go on locally and "
            "ship once this is resolved). A new root given that location by mistake: create it again with a "
            "location of its own. A root that continues that one (restored from its backup, or copied from it): "
            "run `shardlite --root ROOT replicate adopt` once, then start replication again")
