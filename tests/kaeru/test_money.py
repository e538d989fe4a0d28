"""Money is integer minor units; bad or huge amounts are a ValueError, never a crash."""

from __future__ import annotations

from decimal import Decimal

import pytest

from kaeru.money import MAX_MINOR, format_minor, to_minor


@pytest.mark.parametrize(
    ("amount", "currency", "minor"),
    [
        (19.99, "USD", 1999),
        ("0.1", "EUR", 10),
        (0.105, "USD", 11),  # half up, from the decimal text, not the binary float
        (1500, "JPY", 1500),
        ("1.2345", "KWD", 1235),
        (Decimal("-3.50"), "usd", -350),
    ],
)
def test_to_minor(amount: float | str | Decimal, currency: str, minor: int) -> None:
    assert to_minor(amount, currency) == minor


@pytest.mark.parametrize("amount", ["abc", "NaN", "Infinity", "1e999999", 1e300, True, ""])
def test_bad_amounts_are_value_errors(amount: object) -> None:
    with pytest.raises(ValueError):
        to_minor(amount, "USD")  # type: ignore[arg-type]


def test_the_largest_amount_fits_the_columns() -> None:
    assert to_minor(Decimal(MAX_MINOR).scaleb(-2), "USD") == MAX_MINOR


def test_format_minor() -> None:
    assert format_minor(1999, "usd") == "19.99 USD"
    assert format_minor(1500, "JPY") == "1500 JPY"


def test_orders_are_read_one_way_for_ingestion_and_journeys() -> None:
    from kaeru.commerce import order_total_of

    order = order_total_of({"order_id": "x" * 201, "total": "12.5", "coupon": True}, "msg-1")
    assert (order.order_id, order.total_minor, order.currency, order.coupon) == (
        "msg-1",
        1250,
        "USD",
        None,
    )
    order = order_total_of({"order_id": 42, "revenue": 1e300, "currency": "jpy"}, "msg-2")
    assert (order.order_id, order.total_minor, order.currency) == ("42", None, "JPY")
