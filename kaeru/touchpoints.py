"""Touchpoints: one append-only row per touch, the ground truth of the analytics.

Every touch is one row: its customer, its journey (id and kind), step, variant, channel, time,
and a value in integer minor units with its currency. The kinds (README, "Touchpoints"):
``email_sent``, ``email_delivered``, ``email_opened``, ``email_clicked``, ``email_bounced``,
``audience_joined``, ``audience_left``, ``ad_clicked``, ``coupon_issued``,
``coupon_redeemed``, ``coupon_refused``, ``purchase`` (every stored order), ``conversion``
(a journey's own credited purchase), and the offline ``visit`` and ``contact`` of
``kaeru touchpoints import``.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlmodel import Session, select

from kaeru.journeys import kind_of_workflow_id
from kaeru.models import Touchpoint, utcnow
from kaeru.settings import Settings

#: The channels of kaeru's own touches.
EMAIL = "email"
ADS = "ads"
#: An online purchase or visit whose event names no channel.
WEB = "web"


def channel_of(stated: Any, *, trusted: bool, offline: Collection[str]) -> str:
    """The channel of an event's touch: its ``context.channel`` (``stated``), else ``web``.

    A name that is not a channel name (:meth:`Settings.is_channel_name`, after trimming and
    lower-casing) reads as ``web``, so a dashboard never shows junk as a channel. An
    ``offline`` channel (``KAERU_OFFLINE_CHANNELS``) counts only from a ``trusted`` (server
    key) event: a shopper's browser cannot claim a purchase in the store.
    """
    if not isinstance(stated, str):
        return WEB
    name = stated.strip().lower()
    if not Settings.is_channel_name(name) or (name in offline and not trusted):
        return WEB
    return name


def record_touchpoint(
    session: Session,
    *,
    customer_id: str,
    kind: str,
    key: str | None = None,
    journey_id: str | None = None,
    journey_kind: str | None = None,
    step: str | None = None,
    variant: str | None = None,
    channel: str | None = None,
    occurred_at: datetime | None = None,
    order_id: str | None = None,
    value_minor: int | None = None,
    currency: str | None = None,
    coupon_code: str | None = None,
    detail: dict[str, Any] | None = None,
) -> Touchpoint:
    """Add a touchpoint in ``session``'s transaction. With ``key``, a second call adds nothing.

    Without ``journey_kind``, the kind is read from ``journey_id`` (:func:`kind_of_workflow_id`),
    so a touch of a journey always says which kind of journey it belongs to.
    """
    if journey_kind is None and journey_id is not None:
        journey_kind = kind_of_workflow_id(journey_id)
    if key is not None:
        existing = session.exec(select(Touchpoint).where(Touchpoint.key == key)).first()
        if existing is not None:
            return existing
    row = Touchpoint(
        key=key,
        customer_id=customer_id,
        journey_id=journey_id,
        journey_kind=journey_kind,
        step=step,
        variant=variant,
        channel=channel,
        kind=kind,
        occurred_at=occurred_at or utcnow(),
        order_id=order_id,
        value_minor=value_minor,
        currency=currency,
        coupon_code=coupon_code,
        detail=detail or {},
    )
    session.add(row)
    session.flush()
    return row


#: Length of ``touchpoints.coupon_code``; kaeru's own codes are 16 characters.
COUPON_CODE_MAX = 64


def purchase_key(order_id: str) -> str:
    """The key of an order's ``purchase`` touchpoint: one per stored order (order ids are
    unique in ``orders``)."""
    return f"purchase/{order_id}"


def record_purchase(
    session: Session,
    *,
    customer_id: str,
    order_id: str,
    value_minor: int,
    currency: str,
    coupon_code: str | None,
    channel: str,
    occurred_at: datetime,
    offline: bool,
    detail: dict[str, Any] | None = None,
) -> Touchpoint:
    """Add the ``purchase`` touchpoint of a stored order (once per order, by its key).

    A coupon code longer than the column (not one of kaeru's) is kept whole in the detail
    rather than failing the order's transaction. ``offline``: ``channel`` is a store channel
    (``KAERU_OFFLINE_CHANNELS``), said in the detail for readers who do not know the setting.
    """
    more = dict(detail or {})
    if coupon_code is not None and len(coupon_code) > COUPON_CODE_MAX:
        more["coupon"], coupon_code = coupon_code, None
    if offline:
        more["offline"] = True
    return record_touchpoint(
        session,
        customer_id=customer_id,
        kind="purchase",
        key=purchase_key(order_id),
        channel=channel,
        occurred_at=occurred_at,
        order_id=order_id,
        value_minor=value_minor,
        currency=currency,
        coupon_code=coupon_code,
        detail=more,
    )
