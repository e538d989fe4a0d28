"""The message log: one row per journey message (:class:`kaeru.models.EmailMessage`, table
``email_messages``), keyed by the step's idempotency key, which makes a retried send safe.

Its ``status`` moves:

- ``pending``: rendered and stored, the SMTP server not reached yet;
- ``sending``: connected and logged in, the envelope (MAIL, RCPT) and the DATA command under
  way;
- ``data``: committed after the server's ``354`` and before the first byte of the message,
  so from here the server may hold it;
- ``sent``: the server answered 250 to the message; ``bounced``: it refused it for good;
- ``unconfirmed``: the message went out after the ``354`` and no answer came (a broken line,
  a timeout, a worker that died), so its fate is unknown and it is never resent;
- ``skipped``: never sent and never will be: the customer bought at or after
  ``SendEmailInput.ordered_since`` (``AlreadyPurchased``), a marketing message on the same
  topic already went to them (:mod:`activities.email.gate`; the send answers ``skipped``), or
  the customer has no marketing consent (``NotConsented``; ``error`` says why).

A retry resends from ``pending`` or ``sending`` (the server provably holds nothing: a hang-up
before the ``354`` is one of these), returns ``already_sent`` from ``sent``, and never resends
from ``data`` or ``unconfirmed``: between the ``354`` and the server's final answer the
message's fate is unknown, and SMTP offers no way to ask. That window is the only ambiguous one
in the protocol, so inside it kaeru is at most once and reports the send as ``unconfirmed``.
A retry that finds ``data`` settles it as ``unconfirmed`` before it answers so.

Every status change is a compare-and-set on the attempt that owns the row: one ``UPDATE …
WHERE status IN (…) AND attempts = …``, never a read then a write, so of two attempts (a
zombie and its retry) at most one ever commits ``data``, whatever their interleaving, on SQLite
and PostgreSQL alike. A retry bumps ``attempts`` the same way before DATA, which fences older
attempts off from any later transition; from ``data`` on ``attempts`` names the attempt that
claimed it. That attempt's late 250 or 5xx still records what happened (``sent``,
``bounced``) after a retry settled the row, but its late 4xx can only reset ``data`` it still
owns, never ``unconfirmed``: the journey was told the send may have happened, and no one
resends it behind the journey's back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.email.addresses import message_id_for, normalise_address, scrub
from activities.email.gate import TOPIC_SKIP, suppression_of, topic_sent
from activities.types import ALREADY_PURCHASED, NOT_CONSENTED, UNDELIVERABLE, SendEmailInput
from kaeru.db import session
from kaeru.models import EmailMessage, Order, Suppression, utcnow
from kaeru.settings import Settings
from kaeru.telemetry import key_ref
from kaeru.touchpoints import EMAIL, record_touchpoint

PENDING = "pending"
SENDING = "sending"
DATA = "data"
SENT = "sent"
BOUNCED = "bounced"
UNCONFIRMED = "unconfirmed"
SKIPPED = "skipped"

#: ApplicationError type of an attempt that a newer attempt of the same send took over.
SMTP_SUPERSEDED = "SmtpSuperseded"


@dataclass(frozen=True)
class Outgoing:
    """A message ready for SMTP, or (``payload`` None) the answer when nothing must be sent."""

    message_id: str
    to_address: str
    payload: bytes | None = None
    status: str = SENT
    attempt: int = 0


class MessageLog:
    """Every status change of the message log's rows: each one a compare-and-set."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def advance(
        self,
        key: str,
        attempt: int,
        sources: Iterable[str],
        target: str,
        s: Session | None = None,
        **values: Any,
    ) -> bool:
        """Move attempt ``attempt``'s row from one of ``sources`` to ``target`` in one UPDATE.

        False if the row is in another status or a newer attempt has started: the caller lost.
        """
        statement = (
            update(EmailMessage)
            .where(
                col(EmailMessage.key) == key,
                col(EmailMessage.attempts) == attempt,
                col(EmailMessage.status).in_(tuple(sources)),
            )
            .values(status=target, **values)
        )
        if s is not None:
            return bool(s.exec(statement).rowcount == 1)
        with session(self.settings.resolved_database_url) as own:
            return bool(own.exec(statement).rowcount == 1)

    def advance_or_stop(
        self, key: str, attempt: int, sources: Iterable[str], target: str, **values: Any
    ) -> None:
        if not self.advance(key, attempt, sources, target, **values):
            raise ApplicationError(
                f"attempt {attempt} of email {key} was overtaken by another attempt before "
                f"{target.upper()}, so it stops here and leaves the sending to that one",
                type=SMTP_SUPERSEDED,
            )

    def claim_data(self, email: SendEmailInput, attempt: int) -> bool:
        """Commit ``data`` for this attempt, unless another attempt has moved the row meanwhile,
        the customer has bought since the journey started, or another marketing message on
        this one's topic went out meanwhile (then the row is ``skipped``).

        A worker cut off from Temporal (not from SMTP) keeps sending while Temporal starts a
        new attempt elsewhere; the attempt counter lets only the newest one enter DATA, and the
        status lets only one attempt ever enter it.

        Returns:
            True when claimed; False when skipped for the topic (nothing to send).
        """
        with session(self.settings.resolved_database_url) as s:
            purchase = purchase_since(s, email)
            if purchase is not None:
                reason = purchase_reason(purchase)
                if self.advance(email.key, attempt, (PENDING, SENDING), SKIPPED, s, error=reason):
                    s.commit()  # the skip must outlive the error raised next
                    raise already_purchased(email, reason, purchase)
            elif (earlier := topic_sent(s, email, self.settings.topic_window)) is not None:
                reason = f"{TOPIC_SKIP}: {earlier.step} email {earlier.message_id}"
                if self.advance(email.key, attempt, (PENDING, SENDING), SKIPPED, s, error=reason):
                    return False
            elif self.advance(email.key, attempt, (PENDING, SENDING), DATA, s, error=None):
                return True
        raise ApplicationError(
            f"attempt {attempt} of email {email.key} was overtaken by another attempt "
            "before DATA, so it stops here and leaves the sending to that one",
            type=SMTP_SUPERSEDED,
        )

    def settle_unconfirmed(self, s: Session, row: EmailMessage) -> bool:
        """Settle a send found inside ``data`` as ``unconfirmed``: this retry answers so.

        The attempt that claimed ``data`` may still be alive (a zombie); from now on its late
        250 or 5xx still records what truly happened, but its 4xx can no longer reset the row
        for a resend behind the journey's back. False if that attempt answered first.
        """
        return self.advance(row.key, row.attempts, (DATA,), UNCONFIRMED, s)

    def deferred_in_data(self, key: str, attempt: int, answer: str) -> None:
        with session(self.settings.resolved_database_url) as s:
            if self.advance(key, attempt, (DATA,), SENDING, s, error=answer):
                return
            # Settled as unconfirmed by a retry: keep the verdict, note that it was not sent.
            self.advance(
                key,
                attempt,
                (UNCONFIRMED,),
                UNCONFIRMED,
                s,
                error=f"DATA: {answer} (after the send was settled as unconfirmed: this "
                "attempt's message was refused, so the server holds no copy from it)",
            )

    def skip(
        self, s: Session, email: SendEmailInput, row: EmailMessage | None, reason: str
    ) -> bool:
        """Record the send as ``skipped`` (never to be sent) before any SMTP; False if another
        attempt changed the row meanwhile."""
        if row is None:
            s.add(
                EmailMessage(
                    key=email.key,
                    message_id=message_id_for(email.key, self.settings.mail_from),
                    customer_id=email.customer_id,
                    journey_id=email.journey_id,
                    step=email.step,
                    to_address="",
                    subject="",
                    status=SKIPPED,
                    error=reason,
                    attempts=1,
                    marketing=email.marketing,
                    topic=email.topic,
                    variant=email.variant,
                )
            )
            s.flush()
            return True
        return self.advance(
            email.key,
            row.attempts,
            (row.status,),
            SKIPPED,
            s,
            attempts=row.attempts + 1,
            error=reason,
        )

    def mark_sent(self, email: SendEmailInput, out: Outgoing) -> None:
        with session(self.settings.resolved_database_url) as s:
            if not self.advance(
                email.key, out.attempt, (DATA, UNCONFIRMED), SENT, s, sent_at=utcnow(), error=None
            ):
                activity.logger.warning(
                    "email %s was sent but its message log row left `data` meanwhile",
                    key_ref(email.key),
                )
                return
            record_touchpoint(
                s,
                customer_id=email.customer_id,
                kind="email_sent",
                key=f"{email.key}/email_sent",
                journey_id=email.journey_id,
                step=email.step,
                channel=EMAIL,
                variant=email.variant,
                detail={"message_id": out.message_id, "template": email.template}
                | ({"experiment": email.experiment} if email.experiment else {}),
            )

    def mark_bounced(
        self, email: SendEmailInput, out: Outgoing, phase: str, answer: str, suppress: bool
    ) -> None:
        with session(self.settings.resolved_database_url) as s:
            bounced = self.advance(
                email.key,
                out.attempt,
                (SENDING, DATA, UNCONFIRMED),
                BOUNCED,
                s,
                error=f"{phase.upper()}: {answer}",
            )
            if suppress and suppression_of(s, out.to_address) is None:
                s.add(
                    Suppression(
                        email=normalise_address(out.to_address),
                        reason="bounce",
                        detail=answer,
                        source="smtp",
                    )
                )
            if not bounced:
                return  # another attempt owns the row now; the address verdict still holds
            record_touchpoint(
                s,
                customer_id=email.customer_id,
                kind="email_bounced",
                key=f"{email.key}/email_bounced",
                journey_id=email.journey_id,
                step=email.step,
                channel=EMAIL,
                variant=email.variant,
                detail={"message_id": out.message_id, "phase": phase, "answer": answer},
            )


def undeliverable(message: str) -> ApplicationError:
    return ApplicationError(scrub(message), type=UNDELIVERABLE, non_retryable=True)


def not_consented(message: str) -> ApplicationError:
    """``NotConsented``: a marketing message to a customer without consent (not retried:
    the journey ends ``unsubscribed``). ``message`` names no personal data."""
    return ApplicationError(scrub(message), type=NOT_CONSENTED, non_retryable=True)


def purchase_since(s: Session, email: SendEmailInput) -> Order | None:
    """The customer's first stored order at or after ``email.ordered_since``, if any."""
    if email.ordered_since is None:
        return None
    since = datetime.fromtimestamp(email.ordered_since, UTC)
    return s.exec(
        select(Order)
        .where(col(Order.customer_id) == email.customer_id, col(Order.completed_at) >= since)
        .order_by(col(Order.completed_at))
        .limit(1)
    ).first()


def purchase_reason(order: Order) -> str:
    when = f"{order.completed_at:%Y-%m-%d %H:%M:%S} UTC"
    return f"already purchased: order {order.order_id!r} completed {when}"


def already_purchased(email: SendEmailInput, reason: str, order: Order | None) -> ApplicationError:
    """The ``AlreadyPurchased`` error; its one detail is the order found (when it still is).

    The journey converts on that order: the order's event may never reach it (it was routed
    before the journey started, or it arrives while the journey ends). The detail is a plain
    dict (``order_id``, ``total_minor``, ``currency``, ``coupon``, ``completed_at`` in seconds
    since the epoch), so the workflow sandbox decodes it without this module's types.
    """
    details = []
    if order is not None:
        details.append(
            {
                "order_id": order.order_id,
                "total_minor": order.total_minor,
                "currency": order.currency,
                "coupon": order.coupon,
                "completed_at": order.completed_at.timestamp(),
            }
        )
    return ApplicationError(
        f"the {email.step} email is not sent: {reason}, at or after the events that started "
        "the journey",
        *details,
        type=ALREADY_PURCHASED,
        non_retryable=True,
    )
