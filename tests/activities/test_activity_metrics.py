"""What the activities count (kaeru_messages_*, kaeru_ad_api_*), read from a metric buffer.

The activities run as Temporal runs them (``ActivityEnvironment``) with the metric meter of a
real runtime whose metrics land in a buffer, against a real SMTP server and the fake Graph
API; the labels are the journey's kind and a bounded reason, never the shopper.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.runtime import MetricBuffer, Runtime, TelemetryConfig
from temporalio.testing import ActivityEnvironment

from activities.ads import AudienceActivities
from activities.email import EmailActivities
from kaeru.consent import set_consent
from kaeru.db import session
from kaeru.settings import Settings
from tests.activities.factories import add_customer
from tests.activities.test_ads import change, meta_settings
from tests.activities.test_email import ADDRESS, request
from tests.conftest import make_settings
from tests.support.graph_api import RATE_LIMITED, GraphAPIServer
from tests.support.smtp import SMTPTestServer

KIND = "cart-abandonment"  # tests/activities/test_email.py's JOURNEY is cart-abandonment-c1


class Recorded:
    """A runtime whose metrics go to a buffer, and the counts read from it."""

    def __init__(self) -> None:
        self.buffer = MetricBuffer(10_000)
        self.runtime = Runtime(telemetry=TelemetryConfig(metrics=self.buffer))
        self.counts: Counter[tuple[str, frozenset[tuple[str, Any]]]] = Counter()

    def env(self) -> ActivityEnvironment:
        env = ActivityEnvironment()
        env.metric_meter = self.runtime.metric_meter
        return env

    async def run(self, activity: Callable[..., Any], *args: Any) -> Any:
        return await self.env().run(activity, *args)

    def value(self, name: str, **labels: str) -> int:
        for update in self.buffer.retrieve_updates():
            key = (update.metric.name, frozenset(update.attributes.items()))
            self.counts[key] += int(update.value)
        return sum(
            count
            for (metric, attributes), count in self.counts.items()
            if metric == name and labels.items() <= dict(attributes).items()
        )

    def label_values(self) -> set[str]:
        self.value("")
        return {str(v) for _, attributes in self.counts for _, v in attributes}


@pytest.fixture
def recorded() -> Recorded:
    return Recorded()


async def test_a_send_counts_once_by_kind(
    sqlite_url: str, smtp_server: SMTPTestServer, recorded: Recorded
) -> None:
    add_customer(sqlite_url, "c1", ADDRESS)
    email = EmailActivities(make_settings(sqlite_url, smtp_port=smtp_server.port))
    assert (await recorded.run(email.send_email, request())).status == "sent"
    assert (await recorded.run(email.send_email, request())).status == "already_sent"
    assert recorded.value("kaeru_messages_sent", kind=KIND) == 1
    assert recorded.value("kaeru_messages_sent") == 1
    assert (
        recorded.value("kaeru_messages_failed") == recorded.value("kaeru_messages_suppressed") == 0
    )
    assert not {"c1", ADDRESS} & recorded.label_values()


async def test_a_bounce_fails_and_the_retry_is_suppressed(
    sqlite_url: str, smtp_server: SMTPTestServer, recorded: Recorded
) -> None:
    add_customer(sqlite_url, "c1", ADDRESS)
    smtp_server.reject_recipient(ADDRESS, 550)
    email = EmailActivities(make_settings(sqlite_url, smtp_port=smtp_server.port))
    for _ in range(2):  # the bounce, then the same step again: the address is suppressed now
        with pytest.raises(ApplicationError):
            await recorded.run(email.send_email, request())
    assert recorded.value("kaeru_messages_failed", kind=KIND, reason="bounced") == 1
    assert recorded.value("kaeru_messages_failed") == 1
    suppressed = "kaeru_messages_suppressed"
    assert recorded.value(suppressed, kind=KIND, reason="undeliverable_address") == 1
    assert recorded.value("kaeru_messages_sent") == 0


async def test_suppressions_count_with_their_reason(
    sqlite_url: str, smtp_server: SMTPTestServer, recorded: Recorded
) -> None:
    add_customer(sqlite_url, "c1", ADDRESS)
    add_customer(sqlite_url, "nobody", None)
    with session(sqlite_url) as s:
        set_consent(s, "c1", "email", False, source="api")
        s.commit()
    settings = make_settings(sqlite_url, smtp_port=smtp_server.port)
    email = EmailActivities(settings)
    with pytest.raises(ApplicationError):
        await recorded.run(email.send_email, request())
    with pytest.raises(ApplicationError):
        nobody = request("cart-abandonment-nobody/run-1/cart_email", customer_id="nobody")
        await recorded.run(email.send_email, nobody)
    suppressed = "kaeru_messages_suppressed"
    assert recorded.value(suppressed, kind=KIND, reason="not_consented") == 1
    assert recorded.value(suppressed, kind=KIND, reason="no_email_address") == 1
    assert recorded.value(suppressed) == 2
    assert smtp_server.messages == []


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def test_ad_api_calls_and_errors_by_platform(
    sqlite_url: str, http: httpx.AsyncClient, graph_api: GraphAPIServer, recorded: Recorded
) -> None:
    add_customer(sqlite_url, "c1", "alice@example.com")
    settings: Settings = meta_settings(sqlite_url, graph_api)
    ads = AudienceActivities(settings, http)
    graph_api.answer_next(RATE_LIMITED)
    with pytest.raises(ApplicationError):
        await recorded.run(ads.add_to_audience, change())
    await recorded.run(ads.add_to_audience, change())  # the retry
    assert recorded.value("kaeru_ad_api_calls", platform="meta") == 2
    assert recorded.value("kaeru_ad_api_errors", platform="meta") == 1
    assert recorded.value("kaeru_ad_api_calls") == 2
