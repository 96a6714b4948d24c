"""E-mail addresses: validation and the canonical uniqueness key (rules: global uniqueness is decided by a
constraint). Pure: no I/O.

Policy (documented, tested):

* The address is stored and returned exactly as given; uniqueness is decided on its *canonical key*:
  ``NFKC(casefold(NFKC(local)))@domain-key``. So case variants (``Alice@Example.COM``), fullwidth forms
  (``ａｌｉｃｅ＠ｅｘａｍｐｌｅ．ｃｏｍ``) and other compatibility variants share one key.
* The domain's key is its ASCII form: ``NFKC(casefold(NFKC(domain)))`` label by label, then each label that
  is not plain ASCII goes through IDNA 2008 with the UTS 46 mapping (``idna.encode(label, uts46=True)``) to
  its A-label (``xn--...``), and each label that already is an A-label is decoded, checked and encoded again
  the same way. So ``alice@bücher.example``, ``alice@BÜCHER.example``, ``alice@xn--bcher-kva.example`` and
  ``alice@XN--BCHER-KVA.EXAMPLE`` are one address, one account. Case folding comes first, as for the rest of
  the address, so domains that IDNA 2008 keeps apart only by ``ß``/``ss`` or ``ς``/``σ`` share a key
  (``straße.de``, ``strasse.de``, ``xn--strae-oqa.de``): at worst a second account is refused, and keys
  stored before this rule (already case-folded) upgrade exactly (:func:`upgrade_email_key`). Plain ASCII
  labels are kept as they are (lower-cased), including the ``ab--cd`` labels IDNA reserves but DNS allows.
* Confusables beyond that are *not* folded: the dotless ``ı`` (U+0131) and the dotted capital ``İ``
  (U+0130, which casefolds to ``i`` + U+0307) are different letters from ``i``, so ``alıce@x.org`` and
  ``alice@x.org`` are two accounts. This is Unicode default caseless matching, not a Turkish locale rule.
* Plus-addressing folding (``alice+news@x.org`` sharing ``alice@x.org``'s key) is an option, off by
  default, because many providers treat ``+`` as an ordinary character.
* Refused (:class:`InvalidEmail`, naming the reason): anywhere in the address, every character
  :func:`shardlite.core.keys.invisible_character` refuses in partition keys (control, format, private-use and
  unassigned code points, every space separator, variation selectors, U+034F COMBINING GRAPHEME JOINER, the
  Hangul fillers, U+2800 BRAILLE PATTERN BLANK and the other default-ignorable code points). Then, on the
  NFKC form: anything but one ``@``; a local part outside 1 to 64 characters, with spaces, quotes or
  ``(),:;<>[\\]``, or with leading, trailing or doubled dots; a domain of fewer than two labels, labels
  outside 1 to 63 characters, starting or ending with a hyphen, or with characters other than letters,
  digits, hyphens and combining marks; more than 254 characters in all; a domain that IDNA 2008 refuses
  (invalid ``xn--`` labels, disallowed code points, labels starting with a combining mark, bidi or joiner
  rule violations, an A-label longer than 63 characters) or whose ASCII form is over 253 characters. Quoted
  local parts and IP-literal domains are refused.
"""

from __future__ import annotations

import unicodedata

import idna

from ..errors import InvalidEmail
from .keys import invisible_character

__all__ = ["email_key", "validate_email", "text_key", "upgrade_email_key", "MAX_EMAIL_LENGTH",
           "MAX_ASCII_DOMAIN_LENGTH"]

MAX_EMAIL_LENGTH = 254
#: Longest domain in its ASCII form (RFC 1035's 255 octets on the wire, less the length octets).
MAX_ASCII_DOMAIN_LENGTH = 253
_LOCAL_FORBIDDEN = frozenset('"(),:;<>[\\]@')
_ACE_PREFIX = "xn--"


def text_key(text: str) -> str:
    """Caseless comparison form of free text (names, search prefixes): NFKC(casefold(NFKC(text)))."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def _fail(why: str) -> InvalidEmail:
    return InvalidEmail(f"invalid e-mail address: {why}")


def _ascii_label(label: str) -> str:
    """The A-label key of one case-folded domain label; :class:`InvalidEmail` when IDNA 2008 refuses it."""
    if label.isascii() and not label.startswith(_ACE_PREFIX):
        return label  # a plain LDH label: its own ASCII form
    try:
        unicode_label = idna.decode(label) if label.isascii() else label
        bad = invisible_character(unicode_label)
        if bad is not None:
            raise _fail(f"the domain label {label!r} contains {bad}")
        encoded = idna.encode(text_key(unicode_label), uts46=True).decode("ascii")
    except UnicodeError as exc:  # idna.IDNAError and its subclasses
        raise _fail(f"the domain label {label!r} is not a valid internationalized domain name ({exc})") from None
    if not encoded or "." in encoded:
        raise _fail(f"the domain label {label!r} is not a valid internationalized domain name")
    return encoded


def _ascii_domain(folded_domain: str) -> str:
    """The ASCII key of a domain already in :func:`text_key` form (see the module's policy)."""
    ascii_domain = ".".join(_ascii_label(label) for label in folded_domain.split("."))
    if len(ascii_domain) > MAX_ASCII_DOMAIN_LENGTH:
        raise _fail(f"the domain's ASCII form is longer than {MAX_ASCII_DOMAIN_LENGTH} characters")
    return ascii_domain


def _parse(address: object) -> tuple[str, str, str]:
    """``(NFKC form, local part, domain)`` of a syntactically valid address; IDNA is not checked here."""
    if not isinstance(address, str):
        raise _fail("not text")
    if len(address) > 4 * MAX_EMAIL_LENGTH:
        raise _fail(f"longer than {MAX_EMAIL_LENGTH} characters")
    # Before NFKC, so the message names the character as typed (NFKC turns NO-BREAK SPACE into SPACE).
    bad = invisible_character(address)
    if bad is not None:
        raise _fail(f"it contains {bad} (control, invisible and look-alike characters are refused)")
    form = unicodedata.normalize("NFKC", address)
    if not form or len(form) > MAX_EMAIL_LENGTH:
        raise _fail(f"empty or longer than {MAX_EMAIL_LENGTH} characters")
    if form.count("@") != 1:
        raise _fail("it needs exactly one '@'")
    local, domain = form.split("@")
    if not 1 <= len(local) <= 64:
        raise _fail("the part before '@' must have 1 to 64 characters")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise _fail("dots may not start, end or repeat in the part before '@'")
    bad = invisible_character(form)  # what NFKC made of the address, checked again
    if bad is not None:
        raise _fail(f"it contains {bad} (control, invisible and look-alike characters are refused)")
    for ch in local:
        if ch in _LOCAL_FORBIDDEN or ch.isspace() or unicodedata.category(ch)[0] in "CZ":
            raise _fail(f"character U+{ord(ch):04X} is not allowed before '@'")
    labels = domain.split(".")
    if len(labels) < 2:
        raise _fail("the domain needs at least two labels (example.com)")
    for label in labels:
        if not 1 <= len(label) <= 63:
            raise _fail("every domain label needs 1 to 63 characters")
        if label.startswith("-") or label.endswith("-"):
            raise _fail("domain labels may not start or end with '-'")
        for ch in label:
            if not (ch.isalnum() or ch == "-" or unicodedata.category(ch) in ("Mn", "Mc")):
                raise _fail(f"character U+{ord(ch):04X} is not allowed in the domain")
    return form, local, domain


def validate_email(address: object) -> str:
    """Return the NFKC form of ``address`` or raise :class:`InvalidEmail` (rules: the module's policy)."""
    form, _, domain = _parse(address)
    _ascii_domain(text_key(domain))
    return form


def email_key(address: object, *, fold_plus: bool = False) -> str:
    """The uniqueness key of ``address`` (see the module's policy); raises :class:`InvalidEmail`.

    ``NFKC(casefold(NFKC(local)))`` (cut at the first ``+`` when ``fold_plus`` and something is left),
    ``@``, the domain's ASCII form."""
    _, local, domain = _parse(address)
    local_key = text_key(local)
    domain_key = _ascii_domain(text_key(domain))
    if fold_plus:
        base = local_key.split("+", 1)[0]
        if base:
            local_key = base
    return f"{local_key}@{domain_key}"


def upgrade_email_key(old_key: str) -> str:
    """The key :func:`email_key` gives today for an account whose stored key an earlier rule computed.

    Keys used to be ``NFKC(casefold(NFKC(address)))`` with the domain as given (``bücher.example`` and
    ``xn--bcher-kva.example`` apart). Only the domain changes, to its ASCII form; the local part is kept
    exactly as stored, so plus-folding (a per-router setting applied when the key was written) is neither
    applied nor undone. For every address valid under both rules,
    ``upgrade_email_key(old key) == email_key(address, fold_plus=<the setting it was stored with>)``.
    Idempotent, and a key already in today's form is returned unchanged.

    A key without ``@``, or whose domain has no ASCII form under today's rules (its address is now refused
    by :func:`validate_email`), is returned unchanged: no key computed today can equal it, since today's
    domains are ASCII and IDNA-valid, so it never blocks a new account. Pure.
    """
    local, at, domain = old_key.rpartition("@")
    if not at:
        return old_key
    try:
        return f"{local}@{_ascii_domain(domain)}"
    except InvalidEmail:
        return old_key
