"""Open pixel and click redirect: ``GET /t/o/<token>`` and ``GET /t/c/<token>``.

A token is signed (:mod:`kaeru.tracking`): a forged, altered or malformed one gets a 404 and
records nothing. A click redirects only to a link the email really contained, looked up from
the email outbox by index; nothing in the request chooses the target.

Every hit is a touchpoint; the first open and the first click of each message also become an
event in the outbox (``Email Opened`` / ``Email Link Clicked``), which the router delivers to
the journey that sent the message.
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
from kaeru.journal import record_touchpoint
from kaeru.models import EmailMessage, utcnow
from kaeru.settings import Settings
from kaeru.tracking import TrackingToken, read_token, signing_key
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


@dataclass(frozen=True)
class Hit:
    """What a valid tracking hit found. ``url`` is set for a click."""

    new_event: bool
    url: str | None = None


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


def record_hit(settings: Settings, token: TrackingToken) -> Hit | None:
    """Record an open or a click in one transaction. None: no such message or link. Blocking."""
    with db_session(settings.resolved_database_url) as s:
        message = s.get(EmailMessage, token.message_key)
        if message is None:
            return None
        url: str | None = None
        if token.kind == "c":
            assert token.link is not None
            if not 0 <= token.link < len(message.links):
                return None
            url = message.links[token.link]
            if not url.startswith(("https://", "http://")):
                return None
        opened = token.kind == "o"
        record_touchpoint(
            s,
            customer_id=message.customer_id,
            kind="email_opened" if opened else "email_clicked",
            journey_id=message.journey_id,
            step=message.step,
            detail={"message_key": message.key}
            | ({} if opened else {"url": url, "link": token.link}),
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
            insert_events(
                s, [_event_row(message, name, {} if opened else {"url": url, "link": token.link})]
            )
        return Hit(new_event=new_event, url=url)


async def _hit(request: Request, settings: Settings, token_text: str, kind: str) -> Hit:
    key: bytes = request.app.state.signing_key
    token = read_token(key, token_text) if len(token_text) <= _MAX_TOKEN else None
    if token is None or token.kind != kind:
        raise ApiError(404, "not_found", "no such tracking link")
    hit = await run_in_threadpool(record_hit, settings, token)
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
    await _hit(request, settings, token, "o")
    return Response(PIXEL, media_type="image/gif", headers=NO_CACHE)


@router.get(
    "/t/c/{token}",
    response_class=RedirectResponse,
    status_code=302,
    summary="Email link click: redirects to the link the email contained",
)
async def click(token: str, request: Request, settings: SettingsDep) -> RedirectResponse:
    hit = await _hit(request, settings, token, "c")
    assert hit.url is not None
    return RedirectResponse(hit.url, status_code=302, headers=NO_CACHE)
