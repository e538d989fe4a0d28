"""Migration 0015: the touches recorded before it get their journey kind and channel, and
stored orders, redeemed coupons and ad clicks their touchpoints, once; on SQLite and
PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from alembic import command
from alembic.config import Config
from sqlmodel import col, select

from kaeru.db import MIGRATIONS, get_engine, migrate, session
from kaeru.models import Coupon, Event, Order, Touchpoint

AT = datetime(2026, 11, 1, 12, tzinfo=UTC)


def history(url: str) -> None:
    """What a shop stored before 0015: touches without kind or channel, and no purchases."""
    with session(url) as s:
        s.add(Touchpoint(customer_id="u-1", kind="email_sent", journey_id="cart-abandonment-u-1"))
        s.add(Touchpoint(customer_id="u-1", kind="audience_joined", journey_id="win-back-u-1"))
        s.add(
            Touchpoint(
                customer_id="u-1",
                kind="coupon_issued",
                key="cart-abandonment-u-1/run/offer_coupon",
                journey_id="cart-abandonment-u-1",
                step="offer_coupon",
            )
        )
        s.add(Touchpoint(customer_id="u-1", kind="conversion", journey_id="odd-id"))
        s.add(
            Order(
                order_id="o-1",
                customer_id="u-1",
                total_minor=4250,
                currency="EUR",
                coupon="KAERU-ABCDEFGHJK",
                completed_at=AT,
            )
        )
        s.add(
            Order(
                order_id="o-2",
                customer_id="u-2",
                total_minor=100,
                currency="JPY",
                coupon="x" * 100,
                completed_at=AT,
            )
        )
        s.add(
            Coupon(
                code="KAERU-ABCDEFGHJK",
                idempotency_key="cart-abandonment-u-1/run/offer_coupon",
                customer_id="u-1",
                journey_id="cart-abandonment-u-1",
                amount_minor=500,
                currency="EUR",
                expires_at=AT + timedelta(days=7),
                redeemed_at=AT,
                redeemed_order_id="o-1",
            )
        )
        for n, journey in enumerate(("cart-abandonment-u-1", "cart-abandonment-u-2")):
            s.add(
                Event(
                    message_id=f"ad-{n}",
                    customer_id="u-1",
                    type="track",
                    name="Ad Clicked",
                    payload={"properties": {"journey_id": journey}},
                    timestamp=AT,
                )
            )


def rows(url: str) -> list[tuple[object, ...]]:
    with session(url) as s:
        found = s.exec(select(Touchpoint).order_by(col(Touchpoint.id))).all()
        return [
            (t.kind, t.journey_kind, t.channel, t.order_id, t.value_minor, t.coupon_code, t.step)
            for t in found
        ]


def test_the_history_before_0015_is_completed_once(database_url: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = get_engine(database_url)
    command.downgrade(config, "0014")
    history(database_url)

    migrate(database_url)
    expected = [
        ("email_sent", "cart-abandonment", "email", None, None, None, None),
        ("audience_joined", "win-back", "ads", None, None, None, None),
        ("coupon_issued", "cart-abandonment", "email", None, None, None, "offer_coupon"),
        ("conversion", None, "web", None, None, None, None),
        ("purchase", None, "web", "o-1", 4250, "KAERU-ABCDEFGHJK", None),
        ("purchase", None, "web", "o-2", 100, None, None),
        (
            "coupon_redeemed",
            "cart-abandonment",
            "web",
            "o-1",
            500,
            "KAERU-ABCDEFGHJK",
            "offer_coupon",
        ),
        ("ad_clicked", "cart-abandonment", "ads", None, None, None, None),
        ("ad_clicked", None, "ads", None, None, None, None),
    ]
    assert rows(database_url) == expected
    with session(database_url) as s:
        long_coupon = s.exec(select(Touchpoint).where(Touchpoint.order_id == "o-2")).one()
    assert long_coupon.detail == {"backfilled": True, "coupon": "x" * 100}

    command.downgrade(config, "0014")
    migrate(database_url)
    assert rows(database_url) == expected
