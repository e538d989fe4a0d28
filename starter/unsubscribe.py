"""The unsubscribe link of every marketing email: ``/u/<token>`` (RFC 8058).

- ``POST`` with the body ``List-Unsubscribe=One-Click`` (urlencoded or multipart, as mail
  providers send it from the ``List-Unsubscribe-Post`` header) unsubscribes the customer from
  marketing email at once: no cookie, no login, no redirect; the answer is a short text.
- ``GET`` shows the preference page: unsubscribe from all marketing email, or from this kind of
  message only (the journey that sent it), or subscribe again. A GET never changes anything:
  link scanners and mail previews fetch every link of a message.
- ``POST`` of the page's form (a ``choice`` field: ``all``, ``kind`` or ``resubscribe``)
  applies the choice and shows the page again, saying what changed.

The token (:mod:`kaeru.unsubscribe_tokens`) names the message, whose log row names the
customer and the journey. Every change goes through
:func:`starter.consent_changes.record_consent_change`: an unsubscribe stores a ``Marketing
Consent Withdrawn`` event with it, which the router (woken here) delivers to every running
journey of the customer, and the send gate refuses marketing to them from then on. Repeating
a request changes nothing more. A malformed, altered or forged token gets a 400 page that says
so. These routes take no key (a shopper clicks them) and are rate-limited per client address
like the tracking links (:mod:`starter.limits`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.types import Message

from activities.email.addresses import mask_address
from kaeru.consent import EMAIL, UNSUBSCRIBED, consent_of
from kaeru.db import session as db_session
from kaeru.journeys import registry
from kaeru.settings import Settings
from kaeru.unsubscribe_tokens import find, journey_kind, verifying_keys
from starter.consent_changes import record_consent_change
from starter.deps import SettingsDep, router_of

#: The body of an RFC 8058 one-click unsubscribe.
ONE_CLICK = ("List-Unsubscribe", "One-Click")
#: The page's choices (the form's ``choice`` field).
ALL, KIND, RESUBSCRIBE = "all", "kind", "resubscribe"
#: The largest form body read (a one-click body is 26 bytes; the page's form a few more).
MAX_FORM = 8 * 1024
#: The link holds the token: no page it leads to may learn it, frame it or keep a copy.
HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}

router = APIRouter(tags=["unsubscribe"])

_PAGES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


@dataclass(frozen=True)
class Recipient:
    """Whom a valid token names, and where their consent stands."""

    customer_id: str
    message_id: str
    address: str  #: masked (``a***@example.com``)
    kind: str | None  #: the journey kind that sent the message, if kaeru still knows it
    label: str | None  #: that journey's name for people
    unsubscribed: bool
    kind_off: bool


def _kinds() -> dict[str, str]:
    return {route.kind: route.label for route in registry().routes}


def recipient(settings: Settings, keys: list[bytes], token: str) -> Recipient | None:
    """The customer the token names, or None (forged, altered, or its email gone). Blocking."""
    with db_session(settings.resolved_database_url) as s:
        message = find(s, keys, token)
        if message is None:
            return None
        kinds = _kinds()
        kind = journey_kind(message.journey_id, list(kinds))
        consent = consent_of(s, message.customer_id, EMAIL)
        return Recipient(
            customer_id=message.customer_id,
            message_id=message.message_id,
            address=mask_address(message.to_address),
            kind=kind,
            label=kinds.get(kind) if kind else None,
            unsubscribed=consent is not None and consent.state == UNSUBSCRIBED,
            kind_off=consent is not None and kind is not None and kind in consent.kinds_off,
        )


def apply_choice(settings: Settings, who: Recipient, choice: str, source: str) -> bool:
    """Record ``choice`` for ``who``; True when it stored a withdrawal (wake the router).
    Blocking."""
    detail = f"unsubscribe link of message {who.message_id}"
    if choice == ALL:
        return record_consent_change(settings, who.customer_id, EMAIL, False, source, detail=detail)
    if choice == KIND:
        return record_consent_change(
            settings, who.customer_id, EMAIL, False, source, kind=who.kind, detail=detail
        )
    # Subscribing again takes back both: the channel, and this kind if it was off.
    if who.kind_off:
        record_consent_change(
            settings, who.customer_id, EMAIL, True, source, kind=who.kind, detail=detail
        )
    record_consent_change(settings, who.customer_id, EMAIL, True, source, detail=detail)
    return False


def _page(settings: Settings, status: int, **values: Any) -> HTMLResponse:
    shop = {"name": settings.shop_name, "url": settings.shop_url}
    context = {"shop": shop, "shop_address": settings.shop_address.strip() or None, **values}
    html = _PAGES.get_template("preferences.html.j2").render(context)
    return HTMLResponse(html, status_code=status, headers=HEADERS)


def _invalid(settings: Settings) -> HTMLResponse:
    return _page(
        settings,
        400,
        who=None,
        notice=None,
        problem=(
            "This unsubscribe link is not valid: it may have been cut short or changed when it "
            "was copied. Open the link from the email itself (the whole link), or use the one "
            "in a more recent email from us."
        ),
    )


async def _recipient(request: Request, settings: Settings, token: str) -> Recipient | None:
    keys = verifying_keys(request.app.state.signing_key, settings.secret_key_previous)
    return await run_in_threadpool(recipient, settings, keys, token)


class _BadForm(Exception):
    """The body is too large or not a readable form."""


async def _form(request: Request) -> tuple[FormData, bytes]:
    """The request's form (urlencoded or multipart, files refused) and its raw body, read up
    to :data:`MAX_FORM` bytes."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise _BadForm(f"the form is over {MAX_FORM} bytes")
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    try:
        form = await Request(request.scope, replay).form(
            max_files=0, max_fields=20, max_part_size=MAX_FORM
        )
    except (MultiPartException, HTTPException, ValueError) as exc:
        raise _BadForm(f"the form cannot be read ({getattr(exc, 'detail', exc)})") from exc
    return form, bytes(body)


def _one_click(form: Mapping[str, Any], body: bytes) -> bool:
    name, value = ONE_CLICK
    # A sender that states no form type still means it when the body is exactly that.
    return form.get(name) == value or body.strip() == f"{name}={value}".encode()


@router.get(
    "/u/{token}",
    response_class=HTMLResponse,
    summary="Unsubscribe link: the shopper's email preference page",
)
async def preferences(token: str, request: Request, settings: SettingsDep) -> Response:
    who = await _recipient(request, settings, token)
    if who is None:
        return _invalid(settings)
    return _page(settings, 200, who=who, notice=None, problem=None)


@router.post(
    "/u/{token}",
    summary="One-click unsubscribe (RFC 8058), or the preference page's choice",
    responses={200: {"content": {"text/plain": {}, "text/html": {}}}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                media: {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "List-Unsubscribe": {"type": "string", "enum": ["One-Click"]},
                            "choice": {"type": "string", "enum": [ALL, KIND, RESUBSCRIBE]},
                        },
                    }
                }
                for media in ("application/x-www-form-urlencoded", "multipart/form-data")
            },
        }
    },
)
async def unsubscribe(token: str, request: Request, settings: SettingsDep) -> Response:
    try:
        form, body = await _form(request)
    except _BadForm as exc:
        return PlainTextResponse(
            f"{exc}: post List-Unsubscribe=One-Click to unsubscribe",
            status_code=400,
            headers=HEADERS,
        )
    one_click = _one_click(form, body)
    who = await _recipient(request, settings, token)
    if who is None:
        if one_click:
            return PlainTextResponse(
                "This unsubscribe link is not valid (cut short or changed); nothing was changed.",
                status_code=400,
                headers=HEADERS,
            )
        return _invalid(settings)
    if one_click:
        if await run_in_threadpool(apply_choice, settings, who, ALL, "one_click"):
            router_of(request).wake()
        return PlainTextResponse(
            f"You are unsubscribed: {settings.shop_name} sends you no more marketing email.",
            headers=HEADERS,
        )
    choice = form.get("choice")
    if choice not in (ALL, KIND, RESUBSCRIBE) or (choice == KIND and who.kind is None):
        return _page(
            settings,
            400,
            who=who,
            notice=None,
            problem="Please choose one of the buttons below.",
        )
    if await run_in_threadpool(apply_choice, settings, who, choice, "preference_page"):
        router_of(request).wake()
    notice = {
        ALL: f"Done: you get no more marketing email from {settings.shop_name}.",
        KIND: f"Done: you get no more “{who.label}” emails. Other emails still arrive.",
        RESUBSCRIBE: f"Welcome back: you get {settings.shop_name}'s emails again.",
    }[str(choice)]
    after = await _recipient(request, settings, token)
    return _page(settings, 200, who=after or who, notice=notice, problem=None)
