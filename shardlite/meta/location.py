"""Where a root's metadata lives: parsing, comparing and printing metadata locations (pure; no I/O).

A location is what ``Router(root, meta=...)``, ``SHARDLITE_META`` and ``shardlite init --meta`` take:

* ``None``, ``""`` or ``"sqlite"``: the embedded default (``<root>/global.db``);
* ``postgresql://user[:password]@host[:port]/dbname[?param=value...]`` (``postgres://`` too): a PostgreSQL
  database, in libpq's URL form (parsed by libpq itself through psycopg, so every libpq parameter works).

A password may be given in the URL, but it is never written into the root or printed: :func:`redacted` keeps
only the user, host, port and database name, and that is what the root records and what messages show.
Where no password is given, libpq's own sources apply (``PGPASSWORD``, ``~/.pgpass``, a peer socket).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote

from ..errors import ConfigurationError

__all__ = ["EMBEDDED", "MetaLocation", "parse_location", "recorded_location"]

#: The embedded SQLite metadata's name, as a location.
EMBEDDED = "sqlite"

_SCHEMES = ("postgresql://", "postgres://")
_MAX_LEN = 4096


@dataclass(frozen=True, slots=True)
class MetaLocation:
    """A parsed metadata location. ``dsn`` (with any password) is for connecting only; ``recordable`` is the
    same without its secrets (``password``, ``sslpassword``), what the root records; ``printable`` is the
    short form messages show; ``identity`` says which database it is, for comparisons."""

    backend: str
    dsn: str = field(repr=False)
    recordable: str
    printable: str
    identity: tuple[str, ...]

    @property
    def embedded(self) -> bool:
        return self.backend == EMBEDDED

    def same_store(self, other: MetaLocation) -> bool:
        """True when both name the same store (the user and the password may differ)."""
        return self.identity == other.identity


_EMBEDDED = MetaLocation(EMBEDDED, "", EMBEDDED, EMBEDDED, (EMBEDDED,))

#: libpq parameters that are secrets: never recorded, never printed.
_SECRETS = frozenset({"password", "sslpassword"})


def parse_location(text: str | None) -> MetaLocation:
    """Parse a metadata location; anything else raises :class:`~shardlite.ConfigurationError` saying what is
    accepted. Never echoes the text back (it may hold a password)."""
    if text is None:
        return _EMBEDDED
    if not isinstance(text, str):
        raise ConfigurationError("meta= is a postgresql:// URL, or 'sqlite' (the default) for the embedded store")
    text = text.strip()
    if text in ("", EMBEDDED):
        return _EMBEDDED
    if len(text) > _MAX_LEN or not text.isprintable():
        raise ConfigurationError("the metadata URL is too long or holds control characters")
    if not text.lower().startswith(_SCHEMES):
        raise ConfigurationError(
            "meta= takes a PostgreSQL URL (postgresql://user@host:port/dbname) or 'sqlite' for the embedded "
            "store; other backends do not exist")
    return _postgresql(text)


def recorded_location(text: str) -> MetaLocation:
    """Parse a location as a root records it (:attr:`MetaLocation.recordable`: libpq's ``key=value`` form,
    or ``sqlite``); raises :class:`~shardlite.ConfigurationError` when it is not one."""
    if text == EMBEDDED:
        return _EMBEDDED
    if len(text) > _MAX_LEN or not text.isprintable():
        raise ConfigurationError("the recorded metadata location is too long or holds control characters")
    return _postgresql(text)


def _postgresql(text: str) -> MetaLocation:
    from psycopg import conninfo  # here, not at import: psycopg costs ~0.1 s to load, and embedded roots never need it

    try:
        params = conninfo.conninfo_to_dict(text)
    except Exception:  # psycopg.ProgrammingError: libpq's message may quote a piece of it, a password too
        raise ConfigurationError("the metadata URL cannot be parsed (libpq refused its form): write it as "
                                 "postgresql://user@host:port/dbname, with %XX escapes in the password") from None
    host = str(params.get("host") or "localhost")
    port = str(params.get("port") or "5432")
    dbname = str(params.get("dbname") or params.get("user") or "")
    user = str(params.get("user") or "")
    if not dbname:
        raise ConfigurationError("the metadata URL names no database: postgresql://user@host:port/dbname")
    if "," in host or "," in port:
        raise ConfigurationError("the metadata URL names several hosts; give one (a proxy or a service name "
                                 "for failover)")
    who = f"{quote(user, safe='')}@" if user else ""
    db = quote(dbname, safe="")
    if host.startswith("/"):  # a Unix socket directory
        printable = f"postgresql://{who}/{db}?host={quote(host, safe='/')}&port={port}"
    else:
        printable = f"postgresql://{who}{f'[{host}]' if ':' in host else quote(host, safe='')}:{port}/{db}"
    recordable = conninfo.make_conninfo("", **{k: v for k, v in params.items() if k not in _SECRETS})
    return MetaLocation("postgresql", text, recordable, printable, ("postgresql", host, port, dbname))
