"""Recommendations from the shop's own orders, precomputed: what is bought together, and the
best-sellers every answer falls back to.

A refresh (:func:`refresh`: a Temporal Schedule every ``KAERU_RECOMMENDATIONS_REFRESH``, and
``kaeru recommendations refresh``) reads every order and writes, for each product A, the
products B bought with it: ``together`` is the number of orders holding both (the support),
``confidence`` is ``together`` over the orders holding A. A pair is kept only with at least
``KAERU_RECOMMENDATIONS_MIN_SUPPORT`` orders together and a confidence of at least
``KAERU_RECOMMENDATIONS_MIN_CONFIDENCE``. B's ranked by confidence, then popularity (orders
holding B), then product id, and the first :data:`PER_PRODUCT` are stored. Best-sellers are
ranked by orders, then product id (the first :data:`BEST_SELLERS`). Only products of the
catalogue (``products``: name, price, image) that are available are stored; the readers
check availability again, so a product marked unavailable after the refresh is not shown.

The refresh deletes and rewrites both tables and its record in ONE transaction: a reader
sees the whole old answer or the whole new one, never half a refresh.

Readers (:func:`for_products`, :func:`for_customer`) only read those tables by key: the
emails (``recommend_products``) and ``GET /v1/recommendations`` give the same answer.
For several products (a cart), a candidate's score is its best confidence with any of them,
then its orders together summed over them, then its id; the cart's own products are never
shown. Fewer than asked are topped up with best-sellers (``source`` is ``popular`` when
nothing came from the pairs).
"""

from __future__ import annotations

import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass

from sqlalchemy import delete, text
from sqlmodel import Session, col, select

from activities.types import ProductInfo, RecommendResult
from kaeru.models import (
    BestSeller,
    CartItem,
    IdentityAlias,
    Order,
    OrderLine,
    Product,
    Recommendation,
    RecommendationRefresh,
    utcnow,
)

BOUGHT_TOGETHER = "bought_together"
POPULAR = "popular"
#: Recommendations stored per product: the most any journey or the endpoint asks for.
PER_PRODUCT = 12
#: Best-sellers stored: enough to top up an answer after leaving out what a customer bought.
BEST_SELLERS = 100
#: The PostgreSQL advisory lock a refresh holds until it commits.
REFRESH_LOCK = zlib.crc32(b"kaeru:recommendations-refresh")
#: A customer's most recent orders whose products their recommendations start from.
RECENT_ORDERS = 5


@dataclass(frozen=True)
class Refreshed:
    """What a refresh read and wrote."""

    orders: int
    pairs: int
    best_sellers: int


def refresh(s: Session, min_support: int, min_confidence: float) -> Refreshed:
    """Recompute both tables from the orders and replace them in this session's transaction.

    The caller commits (:func:`kaeru.db.write_session`): until then readers see the old rows.
    Two refreshes at once (the schedule's and the CLI's) take turns: on SQLite the write
    session's ``BEGIN IMMEDIATE``, on PostgreSQL an advisory lock held to the commit (without
    it the second one's delete misses the first one's new rows and its insert collides).
    """
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": REFRESH_LOCK})
    baskets: dict[str, set[str]] = defaultdict(set)
    lines = select(col(OrderLine.order_id), col(OrderLine.product_id))
    for order_id, product_id in s.execute(lines):
        baskets[order_id].add(product_id)
    shown = set(s.exec(select(Product.product_id).where(col(Product.available))))
    popularity: Counter[str] = Counter()
    pairs: Counter[tuple[str, str]] = Counter()
    for basket in baskets.values():
        popularity.update(basket)
        for a in basket:
            pairs.update((a, b) for b in basket if b != a and b in shown)
    by_product: dict[str, list[tuple[float, int, str, int]]] = defaultdict(list)
    for (a, b), together in pairs.items():
        confidence = together / popularity[a]
        if together >= min_support and confidence >= min_confidence:
            by_product[a].append((-confidence, -popularity[b], b, together))
    rows = [
        {
            "product_id": a,
            "rank": rank,
            "recommended_id": b,
            "together": together,
            "confidence": -negative,
        }
        for a, found in by_product.items()
        for rank, (negative, _, b, together) in enumerate(sorted(found)[:PER_PRODUCT])
    ]
    best = sorted((p for p in popularity if p in shown), key=lambda p: (-popularity[p], p))
    best_rows = [
        {"rank": rank, "product_id": p, "orders": popularity[p]}
        for rank, p in enumerate(best[:BEST_SELLERS])
    ]
    s.execute(delete(Recommendation))
    s.execute(delete(BestSeller))
    if rows:
        s.execute(Recommendation.__table__.insert(), rows)  # type: ignore[attr-defined]
    if best_rows:
        s.execute(BestSeller.__table__.insert(), best_rows)  # type: ignore[attr-defined]
    done = Refreshed(orders=len(baskets), pairs=len(rows), best_sellers=len(best_rows))
    record = s.get(RecommendationRefresh, 1) or RecommendationRefresh(
        id=1, orders=0, pairs=0, best_sellers=0
    )
    record.refreshed_at = utcnow()
    record.orders, record.pairs, record.best_sellers = done.orders, done.pairs, done.best_sellers
    s.add(record)
    return done


def last_refresh(s: Session) -> RecommendationRefresh | None:
    """The last refresh's record, or None if there has been none."""
    return s.get(RecommendationRefresh, 1)


def for_products(s: Session, product_ids: list[str], limit: int) -> RecommendResult:
    """What to show next to ``product_ids`` (a cart, a product page), from the tables only."""
    return _answer(s, sorted(set(product_ids)), exclude=set(product_ids), limit=limit)


def for_customer(s: Session, customer_id: str, limit: int) -> RecommendResult:
    """What to show ``customer_id``: from their cart and their last :data:`RECENT_ORDERS`
    orders, never a product they bought or have in their cart. An anonymous id merged into
    a customer (``identity_aliases``) answers for that customer, whose events it now names."""
    if (alias := s.get(IdentityAlias, customer_id)) is not None:
        customer_id = alias.customer_id
    cart = set(s.exec(select(CartItem.product_id).where(col(CartItem.customer_id) == customer_id)))
    recent = list(
        s.exec(
            select(Order.order_id)
            .where(col(Order.customer_id) == customer_id)
            .order_by(col(Order.completed_at).desc(), col(Order.order_id))
            .limit(RECENT_ORDERS)
        )
    )
    lately = set(s.exec(select(OrderLine.product_id).where(col(OrderLine.order_id).in_(recent))))
    bought = set(
        s.exec(
            select(OrderLine.product_id)
            .join(Order, col(Order.order_id) == col(OrderLine.order_id))
            .where(col(Order.customer_id) == customer_id)
        )
    )
    return _answer(s, sorted(cart | lately), exclude=cart | bought, limit=limit)


def _answer(s: Session, anchors: list[str], exclude: set[str], limit: int) -> RecommendResult:
    if limit <= 0:
        return RecommendResult(products=[], source=BOUGHT_TOGETHER)
    best: dict[str, float] = {}
    together: Counter[str] = Counter()
    if anchors:
        rows = s.exec(
            select(
                Recommendation.recommended_id, Recommendation.confidence, Recommendation.together
            )
            .join(Product, col(Product.product_id) == col(Recommendation.recommended_id))
            .where(col(Recommendation.product_id).in_(anchors), col(Product.available))
        )
        for product_id, confidence, count in rows:
            if product_id not in exclude:
                best[product_id] = max(best.get(product_id, 0.0), confidence)
                together[product_id] += count
    chosen = sorted(best, key=lambda p: (-best[p], -together[p], p))[:limit]
    if len(chosen) < limit:
        left_out = exclude | set(chosen)
        sellers = s.exec(
            select(BestSeller.product_id)
            .join(Product, col(Product.product_id) == col(BestSeller.product_id))
            .where(col(Product.available))
            .order_by(col(BestSeller.rank))
        )
        chosen += [p for p in sellers if p not in left_out][: limit - len(chosen)]
    products = {
        p.product_id: p for p in s.exec(select(Product).where(col(Product.product_id).in_(chosen)))
    }
    return RecommendResult(
        products=[info(products[p]) for p in chosen if p in products],
        source=BOUGHT_TOGETHER if best else POPULAR,
    )


def info(product: Product) -> ProductInfo:
    """``product`` as an email or the endpoint shows it."""
    return ProductInfo(
        product_id=product.product_id,
        name=product.name,
        price_minor=product.price_minor,
        currency=product.currency,
        image_url=product.image_url,
        url=product.url,
    )
