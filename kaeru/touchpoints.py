"""Touchpoints: one append-only row per touch, the ground truth for analytics later."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session, select

from kaeru.models import Touchpoint, utcnow


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
    """Add a touchpoint in ``session``'s transaction. With ``key``, a second call adds nothing."""
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
