"""The welcome series end to end on the Temporal dev server, with waits of a few seconds.

The shop's events go through the official ``segment-analytics-python`` client to the real API
(uvicorn on loopback), its router and the real worker; the subscriber's emails arrive at a
real SMTP server: the welcome at once, the shop's best-sellers (from its own orders), a
first-purchase coupon, and the first order with that coupon ends the journey as a conversion.
"""

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
from kaeru.journeys import prefix_of, registry
from kaeru.models import Coupon, Touchpoint
from starter.app import create_app
from tests.conftest import make_settings
from tests.e2e.test_journey import eventually, free_port, parts, serve
from tests.support.smtp import SMTPTestServer
from worker import build_worker
from workflows.kit import JourneyResult
from workflows.welcome import Welcome

pytestmark = pytest.mark.journeys("welcome")

POT = {"product_id": "pot", "name": "Tea Pot", "price": 42.0, "url": "https://shop.test/p/pot"}
MUG = {"product_id": "mug", "name": "Stoneware Mug", "price": 18.0}
TEA = {"product_id": "tea", "name": "Sencha Tea", "price": 9.5}


async def test_welcome_series_end_to_end(
    dev_server_env: WorkflowEnvironment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.cache_clear()
    for route in registry().routes:  # the welcome series alone sends to this subscriber
        if route.kind != Welcome.kind:
            monkeypatch.setenv(f"KAERU_{prefix_of(route.journey)}_ENABLED", "false")
    waits = {"BESTSELLERS_DELAY": 2, "OFFER_DELAY": 4, "OFFER_WAIT": 60}
    for name, seconds in waits.items():
        monkeypatch.setenv(f"KAERU_WELCOME_{name}", str(seconds))
    registry.cache_clear()  # tests/conftest.py clears it again after the test
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with SMTPTestServer() as smtp:
        settings = make_settings(
            f"sqlite:///{tmp_path / 'kaeru.db'}",
            smtp_port=smtp.port,
            public_url=base,
            api_port=port,
            shop_name="Pond Tea",
            shop_url="https://shop.test",
        )
        client = dev_server_env.client
        assert settings.write_key is not None
        shop = SegmentClient(
            settings.write_key.get_secret_value(), host=base, sync_mode=True, max_retries=0
        )

        async def send(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
            await asyncio.to_thread(call, *args, **kwargs)

        def received() -> list[Any]:
            return [m.message for m in smtp.messages if "Amy@example.com" in m.rcpt_tos]

        async with (
            httpx.AsyncClient(base_url=base) as http,
            build_worker(client, settings, http),
            serve(create_app(settings, client), port),
        ):
            # The shop's history: the tea pot is its best-seller, then the mug.
            for n, items in enumerate([[POT, MUG], [POT, TEA], [POT], [MUG]]):
                await send(
                    shop.track,
                    f"earlier-{n}",
                    "Order Completed",
                    {"order_id": f"old-{n}", "total": 50, "currency": "USD", "products": items},
                )
            await send(shop.identify, "amy", {"email": "Amy@Example.com", "name": "Amy"})

            # 1. The welcome, at once.
            await eventually(received, "the welcome email")
            [welcome] = received()
            assert welcome["subject"] == "Welcome to Pond Tea"
            html, text = parts(welcome)
            assert "Thanks for signing up" in text
            assert "shop.test" not in html, "every link goes through the click tracker"

            # 2. "Day 3": the shop's best-sellers, most ordered first.
            await eventually(lambda: len(received()) == 2, "the best-sellers email")
            bestsellers = received()[1]
            assert bestsellers["subject"] == "Our best-sellers at Pond Tea"
            _, text = parts(bestsellers)
            assert text.index("Tea Pot") < text.index("Stoneware Mug") < text.index("Sencha Tea")

            # 3. "Day 7": the first-purchase coupon.
            await eventually(lambda: len(received()) == 3, "the first-purchase offer")
            offer = received()[2]
            _, text = parts(offer)
            found = re.search(r"KAERU-[A-Z0-9]{6,}", text)
            assert found, text
            code = found.group(0)
            assert offer["subject"] == f"10.00 USD off your first order at Pond Tea: use {code}"

            # 4. The first order, with the coupon: the journey ends at once, converted.
            await send(
                shop.track,
                "amy",
                "Order Completed",
                {
                    "order_id": "o-amy",
                    "total": 32.0,
                    "currency": "USD",
                    "coupon": code,
                    "products": [{**POT, "quantity": 1}],
                },
            )
            handle = client.get_workflow_handle("welcome-amy", result_type=JourneyResult)
            result = await asyncio.wait_for(handle.result(), timeout=30)
            assert (result.outcome, result.last_step, result.coupon_code) == (
                "purchased",
                "offer_email",
                code,
            )
            assert len(received()) == 3

    with session(settings.resolved_database_url) as s:
        coupon = s.exec(select(Coupon).where(Coupon.code == code)).one()
        conversions = s.exec(
            select(Touchpoint).where(
                Touchpoint.customer_id == "amy", Touchpoint.kind == "conversion"
            )
        ).all()
    assert coupon.redeemed_order_id == "o-amy"
    assert [(c.order_id, c.journey_id) for c in conversions] == [("o-amy", "welcome-amy")]
