"""Touchpoints written at the door: every stored order is one ``purchase`` (online or in the
store), every ``Ad Clicked`` one ``ad_clicked``, a redeemed coupon one ``coupon_redeemed``, an
SES delivery one ``email_delivered``, opens and clicks with their journey's kind and channel;
each once however often it is redelivered. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlmodel import col, select
from temporalio.testing import ActivityEnvironment

from activities.coupons import CouponActivities
from activities.types import IssueCouponInput
from kaeru.db import session
from kaeru.journeys import kind_of_workflow_id, registry
from kaeru.models import EmailMessage, Touchpoint, utcnow
from kaeru.settings import Settings
from kaeru.tracking_tokens import register_tokens, token_for
from starter.app import create_app
from starter.feedback import FeedbackResult, apply_delivery, read_ses
from tests.conftest import make_settings
from tests.starter.conftest import AUTH, BROWSER_AUTH, asgi_client

JOURNEY = "cart-abandonment-u1"
AT = datetime(2026, 11, 30, 9, 15, 30, tzinfo=UTC)


def touches(settings: Settings, kind: str) -> list[Touchpoint]:
    with session(settings.resolved_database_url) as s:
        query = select(Touchpoint).where(Touchpoint.kind == kind).order_by(col(Touchpoint.id))
        return list(s.exec(query).all())


def order(message_id: str, **properties: Any) -> dict[str, Any]:
    return {
        "userId": "u1",
        "event": "Order Completed",
        "messageId": message_id,
        "timestamp": AT.isoformat(),
        "properties": {"order_id": "o-1", "total": "42.50", "currency": "eur"} | properties,
    }


async def test_every_stored_order_is_one_purchase_touch_in_its_own_time(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    first = order("m-1", coupon="SPRING")
    for _ in range(2):  # the same event again: a client's retry
        assert (await api.post("/v1/track", json=first, auth=AUTH)).status_code == 200
    # The same order in another event (a webhook and the backend both report it).
    again = {"batch": [order("m-2", total="1.00") | {"type": "track"}]}
    assert (await api.post("/v1/batch", json=again, auth=AUTH)).status_code == 200
    walk_in = order("m-3", order_id="o-2") | {"userId": "walk-in"}
    assert (await api.post("/v1/track", json=walk_in, auth=AUTH)).status_code == 200

    one, two = touches(settings, "purchase")
    assert (one.customer_id, one.order_id, one.value_minor, one.currency) == (
        "u1",
        "o-1",
        4250,
        "EUR",
    )
    assert (one.coupon_code, one.channel, one.occurred_at) == ("SPRING", "web", AT)
    assert (one.journey_id, one.journey_kind, one.key) == (None, None, "purchase/o-1")
    assert (two.customer_id, two.order_id, two.coupon_code) == ("walk-in", "o-2", None)


async def test_a_store_channel_order_is_an_offline_purchase_from_the_server_key_only(
    database_url: str,
) -> None:
    settings = make_settings(database_url, trust_browser_orders=True)
    async with asgi_client(create_app(settings, run_router=False)) as api:
        pos = order("m-pos", order_id="o-pos") | {"context": {"channel": " POS "}}
        assert (await api.post("/v1/track", json=pos, auth=AUTH)).status_code == 200
        app = order("m-app", order_id="o-app") | {"context": {"channel": "mobile-app"}}
        assert (await api.post("/v1/track", json=app, auth=AUTH)).status_code == 200
        junk = order("m-junk", order_id="o-junk") | {"context": {"channel": "<b>x</b>"}}
        assert (await api.post("/v1/track", json=junk, auth=AUTH)).status_code == 200
        # A shopper's browser cannot claim a purchase in the store.
        forged = order("m-forged", order_id="o-forged") | {"context": {"channel": "pos"}}
        answer = await api.post("/v1/track", json=forged, auth=BROWSER_AUTH)
        assert answer.status_code == 200

    bought = touches(settings, "purchase")
    found = {t.order_id: (t.channel, t.detail.get("offline")) for t in bought}
    assert found == {
        "o-pos": ("pos", True),
        "o-app": ("mobile-app", None),
        "o-junk": ("web", None),
        "o-forged": ("web", None),
    }


async def test_an_ad_click_is_one_touch_of_the_journey_it_names_if_that_is_the_shoppers(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    click = {
        "userId": "u1",
        "event": "Ad Clicked",
        "messageId": "ad-1",
        "timestamp": AT.isoformat(),
        "properties": {"journey_id": JOURNEY},
    }
    for _ in range(2):
        assert (await api.post("/v1/track", json=click, auth=AUTH)).status_code == 200
    someone_elses = click | {"messageId": "ad-2", "properties": {"journey_id": f"{JOURNEY[:-1]}2"}}
    assert (await api.post("/v1/track", json=someone_elses, auth=AUTH)).status_code == 200
    campaign = {"name": settings.ad_campaign, "source": "facebook"}
    page = {"userId": "u1", "messageId": "ad-3", "context": {"campaign": campaign}}
    assert (await api.post("/v1/page", json=page, auth=AUTH)).status_code == 200

    named, forged, from_page = touches(settings, "ad_clicked")
    assert (named.journey_id, named.journey_kind, named.channel, named.occurred_at) == (
        JOURNEY,
        "cart-abandonment",
        "ads",
        AT,
    )
    assert (forged.customer_id, forged.journey_id, forged.journey_kind) == ("u1", None, None)
    assert (from_page.channel, from_page.detail["campaign"]) == ("ads", settings.ad_campaign)


async def test_a_redeemed_coupon_is_one_touch_of_the_step_that_issued_it(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    issue = IssueCouponInput(
        key=f"{JOURNEY}/run-1/offer_coupon",
        journey_id=JOURNEY,
        step="offer_coupon",
        customer_id="u1",
        amount_minor=1000,
        currency="EUR",
        ttl_seconds=7 * 86400.0,
    )
    coupon = await ActivityEnvironment().run(CouponActivities(settings).issue_coupon, issue)
    bought = order("m-1", coupon=coupon.code.lower()) | {"timestamp": utcnow().isoformat()}
    bought["context"] = {"channel": "store"}
    assert (await api.post("/v1/track", json=bought, auth=AUTH)).status_code == 200
    again = bought | {"messageId": "m-2"}
    assert (await api.post("/v1/track", json=again, auth=AUTH)).status_code == 200

    [issued] = touches(settings, "coupon_issued")
    [redeemed] = touches(settings, "coupon_redeemed")
    assert (issued.journey_kind, issued.channel) == ("cart-abandonment", "email")
    assert (redeemed.customer_id, redeemed.journey_id, redeemed.journey_kind) == (
        "u1",
        JOURNEY,
        "cart-abandonment",
    )
    assert (redeemed.step, redeemed.order_id, redeemed.coupon_code, redeemed.channel) == (
        "offer_coupon",
        "o-1",
        coupon.code,
        "store",
    )
    assert (redeemed.value_minor, redeemed.currency) == (1000, "EUR")


async def test_another_customers_coupon_is_refused_on_the_orders_channel(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    issue = IssueCouponInput(
        key=f"{JOURNEY}/run-1/offer_coupon",
        journey_id=JOURNEY,
        step="offer_coupon",
        customer_id="u1",
        amount_minor=500,
        currency="EUR",
        ttl_seconds=86400.0,
    )
    coupon = await ActivityEnvironment().run(CouponActivities(settings).issue_coupon, issue)
    eve = order("m-eve", order_id="o-eve", coupon=coupon.code) | {
        "userId": "eve",
        "timestamp": utcnow().isoformat(),
        "context": {"channel": "pos"},
    }
    assert (await api.post("/v1/track", json=eve, auth=AUTH)).status_code == 200
    [refused] = touches(settings, "coupon_refused")
    assert (refused.customer_id, refused.channel) == ("eve", "pos")
    assert touches(settings, "coupon_redeemed") == []


# ---- email delivered (Amazon SES) and opens --------------------------------------------------

MESSAGE_ID = "<0123456789abcdef@shop.example>"
MESSAGE_KEY = f"{JOURNEY}/run-1/cart_email"
SIGNING_KEY = b"test-secret-0123456789abcdef-kaeru"  # make_settings' KAERU_SECRET_KEY


def sent(settings: Settings) -> None:
    with session(settings.resolved_database_url) as s:
        s.add(
            EmailMessage(
                key=MESSAGE_KEY,
                message_id=MESSAGE_ID,
                customer_id="u1",
                journey_id=JOURNEY,
                step="cart_email",
                to_address="ann@example.com",
                subject="Your cart",
                status="sent",
                links=["https://shop.example/cart"],
                sent_at=utcnow(),
            )
        )
        register_tokens(s, SIGNING_KEY, MESSAGE_KEY, 1)


def delivery(message_id: str = MESSAGE_ID) -> dict[str, Any]:
    """An SNS notification carrying an SES ``Delivery`` (the SES developer guide's shape)."""
    body = {
        "notificationType": "Delivery",
        "mail": {
            "timestamp": "2026-11-30T09:00:00.000Z",
            "messageId": "0100018c-ses-own-id",
            "source": "shop@shop.example",
            "destination": ["ann@example.com"],
            "headers": [{"name": "Message-ID", "value": message_id}],
            "commonHeaders": {"messageId": message_id, "subject": "Your cart"},
        },
        "delivery": {
            "timestamp": "2026-11-30T09:00:01.184Z",
            "processingTimeMillis": 546,
            "recipients": ["ann@example.com"],
            "smtpResponse": "250 ok",
            "reportingMTA": "a8-70.smtp-out.amazonses.com",
        },
    }
    return {"Type": "Notification", "MessageId": str(uuid.uuid4()), "Message": json.dumps(body)}


async def hook(api: httpx.AsyncClient, body: Any) -> httpx.Response:
    return await api.post(
        "/v1/feedback/webhook",
        content=json.dumps(body).encode(),
        headers={"Content-Type": "text/plain; charset=UTF-8"},
        auth=AUTH,
    )


async def test_an_ses_delivery_is_one_email_delivered_touch_of_the_message(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    sent(settings)
    first = await hook(api, delivery())
    assert first.status_code == 200, first.text
    assert (first.json()["kind"], first.json()["matched"], first.json()["repeated"]) == (
        "delivered",
        True,
        False,
    )
    again = await hook(api, delivery())  # SNS delivers it again
    assert again.json()["repeated"] is True
    unknown = await hook(api, delivery("<not-ours@elsewhere.example>"))
    assert unknown.status_code == 200 and unknown.json()["matched"] is False

    [delivered] = touches(settings, "email_delivered")
    assert (delivered.customer_id, delivered.journey_id, delivered.journey_kind) == (
        "u1",
        JOURNEY,
        "cart-abandonment",
    )
    assert (delivered.step, delivered.channel, delivered.key) == (
        "cart_email",
        "email",
        f"{MESSAGE_KEY}/email_delivered",
    )
    assert delivered.occurred_at == datetime(2026, 11, 30, 9, 0, 1, 184000, tzinfo=UTC)
    with session(settings.resolved_database_url) as s:
        assert s.exec(select(EmailMessage)).one().status == "sent"


async def test_opens_and_clicks_carry_their_journeys_kind_and_the_email_channel(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    sent(settings)
    pixel = f"/t/o/{token_for(SIGNING_KEY, MESSAGE_KEY, 'o')}"
    assert (await api.get(pixel)).status_code == 200
    click = await api.get(f"/t/c/{token_for(SIGNING_KEY, MESSAGE_KEY, 'c', 0)}")
    assert click.status_code in (302, 303, 307)
    found = [
        (t.kind, t.journey_kind, t.channel)
        for t in touches(settings, "email_opened") + touches(settings, "email_clicked")
    ]
    assert found == [
        ("email_opened", "cart-abandonment", "email"),
        ("email_clicked", "cart-abandonment", "email"),
    ]


def test_a_journey_kind_is_the_longest_registered_kind_prefixing_the_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAERU_JOURNEY_MODULES", "tests.journeys.hello,tests.journeys.short_kind")
    registry.cache_clear()
    assert kind_of_workflow_id("test-hello-u1") == "test-hello"
    assert kind_of_workflow_id("test-u1") == "test"
    assert kind_of_workflow_id("cart-abandonment-u1") == "cart-abandonment"
    assert kind_of_workflow_id("win-back-u-7") == "win-back"  # switched off, still a kind
    assert kind_of_workflow_id("cart-abandonment-") is None  # no customer
    assert kind_of_workflow_id("audience-sweeper") is None


def test_the_same_delivery_recorded_at_once_by_many_requests_is_one_touch(
    settings: Settings,
) -> None:
    sent(settings)
    feedback = read_ses(delivery())
    assert feedback is not None
    start = threading.Barrier(8)

    def deliver() -> FeedbackResult:
        start.wait()
        return apply_delivery(settings, feedback)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: deliver(), range(8)))
    # None failed (a loser of the race for the key is answered as a repeat, not a 500).
    assert all(r.matched and r.kind == "delivered" for r in results)
    assert len(touches(settings, "email_delivered")) == 1
    assert any(r.repeated for r in results)
