"""E-mail addresses: validation and the canonical uniqueness key (brief rule 10). Pure: no I/O.

Policy (documented, tested):

* The address is stored and returned exactly as given; uniqueness is decided on its *canonical key*:
  ``NFKC(casefold(NFKC(address)))``. So case variants (``Alice@Example.COM``), fullwidth forms
  (``ａｌｉｃｅ＠ｅｘａｍｐｌｅ．ｃｏｍ``) and other compatibility variants share one key.
* Confusables beyond that are *not* folded: the dotless ``ı`` (U+0131) and the dotted capital ``İ``
  (U+0130, which casefolds to ``i`` + U+0307) are different letters from ``i``, so ``alıce@x.org`` and
  ``alice@x.org`` are two accounts. This is Unicode default caseless matching, not a Turkish locale rule.
* Plus-addressing folding (``alice+news@x.org`` sharing ``alice@x.org``'s key) is an option, off by
  default, because many providers treat ``+`` as an ordinary character.
* Validation runs on the NFKC form: one ``@``; a local part of 1 to 64 characters with no spaces, control
  characters, quotes or ``(),:;<>[\\]``, no leading, trailing or doubled dots; a domain of at least two labels
  of letters, digits and hyphens (Unicode letters allowed), each 1 to 63 characters, not starting or ending
  with a hyphen; 254 characters at most in all. Quoted local parts and IP-literal domains are refused.
"""

from __future__ import annotations

import unicodedata

from .errors import InvalidEmail

__all__ = ["email_key", "validate_email", "text_key", "MAX_EMAIL_LENGTH"]

MAX_EMAIL_LENGTH = 254
_LOCAL_FORBIDDEN = frozenset('"(),:;<>[\\]@')


def text_key(text: str) -> str:
    """Caseless comparison form of free text (names, search prefixes): NFKC(casefold(NFKC(text)))."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def _fail(address: object, why: str) -> InvalidEmail:
    return InvalidEmail(f"invalid e-mail address: {why}")


def validate_email(address: object) -> str:
    """Return the NFKC form of ``address`` or raise :class:`InvalidEmail`."""
    if not isinstance(address, str):
        raise _fail(address, "not text")
    if len(address) > 4 * MAX_EMAIL_LENGTH:
        raise _fail(address, f"longer than {MAX_EMAIL_LENGTH} characters")
    form = unicodedata.normalize("NFKC", address)
    if not form or len(form) > MAX_EMAIL_LENGTH:
        raise _fail(address, f"empty or longer than {MAX_EMAIL_LENGTH} characters")
    if form.count("@") != 1:
        raise _fail(address, "it needs exactly one '@'")
    local, domain = form.split("@")
    if not 1 <= len(local) <= 64:
        raise _fail(address, "the part before '@' must have 1 to 64 characters")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise _fail(address, "dots may not start, end or repeat in the part before '@'")
    for ch in local:
        if ch in _LOCAL_FORBIDDEN or ch.isspace() or unicodedata.category(ch)[0] in "CZ":
            raise _fail(address, f"character U+{ord(ch):04X} is not allowed before '@'")
    labels = domain.split(".")
    if len(labels) < 2:
        raise _fail(address, "the domain needs at least two labels (example.com)")
    for label in labels:
        if not 1 <= len(label) <= 63:
            raise _fail(address, "every domain label needs 1 to 63 characters")
        if label.startswith("-") or label.endswith("-"):
            raise _fail(address, "domain labels may not start or end with '-'")
        for ch in label:
            if not (ch.isalnum() or ch == "-" or unicodedata.category(ch) in ("Mn", "Mc")):
                raise _fail(address, f"character U+{ord(ch):04X} is not allowed in the domain")
    return form


def email_key(address: object, *, fold_plus: bool = False) -> str:
    """The uniqueness key of ``address`` (see the module's policy); raises :class:`InvalidEmail`."""
    form = validate_email(address)
    key = text_key(form)
    if fold_plus:
        local, _, domain = key.partition("@")
        base = local.split("+", 1)[0]
        if base:
            key = f"{base}@{domain}"
    return key
