"""The price-drop alert end to end on the Temporal dev server: the shop's events through the
official Segment client to the real API, its router and the real worker; the catalogue's
price changed by the shop's own (server-key) events; the email read from a real SMTP server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from segment.analytics import Client as SegmentClient
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from kaeru.journeys import discover, prefix_of, registry
from starter.app import create_app
from tests.conftest import make_settings
from tests.e2e.test_journey import eventually, free_port, parts, serve
from tests.support.smtp import SMTPTestServer
from worker import build_worker
from workflows.kit import JourneyResult
from workflows.price_drop import PriceDropAlert

pytestmark = pytest.mark.journeys("price-drop")

SHOE = {
    "product_id": "shoe",
    "name": "Trail Shoe",
    "currency": "USD",
    "url": "https://shop.test/p/shoe",
}


async def test_price_drop_end_to_end(
    dev_server_env: WorkflowEnvironment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    for journey in discover():  # only this journey: a welcome would also mail the shopper
        if journey is not PriceDropAlert:
            monkeypatch.setenv(f"KAERU_{prefix_of(journey)}_ENABLED", "false")
    monkeypatch.setenv("KAERU_PRICE_DROP_CHECK_EVERY", "1")
    monkeypatch.setenv("KAERU_PRICE_DROP_WATCH", "PT30S")
    registry.cache_clear()  # tests/conftest.py clears it again after the test
    shopper = f"ann-{uuid.uuid4().hex[:6]}"
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
        async with (
            httpx.AsyncClient(base_url=base) as http,
            build_worker(client, settings, http),
            serve(create_app(settings, client), port),
        ):
            shop = SegmentClient(
                settings.write_key.get_secret_value(), host=base, sync_mode=True, max_retries=0
            )

            async def send(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
                await asyncio.to_thread(call, *args, **kwargs)

            await send(shop.identify, shopper, {"email": f"{shopper}@example.com"})
            await send(shop.track, shopper, "Product Viewed", {**SHOE, "price": 100.0})
            handle = client.get_workflow_handle(f"price-drop-{shopper}", result_type=JourneyResult)

            async def checked() -> bool:
                try:
                    story = (await handle.query(PriceDropAlert.status)).story
                except RPCError:  # the router stores first and starts the journey moments later
                    return False
                return any("none fell enough" in line for line in story)

            await eventually(checked, "a first price check at the price the shopper saw", 20)
            assert smtp.messages == []
            # The shop's feed lowers the price (a server-key event writes the catalogue).
            await send(shop.track, "catalogue-feed", "Product Clicked", {**SHOE, "price": 80.0})
            await eventually(lambda: smtp.messages, "the price-drop email", 20)
            result = await asyncio.wait_for(handle.result(), timeout=20)

    assert result.outcome == "alerted"
    [email] = smtp.messages
    assert email.rcpt_tos == [f"{shopper}@example.com"]
    assert email.message["Subject"] == "Trail Shoe is now 80.00 USD at Kaeru Shop"
    html, text = parts(email.message)
    assert "Trail Shoe: now 80.00 USD, was 100.00 USD (20% off)" in text
    assert "100.00 USD" in html and "20% off" in html
