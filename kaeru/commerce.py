"""How kaeru reads Segment e-commerce properties: one reading for ingestion and journeys.

Pure functions with no I/O, so workflow code may import them inside the sandbox.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kaeru.money import to_minor

#: The longest id (order, product, coupon) kaeru stores.
MAX_ID_LENGTH = 200
#: The longest product name kaeru stores (the column's size).
MAX_NAME_LENGTH = 500

#: What looks like a link in a product name: a scheme (``https://…``, ``javascript:…``), an
#: address or user-info (``a@b.c``), ``www.…``, or a dotted host name whose last label is
#: letters (``evil.example/login``). A false positive (``Node.js``) only shortens a name; a
#: miss would put a phishing link into other customers' emails.
_LINKISH = re.compile(
    r"""(?ix)
    \b[a-z][a-z0-9+.-]*://\S*               # a URL with a scheme
    | \b(?:javascript|data|vbscript|mailto|tel|sms):\S*  # schemes without //
    | \S*@\S+                              # an address, or user-info before a host
    | \bwww\.\S*                           # www.anything
    | \b(?:[a-z0-9-]+\.)+[a-z]{2,}\b(?:[/:?#]\S*)?  # a host name, with any path
    """
)


def clean_product_name(value: Any) -> str | None:
    """A product name fit for the catalogue: links removed, spaces collapsed, capped; None if
    nothing is left. Product names reach other customers' emails (recommendations)."""
    if not isinstance(value, str):
        return None
    text = " ".join(_LINKISH.sub(" ", value).split())
    return text[:MAX_NAME_LENGTH] or None


def currency_of(value: Any, default: str = "USD") -> str:
    """An ISO 4217 code from the event, or ``default``."""
    if isinstance(value, str) and len(value) == 3 and value.isalpha():
        return value.upper()
    return default


def minor_of(amount: Any, currency: str) -> int | None:
    """An amount as shops send it (``19.99``) in minor units; None if it is not a usable one."""
    if amount is None or isinstance(amount, bool) or not isinstance(amount, int | float | str):
        return None
    try:
        return to_minor(amount, currency)
    except ValueError:  # not a number, or beyond the 64-bit money columns
        return None


def id_of(value: Any) -> str | None:
    """A string or integer id within :data:`MAX_ID_LENGTH`, else None."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value)
    return text if 0 < len(text) <= MAX_ID_LENGTH else None


@dataclass(frozen=True)
class OrderTotal:
    """What an ``Order Completed`` says about money: its id, value and coupon."""

    order_id: str
    total_minor: int | None  # None: the total was missing or unreadable
    currency: str
    coupon: str | None


def order_total_of(props: dict[str, Any], fallback_id: str) -> OrderTotal:
    """Read an ``Order Completed``'s properties; ``fallback_id`` (the messageId) names an
    order whose ``order_id`` is missing or unusable."""
    currency = currency_of(props.get("currency"))
    amount = props.get("total", props.get("revenue", 0))
    return OrderTotal(
        order_id=id_of(props.get("order_id")) or fallback_id,
        total_minor=minor_of(amount if amount is not None else 0, currency),
        currency=currency,
        coupon=id_of(props.get("coupon")),
    )
