"""Traces (OpenTelemetry, exported over OTLP) and the log format of every kaeru process.

Tracing is on when the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set: OTLP/HTTP with protobuf by default, gRPC with
``OTEL_EXPORTER_OTLP_PROTOCOL=grpc`` (or ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``). Everything
else the OpenTelemetry SDK reads itself: the endpoint, headers, timeout and compression (the
exporters), ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (the resource; without a
service name it is ``kaeru-api`` or ``kaeru-worker``), the sampler (``OTEL_TRACES_SAMPLER``)
and the batching (``OTEL_BSP_*``). Nothing set: no provider, no instrumentation, no cost.

Each part of a process gets its own :class:`Telemetry` (the API and the worker of ``kaeru
dev`` are two services in one process), passed explicitly: nothing here sets OpenTelemetry's
global tracer provider, which can be set once per process only.

Spans never carry personal data: every exported span goes through :class:`ScrubbingExporter`,
which keeps only attributes known to be safe, puts the route template in place of a request's
path, strips queries from URLs and drops the workflow id (``<kind>-<customer id>``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
    OTEL_SDK_DISABLED,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Link, SpanKind, Status, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    import httpx
    from fastapi import FastAPI
    from temporalio.client import Client
    from temporalio.contrib.opentelemetry import TracingInterceptor

#: The service names when ``OTEL_SERVICE_NAME`` does not say.
API_SERVICE = "kaeru-api"
WORKER_SERVICE = "kaeru-worker"

#: W3C trace context only (no baggage: whatever a caller put there is not ours to carry).
_PROPAGATOR = TraceContextTextMapPropagator()


def tracing_configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for traces (an OTLP endpoint, and the SDK not disabled)."""
    env = os.environ if env is None else env
    if env.get(OTEL_SDK_DISABLED, "").strip().lower() == "true":
        return False
    return bool(env.get(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) or env.get(OTEL_EXPORTER_OTLP_ENDPOINT))


def otlp_protocol(env: Mapping[str, str] | None = None) -> str:
    """``grpc`` or ``http/protobuf`` (the default, as the OpenTelemetry specification says;
    the Python SDK's own auto-configuration would pick gRPC).

    Raises:
        ValueError: a protocol this exporter cannot speak (``http/json``), with the fix.
    """
    env = os.environ if env is None else env
    value = (
        env.get(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL) or env.get(OTEL_EXPORTER_OTLP_PROTOCOL) or ""
    ).strip()
    if value in ("", "http/protobuf"):
        return "http/protobuf"
    if value == "grpc":
        return "grpc"
    raise ValueError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL={value!r} is not supported: set it to http/protobuf "
        "(the default) or grpc"
    )


def resource_for(service: str) -> Resource:
    """The SDK's resource (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``), named
    ``service`` when neither names the service."""
    detected = Resource.create()
    if str(detected.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        return detected.merge(Resource({SERVICE_NAME: service}))
    return detected


def otlp_exporter(env: Mapping[str, str] | None = None) -> SpanExporter:
    """The OTLP span exporter of ``OTEL_EXPORTER_OTLP_PROTOCOL``; it reads the endpoint,
    headers, timeout and compression from the environment itself."""
    if otlp_protocol(env) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter()


class Telemetry:
    """The tracing of one service (the API or the worker), or none (``provider`` None).

    Args:
        provider: the tracer provider spans go to; None turns tracing off (no-op tracer, no
            instrumentation, no interceptor).
    """

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider
        self.tracer: Tracer = (
            provider.get_tracer("kaeru") if provider is not None else trace.NoOpTracer()
        )

    @classmethod
    def from_env(cls, service: str) -> Telemetry:
        """Tracing as the environment says (see the module's docstring); off when no OTLP
        endpoint is set.

        Raises:
            ValueError: an unsupported ``OTEL_EXPORTER_OTLP_PROTOCOL``, with the fix.
        """
        if not tracing_configured():
            return cls()
        return cls.exporting_to(otlp_exporter(), service)

    @classmethod
    def exporting_to(cls, exporter: SpanExporter, service: str) -> Telemetry:
        """Tracing to ``exporter`` (scrubbed, batched), as service ``service`` unless
        ``OTEL_SERVICE_NAME`` says otherwise."""
        provider = TracerProvider(resource=resource_for(service))
        provider.add_span_processor(BatchSpanProcessor(ScrubbingExporter(exporter)))
        return cls(provider)

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def interceptor(self) -> TracingInterceptor | None:
        """Temporal's tracing interceptor for clients and workers (None when off). Its
        headers carry the trace context only, which the payload codec does not encode."""
        if self.provider is None:
            return None
        from temporalio.contrib.opentelemetry import TracingInterceptor

        return TracingInterceptor(self.provider.get_tracer("temporalio"))

    def traced_client(self, client: Client) -> Client:
        """``client`` with the tracing interceptor added (``client`` itself when off)."""
        interceptor = self.interceptor()
        if interceptor is None:
            return client
        from temporalio.client import Client

        config = client.config()
        config["interceptors"] = [*config["interceptors"], interceptor]
        return Client(**config)

    def instrument_app(self, app: FastAPI) -> None:
        """Trace every request of ``app`` (a server span named by the route template) but the
        scrapes and health checks, which would bury the events' traces under their own."""
        if self.provider is None:
            return
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(
            app,
            tracer_provider=self.provider,
            exclude_spans=["receive", "send"],
            excluded_urls="/metrics$,/healthz$",
        )

    def instrument_http(self, client: httpx.AsyncClient) -> None:
        """Trace every call of ``client`` (ad platforms, coupons, the shop's API)."""
        if self.provider is None:
            return
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor.instrument_client(client, tracer_provider=self.provider)

    def shutdown(self) -> None:
        """Export what is buffered and stop (a no-op when off)."""
        if self.provider is not None:
            self.provider.shutdown()


#: Tracing off: what every component uses unless it is given a :class:`Telemetry`.
NO_TELEMETRY = Telemetry()


# ---- the trace context of a stored event ------------------------------------------------------


def current_carrier() -> dict[str, str]:
    """The W3C trace context (``traceparent``, ``tracestate``) of the current span; empty
    when no span is recording (tracing off)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


def context_of(carrier: Any) -> otel_context.Context | None:
    """The context a stored carrier names (None if it is not one)."""
    if not isinstance(carrier, dict):
        return None
    clean = {k: v for k, v in carrier.items() if isinstance(k, str) and isinstance(v, str)}
    if "traceparent" not in clean:
        return None
    return _PROPAGATOR.extract(clean)


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span (trace and span ids, flags: nothing
    personal), to keep with queued work; None when no span is recording (tracing off)."""
    traceparent = current_carrier().get("traceparent")
    return traceparent if traceparent and len(traceparent) <= TRACEPARENT_LENGTH else None


#: A version-00 ``traceparent``: ``00-<32 hex trace id>-<16 hex span id>-<2 hex flags>``.
TRACEPARENT_LENGTH = 55
#: The most links one span carries (the SDK's default ``OTEL_SPAN_LINK_COUNT_LIMIT`` too):
#: a batch of 10,000 changes links to the first 128 of them.
MAX_LINKS = 128


def links_to(traceparents: Iterable[str | None], limit: int = MAX_LINKS) -> list[Link]:
    """Links to the spans ``traceparents`` name (invalid or repeated ones skipped), at most
    ``limit``."""
    links: list[Link] = []
    seen: set[str] = set()
    for traceparent in traceparents:
        if len(links) >= limit:
            break
        if not traceparent or traceparent in seen:
            continue
        seen.add(traceparent)
        context = context_of({"traceparent": traceparent})
        span = trace.get_current_span(context).get_span_context() if context else None
        if span is not None and span.is_valid:
            links.append(Link(span))
    return links


# ---- no personal data in spans ----------------------------------------------------------------

#: Attributes exported as they are: methods, status codes, route templates, hosts, Temporal's
#: run and activity ids. Anything else (paths, queries, client addresses, user agents, the
#: workflow id ``<kind>-<customer id>``) is dropped, apart from the rewrites below.
SAFE_ATTRIBUTES = frozenset(
    {
        "http.method",
        "http.request.method",
        "http.status_code",
        "http.response.status_code",
        "http.route",
        "http.scheme",
        "url.scheme",
        "http.flavor",
        "network.protocol.version",
        "server.address",
        "server.port",
        "net.host.port",
        "net.peer.name",
        "net.peer.port",
        "error.type",
        "temporalRunID",
        "temporalActivityID",
    }
)
#: Our own attributes (``kaeru.*``) are written to be safe where they are set.
OWN_PREFIX = "kaeru."
#: A request's path: replaced by its route template (``/v1/customers/{id:path}``).
_PATHS = ("url.path", "http.target")
#: A URL: without user info, query or fragment (a token may be there); a request's path in
#: it replaced by the route template too.
_URLS = ("url.full", "http.url")


def _clean_url(url: str, path: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, path, "", ""))


def scrubbed_attributes(
    attributes: Mapping[str, Any] | None, kind: SpanKind = SpanKind.INTERNAL
) -> dict[str, Any]:
    """What of ``attributes`` may leave the process. A request kaeru served (``kind``
    SERVER) keeps its route template, never its path; a call kaeru made (the ad platforms',
    whose paths hold audience and account ids, not shoppers') keeps its path."""
    if not attributes:
        return {}
    kept = {
        key: value
        for key, value in attributes.items()
        if key in SAFE_ATTRIBUTES or key.startswith(OWN_PREFIX)
    }
    route = attributes.get("http.route")
    if kind == SpanKind.SERVER:
        for key in _PATHS:
            if key in attributes and isinstance(route, str):
                kept[key] = route
    for key in _URLS:
        if not isinstance(url := attributes.get(key), str):
            continue
        if kind != SpanKind.SERVER:
            kept[key] = _clean_url(url, urlsplit(url).path)
        elif isinstance(route, str):
            kept[key] = _clean_url(url, route)
    return kept


def _scrubbed_event(event: Event) -> Event:
    """An exception keeps its type; its message and stack may quote customer data."""
    attributes = event.attributes or {}
    kind = attributes.get("exception.type")
    kept = {"exception.type": kind} if kind is not None else {}
    return Event(event.name, kept, event.timestamp)


def scrubbed(span: ReadableSpan) -> ReadableSpan:
    """A copy of ``span`` with nothing personal: see :data:`SAFE_ATTRIBUTES`."""
    description = span.status.description
    status = Status(span.status.status_code, description.split(":", 1)[0] if description else None)
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=scrubbed_attributes(span.attributes, span.kind),
        events=[_scrubbed_event(event) for event in span.events],
        links=span.links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class ScrubbingExporter(SpanExporter):
    """Exports through ``inner`` what :func:`scrubbed` leaves of each span."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.inner.export([scrubbed(span) for span in spans])

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


# ---- logs -------------------------------------------------------------------------------------

#: ``KAERU_LOG_FORMAT=text``: what a person reads in a terminal.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, ``trace_id`` and ``span_id`` when a span is current, ``exception`` when the
    record has one. A record's ``extra`` is not printed: kaeru's log calls put nothing
    personal in their messages, and extras (Temporal's workflow details) may."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            line["trace_id"] = trace.format_trace_id(span.trace_id)
            line["span_id"] = trace.format_span_id(span.span_id)
        if record.exc_text:
            line["exception"] = record.exc_text
        elif record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def log_formatter(log_format: str) -> logging.Formatter:
    """The formatter of ``KAERU_LOG_FORMAT`` (``text`` or ``json``)."""
    if log_format == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT, datefmt="%H:%M:%S")


def setup_logging(level: int, log_format: str) -> None:
    """Log to stderr at ``level`` in ``log_format`` (``text`` or ``json``), workflow ids
    pseudonymised (:class:`WorkflowIdFilter`)."""
    handler = logging.StreamHandler()
    handler.setFormatter(log_formatter(log_format))
    handler.addFilter(WorkflowIdFilter())
    logging.basicConfig(level=level, handlers=[handler])


def workflow_ref(workflow_id: str, kinds: Iterable[str] = ()) -> str:
    """How a log line names a workflow: :func:`key_ref` of its id, after its journey kind when
    the id starts with one of ``kinds`` (``cart-abandonment-sha256:<12 hex>``); a journey's id
    is ``<kind>-<customer id>``, often an email address."""
    for kind in sorted(kinds, key=len, reverse=True):
        if workflow_id.startswith(f"{kind}-"):
            return f"{kind}-{key_ref(workflow_id)}"
    return key_ref(workflow_id)


def _loaded_kinds() -> tuple[str, ...]:
    """The journey kinds of the process's registry, once it has been loaded (never loading
    it here: a log filter must not import workflows, nor log while it does)."""
    journeys = sys.modules.get("kaeru.journeys")
    loaded = getattr(journeys, "registry", None)
    if loaded is None or not loaded.cache_info().currsize:
        return ()
    return tuple(route.kind for route in loaded().routes)


#: Where the Temporal SDK's messages name a workflow id (worker/_workflow_instance.py,
#: _activity.py; the replayer), and kaeru's own ``workflow_id=`` style: group 2 is the id.
_WORKFLOW_ID_PHRASES = (
    re.compile(r"(\bwith ID )(.+?)(?= and run ID\b)"),
    re.compile(r"(\bfor workflow )(\S+)(?= is not registered\b)"),
    re.compile(r"(\bworkflow[ _]?id(?:=|: ?)['\"]?)([^'\",\s)}\]]+)", re.IGNORECASE),
)
#: Extras the SDK's workflow and activity loggers add (a structured handler may print them).
_DETAIL_EXTRAS = ("temporal_workflow", "temporal_activity")


def scrub_workflow_ids(text: str, kinds: Iterable[str] = ()) -> str:
    """``text`` with every workflow id it names (see ``_WORKFLOW_ID_PHRASES``) replaced by
    :func:`workflow_ref`; an id already pseudonymised is left as it is."""
    for phrase in _WORKFLOW_ID_PHRASES:
        text = phrase.sub(
            lambda m: (
                m.group(1)
                + (m.group(2) if "sha256:" in m.group(2) else workflow_ref(m.group(2), kinds))
            ),
            text,
        )
    return text


class WorkflowIdFilter(logging.Filter):
    """Rewrites the workflow ids in a record (temporalio's "Failed activation on workflow X
    with ID <id> and run ID ...", its exception text, the SDK's ``temporal_workflow`` extras)
    to :func:`workflow_ref`, for the text and the JSON format alike. Installed on the handler,
    so it sees the records of every logger. :func:`worker.keep_workflow_ids_out_of_logs`
    stops the workflow and activity loggers adding ids; this catches the SDK's own lines."""

    def __init__(self, kinds: Iterable[str] | None = None) -> None:
        """``kinds``: the journey kinds an id may start with; by default, those of the
        process's registry once it is loaded."""
        super().__init__()
        self._kinds = tuple(kinds) if kinds is not None else None

    def kinds(self) -> tuple[str, ...]:
        if self._kinds is not None:
            return self._kinds
        try:
            return _loaded_kinds()
        except Exception:  # a registry that cannot load: the ids still go, without the kind
            return ()

    def filter(self, record: logging.LogRecord) -> bool:
        kinds = self.kinds()
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit: logging reports it when formatting
            return True
        scrubbed = scrub_workflow_ids(message, kinds)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub_workflow_ids(record.exc_text, kinds)
        for name in _DETAIL_EXTRAS:
            details = getattr(record, name, None)
            if isinstance(details, dict) and isinstance(details.get("workflow_id"), str):
                ref = workflow_ref(details["workflow_id"], kinds)
                setattr(record, name, {**details, "workflow_id": ref})
        return True


def key_ref(key: str) -> str:
    """How a log line names an idempotency key: ``<workflow id>/...`` holds the customer's id,
    so a short digest instead (``sha256:<12 hex>``, the prefix of the key's SHA-256)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12]
