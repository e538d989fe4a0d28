"""Log lines never carry a customer's id: the workflow id ``cart-abandonment-<customer id>``
is often an email address, and Temporal's loggers add it to every line by default."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from temporalio.service import RPCError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.conversions import ConversionActivities
from activities.types import ConversionInput
from kaeru.db import session
from kaeru.models import Customer
from tests.conftest import make_settings
from tests.support.graph_api import BAD_TOKEN, GraphAPIServer
from tests.support.smtp import SMTPTestServer
from tests.workflows.conftest import Shopper, flushing, reach_ad_audience
from worker import build_worker

#: The format ``kaeru worker`` installs (kaeru/cli.py).
FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
#: Loggers of the test's stand-ins for the shop's mail server and Meta, not of kaeru.
LOOPBACK_SERVERS = ("mail.log", "uvicorn")


def everything_in(record: logging.LogRecord) -> str:
    """The line our format prints, and every attribute a structured (JSON) formatter would
    print: the ``extra`` of a logging call lands there."""
    return f"{FORMAT.format(record)} {vars(record)!r}"


async def test_journey_and_activity_logs_carry_no_customer_id(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    customer_id = f"ann.lee+{uuid.uuid4().hex[:6]}@example.com"
    with session(sqlite_url) as s:
        s.add(Customer(customer_id=customer_id, email=customer_id))
    # The order already counted for this customer: the journey's conversion logs that.
    await ActivityEnvironment().run(
        ConversionActivities(make_settings(sqlite_url)).record_conversion,
        ConversionInput(
            key="earlier/conversion",
            journey_id=f"cart-abandonment-{customer_id}",
            customer_id=customer_id,
            after_step="cart_email",
            order_id="o-1",
            value_minor=10150,
            currency="USD",
            coupon_code=None,
            occurred_at=datetime.now(UTC),
        ),
    )
    caplog.clear()

    async with SMTPTestServer() as smtp, httpx.AsyncClient() as http:
        with GraphAPIServer() as graph:
            settings = make_settings(
                sqlite_url,
                smtp_port=smtp.port,
                meta_graph_url=graph.url,
                meta_access_token=graph.token,
                meta_audience_id=graph.audience_id,
            )
            shopper = Shopper(time_skipping_env, sqlite_url, smtp, settings.task_queue, customer_id)
            with caplog.at_level(logging.INFO):
                async with (
                    build_worker(time_skipping_env.client, settings, http),
                    flushing(settings),
                ):
                    try:
                        await reach_ad_audience(shopper)
                        graph.answer_next(BAD_TOKEN)  # the removal is refused for good
                        await shopper.purchase("o-1")
                        assert await shopper.outcome() == "purchased"
                        for _ in range(100):  # the flush after the end sends the removal
                            if graph.requests[-1].method == "DELETE":
                                break
                            await asyncio.sleep(0.05)
                    finally:
                        with contextlib.suppress(RPCError):
                            await shopper.handle.terminate("test over")

    messages = [record.getMessage() for record in caplog.records]
    assert any("refused a batch of 1 removal(s) from" in m for m in messages)  # activity.logger
    assert any("is already a conversion" in m for m in messages)  # activity.logger
    for record in caplog.records:
        if record.name.startswith(LOOPBACK_SERVERS):
            continue
        assert customer_id not in everything_in(record), everything_in(record)
