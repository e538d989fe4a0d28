"""Unsubscribe tokens: the ``/u/<token>`` link of every marketing email (RFC 8058).

A token is 22 URL-safe characters: the first 16 bytes of an HMAC-SHA256 of the email's message
log key, under a key derived from the link-signing key (:func:`kaeru.tracking_tokens.signing_key`:
``KAERU_SECRET_KEY``, or the one generated and kept in the database; no second secret). The
send stores a row for it in ``tracking_links`` (kind ``u``, keyed by the token's SHA-256) naming
the message; the message log row names the customer and the journey (hence its kind). So the
token carries nothing readable (the message key holds the customer id, often an email
address), and a changed byte finds no row.

Why a keyed hash and a row rather than the contents in clear or encrypted: the customer id may
be an email address, so it cannot travel in clear; a ciphertext of a 400-character key is long
in a header and readable to whoever gets the key, a hash is not. The row costs one more row per
marketing email beside its open pixel's.

A token never expires: an unsubscribe link must work for as long as someone keeps the email
(years). It is checked against the key that signed it at every use: under the current key, or
``KAERU_SECRET_KEY_PREVIOUS`` during a rotation. Links signed with a key that is neither stop
working, so keep the previous key set for as long as the emails sent under it matter (CAN-SPAM
asks at least 30 days after a send; months are kinder).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from pydantic import SecretStr
from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from kaeru.models import EmailMessage, TrackingLink, utcnow
from kaeru.tracking_tokens import digest_of

#: ``tracking_links.kind`` of an unsubscribe token's row.
UNSUBSCRIBE = "u"
#: Where the link lives on ``KAERU_PUBLIC_URL``.
PATH = "/u/"
_DOMAIN = b"kaeru-unsubscribe-v1"
_TOKEN_BYTES = 16
_TOKEN_LENGTH = 22  # 16 bytes in URL-safe base64, unpadded
_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _derived(link_key: bytes) -> bytes:
    """The unsubscribe key: its own key, so no unsubscribe token is ever a tracking token."""
    return hmac.new(link_key, _DOMAIN, hashlib.sha256).digest()


def token_for(link_key: bytes, message_key: str) -> str:
    """The unsubscribe token of the email logged under ``message_key``: the same at every send
    attempt, so a retried send carries the same link."""
    mac = hmac.new(_derived(link_key), message_key.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:_TOKEN_BYTES]).rstrip(b"=").decode()


def unsubscribe_url(public_url: str, link_key: bytes, message_key: str) -> str:
    return f"{public_url.rstrip('/')}{PATH}{token_for(link_key, message_key)}"


def verifying_keys(link_key: bytes, previous: SecretStr | None) -> list[bytes]:
    """The keys a token may be signed with: the link-signing key, then
    ``KAERU_SECRET_KEY_PREVIOUS`` if set (never an empty key: it would verify anything)."""
    old = previous.get_secret_value().encode() if previous is not None else b""
    return [link_key] + ([old] if old and old != link_key else [])


def register(session: Session, link_key: bytes, message_key: str) -> None:
    """Store the row of the email's unsubscribe token, in ``session``'s transaction.

    Idempotent: a retried send registers the same token again.
    """
    table: Table = TrackingLink.__table__  # type: ignore[attr-defined]
    dialect = session.get_bind().dialect.name
    insert: Any = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
    row = {
        "digest": digest_of(token_for(link_key, message_key)),
        "message_key": message_key,
        "kind": UNSUBSCRIBE,
        "link": None,
        "hits": 0,
        "created_at": utcnow(),
    }
    session.execute(insert.on_conflict_do_nothing(index_elements=["digest"]), row)


def well_formed(token: str) -> bool:
    """True if ``token`` could be a token (22 URL-safe base64 characters)."""
    return len(token) == _TOKEN_LENGTH and set(token) <= _ALPHABET


def find(session: Session, keys: list[bytes], token: str) -> EmailMessage | None:
    """The email whose unsubscribe token ``token`` is, if one of ``keys`` signed it; None for a
    malformed, altered or forged token, or one whose email is no longer logged."""
    if not well_formed(token):
        return None
    row = session.get(TrackingLink, digest_of(token))
    if row is None or row.kind != UNSUBSCRIBE:
        return None
    if not any(hmac.compare_digest(token_for(key, row.message_key), token) for key in keys):
        return None
    return session.get(EmailMessage, row.message_key)


def journey_kind(journey_id: str, kinds: list[str]) -> str | None:
    """The kind of the journey ``journey_id`` (``<kind>-<customer id>``) among ``kinds``; the
    longest that fits, as one kind may begin another (``welcome``, ``welcome-back``)."""
    fitting = [kind for kind in kinds if journey_id.startswith(f"{kind}-")]
    return max(fitting, key=len, default=None)
