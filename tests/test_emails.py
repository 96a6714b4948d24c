"""E-mail addresses (``shardlite.core.emails``, pure): invisible and look-alike characters are refused, one IDN
domain in its Unicode and ASCII (punycode) forms is one key, and ``upgrade_email_key`` maps keys stored
under the earlier rule (domain kept as given) to today's. Account-level behaviour is in test_accounts.py."""

from __future__ import annotations

import unicodedata

import idna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardlite import InvalidEmail
from shardlite.core.emails import email_key, text_key, upgrade_email_key, validate_email


def old_email_key(address: str, fold_plus: bool = False) -> str:
    """The key as the earlier rule computed it for a valid address: NFKC(casefold(NFKC(address)))."""
    key = text_key(unicodedata.normalize("NFKC", address))
    if fold_plus:
        local, _, domain = key.partition("@")
        base = local.split("+", 1)[0]
        if base:
            key = f"{base}@{domain}"
    return key


# -- invisible and look-alike characters ----------------------------------------------------------------------

LOOKALIKES = {
    "\u00a0": "NO-BREAK SPACE", "\u2007": "FIGURE SPACE", "\u202f": "NARROW NO-BREAK SPACE",
    "\u3000": "IDEOGRAPHIC SPACE", "\u1680": "OGHAM SPACE MARK",
    "\ufe00": "VARIATION SELECTOR-1", "\ufe0f": "VARIATION SELECTOR-16", "\U000e0100": "VARIATION SELECTOR-17",
    "\U000e01ef": "VARIATION SELECTOR-256", "\u180b": "MONGOLIAN FREE VARIATION SELECTOR ONE",
    "\u034f": "COMBINING GRAPHEME JOINER",
    "\u115f": "HANGUL CHOSEONG FILLER", "\u1160": "HANGUL JUNGSEONG FILLER", "\u3164": "HANGUL FILLER",
    "\uffa0": "HALFWIDTH HANGUL FILLER",
    "\u2800": "BRAILLE PATTERN BLANK",
    "\u200b": "ZERO WIDTH SPACE", "\u200d": "ZERO WIDTH JOINER", "\u00ad": "SOFT HYPHEN",
    "\u17b4": "KHMER VOWEL INHERENT AQ", "\U000e0041": "TAG LATIN CAPITAL LETTER A",
}


@pytest.mark.parametrize("ch", list(LOOKALIKES), ids=lambda c: f"U+{ord(c):04X}")
def test_lookalikes_are_refused_in_the_local_part_and_the_domain_and_named(ch: str) -> None:
    assert email_key("alice@example.com") == "alice@example.com"
    for address in (f"ali{ch}ce@example.com", f"alice{ch}@example.com", f"alice@exa{ch}mple.com",
                    f"alice@example{ch}.com", f"alice@b\u00fccher{ch}.example", f"{ch}alice@example.com"):
        with pytest.raises(InvalidEmail) as err:
            email_key(address)
        assert f"U+{ord(ch):04X} {LOOKALIKES[ch]}" in str(err.value), address
        with pytest.raises(InvalidEmail):
            validate_email(address)


def test_combining_marks_that_are_visible_stay_allowed_in_the_domain() -> None:
    assert email_key("a@cafe\u0301.example") == email_key("a@caf\u00e9.example") == "a@xn--caf-dma.example"
    assert email_key("a@\u0915\u093f.example")  # DEVANAGARI KA + VOWEL SIGN I (Mc)


# -- IDN domains: one key for the Unicode and the ASCII form ------------------------------------------------

def test_unicode_and_punycode_forms_of_one_domain_share_a_key() -> None:
    forms = ["alice@b\u00fccher.example", "alice@xn--bcher-kva.example", "ALICE@XN--BCHER-KVA.EXAMPLE",
             "Alice@B\u00dcCHER.Example", "alice@bu\u0308cher.example", "\uff41lice@b\u00fccher\uff0eexample",
             "alice@Xn--Bcher-Kva.example"]
    assert {email_key(f) for f in forms} == {"alice@xn--bcher-kva.example"}
    assert email_key("a@\u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444") == email_key("a@xn--e1afmkfd.xn--p1ai")
    assert email_key("a@\u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444") == "a@xn--e1afmkfd.xn--p1ai"
    # the address itself is what validate_email returns (NFKC), not the key
    assert validate_email("Alice@B\u00dcCHER.Example") == "Alice@B\u00dcCHER.Example"


def test_sharp_s_and_final_sigma_domains_fold_like_the_rest_of_the_address() -> None:
    """Case folding comes first (documented): domains IDNA 2008 keeps apart only by ß/ss share a key."""
    assert email_key("a@stra\u00dfe.de") == email_key("a@strasse.de") == email_key("a@xn--strae-oqa.de")
    assert email_key("a@\u03c3\u03bf\u03c6\u03bf\u03c2.gr") == email_key("a@\u03a3\u039f\u03a6\u039f\u03a3.gr")


def test_ascii_labels_idna_reserves_are_kept() -> None:
    """Plain ASCII labels are their own ASCII form, also those with '--' in 3rd and 4th position."""
    assert email_key("A@R3---SN-ABC.googlevideo.com") == "a@r3---sn-abc.googlevideo.com"
    assert email_key("a@ab--cd.example") == "a@ab--cd.example"


@pytest.mark.parametrize("address", [
    "a@xn--zz.example",                    # not punycode
    "a@xn--.example",                      # no content
    "a@xn--bcher-kva-.example",            # A-label ending with a hyphen
    "a@\u0301b.example",                   # label starting with a combining mark
    "a@1\u05d0.example",                   # bidi rule: an RTL label starting with a digit
    "a@xn--ab-j1t.example",                # A-label of a + ZWNJ + b: joiner out of context
    "a@xn--mgba3gch31f060k.example",       # A-label of a Persian word with a ZWNJ in context: invisible
    "a@" + "\u00fc" * 60 + ".example",     # 60 characters, but an A-label over 63
    "a@x\u16ee.example",                   # RUNIC ARLAUG SYMBOL: a letter number, disallowed by IDNA 2008
    "a@\u1100x.example",                   # a conjoining Hangul jamo alone, disallowed by IDNA 2008
], ids=ascii)
def test_domains_idna_refuses_are_invalid_with_a_clear_message(address: str) -> None:
    with pytest.raises(InvalidEmail, match="domain"):
        email_key(address)
    with pytest.raises(InvalidEmail):
        validate_email(address)


def test_persian_zwnj_a_label_is_refused_as_invisible() -> None:
    word = "\u0646\u0627\u0645\u0647\u200c\u0627\u06cc"  # the IDNA test vector with a ZWNJ in valid context
    a_label = idna.encode(word).decode()
    assert a_label == "xn--mgba3gch31f060k"
    with pytest.raises(InvalidEmail, match="U\\+200C ZERO WIDTH NON-JOINER"):
        email_key(f"a@{a_label}.example")


# -- upgrade_email_key ----------------------------------------------------------------------------------------

def test_upgrade_email_key_examples() -> None:
    assert upgrade_email_key("alice@b\u00fccher.example") == "alice@xn--bcher-kva.example"
    assert upgrade_email_key("alice@xn--bcher-kva.example") == "alice@xn--bcher-kva.example"
    assert upgrade_email_key("alice@example.com") == "alice@example.com"
    # plus-addressing is neither applied nor undone: only the domain changes
    assert upgrade_email_key("alice+news@b\u00fccher.example") == "alice+news@xn--bcher-kva.example"
    assert upgrade_email_key("alice@b\u00fccher.example") == email_key("Alice+News@B\u00fccher.example", fold_plus=True)
    # a domain with no ASCII form today keeps its old key; no key computed today can equal it
    assert upgrade_email_key("a@xn--zz.example") == "a@xn--zz.example"
    assert upgrade_email_key("a@x\ufe0f.example") == "a@x\ufe0f.example"
    assert upgrade_email_key("no-at-sign") == "no-at-sign"


# -- properties ----------------------------------------------------------------------------------------------

# Lower-case letters IDNA 2008 accepts in any mix (no right-to-left script, no dotless i: "ı".upper() is "I").
IDN_LETTERS = ("abcdefghijklmnopqrstuvwxyz0123456789"
               "\u00e4\u00f6\u00fc\u00df\u00e9\u00e8\u00e7\u00f1\u00f8\u00e5\u00e6\u0153\u0142\u017e\u0161\u010d\u0159"
               "\u0105\u0119\u011f\u0259\u0111"
               "\u03b1\u03b2\u03b3\u03b4\u03b5\u03b6\u03b7\u03b8\u03bb\u03bc\u03c0\u03c1\u03c3\u03c2\u03c9"
               "\u0430\u0431\u0432\u0433\u0434\u0436\u0438\u043a\u043b\u043c\u043d\u043e\u043f\u0440\u0441\u044f\u044e"
               "\u6771\u4eac\u5927\u962a\u4e2d\u6587\ud55c\uad6d\uc5b4")
NON_ASCII = [ch for ch in IDN_LETTERS if not ch.isascii()]
ascii_labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
idn_labels = st.builds(lambda head, ch, tail: head + ch + tail, st.text(alphabet=IDN_LETTERS, max_size=4),
                       st.sampled_from(NON_ASCII), st.text(alphabet=IDN_LETTERS, max_size=4))
idn_domains = st.builds(lambda labels, tld: ".".join([*labels, tld]),
                        st.lists(idn_labels | ascii_labels, min_size=1, max_size=3).filter(
                            lambda ls: any(not label.isascii() for label in ls)),
                        st.sampled_from(["example", "com", "de", "\u0440\u0444", "\u4e2d\u56fd"]))
locals_ = st.lists(st.text(alphabet="abcxyzABCXYZ019_-+\u00e9\u00c9", min_size=1, max_size=8),
                   min_size=1, max_size=3).map(".".join)


@settings(max_examples=300, deadline=None)
@given(local=locals_, domain=idn_domains, fold_plus=st.booleans())
def test_unicode_and_punycode_forms_of_generated_domains_share_a_key(local: str, domain: str, fold_plus: bool) -> None:
    punycode = idna.encode(domain, uts46=True).decode("ascii")
    forms = [domain, punycode, domain.upper(), punycode.upper(), unicodedata.normalize("NFD", domain)]
    keys = {email_key(f"{local}@{form}", fold_plus=fold_plus) for form in forms}
    assert len(keys) == 1, (forms, keys)
    (key,) = keys
    assert key.partition("@")[2].isascii()
    if not fold_plus:
        assert email_key(key) == key  # a key is an address whose key is itself


@settings(max_examples=300, deadline=None)
@given(local=locals_, domain=idn_domains | st.builds(".".join, st.lists(ascii_labels, min_size=2, max_size=3)),
       fold_plus=st.booleans(), punycode=st.booleans(), upper=st.booleans())
def test_upgrade_maps_the_old_key_to_the_new_key(local: str, domain: str, fold_plus: bool, punycode: bool,
                                                 upper: bool) -> None:
    if punycode:
        domain = idna.encode(domain, uts46=True).decode("ascii")
    address = f"{local}@{domain.upper() if upper else domain}"
    new = email_key(address, fold_plus=fold_plus)
    old = old_email_key(address, fold_plus=fold_plus)
    assert upgrade_email_key(old) == new
    assert upgrade_email_key(new) == new
    assert old.partition("@")[0] == new.partition("@")[0], "the local part is never touched"


refused_chars = st.sampled_from(list(LOOKALIKES)) | st.characters(
    categories=["Cc", "Cf", "Co", "Cn", "Zs", "Zl", "Zp"])


@settings(max_examples=300, deadline=None)
@given(local=locals_, domain=idn_domains, ch=refused_chars, where=st.integers(min_value=0, max_value=60))
def test_inserting_an_invisible_character_anywhere_makes_an_address_invalid(local: str, domain: str, ch: str,
                                                                            where: int) -> None:
    address = f"{local}@{domain}"
    email_key(address)
    where = min(where, len(address))
    with pytest.raises(InvalidEmail):
        email_key(address[:where] + ch + address[where:])


@settings(max_examples=400, deadline=None)
@given(address=st.text(max_size=30) | st.builds(lambda a, c, b: a + c + b, st.text(max_size=10), refused_chars,
                                                 st.text(max_size=10)).map(lambda s: s + "@x.org"))
def test_any_text_is_refused_or_gives_a_clean_ascii_domain_key(address: str) -> None:
    try:
        key = email_key(address)
    except InvalidEmail:
        return
    local, _, domain = key.partition("@")
    assert domain.isascii() and domain == domain.lower()
    assert validate_email(address) == unicodedata.normalize("NFKC", address)
    assert upgrade_email_key(key) == key
