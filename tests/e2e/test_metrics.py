"""Metrics that change as events flow: the API's ``/metrics`` and the worker's endpoint.

Real events go through the real API (uvicorn on loopback) to a real worker on the Temporal
dev server, whose client has the runtime ``kaeru worker`` builds (Temporal core's Prometheus
exporter on its own port). The test scrapes both before and after and checks exact deltas.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client
from temporalio.runtime import Runtime
from temporalio.testing import WorkflowEnvironment

from kaeru.journeys import registry
from kaeru.settings import Settings
from kaeru.temporal import connect
from kaeru.worker_metrics import MetricsPortTaken, worker_runtime
from starter.app import create_app
from tests.conftest import make_settings
from tests.e2e.test_journey import MUG, eventually, free_port, serve
from tests.support.prometheus import Scrape
from tests.support.smtp import SMTPTestServer
from worker import build_worker
from workflows.kit import JourneyResult

CUSTOMER = "metrics-shopper-7"
EMAIL = "Mina.Metrics@example.com"
KIND = "cart-abandonment"
#: Every other journey is off: a shopper's identify and order start only the cart journey.
OTHER_JOURNEYS = ("WELCOME", "ORDER_CONFIRMATION", "POST_PURCHASE", "WIN_BACK", "PRICE_DROP")


def metrics_runtime(settings: Settings) -> tuple[Runtime, int]:
    """The worker's runtime on a free port. Temporal core binds the port itself (no socket
    can be handed over), so a port another server took meanwhile is tried again."""
    for _ in range(5):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
        probe.close()
        try:
            runtime = worker_runtime(settings.model_copy(update={"worker_metrics_port": port}))
        except MetricsPortTaken:
            continue
        assert runtime is not None
        return runtime, port
    raise AssertionError("no free port for the worker's metrics")


async def test_metrics_change_as_events_flow(
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
            metrics_token="metrics-scrape-token-0123",
        )
        monkeypatch.setenv("KAERU_CART_EMAIL_DELAY", "1")
        monkeypatch.setenv("KAERU_CART_OPEN_WAIT", "120")
        for prefix in OTHER_JOURNEYS:
            monkeypatch.setenv(f"KAERU_{prefix}_ENABLED", "false")
        registry.cache_clear()  # tests/conftest.py clears it again after the test
        runtime, metrics_port = metrics_runtime(settings)
        address = dev_server_env.client.service_client.config.target_host
        worker_client: Client = await connect(settings, address, runtime=runtime)
        app = create_app(settings, dev_server_env.client)
        auth = ("test-write-key", "")
        scrape_auth = {"Authorization": "Bearer metrics-scrape-token-0123"}
        async with (
            httpx.AsyncClient(base_url=base) as http,
            build_worker(worker_client, settings, http),
            serve(app, port),
        ):

            async def api_scrape() -> Scrape:
                answer = await http.get("/metrics", headers=scrape_auth)
                assert answer.status_code == 200, answer.text
                return Scrape(answer.text)

            async def worker_scrape() -> Scrape:
                answer = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
                assert answer.status_code == 200
                return Scrape(answer.text)

            # The token: refused without it, with a reason.
            refused = await http.get("/metrics")
            assert refused.status_code == 401
            assert "KAERU_METRICS_TOKEN" in refused.json()["message"]

            api_before, worker_before = await api_scrape(), await worker_scrape()
            mine = {"task_queue": settings.task_queue}

            def api_delta(now: Scrape, name: str, **labels: str) -> float:
                return now.value(name, **labels) - api_before.value(name, **labels)

            def worker_delta(now: Scrape, name: str, **labels: str) -> float:
                return now.value(name, **mine, **labels) - worker_before.value(
                    name, **mine, **labels
                )

            identify = {"userId": CUSTOMER, "traits": {"email": EMAIL}}
            assert (await http.post("/v1/identify", json=identify, auth=auth)).status_code == 200
            added = {"userId": CUSTOMER, "event": "Product Added", "properties": MUG}
            assert (await http.post("/v1/track", json=added, auth=auth)).status_code == 200
            nameless = {"event": "Product Added", "properties": MUG}  # no userId
            bad = await http.post("/v1/track", json=nameless, auth=auth)
            assert bad.status_code == 400 and bad.json()["code"] == "missing_id"

            await eventually(lambda: smtp.messages, "the cart email")
            assert smtp.messages[0].rcpt_tos == ["Mina.Metrics@example.com"]

            async def sent_counted() -> Scrape | None:
                now = await worker_scrape()
                return now if worker_delta(now, "kaeru_messages_sent_total") >= 1 else None

            worker_now = await eventually(sent_counted, "the send in the worker's metrics")
            assert worker_delta(worker_now, "kaeru_messages_sent_total", kind=KIND) == 1
            assert worker_delta(worker_now, "kaeru_messages_sent_total") == 1
            assert worker_delta(worker_now, "kaeru_journeys_started_total", kind=KIND) == 1
            assert worker_delta(worker_now, "kaeru_journeys_started_total") == 1
            assert worker_delta(worker_now, "kaeru_journeys_ended_total") == 0

            # The shopper buys: the journey ends, purchased.
            order = {
                "userId": CUSTOMER,
                "event": "Order Completed",
                "properties": {"order_id": "o-metrics", "total": 18.0, "products": [MUG]},
            }
            assert (await http.post("/v1/track", json=order, auth=auth)).status_code == 200
            handle = dev_server_env.client.get_workflow_handle(
                f"{KIND}-{CUSTOMER}", result_type=JourneyResult
            )
            assert (await asyncio.wait_for(handle.result(), timeout=60)).outcome == "purchased"

            async def ended_counted() -> Scrape | None:
                now = await worker_scrape()
                return now if worker_delta(now, "kaeru_journeys_ended_total") >= 1 else None

            worker_after = await eventually(ended_counted, "the end in the worker's metrics")
            ended = "kaeru_journeys_ended_total"
            assert worker_delta(worker_after, ended, kind=KIND, outcome="purchased") == 1
            assert worker_delta(worker_after, ended) == 1
            assert worker_delta(worker_after, "kaeru_journeys_started_total") == 1
            assert worker_delta(worker_after, "kaeru_messages_failed_total") == 0
            assert worker_delta(worker_after, "kaeru_messages_suppressed_total") == 0

            async def all_routed() -> Scrape | None:
                now = await api_scrape()
                return now if api_delta(now, "kaeru_router_deliveries_total") >= 3 else None

            api_after = await eventually(all_routed, "three deliveries in the API's metrics")

        ingested = "kaeru_events_ingested_total"
        assert api_delta(api_after, ingested, type="identify", event="none") == 1
        assert api_delta(api_after, ingested, type="track", event="Product Added") == 1
        assert api_delta(api_after, ingested, type="track", event="Order Completed") == 1
        assert api_delta(api_after, ingested) == 3
        assert api_delta(api_after, "kaeru_events_rejected_total", reason="missing_id") == 1
        assert api_delta(api_after, "kaeru_events_rejected_total") == 1
        assert api_delta(api_after, "kaeru_router_deliveries_total") == 3
        # Every delivered event's lag was observed once, and it took under a minute.
        assert api_delta(api_after, "kaeru_routing_lag_seconds_count") == 3
        assert api_delta(api_after, "kaeru_routing_lag_seconds_bucket", le="60.0") == 3
        assert api_delta(api_after, "kaeru_router_failures_total") == 0
        assert api_delta(api_after, "kaeru_router_parked_total") == 0

        # The Temporal SDK's own metrics are on the worker's endpoint too.
        names = worker_after.names()
        for sdk_metric in (
            "temporal_workflow_task_schedule_to_start_latency_count",
            "temporal_sticky_cache_size",
            "temporal_worker_task_slots_available",
        ):
            assert sdk_metric in names, sorted(n for n in names if n.startswith("temporal_"))

        # No personal data in any label or anywhere in either scrape.
        for scrape in (api_after, worker_after):
            text = scrape.text.lower()
            assert CUSTOMER not in text and EMAIL.lower() not in text
            assert "mina" not in text
