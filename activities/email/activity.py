"""The ``send_email`` activity: check, render and log a journey's message, then deliver it.

A message is sent at most once per ``SendEmailInput.key`` (see :mod:`.message_log`), only when
:func:`.gate.may_send` allows it, rendered by :mod:`.render` and delivered by :mod:`.smtp`.
A marketing message carries ``List-Unsubscribe`` and ``List-Unsubscribe-Post`` (RFC 8058:
one-click unsubscribe, :mod:`kaeru.unsubscribe_tokens`); a transactional one neither. Every
message is DKIM-signed when the shop's key is configured (:mod:`.signature`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from email.message import EmailMessage as MimeMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime
from pathlib import Path
from urllib.parse import quote

from opentelemetry.trace import Tracer
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.email.addresses import (
    mask_address,
    message_id_for,
    recipient_address,
    scrub,
    unusable_because,
)
from activities.email.gate import CONSENT, CONSENT_SKIP, SUPPRESSED, TOPIC_SKIP, may_send
from activities.email.message_log import (
    BOUNCED,
    DATA,
    PENDING,
    SENT,
    SKIPPED,
    SMTP_SUPERSEDED,
    UNCONFIRMED,
    MessageLog,
    Outgoing,
    already_purchased,
    not_consented,
    purchase_reason,
    purchase_since,
    undeliverable,
)
from activities.email.render import MAX_TEXT, TEMPLATES, Catalogue, Rendered, Renderer, clean
from activities.email.signature import Signer
from activities.email.smtp import SmtpConversation
from activities.metrics import count, kind_of
from activities.types import (
    ALREADY_PURCHASED,
    NOT_CONSENTED,
    UNDELIVERABLE,
    SendEmailInput,
    SendEmailResult,
)
from kaeru.db import session
from kaeru.identity import NO_EMAIL_ADDRESS, no_email_address
from kaeru.metric_names import MESSAGES_FAILED, MESSAGES_SENT, MESSAGES_SUPPRESSED
from kaeru.models import EmailMessage, utcnow
from kaeru.settings import Settings
from kaeru.telemetry import key_ref
from kaeru.tracking_tokens import register_tokens, signing_key
from kaeru.unsubscribe_tokens import register as register_unsubscribe
from kaeru.unsubscribe_tokens import token_for as unsubscribe_token


class EmailActivities:
    """The ``send_email`` activity, with its settings (SMTP relay, sender, shop) injected.

    Raises:
        DkimKeyError: the DKIM key file is unreadable or unusable (the worker does not start).
    """

    def __init__(
        self,
        settings: Settings,
        template_folders: Sequence[Path] = (TEMPLATES,),
        *,
        tracer: Tracer | None = None,
    ) -> None:
        self.settings = settings
        self.signer = Signer.of(settings)
        self.renderer = Renderer(settings, template_folders)
        self.log = MessageLog(settings)
        self.smtp = SmtpConversation(settings, self.log, tracer)

    @activity.defn(name="send_email")
    async def send_email(self, email: SendEmailInput) -> SendEmailResult:
        """Send one journey message to the customer, at most once per ``email.key``.

        Returns:
            ``sent``; ``already_sent`` when an earlier attempt sent it; ``skipped`` when a
            marketing message on the same ``topic`` went to the customer within
            ``KAERU_TOPIC_WINDOW`` (nothing sent; the journey goes on); ``unconfirmed`` when
            this or an earlier attempt got no answer inside the DATA window (see
            :mod:`.message_log`). Its ``to_address`` is masked (``a***@example.com``): the
            result lands in the history.

        Raises:
            ApplicationError: ``NoEmailAddress``, ``Undeliverable`` (suppressed address, hard
                bounce), ``NotConsented`` (a marketing message to a customer without
                consent), ``AlreadyPurchased`` (an order at or after ``ordered_since``,
                checked before SMTP and again as DATA is claimed) or ``TemplateMissing``, all
                non-retryable; retryable ones for 4xx answers, connection trouble, broken
                templates and settings to fix.
            asyncio.CancelledError: cancelled before this attempt claimed DATA (nothing sent;
                a cancel after the claim waits for the send to finish and is then ignored).
        """
        async with _heartbeating():
            try:
                outgoing = await asyncio.to_thread(self._prepare, email)
            except Exception as exc:
                _count_refusal(email, exc, before_smtp=True)
                raise
            status = outgoing.status
            if outgoing.payload is not None:
                try:
                    status = await self.smtp.deliver(email, outgoing)
                except Exception as exc:
                    _count_refusal(email, exc, before_smtp=False)
                    raise
        _count_result(email, status)
        return SendEmailResult(outgoing.message_id, mask_address(outgoing.to_address), status)

    def _prepare(self, email: SendEmailInput) -> Outgoing:
        """Render the message and count this attempt in its log row, or say why not to send.

        The row is read, then written with a compare-and-set on what was read; if another
        attempt changed it in between (a zombie claimed ``data``, a retry started), read again.
        """
        self.renderer.check_family(email.template)
        for _ in range(5):
            try:
                outgoing = self._try_prepare(email)
            except IntegrityError:  # another attempt created the row first: read it
                continue
            if outgoing is not None:
                return outgoing
        raise ApplicationError(
            f"attempts of email {email.key} kept changing its message log row under each "
            "other; the send is retried with backoff",
            type=SMTP_SUPERSEDED,
        )

    def _settled(self, s: Session, email: SendEmailInput, row: EmailMessage) -> Outgoing | None:
        """The answer for a row an earlier attempt settled; None when this attempt goes on."""
        if row.status == SENT:
            return Outgoing(row.message_id, row.to_address, status="already_sent")
        if row.status in (DATA, UNCONFIRMED):
            if row.status == DATA and not self.log.settle_unconfirmed(s, row):
                raise _ReadAgain  # the attempt inside DATA answered meanwhile
            activity.logger.warning(
                "email %s may have been delivered already: an earlier attempt sent it "
                "after the server's 354 and got no answer. Not resending it (at most "
                "once); the server's log for Message-ID %s says whether it went out.",
                key_ref(email.key),
                row.message_id,
            )
            return Outgoing(row.message_id, row.to_address, status=UNCONFIRMED)
        if row.status == BOUNCED:
            raise undeliverable(f"{mask_address(row.to_address)} bounced earlier: {row.error}")
        if row.status == SKIPPED and (row.error or "").startswith(TOPIC_SKIP):
            return Outgoing(row.message_id, row.to_address, status=SKIPPED)
        if row.status == SKIPPED and (row.error or "").startswith(CONSENT_SKIP):
            raise not_consented(row.error or CONSENT_SKIP)
        return None

    def _try_prepare(self, email: SendEmailInput) -> Outgoing | None:
        with session(self.settings.resolved_database_url) as s:
            link_key = signing_key(s, self.settings.secret_key)  # may commit: call it first
            row = s.get(EmailMessage, email.key)
            if row is not None:
                try:
                    settled = self._settled(s, email, row)
                except _ReadAgain:
                    return None
                if settled is not None:
                    return settled
            purchase = purchase_since(s, email)
            if row is not None and row.status == SKIPPED:
                reason = row.error or "the customer bought meanwhile"
                raise already_purchased(email, reason, purchase)
            if purchase is not None:
                if not self.log.skip(s, email, row, purchase_reason(purchase)):
                    return None
                s.commit()  # the skip must outlive the error raised next
                raise already_purchased(email, purchase_reason(purchase), purchase)

            address = recipient_address(s, email.customer_id)
            if not address:
                raise no_email_address(email.customer_id, f"the {email.step} email cannot be sent")
            verdict = may_send(
                s,
                email,
                address,
                self.settings.topic_window,
                unknown_consent_is_yes=self.settings.unknown_consent_is_yes,
            )
            if verdict is not None and verdict.rule == SUPPRESSED:
                raise undeliverable(verdict.reason)
            if verdict is not None and verdict.rule == CONSENT:
                if not self.log.skip(s, email, row, verdict.reason):
                    return None
                s.commit()  # the log row must outlive the error raised next
                raise not_consented(verdict.reason)
            if verdict is not None:  # the topic rule: skipped, and the journey goes on
                if not self.log.skip(s, email, row, verdict.reason):
                    return None
                skipped = s.get(EmailMessage, email.key)
                assert skipped is not None
                return Outgoing(skipped.message_id, skipped.to_address, status=SKIPPED)
            problem = unusable_because(address)
            if problem is not None:
                raise undeliverable(
                    f"customer {email.customer_id!r} has an unusable email address "
                    f"{mask_address(address)!r} ({scrub(problem)}); send an identify call "
                    "with a correct traits.email"
                )

            # The first attempt's id, even if KAERU_MAIL_FROM changed since: one message, one id.
            mail_from = self.settings.mail_from
            message_id = row.message_id if row else message_id_for(email.key, mail_from)
            rendered = self.renderer.render(email, link_key, Catalogue(s))
            if row is None:
                attempt = 1
                s.add(
                    EmailMessage(
                        key=email.key,
                        message_id=message_id,
                        customer_id=email.customer_id,
                        journey_id=email.journey_id,
                        step=email.step,
                        to_address=address,
                        subject=rendered.subject,
                        status=PENDING,
                        links=rendered.links,
                        attempts=attempt,
                        marketing=email.marketing,
                        topic=email.topic,
                        variant=email.variant,
                    )
                )
                s.flush()
            else:
                attempt = row.attempts + 1
                counted = s.exec(
                    update(EmailMessage)
                    .where(
                        col(EmailMessage.key) == email.key,
                        col(EmailMessage.status) == row.status,
                        col(EmailMessage.attempts) == row.attempts,
                    )
                    .values(
                        attempts=attempt,
                        to_address=address,
                        subject=rendered.subject,
                        links=rendered.links,
                        marketing=email.marketing,
                        topic=email.topic,
                    )
                )
                if counted.rowcount != 1:
                    return None  # another attempt moved the row meanwhile: read it again
            register_tokens(s, link_key, email.key, len(rendered.links))
            if rendered.unsubscribe_url is not None:
                register_unsubscribe(s, link_key, email.key)
            payload = self._compose(email, address, message_id, rendered, link_key)
        return Outgoing(message_id, address, payload, attempt=attempt)

    def _compose(
        self,
        email: SendEmailInput,
        address: str,
        message_id: str,
        rendered: Rendered,
        link_key: bytes,
    ) -> bytes:
        """The message's bytes as SMTP sends them, DKIM-signed when a key is configured."""
        message = MimeMessage()
        message["From"] = self.settings.mail_from
        message["To"] = address
        message["Subject"] = rendered.subject
        message["Date"] = format_datetime(utcnow())
        message["Message-ID"] = message_id
        # Both hold a customer id from the shop's events: never let it add a header line.
        message["X-Kaeru-Journey"] = clean(email.journey_id, MAX_TEXT)
        message["X-Kaeru-Step"] = clean(email.step, MAX_TEXT)
        if rendered.unsubscribe_url is not None:
            targets = [rendered.unsubscribe_url]
            if self.settings.unsubscribe_mailto:
                subject = f"unsubscribe {unsubscribe_token(link_key, email.key)}"
                targets.append(
                    f"mailto:{self.settings.unsubscribe_mailto}?subject={quote(subject)}"
                )
            message["List-Unsubscribe"] = ", ".join(f"<{target}>" for target in targets)
            message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        # Quoted-printable, 7-bit clean: a relay that would recode an 8-bit body (a server
        # without 8BITMIME on the way) would break its DKIM signature (RFC 6376 section 5.3).
        message.set_content(rendered.text, cte="quoted-printable")
        message.add_alternative(rendered.html, subtype="html", cte="quoted-printable")
        payload = message.as_bytes(policy=SMTP_POLICY)
        return payload if self.signer is None else self.signer.sign(payload)


#: Errors that mean "not sent on purpose", as the ``reason`` of kaeru_messages_suppressed.
_SUPPRESSIONS = {
    NO_EMAIL_ADDRESS: "no_email_address",
    NOT_CONSENTED: "not_consented",
    ALREADY_PURCHASED: "already_purchased",
}


def _count_result(email: SendEmailInput, status: str) -> None:
    kind = kind_of(email.journey_id)
    if status == SENT:
        count(MESSAGES_SENT, "Messages handed to the SMTP relay", kind=kind)
    elif status == SKIPPED:
        count(MESSAGES_SUPPRESSED, "Messages not sent on purpose", kind=kind, reason="topic")
    elif status == UNCONFIRMED:
        count(MESSAGES_FAILED, "Send attempts that failed", kind=kind, reason="unconfirmed")


def _count_refusal(email: SendEmailInput, exc: Exception, *, before_smtp: bool) -> None:
    """Count a send that raised: a suppression (no address, no consent, bought, a suppressed
    or unusable address found before SMTP), or a failure (a bounce, anything retried)."""
    kind = kind_of(email.journey_id)
    error = exc.type if isinstance(exc, ApplicationError) else None
    if error in _SUPPRESSIONS:
        reason = _SUPPRESSIONS[error]
    elif error == UNDELIVERABLE and before_smtp:
        reason = "undeliverable_address"
    else:
        failure = "bounced" if error == UNDELIVERABLE else "error"
        count(MESSAGES_FAILED, "Send attempts that failed", kind=kind, reason=failure)
        return
    count(MESSAGES_SUPPRESSED, "Messages not sent on purpose", kind=kind, reason=reason)


class _ReadAgain(Exception):
    """Another attempt changed the row between this attempt's read and its write."""


@contextlib.asynccontextmanager
async def _heartbeating() -> AsyncIterator[None]:
    """Heartbeat in the background, so Temporal notices a dead worker within the timeout."""
    timeout = activity.info().heartbeat_timeout
    interval = timeout.total_seconds() / 3 if timeout else 5.0

    async def beat() -> None:
        while True:
            activity.heartbeat()
            await asyncio.sleep(interval)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait([task])  # unlike awaiting the task, never swallows our own cancel
