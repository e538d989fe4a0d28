"""The outbox (``events``): how an accepted event becomes a row the router delivers.

Ingestion (:mod:`starter.ingest`) and every path that stores an event of kaeru's own (a
consent withdrawal, :mod:`starter.consent_changes`) write rows through here, so ``seq`` order
is commit order and a repeated ``messageId`` is stored once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from kaeru.journeys import deliveries
from kaeru.models import Event
from starter.events import IncomingEvent, journey_properties

#: PostgreSQL advisory lock held while events are inserted, so ``seq`` order is commit order:
#: without it a slow transaction could commit seq 10 after the router has routed seq 11, and
#: the journey (which ignores seq <= the last it saw) would drop seq 10.
OUTBOX_LOCK = 0x6B61657275

#: The payload's ``kaeru`` note holding the W3C trace context (``traceparent``, ``tracestate``)
#: of the request that stored the event, so the router's span continues that request's trace.
#: Only with tracing on (kaeru/telemetry.py); journeys never see it (journey_properties).
TRACE_NOTE = "trace"


def insert_statement(session: Session, table: Any) -> Any:
    """``INSERT`` with ``ON CONFLICT`` support for the session's database."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def table_of(model: Any) -> Table:
    table: Table = model.__table__
    return table


def with_trace_context(event: IncomingEvent, carrier: dict[str, str]) -> IncomingEvent:
    """``event`` with ``carrier`` (the storing request's trace context) under
    ``payload.kaeru.trace``."""
    notes = event.payload.get("kaeru")
    notes = {**(notes if isinstance(notes, dict) else {}), TRACE_NOTE: carrier}
    return dataclasses.replace(event, payload={**event.payload, "kaeru": notes})


def needs_routing(
    event_type: str, name: str | None, customer_id: str, payload: dict[str, Any]
) -> bool:
    """Whether some journey could use the event: asked with the name journeys see it by (an
    ``identify`` by ``identify``) and its journey properties."""
    return bool(
        deliveries(name or event_type, customer_id, journey_properties(event_type, payload))
    )


def insert_events(session: Session, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert outbox rows in order; a ``message_id`` already stored is skipped.

    Returns:
        The message ids this call stored.
    """
    if not rows:
        return set()
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": OUTBOX_LOCK})
    # One statement with the rows as parameters (executemany), not ``.values(rows)``: SQLAlchemy
    # sends it as batched multi-row INSERTs in row order either way, but only this form is
    # compiled once and cached; a multi-VALUES statement is compiled again on every call.
    statement = (
        insert_statement(session, table_of(Event))
        .on_conflict_do_nothing(index_elements=["message_id"])
        .returning(table_of(Event).c.message_id)
    )
    return {row[0] for row in session.execute(statement, list(rows))}


def outbox_row(
    *,
    message_id: str,
    customer_id: str,
    event_type: str,
    name: str | None,
    payload: dict[str, Any],
    timestamp: datetime,
    received_at: datetime,
    source: str = "server",
    imported: bool = False,
    facts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An ``events`` row. Events no journey listens to, and imported history, are marked
    routed at once (``payload.kaeru.imported`` says why). ``facts`` (what ingestion learnt:
    ``cart``, ``changed_traits``) join the payload's ``kaeru`` notes."""
    if facts:
        notes = payload.get("kaeru")
        payload = {**payload, "kaeru": {**(notes if isinstance(notes, dict) else {}), **facts}}
    routed = not imported and needs_routing(event_type, name, customer_id, payload)
    return {
        "message_id": message_id,
        "customer_id": customer_id,
        "type": event_type,
        "name": name,
        "payload": payload,
        "timestamp": timestamp,
        "received_at": received_at,
        "routed_at": None if routed else received_at,
        "route_attempts": 0,
        "route_error": None,
        "source": source,
    }
