"""How kaeru reads Segment e-commerce properties: one reading for ingestion and journeys.

Pure functions with no I/O, so workflow code may import them inside the sandbox.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from kaeru.money import exponent, to_minor

#: The longest id (order, product, coupon) kaeru stores.
MAX_ID_LENGTH = 200
#: The longest product name kaeru stores (the column's size).
MAX_NAME_LENGTH = 500
#: The largest quantity one line or event states; outside 1..this the quantity is unusable
#: and its default applies (the cart journey reads quantities the same way).
MAX_QUANTITY = 10_000
#: The most lines a cart keeps (the cart journey's cap, so both hold the same cart).
MAX_CART_LINES = 50
#: The longest URL kept for a product.
MAX_URL_LENGTH = 2000
ORDER_COMPLETED = "Order Completed"
#: Events that change what a customer's cart holds.
CART_EVENTS = frozenset({"Product Added", "Product Removed", "Cart Viewed", "Checkout Started"})

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


def product_id_of(props: Mapping[str, Any]) -> str | None:
    """A product's id from Segment e-commerce properties: ``product_id``, ``sku`` or ``id``."""
    return id_of(props.get("product_id") or props.get("sku") or props.get("id"))


def quantity_of(props: Mapping[str, Any], default: int = 1) -> int:
    """The ``quantity`` stated, or ``default`` when it is missing or outside 1..MAX_QUANTITY."""
    quantity = props.get("quantity", default)
    if isinstance(quantity, bool) or not isinstance(quantity, int | float):
        return default
    return int(quantity) if 1 <= quantity <= MAX_QUANTITY else default


@dataclass(frozen=True)
class OrderedItem:
    """One item of an ``Order Completed`` (``properties.products[]``), price in minor units."""

    product_id: str
    name: str | None
    quantity: int
    price_minor: int | None  # None: the item's price was missing or unreadable
    currency: str
    image_url: str | None = None
    url: str | None = None


def order_items_of(props: Mapping[str, Any]) -> list[OrderedItem]:
    """The items of an ``Order Completed``'s properties, as listed (a product listed twice is
    two items); an item without a usable product id is left out.

    An item's currency is its own, else the order's (:func:`currency_of`); a URL longer than
    :data:`MAX_URL_LENGTH` is dropped.
    """
    currency = currency_of(props.get("currency"))
    products = props.get("products")
    items: list[OrderedItem] = []
    for product in products if isinstance(products, list) else []:
        if not isinstance(product, dict) or (product_id := product_id_of(product)) is None:
            continue
        code = currency_of(product.get("currency"), currency)
        items.append(
            OrderedItem(
                product_id=product_id,
                name=clean_product_name(product.get("name")),
                quantity=quantity_of(product),
                price_minor=minor_of(product.get("price"), code),
                currency=code,
                image_url=_url(product.get("image_url")),
                url=_url(product.get("url")),
            )
        )
    return items


@dataclass
class CartLine:
    """One line of a stored cart (price in minor units)."""

    product_id: str
    quantity: int
    name: str | None = None
    price_minor: int | None = None
    currency: str = "USD"
    image_url: str | None = None
    url: str | None = None

    def as_product(self) -> dict[str, Any]:
        """The line as a ``Cart Viewed`` ``products`` item (price in major units)."""
        price: int | float | None = None
        if self.price_minor is not None:
            major = Decimal(self.price_minor).scaleb(-exponent(self.currency))
            price = int(major) if exponent(self.currency) == 0 else float(major)
        return {
            "product_id": self.product_id,
            "name": self.name,
            "price": price,
            "currency": self.currency,
            "quantity": self.quantity,
            "image_url": self.image_url,
            "url": self.url,
        }


def _url(value: Any) -> str | None:
    return value if isinstance(value, str) and len(value) <= MAX_URL_LENGTH else None


def _cart_line(props: Mapping[str, Any], quantity: int, currency: Any = None) -> CartLine | None:
    product_id = product_id_of(props)
    if product_id is None:
        return None
    code = currency_of(props.get("currency") or currency)
    return CartLine(
        product_id=product_id,
        quantity=quantity,
        name=clean_product_name(props.get("name")),
        price_minor=minor_of(props.get("price"), code),
        currency=code,
        image_url=_url(props.get("image_url")),
        url=_url(props.get("url")),
    )


def apply_cart_event(
    cart: Iterable[CartLine], name: str | None, props: Mapping[str, Any]
) -> list[CartLine] | None:
    """The cart after one event, as the cart journey reads it; None if the event does not
    change it (not a cart event, no product id, no ``products`` list).

    ``Product Added`` adds its quantity (a full cart ignores a new product), ``Product
    Removed`` takes its quantity away (all of it by default), and ``Cart Viewed`` / ``Checkout
    Started`` with a ``products`` list say what the cart holds.
    """
    lines = [replace(line) for line in cart]  # the caller's lines stay as they were
    if name in ("Product Added", "Product Removed"):
        line = _cart_line(props, quantity_of(props))
        if line is None:
            return None
        index = next((i for i, x in enumerate(lines) if x.product_id == line.product_id), None)
        if name == "Product Added":
            if index is None:
                return lines if len(lines) >= MAX_CART_LINES else [*lines, line]
            line.quantity = min(lines[index].quantity + line.quantity, MAX_QUANTITY)
            lines[index] = line
            return lines
        if index is None:
            return lines
        left = lines[index].quantity - quantity_of(props, default=lines[index].quantity)
        if left > 0:
            lines[index].quantity = left
            return lines
        return lines[:index] + lines[index + 1 :]
    if name not in CART_EVENTS or not isinstance(items := props.get("products"), list):
        return None
    stated: dict[str, CartLine] = {}
    for item in items:
        if isinstance(item, dict) and (
            line := _cart_line(item, quantity_of(item), props.get("currency"))
        ):
            stated.setdefault(line.product_id, line)
    return list(stated.values())[:MAX_CART_LINES]


def merge_carts(into: Iterable[CartLine], moved: Iterable[CartLine]) -> list[CartLine]:
    """``into`` with the lines of ``moved`` added (quantities of one product summed, capped;
    at most :data:`MAX_CART_LINES` lines, ``into``'s first)."""
    lines = [replace(line) for line in into]
    for line in moved:
        same = next((x for x in lines if x.product_id == line.product_id), None)
        if same is not None:
            same.quantity = min(same.quantity + line.quantity, MAX_QUANTITY)
        elif len(lines) < MAX_CART_LINES:
            lines.append(replace(line))
    return lines


def cart_topic(product_ids: Iterable[str]) -> str:
    """The topic of a marketing message about a cart of ``product_ids`` (``cart:<digest>``):
    the same products, in any order and quantity, are the same cart (one reminder each)."""
    digest = hashlib.sha256("\n".join(sorted(set(product_ids))).encode()).hexdigest()
    return f"cart:{digest[:32]}"
