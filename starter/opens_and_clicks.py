"""Open pixel and click redirect: ``GET /t/o/<token>`` and ``GET /t/c/<token>``.

A token is opaque (:mod:`kaeru.tracking_tokens`): one that no email carries (forged, altered,
malformed) gets a 404 and records nothing. A click redirects only to a link the email really
contained, looked up from the message log by index; nothing in the request chooses the target.

A token expires ``KAERU_TRACKING_TTL`` after its email was sent: then the pixel still answers
with its GIF (never break a mail client) and a click still redirects, to the shop's home page
(never a 404 for a real shopper), but neither records anything.

The first hit of each token is a touchpoint; later ones only count on its row
(``tracking_links.hits``). The first open and the first click of each message also become a
stored event in the outbox (``Email Opened`` / ``Email Link Clicked``), which the router
delivers to the journey that sent the message.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import update

from kaeru.db import session as db_session
from kaeru.models import EmailMessage, utcnow
from kaeru.settings import Settings
from kaeru.touchpoints import record_touchpoint
from kaeru.tracking_tokens import CLICK, OPEN, count_hit, expired, find, signing_key
from starter.deps import ApiError, SettingsDep, router_of
from starter.ingest import insert_events, outbox_row
from workflows.kit import EMAIL_LINK_CLICKED, EMAIL_OPENED

#: A 1×1 transparent GIF.
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
NO_CACHE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0",
    "Pragma": "no-cache",
    "Expires": "0",
}
_MAX_TOKEN = 2048

router = APIRouter(tags=["tracking"])


def load_signing_key(settings: Settings) -> bytes:
    """The link-signing key (``KAERU_SECRET_KEY`` or the one kept in the database). Blocking."""
    with db_session(settings.resolved_database_url) as s:
        return signing_key(s, settings.secret_key)


def verifying_keys(signing: bytes, settings: Settings) -> list[bytes]:
    """The keys that verify old-format tokens: the signing key, then
    ``KAERU_LEGACY_SECRET_KEY`` if set (opaque tokens need no key to be read)."""
    legacy = settings.legacy_secret_key.get_secret_value() if settings.legacy_secret_key else ""
    return [signing] + ([legacy.encode()] if legacy else [])  # never an empty key: forgeable


@dataclass(frozen=True)
class Hit:
    """What a valid tracking hit found. ``url`` is set for a click; ``expired`` hits record
    nothing."""

    new_event: bool
    url: str | None = None
    expired: bool = False


def _event_row(message: EmailMessage, name: str, extra: dict[str, Any]) -> dict[str, Any]:
    kind = "open" if name == EMAIL_OPENED else "click"
    digest = hashlib.sha256(message.key.encode()).hexdigest()[:40]
    message_id = f"kaeru-{kind}-{digest}"
    now = utcnow()
    properties = {
        "journey_id": message.journey_id,
        "step": message.step,
        "message_key": message.key,
        **extra,
    }
    payload = {
        "type": "track",
        "event": name,
        "userId": message.customer_id,
        "messageId": message_id,
        "timestamp": now.isoformat(),
        "properties": properties,
    }
    return outbox_row(
        message_id=message_id,
        customer_id=message.customer_id,
        event_type="track",
        name=name,
        payload=payload,
        timestamp=now,
        received_at=now,
    )


def record_hit(settings: Settings, keys: list[bytes], kind: str, text: str) -> Hit | None:
    """Record an open or a click in one transaction. None: no such token, message or link.
    Blocking."""
    with db_session(settings.resolved_database_url) as s:
        link_row = find(s, keys, kind, text)
        if link_row is None:
            return None
        message = s.get(EmailMessage, link_row.message_key)
        if message is None:
            return None
        url: str | None = None
        if kind == CLICK:
            if link_row.link is None or not 0 <= link_row.link < len(message.links):
                return None
            url = message.links[link_row.link]
            if not url.startswith(("https://", "http://")):
                return None
        if expired(message, settings.tracking_ttl):
            s.rollback()  # an old-format token's first hit made its row: keep nothing
            return Hit(new_event=False, url=settings.shop_url if url else None, expired=True)
        if not count_hit(s, link_row):
            return Hit(new_event=False, url=url)
        opened = kind == OPEN
        record_touchpoint(
            s,
            customer_id=message.customer_id,
            kind="email_opened" if opened else "email_clicked",
            journey_id=message.journey_id,
            step=message.step,
            detail={"message_key": message.key}
            | ({} if opened else {"url": url, "link": link_row.link}),
        )
        flag = EmailMessage.first_open_routed if opened else EmailMessage.first_click_routed
        first = s.execute(
            update(EmailMessage)
            .where(EmailMessage.key == message.key, flag.is_(False))  # type: ignore[arg-type,attr-defined]
            .values({flag: True})
        )
        new_event = first.rowcount == 1  # type: ignore[attr-defined]
        if new_event:
            name = EMAIL_OPENED if opened else EMAIL_LINK_CLICKED
            extra = {} if opened else {"url": url, "link": link_row.link}
            insert_events(s, [_event_row(message, name, extra)])
        return Hit(new_event=new_event, url=url)


async def _hit(request: Request, settings: Settings, token_text: str, kind: str) -> Hit:
    keys = verifying_keys(request.app.state.signing_key, settings)
    hit = None
    if len(token_text) <= _MAX_TOKEN:
        hit = await run_in_threadpool(record_hit, settings, keys, kind, token_text)
    if hit is None:
        raise ApiError(404, "not_found", "no such tracking link")
    if hit.new_event:
        router_of(request).wake()
    return hit


@router.get(
    "/t/o/{token}",
    response_class=Response,
    responses={200: {"content": {"image/gif": {}}, "description": "a 1×1 transparent GIF"}},
    summary="Email open pixel",
)
async def open_pixel(token: str, request: Request, settings: SettingsDep) -> Response:
    await _hit(request, settings, token, OPEN)
    return Response(PIXEL, media_type="image/gif", headers=NO_CACHE)


@router.get(
    "/t/c/{token}",
    response_class=RedirectResponse,
    status_code=302,
    summary="Email link click: redirects to the link the email contained",
)
async def click(token: str, request: Request, settings: SettingsDep) -> RedirectResponse:
    hit = await _hit(request, settings, token, CLICK)
    assert hit.url is not None
    return RedirectResponse(hit.url, status_code=302, headers=NO_CACHE)
