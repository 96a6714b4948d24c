"""The contract of account and credential rows: :class:`AccountStore` and :class:`CredentialStore`.

The backend stores rows; the policy stays in :mod:`shardlite.front.accounts` (e-mail canonicalisation, the
profile document, the name key, scrypt hashing computed *before* any write). Common rules of every method
here (rule: global uniqueness is decided by a constraint, and the common rules of :mod:`shardlite.meta`):

* Each method is one atomic unit: it commits whole or writes nothing.
* Reads see committed data only.
* **Uniqueness of the e-mail key is decided by the backend's unique constraint** on it, never by a read
  before the write; the backend recognises a violation by the constraint's identity (its name, or the
  column it guards), not by the text of the caller's message, and raises
  :class:`~shardlite.EmailTaken`. Concurrent creators of one key (threads, processes) end with exactly one
  account; every other gets :class:`~shardlite.EmailTaken` and nothing of theirs is written.
* **Ids are never reused**: an id, once given out, is never given to another account, also after the
  account is deleted and after rows are imported with explicit ids (the counter moves past them).
* **Keys compare in code-point order** (SQLite's BINARY collation; PostgreSQL needs ``COLLATE "C"`` on
  ``name_key`` and ``email_key``, whatever the database's locale).
* **No NUL** (U+0000) in stored text: PostgreSQL cannot store it. A write carrying one is refused before
  anything is written (:class:`~shardlite.InvalidEmail` for the address and its key,
  :class:`ValueError` for any other text); a lookup by a key holding one finds nothing.
* Account ids passed in are ints in ``1 .. 2**63 - 1`` (the policy checks them, :func:`shardlite.front.accounts.
  valid_id`); a backend may assume so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from ..errors import EmailTaken, InvalidEmail

if TYPE_CHECKING:
    from ..front.accounts import Account

__all__ = ["checked_account", "checked_credential",
           "AccountStore", "CredentialStore", "Credential", "Login", "AccountRows", "ProfileMerge",
           "ACCOUNT_COLUMNS", "CREDENTIAL_COLUMNS", "SESSION_COLUMNS", "refuse_nul", "checked_rows",
           "without_present", "KEPT"]

#: The columns of an account row as :meth:`AccountStore.import_rows` takes it (and as a backup keeps it).
ACCOUNT_COLUMNS = ("id", "email", "email_key", "name_key", "profile", "created", "updated")
#: The columns of a credential row.
CREDENTIAL_COLUMNS = ("account_id", "scheme", "salt", "hash", "updated")
#: The columns of a session row.
SESSION_COLUMNS = ("token_hash", "account_id", "created", "expires", "idle_ttl", "last_seen", "revoked")

#: ``merge(profile) -> (document, name_key)``: given the stored profile (parsed), the new profile document
#: (JSON text) and its name key. It runs inside the backend's atomic unit (a backend may call it again on a
#: retry: keep it pure); whatever it raises propagates, and nothing is written.
ProfileMerge = Callable[[dict[str, Any]], tuple[str, str]]


class Credential(NamedTuple):
    """A password credential: the scheme (``scrypt:n=..,r=..,p=..``), the salt and the derived hash."""

    scheme: str
    salt: bytes
    hash: bytes


class Login(NamedTuple):
    """What a login checks: the account found by e-mail key and its credential (None: no password set)."""

    account_id: int
    credential: Credential | None


class AccountRows(NamedTuple):
    """Rows to import (a checked backup copy), each a tuple in the order of :data:`ACCOUNT_COLUMNS`,
    :data:`CREDENTIAL_COLUMNS` and :data:`SESSION_COLUMNS`."""

    accounts: Sequence[tuple[Any, ...]]
    credentials: Sequence[tuple[Any, ...]]
    sessions: Sequence[tuple[Any, ...]]


def refuse_nul(value: str, what: str, *, email: bool = False) -> str:
    """``value`` if it holds no NUL; else :class:`~shardlite.InvalidEmail` (``email``) or
    :class:`ValueError`, naming ``what`` (never the value: it may be personal data)."""
    if "\0" in value:
        if email:
            raise InvalidEmail(f"invalid e-mail address: the {what} contains U+0000, which cannot be stored")
        raise ValueError(f"the {what} contains U+0000 (NUL), which cannot be stored")
    return value


_TEXT, _BYTES, _NUMBER, _INT = "text", "bytes", "number", "int"
_KINDS = {
    "accounts": (_INT, _TEXT, _TEXT, _TEXT, _TEXT, _NUMBER, _NUMBER),
    "credentials": (_INT, _TEXT, _BYTES, _BYTES, _NUMBER),
    "sessions": (_BYTES, _INT, _NUMBER, _NUMBER, _NUMBER + "?", _NUMBER, _NUMBER + "?"),
}


def checked_account(email: str, email_key: str, name_key: str, profile: str) -> None:
    """Refuse (as :func:`refuse_nul` does) an account row whose text PostgreSQL could not store."""
    refuse_nul(email, "address", email=True)
    refuse_nul(email_key, "address key", email=True)
    refuse_nul(name_key, "name")
    refuse_nul(profile, "profile")


def checked_credential(credential: Credential) -> None:
    refuse_nul(credential.scheme, "password scheme")


def _fits(value: object, kind: str) -> bool:
    if kind.endswith("?"):
        if value is None:
            return True
        kind = kind[:-1]
    if kind == _TEXT:
        return isinstance(value, str) and "\0" not in value
    if kind == _BYTES:
        return isinstance(value, bytes)
    if kind == _INT:
        return type(value) is int and 0 < value <= 2**63 - 1
    return type(value) in (int, float)


def checked_rows(rows: AccountRows) -> AccountRows:
    """``rows`` when every row has its table's width and every value its column's type (text without NUL,
    bytes, an id in range, a number; ``idle_ttl`` and ``revoked`` may be None); else :class:`ValueError`
    naming the table and row number. Every backend's :meth:`AccountStore.import_rows` calls it first."""
    for table, found in zip(("accounts", "credentials", "sessions"), rows, strict=True):
        kinds = _KINDS[table]
        for number, row in enumerate(found, 1):
            if len(row) != len(kinds) or not all(_fits(v, k) for v, k in zip(row, kinds, strict=True)):
                raise ValueError(f"row {number} of {table} does not have the columns' types "
                                 "(text without NUL, bytes, ids, numbers)")
    return rows


#: The key of :meth:`AccountStore.import_rows`'s result that counts the accounts kept (``keep_existing``).
KEPT = "_shardlite_accounts_kept"


def without_present(rows: AccountRows, present: Sequence[Sequence[Any]]) -> tuple[AccountRows, int]:
    """The policy of ``import_rows(..., keep_existing=True)``, pure: ``rows`` without the accounts whose id
    is among ``present`` (the store's ``(id, email_key)`` rows whose id or e-mail key an imported account
    has), nor their credentials and sessions; and how many accounts were left out. An imported account
    whose e-mail key belongs to a present account of another id raises :class:`~shardlite.EmailTaken`
    (naming ids only, never addresses)."""
    ids = {int(row[0]) for row in present}
    owners = {str(row[1]): int(row[0]) for row in present}
    for row in rows.accounts:
        owner = owners.get(str(row[2]))
        if owner is not None and owner != row[0] and row[0] not in ids:
            raise EmailTaken(f"the imported account {row[0]} has the e-mail key of account {owner}, which the "
                             "account space already holds; nothing was imported (restore into a metadata "
                             "database of its own, or delete or rename one of the two accounts first)")
    accounts = [row for row in rows.accounts if row[0] not in ids]
    return (AccountRows(accounts, [row for row in rows.credentials if row[0] not in ids],
                        [row for row in rows.sessions if row[1] not in ids]), len(rows.accounts) - len(accounts))


class AccountStore(Protocol):
    """Account rows (``meta.accounts``). See the module doc for the rules every method keeps."""

    def create(self, email: str, email_key: str, name_key: str, profile: str, now: float,
               credential: Credential | None = None) -> int:
        """Insert an account (``email`` as given, its ``email_key``, ``name_key``, ``profile`` as JSON text,
        ``created = updated = now``) and, when given, its credential, in one atomic unit; returns the new
        id, larger than every id given out before on this store. :class:`~shardlite.EmailTaken` when an
        account has ``email_key`` (by the constraint: nothing written)."""
        ...

    def get(self, account_id: int) -> Account | None:
        """The account with this id, or None."""
        ...

    def by_email_key(self, email_key: str) -> Account | None:
        """The account whose e-mail key is ``email_key`` (exact match), or None."""
        ...

    def search(self, prefix: str, limit: int) -> list[Account]:
        """Accounts whose ``name_key`` or ``email_key`` lies in ``[prefix, prefix + U+10FFFF)`` (they start
        with ``prefix``), each once, ordered by ``(name_key, id)`` in code-point order; at most ``limit``
        (``0 <= limit``)."""
        ...

    def update_profile(self, account_id: int, merge: ProfileMerge, now: float) -> Account:
        """Atomic read-modify-write of the profile: read the stored profile, ``merge`` it, write the new
        document and name key with ``updated = now``, with no other write to this account in between
        (SQLite: under BEGIN IMMEDIATE; PostgreSQL: ``SELECT ... FOR UPDATE``). Returns the account as
        written. :class:`~shardlite.UnknownAccount` when there is no such account (``merge`` not called)."""
        ...

    def change_email(self, account_id: int, email: str, email_key: str, now: float) -> None:
        """Set the address and its key (``updated = now``). :class:`~shardlite.UnknownAccount` when there is
        no such account; :class:`~shardlite.EmailTaken` when another account has ``email_key`` (nothing
        written). Setting an account's own key again is allowed."""
        ...

    def delete(self, account_id: int) -> None:
        """Delete the account with its credential and every one of its sessions, in one atomic unit.
        :class:`~shardlite.UnknownAccount` when there is no such account. Its id is never given out again."""
        ...

    # -- restore (cold) -----------------------------------------------------------------------------------

    def has_rows(self) -> bool:
        """True when the store holds any account or any session."""
        ...

    def clear(self) -> None:
        """Delete every session, credential and account (one atomic unit; the id counter is kept: ids
        stay never reused)."""
        ...

    def import_rows(self, rows: AccountRows, *, keep_existing: bool = False) -> dict[str, int]:
        """Insert ``rows`` (checked first with :func:`checked_rows`: :class:`ValueError`, nothing written)
        in one atomic unit, replacing a row with the same primary key (id, account id, digest) and, for
        accounts, a row with the same e-mail key. The id counter moves past every imported id. Returns
        the rows imported per table (``_shardlite_accounts``, ``_shardlite_credentials``,
        ``_shardlite_sessions``). A credential or session whose account is in neither ``rows`` nor the
        store is refused (:class:`~shardlite.UnknownAccount`, nothing written).

        ``keep_existing=True`` (a restore into an account space other roots share, whose rows are newer
        than a backup's): the store's accounts win. An imported account whose id the store holds is not
        imported, nor are its credential and sessions (a backup's session may have been revoked since);
        one whose e-mail key belongs to a stored account of another id raises
        :class:`~shardlite.EmailTaken` (nothing written). The check and the insert are one atomic unit
        (:func:`without_present`); the result also counts the accounts kept (:data:`KEPT`)."""
        ...


class CredentialStore(Protocol):
    """Password credentials (``meta.credentials``), at most one per account; deleted with the account."""

    def set(self, account_id: int, credential: Credential, now: float) -> None:
        """Set or replace the account's credential (``updated = now``), atomically with the check that the
        account exists: :class:`~shardlite.UnknownAccount` when it does not (nothing written)."""
        ...

    def has(self, account_id: int) -> bool:
        """Whether the account has a credential (False for an unknown account)."""
        ...

    def for_login(self, email_key: str) -> Login | None:
        """The account whose e-mail key is ``email_key`` with its credential (None when it has none), read
        together (one statement: a login never pairs an account with another's credential); None when no
        account has the key."""
        ...
