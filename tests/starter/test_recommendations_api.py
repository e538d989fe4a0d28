"""``GET /v1/recommendations`` on the seeded tea shop (tests/support/tea_shop.py): the known
answers, the same as the emails', with the read key only; on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from temporalio.testing import ActivityEnvironment

from activities.recommendations import RecommendationActivities, refresh_now
from activities.types import RecommendInput, RecommendResult
from kaeru.db import session
from kaeru.models import CartItem, IdentityAlias
from kaeru.settings import Settings
from starter.app import create_app
from tests.conftest import make_settings
from tests.starter.conftest import AUTH, BROWSER_AUTH, asgi_client
from tests.support import tea_shop

READ = ("test-read-key", "")


@pytest.fixture
def shop(database_url: str) -> Settings:
    tea_shop.store(database_url)
    settings = make_settings(database_url, read_key="test-read-key")
    refresh_now(settings)
    return settings


@pytest.fixture
async def site(shop: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(create_app(shop, run_router=False)) as client:
        yield client


async def shown(site: httpx.AsyncClient, **params: Any) -> tuple[list[str], str]:
    answer = await site.get("/v1/recommendations", params=params, auth=READ)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return [p["product_id"] for p in body["products"]], body["source"]


async def test_a_product_page_gets_the_known_answers_the_emails_get(
    site: httpx.AsyncClient, shop: Settings
) -> None:
    assert await shown(site, product_id="sencha") == (
        ["mug", "teapot", "kettle"],
        "bought_together",
    )
    assert await shown(site, product_id=["sencha", "matcha"], limit=2) == (
        ["whisk", "mug"],
        "bought_together",
    )
    assert await shown(site, product_id="honey") == (["sencha", "mug", "kettle"], "popular")
    answer = await site.get("/v1/recommendations?product_id=teapot&limit=1", auth=READ)
    assert answer.json()["products"] == [
        {
            "product_id": "sencha",
            "name": "Sencha",
            "price_minor": 1200,
            "currency": "EUR",
            "image_url": "https://cdn.tea.example/sencha.jpg",
            "url": "https://tea.example/p/sencha",
        }
    ]
    for cart in (["sencha"], ["mug"], ["teapot", "matcha"]):
        emailed: RecommendResult = await ActivityEnvironment().run(
            RecommendationActivities(shop).recommend_products, RecommendInput("c-1", cart, 3)
        )
        assert await shown(site, product_id=cart) == (
            [p.product_id for p in emailed.products],
            emailed.source,
        )


async def test_a_customer_gets_what_goes_with_their_cart_and_orders_not_what_they_bought(
    site: httpx.AsyncClient, shop: Settings
) -> None:
    with session(shop.resolved_database_url) as s:
        s.add(CartItem(customer_id=tea_shop.TEA_LOVER, product_id="matcha", position=0, quantity=1))
        lover = tea_shop.TEA_LOVER
        s.add(IdentityAlias(anonymous_id="anon-7", customer_id=lover, message_id="m", source="s"))

    # Bought sencha and a teapot (never shown again); matcha is in the cart: whisk (0.9 with
    # matcha), mug (0.7 with sencha), bowl (0.4 with matcha).
    assert await shown(site, customer_id=tea_shop.TEA_LOVER) == (
        ["whisk", "mug", "bowl"],
        "bought_together",
    )
    # The browser's anonymous id, merged into the customer at sign-in, answers for them.
    assert await shown(site, customer_id="anon-7") == (["whisk", "mug", "bowl"], "bought_together")
    assert await shown(site, customer_id="someone-new", limit=4) == (
        ["sencha", "mug", "kettle", "matcha"],
        "popular",
    )


async def test_only_the_read_key_opens_it(site: httpx.AsyncClient) -> None:
    url = "/v1/recommendations?product_id=sencha"
    for auth in (None, AUTH, BROWSER_AUTH, ("wrong", "")):
        answer = await site.get(url, auth=auth)
        assert answer.status_code == 401, auth
        assert answer.json()["code"] == "unauthorized"
        assert "KAERU_READ_KEY" in answer.json()["message"]
    # The read key writes nothing.
    event = {"userId": "c-1", "event": "Product Added", "properties": {"product_id": "mug"}}
    refused = await site.post("/v1/track", json=event, auth=READ)
    assert refused.status_code == 401


async def test_without_a_read_key_it_answers_503_with_the_fix(database_url: str) -> None:
    async with asgi_client(create_app(make_settings(database_url), run_router=False)) as site:
        answer = await site.get("/v1/recommendations?product_id=sencha", auth=READ)
    assert answer.status_code == 503
    assert "set KAERU_READ_KEY" in answer.json()["message"]


def test_the_read_key_may_not_be_a_write_key(sqlite_url: str) -> None:
    for name in ("write_key", "browser_write_key"):
        with pytest.raises(ValidationError, match="KAERU_READ_KEY must differ"):
            make_settings(sqlite_url, **{name: "same", "read_key": "same"})


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("", "name either product_id"),
        ("?product_id=mug&customer_id=c-1", "not both"),
        ("?customer_id=a&customer_id=b", "one customer_id"),
        ("?product_id=", "product_id must be 1 to 200 characters"),
        ("?product_id=mug&limit=0", "limit must be a whole number from 1 to 12"),
        ("?product_id=mug&limit=three", "limit must be a whole number"),
        ("?product_id=mug&limit=1&limit=2", "give limit once"),
        ("?productId=mug", "unknown parameter 'productId'"),
    ],
)
async def test_a_bad_question_is_a_400_with_the_reason(
    sqlite_url: str, query: str, reason: str
) -> None:
    app = create_app(make_settings(sqlite_url, read_key="test-read-key"), run_router=False)
    async with asgi_client(app) as site:
        answer = await site.get(f"/v1/recommendations{query}", auth=READ)
    assert answer.status_code == 400
    assert answer.json()["code"] == "invalid_request"
    assert reason in answer.json()["message"]
