"""Conversions: the purchase that ended a journey, stored as a touchpoint for attribution."""

from __future__ import annotations

import asyncio
from datetime import UTC

from temporalio import activity

from activities.types import ConversionInput
from kaeru.db import session
from kaeru.journal import record_touchpoint
from kaeru.settings import Settings

#: Length of ``touchpoints.coupon_code``.
COUPON_CODE_MAX = 64


class ConversionActivities:
    """The ``record_conversion`` activity, with its settings injected."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @activity.defn(name="record_conversion")
    async def record_conversion(self, conversion: ConversionInput) -> None:
        """Store one ``conversion`` touchpoint for the journey's purchase (idempotent by key)."""
        await asyncio.to_thread(self._record, conversion)

    def _record(self, conversion: ConversionInput) -> None:
        occurred_at = conversion.occurred_at
        if occurred_at.tzinfo is None:
            # A naive time would fail every retry at the database; Segment times are UTC.
            occurred_at = occurred_at.replace(tzinfo=UTC)
        detail = dict(conversion.detail)
        coupon_code = conversion.coupon_code
        if coupon_code is not None and len(coupon_code) > COUPON_CODE_MAX:
            # Not one of ours (they are 16 characters): keep it whole in the detail instead
            # of failing every retry on the column's length.
            detail["coupon"], coupon_code = coupon_code, None
        with session(self.settings.resolved_database_url) as s:
            record_touchpoint(
                s,
                customer_id=conversion.customer_id,
                kind="conversion",
                key=conversion.key,
                journey_id=conversion.journey_id,
                step=conversion.after_step,
                occurred_at=occurred_at,
                order_id=conversion.order_id,
                value_minor=conversion.value_minor,
                currency=conversion.currency,
                coupon_code=coupon_code,
                detail=detail,
            )
