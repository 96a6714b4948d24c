"""Partition keys: one canonical form, validated once, and the digest that names tenant files.

Rules enforced here (rules: no key reaches outside its node directory):

* A key is ``str``. It is canonicalised exactly once, to Unicode NFC, and *then* validated.
* Invalid keys raise :class:`~shardlite.errors.InvalidKey`, naming the offending character
  (``"U+00A0 NO-BREAK SPACE"``): empty keys, keys longer than :data:`MAX_KEY_BYTES` UTF-8 bytes, lone
  surrogates, leading or trailing whitespace, and every character :func:`invisible_character` refuses, so
  that two keys that look identical never address different tenants:

  - control, format, private-use and unassigned code points, line and paragraph separators (categories
    ``Cc``, ``Cf``, ``Co``, ``Cn``, ``Zl``, ``Zp``: NUL, bidi overrides, RTL marks, zero-width joiners);
  - every space separator (``Zs``) other than U+0020 SPACE: NO-BREAK SPACE, the en/em/thin spaces,
    IDEOGRAPHIC SPACE and the others;
  - every ``Default_Ignorable_Code_Point``, whatever its category: variation selectors (U+FE00-FE0F,
    U+E0100-E01EF, the Mongolian ones), U+034F COMBINING GRAPHEME JOINER, the Hangul fillers (U+115F,
    U+1160, U+3164, U+FFA0), the Khmer inherent vowels, tags;
  - U+2800 BRAILLE PATTERN BLANK, which renders as blank space.

  U+0020 SPACE is allowed inside a key (``"org:Acme Inc"``), not at either end.
* Nothing about a key ever reaches the file system: file names derive from :func:`key_digest`, a
  128-bit xxh3 hex digest, so no key (``../``, absolute paths, fullwidth dots, U+2024) can escape a node
  directory.

Event topics (:func:`shardlite.core.outbox.check_topic`) and e-mail addresses (:mod:`shardlite.core.emails`) use the
same :func:`invisible_character` test.

Pure functions, no I/O.
"""

from __future__ import annotations

import unicodedata
from bisect import bisect_right
from functools import lru_cache

import xxhash

from ..errors import InvalidKey

__all__ = ["MAX_KEY_BYTES", "canonical", "describe_character", "edge_whitespace", "invisible_character",
           "is_default_ignorable", "key_digest", "pair_key", "prefix_of"]

#: Longest key accepted, in UTF-8 bytes after NFC.
MAX_KEY_BYTES = 512

# Default_Ignorable_Code_Point, which Python's unicodedata does not expose. Copied from the Unicode Character
# Database file DerivedCoreProperties.txt, version 14.0.0 (https://www.unicode.org/Public/14.0.0/ucd/
# DerivedCoreProperties.txt), the version of unicodedata in Python 3.11 (unicodedata.unidata_version):
# inclusive ranges, one per line of that file ("Total code points: 4174"). tests/test_keys.py checks the
# table against this Python's unicodedata (every format character not excluded by the property's derivation
# is in it, and the total).
_DEFAULT_IGNORABLE: tuple[tuple[int, int], ...] = (
    (0x00AD, 0x00AD),    # Cf SOFT HYPHEN
    (0x034F, 0x034F),    # Mn COMBINING GRAPHEME JOINER
    (0x061C, 0x061C),    # Cf ARABIC LETTER MARK
    (0x115F, 0x1160),    # Lo HANGUL CHOSEONG FILLER..HANGUL JUNGSEONG FILLER
    (0x17B4, 0x17B5),    # Mn KHMER VOWEL INHERENT AQ..KHMER VOWEL INHERENT AA
    (0x180B, 0x180D),    # Mn MONGOLIAN FREE VARIATION SELECTOR ONE..THREE
    (0x180E, 0x180E),    # Cf MONGOLIAN VOWEL SEPARATOR
    (0x180F, 0x180F),    # Mn MONGOLIAN FREE VARIATION SELECTOR FOUR
    (0x200B, 0x200F),    # Cf ZERO WIDTH SPACE..RIGHT-TO-LEFT MARK
    (0x202A, 0x202E),    # Cf LEFT-TO-RIGHT EMBEDDING..RIGHT-TO-LEFT OVERRIDE
    (0x2060, 0x2064),    # Cf WORD JOINER..INVISIBLE PLUS
    (0x2065, 0x2065),    # Cn <reserved-2065>
    (0x2066, 0x206F),    # Cf LEFT-TO-RIGHT ISOLATE..NOMINAL DIGIT SHAPES
    (0x3164, 0x3164),    # Lo HANGUL FILLER
    (0xFE00, 0xFE0F),    # Mn VARIATION SELECTOR-1..VARIATION SELECTOR-16
    (0xFEFF, 0xFEFF),    # Cf ZERO WIDTH NO-BREAK SPACE
    (0xFFA0, 0xFFA0),    # Lo HALFWIDTH HANGUL FILLER
    (0xFFF0, 0xFFF8),    # Cn <reserved-FFF0>..<reserved-FFF8>
    (0x1BCA0, 0x1BCA3),  # Cf SHORTHAND FORMAT LETTER OVERLAP..SHORTHAND FORMAT UP STEP
    (0x1D173, 0x1D17A),  # Cf MUSICAL SYMBOL BEGIN BEAM..MUSICAL SYMBOL END PHRASE
    (0xE0000, 0xE0000),  # Cn <reserved-E0000>
    (0xE0001, 0xE0001),  # Cf LANGUAGE TAG
    (0xE0002, 0xE001F),  # Cn <reserved-E0002>..<reserved-E001F>
    (0xE0020, 0xE007F),  # Cf TAG SPACE..CANCEL TAG
    (0xE0080, 0xE00FF),  # Cn <reserved-E0080>..<reserved-E00FF>
    (0xE0100, 0xE01EF),  # Mn VARIATION SELECTOR-17..VARIATION SELECTOR-256
    (0xE01F0, 0xE0FFF),  # Cn <reserved-E01F0>..<reserved-E0FFF>
)
_IGNORABLE_STARTS = tuple(first for first, _ in _DEFAULT_IGNORABLE)

#: Categories refused outright: control, format, surrogate, private use, unassigned, line and paragraph
#: separators, and space separators (U+0020 SPACE, the one ``Zs`` character allowed, is let through before).
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})

#: Visible-as-blank characters that are neither ignorable nor separators.
_BLANK_LOOKALIKES = frozenset({"\u2800"})  # BRAILLE PATTERN BLANK

_UNNAMED = {"Cc": "a control character", "Cs": "a lone surrogate", "Co": "a private-use character",
            "Cn": "an unassigned code point"}


def is_default_ignorable(ch: str) -> bool:
    """Whether the character ``ch`` has Unicode's ``Default_Ignorable_Code_Point`` property (14.0.0)."""
    cp = ord(ch)
    i = bisect_right(_IGNORABLE_STARTS, cp) - 1
    return i >= 0 and cp <= _DEFAULT_IGNORABLE[i][1]


def describe_character(ch: str) -> str:
    """``"U+00A0 NO-BREAK SPACE"``: the code point and its Unicode name, or what it is when it has none."""
    name = unicodedata.name(ch, "") or f"({_UNNAMED.get(unicodedata.category(ch), 'unnamed')})"
    return f"U+{ord(ch):04X} {name}"


def invisible_character(text: str) -> str | None:
    """The first character of ``text`` that is invisible or a look-alike of another, described by
    :func:`describe_character`; ``None`` when there is none.

    Refused: categories ``Cc``, ``Cf``, ``Cs``, ``Co``, ``Cn``, ``Zl``, ``Zp``; ``Zs`` except U+0020 SPACE;
    every ``Default_Ignorable_Code_Point``; U+2800 BRAILLE PATTERN BLANK. The one test partition keys, event
    topics and e-mail addresses share. Pure; printable ASCII costs one comparison per character.
    """
    for ch in text:
        if " " <= ch <= "~":
            continue
        if (unicodedata.category(ch) in _REFUSED_CATEGORIES or ch in _BLANK_LOOKALIKES
                or is_default_ignorable(ch)):
            return describe_character(ch)
    return None


def edge_whitespace(text: str) -> str | None:
    """The whitespace character (``str.isspace``) that starts or ends ``text``, described by
    :func:`describe_character`; ``None`` when both ends are something else (or ``text`` is empty)."""
    for ch in (text[:1], text[-1:]):
        if ch and ch.isspace():
            return describe_character(ch)
    return None


def _validate(key: str) -> None:
    if not key:
        raise InvalidKey("a partition key cannot be empty")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKey("a partition key cannot contain lone surrogates") from None
    if size > MAX_KEY_BYTES:
        raise InvalidKey(f"a partition key is at most {MAX_KEY_BYTES} UTF-8 bytes (got {size})")
    if not (key.isascii() and key.isprintable()):  # printable ASCII only needs the check of both ends
        bad = invisible_character(key)
        if bad is not None:
            raise InvalidKey(f"a partition key cannot contain {bad} (control, invisible and look-alike "
                             "characters are refused: keys that look the same must be the same tenant)")
    # U+0020 is the only whitespace left: the others are Cc, Zs, Zl or Zp, refused above.
    if key[0] == " " or key[-1] == " ":
        raise InvalidKey(f"a partition key cannot start or end with whitespace ({edge_whitespace(key)})")


@lru_cache(maxsize=65536)
def _canonical_cached(key: str) -> str:
    canon = unicodedata.normalize("NFC", key)
    _validate(canon)
    return canon


def canonical(key: object) -> str:
    """Return the canonical (NFC) form of ``key`` or raise :class:`InvalidKey` (rules: the module's docstring).

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
    inside them are percent-escaped, so ``("a:b", "c")`` and ``("a", "b:c")`` never collide. An id follows
    the rules of a whole key (:class:`InvalidKey` otherwise), whitespace at its ends included, so whether a
    pair is valid never depends on which id sorts last.
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
        edge = edge_whitespace(text)
        if edge is not None:
            raise InvalidKey(f"a pair_key id cannot start or end with whitespace ({edge})")
        # NFC again after escaping: an escape's final hex digit may compose with a following combining
        # mark, and the parts must be sorted in the form the key ends up in.
        ids.append(unicodedata.normalize("NFC", _escape_id(unicodedata.normalize("NFC", text))))
    first, second = sorted(ids)
    return canonical(f"{prefix}:{first}:{second}")
