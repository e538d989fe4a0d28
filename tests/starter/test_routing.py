"""The routing table and the lease, without Temporal: what goes where, and who may route."""

from __future__ import annotations

import time

from kaeru.settings import Settings
from starter.router import acquire_lease, lease_holder, release_lease
from starter.routing import ROUTES, cart_journey_input, deliveries
from tests.conftest import make_settings
from workflows.cart_abandonment import CART_EVENTS


def test_cart_events_start_the_cart_journey() -> None:
    for name in sorted(CART_EVENTS):
        (delivery,) = deliveries(name, "u1", {})
        assert (delivery.workflow_id, delivery.start) == ("cart-abandonment-u1", True)


def test_orders_and_ad_clicks_only_reach_a_live_journey() -> None:
    for name in ("Order Completed", "Ad Clicked"):
        (delivery,) = deliveries(name, "u1", {})
        assert (delivery.workflow_id, delivery.start) == ("cart-abandonment-u1", False)


def test_opens_and_clicks_go_to_the_customers_own_journey_only() -> None:
    own = {"journey_id": "cart-abandonment-u1"}
    for name in ("Email Opened", "Email Link Clicked"):
        (delivery,) = deliveries(name, "u1", own)
        assert (delivery.workflow_id, delivery.start) == ("cart-abandonment-u1", False)
        assert deliveries(name, "u2", own) == []
        assert deliveries(name, "u1", {"journey_id": {"x": 1}}) == []
        assert deliveries(name, "u1", {}) == []


def test_other_events_go_nowhere() -> None:
    for name in (None, "Product Viewed", "Signed Up", "order completed"):
        assert deliveries(name, "u1", {}) == []


def test_journey_input_carries_the_settings(sqlite_url: str) -> None:
    settings = make_settings(
        sqlite_url,
        cart_email_delay="PT2H",
        cart_open_wait=60,
        cart_coupon_amount_minor=500,
        cart_coupon_currency="eur",
        cart_url="https://shop.test/cart",
        cart_recommendations=0,
    )
    start = cart_journey_input("u1", settings)
    assert start.customer_id == "u1"
    assert (start.settings.email_delay, start.settings.open_wait) == (7200.0, 60.0)
    assert (start.settings.coupon_amount_minor, start.settings.coupon_currency) == (500, "EUR")
    assert (start.settings.cart_url, start.settings.recommendations) == (
        "https://shop.test/cart",
        0,
    )
    assert [route.kind for route in ROUTES] == ["cart-abandonment"]


def test_one_holder_at_a_time_and_takeover_after_expiry(settings: Settings) -> None:
    url = settings.resolved_database_url
    assert lease_holder(url) is None
    assert acquire_lease(url, "a", ttl=0.3)
    assert not acquire_lease(url, "b", ttl=0.3)
    assert acquire_lease(url, "a", ttl=0.3)  # renewal
    holder = lease_holder(url)
    assert holder is not None and holder[0] == "a"
    time.sleep(0.4)
    assert acquire_lease(url, "b", ttl=30)
    assert not acquire_lease(url, "a", ttl=30)
    release_lease(url, "a")  # not the holder: changes nothing
    assert not acquire_lease(url, "a", ttl=30)
    release_lease(url, "b")
    assert acquire_lease(url, "a", ttl=30)
