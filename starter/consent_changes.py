"""Record a change of a customer's consent, and tell their running journeys when they said no.

Every path that changes consent (an ``identify``'s consent traits, the unsubscribe link and
``List-Unsubscribe``, the preference page, the consent API, a spam complaint) goes through
:func:`change_consent`. An unsubscribe is stored in the same transaction as a ``Marketing
Consent Withdrawn`` event in the outbox (``events``), so the router delivers it to every
running journey of the customer that listens for it, even if this process dies right after:
the journeys end before their next marketing step and leave their ad audiences. The send gate
checks consent again at every send, so nothing marketing goes out meanwhile either.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session

from kaeru.consent import CONSENT_WITHDRAWN, set_consent
from kaeru.db import write_session
from kaeru.models import ConsentChange, utcnow
from kaeru.settings import Settings
from starter.events import CONSENT_ID_PREFIX as CONSENT_ID_PREFIX
from starter.outbox import insert_events, outbox_row


def change_consent(
    s: Session,
    customer_id: str,
    channel: str,
    subscribed: bool,
    source: str,
    *,
    kind: str | None = None,
    detail: str | None = None,
    at: datetime | None = None,
) -> ConsentChange | None:
    """Set the customer's consent on ``channel`` (or for one journey ``kind``) from
    ``source`` inside the caller's transaction; the history's new row, or None if nothing
    changed. The caller commits.

    An unsubscribe also stores the event :data:`~kaeru.consent.CONSENT_WITHDRAWN` for routing
    (wake the router after the commit, as ingestion does). Its message id is
    ``consent:<change id>``: one change, one event.
    """
    now = at or utcnow()
    change = set_consent(
        s, customer_id, channel, subscribed, source, kind=kind, detail=detail, at=now
    )
    if change is None or subscribed:
        return change
    s.flush()  # gives the change its id
    message_id = f"{CONSENT_ID_PREFIX}{change.id}"
    insert_events(
        s,
        [
            outbox_row(
                message_id=message_id,
                customer_id=customer_id,
                event_type="track",
                name=CONSENT_WITHDRAWN,
                payload={
                    "type": "track",
                    "event": CONSENT_WITHDRAWN,
                    "userId": customer_id,
                    "messageId": message_id,
                    "properties": {"channel": channel, "kind": kind, "source": source},
                    "kaeru": {"consent_change": change.id},
                },
                timestamp=now,
                received_at=now,
                source="server",
            )
        ],
    )
    return change


def record_consent_change(
    settings: Settings,
    customer_id: str,
    channel: str,
    subscribed: bool,
    source: str,
    *,
    kind: str | None = None,
    detail: str | None = None,
) -> bool:
    """:func:`change_consent` in a transaction of its own; True if it changed anything.
    Blocking: call from a thread, and wake the router after an unsubscribe."""
    with write_session(settings.resolved_database_url) as s:
        change = change_consent(
            s, customer_id, channel, subscribed, source, kind=kind, detail=detail
        )
    return change is not None
