"""Signed tracking tokens for open pixels and click redirects.

A token names an email (its outbox key) and, for a click, the index of a link the email
really contained; the redirect target is looked up from the outbox, never read from the URL.
Tokens are HMAC-SHA256 signed with a key that survives restarts (settings or database).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

from pydantic import SecretStr
from sqlmodel import Session

from kaeru.models import AppSecret

SECRET_NAME = "tracking-link-key"
_SIG_BYTES = 16


@dataclass(frozen=True)
class TrackingToken:
    message_key: str
    kind: str  # "o" (open) or "c" (click)
    link: int | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signing_key(session: Session, configured: SecretStr | None) -> bytes:
    """The link-signing key: ``KAERU_SECRET_KEY`` if set, else one generated once and stored."""
    if configured is not None and configured.get_secret_value():
        return configured.get_secret_value().encode()
    row = session.get(AppSecret, SECRET_NAME)
    if row is None:
        session.add(AppSecret(name=SECRET_NAME, value=secrets.token_urlsafe(32)))
        try:
            session.commit()
        except Exception:  # another process stored one first: use theirs
            session.rollback()
        row = session.get(AppSecret, SECRET_NAME)
        assert row is not None
    return row.value.encode()


def make_token(key: bytes, token: TrackingToken) -> str:
    body = [token.message_key, token.kind] + ([token.link] if token.link is not None else [])
    payload = json.dumps(body, separators=(",", ":")).encode()
    signature = hmac.new(key, payload, hashlib.sha256).digest()[:_SIG_BYTES]
    return f"{_b64(payload)}.{_b64(signature)}"


def read_token(key: bytes, text: str) -> TrackingToken | None:
    """The token's content, or None if it is malformed, forged or altered."""
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
    if not isinstance(message_key, str) or kind not in ("o", "c"):
        return None
    if (kind == "c") != isinstance(link, int) or isinstance(link, bool):
        return None
    return TrackingToken(message_key=message_key, kind=kind, link=link)


def open_url(public_url: str, key: bytes, message_key: str) -> str:
    return f"{public_url.rstrip('/')}/t/o/{make_token(key, TrackingToken(message_key, 'o'))}"


def click_url(public_url: str, key: bytes, message_key: str, link: int) -> str:
    return f"{public_url.rstrip('/')}/t/c/{make_token(key, TrackingToken(message_key, 'c', link))}"
