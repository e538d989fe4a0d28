"""record_conversion: one touchpoint per journey purchase, whatever the retries."""

from __future__ import annotations

from datetime import UTC, datetime

from temporalio.testing import ActivityEnvironment

from activities.conversions import ConversionActivities
from activities.types import ConversionInput
from kaeru.db import session
from kaeru.models import Order
from tests.activities.factories import touchpoints
from tests.conftest import make_settings

JOURNEY = "cart-abandonment-c1"


def conversion(**changes: object) -> ConversionInput:
    values: dict[str, object] = {
        "key": f"{JOURNEY}/run-1/conversion",
        "journey_id": JOURNEY,
        "customer_id": "c1",
        "after_step": "offer_email",
        "order_id": "o-1001",
        "value_minor": 6498,
        "currency": "USD",
        "coupon_code": "KAERU-ABCDEFGHJK",
        "occurred_at": datetime(2026, 11, 20, 9, 30, tzinfo=UTC),
        "detail": {"source": "journey"},
    }
    values.update(changes)
    return ConversionInput(**values)  # type: ignore[arg-type]


async def record(url: str, what: ConversionInput) -> None:
    activities = ConversionActivities(make_settings(url))
    await ActivityEnvironment().run(activities.record_conversion, what)


async def test_conversion_is_recorded_once(database_url: str) -> None:
    await record(database_url, conversion())
    await record(database_url, conversion())  # a retry

    [tp] = touchpoints(database_url)
    assert (tp.kind, tp.key, tp.customer_id, tp.journey_id, tp.step) == (
        "conversion",
        f"{JOURNEY}/run-1/conversion",
        "c1",
        JOURNEY,
        "offer_email",
    )
    assert (tp.order_id, tp.value_minor, tp.currency, tp.coupon_code) == (
        "o-1001",
        6498,
        "USD",
        "KAERU-ABCDEFGHJK",
    )
    assert tp.occurred_at == datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
    assert tp.detail == {"source": "journey"}


async def test_naive_time_and_foreign_long_coupon_do_not_fail_forever(database_url: str) -> None:
    long_code = "SUMMER-" + "X" * 80
    await record(
        database_url,
        conversion(occurred_at=datetime(2026, 11, 20, 9, 30), coupon_code=long_code, detail={}),
    )

    [tp] = touchpoints(database_url)
    assert tp.occurred_at == datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
    assert tp.coupon_code is None and tp.detail == {"coupon": long_code}


async def test_a_redelivered_order_writes_no_second_conversion(database_url: str) -> None:
    """A router that delivers an ``Order Completed`` again (to this run, a later run or the
    next generation of the customer's journey) must not count the order twice."""
    await record(database_url, conversion())
    await record(database_url, conversion(key=f"{JOURNEY}/run-2/conversion"))
    await record(database_url, conversion(key=f"{JOURNEY}/run-1/g1/conversion"))

    [tp] = touchpoints(database_url, "conversion")
    assert tp.key == f"{JOURNEY}/run-1/conversion"


async def test_an_order_converts_once_per_journey_kind(database_url: str) -> None:
    await record(database_url, conversion())
    browse = "browse-abandonment-c1"
    await record(database_url, conversion(key=f"{browse}/run-9/conversion", journey_id=browse))
    await record(database_url, conversion(key=f"{JOURNEY}/run-2/conversion", order_id="o-1002"))

    rows = touchpoints(database_url, "conversion")
    assert [(t.journey_id, t.order_id) for t in rows] == [
        (JOURNEY, "o-1001"),
        (browse, "o-1001"),
        (JOURNEY, "o-1002"),
    ]


async def test_another_customers_order_with_the_same_id_still_counts(database_url: str) -> None:
    """A browser ``Order Completed`` (public key, money stripped) for a made-up customer
    must not claim the real buyer's order id."""
    forged = "cart-abandonment-mallory"
    await record(
        database_url,
        conversion(
            key=f"{forged}/run-1/conversion",
            journey_id=forged,
            customer_id="mallory",
            order_id="1050",
            value_minor=0,
        ),
    )
    await record(database_url, conversion(order_id="1050"))

    rows = touchpoints(database_url, "conversion")
    assert [(t.customer_id, t.order_id, t.value_minor) for t in rows] == [
        ("mallory", "1050", 0),
        ("c1", "1050", 6498),
    ]
    assert [t.order_key for t in rows] == [
        "cart-abandonment/mallory/1050",
        "cart-abandonment/c1/1050",
    ]


def store_order(url: str, order_id: str, customer_id: str, total_minor: int, currency: str) -> None:
    with session(url) as s:
        s.add(
            Order(
                order_id=order_id,
                customer_id=customer_id,
                total_minor=total_minor,
                currency=currency,
            )
        )


async def test_an_untrusted_zero_value_order_takes_the_stored_orders_money(
    database_url: str,
) -> None:
    """The journey ended on the browser's copy of the order (no money); the shop's server
    sent the trusted one, stored in ``orders``: the conversion is worth what that says."""
    store_order(database_url, "o-1001", "c1", 12050, "EUR")
    store_order(database_url, "o-2002", "someone-else", 99900, "EUR")

    await record(database_url, conversion(value_minor=0))
    await record(
        database_url,
        conversion(key=f"{JOURNEY}/run-2/conversion", order_id="o-2002", value_minor=0),
    )
    await record(
        database_url,
        conversion(key=f"{JOURNEY}/run-3/conversion", order_id="o-3003", value_minor=0),
    )

    rows = touchpoints(database_url, "conversion")
    assert [(t.order_id, t.value_minor, t.currency) for t in rows] == [
        ("o-1001", 12050, "EUR"),  # the customer's own stored order
        ("o-2002", 0, "USD"),  # another customer's order with that id says nothing
        ("o-3003", 0, "USD"),  # no stored order
    ]


async def test_the_longest_ids_fit_the_key(database_url: str) -> None:
    """Customer and order ids of 200 characters (the most ingestion accepts) must not fail
    every retry at the column's length (PostgreSQL enforces it)."""
    customer, order = "c" * 200, "o" * 200
    journey = f"cart-abandonment-{customer}"
    await record(
        database_url,
        conversion(
            key=f"{journey}/run-1/conversion",
            journey_id=journey,
            customer_id=customer,
            order_id=order,
        ),
    )

    [tp] = touchpoints(database_url, "conversion")
    assert tp.order_key == f"cart-abandonment/{customer}/{order}"
