"""The kit counts journeys: one start and one end per journey, whatever its runs.

The worker's client has a runtime whose metrics land in a buffer (in production the same
runtime serves them to Prometheus, kaeru/worker_metrics.py). A busy cart continues as new
for its history: that is the same journey, so it is not counted as started again.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from temporalio.client import Client
from temporalio.runtime import MetricBuffer, Runtime, TelemetryConfig
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from kaeru.db import session
from kaeru.models import Customer
from tests.conftest import make_settings
from tests.support.smtp import SMTPTestServer
from tests.workflows.conftest import DAY, SETTINGS, SHOE, SOCK, Shopper
from worker import build_worker
from workflows.cart_abandonment import CartAbandonment, CartJourneySettings

KIND = CartAbandonment.kind


class Counted:
    def __init__(self, buffer: MetricBuffer) -> None:
        self.buffer = buffer
        self.counts: Counter[tuple[str, frozenset[tuple[str, Any]]]] = Counter()

    def value(self, name: str, **labels: str) -> int:
        for update in self.buffer.retrieve_updates():
            self.counts[(update.metric.name, frozenset(update.attributes.items()))] += int(
                update.value
            )
        return sum(
            n
            for (metric, attributes), n in self.counts.items()
            if metric == name and labels.items() <= dict(attributes).items()
        )


@pytest.fixture
async def counted_shopper(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> AsyncIterator[tuple[Shopper, Counted]]:
    buffer = MetricBuffer(10_000)
    client = await Client.connect(
        time_skipping_env.client.service_client.config.target_host,
        namespace=time_skipping_env.client.namespace,
        runtime=Runtime(telemetry=TelemetryConfig(metrics=buffer)),
    )
    settings = make_settings(sqlite_url, smtp_port=smtp.port)
    async with httpx.AsyncClient() as http, build_worker(client, settings, http):
        shopper = Shopper(time_skipping_env, sqlite_url, smtp, settings.task_queue)
        with session(sqlite_url) as s:
            s.add(Customer(customer_id=shopper.customer_id, email=shopper.email))
        yield shopper, Counted(buffer)
        with contextlib.suppress(RPCError):  # never leave a journey running on the shared server
            await shopper.handle.terminate("test over")


async def test_a_journey_counts_one_start_and_one_end_across_continue_as_new(
    counted_shopper: tuple[Shopper, Counted],
) -> None:
    shopper, counted = counted_shopper
    shopper.settings = CartJourneySettings(**{**SETTINGS.__dict__, "history_limit": 40})
    await shopper.cart("Product Added", **SHOE)
    run_id = (await shopper.handle.describe()).run_id
    for _ in range(30):
        await shopper.cart("Product Added", **SOCK)
        await shopper.skip(60)
    assert (await shopper.handle.describe()).run_id != run_id  # it continued as new
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("cart_email")
    await shopper.purchase()
    assert await shopper.outcome() == "purchased"

    assert counted.value("kaeru_journeys_started", kind=KIND) == 1
    assert counted.value("kaeru_journeys_started") == 1
    assert counted.value("kaeru_journeys_ended", kind=KIND, outcome="purchased") == 1
    assert counted.value("kaeru_journeys_ended") == 1
    assert counted.value("kaeru_messages_sent", kind=KIND) == 1
    assert counted.value("kaeru_journeys_ended", workflow_type="CartAbandonment") == 1
