"""The consent API (server write key): read and change a customer's marketing consent.

``PUT /v1/customers/{id}/consent`` with ``{"channel": "email", "subscribed": false, "kind":
null}`` records the change (source ``api``); an unsubscribe reaches the customer's running
journeys at once (a ``Marketing Consent Withdrawn`` event, :mod:`starter.consent_changes`).
``GET`` answers the state per channel and the history. The browser key opens neither: it is
public, and consent is the shopper's word, which only the shop's server may pass on.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from sqlmodel import col, select

from kaeru.commerce import MAX_ID_LENGTH
from kaeru.consent import CHANNELS, UNKNOWN, consent_of
from kaeru.db import session
from kaeru.journeys import registry
from kaeru.models import ConsentChange
from kaeru.settings import Settings
from starter.consent_changes import record_consent_change
from starter.deps import (
    BROWSER,
    WRONG_KEY,
    ApiError,
    SettingsDep,
    basic_auth_user,
    key_source,
    router_of,
    unauthorized,
)
from starter.events import ErrorBody

#: Most history rows ``GET`` answers (the newest).
MAX_HISTORY = 500


async def require_server_key(request: Request, settings: SettingsDep) -> None:
    """HTTP Basic auth with the server write key (``KAERU_WRITE_KEY``) as user name."""
    user = basic_auth_user(request)
    if user is None:
        raise unauthorized("send the server write key (KAERU_WRITE_KEY) as the Basic auth user")
    source = await key_source(request, user)
    if source is None:
        raise unauthorized(WRONG_KEY)
    if source == BROWSER:
        raise ApiError(
            403,
            "forbidden",
            "the browser write key is public and may not read or change consent: call this "
            "from the shop's server with KAERU_WRITE_KEY",
        )


ServerKey = Depends(require_server_key)

router = APIRouter(
    prefix="/v1",
    tags=["consent"],
    dependencies=[ServerKey],
    responses={
        400: {"model": ErrorBody, "description": "a bad body: the message names the field"},
        401: {"model": ErrorBody, "description": "missing or wrong write key"},
        403: {"model": ErrorBody, "description": "the browser write key may not do this"},
    },
)


class ConsentUpdate(BaseModel):
    """A change of consent: a channel, or one journey kind on it (``kind``)."""

    model_config = ConfigDict(extra="forbid")

    channel: Literal["email", "sms", "push"] = Field("email", description="the channel")
    subscribed: StrictBool = Field(description="true: subscribed; false: unsubscribed")
    kind: str | None = Field(
        None,
        max_length=100,
        description="a journey kind (cart-abandonment...): only that kind; null: the channel",
    )


class ChannelConsent(BaseModel):
    channel: str
    state: str = Field(description="subscribed, unsubscribed or unknown")
    source: str | None
    kinds_off: list[str]
    changed_at: datetime | None


class ConsentChangePublic(BaseModel):
    channel: str
    state: str
    kind: str | None
    source: str
    detail: str | None
    changed_at: datetime


class ConsentPublic(BaseModel):
    customer_id: str
    channels: list[ChannelConsent]
    history: list[ConsentChangePublic] = Field(description="oldest first, the newest 500")


class ConsentChanged(BaseModel):
    customer_id: str
    changed: bool = Field(description="false: the consent already was so")
    consent: ChannelConsent


def _checked_id(customer_id: str) -> str:
    if not customer_id.strip() or len(customer_id) > MAX_ID_LENGTH:
        raise ApiError(
            400,
            "invalid_customer_id",
            f"the customer id must be 1 to {MAX_ID_LENGTH} characters (the userId or "
            "anonymousId the shop sends)",
        )
    return customer_id


def _channel(settings: Settings, customer_id: str, channel: str) -> ChannelConsent:
    with session(settings.resolved_database_url) as s:
        row = consent_of(s, customer_id, channel)
    if row is None:
        return ChannelConsent(
            channel=channel, state=UNKNOWN, source=None, kinds_off=[], changed_at=None
        )
    return ChannelConsent(
        channel=channel,
        state=row.state,
        source=row.source,
        kinds_off=list(row.kinds_off),
        changed_at=row.changed_at,
    )


def _consent(settings: Settings, customer_id: str) -> ConsentPublic:
    with session(settings.resolved_database_url) as s:
        rows = s.exec(
            select(ConsentChange)
            .where(ConsentChange.customer_id == customer_id)
            .order_by(col(ConsentChange.changed_at).desc(), col(ConsentChange.id).desc())
            .limit(MAX_HISTORY)
        ).all()
    history = [
        ConsentChangePublic(
            channel=r.channel,
            state=r.state,
            kind=r.kind,
            source=r.source,
            detail=r.detail,
            changed_at=r.changed_at,
        )
        for r in reversed(rows)
    ]
    return ConsentPublic(
        customer_id=customer_id,
        channels=[_channel(settings, customer_id, channel) for channel in CHANNELS],
        history=history,
    )


@router.get("/customers/{customer_id:path}/consent", response_model=ConsentPublic)
async def read_consent(customer_id: str, settings: SettingsDep) -> ConsentPublic:
    """The customer's consent on every channel (``unknown``: never said), and its history."""
    return await asyncio.to_thread(_consent, settings, _checked_id(customer_id))


@router.put("/customers/{customer_id:path}/consent", response_model=ConsentChanged)
async def update_consent(
    customer_id: str, body: ConsentUpdate, request: Request, settings: SettingsDep
) -> ConsentChanged:
    """Subscribe or unsubscribe the customer (source ``api``); an unsubscribe ends their
    running marketing journeys of that channel (or kind) before their next step."""
    customer_id = _checked_id(customer_id)
    if body.kind is not None:
        try:
            registry().route(body.kind)
        except KeyError:
            kinds = ", ".join(route.kind for route in registry().routes)
            raise ApiError(
                400,
                "invalid_kind",
                f"kind {body.kind[:100]!r} is no journey kind: use one of {kinds}, or null "
                "for the whole channel",
            ) from None
    changed = await asyncio.to_thread(
        record_consent_change,
        settings,
        customer_id,
        body.channel,
        body.subscribed,
        "api",
        kind=body.kind,
    )
    if changed and not body.subscribed:
        router_of(request).wake()
    consent = await asyncio.to_thread(_channel, settings, customer_id, body.channel)
    return ConsentChanged(customer_id=customer_id, changed=changed, consent=consent)
