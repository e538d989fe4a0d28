"""The storing request's trace context travels with the stored event (``payload.kaeru.trace``)
only while tracing is on; journeys never see it (starter/ingest.py, starter/outbox.py)."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from sqlmodel import select

from kaeru.db import session
from kaeru.models import Event
from kaeru.telemetry import context_of
from starter.events import journey_properties, read_event
from starter.ingest import EventStore
from tests.conftest import make_settings

CART = {"product_id": "mug", "name": "Mug", "price": 18.0, "quantity": 1}


def track(message_id: str) -> dict[str, object]:
    return {
        "type": "track",
        "userId": f"u-{message_id}",
        "event": "Product Added",
        "messageId": message_id,
        "properties": CART,
        # A sender's own ``kaeru`` key is dropped at the door: nobody outside sets the trace.
        "kaeru": {"trace": {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}},
    }


def stored_payload(url: str, message_id: str) -> dict[str, object]:
    with session(url) as s:
        payload: dict[str, object] = (
            s.exec(select(Event).where(Event.message_id == message_id)).one().payload
        )
    return payload


async def test_the_trace_context_is_stored_only_inside_a_span(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url)
    store = EventStore(settings)
    await store.store([read_event(track("untraced"), ad_campaign="x")])
    untraced = stored_payload(sqlite_url, "untraced")
    assert "trace" not in untraced["kaeru"]  # type: ignore[operator]

    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("POST /v1/track") as span:
        await store.store([read_event(track("traced"), ad_campaign="x")])
    traced = stored_payload(sqlite_url, "traced")
    notes = traced["kaeru"]
    assert isinstance(notes, dict) and "cart" in notes  # ingestion's own notes stay
    context = span.get_span_context()
    ids = f"{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    assert notes["trace"] == {"traceparent": f"00-{ids}"}
    parent = context_of(notes["trace"])
    assert parent is not None
    assert context_of({"traceparent": 7}) is None and context_of("nonsense") is None
    # What a journey receives is the same with and without it.
    assert journey_properties("track", traced) == journey_properties("track", untraced)
