"""Coupons: single-use discount codes of the local coupon provider.

``issue_coupon`` creates a code for a journey step (a retry returns the same coupon);
:func:`redeem_coupon` is what ingestion calls when an ``Order Completed`` names a coupon.
"""

from __future__ import annotations

import asyncio
import secrets
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.types import CouponInfo, IssueCouponInput
from kaeru.db import session
from kaeru.journal import record_touchpoint
from kaeru.models import Coupon, utcnow
from kaeru.settings import Settings

PREFIX = "KAERU-"
#: No 0/O, 1/I/L: a code read aloud or typed from a phone is typed right the first time.
ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
CODE_LENGTH = 10

#: ApplicationError type of a coupon request that no retry can fix.
INVALID_COUPON = "InvalidCoupon"


def new_code() -> str:
    """A fresh random code such as ``KAERU-7QXH2MZK4P`` (31**10, about 8e14, possibilities)."""
    return PREFIX + "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))


def normalise_code(code: str) -> str:
    """The stored form of a code as a shopper may type it (spaces, lower case)."""
    return code.strip().upper()


def redeem_coupon(
    s: Session, code: str, order_id: str, at: datetime, *, customer_id: str
) -> Coupon | None:
    """Mark coupon ``code`` redeemed by ``order_id`` of ``customer_id``, in ``s``'s transaction.

    Idempotent for the same order: a re-delivered ``Order Completed`` finds it already
    redeemed by that order and gets it back. Safe against two orders racing for one code: the
    update is conditional, so exactly one of them wins. Only an order of the customer the
    coupon was issued to redeems it: another customer's order leaves it unredeemed and is
    recorded as a ``coupon_refused`` touchpoint of the ordering customer (once per order), so
    operators see who tried whose code.

    Args:
        s: the caller's session; the caller commits.
        code: the code as the order carried it (case and surrounding spaces do not matter).
        order_id: the order that used it.
        at: when the order was completed (timezone-aware).
        customer_id: the customer whose order it is.

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
            order_id=order_id,
            coupon_code=coupon.code,
            detail={"reason": "issued to another customer", "owner": coupon.customer_id},
        )
        return None
    if claimed.rowcount == 1 or coupon.redeemed_order_id == order_id:
        return coupon
    return None


class CouponActivities:
    """The ``issue_coupon`` activity, with its settings injected."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @activity.defn(name="issue_coupon")
    async def issue_coupon(self, request: IssueCouponInput) -> CouponInfo:
        """Issue a single-use coupon for ``request.key``; a retry gets the same coupon back.

        Raises:
            ApplicationError: ``InvalidCoupon`` (non-retryable) for a non-positive amount or
                lifetime, or a currency that is not an ISO 4217 code.
        """
        problem = _problem(request)
        if problem:
            raise ApplicationError(
                f"cannot issue a coupon for {request.key}: {problem}. Fix the journey "
                "settings (KAERU_CART_COUPON_AMOUNT_MINOR, _CURRENCY, _TTL) and start anew",
                type=INVALID_COUPON,
                non_retryable=True,
            )
        coupon = await asyncio.to_thread(self._issue, request)
        return CouponInfo(
            code=coupon.code,
            amount_minor=coupon.amount_minor,
            currency=coupon.currency,
            expires_at=coupon.expires_at,
        )

    def _issue(self, request: IssueCouponInput) -> Coupon:
        with session(self.settings.resolved_database_url) as s:
            existing = s.exec(select(Coupon).where(Coupon.idempotency_key == request.key)).first()
            if existing is not None:
                return existing
            now = utcnow()
            # A clash of random codes is astronomically unlikely; if it ever happens the
            # insert fails on the primary key and the activity's retry draws a new code.
            coupon = Coupon(
                code=new_code(),
                idempotency_key=request.key,
                customer_id=request.customer_id,
                journey_id=request.journey_id,
                amount_minor=request.amount_minor,
                currency=request.currency.upper(),
                created_at=now,
                expires_at=now + timedelta(seconds=request.ttl_seconds),
            )
            s.add(coupon)
            record_touchpoint(
                s,
                customer_id=request.customer_id,
                kind="coupon_issued",
                key=request.key,
                journey_id=request.journey_id,
                step=request.step,
                occurred_at=now,
                value_minor=coupon.amount_minor,
                currency=coupon.currency,
                coupon_code=coupon.code,
                detail={"expires_at": coupon.expires_at.isoformat()},
            )
        return coupon


def _problem(request: IssueCouponInput) -> str | None:
    if request.amount_minor <= 0:
        return f"the amount must be positive, not {request.amount_minor}"
    if request.ttl_seconds <= 0:
        return f"the lifetime must be positive, not {request.ttl_seconds} s"
    if len(request.currency) != 3 or not request.currency.isalpha():
        return f"{request.currency!r} is not an ISO 4217 currency code such as USD"
    return None
