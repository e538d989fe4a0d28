"""Open pixel and click redirect: ``GET /t/o/<token>`` and ``GET /t/c/<token>``.

A token is opaque (:mod:`kaeru.tracking_tokens`): one that no email carries (forged, altered,
malformed) gets a 404 and records nothing. A click redirects only to a link the email really
contained, looked up from the message log by index; nothing in the request chooses the target.

A token expires ``KAERU_TRACKING_TTL`` after its email was sent: then the pixel still answers
with its GIF (never break a mail client) and a click still redirects, to the shop's home page
(never a 404 for a real shopper), but neither records anything.

Every hit is judged a person's or a machine's (:mod:`kaeru.machine_opens`: Apple Mail Privacy
Protection, link scanners, every link fetched within one second). The first hit of each token
is a touchpoint, and so is its first human hit after a machine one; later ones only count on
its row (``tracking_links.hits``). Each touchpoint's detail says ``machine`` and, for a
machine, ``machine_reason``; the token's row keeps the same (``machine_reason``,
``first_human_at``). The first human open and the first human click of each message become a
stored event in the outbox (``Email Opened`` / ``Email Link Clicked``), as does its first
machine one of each kind (``machine: true``), which the router delivers to the journey that
sent the message; the journey counts machine ones only with ``KAERU_MACHINE_OPENS_COUNT``.

A burst of clicks on every link is only seen at its last link, after its first click (and the
open) were told as human: then their rows and touchpoints are corrected, a verdict event
(``machine_reason: all_links_same_second``) follows them to the journey, which waits a few
seconds before counting a human open or click of a message with two or more links for just
this (workflows/kit.py), and the shopper's own later open and click are told again.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import update
from sqlmodel import Session, col, select

from kaeru.db import session as db_session
from kaeru.machine_opens import (
    ALL_LINKS_SAME_SECOND,
    BURST,
    Ranges,
    burst_of,
    classify,
    in_burst,
    load_ranges,
)
from kaeru.models import EmailMessage, Touchpoint, TrackingLink, utcnow
from kaeru.settings import Settings
from kaeru.touchpoints import record_touchpoint
from kaeru.tracking_tokens import CLICK, OPEN, count_hit, expired, find, signing_key
from starter.deps import ApiError, SettingsDep, router_of
from starter.ingest import insert_events, outbox_row
from starter.limits import limits_of
from workflows.kit import EMAIL_LINK_CLICKED, EMAIL_OPENED

#: A 1×1 transparent GIF.
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
NO_CACHE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0",
    "Pragma": "no-cache",
    "Expires": "0",
}
_MAX_TOKEN = 2048
log = logging.getLogger("kaeru.tracking")

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


def _event_row(
    message: EmailMessage, name: str, extra: dict[str, Any], settings: Settings, round_: str = ""
) -> dict[str, Any]:
    """The stored ``Email Opened`` / ``Email Link Clicked`` event of one message.

    ``extra`` holds ``machine`` and ``machine_reason`` (and a click's ``url`` and ``link``);
    ``round_`` tells apart the events of one message: ``""`` its first human one, ``machine``
    its first machine one, ``burst`` the verdict on a burst of clicks, ``after-burst`` the
    first human one after such a burst.
    """
    kind = "open" if name == EMAIL_OPENED else "click"
    digest = hashlib.sha256(message.key.encode()).hexdigest()[:40]
    message_id = f"kaeru-{kind}-{round_ + '-' if round_ else ''}{digest}"
    now = utcnow()
    properties = {
        "journey_id": message.journey_id,
        "step": message.step,
        "message_key": message.key,
        # The journey judges human ones only once a burst could have shown them a machine's
        # (workflows/kit.py), and counts machine ones only when the shop says so.
        "links": len(message.links),
        "machine_counts": settings.machine_opens_count,
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


_ranges_problem: list[str] = []


def apple_ranges(settings: Settings) -> Ranges:
    """Apple's egress ranges from ``KAERU_APPLE_RANGES_FILE``. A file that is missing or bad
    is said once in the log and read as empty (MPP opens then count as human) rather than
    failing the pixel: a mail client must always get its image."""
    path = settings.resolved_apple_ranges_file
    try:
        return load_ranges(path)
    except (OSError, ValueError) as exc:
        problem = f"{path}: {exc}"
        if problem not in _ranges_problem:
            _ranges_problem.append(problem)
            log.warning(
                "cannot read the Apple egress ranges %s; Apple Mail Privacy Protection opens "
                "count as human until KAERU_APPLE_RANGES_FILE is fixed (kaeru opens "
                "refresh-ranges)",
                problem,
            )
        return Ranges.of([])


def _touch(
    s: Session, message: EmailMessage, kind: str, detail: dict[str, Any], reason: str | None
) -> None:
    record_touchpoint(
        s,
        customer_id=message.customer_id,
        kind="email_opened" if kind == OPEN else "email_clicked",
        journey_id=message.journey_id,
        step=message.step,
        variant=message.variant,
        detail={"message_key": message.key, **detail, "machine": reason is not None}
        | ({"machine_reason": reason} if reason else {}),
    )


def _after_burst(s: Session, message: EmailMessage) -> bool:
    """Whether a burst of clicks was found in ``message`` (its later events get new ids)."""
    found = s.exec(
        select(TrackingLink.digest).where(
            TrackingLink.message_key == message.key,
            TrackingLink.machine_reason == ALL_LINKS_SAME_SECOND,
        )
    ).first()
    return found is not None


def _judge_burst(s: Session, message: EmailMessage, settings: Settings) -> bool:
    """After a link's first hit: if every link of ``message`` was now fetched within one
    second, mark those clicks (and an open fetched with them) machine, take back what they
    counted as human (their touchpoints say so, the message's first human open or click may
    be routed again), and store the verdict for the journey. True if it stored one."""
    # The hits counted above were UPDATE statements: read the rows as they are now.
    query = select(TrackingLink).where(TrackingLink.message_key == message.key)
    rows = list(s.exec(query.execution_options(populate_existing=True)))
    clicks = [r for r in rows if r.kind == CLICK and r.link is not None]
    if any(r.machine_reason == ALL_LINKS_SAME_SECOND for r in clicks):
        return False  # judged already (an old-format token of a link hit in the burst)
    firsts: dict[int, datetime] = {}
    for r in clicks:
        if r.first_hit_at is not None and r.link is not None:
            firsts[r.link] = min(firsts.get(r.link, r.first_hit_at), r.first_hit_at)
    burst = burst_of([firsts.get(i) for i in range(len(message.links))])
    if burst is None:
        return False
    opens = [r for r in rows if r.kind == OPEN]
    human_open = any(in_burst(r.first_human_at, burst) for r in opens)
    for r in clicks + [r for r in opens if in_burst(r.first_hit_at, burst)]:
        r.machine_reason = r.machine_reason or ALL_LINKS_SAME_SECOND
        if r.kind == CLICK or in_burst(r.first_human_at, burst):
            r.first_human_at = None
        s.add(r)
    amended = {"email_clicked"} | ({"email_opened"} if human_open else set())
    touches = s.exec(
        select(Touchpoint).where(
            Touchpoint.customer_id == message.customer_id,
            Touchpoint.journey_id == message.journey_id,
            col(Touchpoint.kind).in_(amended),
        )
    )
    for touch in touches:
        if touch.detail.get("message_key") == message.key and not touch.detail.get("machine"):
            # Touchpoints are never removed; this one's judgement is corrected.
            touch.detail = {
                **touch.detail,
                "machine": True,
                "machine_reason": ALL_LINKS_SAME_SECOND,
            }
            s.add(touch)
    message.first_click_routed = False
    message.first_open_routed = message.first_open_routed and not human_open
    s.add(message)
    extra = {"machine": True, "machine_reason": ALL_LINKS_SAME_SECOND, "burst_open": human_open}
    row = _event_row(message, EMAIL_LINK_CLICKED, extra, settings, "burst")
    return bool(insert_events(s, [row]))


def record_hit(
    settings: Settings,
    keys: list[bytes],
    kind: str,
    text: str,
    *,
    address: str | None = None,
    user_agent: str | None = None,
    at: datetime | None = None,
) -> Hit | None:
    """Record an open or a click in one transaction. None: no such token, message or link.
    Blocking.

    Args:
        address: the client's address (or its IPv6 /64), to tell Apple's proxy.
        user_agent: the request's ``User-Agent``.
        at: when the request arrived (default now): a scanner's burst is judged by when its
            fetches came, not by when a busy server got round to them.
    """
    with db_session(settings.resolved_database_url) as s:
        link_row = find(s, keys, kind, text)
        if link_row is None:
            return None
        # Locked (PostgreSQL) so the hits of one message take turns: a scanner fetches every
        # link at once, and each hit must see the others to find the burst.
        message = s.get(EmailMessage, link_row.message_key, with_for_update=True)
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
        first_of_token = count_hit(s, link_row, at)
        reason = classify(address, user_agent, apple_ranges(settings))
        if reason is None and not first_of_token and _burst_again(s, link_row, at or utcnow()):
            reason = ALL_LINKS_SAME_SECOND
        opened = kind == OPEN
        name = EMAIL_OPENED if opened else EMAIL_LINK_CLICKED
        detail: dict[str, Any] = {} if opened else {"url": url, "link": link_row.link}
        new_event = False
        if reason is not None:
            # Recorded, and told to the journey once per message, which counts it only if
            # KAERU_MACHINE_OPENS_COUNT says so.
            if first_of_token:
                s.execute(
                    update(TrackingLink)
                    .where(col(TrackingLink.digest) == link_row.digest)
                    .values(machine_reason=reason)
                )
                _touch(s, message, kind, detail, reason)
            extra = {**detail, "machine": True, "machine_reason": reason}
            new_event = bool(
                insert_events(s, [_event_row(message, name, extra, settings, "machine")])
            )
        elif _first_human(s, link_row):
            _touch(s, message, kind, detail, None)
            flag = EmailMessage.first_open_routed if opened else EmailMessage.first_click_routed
            first = s.execute(
                update(EmailMessage)
                .where(EmailMessage.key == message.key, flag.is_(False))  # type: ignore[arg-type,attr-defined]
                .values({flag: True})
            )
            if first.rowcount == 1:  # type: ignore[attr-defined]
                round_ = "after-burst" if _after_burst(s, message) else ""
                extra = {**detail, "machine": False, "machine_reason": None}
                row = _event_row(message, name, extra, settings, round_)
                new_event = bool(insert_events(s, [row]))
        if kind == CLICK and first_of_token:
            s.flush()
            s.refresh(message)
            new_event = _judge_burst(s, message, settings) or new_event
        return Hit(new_event=new_event, url=url)


def _burst_again(s: Session, row: TrackingLink, at: datetime) -> bool:
    """Whether this hit is the scanner of a burst found in ``row``'s message fetching again
    while the burst still runs (a person cannot click within it either)."""
    s.refresh(row)
    return (
        row.machine_reason == ALL_LINKS_SAME_SECOND
        and row.first_hit_at is not None
        and at - row.first_hit_at < 2 * BURST
    )


def _first_human(s: Session, row: TrackingLink) -> bool:
    """Claim the token's first human hit (a compare-and-set: of two at once, one is first)."""
    claimed = s.execute(
        update(TrackingLink)
        .where(col(TrackingLink.digest) == row.digest, col(TrackingLink.first_human_at).is_(None))
        .values(first_human_at=utcnow())
    )
    return bool(claimed.rowcount == 1)  # type: ignore[attr-defined]


async def _hit(request: Request, settings: Settings, token_text: str, kind: str) -> Hit:
    arrived = utcnow()
    keys = verifying_keys(request.app.state.signing_key, settings)
    hit = None
    if len(token_text) <= _MAX_TOKEN:
        hit = await run_in_threadpool(
            record_hit,
            settings,
            keys,
            kind,
            token_text,
            address=limits_of(request).client(request.scope),
            user_agent=request.headers.get("user-agent"),
            at=arrived,
        )
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
