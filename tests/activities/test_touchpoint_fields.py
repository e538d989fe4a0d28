"""Every touch an activity records says its journey's kind and its channel: email sent and
bounced (``email``), audience joined, left and swept (``ads``), coupon issued (``email``), and a
conversion on the channel its order was placed on. Real SMTP and Graph API loopback servers,
SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from temporalio.testing import ActivityEnvironment

from activities.ads import AudienceActivities
from activities.types import ParkRemoval, SweepInput
from kaeru.db import session
from kaeru.models import AudienceJoin
from kaeru.touchpoints import record_purchase
from tests.activities.factories import add_customer, touchpoints
from tests.activities.test_ads import add, change, leave, meta_settings, remove
from tests.activities.test_conversions import conversion, record
from tests.activities.test_email import ADDRESS, refused, request, send
from tests.conftest import make_settings
from tests.support.graph_api import GraphAPIServer
from tests.support.smtp import SMTPTestServer

KIND = "cart-abandonment"  # of the journeys the imported helpers name


async def test_email_sent_and_bounced_are_email_touches_of_the_journeys_kind(
    database_url: str, smtp_server: SMTPTestServer
) -> None:
    add_customer(database_url, "c1", ADDRESS)
    add_customer(database_url, "c2", "bob@example.com")
    settings = make_settings(database_url, smtp_port=smtp_server.port)
    await send(settings, request())
    smtp_server.reject_recipient("bob@example.com", 550)
    await refused(settings, request("cart-abandonment-c1/run-1/offer_email", customer_id="c2"))

    found = [(t.kind, t.journey_kind, t.channel) for t in touchpoints(database_url)]
    assert found == [("email_sent", KIND, "email"), ("email_bounced", KIND, "email")]


async def test_audience_touches_are_ads_touches_of_the_journeys_kind(
    database_url: str, graph_api: GraphAPIServer
) -> None:
    add_customer(database_url, "c1", "alice@example.com")
    local = make_settings(database_url)
    async with httpx.AsyncClient(timeout=10) as http:
        joined = change()
        await add(local, http, joined)
        await remove(local, http, leave(joined))

        # A removal parked for the sweeper, swept later: its touch too.
        meta = meta_settings(database_url, graph_api)
        ads = AudienceActivities(meta, http)
        again = change("ad_audience_2")
        await add(meta, http, again)
        parked = ParkRemoval(change=leave(again), reason="Meta is busy (HTTP 429)")
        await ActivityEnvironment().run(ads.park_audience_removal, parked)
        with session(database_url) as s:
            due = s.get(AudienceJoin, again.key)
            assert due is not None and due.retry_at is not None
            due.retry_at -= timedelta(days=2)
            s.add(due)
        swept = await ActivityEnvironment().run(ads.retry_audience_removals, SweepInput())
        assert swept.removed == 1

    found = [(t.kind, t.journey_kind, t.channel) for t in touchpoints(database_url)]
    assert found == [
        ("audience_joined", KIND, "ads"),
        ("audience_left", KIND, "ads"),
        ("audience_joined", KIND, "ads"),
        ("audience_left", KIND, "ads"),
    ]
    assert touchpoints(database_url)[-1].detail["swept"] is True


async def test_a_conversion_is_on_the_channel_its_order_was_placed_on(database_url: str) -> None:
    with session(database_url) as s:
        record_purchase(
            s,
            customer_id="c1",
            order_id="o-store",
            value_minor=6498,
            currency="USD",
            coupon_code=None,
            channel="pos",
            occurred_at=datetime(2026, 11, 20, 9, 30, tzinfo=UTC),
            offline=True,
        )
    await record(database_url, conversion(order_id="o-store"))
    # A browser order is not stored: its conversion is online.
    await record(
        database_url, conversion(order_id="o-web", key="cart-abandonment-c1/run-2/conversion")
    )
    # Another customer's order with the same id says nothing of this one's channel.
    await record(
        database_url,
        conversion(
            customer_id="c9",
            journey_id="cart-abandonment-c9",
            key="cart-abandonment-c9/run-1/conversion",
            order_id="o-store",
        ),
    )

    found = [
        (t.customer_id, t.order_id, t.journey_kind, t.channel)
        for t in touchpoints(database_url, "conversion")
    ]
    assert found == [
        ("c1", "o-store", KIND, "pos"),
        ("c1", "o-web", KIND, "web"),
        ("c9", "o-store", KIND, "web"),
    ]
