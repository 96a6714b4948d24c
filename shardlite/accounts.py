"""Accounts in the global DB: unique e-mail addresses, profiles, password credentials (brief rule 10).

Uniqueness is decided by a UNIQUE constraint on the canonical key of the address (see
:mod:`shardlite.emails`), never by a read-then-write check, so concurrent sign-ups of variants of one
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
from typing import Any

import apsw

from .authorizer import INTERNAL_SQL as _I
from .emails import email_key, text_key, upgrade_email_key
from .errors import AuthenticationFailed, EmailTaken, InvalidEmail, InvalidPassword, UnknownAccount
from .globaldb import GlobalDB

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


_COLUMNS = "id, email, profile, created, updated"
_MAX_ID = 2**63 - 1


def valid_id(account_id: object) -> bool:
    """Account ids are ints in SQLite's range: no bools, no text that SQLite's affinity would coerce."""
    return type(account_id) is int and 0 < account_id <= _MAX_ID


def _require_id(account_id: object) -> int:
    if not valid_id(account_id):
        raise UnknownAccount(f"no account {account_id!r}")
    assert isinstance(account_id, int)
    return account_id


def _account(row: tuple[Any, ...]) -> Account:
    return Account(int(row[0]), str(row[1]), json.loads(row[2]), float(row[3]), float(row[4]))


class Accounts:
    """``router.accounts``: register, look up, search, change and delete accounts; passwords."""

    def __init__(self, db: GlobalDB, clock: Callable[[], float] = time.time, *, fold_plus: bool = False,
                 scrypt: ScryptParams | None = None, min_password_length: int = 8,
                 max_password_bytes: int = 1024) -> None:
        self._db = db
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
        with the same canonical key; :class:`InvalidEmail`, :class:`InvalidPassword` for bad input."""
        key = self.key(email)
        credential = self._hash(self._check_password(password)) if password is not None else None
        document = self._profile_json(profile)
        name_key = text_key(str(profile.get("name", "")))
        now = self.clock()
        try:
            with self._db.write() as conn:
                conn.execute(_I + "INSERT INTO _shardlite_accounts(email, email_key, name_key, profile, created, "
                             "updated) VALUES (?, ?, ?, ?, ?, ?)", (email, key, name_key, document, now, now))
                account_id = int(conn.last_insert_rowid())
                if credential is not None:
                    conn.execute(_I + "INSERT INTO _shardlite_credentials(account_id, scheme, salt, hash, updated) "
                                 "VALUES (?, ?, ?, ?, ?)", (account_id, *credential, now))
        except apsw.ConstraintError as exc:
            if "email_key" in str(exc):
                raise EmailTaken("an account with this e-mail address already exists") from None
            raise
        return account_id

    def get(self, account_id: int) -> Account | None:
        """The account with this id, or None."""
        if not valid_id(account_id):
            return None
        rows = self._db.read(f"SELECT {_COLUMNS} FROM _shardlite_accounts WHERE id = ?", (account_id,))
        return _account(rows[0]) if rows else None

    def by_email(self, email: str) -> Account | None:
        """The account whose address has the same canonical key as ``email``, or None."""
        rows = self._db.read(f"SELECT {_COLUMNS} FROM _shardlite_accounts WHERE email_key = ?", (self.key(email),))
        return _account(rows[0]) if rows else None

    def search(self, text: str, *, limit: int = 20) -> list[Account]:
        """Accounts whose name or address starts with ``text`` (caseless), by name; at most ``limit``."""
        if not isinstance(text, str):
            raise TypeError("search text must be str")
        limit = max(0, min(int(limit), 1000))
        prefix = text_key(text.strip())
        upper = prefix + "\U0010ffff"
        rows = self._db.read(
            f"SELECT {_COLUMNS}, name_key FROM _shardlite_accounts WHERE name_key >= ? AND name_key < ? "
            f"UNION SELECT {_COLUMNS}, name_key FROM _shardlite_accounts WHERE email_key >= ? AND email_key < ? "
            "ORDER BY name_key, id LIMIT ?", (prefix, upper, prefix, upper, limit))
        return [_account(row) for row in rows]

    def update_profile(self, account_id: int, **changes: Any) -> Account:
        """Merge ``changes`` into the profile (a value of None removes the field)."""
        account_id = _require_id(account_id)
        with self._db.write() as conn:
            rows: list[Any] = conn.execute("SELECT profile FROM _shardlite_accounts WHERE id = ?",
                                           (account_id,)).fetchall()
            if not rows:
                raise UnknownAccount(f"no account {account_id!r}")
            profile = json.loads(rows[0][0])
            profile.update(changes)
            profile = {k: v for k, v in profile.items() if v is not None}
            conn.execute(_I + "UPDATE _shardlite_accounts SET profile = ?, name_key = ?, updated = ? WHERE id = ?",
                         (self._profile_json(profile), text_key(str(profile.get("name", ""))), self.clock(),
                          account_id))
        account = self.get(account_id)
        assert account is not None
        return account

    def change_email(self, account_id: int, new_email: str) -> None:
        """Change the address (stored as given). :class:`EmailTaken` if another account has its key."""
        account_id = _require_id(account_id)
        key = self.key(new_email)
        try:
            with self._db.write() as conn:
                conn.execute(_I + "UPDATE _shardlite_accounts SET email = ?, email_key = ?, updated = ? WHERE id = ?",
                             (new_email, key, self.clock(), account_id))
                if conn.changes() == 0:
                    raise UnknownAccount(f"no account {account_id!r}")
        except apsw.ConstraintError as exc:
            if "email_key" in str(exc):
                raise EmailTaken("an account with this e-mail address already exists") from None
            raise

    def delete(self, account_id: int) -> None:
        """Delete the account with its credentials and sessions."""
        account_id = _require_id(account_id)
        with self._db.write() as conn:
            conn.execute(_I + "DELETE FROM _shardlite_accounts WHERE id = ?", (account_id,))
            if conn.changes() == 0:
                raise UnknownAccount(f"no account {account_id!r}")

    def set_password(self, account_id: int, password: str) -> None:
        """Set or replace the account's password."""
        account_id = _require_id(account_id)
        credential = self._hash(self._check_password(password))
        with self._db.write() as conn:
            if not conn.execute("SELECT 1 FROM _shardlite_accounts WHERE id = ?", (account_id,)).fetchall():
                raise UnknownAccount(f"no account {account_id!r}")
            conn.execute(_I + "INSERT INTO _shardlite_credentials(account_id, scheme, salt, hash, updated) "
                         "VALUES (?, ?, ?, ?, ?) ON CONFLICT(account_id) DO UPDATE SET scheme = excluded.scheme, "
                         "salt = excluded.salt, hash = excluded.hash, updated = excluded.updated",
                         (account_id, *credential, self.clock()))

    def has_password(self, account_id: int) -> bool:
        """Whether the account has a password set (False for an unknown id)."""
        if not valid_id(account_id):
            return False
        return bool(self._db.read("SELECT 1 FROM _shardlite_credentials WHERE account_id = ?", (account_id,)))

    def authenticate(self, email: str, password: str) -> int:
        """The account id when ``password`` is right for ``email``; otherwise :class:`AuthenticationFailed`
        (unknown address, no password set, wrong password, malformed input: deliberately the same error)."""
        try:
            key = self.key(email)
            self._check_password(password)
        except (InvalidEmail, InvalidPassword):
            raise AuthenticationFailed("wrong e-mail address or password") from None
        rows = self._db.read(
            "SELECT a.id, c.scheme, c.salt, c.hash FROM _shardlite_accounts a "
            "LEFT JOIN _shardlite_credentials c ON c.account_id = a.id WHERE a.email_key = ?", (key,))
        if not rows or rows[0][1] is None:
            self.scrypt.derive(password, b"\0" * 16)  # same work as a real check: no timing oracle
            raise AuthenticationFailed("wrong e-mail address or password")
        account_id, scheme, salt, stored = rows[0]
        candidate = ScryptParams.parse(str(scheme)).derive(password, bytes(salt))
        if not hmac.compare_digest(candidate, bytes(stored)):
            raise AuthenticationFailed("wrong e-mail address or password")
        return int(account_id)


def upgrade_email_keys(cursor: apsw.Cursor) -> None:
    """Global schema version 6: stored e-mail keys take today's form (the domain's ASCII form, see
    :func:`shardlite.emails.upgrade_email_key`), inside the global DB's upgrade transaction. Two accounts
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

