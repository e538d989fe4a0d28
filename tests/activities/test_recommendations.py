"""Recommendations from order history, on SQLite and PostgreSQL."""

from __future__ import annotations

from temporalio.testing import ActivityEnvironment

from activities.recommendations import RecommendationActivities
from activities.types import LookUpProducts, RecommendInput, RecommendResult
from tests.activities.factories import add_order, add_products
from tests.conftest import make_settings


async def recommend(url: str, product_ids: list[str], limit: int = 3) -> RecommendResult:
    activities = RecommendationActivities(make_settings(url))
    result: RecommendResult = await ActivityEnvironment().run(
        activities.recommend_products, RecommendInput("c1", product_ids, limit)
    )
    return result


def ids(result: RecommendResult) -> list[str]:
    return [p.product_id for p in result.products]


def shop_history(url: str) -> None:
    add_products(url, "a", "b", "c", "d", "e", "f")
    add_order(url, "o1", "a", "b")
    add_order(url, "o2", "a", "b", "c")
    add_order(url, "o3", "a", "c")
    add_order(url, "o4", "b", "d")
    add_order(url, "o5", "d", "e")
    add_order(url, "o6", "e")
    # Bought with "a" more than anything, but not in the catalogue: never shown.
    for n in range(5):
        add_order(url, f"ghost-{n}", "a", "ghost")


async def test_bought_together_ranked_then_topped_up_with_popular(database_url: str) -> None:
    shop_history(database_url)

    result = await recommend(database_url, ["a"])

    # b and c were each bought with a twice; b is more popular (3 orders against 2).
    # d tops up the list: as popular as e, and first by id. f was never ordered.
    assert ids(result) == ["b", "c", "d"]
    assert result.source == "bought_together"
    b = result.products[0]
    assert (b.name, b.price_minor, b.currency) == ("Product b", 1000, "USD")
    assert (b.image_url, b.url) == ("https://cdn.shop.example/b.jpg", "https://shop.example/p/b")


async def test_an_order_with_two_cart_products_counts_once(database_url: str) -> None:
    add_products(database_url, "a", "b", "c", "e")
    add_order(database_url, "x", "a", "b", "c")  # c with both cart products, in one order
    add_order(database_url, "z1", "c")
    add_order(database_url, "z2", "c")
    add_order(database_url, "y1", "a", "e")
    add_order(database_url, "y2", "b", "e")

    # e shares two orders with the cart, c one. Counting c once per cart product would tie
    # them at two, and c, the more popular, would wrongly come first.
    result = await recommend(database_url, ["a", "b", "a"])

    assert ids(result) == ["e", "c"]  # never the cart's own a or b
    assert result.source == "bought_together"


async def test_without_matching_history_the_most_popular(database_url: str) -> None:
    shop_history(database_url)

    result = await recommend(database_url, ["f"], limit=4)

    assert ids(result) == ["a", "b", "c", "d"]  # a: 8 orders, b: 3, then c, d, e at 2 by id
    assert result.source == "popular"


async def test_empty_shop_and_zero_limit(database_url: str) -> None:
    assert await recommend(database_url, ["a"]) == RecommendResult([], "popular")
    shop_history(database_url)
    assert ids(await recommend(database_url, ["a"], limit=0)) == []


async def test_look_up_reads_the_catalogue_in_the_order_asked(database_url: str) -> None:
    add_products(database_url, "a", "b", "c")
    activities = RecommendationActivities(make_settings(database_url))
    result: RecommendResult = await ActivityEnvironment().run(
        activities.look_up_products, LookUpProducts(["c", "missing", "a", "c"])
    )
    assert ids(result) == ["c", "a"]
    assert result.source == "catalogue"
    assert result.products[0].name == "Product c"
