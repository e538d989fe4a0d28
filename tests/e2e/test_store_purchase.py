"""A shopper who got the cart email and bought in the store: the store's CSV import ends their
cart journey, and the purchase counts once, as an offline purchase and as the email's
conversion. The whole stack on the Temporal dev server (real API, router, worker, SMTP)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from segment.analytics import Client as SegmentClient
from sqlmodel import select
from temporalio.testing import WorkflowEnvironment

from kaeru.db import session
from kaeru.journeys import registry
from kaeru.models import Order, Touchpoint, utcnow
from starter.app import create_app
from starter.touchpoints_import import import_rows, read_rows
from tests.conftest import make_settings
from tests.e2e.test_journey import MUG, eventually, free_port, serve
from tests.support.smtp import SMTPTestServer
from worker import build_worker
from workflows.kit import JourneyResult


async def test_a_store_purchase_imported_after_the_email_ends_the_journey_as_its_conversion(
    dev_server_env: WorkflowEnvironment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with SMTPTestServer() as smtp:
        settings = make_settings(
            f"sqlite:///{tmp_path / 'kaeru.db'}", smtp_port=smtp.port, public_url=base
        )
        monkeypatch.setenv("KAERU_CART_EMAIL_DELAY", "1")
        monkeypatch.setenv("KAERU_CART_OPEN_WAIT", "120")
        registry.cache_clear()
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
            await asyncio.to_thread(shop.identify, "kim", {"email": "kim@example.com"})
            await asyncio.to_thread(shop.track, "kim", "Product Added", MUG)
            await eventually(lambda: smtp.messages, "the cart email")

            csv = "\n".join(
                [
                    "customer_id,kind,occurred_at,channel,order_id,value,currency",
                    f"kim,purchase,{utcnow().isoformat()},pos,till-7-0042,18.00,USD",
                ]
            )
            rows = read_rows(csv, settings)
            done = await asyncio.to_thread(import_rows, settings, rows)
            assert done.purchases == 1
            await asyncio.to_thread(import_rows, settings, rows)  # imported twice by mistake

            handle = client.get_workflow_handle("cart-abandonment-kim", result_type=JourneyResult)
            result = await asyncio.wait_for(handle.result(), timeout=60)
            assert (result.outcome, result.last_step) == ("purchased", "cart_email")
            assert len(smtp.messages) == 1

    with session(settings.resolved_database_url) as s:
        touches = list(s.exec(select(Touchpoint).where(Touchpoint.order_id == "till-7-0042")))
        order = s.get(Order, "till-7-0042")
    assert order is not None and (order.customer_id, order.total_minor) == ("kim", 1800)
    found = sorted((t.kind, t.channel, t.journey_kind, t.value_minor) for t in touches)
    assert found == [
        ("conversion", "pos", "cart-abandonment", 1800),
        ("purchase", "pos", None, 1800),
    ]
