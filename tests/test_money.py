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
