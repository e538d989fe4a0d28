"""Operator accounts and managed write keys: made, listed and revoked by the CLI
(``kaeru operators``, ``kaeru keys``), checked by the API through :class:`CredentialCache`.

Secrets are random (32 bytes from :mod:`secrets`) and shown once, when made; the database keeps
only their SHA-256. A slow password hash (scrypt) protects secrets that people choose, which a
leaked hash lets an attacker guess; a 256-bit random secret cannot be guessed from its hash,
and SHA-256 lets the API find a key by its hash with one dictionary look-up on every event,
where scrypt would cost tens of milliseconds of CPU per request.

``KAERU_WRITE_KEY``, ``KAERU_BROWSER_WRITE_KEY`` and ``KAERU_OPERATOR_TOKEN`` keep working
beside these; the operator token is the bootstrap operator, named :data:`BOOTSTRAP`.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from kaeru import audit
from kaeru.db import session
from kaeru.models import OperatorAccount, WriteKey, utcnow

Role = Literal["read-only", "operator"]
READ_ONLY: Role = "read-only"
OPERATOR: Role = "operator"
ROLES: tuple[Role, ...] = (READ_ONLY, OPERATOR)

KeyKind = Literal["server", "browser"]

#: The name of the bootstrap operator, ``KAERU_OPERATOR_TOKEN`` (actor ``api:operator``).
BOOTSTRAP = "operator"

#: What each secret starts with, so a leaked one is recognised (and scanners can find it).
OPERATOR_TOKEN_PREFIX = "kaeru_op_"
KEY_PREFIXES: dict[KeyKind, str] = {"server": "kaeru_sk_", "browser": "kaeru_bk_"}
#: Characters of a key kept in clear to tell keys apart (its kind's prefix and 7 random ones).
SHOWN = 16

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class CredentialError(Exception):
    """A name that is taken, unknown or not allowed: the message says what to do."""


def digest(secret: str) -> str:
    """The hex SHA-256 kept for ``secret``."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _checked_name(name: str, what: str) -> str:
    if not NAME.fullmatch(name):
        raise CredentialError(
            f"{what} name {name!r} is not allowed: use 1 to 64 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        )
    return name


# ---- operators -------------------------------------------------------------------------------


def add_operator(
    database_url: str, name: str, role: Role, actor: str
) -> tuple[OperatorAccount, str]:
    """Make an account; returns it and its token (shown once, never kept)."""
    _checked_name(name, "an operator")
    if name == BOOTSTRAP:
        raise CredentialError(
            f"{BOOTSTRAP!r} names KAERU_OPERATOR_TOKEN in the audit log: choose another name"
        )
    if role not in ROLES:
        raise CredentialError(f"there is no role {role!r}: choose {' or '.join(ROLES)}")
    token = OPERATOR_TOKEN_PREFIX + secrets.token_urlsafe(32)
    account = OperatorAccount(name=name, role=role, token_hash=digest(token), created_by=actor)
    try:
        with session(database_url) as s:
            s.add(account)
    except IntegrityError as exc:
        raise CredentialError(
            f"there is already an operator {name!r} (a revoked one keeps its name): choose "
            "another name"
        ) from exc
    audit.record(database_url, actor, "operator.add", name, {"role": role})
    return account, token


def operators(database_url: str) -> Sequence[OperatorAccount]:
    """Every account, revoked ones too, oldest first."""
    with session(database_url) as s:
        return list(s.exec(select(OperatorAccount).order_by(col(OperatorAccount.id))).all())


def revoke_operator(database_url: str, name: str, actor: str) -> OperatorAccount:
    with session(database_url) as s:
        account = s.exec(select(OperatorAccount).where(OperatorAccount.name == name)).first()
        if account is None:
            raise CredentialError(
                f"there is no operator {name!r}: `kaeru operators list` shows them"
            )
        if account.revoked_at is not None:
            raise CredentialError(f"operator {name!r} was already revoked at {account.revoked_at}")
        account.revoked_at = utcnow()
        s.add(account)
    audit.record(database_url, actor, "operator.revoke", name, {"role": account.role})
    return account


# ---- write keys ------------------------------------------------------------------------------


def create_key(database_url: str, name: str, kind: KeyKind, actor: str) -> tuple[WriteKey, str]:
    """Make a write key; returns it and the key (shown once, never kept)."""
    _checked_name(name, "a key")
    key = KEY_PREFIXES[kind] + secrets.token_urlsafe(32)
    row = WriteKey(name=name, kind=kind, key_hash=digest(key), prefix=key[:SHOWN], created_by=actor)
    try:
        with session(database_url) as s:
            s.add(row)
    except IntegrityError as exc:
        raise CredentialError(
            f"there is already a key {name!r} (a revoked one keeps its name): choose another "
            "name, e.g. with the date"
        ) from exc
    detail = {"kind": kind, "prefix": row.prefix}
    audit.record(database_url, actor, "write_key.create", name, detail)
    return row, key


def keys(database_url: str) -> Sequence[WriteKey]:
    """Every managed key, revoked ones too, oldest first."""
    with session(database_url) as s:
        return list(s.exec(select(WriteKey).order_by(col(WriteKey.id))).all())


def revoke_key(database_url: str, name: str, actor: str) -> WriteKey:
    with session(database_url) as s:
        row = s.exec(select(WriteKey).where(WriteKey.name == name)).first()
        if row is None:
            raise CredentialError(f"there is no key {name!r}: `kaeru keys list` shows them")
        if row.revoked_at is not None:
            raise CredentialError(f"key {name!r} was already revoked at {row.revoked_at}")
        row.revoked_at = utcnow()
        s.add(row)
    audit.record(
        database_url, actor, "write_key.revoke", name, {"kind": row.kind, "prefix": row.prefix}
    )
    return row


# ---- what the API checks ---------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    """Who an operator token belongs to."""

    name: str
    role: Role
    #: The token's SHA-256 (it keys the account's dashboard cookie), "" for the bootstrap one.
    token_hash: str = ""

    @property
    def actor(self) -> str:
        """The audit log's actor for what this account does through the API."""
        return f"api:{self.name}"


@dataclass(frozen=True)
class Credentials:
    """The unrevoked keys and accounts of the database at one moment."""

    #: Key hash → kind.
    keys: dict[str, KeyKind] = field(default_factory=dict)
    #: Token hash → account.
    operators: dict[str, Account] = field(default_factory=dict)

    @property
    def has_server_key(self) -> bool:
        return "server" in self.keys.values()

    def operator_named(self, name: str) -> Account | None:
        for account in self.operators.values():
            if account.name == name:
                return account
        return None


def load_credentials(database_url: str) -> Credentials:
    with session(database_url) as s:
        key_rows = s.exec(select(WriteKey).where(col(WriteKey.revoked_at).is_(None))).all()
        accounts = s.exec(
            select(OperatorAccount).where(col(OperatorAccount.revoked_at).is_(None))
        ).all()
    return Credentials(
        keys={k.key_hash: "browser" if k.kind == "browser" else "server" for k in key_rows},
        operators={
            a.token_hash: Account(
                a.name, OPERATOR if a.role == OPERATOR else READ_ONLY, a.token_hash
            )
            for a in accounts
        },
    )


class CredentialCache:
    """The database's keys and accounts, read again once ``ttl`` seconds old
    (``KAERU_CREDENTIALS_CACHE_TTL``): a revoke reaches every API process within that time."""

    def __init__(self, database_url: str, ttl: float) -> None:
        self.database_url = database_url
        self.ttl = ttl
        self._credentials: Credentials | None = None
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()

    def _fresh(self) -> Credentials | None:
        if self._credentials is not None and time.monotonic() - self._loaded_at < self.ttl:
            return self._credentials
        return None

    def peek(self) -> Credentials | None:
        """What was last read, however old (None before the first read): for what may lag,
        such as which rate limit applies; never for letting a key in."""
        return self._credentials

    async def current(self) -> Credentials:
        """The credentials, read from the database (off the event loop) when stale."""
        found = self._fresh()
        if found is not None:
            return found
        async with self._lock:
            found = self._fresh()
            if found is None:
                found = await asyncio.to_thread(load_credentials, self.database_url)
                self._credentials, self._loaded_at = found, time.monotonic()
            return found
