"""Coupons: issuing (idempotent by key) and redeeming (once, before expiry), on both databases."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from sqlmodel import select
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.coupons import INVALID_COUPON, CouponActivities
from activities.types import CouponInfo, IssueCouponInput
from kaeru.coupons import ALPHABET, redeem_coupon
from kaeru.db import session
from kaeru.models import Coupon, utcnow
from tests.activities.factories import touchpoints
from tests.conftest import make_settings

JOURNEY = "cart-abandonment-c1"


def issue_input(step: str = "offer_coupon", **changes: Any) -> IssueCouponInput:
    values: dict[str, object] = {
        "key": f"{JOURNEY}/run-1/{step}",
        "journey_id": JOURNEY,
        "step": step,
        "customer_id": "c1",
        "amount_minor": 1000,
        "currency": "usd",
        "ttl_seconds": 7 * 86400.0,
    }
    values.update(changes)
    return IssueCouponInput(**values)  # type: ignore[arg-type]


async def issue(url: str, request: IssueCouponInput) -> CouponInfo:
    activities = CouponActivities(make_settings(url))
    coupon: CouponInfo = await ActivityEnvironment().run(activities.issue_coupon, request)
    return coupon


def stored(url: str) -> list[Coupon]:
    with session(url) as s:
        return list(s.exec(select(Coupon)))


async def test_issue_is_idempotent_by_key(database_url: str) -> None:
    before = utcnow()
    first = await issue(database_url, issue_input())
    retry = await issue(database_url, issue_input())
    other = await issue(database_url, issue_input("second_coupon"))

    assert re.fullmatch(rf"KAERU-[{ALPHABET}]{{10}}", first.code)
    assert retry == first
    assert other.code != first.code
    assert (first.amount_minor, first.currency) == (1000, "USD")
    assert before + timedelta(days=7) <= first.expires_at <= utcnow() + timedelta(days=7)
    assert {c.code for c in stored(database_url)} == {first.code, other.code}
    coupon = next(c for c in stored(database_url) if c.code == first.code)
    assert (coupon.customer_id, coupon.journey_id, coupon.redeemed_at) == ("c1", JOURNEY, None)
    issued = touchpoints(database_url, "coupon_issued")
    assert [(t.key, t.coupon_code, t.value_minor, t.currency) for t in issued] == [
        (f"{JOURNEY}/run-1/offer_coupon", first.code, 1000, "USD"),
        (f"{JOURNEY}/run-1/second_coupon", other.code, 1000, "USD"),
    ]


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"amount_minor": 0}, "amount must be positive"),
        ({"ttl_seconds": 0.0}, "lifetime must be positive"),
        ({"currency": "US1"}, "ISO 4217"),
    ],
)
async def test_invalid_coupon_is_not_retried(
    sqlite_url: str, changes: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ApplicationError) as caught:
        await issue(sqlite_url, issue_input(**changes))

    assert (caught.value.type, caught.value.non_retryable) == (INVALID_COUPON, True)
    assert problem in caught.value.message and "KAERU_CART_COUPON" in caught.value.message
    assert stored(sqlite_url) == []


async def test_redeem_once_for_one_order_before_expiry(database_url: str) -> None:
    code = (await issue(database_url, issue_input())).code
    expired = (await issue(database_url, issue_input("old", ttl_seconds=60.0))).code
    now = utcnow()

    with session(database_url) as s:
        assert redeem_coupon(s, "KAERU-NOSUCHCODE", "o1", now, customer_id="c1") is None
        assert redeem_coupon(s, expired, "o1", now + timedelta(minutes=2), customer_id="c1") is None
        # as a shopper types it
        won = redeem_coupon(s, f"  {code.lower()} ", "o1", now, customer_id="c1")
        assert won is not None and won.code == code
    with session(database_url) as s:
        # a re-delivered order
        again = redeem_coupon(s, code, "o1", now + timedelta(hours=1), customer_id="c1")
        assert again is not None and again.redeemed_order_id == "o1"
        assert redeem_coupon(s, code, "o2", now, customer_id="c1") is None  # single use
    with session(database_url) as s:
        row = s.get(Coupon, code)
        assert row is not None
        assert (row.redeemed_order_id, row.redeemed_at) == ("o1", now)
        old = s.get(Coupon, expired)
        assert old is not None and old.redeemed_order_id is None


async def test_two_orders_racing_for_one_code_one_wins(database_url: str) -> None:
    code = (await issue(database_url, issue_input())).code
    start = threading.Barrier(2)

    def redeem(order_id: str) -> str | None:
        start.wait()
        with session(database_url) as s:
            coupon = redeem_coupon(s, code, order_id, utcnow(), customer_id="c1")
            return coupon.redeemed_order_id if coupon else None

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(redeem, ["o1", "o2"]))

    winners = [r for r in results if r is not None]
    assert len(winners) == 1 and winners[0] in ("o1", "o2")
    with session(database_url) as s:
        row = s.get(Coupon, code)
        assert row is not None and row.redeemed_order_id == winners[0]


async def test_an_order_of_another_customer_cannot_redeem_it(database_url: str) -> None:
    code = (await issue(database_url, issue_input())).code  # issued to c1
    now = utcnow()

    with session(database_url) as s:
        assert redeem_coupon(s, code, "o-eve", now, customer_id="eve") is None
    with session(database_url) as s:
        assert redeem_coupon(s, code, "o-eve", now, customer_id="eve") is None  # re-delivered
        row = s.get(Coupon, code)
        assert row is not None and row.redeemed_order_id is None
        won = redeem_coupon(s, code, "o-c1", now, customer_id="c1")
        assert won is not None and won.redeemed_order_id == "o-c1"

    (refused,) = touchpoints(database_url, "coupon_refused")
    assert (refused.customer_id, refused.order_id, refused.coupon_code) == ("eve", "o-eve", code)
    assert refused.detail["reason"] == "issued to another customer"
    assert refused.detail["owner"] == "c1"
