"""Recommendations precomputed from a seeded order history whose answers are known
(tests/support/tea_shop.py), read by the emails' activity, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

from sqlmodel import col, select, update
from temporalio.testing import ActivityEnvironment

from activities.recommendations import RecommendationActivities, refresh_now
from activities.types import (
    LookUpProducts,
    RecommendInput,
    RecommendResult,
    RefreshInput,
    RefreshResult,
)
from kaeru import recommendations
from kaeru.db import session, write_session
from kaeru.models import Product, Recommendation, RecommendationRefresh
from kaeru.settings import Settings
from tests.activities.factories import add_order, add_products
from tests.conftest import make_settings
from tests.support import tea_shop


async def recommend(settings: Settings, product_ids: list[str], limit: int = 3) -> RecommendResult:
    activities = RecommendationActivities(settings)
    result: RecommendResult = await ActivityEnvironment().run(
        activities.recommend_products, RecommendInput("c1", product_ids, limit)
    )
    return result


async def refresh(settings: Settings) -> RefreshResult:
    activities = RecommendationActivities(settings)
    result: RefreshResult = await ActivityEnvironment().run(
        activities.refresh_recommendations, RefreshInput()
    )
    return result


def ids(result: RecommendResult) -> list[str]:
    return [p.product_id for p in result.products]


async def test_the_seeded_history_gives_its_known_answers(database_url: str) -> None:
    tea_shop.store(database_url)
    settings = make_settings(database_url)  # min support 2, min confidence 0.1 (defaults)

    done = await refresh(settings)

    assert (done.orders, done.best_sellers) == (285, 10)  # giftcard and ghost never stored
    # Mug with 70 % of sencha baskets, teapot 30 %; topped up with the best-seller kettle.
    sencha = await recommend(settings, ["sencha"])
    assert (ids(sencha), sencha.source) == (["mug", "teapot", "kettle"], "bought_together")
    assert (sencha.products[0].name, sencha.products[0].price_minor) == ("Mug", 1200)
    # Ghost (not in the catalogue) and honey (one order together) are never recommended.
    assert ids(await recommend(settings, ["mug"])) == ["sencha", "kettle", "matcha"]
    # The gift card goes with a third of teapots, but is unavailable.
    assert ids(await recommend(settings, ["teapot"], limit=4)) == [
        "sencha",
        "mug",
        "kettle",
        "matcha",
    ]
    # A cart: each candidate by its best confidence with any cart product.
    assert ids(await recommend(settings, ["sencha", "matcha"], limit=4)) == [
        "whisk",
        "mug",
        "bowl",
        "teapot",
    ]
    honey = await recommend(settings, ["honey"])
    assert (ids(honey), honey.source) == (["sencha", "mug", "kettle"], "popular")
    with session(database_url) as s:
        stored = {r.recommended_id for r in s.exec(select(Recommendation))}
    assert stored.isdisjoint({"ghost", "giftcard", "honey"})


async def test_minimum_support_and_confidence_are_settings(database_url: str) -> None:
    tea_shop.store(database_url)

    await refresh(make_settings(database_url, recommendations_min_confidence=0.5))
    confident = make_settings(database_url)
    assert ids(await recommend(confident, ["sencha"])) == ["mug", "kettle", "matcha"]  # 0.3 < 0.5

    await refresh(make_settings(database_url, recommendations_min_support=31))
    assert ids(await recommend(confident, ["sencha"])) == ["mug", "kettle", "matcha"]  # 30 < 31
    assert ids(await recommend(confident, ["matcha"])) == ["whisk", "sencha", "mug"]  # 20 < 31


async def test_a_product_marked_unavailable_is_never_recommended_even_before_a_refresh(
    database_url: str,
) -> None:
    tea_shop.store(database_url)
    settings = make_settings(database_url)
    await refresh(settings)

    with session(database_url) as s:
        s.execute(update(Product).where(col(Product.product_id) == "mug").values(available=False))

    assert ids(await recommend(settings, ["sencha"])) == ["teapot", "kettle", "matcha"]
    assert ids(await recommend(settings, ["honey"])) == ["sencha", "kettle", "matcha"]


async def test_a_reader_sees_the_old_answer_until_the_refresh_commits(database_url: str) -> None:
    tea_shop.store(database_url)
    settings = make_settings(database_url)
    await refresh(settings)
    add_products(database_url, "tin")
    for n in range(150):  # sencha: 250 orders; tin 0.6, mug 0.28, teapot 0.12
        add_order(database_url, f"tin-{n}", "sencha", "tin")

    with write_session(database_url) as writer:
        recommendations.refresh(writer, min_support=2, min_confidence=0.1)
        writer.flush()
        # Mid-refresh: the old rows are deleted and the new ones written, uncommitted.
        assert ids(await recommend(settings, ["sencha"])) == ["mug", "teapot", "kettle"]
        with session(database_url) as reader:
            assert reader.get(RecommendationRefresh, 1).orders == 285  # type: ignore[union-attr]

    assert ids(await recommend(settings, ["sencha"])) == ["tin", "mug", "teapot"]


async def test_a_shop_never_refreshed_is_refreshed_at_its_first_ask(database_url: str) -> None:
    settings = make_settings(database_url)
    assert await recommend(settings, ["sencha"]) == RecommendResult([], "popular")  # empty shop

    tea_shop.store(database_url)
    # The empty shop's refresh counts: the next one is the schedule's (or the CLI's).
    assert ids(await recommend(settings, ["sencha"])) == []
    with session(database_url) as s:
        s.delete(s.get(RecommendationRefresh, 1))
    assert ids(await recommend(settings, ["sencha"])) == ["mug", "teapot", "kettle"]
    assert ids(await recommend(settings, ["sencha"], limit=0)) == []


async def test_look_up_reads_the_catalogue_in_the_order_asked(database_url: str) -> None:
    add_products(database_url, "a", "b", "c")
    activities = RecommendationActivities(make_settings(database_url))
    result: RecommendResult = await ActivityEnvironment().run(
        activities.look_up_products, LookUpProducts(["c", "missing", "a", "c"])
    )
    assert ids(result) == ["c", "a"]
    assert result.source == "catalogue"
    assert result.products[0].name == "Product c"


async def test_two_refreshes_at_once_both_finish(database_url: str) -> None:
    tea_shop.store(database_url)
    settings = make_settings(database_url)
    await refresh(settings)  # rows to delete, so both transactions meet on them

    done = await asyncio.gather(*(asyncio.to_thread(refresh_now, settings) for _ in range(4)))

    assert [d.orders for d in done] == [285] * 4
    assert ids(await recommend(settings, ["sencha"])) == ["mug", "teapot", "kettle"]
