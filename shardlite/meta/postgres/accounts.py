"""Accounts and credentials in PostgreSQL: :class:`PgAccounts` and :class:`PgCredentials`, the
:class:`~shardlite.meta.accounts.AccountStore` and :class:`~shardlite.meta.accounts.CredentialStore` on
``shardlite.accounts`` and ``shardlite.credentials``.

How each rule of the contract is kept without SQLite's one-writer lock (inventory F8):

* E-mail uniqueness is the constraint ``accounts_email_key``; a ``unique_violation`` naming it (the
  server's ``constraint_name`` field, never message text) is :class:`~shardlite.EmailTaken`. Concurrent
  creators of one key wait on the first one's index entry and then violate it.
* Ids come from the identity sequence, which never hands a value out twice (not after a rollback, a delete or
  :meth:`PgAccounts.clear`); :meth:`PgAccounts.import_rows` moves it past the imported ids.
* :meth:`PgAccounts.update_profile` reads under ``SELECT ... FOR UPDATE``, so no other write to the account
  comes between its read and its write.
* "The account exists" of a credential (or session) is its foreign key: the server checks it under a key
  share lock on the account row, so a concurrent delete either comes first (the insert violates
  ``credentials_account_id_fkey``: :class:`~shardlite.UnknownAccount`) or waits and then cascades.
* Deletes cascade by the schema's ``ON DELETE CASCADE``.
* Deadlocks and serialization failures are retried by :func:`.txn.retrying`.

The accounts are the database's, not a root's: roots sharing one database share one account space, as they
share one tenant key space (the schema has no root column on ``accounts``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from ...errors import EmailTaken, UnknownAccount
from ...front.accounts import Account
from ..accounts import (
    ACCOUNT_COLUMNS,
    CREDENTIAL_COLUMNS,
    KEPT,
    SESSION_COLUMNS,
    AccountRows,
    AccountStore,
    Credential,
    CredentialStore,
    Login,
    ProfileMerge,
    checked_account,
    checked_credential,
    checked_rows,
    refuse_nul,
    without_present,
)
from .connect import Pool
from .txn import constraint_of, retrying

__all__ = ["PgAccounts", "PgCredentials", "EMAIL_CONSTRAINT", "ACCOUNT_FOREIGN_KEYS", "SESSION_HINTS",
           "digest_hint", "account_hint", "ALL_HINT"]

#: The channel of session hints: every write that ends sessions (a revoke, a rotation, an account deleted,
#: the rows replaced) NOTIFYs it in its own transaction, so a cache of live sessions in any process drops
#: them (:mod:`.session_cache`). Payloads: ``d:<digest hex>``, ``a:<account id>``, or :data:`ALL_HINT`.
SESSION_HINTS = "shardlite_sessions"
#: The hint that every cached session may have changed.
ALL_HINT = "*"


def digest_hint(digest: bytes) -> str:
    return "d:" + digest.hex()


def account_hint(account_id: int) -> str:
    return f"a:{account_id}"

#: The unique constraint that decides e-mail uniqueness (schema step 1).
EMAIL_CONSTRAINT = "accounts_email_key"
#: The primary key of accounts: violated only when an imported id meets an id the sequence handed out
#: concurrently (then a create simply takes the next value).
_ACCOUNT_PKEY = "accounts_pkey"
_ID_ATTEMPTS = 4
#: The foreign keys to an account (PostgreSQL's default names for the schema's REFERENCES clauses).
ACCOUNT_FOREIGN_KEYS = frozenset({"credentials_account_id_fkey", "sessions_account_id_fkey"})

_COLUMNS = "id, email, profile, created, updated"
_SEQUENCE = "SELECT pg_get_serial_sequence('shardlite.accounts', 'id')"
_TABLES = ("_shardlite_accounts", "_shardlite_credentials", "_shardlite_sessions")


def _account(row: Sequence[Any]) -> Account:
    return Account(int(row[0]), str(row[1]), json.loads(row[2]), float(row[3]), float(row[4]))


def email_taken(exc: psycopg.Error) -> bool:
    return isinstance(exc, psycopg.errors.UniqueViolation) and constraint_of(exc) == EMAIL_CONSTRAINT


def unknown_account(exc: psycopg.Error) -> bool:
    return isinstance(exc, psycopg.errors.ForeignKeyViolation) and constraint_of(exc) in ACCOUNT_FOREIGN_KEYS


def _taken() -> EmailTaken:
    return EmailTaken("an account with this e-mail address already exists")


class PgAccounts:
    """``meta.accounts`` on PostgreSQL (see :class:`~shardlite.meta.accounts.AccountStore` and the module doc).
    ``hint(payload)`` runs after each write that ends sessions (this process's session cache; other
    processes get the same payload by NOTIFY)."""

    def __init__(self, pool: Pool, hint: Callable[[str], None] | None = None) -> None:
        self._pool = pool
        self._hint = hint or (lambda payload: None)

    def create(self, email: str, email_key: str, name_key: str, profile: str, now: float,
               credential: Credential | None = None) -> int:
        checked_account(email, email_key, name_key, profile)
        if credential is not None:
            checked_credential(credential)

        def unit() -> int:
            with self._pool.connection() as conn, conn.transaction():
                row = conn.execute(
                    "INSERT INTO shardlite.accounts(email, email_key, name_key, profile, created, updated) "
                    "VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                    (email, email_key, name_key, profile, now, now)).fetchone()
                assert row is not None
                account_id = int(row[0])
                if credential is not None:
                    conn.execute("INSERT INTO shardlite.credentials(account_id, scheme, salt, hash, updated) "
                                 "VALUES (%s, %s, %s, %s, %s)", (account_id, *credential, now))
                return account_id

        for attempt in range(1, _ID_ATTEMPTS + 1):
            try:
                return retrying(unit)
            except psycopg.errors.UniqueViolation as exc:
                if email_taken(exc):
                    raise _taken() from None
                if constraint_of(exc) != _ACCOUNT_PKEY or attempt == _ID_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def get(self, account_id: int) -> Account | None:
        with self._pool.connection() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM shardlite.accounts WHERE id = %s", (account_id,)).fetchone()
        return _account(row) if row else None

    def by_email_key(self, email_key: str) -> Account | None:
        if "\0" in email_key:
            return None  # no stored key holds one
        with self._pool.connection() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM shardlite.accounts WHERE email_key = %s",
                               (email_key,)).fetchone()
        return _account(row) if row else None

    def search(self, prefix: str, limit: int) -> list[Account]:
        if "\0" in prefix or limit <= 0:
            return []
        upper = prefix + "\U0010ffff"
        # name_key and email_key are COLLATE "C": the ranges and the order are code-point order
        with self._pool.connection() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM shardlite.accounts WHERE (name_key >= %s AND name_key < %s) "
                "OR (email_key >= %s AND email_key < %s) ORDER BY name_key, id LIMIT %s",
                (prefix, upper, prefix, upper, limit)).fetchall()
        return [_account(row) for row in rows]

    def update_profile(self, account_id: int, merge: ProfileMerge, now: float) -> Account:
        def unit() -> Account:
            with self._pool.connection() as conn, conn.transaction():
                row = conn.execute(f"SELECT {_COLUMNS} FROM shardlite.accounts WHERE id = %s FOR UPDATE",
                                   (account_id,)).fetchone()
                if row is None:
                    raise UnknownAccount(f"no account {account_id!r}")
                document, name_key = merge(json.loads(row[2]))
                refuse_nul(name_key, "name")
                refuse_nul(document, "profile")
                conn.execute("UPDATE shardlite.accounts SET profile = %s, name_key = %s, updated = %s WHERE id = %s",
                             (document, name_key, now, account_id))
            return Account(account_id, str(row[1]), json.loads(document), float(row[3]), now)

        return retrying(unit)

    def change_email(self, account_id: int, email: str, email_key: str, now: float) -> None:
        refuse_nul(email, "address", email=True)
        refuse_nul(email_key, "address key", email=True)

        def unit() -> int:
            with self._pool.connection() as conn:
                return conn.execute("UPDATE shardlite.accounts SET email = %s, email_key = %s, updated = %s "
                                    "WHERE id = %s", (email, email_key, now, account_id)).rowcount

        try:
            changed = retrying(unit)
        except psycopg.errors.UniqueViolation as exc:
            if email_taken(exc):
                raise _taken() from None
            raise
        if changed == 0:
            raise UnknownAccount(f"no account {account_id!r}")

    def delete(self, account_id: int) -> None:
        def unit() -> int:
            with self._pool.connection() as conn:  # credentials and sessions go by ON DELETE CASCADE
                return conn.execute("WITH gone AS (DELETE FROM shardlite.accounts WHERE id = %s RETURNING id) "
                                    "SELECT pg_notify(%s, %s) FROM gone",
                                    (account_id, SESSION_HINTS, account_hint(account_id))).rowcount

        try:
            deleted = retrying(unit)
        finally:
            self._hint(account_hint(account_id))
        if deleted == 0:
            raise UnknownAccount(f"no account {account_id!r}")

    # -- restore (cold) -----------------------------------------------------------------------------------

    def has_rows(self) -> bool:
        with self._pool.connection() as conn:
            row = conn.execute("SELECT EXISTS (SELECT 1 FROM shardlite.accounts) "
                               "OR EXISTS (SELECT 1 FROM shardlite.sessions)").fetchone()
        return bool(row and row[0])

    def clear(self) -> None:
        def unit() -> None:
            with self._pool.connection() as conn, conn.transaction():
                for table in ("sessions", "credentials", "accounts"):  # the identity sequence is kept
                    conn.execute(f"DELETE FROM shardlite.{table}")
                conn.execute("SELECT pg_notify(%s, %s)", (SESSION_HINTS, ALL_HINT))

        try:
            retrying(unit)
        finally:
            self._hint(ALL_HINT)

    def import_rows(self, rows: AccountRows, *, keep_existing: bool = False) -> dict[str, int]:
        checked_rows(rows)
        given, kept = rows, 0
        columns = {table: ", ".join(names) for table, names in
                   (("accounts", ACCOUNT_COLUMNS), ("credentials", CREDENTIAL_COLUMNS), ("sessions", SESSION_COLUMNS))}

        def upsert(table: str, names: Sequence[str]) -> str:
            updates = ", ".join(f"{name} = excluded.{name}" for name in names[1:])
            return (f"INSERT INTO shardlite.{table}({columns[table]}) VALUES ({', '.join('%s' for _ in names)}) "
                    f"ON CONFLICT ({names[0]}) DO UPDATE SET {updates}")

        def unit() -> None:
            nonlocal rows, kept
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                rows, kept = given, 0
                if keep_existing:
                    # the rows read here stay as they are until the commit: the same rows' locks
                    cur.execute("SELECT id, email_key FROM shardlite.accounts WHERE id = ANY(%s) OR "
                                "email_key = ANY(%s) FOR UPDATE", ([row[0] for row in given.accounts],
                                                                    [row[2] for row in given.accounts]))
                    rows, kept = without_present(given, cur.fetchall())
                for row in rows.accounts:
                    # as SQLite's INSERT OR REPLACE: the row with this id and the row with this e-mail key go,
                    # with their credentials and sessions (ON DELETE CASCADE), then the imported row comes in
                    if not keep_existing:  # kept: no row to replace (one that came since fails the insert)
                        cur.execute("DELETE FROM shardlite.accounts WHERE id = %s OR email_key = %s",
                                    (row[0], row[2]))
                    cur.execute(f"INSERT INTO shardlite.accounts({columns['accounts']}) "
                                f"VALUES ({', '.join('%s' for _ in ACCOUNT_COLUMNS)})", row)
                if rows.accounts:
                    top = max(int(row[0]) for row in rows.accounts)
                    # past every imported id, never back: nextval first (it cannot go back), then setval only
                    # when the imported id is further (values handed out meanwhile are below the new mark)
                    cur.execute(f"SELECT CASE WHEN %s > nextval(({_SEQUENCE})) THEN setval(({_SEQUENCE}), %s) END",
                                (top, top))
                if rows.credentials:
                    cur.executemany(upsert("credentials", CREDENTIAL_COLUMNS), rows.credentials)
                if rows.sessions:
                    cur.executemany(upsert("sessions", SESSION_COLUMNS), rows.sessions)
                cur.execute("SELECT pg_notify(%s, %s)", (SESSION_HINTS, ALL_HINT))

        try:
            retrying(unit)
        except psycopg.errors.ForeignKeyViolation as exc:
            if unknown_account(exc):
                raise UnknownAccount("a credential or session to import names an account that does not exist; "
                                     "nothing was imported") from None
            raise
        except psycopg.errors.UniqueViolation as exc:
            if keep_existing and email_taken(exc):  # an account with an imported e-mail key came meanwhile
                raise EmailTaken("an imported account's e-mail key was taken by an account registered while the "
                                 "import ran; nothing was imported: run it again") from None
            raise
        finally:
            self._hint(ALL_HINT)
        copied = dict(zip(_TABLES, (len(rows.accounts), len(rows.credentials), len(rows.sessions)), strict=True))
        return copied | ({KEPT: kept} if keep_existing else {})


class PgCredentials:
    """``meta.credentials`` on PostgreSQL (see :class:`~shardlite.meta.accounts.CredentialStore` and the
    module doc)."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    def set(self, account_id: int, credential: Credential, now: float) -> None:
        checked_credential(credential)

        def unit() -> None:
            # one statement: the upsert, and the foreign key's check that the account exists (under a key
            # share lock on it, so a concurrent delete is either before, and we fail, or after, and cascades)
            with self._pool.connection() as conn:
                conn.execute("INSERT INTO shardlite.credentials(account_id, scheme, salt, hash, updated) "
                             "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (account_id) DO UPDATE SET "
                             "scheme = excluded.scheme, salt = excluded.salt, hash = excluded.hash, "
                             "updated = excluded.updated", (account_id, *credential, now))

        try:
            retrying(unit)
        except psycopg.errors.ForeignKeyViolation as exc:
            if unknown_account(exc):
                raise UnknownAccount(f"no account {account_id!r}") from None
            raise

    def has(self, account_id: int) -> bool:
        with self._pool.connection() as conn:
            return conn.execute("SELECT 1 FROM shardlite.credentials WHERE account_id = %s",
                                (account_id,)).fetchone() is not None

    def for_login(self, email_key: str) -> Login | None:
        if "\0" in email_key:
            return None
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT a.id, c.scheme, c.salt, c.hash FROM shardlite.accounts a "
                "LEFT JOIN shardlite.credentials c ON c.account_id = a.id WHERE a.email_key = %s",
                (email_key,)).fetchone()
        if row is None:
            return None
        account_id, scheme, salt, stored = row
        if scheme is None:
            return Login(int(account_id), None)
        return Login(int(account_id), Credential(str(scheme), bytes(salt), bytes(stored)))


def _conforms(accounts: PgAccounts, credentials: PgCredentials) -> tuple[AccountStore, CredentialStore]:
    return accounts, credentials  # mypy checks here that both satisfy their contracts
