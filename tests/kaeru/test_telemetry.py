"""Tracing set up from the standard OTEL_* variables, exported to real OTLP receivers on
loopback (gRPC and HTTP), with nothing personal in the spans; JSON log lines (kaeru/telemetry.py).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlmodel import select
from temporalio.testing import ActivityEnvironment

from activities.ads import AudienceActivities
from activities.audience_sync import BATCH_SPAN, AudienceSyncActivities
from activities.types import AudienceChange, FlushInput, FlushResult
from kaeru.db import session
from kaeru.models import AudienceChangeRow, Customer
from kaeru.telemetry import (
    API_SERVICE,
    MAX_LINKS,
    WORKER_SERVICE,
    JsonFormatter,
    ScrubbingExporter,
    Telemetry,
    links_to,
    otlp_protocol,
    tracing_configured,
)
from starter.app import create_app
from tests.conftest import make_settings
from tests.e2e.test_journey import eventually, free_port, serve
from tests.kaeru.test_cli import assert_clear_failure, clean_environment, kaeru
from tests.support.graph_api import GraphAPIServer
from tests.support.otlp import OtlpGrpcReceiver, OtlpHttpReceiver

__all__ = ["clean_environment"]  # the autouse fixture: no KAERU_ variable leaks in


@pytest.fixture(autouse=True)
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_SDK_DISABLED",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")


def test_nothing_set_means_no_tracing() -> None:
    telemetry = Telemetry.from_env(API_SERVICE)
    assert not telemetry.enabled and telemetry.interceptor() is None
    disabled = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}
    assert not tracing_configured(disabled)
    assert tracing_configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})


def test_the_protocol_is_http_protobuf_unless_grpc_is_asked_for() -> None:
    assert otlp_protocol({}) == "http/protobuf"
    assert otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == "grpc"
    assert otlp_protocol({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}) == "grpc"
    with pytest.raises(ValueError, match="set it to http/protobuf"):
        otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


async def test_grpc_export_of_api_spans_named_by_otel_service_name_without_personal_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request whose path and query hold a customer's id and email: the span exported over
    OTLP/gRPC has the route template, the service name of OTEL_SERVICE_NAME, and neither."""
    tag = uuid.uuid4().hex[:8]
    customer_id, email = f"gina-{tag}", f"gina.{tag}@example.com"
    with OtlpGrpcReceiver() as otlp:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "shop-kaeru-api")
        telemetry = Telemetry.from_env(API_SERVICE)
        assert telemetry.provider is not None
        raw = InMemorySpanExporter()  # what the span held before scrubbing
        telemetry.provider.add_span_processor(SimpleSpanProcessor(raw))
        settings = make_settings(f"sqlite:///{tmp_path / 'kaeru.db'}")
        assert settings.operator_token is not None
        port = free_port()
        app = create_app(settings, run_router=False, telemetry=telemetry)
        try:
            async with serve(app, port), httpx.AsyncClient() as http:
                # Neither a scrape nor a health check makes a span: one span in all, below.
                for untraced in ("metrics", "healthz"):
                    untraced_answer = await http.get(f"http://127.0.0.1:{port}/{untraced}")
                    assert untraced_answer.status_code == 200
                answer = await http.get(
                    f"http://127.0.0.1:{port}/v1/customers/{quote(email)}?user={customer_id}",
                    headers={
                        "Authorization": f"Bearer {settings.operator_token.get_secret_value()}",
                        "User-Agent": f"agent-of-{customer_id}",
                    },
                )
                assert answer.status_code < 500
            telemetry.provider.force_flush()
            spans = await eventually(lambda: otlp.spans, "the exported span", timeout=10)
        finally:
            telemetry.shutdown()

    [span] = spans
    assert span.service == "shop-kaeru-api"
    assert span.name == "GET /v1/customers/{customer_id:path}"
    assert span.kind == Span.SPAN_KIND_SERVER
    assert span.attributes["http.route"] == "/v1/customers/{customer_id:path}"
    assert span.attributes["http.target"] == "/v1/customers/{customer_id:path}"
    assert (
        span.attributes["http.url"] == f"http://127.0.0.1:{port}/v1/customers/{{customer_id:path}}"
    )
    before = json.dumps([dict(s.attributes or {}) for s in raw.get_finished_spans()])
    assert customer_id in before  # so the check below is able to fail
    exported = otlp.raw_bytes()
    for secret in (customer_id, email, quote(email), "gina."):
        assert secret.encode() not in exported


async def test_the_ad_api_call_is_a_child_span_without_the_token(sqlite_url: str) -> None:
    """The activity adding a shopper to the Meta audience calls the (Graph-shaped, loopback)
    API: an httpx client span in the activity's trace, its URL without a query, nothing of the
    shopper's and not the access token in what is exported. (Journeys started since batched
    audiences call it from the audience flusher's activity, in the flusher's own trace, through
    the same instrumented client.)"""
    tag = uuid.uuid4().hex[:8]
    customer_id, email = f"adam-{tag}", f"adam.{tag}@example.com"
    with session(sqlite_url) as s:
        s.add(Customer(customer_id=customer_id, email=email))
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ScrubbingExporter(memory)))
    telemetry = Telemetry(provider)
    with GraphAPIServer() as graph:
        settings = make_settings(
            sqlite_url,
            meta_graph_url=graph.url,
            meta_access_token=graph.token,
            meta_audience_id=graph.audience_id,
        )
        async with httpx.AsyncClient() as http:
            telemetry.instrument_http(http)
            ads = AudienceActivities(settings, http)
            change = AudienceChange(
                key=f"cart-abandonment-{customer_id}/run/audience",
                journey_id=f"cart-abandonment-{customer_id}",
                step="audience",
                customer_id=customer_id,
                audience="cart-retargeting",
            )
            # The span Temporal's interceptor opens around an activity on a traced worker.
            with telemetry.tracer.start_as_current_span("RunActivity:add_to_audience") as parent:
                await ActivityEnvironment().run(ads.add_to_audience, change)
        assert [r.method for r in graph.requests] == ["POST"]
    provider.force_flush()
    [call] = [span for span in memory.get_finished_spans() if span.kind == SpanKind.CLIENT]
    assert call.context is not None and call.parent is not None
    assert call.context.trace_id == parent.get_span_context().trace_id
    assert call.parent.span_id == parent.get_span_context().span_id
    attributes = dict(call.attributes or {})
    url = str(attributes.get("url.full") or attributes.get("http.url"))
    assert url.endswith(f"/{graph.audience_id}/users") and "?" not in url
    exported = json.dumps([dict(span.attributes or {}) for span in memory.get_finished_spans()])
    for secret in (graph.token, customer_id, email):
        assert secret not in exported


def _audience_join(customer_id: str) -> AudienceChange:
    journey_id = f"cart-abandonment-{customer_id}"
    return AudienceChange(
        key=f"{journey_id}/run/ad_audience",
        journey_id=journey_id,
        step="ad_audience",
        customer_id=customer_id,
        audience="cart-retargeting",
    )


async def test_the_ad_audience_batch_span_links_to_the_traces_that_queued_its_changes(
    sqlite_url: str,
) -> None:
    """Two events' journeys queue a join each (inside the span Temporal's interceptor opens
    around their activity); the flusher's activity, in its own trace, sends both in one Graph
    API call (loopback, Graph-shaped) inside an ``ad audience batch`` span that links to the
    two events' spans. Every span arrives at a real OTLP/HTTP receiver, without the shoppers'
    ids or addresses."""
    tag = uuid.uuid4().hex[:8]
    shoppers = [(f"lina-{tag}-{i}", f"lina.{tag}.{i}@example.com") for i in range(2)]
    with session(sqlite_url) as s:
        for customer_id, email in shoppers:
            s.add(Customer(customer_id=customer_id, email=email))
    with OtlpHttpReceiver() as otlp, GraphAPIServer() as graph:
        telemetry = Telemetry.exporting_to(
            OTLPSpanExporter(endpoint=f"{otlp.endpoint}/v1/traces"), WORKER_SERVICE
        )
        assert telemetry.provider is not None
        unscrubbed = InMemorySpanExporter()
        telemetry.provider.add_span_processor(SimpleSpanProcessor(unscrubbed))
        settings = make_settings(
            sqlite_url,
            meta_graph_url=graph.url,
            meta_access_token=graph.token,
            meta_audience_id=graph.audience_id,
        )
        steps = []
        async with httpx.AsyncClient() as http:
            telemetry.instrument_http(http)
            sync = AudienceSyncActivities(settings, http, tracer=telemetry.tracer)
            for customer_id, _ in shoppers:
                # The event's trace: its request, and the journey step's activity span.
                with (
                    telemetry.tracer.start_as_current_span(
                        "POST /v1/track", attributes={"enduser.id": customer_id}
                    ),
                    telemetry.tracer.start_as_current_span(
                        "RunActivity:queue_audience_join"
                    ) as step,
                ):
                    await ActivityEnvironment().run(
                        sync.queue_audience_join, _audience_join(customer_id)
                    )
                steps.append(step.get_span_context())
            with telemetry.tracer.start_as_current_span(
                "RunActivity:flush_audience_changes"
            ) as flusher:
                result = await ActivityEnvironment().run(sync.flush_audience_changes, FlushInput())
        assert isinstance(result, FlushResult) and (result.batches, result.applied) == (1, 2)
        assert [r.method for r in graph.requests] == ["POST"]
        telemetry.shutdown()
        spans = otlp.spans
        exported = otlp.raw_bytes()

    # Each queued change keeps the W3C traceparent of the step that queued it, nothing else.
    with session(sqlite_url) as s:
        rows = {r.customer_id: r for r in s.exec(select(AudienceChangeRow))}
    for (customer_id, _), step_context in zip(shoppers, steps, strict=True):
        traceparent = rows[customer_id].traceparent
        flags = int(step_context.trace_flags)
        assert traceparent == (
            f"00-{step_context.trace_id:032x}-{step_context.span_id:016x}-{flags:02x}"
        )

    [batch] = [span for span in spans if span.name == BATCH_SPAN]
    assert batch.attributes == {"kaeru.audience.platform": "meta", "kaeru.audience.batch_size": 2}
    flush_context = flusher.get_span_context()
    assert batch.trace_id == f"{flush_context.trace_id:032x}"
    assert batch.parent_span_id == f"{flush_context.span_id:016x}"
    assert sorted(batch.links) == sorted((f"{c.trace_id:032x}", f"{c.span_id:016x}") for c in steps)
    assert batch.trace_id not in {trace_id for trace_id, _ in batch.links}
    # The Graph API call is the batch span's child.
    [call] = [span for span in spans if span.kind == Span.SPAN_KIND_CLIENT]
    assert call.parent_span_id == batch.span_id and call.trace_id == batch.trace_id

    before = json.dumps([dict(span.attributes or {}) for span in unscrubbed.get_finished_spans()])
    assert shoppers[0][0] in before  # so the check below is able to fail
    for customer_id, email in shoppers:
        for secret in (customer_id, email, email.split("@")[0], graph.token):
            assert secret.encode() not in exported


async def test_with_tracing_off_no_trace_context_is_kept_with_a_queued_change(
    sqlite_url: str,
) -> None:
    customer_id = f"otto-{uuid.uuid4().hex[:8]}"
    with session(sqlite_url) as s:
        s.add(Customer(customer_id=customer_id, email=f"{customer_id}@example.com"))
    with GraphAPIServer() as graph:
        settings = make_settings(
            sqlite_url,
            meta_graph_url=graph.url,
            meta_access_token=graph.token,
            meta_audience_id=graph.audience_id,
        )
        async with httpx.AsyncClient() as http:
            off = Telemetry()
            off.instrument_http(http)
            sync = AudienceSyncActivities(settings, http, tracer=off.tracer)
            # Tracing off: no interceptor, so no span around the activity, only no-op ones.
            with off.tracer.start_as_current_span("RunActivity:queue_audience_join"):
                await ActivityEnvironment().run(
                    sync.queue_audience_join, _audience_join(customer_id)
                )
            result = await ActivityEnvironment().run(sync.flush_audience_changes, FlushInput())
        assert isinstance(result, FlushResult) and result.applied == 1
    with session(sqlite_url) as s:
        [row] = s.exec(select(AudienceChangeRow))
    assert row.traceparent is None and row.applied_at is not None


def test_a_span_links_to_at_most_128_stored_trace_contexts() -> None:
    provider = TracerProvider()
    tracer = provider.get_tracer("test")
    contexts = []
    for _ in range(MAX_LINKS + 5):
        with tracer.start_as_current_span("step") as step:
            contexts.append(step.get_span_context())
    stored = [f"00-{c.trace_id:032x}-{c.span_id:016x}-01" for c in contexts]
    # Repeated, empty and malformed ones are skipped, not linked.
    junk = [stored[0], None, "", "00-zz-yy-01", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"]
    links = links_to([stored[0], *junk, *stored[1:]])
    assert len(links) == MAX_LINKS == 128
    assert [link.context.span_id for link in links] == [c.span_id for c in contexts[:MAX_LINKS]]
    assert links_to(stored[:3]) and len(links_to(stored[:3])) == 3


def test_json_log_lines_carry_the_current_trace_and_span() -> None:
    provider = TracerProvider()
    tracer = provider.get_tracer("test")
    formatter = JsonFormatter()
    record = logging.LogRecord("kaeru.router", logging.WARNING, __file__, 1, "x %d", (1,), None)
    outside = json.loads(formatter.format(record))
    assert outside.keys() == {"time", "level", "logger", "message"}
    assert outside["level"] == "WARNING" and outside["message"] == "x 1"
    with tracer.start_as_current_span("s") as span:
        inside = json.loads(formatter.format(record))
    context = span.get_span_context()
    assert inside["trace_id"] == f"{context.trace_id:032x}"
    assert inside["span_id"] == f"{context.span_id:016x}"


def test_service_names_default_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    with OtlpHttpReceiver() as otlp:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint)
        for service in (API_SERVICE, WORKER_SERVICE):
            telemetry = Telemetry.from_env(service)
            assert telemetry.provider is not None
            with telemetry.tracer.start_as_current_span("hello"):
                pass
            telemetry.shutdown()
        spans = otlp.spans
    assert sorted(span.service for span in spans) == [API_SERVICE, WORKER_SERVICE]


def test_an_unsupported_protocol_is_a_clear_cli_failure(tmp_path: Path) -> None:
    result = kaeru(
        "api",
        KAERU_WRITE_KEY="a-long-random-server-key-0123456789",
        KAERU_DATABASE_URL=f"sqlite:///{tmp_path / 'kaeru.db'}",
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/json",
    )
    assert_clear_failure(result, "OTEL_EXPORTER_OTLP_PROTOCOL='http/json'", "grpc")


def test_kaeru_api_logs_json_lines_with_kaeru_log_format_json(tmp_path: Path) -> None:
    """The real process: ``kaeru api -v`` with KAERU_LOG_FORMAT=json and Temporal unreachable
    prints the router's warning as one JSON object a line."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KAERU_", "OTEL_"))},
        "KAERU_LOG_FORMAT": "json",
        "KAERU_WRITE_KEY": "a-long-random-server-key-0123456789",
        "KAERU_DATABASE_URL": f"sqlite:///{tmp_path / 'kaeru.db'}",
        "KAERU_STATE_DIR": str(tmp_path / "state"),
        "KAERU_API_PORT": "0",
        "KAERU_TEMPORAL_ADDRESS": "127.0.0.1:1",
    }
    kaeru_bin = Path(sys.executable).parent / "kaeru"
    process = subprocess.Popen(
        [str(kaeru_bin), "api", "-v"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    lines: list[dict[str, object]] = []
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 60  # a guard: the API is up in seconds when idle
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(json.loads(line))  # every line is a JSON object
            if lines[-1]["logger"] == "kaeru.router" and lines[-1]["level"] == "WARNING":
                break
    finally:
        process.terminate()
        process.wait(timeout=10)
    router = [line for line in lines if line["logger"] == "kaeru.router"]
    assert router and "cannot reach Temporal" in str(router[-1]["message"]), lines
    assert {"time", "level", "logger", "message"} <= router[-1].keys()
