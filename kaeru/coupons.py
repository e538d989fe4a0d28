"""Coupon codes of the local coupon provider, and their redemption by an order.

A core module: ingestion redeems an order's coupon here, in its own transaction, and the
``issue_coupon`` activity (:mod:`activities.coupons`) draws its codes here.
"""

from __future__ import annotations

import secrets
from datetime import datetime

from sqlalchemy import update
from sqlmodel import Session, col, select

from kaeru.models import Coupon, Touchpoint
from kaeru.touchpoints import WEB, record_touchpoint

PREFIX = "KAERU-"
#: No 0/O, 1/I/L: a code read aloud or typed from a phone is typed right the first time.
ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
CODE_LENGTH = 10


def new_code() -> str:
    """A fresh random code such as ``KAERU-7QXH2MZK4P`` (31**10, about 8e14, possibilities)."""
    return PREFIX + "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))


def normalise_code(code: str) -> str:
    """The stored form of a code as a shopper may type it (spaces, lower case)."""
    return code.strip().upper()


def redeem_coupon(
    s: Session, code: str, order_id: str, at: datetime, *, customer_id: str, channel: str = WEB
) -> Coupon | None:
    """Mark coupon ``code`` redeemed by ``order_id`` of ``customer_id``, in ``s``'s transaction.

    Idempotent for the same order: a re-delivered ``Order Completed`` finds it already
    redeemed by that order and gets it back. Safe against two orders racing for one code: the
    update is conditional, so exactly one of them wins. Only an order of the customer the
    coupon was issued to redeems it: another customer's order leaves it unredeemed and is
    recorded as a ``coupon_refused`` touchpoint of the ordering customer (once per order), so
    operators see who tried whose code. A redemption is a ``coupon_redeemed`` touchpoint (once
    per coupon: it is single-use) of the journey and step that issued the coupon.

    Args:
        s: the caller's session; the caller commits.
        code: the code as the order carried it (case and surrounding spaces do not matter).
        order_id: the order that used it.
        at: when the order was completed (timezone-aware).
        customer_id: the customer whose order it is.
        channel: where the order was placed (``web``, ``pos``...), for the touchpoints.

    Returns:
        The redeemed coupon, or None if no such code exists, it had expired at ``at``, it
        belongs to another customer, or another order redeemed it first.
    """
    wanted = normalise_code(code)
    claimed = s.exec(
        update(Coupon)
        .where(
            col(Coupon.code) == wanted,
            col(Coupon.customer_id) == customer_id,
            col(Coupon.redeemed_order_id).is_(None),
            col(Coupon.expires_at) > at,
        )
        .values(redeemed_at=at, redeemed_order_id=order_id)
    )
    coupon = s.exec(
        select(Coupon).where(Coupon.code == wanted).execution_options(populate_existing=True)
    ).first()
    if coupon is None:
        return None
    if coupon.customer_id != customer_id:
        record_touchpoint(
            s,
            customer_id=customer_id,
            kind="coupon_refused",
            key=f"coupon_refused/{order_id}/{coupon.code}",
            occurred_at=at,
            channel=channel,
            order_id=order_id,
            coupon_code=coupon.code,
            detail={"reason": "issued to another customer", "owner": coupon.customer_id},
        )
        return None
    if claimed.rowcount == 1 or coupon.redeemed_order_id == order_id:
        _record_redemption(s, coupon, order_id, at, channel)
        return coupon
    return None


def _record_redemption(
    s: Session, coupon: Coupon, order_id: str, at: datetime, channel: str
) -> None:
    """The ``coupon_redeemed`` touchpoint: the journey, step and variant of the coupon's
    ``coupon_issued`` touch (same key as the issue), the coupon's value, the order."""
    issued = s.exec(select(Touchpoint).where(Touchpoint.key == coupon.idempotency_key)).first()
    record_touchpoint(
        s,
        customer_id=coupon.customer_id,
        kind="coupon_redeemed",
        key=f"coupon_redeemed/{coupon.code}",
        journey_id=coupon.journey_id,
        journey_kind=issued.journey_kind if issued is not None else None,
        step=issued.step if issued is not None else None,
        variant=issued.variant if issued is not None else None,
        channel=channel,
        occurred_at=at,
        order_id=order_id,
        value_minor=coupon.amount_minor,
        currency=coupon.currency,
        coupon_code=coupon.code,
    )
