"""The replica target contract: where the tenants' replicas are stored, and the names inside it (pure: no I/O).

A replica target is a flat store of immutable-by-convention *objects* named by ``/``-separated names under
the target's own prefix: an S3 bucket and key prefix (:mod:`shardlite.replica.s3`) or a directory
(:mod:`shardlite.replica.directory`). :class:`ReplicaTarget` is the contract, and its docstrings are what
every backend guarantees; one conformance suite (``tests/test_replica_target.py``) runs against each backend
with a real server.

Locations, as ``Router(root, replicate=...)`` takes them:

* ``s3://bucket[/prefix][?endpoint=http://host:port][&region=name]``: credentials, and the endpoint and the
  region when the URL does not give them, come from the standard AWS sources (``AWS_ACCESS_KEY_ID`` and
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws/config``, ``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``...);
  a URL holding credentials (``s3://key:secret@bucket``, an endpoint with a user) is refused, so a location
  can be recorded in the root and printed as it is;
* ``file:///absolute/path``: a directory (another disk, a network mount); relative paths are refused.

Names (:func:`check_name`): 1 to 16 segments joined by ``/``, each 1 to 128 characters of ``a-z 0-9 _ . -``
not starting with ``.`` or ``-``, at most 512 characters in all. Lowercase only: a directory target on a
case-insensitive file system (macOS's default) would otherwise hold ``A`` and ``a`` as one file. A leading
``.`` is reserved for a backend's own temporary files (and rules out ``.`` and ``..``). Anything else raises
:class:`ValueError` before any I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qsl, quote, urlsplit

from ..errors import ConfigurationError

__all__ = [
    "ReplicaTarget",
    "TargetLocation",
    "parse_target",
    "open_target",
    "redact",
    "check_name",
    "is_name",
    "check_prefix",
    "MAX_NAME",
    "MAX_SEGMENT",
    "MAX_SEGMENTS",
]

MAX_NAME = 512
"""The longest object name, in characters (S3 keys stop at 1,024 bytes, prefix included)."""
MAX_SEGMENT = 128
"""The longest segment of a name (file systems stop at 255 bytes per name)."""
MAX_SEGMENTS = 16
"""The most segments a name has."""

_SEGMENT = re.compile(r"[a-z0-9_][a-z0-9_.\-]{0,127}")
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=\-]{0,127}")  # a target's own prefix (S3 only)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_HOST = re.compile(r"[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
_MAX_URL = 2048
_QUERY_KEYS = frozenset({"endpoint", "region"})


@runtime_checkable
class ReplicaTarget(Protocol):
    """Where replicas are stored: objects named by ``/``-separated names (see :func:`check_name`) under the
    target's prefix; one object per name.

    Every method validates its names first (``ValueError`` for a name :func:`check_name` refuses, before any
    I/O) and reports failures as:

    * :class:`~shardlite.ReplicaUnavailable`: the target cannot be reached or is failing for now (refused
      connection, timeout, 5xx, throttling, a disk I/O error). Retryable; raised within a bounded time (a
      few seconds for a server that does not answer), never a hang. A ``put`` or ``delete_many`` that
      failed this way may or may not have taken effect; repeating it is harmless.
    * :class:`~shardlite.ConfigurationError`: the location is wrong (no such bucket, credentials missing
      or refused, a directory that cannot be created); a retry does not fix it.
    * :class:`~shardlite.errors.ReplicaObjectMissing` (a ``KeyError``): ``get``/``get_range`` of a missing name.
    * :class:`~shardlite.ReplicaError`: any other refusal of the server.

    Messages name the target by :attr:`url`, which never holds credentials; neither do ``str()`` or
    ``repr()`` of a target. Objects are not listed, read or replaced by a name that is also the folder of
    another name (``a/b`` beside ``a/b/c``): S3 would hold both, a directory cannot, so callers never make
    both (the directory backend raises ``ValueError``). Methods are safe to call from several threads.
    """

    @property
    def url(self) -> str:
        """The target's location without credentials: what messages show and what a root may record."""
        ...

    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` as ``name``, replacing what it held. Atomic: a reader sees the whole old or the
        whole new object, never a part; durable when it returns (a directory fsyncs the file and its
        folder; S3 answers only once the object is stored)."""
        ...

    def put_if_absent(self, name: str, data: bytes) -> bool:
        """Store ``data`` as ``name`` only if no object has that name, atomically (of two writers racing on
        one name, one wins): ``True`` when ``name`` now holds ``data``, ``False`` when it holds other bytes
        (left as they were). A name that already holds exactly ``data`` answers ``True`` too: a retried
        request whose first attempt landed cannot be told from a second writer of the same bytes, so put
        something unique to the writer in ``data`` when who won matters."""
        ...

    def get(self, name: str) -> bytes:
        """The whole object ``name``; :class:`~shardlite.errors.ReplicaObjectMissing` when there is none."""
        ...

    def get_range(self, name: str, start: int, length: int) -> bytes:
        """``length`` bytes of ``name`` from byte ``start`` (0-based), fewer when the object ends before
        (``b""`` from its end on); :class:`~shardlite.errors.ReplicaObjectMissing` when there is no such object;
        ``ValueError`` for a negative ``start`` or ``length``."""
        ...

    def head(self, name: str) -> int | None:
        """The size of ``name`` in bytes, or ``None`` when there is no such object."""
        ...

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """``(name, size)`` of every object whose name starts with ``prefix`` (plain text: ``"a/b"`` finds
        ``a/b``, ``a/bc`` and ``a/b/c``), sorted by name (code-point order, as S3 sorts keys). The backend
        pages through the store itself (S3 answers 1,000 names a page) and reads the whole listing before
        yielding the first name, since not every S3 server lists in that order (SeaweedFS and MinIO walk
        folders): keep prefixes narrow enough for their names to fit in memory (about 100 bytes a name).
        ``prefix`` is ``""`` or a name's beginning (``ValueError`` otherwise, see :func:`check_prefix`)."""
        ...

    def delete_many(self, names: Iterable[str]) -> None:
        """Delete every object named in ``names``; names with no object are fine. Every name is checked
        before anything is deleted; not atomic as a whole (S3 deletes 1,000 names per request)."""
        ...

    def close(self) -> None:
        """Release connections (idempotent); the target is not used afterwards."""
        ...


def is_name(text: str) -> bool:
    """Whether ``text`` is a valid object name (a listing skips any other: a file or key that is not ours)."""
    try:
        check_name(text)
    except ValueError:
        return False
    return True


def check_name(name: object) -> str:
    """``name`` if it is a valid object name (module doc), else :class:`ValueError` (whose message quotes
    at most 80 characters of it)."""
    if not isinstance(name, str):
        raise ValueError(f"a replica object name is text, not {type(name).__name__}")
    if not name or len(name) > MAX_NAME:
        raise ValueError(f"a replica object name has 1 to {MAX_NAME} characters: {name[:80]!r}")
    segments = name.split("/")
    if len(segments) > MAX_SEGMENTS or not all(_SEGMENT.fullmatch(s) for s in segments):
        raise ValueError(
            f"invalid replica object name {name[:80]!r}: at most {MAX_SEGMENTS} segments joined by '/', each "
            f"1 to {MAX_SEGMENT} characters of a-z 0-9 _ . - not starting with '.' or '-'")
    return name


def check_prefix(prefix: object) -> str:
    """``prefix`` if :meth:`ReplicaTarget.list` accepts it: ``""``, or the beginning of a valid name (it
    may end with ``/``); else :class:`ValueError`."""
    if prefix == "":
        return ""
    if not isinstance(prefix, str):
        raise ValueError(f"a replica listing prefix is text, not {type(prefix).__name__}")
    check_name(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


@dataclass(frozen=True, slots=True)
class TargetLocation:
    """A parsed replica location. ``url`` is its canonical text, which holds no secret (credentials are
    refused in locations); for ``s3``: ``bucket``, ``prefix`` (``""`` or without leading or trailing ``/``),
    ``endpoint`` and ``region`` (``None`` when the AWS sources decide); for ``file``: ``path`` (absolute)."""

    scheme: str
    url: str
    bucket: str = ""
    prefix: str = ""
    endpoint: str | None = None
    region: str | None = None
    path: str = ""


def parse_target(url: object) -> TargetLocation:
    """Parse a replica location (module doc); anything else raises :class:`~shardlite.ConfigurationError`
    saying what is accepted. Messages show the location only through :func:`redact`."""
    if not isinstance(url, str):
        raise ConfigurationError("replicate= takes an s3://bucket/prefix or file:///path URL")
    text = url.strip()
    if len(text) > _MAX_URL or not text.isprintable():
        raise ConfigurationError("the replica URL is too long or holds control characters")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ConfigurationError(f"the replica URL {redact(text)} cannot be parsed") from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        return _file(text, parts.netloc, parts.path, parts.query, parts.fragment)
    if scheme != "s3":
        raise ConfigurationError(
            f"the replica URL {redact(text)} is neither s3://bucket/prefix (S3 API: AWS, R2, MinIO, SeaweedFS) "
            "nor file:///absolute/path")
    if parts.username is not None or parts.password is not None or port is not None:
        raise ConfigurationError(
            f"the replica URL {redact(text)} holds credentials or a port: give the bucket only (s3://bucket/prefix) "
            "and the credentials in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/config")
    bucket = parts.netloc  # as written: hostname would lowercase it, and name another bucket
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ConfigurationError(
            f"the replica URL {redact(text)} names no valid bucket: 3 to 63 characters of a-z 0-9 . - "
            "(s3://bucket/prefix)")
    prefix = parts.path.strip("/")
    if prefix and (len(prefix) > 256 or "//" in parts.path
                   or not all(_PREFIX_SEGMENT.fullmatch(s) for s in prefix.split("/"))):
        raise ConfigurationError(
            f"the replica URL {redact(text)} has an invalid prefix: segments of A-Z a-z 0-9 _ . = - not starting "
            "with '.', at most 256 characters")
    if parts.fragment:
        raise ConfigurationError(f"the replica URL {redact(text)} has a #fragment: leave it out")
    query = _query(text, parts.query)
    endpoint = _endpoint(text, query["endpoint"]) if "endpoint" in query else None
    region = query.get("region")
    if region is not None and not re.fullmatch(r"[a-z0-9\-]{1,32}", region):
        raise ConfigurationError(f"the replica URL {redact(text)} has an invalid region (such as us-east-1)")
    canonical = f"s3://{bucket}" + (f"/{prefix}" if prefix else "")
    params = [(k, v) for k, v in (("endpoint", endpoint), ("region", region)) if v is not None]
    if params:
        canonical += "?" + "&".join(f"{k}={quote(v, safe=':/[]')}" for k, v in params)
    return TargetLocation("s3", canonical, bucket=bucket, prefix=prefix, endpoint=endpoint, region=region)


def _file(text: str, netloc: str, path: str, query: str, fragment: str) -> TargetLocation:
    if netloc not in ("", "localhost"):
        raise ConfigurationError(
            f"the replica URL {redact(text)} is not an absolute file URL: write file:///absolute/path (three "
            "slashes; relative paths are refused)")
    if not path.startswith("/") or query or fragment:
        raise ConfigurationError(
            f"the replica URL {redact(text)} is not an absolute file URL: write file:///absolute/path, without "
            "?query or #fragment")
    from urllib.parse import unquote

    real = unquote(path)
    if "\x00" in real or any(seg in (".", "..") for seg in real.split("/")):
        raise ConfigurationError(f"the replica URL {redact(text)} holds '.' or '..' segments: give the plain path")
    real = "/" + real.strip("/") if real.strip("/") else "/"
    if real == "/":
        raise ConfigurationError("the replica directory cannot be / itself: give a directory of its own")
    return TargetLocation("file", "file://" + quote(real), path=real)


def _query(text: str, query: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigurationError(f"the replica URL {redact(text)} has a malformed ?query") from None
    found: dict[str, str] = {}
    for key, value in pairs:
        if key not in _QUERY_KEYS or key in found or not value:
            raise ConfigurationError(
                f"the replica URL {redact(text)} takes only ?endpoint=http://host:port and &region=name, once "
                "each and not empty (credentials go in the AWS environment or config)")
        found[key] = value
    return found


def _endpoint(text: str, value: str) -> str:
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ConfigurationError(f"the replica URL {redact(text)} has an endpoint that cannot be parsed") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"the replica URL {redact(text)} has an invalid endpoint: write endpoint=http://host:port or https://")
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError(
            f"the replica URL {redact(text)} has credentials in its endpoint: give them in AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/config instead")
    if parts.path not in ("", "/") or parts.query or parts.fragment or not _HOST.fullmatch(parts.netloc.rsplit(
            ":", 1)[0] if port is not None else parts.netloc):
        raise ConfigurationError(
            f"the replica URL {redact(text)} has an invalid endpoint: scheme, host and port only "
            "(endpoint=http://host:port)")
    return f"{parts.scheme}://{parts.netloc}"


def redact(url: object) -> str:
    """``url`` safe to print: a user and password (``user:secret@``) become ``***@``, in the URL and in an
    ``endpoint=`` inside it, and every query value other than ``endpoint`` and ``region`` becomes ``***``.
    Text that does not parse as a URL comes back as ``<unparseable replica URL>``; never raises."""
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    try:
        parts = urlsplit(url.strip())
        query = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key == "endpoint":
                value = redact(value)
            elif key != "region":
                value = "***"
            query.append(f"{quote(key, safe='')}={quote(value, safe=':/[]*<>@')}")
        netloc = parts.netloc
        if "@" in netloc:
            netloc = "***@" + netloc.rsplit("@", 1)[1]
        text = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else f"{netloc}{parts.path}"
        if query:
            text += "?" + "&".join(query)
        return "".join(ch if ch.isprintable() else "?" for ch in text)[:300]
    except (ValueError, TypeError):
        return "<unparseable replica URL>"


def open_target(url: str) -> ReplicaTarget:
    """The replica target at ``url`` (parsed by :func:`parse_target`). An ``s3://`` target imports the S3
    client here and nowhere else, so a process whose roots replicate to a directory (or not at all) never
    loads it. Opening makes no request (S3) and creates nothing (a directory target creates its folder on
    the first ``put``)."""
    location = parse_target(url)
    if location.scheme == "s3":
        from .s3 import S3Target

        return S3Target(location)
    from .directory import DirectoryTarget

    return DirectoryTarget(location)
