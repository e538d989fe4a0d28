"""One trace per event, across processes, received by a real OTLP receiver on loopback.

The real API (uvicorn) stores a ``Product Added`` and answers; the real router signals-with-
start the cart journey a moment later; the real worker on the dev server runs it and sends
the cart email to a real SMTP server. The API and the worker are two services with their own
tracer providers (kaeru-api, kaeru-worker) built from the standard OTEL_* variables, and the
trace context crosses the outbox inside the stored event. Every span arrives over OTLP/HTTP.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import uuid
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlmodel import select
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.audience_sync import BATCH_SPAN
from activities.types import FlushInput, FlushResult
from kaeru.db import session
from kaeru.journeys import registry
from kaeru.models import AudienceChangeRow, Event
from kaeru.telemetry import API_SERVICE, WORKER_SERVICE, JsonFormatter, Telemetry
from starter.app import create_app
from tests.conftest import make_settings
from tests.e2e.test_journey import MUG, eventually, free_port, parts, serve
from tests.support.codec import history_payloads, payload_json
from tests.support.graph_api import GraphAPIServer
from tests.support.otlp import OtlpHttpReceiver, ReceivedSpan
from tests.support.smtp import SMTPTestServer
from worker import PASSTHROUGH, build_worker, workflows


class Lines(logging.Handler):
    """Every record formatted as ``KAERU_LOG_FORMAT=json`` prints it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def otel_env(monkeypatch: pytest.MonkeyPatch, endpoint: str, **more: str) -> None:
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    for name, value in more.items():
        monkeypatch.setenv(name, value)


async def test_one_trace_from_the_request_to_the_smtp_send(
    dev_server_env: WorkflowEnvironment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = uuid.uuid4().hex[:8]
    customer_id, email = f"tracy-{tag}", f"tracy.{tag}@example.com"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    for name, seconds in {"EMAIL_DELAY": 1, "OPEN_WAIT": 60, "AD_DELAY": 60}.items():
        monkeypatch.setenv(f"KAERU_CART_{name}", str(seconds))
    registry.cache_clear()
    lines = Lines()
    root, loggers = (
        logging.getLogger(),
        [logging.getLogger("kaeru"), logging.getLogger("temporalio")],
    )
    with OtlpHttpReceiver() as otlp:
        otel_env(monkeypatch, otlp.endpoint)
        api_telemetry = Telemetry.from_env(API_SERVICE)
        worker_telemetry = Telemetry.from_env(WORKER_SERVICE)
        assert api_telemetry.provider and worker_telemetry.provider
        # What the spans held before scrubbing: proves the no-PII check below can fail.
        unscrubbed = InMemorySpanExporter()
        worker_telemetry.provider.add_span_processor(SimpleSpanProcessor(unscrubbed))
        async with SMTPTestServer() as smtp:
            settings = make_settings(
                f"sqlite:///{tmp_path / 'kaeru.db'}",
                smtp_port=smtp.port,
                public_url=base,
                api_port=port,
                shop_url="https://shop.test",
                cart_url="https://shop.test/cart",
            )
            client: Client = dev_server_env.client
            app = create_app(settings, client, telemetry=api_telemetry)
            assert settings.write_key is not None
            auth = (settings.write_key.get_secret_value(), "")
            levels = [logger.level for logger in loggers]
            root.addHandler(lines)
            # temporalio's own DEBUG lines print task tokens, which hold the workflow id.
            for logger, level in zip(loggers, (logging.DEBUG, logging.INFO), strict=True):
                logger.setLevel(level)
            try:
                async with (
                    httpx.AsyncClient(base_url=base, auth=auth) as http,
                    build_worker(client, settings, http, telemetry=worker_telemetry),
                    serve(app, port),
                ):
                    identified = await http.post(
                        "/v1/identify", json={"userId": customer_id, "traits": {"email": email}}
                    )
                    assert identified.status_code == 200, identified.text
                    added = await http.post(
                        "/v1/track",
                        json={
                            "userId": customer_id,
                            "event": "Product Added",
                            "properties": {**MUG, "quantity": 1},
                        },
                    )
                    assert added.status_code == 200, added.text
                    await eventually(lambda: smtp.messages, "the cart email", timeout=30)
                    try:
                        worker_telemetry.provider.force_flush()
                        api_telemetry.provider.force_flush()
                        spans = await eventually(
                            lambda: _trace_of_track(otlp.spans), "the trace", timeout=10
                        )
                    finally:
                        handle = client.get_workflow_handle(f"cart-abandonment-{customer_id}")
                        with contextlib.suppress(RPCError):
                            await handle.terminate("test over")
                    history = await handle.fetch_history()
            finally:
                root.removeHandler(lines)
                for logger, level in zip(loggers, levels, strict=True):
                    logger.setLevel(level)
                api_telemetry.shutdown()
                worker_telemetry.shutdown()

        # The stored event carries the request's trace context, under a kaeru note.
        with session(settings.resolved_database_url) as s:
            stored = s.exec(select(Event).where(Event.name == "Product Added")).one()
        trace_id = spans["POST /v1/track"].trace_id
        assert stored.payload["kaeru"]["trace"]["traceparent"].split("-")[1] == trace_id

        # One trace: the request, the router, the signal-with-start, the journey, the send.
        request = spans["POST /v1/track"]
        assert request.service == API_SERVICE and request.kind == Span.SPAN_KIND_SERVER
        assert request.attributes["http.route"] == "/v1/track"
        route = spans["route event"]
        assert route.service == API_SERVICE and route.parent_span_id == request.span_id
        assert route.attributes["kaeru.event.name"] == "Product Added"
        start = spans["SignalWithStartWorkflow:CartAbandonment"]
        assert start.parent_span_id == route.span_id and start.service == API_SERVICE
        assert spans["RunWorkflow:CartAbandonment"].service == WORKER_SERVICE
        send = spans["RunActivity:send_email"]
        assert send.service == WORKER_SERVICE
        smtp_span = spans["SMTP send"]
        assert smtp_span.parent_span_id == send.span_id
        assert smtp_span.attributes["kaeru.email.outcome"] == "sent"
        assert smtp_span.attributes["server.port"] == smtp.port

        # The journey's history, headers and all, replays with tracing on and off.
        interceptor = worker_telemetry.interceptor()
        assert interceptor is not None
        for interceptors in ([interceptor], []):
            replayer = Replayer(
                workflows=list(workflows()),
                interceptors=interceptors,
                workflow_runner=SandboxedWorkflowRunner(
                    restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
                ),
            )
            await replayer.replay_workflow(history)

        # The tracing interceptor's headers (not run through the payload codec) hold the W3C
        # trace context and nothing else.
        headers = [
            payload_json(payload)
            for path, payload in history_payloads(history)
            if "header.fields[_tracer-data]" in path
        ]
        assert headers and all(set(h) <= {"traceparent", "tracestate"} for h in headers)
        assert {h["traceparent"].split("-")[1] for h in headers} == {trace_id}

        # No personal data anywhere in what was exported (it was there before scrubbing).
        raw = otlp.raw_bytes()
        assert customer_id.encode() in b"".join(
            json.dumps(dict(span.attributes or {})).encode()
            for span in unscrubbed.get_finished_spans()
        )
        assert customer_id.encode() not in raw and email.encode() not in raw
        assert email.split("@")[0].encode() not in raw

        # JSON log lines inside the trace carry its id, and no personal data either.
        parsed = [json.loads(line) for line in lines.lines]
        traced = [line for line in parsed if line.get("trace_id") == trace_id]
        assert {line["logger"] for line in traced} >= {"kaeru.router", "temporalio.activity"}
        sent = [line for line in traced if line["message"].startswith("email sha256:")]
        assert sent and sent[0]["span_id"] == smtp_span.span_id, traced
        # The email's name in the log is the start of its Message-ID (README: Traces and logs).
        assert str(smtp.messages[0].message["Message-ID"])[1:13] in sent[0]["message"]
        for line in parsed:
            assert {"time", "level", "logger", "message"} <= line.keys()
        assert customer_id not in "\n".join(lines.lines) and email not in "\n".join(lines.lines)


async def test_the_batched_graph_api_call_links_to_the_event_whose_journey_queued_it(
    dev_server_env: WorkflowEnvironment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cart journey started by a ``Product Added`` queues the shopper's audience join; the
    audience flusher, in a trace of its own, sends it to the (loopback, Graph-shaped) Meta API
    inside an ``ad audience batch`` span that links to the journey's queue step, in the
    event's trace."""
    tag = uuid.uuid4().hex[:8]
    customer_id, email = f"linus-{tag}", f"linus.{tag}@example.com"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    waits = {"EMAIL_DELAY": 1, "OPEN_WAIT": 60, "AD_DELAY": 1, "AD_CLICK_WAIT": 60}
    for name, seconds in waits.items():
        monkeypatch.setenv(f"KAERU_CART_{name}", str(seconds))
    registry.cache_clear()
    with OtlpHttpReceiver() as otlp, GraphAPIServer() as graph:
        otel_env(monkeypatch, otlp.endpoint)
        api_telemetry = Telemetry.from_env(API_SERVICE)
        worker_telemetry = Telemetry.from_env(WORKER_SERVICE)
        assert api_telemetry.provider and worker_telemetry.provider
        async with SMTPTestServer() as smtp:
            settings = make_settings(
                f"sqlite:///{tmp_path / 'kaeru.db'}",
                smtp_port=smtp.port,
                public_url=base,
                api_port=port,
                shop_url="https://shop.test",
                cart_url="https://shop.test/cart",
                meta_graph_url=graph.url,
                meta_access_token=graph.token,
                meta_audience_id=graph.audience_id,
            )
            client: Client = dev_server_env.client
            app = create_app(settings, client, telemetry=api_telemetry)
            assert settings.write_key is not None
            auth = (settings.write_key.get_secret_value(), "")
            handle = client.get_workflow_handle(f"cart-abandonment-{customer_id}")
            try:
                async with (
                    httpx.AsyncClient(base_url=base, auth=auth) as http,
                    httpx.AsyncClient(timeout=10) as worker_http,
                    build_worker(client, settings, worker_http, telemetry=worker_telemetry),
                    serve(app, port),
                ):
                    worker_telemetry.instrument_http(worker_http)
                    identified = await http.post(
                        "/v1/identify", json={"userId": customer_id, "traits": {"email": email}}
                    )
                    assert identified.status_code == 200, identified.text
                    added = await http.post(
                        "/v1/track",
                        json={
                            "userId": customer_id,
                            "event": "Product Added",
                            "properties": {**MUG, "quantity": 1},
                        },
                    )
                    assert added.status_code == 200, added.text
                    await eventually(lambda: smtp.messages, "the cart email", timeout=30)
                    html, _ = parts(smtp.messages[0].message)
                    pixel = re.search(rf'src="({re.escape(base)}/t/o/[^"]+)"', html)
                    assert pixel
                    opened = await http.get(pixel.group(1).replace("&amp;", "&"))
                    assert opened.status_code == 200

                    def queued() -> list[AudienceChangeRow]:
                        with session(settings.resolved_database_url) as s:
                            return list(s.exec(select(AudienceChangeRow)))

                    [row] = await eventually(queued, "the queued audience join", timeout=30)
                    assert not graph.requests  # queued, not sent
                    # The flusher's schedule would start this; here the test does, at once.
                    flushed = await client.execute_workflow(
                        "AudienceFlusher",
                        FlushInput(),
                        id=f"kaeru-audience-flusher-{tag}",
                        task_queue=settings.task_queue,
                        result_type=FlushResult,
                    )
                    assert flushed.applied == 1 and [r.method for r in graph.requests] == ["POST"]
                    worker_telemetry.provider.force_flush()
                    api_telemetry.provider.force_flush()

                    def batch_and_track() -> tuple[ReceivedSpan, ReceivedSpan] | None:
                        spans = otlp.spans
                        batches = [span for span in spans if span.name == BATCH_SPAN]
                        tracks = [span for span in spans if span.name == "POST /v1/track"]
                        return (batches[0], tracks[0]) if batches and tracks else None

                    batch, track = await eventually(batch_and_track, "the batch span", timeout=10)
            finally:
                with contextlib.suppress(RPCError):
                    await handle.terminate("test over")
                api_telemetry.shutdown()
                worker_telemetry.shutdown()
        spans = otlp.spans
        raw = otlp.raw_bytes()

    # The queued change kept the W3C trace context of the journey's queue step.
    [step] = [
        span
        for span in spans
        if span.name == "RunActivity:queue_audience_join" and span.trace_id == track.trace_id
    ]
    assert row.traceparent is not None
    assert row.traceparent.startswith(f"00-{step.trace_id}-{step.span_id}-")
    # The batch span is the flusher's, links to that step, and holds the Graph API call.
    assert batch.service == WORKER_SERVICE and batch.trace_id != track.trace_id
    assert batch.links == ((track.trace_id, step.span_id),)
    assert batch.attributes == {"kaeru.audience.platform": "meta", "kaeru.audience.batch_size": 1}
    flusher = {s.span_id: s for s in spans if s.trace_id == batch.trace_id}
    assert flusher[batch.parent_span_id].name == "RunActivity:flush_audience_changes"
    [call] = [s for s in flusher.values() if s.kind == Span.SPAN_KIND_CLIENT]
    assert call.parent_span_id == batch.span_id
    # Nothing personal in anything exported.
    for secret in (customer_id, email, email.split("@")[0], graph.token):
        assert secret.encode() not in raw


def _trace_of_track(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan] | None:
    """The spans of the ``POST /v1/track`` request's trace by name, once the SMTP send is in."""
    requests = [span for span in spans if span.name == "POST /v1/track"]
    if not requests:
        return None
    trace_id = requests[0].trace_id
    named = {span.name: span for span in spans if span.trace_id == trace_id}
    return named if "SMTP send" in named else None
