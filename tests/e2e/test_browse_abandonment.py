"""Browse abandonment end to end on the Temporal dev server, with a two-second quiet wait.

The official ``segment-analytics-python`` client sends the shop's events to the real API; the
real router and worker run the journeys; the test reads what shoppers receive from a real
SMTP server: one who browsed and left gets the browse email with what they viewed and what is
bought with it; one who put a product in the cart gets no browse email.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from segment.analytics import Client as SegmentClient
from temporalio.client import WorkflowHandle
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from kaeru.journeys import registry
from starter.app import create_app
from tests.conftest import make_settings
from tests.e2e.test_journey import eventually, free_port, parts, serve
from tests.support.smtp import SMTPTestServer
from worker import build_worker
from workflows.kit import JourneyResult

# A cart event ends it and starts the cart journey: both are on.
pytestmark = pytest.mark.journeys("browse-abandonment", "cart-abandonment")

DRESS = {
    "product_id": "dress",
    "name": "Summer Dress",
    "price": 49.0,
    "url": "https://shop.test/p/dress",
}
BELT = {
    "product_id": "belt",
    "name": "Leather Belt",
    "price": 19.0,
    "url": "https://shop.test/p/belt",
}
SCARF = {
    "product_id": "scarf",
    "name": "Silk Scarf",
    "price": 25.0,
    "url": "https://shop.test/p/scarf",
}


async def test_browse_abandonment_end_to_end(
    dev_server_env: WorkflowEnvironment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with SMTPTestServer() as smtp:
        settings = make_settings(
            f"sqlite:///{tmp_path / 'kaeru.db'}",
            smtp_port=smtp.port,
            public_url=base,
            api_port=port,
            shop_url="https://shop.test",
        )
        monkeypatch.setenv("KAERU_BROWSE_DELAY", "2")  # journey settings: the environment
        registry.cache_clear()  # tests/conftest.py clears it again after the test
        client = dev_server_env.client
        app = create_app(settings, client)
        assert settings.write_key is not None
        write_key = settings.write_key.get_secret_value()

        def journey(kind: str, customer_id: str) -> WorkflowHandle[Any, JourneyResult]:
            return client.get_workflow_handle(f"{kind}-{customer_id}", result_type=JourneyResult)

        async def started(handle: WorkflowHandle[Any, JourneyResult]) -> bool:
            """Whether the router has started it yet (it routes from the store, a moment on)."""
            try:
                await handle.describe()
            except RPCError:
                return False
            return True

        async def outcome(kind: str, customer_id: str) -> JourneyResult:
            handle = journey(kind, customer_id)
            await eventually(lambda: started(handle), f"the {kind} journey of {customer_id}")
            return await asyncio.wait_for(handle.result(), 20)

        async with (
            httpx.AsyncClient(base_url=base) as http,
            build_worker(client, settings, http),
            serve(app, port),
        ):
            shop = SegmentClient(write_key, host=base, sync_mode=True, max_retries=0)

            async def send(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
                await asyncio.to_thread(call, *args, **kwargs)

            # The shop's history: dresses are bought with belts, and once with a scarf too.
            for n, items in enumerate([[DRESS, BELT], [DRESS, BELT, SCARF], [SCARF]]):
                await send(
                    shop.track,
                    f"earlier-{n}",
                    "Order Completed",
                    {"order_id": f"old-{n}", "total": 50, "currency": "USD", "products": items},
                )
            await send(shop.identify, "bea", {"email": "bea@example.com"})
            await send(shop.identify, "cid", {"email": "cid@example.com"})

            # Bea looks at the dress and leaves; Cid looks at it and puts it in the cart.
            await send(shop.track, "bea", "Product Viewed", DRESS)
            await send(shop.track, "cid", "Product Viewed", DRESS)
            await send(shop.track, "cid", "Product Added", {**DRESS, "quantity": 1})

            carted = await outcome("browse-abandonment", "cid")
            assert carted.outcome == "carted"

            # Two seconds later (KAERU_BROWSE_DELAY=2): Bea's browse email.
            await eventually(lambda: smtp.messages, "the browse email", timeout=20)
            browsed = await outcome("browse-abandonment", "bea")
            assert browsed.outcome == "emailed"
            assert browsed.last_step == "browse_email"
            [email] = smtp.messages
            assert email.rcpt_tos == ["bea@example.com"]
            assert email.message["Subject"] == "Still thinking about Summer Dress?"
            html, text = parts(email.message)
            looked, similar = text.split("Similar products:")
            assert "Summer Dress" in looked
            assert "Leather Belt" in similar and "Silk Scarf" in similar
            assert "Leather Belt" in html
            assert "shop.test" not in html, "every link must go through the click tracker"

            await asyncio.sleep(3)  # Cid's browse would have gone out by now: it never does
            assert [m.rcpt_tos for m in smtp.messages] == [["bea@example.com"]]
            cart = journey("cart-abandonment", "cid")
            description = await cart.describe()
            assert description.status is not None and description.status.name == "RUNNING"
            await cart.terminate("test over: its cart email waits a day")
