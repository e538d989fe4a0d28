"""Coupons: single-use discount codes of the local coupon provider.

``issue_coupon`` creates a code for a journey step (a retry returns the same coupon); codes
and their redemption by an order live in :mod:`kaeru.coupons`, which ingestion uses too.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlmodel import select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.types import CouponInfo, IssueCouponInput
from kaeru.coupons import new_code
from kaeru.db import session
from kaeru.models import Coupon, utcnow
from kaeru.settings import Settings
from kaeru.touchpoints import EMAIL, record_touchpoint

#: ApplicationError type of a coupon request that no retry can fix.
INVALID_COUPON = "InvalidCoupon"


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
                # A journey's coupon goes out in its offer email.
                channel=EMAIL,
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
