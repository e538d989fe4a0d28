"""Recommendations in emails: the precomputed answers of :mod:`kaeru.recommendations`.

``recommend_products`` reads the same tables as ``GET /v1/recommendations``, so an email and
the shop's site show the same products: bought together with the cart, topped up with
best-sellers, never the cart's own and never an unavailable product. A shop whose
recommendations were never refreshed (a new install, before the schedule's first run) gets
one refresh at its first ask, so its first emails have recommendations too.

What is shown goes into other customers' emails, so it comes from trusted sources only:
``products`` is written by server-key events and ``kaeru catalog import`` alone (never the
browser key), with links stripped from names, and ``order_lines`` by orders that count
(``starter/ingest.py``).
"""

from __future__ import annotations

import asyncio

from sqlmodel import Session, col, select
from temporalio import activity

from activities.types import (
    LookUpProducts,
    ProductInfo,
    RecommendInput,
    RecommendResult,
    RefreshInput,
    RefreshResult,
)
from kaeru import recommendations
from kaeru.db import session, write_session
from kaeru.models import Product
from kaeru.settings import Settings


def look_up(s: Session, product_ids: list[str]) -> list[ProductInfo]:
    """The catalogue's products among ``product_ids``, in the order asked (each once); ids
    the catalogue does not hold are left out."""
    wanted = list(dict.fromkeys(product_ids))
    found = {
        p.product_id: p for p in s.exec(select(Product).where(col(Product.product_id).in_(wanted)))
    }
    return [recommendations.info(found[i]) for i in wanted if i in found]


def refresh_now(settings: Settings) -> recommendations.Refreshed:
    """Recompute the recommendations with ``settings``' thresholds, in one transaction."""
    with write_session(settings.resolved_database_url) as s:
        return recommendations.refresh(
            s, settings.recommendations_min_support, settings.recommendations_min_confidence
        )


class RecommendationActivities:
    """The ``recommend_products``, ``look_up_products`` and ``refresh_recommendations``
    activities, with their settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @activity.defn(name="recommend_products")
    async def recommend_products(self, request: RecommendInput) -> RecommendResult:
        """Products bought together with ``request.product_ids``, or the best-sellers."""
        return await asyncio.to_thread(self._recommend, request)

    def _recommend(self, request: RecommendInput) -> RecommendResult:
        with session(self.settings.resolved_database_url) as s:
            never_refreshed = recommendations.last_refresh(s) is None
        if never_refreshed:
            refresh_now(self.settings)
        with session(self.settings.resolved_database_url) as s:
            return recommendations.for_products(s, request.product_ids, request.limit)

    @activity.defn(name="refresh_recommendations")
    async def refresh_recommendations(self, request: RefreshInput) -> RefreshResult:
        """Recompute the precomputed recommendations (the schedule's one step)."""
        done = await asyncio.to_thread(refresh_now, self.settings)
        return RefreshResult(orders=done.orders, pairs=done.pairs, best_sellers=done.best_sellers)

    @activity.defn(name="look_up_products")
    async def look_up_products(self, request: LookUpProducts) -> RecommendResult:
        """The catalogue's name, price, image and link of each of ``request.product_ids``: what
        a journey shows of products it knows only by id, or a price it watches."""
        return await asyncio.to_thread(self._look_up, request)

    def _look_up(self, request: LookUpProducts) -> RecommendResult:
        with session(self.settings.resolved_database_url) as s:
            return RecommendResult(products=look_up(s, request.product_ids), source="catalogue")
