"""Partition keys: one canonical form, validated once, and the digest that names tenant files.

Rules enforced here (brief rule 1):

* A key is ``str``. It is canonicalised exactly once, to Unicode NFC, and *then* validated.
* Invalid keys raise :class:`~shardlite.errors.InvalidKey`: empty keys, keys longer than
  :data:`MAX_KEY_BYTES` UTF-8 bytes, lone surrogates, control characters (``Cc``, NUL included) and
  invisible format characters (``Cf``: bidi overrides, RTL marks, zero-width joiners), which would let two
  keys that look identical address different tenants.
* Nothing about a key ever reaches the file system: file names derive from :func:`key_digest`, a
  128-bit xxh3 hex digest, so no key (``../``, absolute paths, fullwidth dots, U+2024) can escape a node
  directory.

Pure functions, no I/O.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

import xxhash

from .errors import InvalidKey

__all__ = ["MAX_KEY_BYTES", "canonical", "key_digest", "pair_key", "prefix_of"]

#: Longest key accepted, in UTF-8 bytes after NFC.
MAX_KEY_BYTES = 512

_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _validate(key: str) -> None:
    if not key:
        raise InvalidKey("a partition key cannot be empty")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKey("a partition key cannot contain lone surrogates") from None
    if size > MAX_KEY_BYTES:
        raise InvalidKey(f"a partition key is at most {MAX_KEY_BYTES} UTF-8 bytes (got {size})")
    if key.isascii():
        if key.isprintable():
            return
    for ch in key:
        if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            raise InvalidKey(
                f"a partition key cannot contain U+{ord(ch):04X} ({unicodedata.name(ch, 'unnamed')})"
            )


@lru_cache(maxsize=65536)
def _canonical_cached(key: str) -> str:
    canon = unicodedata.normalize("NFC", key)
    _validate(canon)
    return canon


def canonical(key: object) -> str:
    """Return the canonical (NFC) form of ``key`` or raise :class:`InvalidKey`.

    Idempotent: ``canonical(canonical(k)) == canonical(k)``.
    """
    if type(key) is not str:
        if isinstance(key, str):
            key = str.__str__(key)
        else:
            raise InvalidKey(f"a partition key must be str, not {type(key).__name__}")
    assert isinstance(key, str)
    if len(key) > MAX_KEY_BYTES:  # cheap guard before normalising or caching a huge string
        _validate(unicodedata.normalize("NFC", key))
    return _canonical_cached(key)


@lru_cache(maxsize=65536)
def key_digest(canonical_key: str) -> str:
    """32 hex characters of xxh3-128 over the UTF-8 canonical key: the stable file-name stem."""
    return xxhash.xxh3_128_hexdigest(canonical_key.encode("utf-8"))


def prefix_of(canonical_key: str) -> str:
    """The text before the first ``:`` (the whole key when it has none); selects the schema."""
    return canonical_key.partition(":")[0]


def _escape_id(part: str) -> str:
    # Percent-escape the escape character first, then the separator, so the mapping is injective.
    return part.replace("%", "%25").replace(":", "%3A")


def pair_key(prefix: str, a: object, b: object) -> str:
    """Key of the tenant shared by two ids, independent of their order.

    ``pair_key("dm", "bob", "alice") == "dm:alice:bob"``. Ids are canonicalised (NFC) and ``%`` and ``:``
    inside them are percent-escaped, so ``("a:b", "c")`` and ``("a", "b:c")`` never collide.
    """
    if not isinstance(prefix, str) or not prefix or ":" in prefix:
        raise InvalidKey("pair_key prefix must be non-empty text without ':'")
    if type(a) is int and type(b) is int:  # the common case (user ids): digits need no NFC nor escaping
        first, second = sorted((str(a), str(b)))
        return canonical(f"{prefix}:{first}:{second}")
    ids = []
    for part in (a, b):
        text = str(part) if isinstance(part, int) and not isinstance(part, bool) else part
        if not isinstance(text, str) or not text:
            raise InvalidKey("pair_key ids must be non-empty str or int")
        # NFC again after escaping: an escape's final hex digit may compose with a following combining
        # mark, and the parts must be sorted in the form the key ends up in.
        ids.append(unicodedata.normalize("NFC", _escape_id(unicodedata.normalize("NFC", text))))
    first, second = sorted(ids)
    return canonical(f"{prefix}:{first}:{second}")
