"""Tracking tokens for open pixels and click redirects: opaque, expiring, counted.

A token is 22 URL-safe characters: the first 16 bytes of an HMAC-SHA256, under the
link-signing key, of the email's message log key, the kind (open or click) and the link's index.
It carries nothing readable (that key holds the customer id, often an email address);
only the key's holder can make one, and the same send always gets the same tokens, so a
retried send renders the same message. The send registers each token's row in
``tracking_links`` (:class:`kaeru.models.TrackingLink`), keyed by the token's SHA-256, which
names the email and link: a hit is a lookup of that row, so a rotated key breaks no link
already sent, and a copy of the database cannot be replayed as hits. The redirect target is
read from the message log by the link's index, never from the URL.

Why a keyed hash and a row rather than an encryption of the contents: the row is needed
anyway (the hits are counted on it), a 22-character token is shorter than any ciphertext of
a 400-character key, and nothing in it can be decrypted if the key leaks.

Tokens of emails sent before these (``<base64 JSON>.<signature>``, the JSON naming the message
log key) are still read, with the same key or ``KAERU_LEGACY_SECRET_KEY``, until they expire;
their row is made at their first hit.

Every token expires ``KAERU_TRACKING_TTL`` after its email was sent (see
:func:`expired`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import SecretStr
from sqlalchemy import Table, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col

from kaeru.models import AppSecret, EmailMessage, TrackingLink, utcnow

SECRET_NAME = "tracking-link-key"
OPEN = "o"
CLICK = "c"
_TOKEN_BYTES = 16
_SIG_BYTES = 16
_DOMAIN = b"kaeru-tracking-v2"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signing_key(session: Session, configured: SecretStr | None) -> bytes:
    """The link-signing key: ``KAERU_SECRET_KEY`` if set, else one generated once and stored."""
    if configured is not None and configured.get_secret_value():
        return configured.get_secret_value().encode()
    return generated_secret(session, SECRET_NAME)


def generated_secret(session: Session, name: str) -> bytes:
    """The app secret ``name``: generated once (32 random bytes, url-safe) and kept in
    ``app_secrets``; every process uses the first one stored. May commit: call it first."""
    row = session.get(AppSecret, name)
    if row is None:
        # 43 characters: over Settings.min_secret_key_bytes, like a configured key must be.
        session.add(AppSecret(name=name, value=secrets.token_urlsafe(32)))
        try:
            session.commit()
        except Exception:  # another process stored one first: use theirs
            session.rollback()
        row = session.get(AppSecret, name)
        assert row is not None
    return row.value.encode()


# ---- tokens ---------------------------------------------------------------------------------


def token_for(key: bytes, message_key: str, kind: str, link: int | None = None) -> str:
    """The opaque token of one email's open pixel (``link`` None) or of its ``link``-th link."""
    message = b"\0".join(
        (_DOMAIN, message_key.encode(), kind.encode(), b"" if link is None else str(link).encode())
    )
    return _b64(hmac.new(key, message, hashlib.sha256).digest()[:_TOKEN_BYTES])


def digest_of(token: str) -> str:
    """What the database keeps of a token: its SHA-256, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


def open_url(public_url: str, key: bytes, message_key: str) -> str:
    return f"{public_url.rstrip('/')}/t/o/{token_for(key, message_key, OPEN)}"


def click_url(public_url: str, key: bytes, message_key: str, link: int) -> str:
    return f"{public_url.rstrip('/')}/t/c/{token_for(key, message_key, CLICK, link)}"


def _insert(session: Session) -> Any:
    table: Table = TrackingLink.__table__  # type: ignore[attr-defined]
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def _row(digest: str, message_key: str, kind: str, link: int | None, now: datetime) -> Any:
    row: dict[str, Any] = {"digest": digest, "message_key": message_key, "kind": kind}
    row.update(link=link, hits=0, created_at=now)
    return row


def register_tokens(session: Session, key: bytes, message_key: str, links: int) -> None:
    """Store the rows of an email's tokens: its open pixel and its ``links`` links.

    Idempotent (a retried send registers the same tokens again); in ``session``'s transaction.
    """
    now = utcnow()
    rows = [
        _row(digest_of(token_for(key, message_key, kind, link)), message_key, kind, link, now)
        for kind, link in [(OPEN, None), *((CLICK, n) for n in range(links))]
    ]
    session.execute(_insert(session).on_conflict_do_nothing(index_elements=["digest"]), rows)


# ---- reading a hit --------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackingToken:
    """The content of a token in the format of emails sent before opaque tokens."""

    message_key: str
    kind: str  # "o" (open) or "c" (click)
    link: int | None = None


def make_token(key: bytes, token: TrackingToken) -> str:
    """A token in the old, readable format (``<base64 JSON>.<signature>``), as emails sent
    before opaque tokens carry it; kaeru reads these, it no longer sends them."""
    body = [token.message_key, token.kind] + ([token.link] if token.link is not None else [])
    payload = json.dumps(body, separators=(",", ":")).encode()
    signature = hmac.new(key, payload, hashlib.sha256).digest()[:_SIG_BYTES]
    return f"{_b64(payload)}.{_b64(signature)}"


def read_token(key: bytes, text: str) -> TrackingToken | None:
    """An old-format token's content, or None if it is malformed, forged or altered."""
    try:
        payload_text, signature_text = text.split(".")
        payload, signature = _unb64(payload_text), _unb64(signature_text)
    except (ValueError, TypeError):
        return None
    expected = hmac.new(key, payload, hashlib.sha256).digest()[:_SIG_BYTES]
    if not hmac.compare_digest(signature, expected):
        return None
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(body, list) or len(body) not in (2, 3):
        return None
    message_key, kind, *rest = body
    link = rest[0] if rest else None
    if not isinstance(message_key, str) or kind not in (OPEN, CLICK):
        return None
    if (kind == CLICK) != isinstance(link, int) or isinstance(link, bool):
        return None
    return TrackingToken(message_key=message_key, kind=kind, link=link)


def find(session: Session, keys: list[bytes], kind: str, text: str) -> TrackingLink | None:
    """The row of the ``kind`` token ``text`` (opaque, or old-format signed with one of
    ``keys``), or None if there is no such token. An old-format token gets its row here."""
    if "." not in text:
        row = session.get(TrackingLink, digest_of(text))
        return row if row is not None and row.kind == kind else None
    for key in keys:
        old = read_token(key, text)
        if old is None or old.kind != kind:
            continue
        # One row per token, whatever padding or spelling of it the request used.
        digest = digest_of(make_token(key, old))
        values = _row(digest, old.message_key, old.kind, old.link, utcnow())
        session.execute(_insert(session).on_conflict_do_nothing(index_elements=["digest"]), values)
        return session.get(TrackingLink, digest)
    return None


def expired(message: EmailMessage, ttl: timedelta, now: datetime | None = None) -> bool:
    """True once ``ttl`` has passed since ``message`` was sent (or stored, if never confirmed)."""
    return (now or utcnow()) >= (message.sent_at or message.created_at) + ttl


def count_hit(session: Session, row: TrackingLink, at: datetime | None = None) -> bool:
    """Count one hit of ``row``'s token, made ``at`` (default now); True for its first (a
    compare-and-set, so of two first hits at once exactly one is first)."""
    now = at or utcnow()
    first = session.execute(
        update(TrackingLink)
        .where(col(TrackingLink.digest) == row.digest, col(TrackingLink.hits) == 0)
        .values(hits=1, first_hit_at=now, last_hit_at=now)
    )
    if first.rowcount == 1:  # type: ignore[attr-defined]
        return True
    session.execute(
        update(TrackingLink)
        .where(col(TrackingLink.digest) == row.digest)
        .values(hits=col(TrackingLink.hits) + 1, last_hit_at=now)
    )
    return False
