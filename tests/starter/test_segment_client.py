"""The official ``segment-analytics-python`` client, unchanged, against a real uvicorn server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from segment.analytics import Client as SegmentClient
from segment.analytics.request import APIError

from kaeru.db import session
from kaeru.models import Customer
from kaeru.settings import Settings
from starter.app import create_app
from tests.starter.conftest import WRITE_KEY, events, uvicorn_server


@pytest.fixture
async def host(settings: Settings) -> AsyncIterator[str]:
    async with uvicorn_server(create_app(settings, run_router=False)) as url:
        yield url


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
async def test_segment_client_identify_and_track_are_stored(
    host: str, settings: Settings, compress: bool
) -> None:
    client = SegmentClient(WRITE_KEY, host=host, sync_mode=True, gzip=compress, max_retries=0)

    def send() -> None:
        client.identify("u-1", {"email": "Ann@Example.COM", "name": "Ann"})
        client.track(
            "u-1",
            "Product Added",
            {"product_id": "mug", "name": "Mug", "price": 12.5},
            message_id="segment-msg-1",
        )
        client.page(anonymous_id="anon-9", name="Cart", context={"campaign": {"name": "x"}})

    await asyncio.to_thread(send)
    stored = events(settings)
    assert [(e.type, e.name, e.customer_id) for e in stored] == [
        ("identify", None, "u-1"),
        ("track", "Product Added", "u-1"),
        ("page", None, "anon-9"),
    ]
    assert stored[1].message_id == "segment-msg-1"
    assert stored[1].payload["context"]["library"]["name"] == "analytics-python"
    with session(settings.resolved_database_url) as s:
        customer = s.get(Customer, "u-1")
    assert customer is not None and customer.email == "Ann@example.com"


async def test_segment_client_reads_our_errors(host: str, settings: Settings) -> None:
    client = SegmentClient("wrong-key", host=host, sync_mode=True, max_retries=0)
    with pytest.raises(APIError) as refused:
        await asyncio.to_thread(client.track, "u-1", "Product Added")
    assert refused.value.status == 401
    assert refused.value.code == "unauthorized"
    assert "write key" in refused.value.message
    assert events(settings) == []


async def test_segment_client_with_the_browser_key_keeps_its_good_events(
    host: str, settings: Settings
) -> None:
    """A refused tracking event in a batch is listed, not a 4xx, so the client keeps the rest."""
    client = SegmentClient("test-browser-key", host=host, sync_mode=True, max_retries=0)

    def send() -> None:
        client.identify("u-2", {"email": "attacker@evil.example", "name": "Bo"})
        client.track("u-2", "Email Opened", {"journey_id": "cart-abandonment-u-2"})
        client.track("u-2", "Product Added", {"product_id": "mug"})

    await asyncio.to_thread(send)
    stored = events(settings)
    assert [(e.source, e.type, e.name) for e in stored] == [
        ("browser", "identify", None),
        ("browser", "track", "Product Added"),
    ]
    with session(settings.resolved_database_url) as s:
        customer = s.get(Customer, "u-2")
    assert customer is not None and customer.email is None
    assert customer.traits == {"name": "Bo"}
