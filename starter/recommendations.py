"""``GET /v1/recommendations``: the shop's site asks what to show, from the precomputed tables.

``?product_id=…`` (repeat it for a cart) answers what is bought together with those products;
``?customer_id=…`` answers for a customer, from their cart and last orders, leaving out what
they bought. ``limit`` (1 to 12, default 3). Both read only the tables a refresh wrote
(:mod:`kaeru.recommendations`), so the answer is a few indexed reads and the same products
the emails show.

Auth: HTTP Basic with the read key (``KAERU_READ_KEY``) as user name. It opens this endpoint
only; neither write key opens it (the server key writes, the browser key is public), and the
read key writes nothing (ingestion knows only the write keys, and the settings refuse a read
key equal to one of them).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from activities.types import RecommendResult
from kaeru import recommendations
from kaeru.commerce import MAX_ID_LENGTH
from kaeru.db import session
from kaeru.settings import Settings
from starter.deps import ApiError, SettingsDep, basic_auth_user, key_matches, unauthorized
from starter.events import ErrorBody

#: The most products one answer holds, and the most ``product_id`` a request may name.
MAX_LIMIT = 12
MAX_PRODUCTS = 50
DEFAULT_LIMIT = 3


async def require_read_key(request: Request, settings: SettingsDep) -> None:
    """HTTP Basic auth with the read key (``KAERU_READ_KEY``) as user name."""
    key = settings.read_key.get_secret_value() if settings.read_key else ""
    if not key:
        raise ApiError(
            503,
            "not_configured",
            "recommendations are not served because no read key is set: set KAERU_READ_KEY "
            "to a random key (not a write key) and restart the API",
        )
    user = basic_auth_user(request)
    if user is None:
        raise unauthorized("send the read key (KAERU_READ_KEY) as the Basic auth user")
    if not key_matches(user, key):
        raise unauthorized("wrong key: this endpoint takes the read key KAERU_READ_KEY only")


class ProductOut(BaseModel):
    product_id: str
    name: str
    price_minor: int | None
    currency: str
    image_url: str | None
    url: str | None


class RecommendationsOut(BaseModel):
    """What to show: ``source`` is ``bought_together``, or ``popular`` (best-sellers only)."""

    source: str
    products: list[ProductOut]


router = APIRouter(tags=["recommendations"])


def bad_request(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise bad_request(f"limit must be a whole number from 1 to {MAX_LIMIT}, e.g. limit=3")
    return int(raw)


def _ids(values: list[str], name: str) -> list[str]:
    for value in values:
        if not value.strip() or len(value) > MAX_ID_LENGTH:
            raise bad_request(f"{name} must be 1 to {MAX_ID_LENGTH} characters")
    return values


def _answer(settings: Settings, product_ids: list[str], customer_id: str | None, limit: int) -> Any:
    with session(settings.resolved_database_url) as s:
        if customer_id is not None:
            return recommendations.for_customer(s, customer_id, limit)
        return recommendations.for_products(s, product_ids, limit)


@router.get(
    "/v1/recommendations",
    response_model=RecommendationsOut,
    dependencies=[Depends(require_read_key)],
    responses={
        400: {"model": ErrorBody, "description": "no product_id or customer_id, or a bad one"},
        401: {"model": ErrorBody, "description": "missing or wrong read key"},
        503: {"model": ErrorBody, "description": "KAERU_READ_KEY is unset, or storage is down"},
    },
)
async def get_recommendations(request: Request, settings: SettingsDep) -> RecommendationsOut:
    """Products to show next to ``product_id`` (repeatable) or to ``customer_id``."""
    query = request.query_params
    unknown = sorted(set(query) - {"product_id", "customer_id", "limit"})
    if unknown:
        raise bad_request(
            f"unknown parameter {unknown[0]!r}: use product_id, customer_id and limit"
        )
    product_ids = _ids(query.getlist("product_id"), "product_id")
    customers = _ids(query.getlist("customer_id"), "customer_id")
    if bool(product_ids) == bool(customers):
        raise bad_request(
            "name either product_id (once per product, e.g. ?product_id=mug) or one "
            "customer_id (e.g. ?customer_id=c-42), not both and not neither"
        )
    if len(customers) > 1 or len(product_ids) > MAX_PRODUCTS:
        raise bad_request(f"name one customer_id, or at most {MAX_PRODUCTS} product_id")
    if len(query.getlist("limit")) > 1:
        raise bad_request("give limit once")
    limit = _limit(query.get("limit"))
    found: RecommendResult = await asyncio.to_thread(
        _answer, settings, product_ids, customers[0] if customers else None, limit
    )
    return RecommendationsOut(
        source=found.source,
        products=[ProductOut(**vars(p)) for p in found.products],
    )
