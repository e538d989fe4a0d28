"""The post-purchase follow-up end to end on the Temporal dev server, with waits of seconds:
the official Segment client posts the shop's events to the real API, the real router and
worker run the journey, and the customer's mail arrives at a real SMTP server."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from segment.analytics import Client as SegmentClient
from sqlmodel import select
from temporalio.testing import WorkflowEnvironment

from kaeru.db import session
from kaeru.journeys import registry
from kaeru.models import Touchpoint
from starter.app import create_app
from tests.conftest import make_settings
from tests.e2e.test_journey import eventually, free_port, parts, serve
from tests.support.smtp import SMTPTestServer
from worker import build_worker
from workflows.kit import JourneyResult

pytestmark = pytest.mark.journeys("post-purchase")

DRESS = {
    "product_id": "dress",
    "name": "Linen Dress",
    "price": 89.0,
    "url": "https://shop.test/p/dress",
}
BELT = {
    "product_id": "belt",
    "name": "Leather Belt",
    "price": 25.0,
    "url": "https://shop.test/p/belt",
}
SCARF = {
    "product_id": "scarf",
    "name": "Silk Scarf",
    "price": 30.0,
    "url": "https://shop.test/p/scarf",
}
HAT = {"product_id": "hat", "name": "Felt Hat", "price": 40.0, "url": "https://shop.test/p/hat"}


async def test_post_purchase_end_to_end(
    dev_server_env: WorkflowEnvironment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    for name, seconds in {"REVIEW_DELAY": 2, "CROSS_SELL_DELAY": 2, "COUPON_TTL": 120}.items():
        monkeypatch.setenv(f"KAERU_POST_PURCHASE_{name}", str(seconds))
    registry.cache_clear()  # tests/conftest.py clears it again after the test
    async with SMTPTestServer() as smtp:
        settings = make_settings(
            f"sqlite:///{tmp_path / 'kaeru.db'}",
            smtp_port=smtp.port,
            public_url=base,
            api_port=port,
            shop_url="https://shop.test",
        )
        client = dev_server_env.client
        assert settings.write_key is not None
        shop = SegmentClient(
            settings.write_key.get_secret_value(), host=base, sync_mode=True, max_retries=0
        )

        async def send(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
            await asyncio.to_thread(call, *args, **kwargs)

        def mail() -> list[Any]:
            return [m.message for m in smtp.messages if m.rcpt_tos == ["eve@example.com"]]

        handle = client.get_workflow_handle("post-purchase-eve", result_type=JourneyResult)
        async with (
            httpx.AsyncClient(base_url=base) as http,
            build_worker(client, settings, http),
            serve(create_app(settings, client), port),
        ):
            # The shop's own orders: dresses are bought with belts, then scarves.
            baskets = [[DRESS, BELT], [DRESS, BELT], [DRESS, SCARF], [HAT]]
            for n, items in enumerate(baskets):
                await send(
                    shop.track,
                    f"earlier-{n}",
                    "Order Completed",
                    {"order_id": f"old-{n}", "total": 99, "currency": "USD", "products": items},
                )
            await send(shop.identify, "eve", {"email": "eve@example.com"})
            await send(
                shop.track,
                "eve",
                "Order Completed",
                {"order_id": "o-eve", "total": 89, "currency": "USD", "products": [DRESS]},
            )

            # 1. After the delivery window (two seconds here), the review request.
            await eventually(lambda: len(mail()) == 1, "the review request", timeout=15)
            review = mail()[0]
            assert review["Subject"] == "How do you like your Linen Dress?"
            html, text = parts(review)
            assert "Linen Dress" in text and "order o-eve" in text
            assert "shop.test" not in html, "every link must go through the click tracker"

            # 2. Then what the shop's orders pair with the dress, and a next-order coupon.
            await eventually(lambda: len(mail()) == 2, "the cross-sell email", timeout=15)
            cross_sell = mail()[1]
            assert cross_sell["Subject"] == (
                "Goes well with your Linen Dress, and 10.00 USD off your next order"
            )
            _, text = parts(cross_sell)
            assert text.index("Leather Belt") < text.index("Silk Scarf")
            assert "Linen Dress" not in text
            found = re.search(r"KAERU-[A-Z0-9]{6,}", text)
            assert found, text
            first_run = (await handle.describe()).run_id

            # 3. Eve buys the belt with the coupon: the follow-up starts over from that order.
            await send(
                shop.track,
                "eve",
                "Order Completed",
                {
                    "order_id": "o-eve-2",
                    "total": 15,
                    "currency": "USD",
                    "coupon": found.group(0),
                    "products": [BELT],
                },
            )
            await eventually(lambda: len(mail()) == 3, "the new order's review", timeout=15)
            assert mail()[2]["Subject"] == "How do you like your Leather Belt?"
            assert (await handle.describe()).run_id != first_run
            await handle.terminate("test over")

    with session(settings.resolved_database_url) as s:
        mine = select(Touchpoint).where(Touchpoint.customer_id == "eve")
        conversions = s.exec(mine.where(Touchpoint.kind == "conversion")).all()
    assert [(c.journey_id, c.order_id, c.step) for c in conversions] == [
        ("post-purchase-eve", "o-eve-2", "cross_sell_email")
    ]
