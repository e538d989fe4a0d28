"""Conversions: the purchase that ended a journey, stored as a touchpoint for attribution.

One conversion per order and journey kind (``touchpoints.order_key``, unique): an order that
is delivered again, to the same journey or to a later one of the customer, is not counted
again; an order that ends two kinds of journey counts once for each, so each kind's report
is whole and no kind's credit depends on which journey's activity ran first.
"""

from __future__ import annotations

import asyncio
from datetime import UTC

from sqlmodel import select
from temporalio import activity

from activities.types import ConversionInput
from kaeru.db import session
from kaeru.journal import record_touchpoint
from kaeru.models import Touchpoint
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
        order_key = f"{journey_kind_of(conversion)}/{conversion.order_id}"
        with session(self.settings.resolved_database_url) as s:
            counted = s.exec(select(Touchpoint).where(Touchpoint.order_key == order_key)).first()
            if counted is not None:
                if counted.key != conversion.key:
                    # Not the journey id: it holds the customer id, often an email address.
                    activity.logger.info(
                        "order %s is already a conversion of a %s journey: not counted again",
                        conversion.order_id,
                        journey_kind_of(conversion),
                    )
                return
            row = record_touchpoint(
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
            # A concurrent writer of the same order fails the unique constraint at commit;
            # the activity's retry then finds its row and stops.
            row.order_key = order_key
            s.add(row)


def journey_kind_of(conversion: ConversionInput) -> str:
    """The journey's kind, from its id ``<kind>-<customer id>`` (the whole id otherwise)."""
    return conversion.journey_id.removesuffix(f"-{conversion.customer_id}")
