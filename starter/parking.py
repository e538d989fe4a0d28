"""Events the router parked: listed for operators, sent back into routing, or dropped.

The router parks an event Temporal refused for good, or that failed
``KAERU_ROUTE_MAX_ATTEMPTS`` times (see :mod:`starter.router`). The admin API and ``kaeru events``
use these functions; they read and write the database directly (blocking: call from a thread).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, func, select, update
from sqlmodel import Session

from kaeru.db import session as db_session
from kaeru.db import write_session
from kaeru.models import CustomerRouting, Event, utcnow

_EVENTS = Event.__table__  # type: ignore[attr-defined]
_ROUTING = CustomerRouting.__table__  # type: ignore[attr-defined]
_PARKED = (_EVENTS.c.parked_at.is_not(None), _EVENTS.c.dropped_at.is_(None))


@dataclass(frozen=True)
class ParkedEvent:
    seq: int
    customer_id: str
    event: str
    message_id: str
    attempts: int
    reason: str | None
    parked_at: datetime


def parked_events(url: str, limit: int = 1000) -> tuple[int, list[ParkedEvent]]:
    """How many events are parked, and the oldest ``limit`` of them (by ``seq``)."""
    with db_session(url) as s:
        total = s.execute(select(func.count()).select_from(_EVENTS).where(*_PARKED)).scalar_one()
        rows = s.execute(
            select(
                _EVENTS.c.seq,
                _EVENTS.c.customer_id,
                func.coalesce(_EVENTS.c.name, _EVENTS.c.type),
                _EVENTS.c.message_id,
                _EVENTS.c.route_attempts,
                _EVENTS.c.park_reason,
                _EVENTS.c.parked_at,
            )
            .where(*_PARKED)
            .order_by(_EVENTS.c.seq)
            .limit(limit)
        ).all()
    return int(total), [ParkedEvent(*row) for row in rows]


def _not_parked(s: Session, seqs: Sequence[int]) -> list[int]:
    found = set(
        s.execute(
            select(_EVENTS.c.seq).where(
                _EVENTS.c.seq.in_(bindparam("seqs", expanding=True)), *_PARKED
            ),
            {"seqs": list(seqs)},
        ).scalars()
    )
    return sorted(set(seqs) - found)


def retry_parked(url: str, seqs: Sequence[int]) -> list[int]:
    """Send the parked events ``seqs`` back into routing, their attempts reset.

    Each goes out before its customer's events still waiting (it has the lowest ``seq``), and
    its customer's backoff is cleared so it is tried at once.

    Returns:
        The seqs that are not parked (unknown, routed or dropped); then nothing is changed.
    """
    with write_session(url) as s:
        missing = _not_parked(s, seqs)
        if missing or not seqs:
            return missing
        customers = s.execute(
            update(_EVENTS)
            .where(_EVENTS.c.seq.in_(list(seqs)), *_PARKED)
            .values(parked_at=None, route_attempts=0, retried_at=utcnow())
            .returning(_EVENTS.c.customer_id)
        ).scalars()
        s.execute(
            update(_ROUTING)
            .where(_ROUTING.c.customer_id.in_(sorted(set(customers))))
            .values(failures=0, retry_at=None)
        )
    return []


def drop_parked(url: str, seqs: Sequence[int]) -> list[int]:
    """Mark the parked events ``seqs`` dropped: never routed, kept for the record.

    Returns:
        The seqs that are not parked (unknown, routed or dropped); then nothing is changed.
    """
    with write_session(url) as s:
        missing = _not_parked(s, seqs)
        if missing or not seqs:
            return missing
        s.execute(
            update(_EVENTS)
            .where(_EVENTS.c.seq.in_(list(seqs)), *_PARKED)
            .values(dropped_at=utcnow())
        )
    return []
