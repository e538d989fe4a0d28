"""May this message be sent? The one place that decides, for every journey's messages.

Today: no message goes to a suppressed address (hard bounce, later complaints and
unsubscribes), and a marketing message is not sent when a marketing message on the same
``topic`` (``cart:<fingerprint>``) already went to this customer within ``KAERU_TOPIC_WINDOW``,
from whichever journey. Transactional messages (``SendEmailInput.marketing`` False: an order
confirmation) skip the topic rule. A marketing message goes only to a customer with email
marketing consent (:func:`kaeru.consent.refusal`; ``KAERU_UNKNOWN_CONSENT_IS_YES``): this is
the last check at send time, for an unsubscribe that came after the journey's own checks.
Transactional messages do not ask for consent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from activities.email.addresses import mask_address, normalise_address
from activities.types import SendEmailInput
from kaeru.consent import refusal
from kaeru.models import EmailMessage, Suppression, utcnow
from kaeru.pseudonyms import journey_kind as journey_kind

#: Message-log statuses in which the SMTP server has, or may have, the message.
MAY_HAVE_GONE_OUT = ("data", "sent", "unconfirmed")
#: How a topic skip's row reads in the message log (``error``), so a retry recognises it.
TOPIC_SKIP = "topic already sent"
#: How a consent refusal's row reads in the message log (``error``), likewise.
CONSENT_SKIP = "no marketing consent"


@dataclass(frozen=True)
class Verdict:
    """Why a message is not sent: ``suppressed`` (undeliverable), ``consent`` (not consented)
    or ``topic`` (skipped)."""

    rule: str
    reason: str


SUPPRESSED = "suppressed"
CONSENT = "consent"
TOPIC = "topic"


def suppression_of(s: Session, address: str) -> Suppression | None:
    """The suppression of ``address``, whatever case it was stored in, or None."""
    wanted = normalise_address(address)
    return s.exec(select(Suppression).where(func.lower(Suppression.email) == wanted)).first()


def topic_sent(s: Session, email: SendEmailInput, window: timedelta) -> EmailMessage | None:
    """Another marketing message on ``email.topic`` to this customer within ``window``."""
    if not email.marketing or not email.topic:
        return None
    since = utcnow() - window
    return s.exec(
        select(EmailMessage)
        .where(
            col(EmailMessage.customer_id) == email.customer_id,
            col(EmailMessage.topic) == email.topic,
            col(EmailMessage.marketing),
            col(EmailMessage.key) != email.key,
            col(EmailMessage.status).in_(MAY_HAVE_GONE_OUT),
            col(EmailMessage.created_at) >= since,
        )
        .limit(1)
    ).first()


def may_send(
    s: Session,
    email: SendEmailInput,
    address: str,
    topic_window: timedelta,
    *,
    unknown_consent_is_yes: bool = False,
) -> Verdict | None:
    """None if ``email`` may go to ``address`` now, else the rule that stops it and why.

    ``unknown_consent_is_yes``: KAERU_UNKNOWN_CONSENT_IS_YES (a customer who never said counts
    as subscribed)."""
    suppressed = suppression_of(s, address)
    if suppressed is not None:
        return Verdict(
            SUPPRESSED,
            f"{mask_address(address)} is on the suppression list (reason: "
            f"{suppressed.reason}), so the {email.step} email is not sent; take it off "
            "(`kaeru suppressions remove`) only if the shopper asked for email again or the "
            "address works again",
        )
    if email.marketing and (
        why := refusal(
            s,
            email.customer_id,
            kind=journey_kind(email.journey_id, email.customer_id),
            unknown_is_yes=unknown_consent_is_yes,
        )
    ):
        return Verdict(CONSENT, f"{CONSENT_SKIP}: the {email.step} email is not sent: {why}")
    earlier = topic_sent(s, email, topic_window)
    if earlier is not None:
        return Verdict(
            TOPIC,
            f"{TOPIC_SKIP}: the {email.step} email is about {email.topic!r}, and a "
            f"{earlier.step} email (message {earlier.message_id}) went out about it on "
            f"{earlier.created_at:%Y-%m-%d %H:%M} UTC (KAERU_TOPIC_WINDOW)",
        )
    return None
