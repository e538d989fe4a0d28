"""record_conversion: one touchpoint per journey purchase, whatever the retries."""

from __future__ import annotations

from datetime import UTC, datetime

from temporalio.testing import ActivityEnvironment

from activities.conversions import ConversionActivities
from activities.types import ConversionInput
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
