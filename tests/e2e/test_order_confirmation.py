"""Order confirmation end to end on the Temporal dev server: the shop's events go through the
real API (the official Segment client), the router and the worker; the confirmation arrives
at a real SMTP server. Two orders sent back to back each get exactly one confirmation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from segment.analytics import Client as SegmentClient
from temporalio.testing import WorkflowEnvironment

from kaeru.journeys import registry
from starter.app import create_app
from tests.conftest import make_settings
from tests.e2e.test_journey import MUG, POT, eventually, free_port, parts, serve
from tests.support.smtp import SMTPTestServer
from worker import build_worker
from workflows.kit import JourneyResult

pytestmark = pytest.mark.journeys("order-confirmation")


async def test_an_order_is_confirmed_end_to_end(
    dev_server_env: WorkflowEnvironment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("KAERU_CART_ENABLED", "false")  # only the confirmation in this test
    registry.cache_clear()
    async with SMTPTestServer() as smtp:
        settings = make_settings(
            f"sqlite:///{tmp_path / 'kaeru.db'}",
            smtp_port=smtp.port,
            public_url=base,
            api_port=port,
            shop_url="https://shop.test",
            shop_name="Tea House",
        )
        assert settings.write_key is not None
        client = dev_server_env.client
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

            await send(shop.identify, "oli", {"email": "oli@example.com"})
            order = {
                "order_id": "T-2001",
                "subtotal": 78.0,
                "discount": 8.0,
                "coupon": "WELCOME8",
                "shipping": 4.0,
                "tax": 7.4,
                "total": 81.4,
                "currency": "USD",
                "products": [{**MUG, "quantity": 2}, {**POT, "quantity": 1}],
            }
            await send(shop.track, "oli", "Order Completed", order)
            await send(shop.track, "oli", "Order Completed", {**order, "order_id": "T-2002"})

            await eventually(lambda: len(smtp.messages) >= 2, "two confirmations", timeout=15)
            handle = client.get_workflow_handle("order-confirmation-oli", result_type=JourneyResult)
            assert (await asyncio.wait_for(handle.result(), timeout=15)).outcome == "confirmed"
            await asyncio.sleep(0.5)  # nothing more may come
            mails = {str(m.message["Subject"]): m for m in smtp.messages}
            assert sorted(mails) == [
                "Your order T-2001 at Tea House is confirmed",
                "Your order T-2002 at Tea House is confirmed",
            ]
            mail = mails["Your order T-2001 at Tea House is confirmed"]
            assert mail.rcpt_tos == ["oli@example.com"]
            html, text = parts(mail.message)
            assert "- Stoneware Mug: 2 x 18.00 USD = 36.00 USD" in text
            assert "- Tea Pot: 1 x 42.00 USD = 42.00 USD" in text
            assert "Discount (coupon WELCOME8): -8.00 USD" in text
            assert "Total: 81.40 USD" in text
            assert "Order number: <strong>T-2001</strong>" in html
