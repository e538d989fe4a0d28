"""Conversions: the purchase that ended a journey, stored as a touchpoint for attribution.

One conversion per journey kind, customer and order (``touchpoints.order_key``, unique,
``<kind>/<customer id>/<order id>``): an order that is delivered again, to the same journey or
to a later one of the customer, is not counted again; an order that ends two kinds of journey
counts once for each, so each kind's report is whole and no kind's credit depends on which
journey's activity ran first. The customer is part of the key because order ids are only
unique per shop, not per sender: a browser ``Order Completed`` (public key) for a made-up
customer must not claim the id of another customer's order.

A browser order reaches journeys without its money (README, "Trust model"), so its
conversion says 0; when the customer's trusted order with that id is stored (``orders``),
its value and currency are the conversion's.
"""

from __future__ import annotations

import asyncio
from datetime import UTC

from sqlmodel import select
from temporalio import activity

from activities.types import ConversionInput
from kaeru.db import session
from kaeru.models import Order, Touchpoint
from kaeru.pseudonyms import journey_kind
from kaeru.settings import Settings
from kaeru.touchpoints import COUPON_CODE_MAX, WEB, purchase_key, record_touchpoint


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
        kind = journey_kind_of(conversion)
        order_key = f"{kind}/{conversion.customer_id}/{conversion.order_id}"
        value_minor, currency = conversion.value_minor, conversion.currency
        with session(self.settings.resolved_database_url) as s:
            counted = s.exec(select(Touchpoint).where(Touchpoint.order_key == order_key)).first()
            if counted is not None:
                if counted.key != conversion.key:
                    # Not the journey id: it holds the customer id, often an email address.
                    activity.logger.info(
                        "order %s is already a conversion of a %s journey: not counted again",
                        conversion.order_id,
                        kind,
                    )
                return
            if value_minor == 0:
                stored = s.get(Order, conversion.order_id)
                if stored is not None and stored.customer_id == conversion.customer_id:
                    value_minor, currency = stored.total_minor, stored.currency
            # Where the shopper bought (``pos`` for a store purchase after the email): the
            # channel ingestion gave the customer's stored order; a browser order is ``web``.
            purchase = s.exec(
                select(Touchpoint).where(Touchpoint.key == purchase_key(conversion.order_id))
            ).first()
            channel = WEB
            if purchase is not None and purchase.customer_id == conversion.customer_id:
                channel = purchase.channel or WEB
            row = record_touchpoint(
                s,
                customer_id=conversion.customer_id,
                kind="conversion",
                key=conversion.key,
                journey_id=conversion.journey_id,
                step=conversion.after_step,
                channel=channel,
                occurred_at=occurred_at,
                order_id=conversion.order_id,
                value_minor=value_minor,
                currency=currency,
                coupon_code=coupon_code,
                detail=detail,
            )
            # A concurrent writer of the same order fails the unique constraint at commit;
            # the activity's retry then finds its row and stops.
            row.order_key = order_key
            s.add(row)


def journey_kind_of(conversion: ConversionInput) -> str:
    """The journey's kind, from its id ``<kind>-<customer id>`` or ``<kind>-<pseudonym>``
    (the whole id otherwise)."""
    return journey_kind(conversion.journey_id, conversion.customer_id) or conversion.journey_id
