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
