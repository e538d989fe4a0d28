"""The whole product, end to end, on the Temporal dev server with waits of a few seconds.

The official ``segment-analytics-python`` client sends the shop's events to the real API
(uvicorn on loopback); the real worker runs the journey; the test reads the emails from a
real SMTP server, loads the open pixel as a mail client would, clicks the ad, receives the
coupon, and buys with it.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from segment.analytics import Client as SegmentClient
from sqlmodel import select
from temporalio.testing import WorkflowEnvironment

from kaeru.db import session
from kaeru.journeys import registry
from kaeru.models import Coupon, Touchpoint
from starter.app import create_app
from tests.conftest import make_settings
from tests.support.smtp import SMTPTestServer
from worker import build_worker
from workflows.kit import JourneyResult

MUG = {
    "product_id": "mug",
    "name": "Stoneware Mug",
    "price": 18.0,
    "url": "https://shop.test/p/mug",
}
POT = {"product_id": "pot", "name": "Tea Pot", "price": 42.0, "url": "https://shop.test/p/pot"}
TEA = {"product_id": "tea", "name": "Sencha Tea", "price": 9.5, "url": "https://shop.test/p/tea"}


_reserved: dict[int, socket.socket] = {}


def free_port() -> int:
    """A loopback port for ``serve``, held by a listening socket until ``serve`` takes it.

    Closing a probe socket and binding again later leaves a gap in which another server (the
    SMTP server binding port 0, or the other pytest-xdist worker) can take the port, and then
    uvicorn exits with status 3. The socket stays open, so nobody else can bind the port.
    """
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = int(s.getsockname()[1])
    _reserved[port] = s
    return port


@asynccontextmanager
async def serve(app: FastAPI, port: int) -> AsyncIterator[None]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    held = _reserved.pop(port, None)
    task = asyncio.create_task(server.serve(sockets=[held] if held else None))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        yield
    finally:
        server.should_exit = True
        await task
        if held:
            held.close()


async def eventually(check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def parts(message: EmailMessage) -> tuple[str, str]:
    html, text = message.get_body(("html",)), message.get_body(("plain",))
    assert html is not None and text is not None
    return str(html.get_content()), str(text.get_content())


async def test_cart_abandonment_end_to_end(
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
            cart_url="https://shop.test/cart",
        )
        waits = {"EMAIL_DELAY": 2, "OPEN_WAIT": 60, "AD_DELAY": 1, "AD_CLICK_WAIT": 60}
        for name, seconds in {**waits, "OFFER_DELAY": 1, "OFFER_WAIT": 120}.items():
            monkeypatch.setenv(f"KAERU_CART_{name}", str(seconds))  # journey settings: the env
        registry.cache_clear()  # tests/conftest.py clears it again after the test
        client = dev_server_env.client
        app = create_app(settings, client)
        assert settings.write_key is not None and settings.operator_token is not None
        write_key = settings.write_key.get_secret_value()
        operator = {"Authorization": f"Bearer {settings.operator_token.get_secret_value()}"}
        async with (
            httpx.AsyncClient(base_url=base) as http,
            build_worker(client, settings, http),
            serve(app, port),
        ):
            shop = SegmentClient(write_key, host=base, sync_mode=True, max_retries=0)

            async def send(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
                await asyncio.to_thread(call, *args, **kwargs)

            # The shop's history: mugs are bought with tea pots more than with anything else.
            for n, items in enumerate([[MUG, POT], [MUG, POT], [MUG, TEA], [TEA]]):
                await send(
                    shop.track,
                    f"earlier-{n}",
                    "Order Completed",
                    {"order_id": f"old-{n}", "total": 50, "currency": "USD", "products": items},
                )
            await send(shop.identify, "ann", {"email": "Ann@Example.com", "name": "Ann"})
            await send(shop.track, "ann", "Product Added", {**MUG, "quantity": 2})

            # 1. The cart email: the cart, related products, tracked links, an open pixel.
            await eventually(lambda: smtp.messages, "the cart email")
            [first] = smtp.messages
            # Only the domain is case-blind: the local part is kept as the shop sent it.
            assert first.rcpt_tos == ["Ann@example.com"]
            html, text = parts(first.message)
            assert "Stoneware Mug" in text and "Tea Pot" in text
            assert "shop.test" not in html, "every link must go through the click tracker"
            pixel = re.search(rf'src="({re.escape(base)}/t/o/[^"]+)"', html)
            clicks = re.findall(rf'href="({re.escape(base)}/t/c/[^"]+)"', html)
            assert pixel and clicks

            redirect = await http.get(clicks[0].replace("&amp;", "&"))
            assert redirect.status_code in (302, 303, 307)
            assert redirect.headers["location"].startswith("https://shop.test")

            # 2. Opened: the mail client loads the pixel.
            opened = await http.get(pixel.group(1).replace("&amp;", "&"))
            assert opened.status_code == 200 and opened.headers["content-type"] == "image/gif"

            # 3. A day later (a second here) the shopper joins the retargeting audience.
            async def members() -> list[str]:
                answer = await http.get("/v1/audiences/cart-retargeting", headers=operator)
                answer.raise_for_status()
                return [m["customer_id"] for m in answer.json()["members"]]

            await eventually(members, "the shopper in the ad audience")
            assert await members() == ["ann"]

            # 4. The shopper clicks the ad: a page call with the retargeting campaign.
            await send(
                shop.page,
                "ann",
                name="Landing",
                context={"campaign": {"name": settings.ad_campaign, "source": "facebook"}},
            )

            # 5. The offer email with a single-use coupon.
            await eventually(lambda: len(smtp.messages) == 2, "the offer email")
            _, offer_text = parts(smtp.messages[1].message)
            found = re.search(r"KAERU-[A-Z0-9]{6,}", offer_text)
            assert found, offer_text
            code = found.group(0)

            # 6. The shopper buys with the coupon: the journey ends at once.
            await send(
                shop.track,
                "ann",
                "Order Completed",
                {
                    "order_id": "o-ann",
                    "total": 26.0,
                    "currency": "USD",
                    "coupon": code,
                    "products": [{**MUG, "quantity": 2}],
                },
            )
            handle = client.get_workflow_handle("cart-abandonment-ann", result_type=JourneyResult)
            result = await asyncio.wait_for(handle.result(), timeout=60)
            assert result.outcome == "purchased"
            assert result.coupon_code == code
            assert result.last_step == "offer_email"
            assert await members() == []
            assert len(smtp.messages) == 2

    with session(settings.resolved_database_url) as s:
        coupon = s.exec(select(Coupon).where(Coupon.code == code)).one()
        kinds = [t.kind for t in s.exec(select(Touchpoint).where(Touchpoint.customer_id == "ann"))]
    assert coupon.redeemed_order_id == "o-ann"
    for kind in (
        "email_sent",
        "email_opened",
        "email_clicked",
        "audience_joined",
        "audience_left",
        "coupon_issued",
        "conversion",
    ):
        assert kind in kinds, kinds
