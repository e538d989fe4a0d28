"""The SMTP conversation: step by step, so the message log claims ``data`` right before DATA.

A cancelled send (the shopper bought meanwhile) stops wherever it is before ``data`` is
claimed; from the claim on it is not interruptible (the message is bounded by
``smtp_timeout``), so a cancel never leaves an unsent message marked ``data``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable
from email.utils import parseaddr
from typing import NoReturn, TypeVar

import aiosmtplib
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from aiosmtplib.typing import SMTPStatus
from opentelemetry.trace import NoOpTracer, SpanKind, Tracer
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.email.addresses import mask_address, scrub
from activities.email.message_log import (
    DATA,
    PENDING,
    SENDING,
    SENT,
    SKIPPED,
    UNCONFIRMED,
    MessageLog,
    Outgoing,
    undeliverable,
)
from activities.types import SendEmailInput
from kaeru.settings import Settings
from kaeru.telemetry import key_ref

T = TypeVar("T")

#: ApplicationError types of retryable failures, so operators can tell them apart in the UI.
SMTP_DEFERRED = "SmtpDeferred"  # a 4xx answer: the server asks us to come back later
SMTP_UNREACHABLE = "SmtpUnreachable"  # no connection, a timeout, a dropped line
SMTP_MISCONFIGURED = "SmtpMisconfigured"  # our settings are wrong; a retry after a fix works

# RFC 3463 enhanced status codes: "5.1.1" (bad mailbox) or "5.7.1" (policy) after the code.
_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")


class _Refusal:
    """How to treat an SMTP reply code, by the conversation phase that drew it."""

    ADDRESS = "address"  # the mailbox is bad: bounce and suppress the address
    MESSAGE = "message"  # this message is refused for good, the address may be fine
    CONFIG = "config"  # our sender, login or relay rights are refused: fix settings, retry
    TEMPORARY = "temporary"

    @staticmethod
    def classify(phase: str, code: int, text: str) -> str:
        if code < 500:
            return _Refusal.TEMPORARY
        enhanced = _ENHANCED.match(text)
        subject = enhanced.group(2) if enhanced else None
        if phase == "rcpt":
            # "554 5.7.1 Relay access denied" is about us, not the shopper: suppressing the
            # address would, one journey at a time, suppress every customer.
            return _Refusal.CONFIG if subject == "7" else _Refusal.ADDRESS
        if phase == "data":
            # Servers that check mailboxes only after DATA say so with 5.1.x; anything else
            # (spam, content, policy) rejects this message, not the address.
            return _Refusal.ADDRESS if subject == "1" else _Refusal.MESSAGE
        return _Refusal.CONFIG  # greeting, EHLO, STARTTLS, AUTH or MAIL FROM


class SmtpConversation:
    """Delivers one prepared message over SMTP, recording each step in the message log."""

    def __init__(self, settings: Settings, log: MessageLog, tracer: Tracer | None = None) -> None:
        self.settings = settings
        self.log = log
        self.tracer = tracer or NoOpTracer()

    async def deliver(self, email: SendEmailInput, out: Outgoing) -> str:
        """:meth:`converse`, in a span ``SMTP send`` (the relay's host and port, the journey's
        step and the outcome; never an address)."""
        attributes: dict[str, str | int] = {
            "server.address": self.settings.smtp_host or "",
            "server.port": self.settings.smtp_port,
            "kaeru.email.step": email.step,
        }
        with self.tracer.start_as_current_span(
            "SMTP send", kind=SpanKind.CLIENT, attributes=attributes
        ) as span:
            outcome = await self.converse(email, out)
            span.set_attribute("kaeru.email.outcome", outcome)
            activity.logger.info("email %s (step %s): %s", key_ref(email.key), email.step, outcome)
            return outcome

    async def converse(self, email: SendEmailInput, out: Outgoing) -> str:
        """Run the SMTP conversation step by step, to commit ``data`` right before DATA.

        Up to RCPT a cancel stops the send (nothing was claimed); from the claim on the rest
        runs to its end despite a cancel (see :meth:`_transmit`).

        Returns:
            ``sent``; ``skipped`` if a message on its topic went out before the claim;
            ``unconfirmed`` if the line broke inside the DATA window.
        """
        s = self.settings
        if not s.smtp_host:
            raise ApplicationError(
                "KAERU_SMTP_HOST is not set, so kaeru cannot send email: set it (and "
                "KAERU_SMTP_PORT) to your SMTP relay, or run `kaeru dev`, which starts a mail "
                "catcher; the send is retried until then",
                type=SMTP_MISCONFIGURED,
            )
        sender = parseaddr(s.mail_from)[1] or s.mail_from.strip()
        smtp = aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            timeout=s.smtp_timeout,
            use_tls=s.smtp_tls,
            start_tls=False,  # STARTTLS only when configured: never a silent downgrade/upgrade
        )
        phase = "connect"
        try:
            try:
                await smtp.connect()
                phase = "ehlo"
                await smtp.ehlo()
                if s.smtp_starttls:
                    phase = "starttls"
                    await smtp.starttls()
                    await smtp.ehlo()
                if s.smtp_username:
                    phase = "login"
                    await smtp.login(
                        s.smtp_username,
                        s.smtp_password.get_secret_value() if s.smtp_password else "",
                    )
                await asyncio.to_thread(
                    self.log.advance_or_stop, email.key, out.attempt, (PENDING, SENDING), SENDING
                )
                phase = "mail"
                await smtp.mail(sender)
                phase = "rcpt"
                await smtp.rcpt(out.to_address)
            except (aiosmtplib.SMTPException, OSError) as exc:
                return await self._failed(email, out, phase, exc)
            return await despite_cancel(self._transmit(email, out, smtp), email.key)
        finally:
            smtp.close()

    async def _transmit(self, email: SendEmailInput, out: Outgoing, smtp: aiosmtplib.SMTP) -> str:
        """Start DATA, claim ``data``, send the message and record the outcome.

        Until the server's ``354`` nothing of the message has left, so a hang-up there is
        retried like any broken line. The claim (and the last check for a purchase) comes
        after the ``354`` and before the first byte of the message; an attempt that loses the
        claim hangs up without the final ``.``, so the server discards what it has. From the
        claim on this runs to its end despite a cancel: a cancel cutting in between the
        claim's commit and the message would leave an unsent message marked ``data``. The
        message and its answer are bounded by ``smtp_timeout`` (no answer: ``unconfirmed``).
        """
        assert out.payload is not None
        try:
            start = await smtp.execute_command(b"DATA")
            if start.code != SMTPStatus.start_input:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
        except (aiosmtplib.SMTPException, OSError) as exc:
            return await self._failed(email, out, "data", exc)
        return await despite_cancel(self._send_message(email, out, smtp), email.key)

    async def _send_message(
        self, email: SendEmailInput, out: Outgoing, smtp: aiosmtplib.SMTP
    ) -> str:
        assert out.payload is not None
        try:
            claimed = await asyncio.to_thread(self.log.claim_data, email, out.attempt)
        except BaseException:
            smtp.close()  # inside DATA without the final ".": the server discards the message
            raise
        if not claimed:  # another message on this topic went out meanwhile
            smtp.close()
            return SKIPPED
        try:
            await asyncio.wait_for(
                _send_content(smtp, out.payload, self.settings.smtp_timeout),
                self.settings.smtp_timeout,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            return await self._failed(email, out, "data", exc, claimed=True)
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await smtp.quit()  # the message is accepted; a failed goodbye changes nothing
        await asyncio.to_thread(self.log.mark_sent, email, out)
        return SENT

    async def _failed(
        self,
        email: SendEmailInput,
        out: Outgoing,
        phase: str,
        exc: Exception,
        *,
        claimed: bool = False,
    ) -> str:
        """Map a failed SMTP step to an error, or (a broken line once the message started
        after the claim of ``data``) ``unconfirmed``."""
        s = self.settings
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            await self._refused(email, out, phase, exc.code, exc.message)
        if isinstance(
            exc, aiosmtplib.SMTPServerDisconnected | aiosmtplib.SMTPTimeoutError | OSError
        ):
            if claimed:
                await asyncio.to_thread(
                    self.log.advance, email.key, out.attempt, (DATA,), UNCONFIRMED
                )
                activity.logger.warning(
                    "the connection to %s:%s broke after the message of email %s had started "
                    "(%s): the server may have it, so it is not resent; its log for "
                    "Message-ID %s says whether it went out",
                    s.smtp_host,
                    s.smtp_port,
                    key_ref(email.key),
                    exc or type(exc).__name__,
                    out.message_id,
                )
                return UNCONFIRMED
            raise ApplicationError(
                f"cannot talk to the SMTP server at {s.smtp_host}:{s.smtp_port} during "
                f"{phase.upper()}: {scrub(str(exc)) or type(exc).__name__}. Check that it runs "
                "and that KAERU_SMTP_HOST, KAERU_SMTP_PORT, KAERU_SMTP_TLS and "
                "KAERU_SMTP_STARTTLS match it; the send is retried with backoff",
                type=SMTP_UNREACHABLE,
            ) from exc
        # No reply code: the server lacks what our settings require (AUTH, STARTTLS).
        raise ApplicationError(
            f"the SMTP server at {s.smtp_host}:{s.smtp_port} cannot do what kaeru's "
            f"settings ask at {phase.upper()}: {scrub(str(exc))}. Check KAERU_SMTP_STARTTLS, "
            "KAERU_SMTP_TLS, KAERU_SMTP_USERNAME and KAERU_SMTP_PASSWORD against the "
            "relay; the send is retried with backoff",
            type=SMTP_MISCONFIGURED,
        ) from exc

    async def _refused(
        self, email: SendEmailInput, out: Outgoing, phase: str, code: int, text: str
    ) -> NoReturn:
        """Turn an SMTP refusal into the right error (and, if permanent, a bounce record)."""
        s = self.settings
        kind = _Refusal.classify(phase, code, text)
        answer = f"{code} {text}".strip()
        shown = scrub(answer)  # servers quote the recipient: "550 <alice@…>: no such user"
        to = mask_address(out.to_address)
        where = f"the SMTP server at {s.smtp_host}:{s.smtp_port}"
        if kind == _Refusal.TEMPORARY:
            if phase == "data":
                # The server refused the message, so it holds nothing: resend, unless a retry
                # has already settled the send as unconfirmed (it told the journey so).
                await asyncio.to_thread(self.log.deferred_in_data, email.key, out.attempt, answer)
            raise ApplicationError(
                f"{where} deferred the {email.step} email to {to} at "
                f"{phase.upper()} with {shown}; the send is retried with backoff",
                type=SMTP_DEFERRED,
            )
        if kind == _Refusal.CONFIG:
            fix = {
                "login": "check KAERU_SMTP_USERNAME and KAERU_SMTP_PASSWORD",
                "mail": "set KAERU_MAIL_FROM to a sender the relay accepts for this account",
                "rcpt": "allow this host or account to relay (or set KAERU_SMTP_USERNAME "
                "and KAERU_SMTP_PASSWORD)",
            }.get(phase, "check the KAERU_SMTP_* settings against the relay")
            raise ApplicationError(
                f"{where} refused kaeru at {phase.upper()} with {shown}: {fix}. The send is "
                "retried with backoff, so it goes out once the settings are fixed",
                type=SMTP_MISCONFIGURED,
            )
        suppress = kind == _Refusal.ADDRESS
        await asyncio.to_thread(self.log.mark_bounced, email, out, phase, answer, suppress)
        consequence = (
            "The address is now suppressed: delete its row from the suppressions table if the "
            "shopper fixes it"
            if suppress
            else "The message was refused, not the address: check its content with the relay"
        )
        raise undeliverable(
            f"{where} refused the {email.step} email to {to} at {phase.upper()} "
            f"with {shown}. {consequence}"
        )


async def _send_content(smtp: aiosmtplib.SMTP, payload: bytes, timeout: float) -> None:
    """Send the message after the server's ``354`` and read its answer (aiosmtplib's
    ``data()`` sends the DATA command too, so the claim could not sit between the two).

    Lines are dot-stuffed and end in CRLF, as ``data()`` sends them.
    """
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    content = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(payload)) + b".\r\n"
    # No await between the write and the read: the answer cannot arrive unasked for.
    protocol.write(content)
    reply = await protocol.read_response(timeout=timeout)
    if reply.code != SMTPStatus.completed:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)


async def despite_cancel(work: Awaitable[T], key: str) -> T:
    """Await ``work`` to its end even if this task is cancelled meanwhile, then go on as if it
    had not been: ``work`` must be bounded (here by ``smtp_timeout``)."""
    task = asyncio.ensure_future(work)
    swallowed = 0
    try:
        while True:
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.cancelled():
                    raise
                swallowed += 1
    finally:
        if swallowed:
            activity.logger.info(
                "email %s was cancelled after it claimed DATA: finishing the send first",
                key_ref(key),
            )
            current = asyncio.current_task()
            for _ in range(swallowed):
                if current is not None:
                    current.uncancel()
