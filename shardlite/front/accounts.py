"""Accounts in the global DB: unique e-mail addresses, profiles, password credentials (rules: global uniqueness is
decided by a constraint).

Uniqueness is decided by a UNIQUE constraint on the canonical key of the address (see
:mod:`shardlite.core.emails`), never by a read-then-write check, so concurrent sign-ups of variants of one
address from several processes end with exactly one account and every loser gets :class:`EmailTaken`.

Passwords go through scrypt (``hashlib.scrypt``, memory-hard, in the standard library) with a random
16-byte salt per account; the hash is computed *before* the global write lock is taken, and checked with a
constant-time comparison. The password is never stored in the profile, logged or put in an exception.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import apsw

from ..core.emails import email_key, text_key, upgrade_email_key
from ..errors import AuthenticationFailed, InvalidEmail, InvalidPassword, UnknownAccount
from ..meta.accounts import Credential

if TYPE_CHECKING:
    from ..meta.accounts import AccountStore, CredentialStore

__all__ = ["Account", "Accounts", "ScryptParams", "upgrade_email_keys"]

log = logging.getLogger("shardlite.accounts")


@dataclass(frozen=True)
class ScryptParams:
    """scrypt cost: ``n`` (CPU/memory cost, a power of two), ``r`` (block size), ``p`` (parallelism).

    The default (n=2**14, r=8, p=1) takes about 16 MiB and tens of milliseconds per hash."""

    n: int = 2**14
    r: int = 8
    p: int = 1

    @property
    def scheme(self) -> str:
        return f"scrypt:n={self.n},r={self.r},p={self.p}"

    @classmethod
    def parse(cls, scheme: str) -> ScryptParams:
        name, _, params = scheme.partition(":")
        if name != "scrypt":
            raise ValueError(f"unknown password scheme {name!r}")
        values = dict(part.split("=") for part in params.split(","))
        return cls(n=int(values["n"]), r=int(values["r"]), p=int(values["p"]))

    def derive(self, password: str, salt: bytes) -> bytes:
        return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=self.n, r=self.r, p=self.p,
                              maxmem=256 * self.n * self.r + 1024 * 1024, dklen=32)


@dataclass(frozen=True)
class Account:
    """An account: ``email`` exactly as given, ``profile`` (including ``name``) as stored."""

    id: int
    email: str
    profile: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0

    @property
    def name(self) -> str | None:
        value = self.profile.get("name")
        return None if value is None else str(value)


_MAX_ID = 2**63 - 1


def valid_id(account_id: object) -> bool:
    """Account ids are ints in SQLite's range: no bools, no text that SQLite's affinity would coerce."""
    return type(account_id) is int and 0 < account_id <= _MAX_ID


def _require_id(account_id: object) -> int:
    if not valid_id(account_id):
        raise UnknownAccount(f"no account {account_id!r}")
    assert isinstance(account_id, int)
    return account_id


class Accounts:
    """``router.accounts``: register, look up, search, change and delete accounts; passwords.

    The policy lives here (canonical e-mail keys, the profile document, scrypt hashing before any write);
    the rows live behind the contracts ``store`` and ``credentials`` (:mod:`shardlite.meta.accounts`)."""

    def __init__(self, store: AccountStore, credentials: CredentialStore, clock: Callable[[], float] = time.time,
                 *, fold_plus: bool = False, scrypt: ScryptParams | None = None, min_password_length: int = 8,
                 max_password_bytes: int = 1024) -> None:
        self._store = store
        self._credentials = credentials
        self.clock = clock
        #: Fold plus-addressing (``a+tag@x`` shares ``a@x``'s key). Off by default; changing it on a root
        #: with accounts does not rewrite existing keys.
        self.fold_plus = fold_plus
        self.scrypt = scrypt or ScryptParams()
        self.min_password_length = min_password_length
        self.max_password_bytes = max_password_bytes

    # -- helpers -----------------------------------------------------------------------------------------

    def key(self, email: object) -> str:
        """The canonical uniqueness key of ``email`` under this router's policy."""
        return email_key(email, fold_plus=self.fold_plus)

    def _check_password(self, password: object) -> str:
        if not isinstance(password, str):
            raise InvalidPassword("a password must be text")
        if len(password) < self.min_password_length:
            raise InvalidPassword(f"a password needs at least {self.min_password_length} characters")
        try:
            size = len(password.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidPassword("a password cannot contain lone surrogates") from None
        if size > self.max_password_bytes:
            raise InvalidPassword(f"a password is at most {self.max_password_bytes} bytes")
        return password

    def _hash(self, password: str) -> tuple[str, bytes, bytes]:
        salt = secrets.token_bytes(16)
        return self.scrypt.scheme, salt, self.scrypt.derive(password, salt)

    @staticmethod
    def _profile_json(profile: dict[str, Any]) -> str:
        if "password" in profile:
            raise InvalidPassword("pass the password as password=..., it is never stored in the profile")
        return json.dumps(profile, ensure_ascii=False, sort_keys=True)

    # -- the API -------------------------------------------------------------------------------------------

    def register(self, email: str, *, password: str | None = None, **profile: Any) -> int:
        """Create an account; returns its id. :class:`EmailTaken` when an account already has an address
        with the same canonical key; :class:`InvalidEmail`, :class:`InvalidPassword` for bad input
        (:class:`ValueError` for a name holding U+0000, which no backend stores)."""
        key = self.key(email)
        credential = Credential(*self._hash(self._check_password(password))) if password is not None else None
        document = self._profile_json(profile)
        name_key = text_key(str(profile.get("name", "")))
        return self._store.create(email, key, name_key, document, self.clock(), credential)

    def get(self, account_id: int) -> Account | None:
        """The account with this id, or None."""
        if not valid_id(account_id):
            return None
        return self._store.get(account_id)

    def by_email(self, email: str) -> Account | None:
        """The account whose address has the same canonical key as ``email``, or None."""
        return self._store.by_email_key(self.key(email))

    def search(self, text: str, *, limit: int = 20) -> list[Account]:
        """Accounts whose name or address starts with ``text`` (caseless), by name; at most ``limit``."""
        if not isinstance(text, str):
            raise TypeError("search text must be str")
        limit = max(0, min(int(limit), 1000))
        return self._store.search(text_key(text.strip()), limit)

    def update_profile(self, account_id: int, **changes: Any) -> Account:
        """Merge ``changes`` into the profile (a value of None removes the field)."""
        account_id = _require_id(account_id)

        def merge(profile: dict[str, Any]) -> tuple[str, str]:
            merged = {k: v for k, v in {**profile, **changes}.items() if v is not None}
            return self._profile_json(merged), text_key(str(merged.get("name", "")))

        return self._store.update_profile(account_id, merge, self.clock())

    def change_email(self, account_id: int, new_email: str) -> None:
        """Change the address (stored as given). :class:`EmailTaken` if another account has its key."""
        account_id = _require_id(account_id)
        self._store.change_email(account_id, new_email, self.key(new_email), self.clock())

    def delete(self, account_id: int) -> None:
        """Delete the account with its credentials and sessions."""
        self._store.delete(_require_id(account_id))

    def set_password(self, account_id: int, password: str) -> None:
        """Set or replace the account's password."""
        account_id = _require_id(account_id)
        credential = Credential(*self._hash(self._check_password(password)))
        self._credentials.set(account_id, credential, self.clock())

    def has_password(self, account_id: int) -> bool:
        """Whether the account has a password set (False for an unknown id)."""
        if not valid_id(account_id):
            return False
        return self._credentials.has(account_id)

    def authenticate(self, email: str, password: str) -> int:
        """The account id when ``password`` is right for ``email``; otherwise :class:`AuthenticationFailed`
        (unknown address, no password set, wrong password, malformed input: deliberately the same error)."""
        try:
            key = self.key(email)
            self._check_password(password)
        except (InvalidEmail, InvalidPassword):
            raise AuthenticationFailed("wrong e-mail address or password") from None
        login = self._credentials.for_login(key)
        if login is None or login.credential is None:
            self.scrypt.derive(password, b"\0" * 16)  # same work as a real check: no timing oracle
            raise AuthenticationFailed("wrong e-mail address or password")
        scheme, salt, stored = login.credential
        candidate = ScryptParams.parse(scheme).derive(password, salt)
        if not hmac.compare_digest(candidate, stored):
            raise AuthenticationFailed("wrong e-mail address or password")
        return login.account_id


def upgrade_email_keys(cursor: apsw.Cursor) -> None:
    """Global schema version 6: stored e-mail keys take today's form (the domain's ASCII form, see
    :func:`shardlite.core.emails.upgrade_email_key`), inside the global DB's upgrade transaction. Two accounts
    whose keys now coincide (an address registered once in Unicode and once in punycode form) cannot both
    have it: the older account takes it, the other keeps its old key (a warning names both ids), so it is
    no longer found by e-mail address until an operator merges or renames it."""
    conn = cursor.connection
    rows = conn.execute("SELECT id, email_key FROM _shardlite_accounts ORDER BY id").fetchall()
    for account_id, old in rows:
        new = upgrade_email_key(str(old))
        if new == old:
            continue
        taken = conn.execute("SELECT id FROM _shardlite_accounts WHERE email_key = ?", (new,)).fetchall()
        if taken:
            log.warning("accounts %s and %s now share an e-mail key; %s keeps its old key", taken[0][0],
                        account_id, account_id)
            continue
        conn.execute("UPDATE _shardlite_accounts SET email_key = ? WHERE id = ?", (new, account_id))

