"""Record a change of a customer's consent, and tell their running journeys when they said no.

Every path that changes consent outside an ``identify`` (the unsubscribe link and
``List-Unsubscribe``, the preference page, the consent API, a spam complaint) calls
:func:`record_consent_change`. An unsubscribe is stored in the same transaction as a
``Marketing Consent Withdrawn`` event in the outbox (``events``), so the router delivers it to
every running journey of the customer that listens for it, even if this process dies right
after: the journeys end before their next marketing step and leave their ad audiences. The
send gate checks consent again at every send, so nothing marketing goes out meanwhile either.
"""

from __future__ import annotations

from kaeru.consent import CONSENT_WITHDRAWN, set_consent
from kaeru.db import write_session
from kaeru.models import utcnow
from kaeru.settings import Settings
from starter.ingest import insert_events, outbox_row

#: How the message ids of withdrawal events begin (reserved: a sender may not use it).
CONSENT_ID_PREFIX = "consent:"


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
    """Set the customer's consent on ``channel`` (or for one journey ``kind``) from
    ``source``; True if it changed. Blocking: call from a thread.

    An unsubscribe also stores the event :data:`~kaeru.consent.CONSENT_WITHDRAWN` for routing
    (wake the router after it, as ingestion does). Its message id is the change's id: one
    change, one event.
    """
    now = utcnow()
    with write_session(settings.resolved_database_url) as s:
        change = set_consent(
            s, customer_id, channel, subscribed, source, kind=kind, detail=detail, at=now
        )
        if change is None or subscribed:
            return change is not None
        s.flush()  # gives the change its id
        message_id = f"{CONSENT_ID_PREFIX}{change.id}"
        properties = {"channel": channel, "kind": kind, "source": source}
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
                        "properties": properties,
                        "kaeru": {"consent_change": change.id},
                    },
                    timestamp=now,
                    received_at=now,
                    source="server",
                )
            ],
        )
    return True
