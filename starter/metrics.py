"""Prometheus metrics of the API process, served at ``GET /metrics``.

Each API process keeps its own registry (not prometheus-client's global one), so two apps in
one test process never share counters, and each uvicorn worker process is scraped on its
own. Every label value comes from a fixed set in this module or in the code (an event type,
a known event name, a rejection code, a Temporal status): nothing a shop or a shopper sends
becomes a label, so no personal data and no unbounded series.

``KAERU_METRICS_TOKEN`` set: ``/metrics`` needs ``Authorization: Bearer <token>``. Unset, it
is open; keep the API's port on the internal network then, or scrape through a proxy.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from starter.deps import ApiError, SettingsDep, key_matches

#: The label value for anything outside a fixed set.
OTHER = "other"
#: Segment's call types (kaeru accepts track, identify and page; the others are refused).
EVENT_TYPES = frozenset({"track", "identify", "page", "screen", "group", "alias"})
#: Event names counted by name (Segment's e-commerce spec and the names kaeru itself reads);
#: any other name counts as ``other``, so a shop's free-form names never make new series.
KNOWN_EVENTS = frozenset(
    {
        "Products Searched",
        "Product List Viewed",
        "Product List Filtered",
        "Product Viewed",
        "Product Clicked",
        "Product Added",
        "Product Removed",
        "Product Shared",
        "Product Reviewed",
        "Product Added to Wishlist",
        "Product Removed from Wishlist",
        "Cart Viewed",
        "Cart Shared",
        "Checkout Started",
        "Checkout Step Viewed",
        "Checkout Step Completed",
        "Payment Info Entered",
        "Order Completed",
        "Order Updated",
        "Order Refunded",
        "Order Cancelled",
        "Coupon Entered",
        "Coupon Applied",
        "Coupon Denied",
        "Coupon Removed",
        "Promotion Viewed",
        "Promotion Clicked",
        "Ad Clicked",
        "Email Link Clicked",
    }
)
#: Why an event was refused (the ``code`` of its answer); anything else counts as ``other``.
REJECT_REASONS = frozenset(
    {
        "invalid_event",
        "invalid_field",
        "invalid_email",
        "invalid_consent",
        "missing_id",
        "not_allowed",
        "payload_too_large",
        "unsupported_type",
        "too_many_traits",
        "traits_too_large",
    }
)
#: Why a whole ingestion request was refused (its answer's ``code``); else ``other``.
REQUEST_REJECT_REASONS = frozenset(
    {
        "unauthorized",
        "forbidden",
        "not_configured",
        "payload_too_large",
        "unsupported_encoding",
        "invalid_body",
        "invalid_json",
        "not_a_batch",
        "rate_limited",
        "too_many_events",
    }
)
#: Seconds from storing an event to delivering it: the router wakes at once when idle, and a
#: backlog (Temporal slow or down) shows in the upper buckets.
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


def bounded(value: str | None, allowed: Iterable[str]) -> str:
    """``value`` when it is in ``allowed``, else ``other``."""
    return value if value is not None and value in allowed else OTHER


def event_labels(event_type: str, name: str | None) -> tuple[str, str]:
    """The ``type`` and ``event`` labels of one event. ``event`` is its known name, ``other``
    for a name outside :data:`KNOWN_EVENTS`, and ``none`` for a call without a name (an
    identify, a plain page)."""
    return bounded(event_type, EVENT_TYPES), "none" if name is None else bounded(name, KNOWN_EVENTS)


class ApiMetrics:
    """The API process's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events_ingested = Counter(
            "kaeru_events_ingested",
            "Events stored by ingestion (a re-sent messageId is not counted again)",
            ["type", "event"],
            registry=self.registry,
        )
        self.events_duplicate = Counter(
            "kaeru_events_duplicate",
            "Events accepted but not stored again: their messageId was already stored",
            registry=self.registry,
        )
        self.events_rejected = Counter(
            "kaeru_events_rejected",
            "Events refused one by one (a 400 for a single event, a rejected entry of a batch)",
            ["reason"],
            registry=self.registry,
        )
        self.requests_rejected = Counter(
            "kaeru_ingest_requests_rejected",
            "Ingestion requests refused as a whole (key, size, rate limit, body not JSON or "
            "not a batch): their events are not counted one by one",
            ["reason"],
            registry=self.registry,
        )
        self.routing_lag = Histogram(
            "kaeru_routing_lag_seconds",
            "Seconds from storing an event to the router delivering it to its journeys",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self.router_deliveries = Counter(
            "kaeru_router_deliveries",
            "Events the router handled and marked routed (signalled or started their journeys)",
            registry=self.registry,
        )
        self.router_failures = Counter(
            "kaeru_router_failures",
            "Failed deliveries, by Temporal's status (temporal_busy pauses all routing)",
            ["reason"],
            registry=self.registry,
        )
        self.router_parked = Counter(
            "kaeru_router_parked",
            "Events the router gave up on (parked for an operator): refused, or max_attempts",
            ["reason"],
            registry=self.registry,
        )

    def ingested(self, event_type: str, name: str | None) -> None:
        self.events_ingested.labels(*event_labels(event_type, name)).inc()

    def rejected(self, code: str) -> None:
        self.events_rejected.labels(bounded(code, REJECT_REASONS)).inc()

    def request_rejected(self, code: str) -> None:
        self.requests_rejected.labels(bounded(code, REQUEST_REJECT_REASONS)).inc()

    def delivered(self, received_at: datetime | None) -> None:
        self.router_deliveries.inc()
        if received_at is not None:
            stored = received_at if received_at.tzinfo else received_at.replace(tzinfo=UTC)
            self.routing_lag.observe(max(0.0, (datetime.now(UTC) - stored).total_seconds()))

    def exposition(self) -> bytes:
        """The registry in Prometheus's text format."""
        return generate_latest(self.registry)


def metrics_of(request: Request) -> ApiMetrics:
    metrics: ApiMetrics = request.app.state.metrics
    return metrics


router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    summary="Prometheus metrics of this API process",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
        401: {"description": "KAERU_METRICS_TOKEN is set and the bearer token is missing or wrong"},
    },
)
async def metrics(request: Request, settings: SettingsDep) -> Response:
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else ""
    if token:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key_matches(given.strip(), token):
            raise ApiError(
                401,
                "unauthorized",
                "/metrics needs the metrics token: send Authorization: Bearer "
                "<KAERU_METRICS_TOKEN> (in Prometheus: authorization.credentials)",
                headers={"WWW-Authenticate": 'Bearer realm="kaeru-metrics"'},
            )
    return Response(metrics_of(request).exposition(), media_type=CONTENT_TYPE_LATEST)
