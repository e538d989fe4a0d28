"""Money as integer minor units plus an ISO 4217 currency code; never floats."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

# ISO 4217 currencies whose minor unit is not 1/100.
_EXPONENTS = {
    "BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "ISK": 0, "JPY": 0, "KMF": 0, "KRW": 0, "PYG": 0,
    "RWF": 0, "UGX": 0, "UYI": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0, "XPF": 0,
    "BHD": 3, "IQD": 3, "JOD": 3, "KWD": 3, "LYD": 3, "OMR": 3, "TND": 3,
}  # fmt: skip


#: The largest amount kaeru stores (a signed 64-bit column).
MAX_MINOR = 2**63 - 1


def exponent(currency: str) -> int:
    """Digits after the decimal point for ``currency``."""
    return _EXPONENTS.get(currency.upper(), 2)


def to_minor(amount: int | float | str | Decimal, currency: str) -> int:
    """Convert a decimal amount as shops send it (``19.99``) to minor units (``1999``).

    Raises:
        ValueError: the amount is not a finite number.
    """
    if isinstance(amount, bool):
        raise ValueError("amount must be a number")
    try:
        value = Decimal(str(amount))
    except InvalidOperation as exc:
        raise ValueError(f"{amount!r} is not a number") from exc
    if not value.is_finite():
        raise ValueError("amount must be finite")
    try:
        scaled = value.scaleb(exponent(currency)).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    except ArithmeticError as exc:  # overflow, or too many digits for the decimal context
        raise ValueError(f"{amount!r} is too large an amount") from exc
    if abs(scaled) > MAX_MINOR:
        raise ValueError(f"{amount!r} is too large an amount")
    return int(scaled)


def format_minor(amount_minor: int, currency: str) -> str:
    """Human form of a minor-unit amount: ``1999, "USD"`` gives ``"19.99 USD"``."""
    digits = exponent(currency)
    value = Decimal(amount_minor).scaleb(-digits)
    return f"{value:.{digits}f} {currency.upper()}"
