"""A tea shop's order history whose right recommendations are known: the script decides them.

The counts are fixed; the seed only shuffles which customer placed which order and when, so
the answers below hold for every seed (``generate(seed)``):

- 100 orders hold sencha: 70 also hold a mug, 30 a teapot (never both). A mug is bought with
  sencha in 70 % of sencha baskets; a teapot in 30 %. 20 more orders hold a mug alone, so mug
  is in 90 orders and sencha is in 70/90 of them.
- 10 of the teapot baskets also hold a gift card, which the catalogue marks unavailable: never
  recommended. 40 of the mug baskets hold "ghost", a product missing from the catalogue:
  never recommended. One mug basket holds honey: support 1, under the minimum of 2.
- 50 orders hold matcha: 45 a whisk, 20 a bowl (confidence 0.9 and 0.4).
- 60 orders are a kettle alone, 30 cookies alone, 25 a filter alone.
- The order ``tea-lover-1`` (sencha and a teapot, the first teapot basket) is the customer
  ``tea-lover``'s only order.

So the best-sellers are sencha (100), mug (90), kettle (60), matcha (50), whisk (45), then
cookies and teapot (30 each, by id), filter (25), bowl (20), honey (1).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from kaeru.db import session
from kaeru.models import Order, OrderLine, Product

CATALOGUE = (
    "sencha",
    "mug",
    "teapot",
    "giftcard",
    "honey",
    "matcha",
    "whisk",
    "bowl",
    "kettle",
    "cookies",
    "filter",
)
UNAVAILABLE = ("giftcard",)
TEA_LOVER = "tea-lover"


@dataclass(frozen=True)
class Basket:
    order_id: str
    customer_id: str
    completed_at: datetime
    products: tuple[str, ...]


def baskets() -> list[tuple[str, ...]]:
    """The shop's baskets, in the order the docstring states them."""
    found: list[tuple[str, ...]] = []
    for n in range(70):
        extra = ("ghost",) if n < 40 else ("honey",) if n == 40 else ()
        found.append(("sencha", "mug", *extra))
    found += [("sencha", "teapot", *(("giftcard",) if n >= 20 else ())) for n in range(30)]
    found += [("mug",)] * 20
    found += [("matcha", "whisk", *(("bowl",) if n < 20 else ())) for n in range(45)]
    found += [("matcha",)] * 5
    found += [("kettle",)] * 60 + [("cookies",)] * 30 + [("filter",)] * 25
    return found


def generate(seed: int) -> list[Basket]:
    """The orders: :func:`baskets` given to 40 customers at random times over 90 days."""
    rng = random.Random(seed)
    start = datetime(2026, 9, 1, tzinfo=UTC)
    orders: list[Basket] = []
    for n, products in enumerate(baskets()):
        at = start + timedelta(minutes=rng.randrange(90 * 24 * 60))
        if n == 70:  # the first teapot basket
            orders.append(Basket(f"{TEA_LOVER}-1", TEA_LOVER, at, products))
        else:
            orders.append(Basket(f"o-{n}", f"c-{rng.randrange(40)}", at, products))
    rng.shuffle(orders)
    return orders


def store(url: str, seed: int = 17) -> None:
    """Write the catalogue and :func:`generate`'s orders into the database at ``url``."""
    with session(url) as s:
        for product_id in CATALOGUE:
            s.add(
                Product(
                    product_id=product_id,
                    name=product_id.title(),
                    price_minor=1200,
                    currency="EUR",
                    image_url=f"https://cdn.tea.example/{product_id}.jpg",
                    url=f"https://tea.example/p/{product_id}",
                    available=product_id not in UNAVAILABLE,
                )
            )
        for basket in generate(seed):
            s.add(
                Order(
                    order_id=basket.order_id,
                    customer_id=basket.customer_id,
                    total_minor=1200 * len(basket.products),
                    currency="EUR",
                    completed_at=basket.completed_at,
                )
            )
            for product_id in basket.products:
                s.add(OrderLine(order_id=basket.order_id, product_id=product_id))
