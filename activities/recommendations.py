"""Recommendations from the shop's own order history: what is bought together with the cart.

A product's score is the number of orders that hold it together with any product of the
cart; ties go to the more popular product overall (orders holding it), then to product id,
so the answer is stable. Only products in ``products`` (which has their name, price and
image) are shown, never the cart's own. Fewer matches than asked for are topped up with the
most popular products; a shop with no matching history at all gets only those (``popular``).
Plain SQL aggregates, the same on SQLite and PostgreSQL.

What is shown goes into other customers' emails, so it comes from trusted sources only:
``products`` is written by server-key events alone (never the browser key), with links
stripped from names, and ``order_lines`` by orders that count (``starter/ingest.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import func
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select
from temporalio import activity

from activities.types import LookUpProducts, ProductInfo, RecommendInput, RecommendResult
from kaeru.db import session
from kaeru.models import OrderLine, Product
from kaeru.settings import Settings

BOUGHT_TOGETHER = "bought_together"
POPULAR = "popular"


def recommend(s: Session, product_ids: list[str], limit: int) -> RecommendResult:
    """The products to show next to a cart of ``product_ids`` (see the module docstring)."""
    if limit <= 0:
        return RecommendResult(products=[], source=BOUGHT_TOGETHER)
    cart = sorted(set(product_ids))
    together = _bought_together(s, cart, limit) if cart else []
    shown = {p.product_id for p in together}
    popular = _popular(s, exclude=set(cart) | shown, limit=limit - len(together))
    return RecommendResult(
        products=together + popular, source=BOUGHT_TOGETHER if together else POPULAR
    )


def _popularity() -> Any:
    """Orders per product, as a subquery."""
    return (
        select(OrderLine.product_id, func.count().label("orders"))
        .group_by(col(OrderLine.product_id))
        .subquery("popularity")
    )


def _bought_together(s: Session, cart: list[str], limit: int) -> list[ProductInfo]:
    mine, other = aliased(OrderLine), aliased(OrderLine)
    popularity = _popularity()
    # Orders holding the product and some cart product; DISTINCT because an order with two
    # cart products would otherwise count twice.
    shared = (
        select(other.product_id, func.count(func.distinct(other.order_id)).label("together"))
        .join(mine, col(mine.order_id) == col(other.order_id))
        .where(col(mine.product_id).in_(cart), col(other.product_id).not_in(cart))
        .group_by(col(other.product_id))
        .subquery("shared")
    )
    query = (
        select(Product)
        .join(shared, shared.c.product_id == col(Product.product_id))
        .join(popularity, popularity.c.product_id == col(Product.product_id))
        .order_by(shared.c.together.desc(), popularity.c.orders.desc(), col(Product.product_id))
        .limit(limit)
    )
    return [_info(p) for p in s.exec(query)]


def _popular(s: Session, exclude: set[str], limit: int) -> list[ProductInfo]:
    if limit <= 0:
        return []
    popularity = _popularity()
    query = (
        select(Product)
        .join(popularity, popularity.c.product_id == col(Product.product_id))
        .where(col(Product.product_id).not_in(exclude))
        .order_by(popularity.c.orders.desc(), col(Product.product_id))
        .limit(limit)
    )
    return [_info(p) for p in s.exec(query)]


def look_up(s: Session, product_ids: list[str]) -> list[ProductInfo]:
    """The catalogue's products among ``product_ids``, in the order asked (each once); ids
    the catalogue does not hold are left out."""
    wanted = list(dict.fromkeys(product_ids))
    found = {
        p.product_id: p for p in s.exec(select(Product).where(col(Product.product_id).in_(wanted)))
    }
    return [_info(found[i]) for i in wanted if i in found]


def _info(product: Product) -> ProductInfo:
    return ProductInfo(
        product_id=product.product_id,
        name=product.name,
        price_minor=product.price_minor,
        currency=product.currency,
        image_url=product.image_url,
        url=product.url,
    )


class RecommendationActivities:
    """The ``recommend_products`` and ``look_up_products`` activities, with their settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @activity.defn(name="recommend_products")
    async def recommend_products(self, request: RecommendInput) -> RecommendResult:
        """Products bought together with ``request.product_ids``, or the most popular ones."""
        return await asyncio.to_thread(self._recommend, request)

    def _recommend(self, request: RecommendInput) -> RecommendResult:
        with session(self.settings.resolved_database_url) as s:
            return recommend(s, request.product_ids, request.limit)

    @activity.defn(name="look_up_products")
    async def look_up_products(self, request: LookUpProducts) -> RecommendResult:
        """The catalogue's name, price, image and link of each of ``request.product_ids``: what
        a journey shows of products it knows only by id, or a price it watches."""
        return await asyncio.to_thread(self._look_up, request)

    def _look_up(self, request: LookUpProducts) -> RecommendResult:
        with session(self.settings.resolved_database_url) as s:
            return RecommendResult(products=look_up(s, request.product_ids), source="catalogue")
