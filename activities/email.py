"""Email: render a journey's message from Jinja2 templates and send it over SMTP, at most once.

The outbox row (:class:`kaeru.models.EmailMessage`, keyed by the step's idempotency key) is
what makes a retried send safe. Its ``status`` moves:

- ``pending``: rendered and stored, the SMTP server not reached yet;
- ``sending``: connected and logged in, the envelope (MAIL, RCPT) and the DATA command under
  way;
- ``data``: committed after the server's ``354`` and before the first byte of the message,
  so from here the server may hold it;
- ``sent``: the server answered 250 to the message; ``bounced``: it refused it for good;
- ``unconfirmed``: the message went out after the ``354`` and no answer came (a broken line,
  a timeout, a worker that died), so its fate is unknown and it is never resent;
- ``skipped``: the customer bought at or after ``SendEmailInput.ordered_since``, so it was
  never sent and never will be (``AlreadyPurchased``).

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

A cancelled send (the shopper bought meanwhile) stops wherever it is before ``data`` is
claimed; from the claim on it is not interruptible (the message is bounded by
``smtp_timeout``), so a cancel never leaves an unsent message marked ``data``.

Nothing this module puts into a workflow history (results, error messages) holds a full
email address: :func:`mask_address` shows ``a***@example.com`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.message import EmailMessage as MimeMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import aiosmtplib
import jinja2
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from aiosmtplib.typing import SMTPStatus
from markupsafe import escape
from sqlalchemy import func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.types import (
    ALREADY_PURCHASED,
    NO_EMAIL_ADDRESS,
    UNDELIVERABLE,
    CouponInfo,
    ProductInfo,
    SendEmailInput,
    SendEmailResult,
)
from kaeru.db import session
from kaeru.journal import email_of, record_touchpoint
from kaeru.models import EmailMessage, Order, Product, Suppression, utcnow
from kaeru.money import format_minor
from kaeru.settings import Settings
from kaeru.tracking import click_url, open_url, register_tokens, signing_key

T = TypeVar("T")

TEMPLATES = Path(__file__).parent / "templates"

PENDING = "pending"
SENDING = "sending"
DATA = "data"
SENT = "sent"
BOUNCED = "bounced"
UNCONFIRMED = "unconfirmed"
SKIPPED = "skipped"

#: ApplicationError types of retryable failures, so operators can tell them apart in the UI.
SMTP_DEFERRED = "SmtpDeferred"  # a 4xx answer: the server asks us to come back later
SMTP_UNREACHABLE = "SmtpUnreachable"  # no connection, a timeout, a dropped line
SMTP_MISCONFIGURED = "SmtpMisconfigured"  # our settings are wrong; a retry after a fix works
TEMPLATE_FAILED = "TemplateFailed"
SMTP_SUPERSEDED = "SmtpSuperseded"  # a newer attempt of the same send took over

#: The longest subject kaeru sends (the outbox column holds 500; mail clients show ~60).
MAX_SUBJECT = 200
#: The longest product name or header value kaeru puts in a message.
MAX_TEXT = 200
#: RFC 5321's limit on a forward path, less its angle brackets.
MAX_ADDRESS = 254

_FAMILY = re.compile(r"^[a-z0-9_]+$")
# RFC 3463 enhanced status codes: "5.1.1" (bad mailbox) or "5.7.1" (policy) after the code.
_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
# Anything that looks like an address, in a server's reply or an error message.
_ADDRESS = re.compile(r"[^\s<>\"'(),;:\[\]]+@[^\s<>\"'(),;:\[\]]+")
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def normalise_address(address: str) -> str:
    """The form of an address that suppressions are keyed and looked up by."""
    return address.strip().lower()


def mask_address(address: str) -> str:
    """``alice@example.com`` as ``a***@example.com``: what histories and errors may show."""
    local, at, domain = normalise_address(address).rpartition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"


def scrub(text: str) -> str:
    """``text`` with every address in it masked (a server's reply may quote the recipient)."""
    return _ADDRESS.sub(lambda m: mask_address(m.group(0)), text)


def message_id_for(key: str, mail_from: str) -> str:
    """The ``Message-ID`` of the message with idempotency key ``key``: the same on every try."""
    domain = parseaddr(mail_from)[1].rpartition("@")[2] or "kaeru.localhost"
    return f"<{hashlib.sha256(key.encode()).hexdigest()[:32]}@{domain}>"


def suppression_of(s: Session, address: str) -> Suppression | None:
    """The suppression of ``address``, whatever case it was stored in, or None."""
    wanted = normalise_address(address)
    return s.exec(select(Suppression).where(func.lower(Suppression.email) == wanted)).first()


@dataclass(frozen=True)
class _Outgoing:
    """A message ready for SMTP, or (``payload`` None) the answer when nothing must be sent."""

    message_id: str
    to_address: str
    payload: bytes | None = None
    status: str = SENT
    attempt: int = 0


@dataclass(frozen=True)
class _Rendered:
    subject: str
    text: str
    html: str
    links: list[str]


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


class EmailActivities:
    """The ``send_email`` activity, with its settings (SMTP relay, sender, shop) injected."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default=False),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    @activity.defn(name="send_email")
    async def send_email(self, email: SendEmailInput) -> SendEmailResult:
        """Send one journey message to the customer, at most once per ``email.key``.

        Returns:
            ``sent``; ``already_sent`` when an earlier attempt sent it; ``unconfirmed`` when
            this or an earlier attempt got no answer inside the DATA window (see the module
            docstring). Its ``to_address`` is masked (``a***@example.com``): the result lands
            in the history.

        Raises:
            ApplicationError: ``NoEmailAddress``, ``Undeliverable`` (suppressed address, hard
                bounce) or ``AlreadyPurchased`` (an order at or after ``ordered_since``,
                checked before SMTP and again as DATA is claimed), all non-retryable;
                retryable ones for 4xx answers, connection trouble and settings to fix.
            asyncio.CancelledError: cancelled before this attempt claimed DATA (nothing sent;
                a cancel after the claim waits for the send to finish and is then ignored).
        """
        async with _heartbeating():
            outgoing = await asyncio.to_thread(self._prepare, email)
            status = outgoing.status
            if outgoing.payload is not None:
                status = await self._deliver(email, outgoing)
        return SendEmailResult(outgoing.message_id, mask_address(outgoing.to_address), status)

    # ---- before SMTP: the outbox row and the rendered message ------------------------------

    def _prepare(self, email: SendEmailInput) -> _Outgoing:
        """Render the message and count this attempt in the outbox row, or say why not to send.

        The row is read, then written with a compare-and-set on what was read; if another
        attempt changed it in between (a zombie claimed ``data``, a retry started), read again.
        """
        for _ in range(5):
            try:
                outgoing = self._try_prepare(email)
            except IntegrityError:  # another attempt created the row first: read it
                continue
            if outgoing is not None:
                return outgoing
        raise ApplicationError(
            f"attempts of email {email.key} kept changing its outbox row under each other; "
            "the send is retried with backoff",
            type=SMTP_SUPERSEDED,
        )

    def _try_prepare(self, email: SendEmailInput) -> _Outgoing | None:
        with session(self.settings.resolved_database_url) as s:
            link_key = signing_key(s, self.settings.secret_key)  # may commit: call it first
            row = s.get(EmailMessage, email.key)
            if row is not None and row.status == SENT:
                return _Outgoing(row.message_id, row.to_address, status="already_sent")
            if row is not None and row.status in (DATA, UNCONFIRMED):
                if row.status == DATA and not self._settle_unconfirmed(s, row):
                    return None  # the attempt inside DATA answered meanwhile: read it again
                activity.logger.warning(
                    "email %s may have been delivered already: an earlier attempt sent it "
                    "after the server's 354 and got no answer. Not resending it (at most "
                    "once); the server's log for Message-ID %s says whether it went out.",
                    email.key,
                    row.message_id,
                )
                return _Outgoing(row.message_id, row.to_address, status=UNCONFIRMED)
            if row is not None and row.status == BOUNCED:
                raise _undeliverable(f"{mask_address(row.to_address)} bounced earlier: {row.error}")
            purchase = _purchase_since(s, email)
            if row is not None and row.status == SKIPPED:
                reason = row.error or "the customer bought meanwhile"
                raise _already_purchased(email, reason, purchase)
            if purchase is not None:
                if not self._skip(s, email, row, _purchase_reason(purchase)):
                    return None
                s.commit()  # the skip must outlive the error raised next
                raise _already_purchased(email, _purchase_reason(purchase), purchase)

            address = (email_of(s, email.customer_id) or "").strip()
            if not address:
                raise ApplicationError(
                    f"customer {email.customer_id!r} has no known email address, so the "
                    f"{email.step} email cannot be sent; send an identify call with "
                    "traits.email for this customer",
                    type=NO_EMAIL_ADDRESS,
                    non_retryable=True,
                )
            suppressed = suppression_of(s, address)
            if suppressed is not None:
                raise _undeliverable(
                    f"{mask_address(address)} is on the suppression list (reason: "
                    f"{suppressed.reason}), so the {email.step} email is not sent; delete its "
                    "row from the suppressions table only if the shopper asked for email again "
                    "or the address works again"
                )
            try:
                if not address.isascii():
                    raise ValueError("non-ASCII addresses need SMTPUTF8, which kaeru lacks")
                if len(address) > MAX_ADDRESS:
                    raise ValueError(f"longer than {MAX_ADDRESS} characters")
                if quote_address(address) != f"<{address}>":
                    # "root,victim@example.com" would go to <root>, the To header to both.
                    raise ValueError("SMTP would read it as another address")
            except ValueError as exc:
                raise _undeliverable(
                    f"customer {email.customer_id!r} has an unusable email address "
                    f"{mask_address(address)!r} ({scrub(str(exc))}); send an identify call "
                    "with a correct traits.email"
                ) from exc

            # The first attempt's id, even if KAERU_MAIL_FROM changed since: one message, one id.
            mail_from = self.settings.mail_from
            message_id = row.message_id if row else message_id_for(email.key, mail_from)
            rendered = self._render(_with_catalogue(s, email), link_key)
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
                    )
                )
                if counted.rowcount != 1:
                    return None  # another attempt moved the row meanwhile: read it again
            register_tokens(s, link_key, email.key, len(rendered.links))
            payload = self._compose(email, address, message_id, rendered)
        return _Outgoing(message_id, address, payload, attempt=attempt)

    def _render(self, email: SendEmailInput, link_key: bytes) -> _Rendered:
        s = self.settings
        family = email.template
        links: list[str] = []
        hosts = _Hosts.of(s)

        def track(url: str) -> str:
            """The click-tracking link to ``url``, registering it in the message's links."""
            if _web_url(url) is None:
                raise ValueError(f"only http(s) links can be tracked, not {url!r}")
            if url not in links:
                links.append(url)
            return click_url(s.public_url, link_key, email.key, links.index(url))

        cart_url = hosts.link(email.cart_url) or s.cart_url
        context: dict[str, Any] = {
            "track": track,
            "shop": {"name": s.shop_name, "url": s.shop_url},
            "cart_url": cart_url,
            "cart": _cart_context(email, cart_url, hosts),
            "cart_total": _cart_total(email),
            "related": [_product_context(p, s.shop_url, hosts) for p in email.recommendations],
            "coupon": _coupon_context(email.coupon) if email.coupon else None,
        }
        if not _FAMILY.match(family):
            raise ApplicationError(
                f"template family {family!r} is not a plain name (a-z, 0-9, _); "
                "fix the journey that asked for it",
                type=TEMPLATE_FAILED,
                non_retryable=True,
            )
        try:
            subject = self.templates.get_template(f"{family}.subject.j2").render(context)
            text = self.templates.get_template(f"{family}.txt.j2").render(context)
            html = self.templates.get_template(f"{family}.html.j2").render(context)
        except (jinja2.TemplateError, ValueError) as exc:
            # A deploy fixes a broken template; retrying until then keeps the journey alive.
            raise ApplicationError(
                f"cannot render the {family} email: {scrub(str(exc))}. Fix activities/templates/"
                f"{family}.{{subject,html,txt}}.j2 and deploy; the send is retried meanwhile",
                type=TEMPLATE_FAILED,
            ) from exc
        pixel = open_url(s.public_url, link_key, email.key)
        return _Rendered(
            _clean(subject, MAX_SUBJECT),
            _encodable(text),
            _encodable(_with_pixel(html, pixel)),
            links,
        )

    def _compose(
        self, email: SendEmailInput, address: str, message_id: str, rendered: _Rendered
    ) -> bytes:
        message = MimeMessage()
        message["From"] = self.settings.mail_from
        message["To"] = address
        message["Subject"] = rendered.subject
        message["Date"] = format_datetime(utcnow())
        message["Message-ID"] = message_id
        # Both hold a customer id from the shop's events: never let it add a header line.
        message["X-Kaeru-Journey"] = _clean(email.journey_id, MAX_TEXT)
        message["X-Kaeru-Step"] = _clean(email.step, MAX_TEXT)
        message.set_content(rendered.text)
        message.add_alternative(rendered.html, subtype="html")
        return message.as_bytes(policy=SMTP_POLICY)

    # ---- the SMTP conversation -------------------------------------------------------------

    async def _deliver(self, email: SendEmailInput, out: _Outgoing) -> str:
        """Run the SMTP conversation step by step, to commit ``data`` right before DATA.

        Up to RCPT a cancel stops the send (nothing was claimed); from the claim on the rest
        runs to its end despite a cancel (see :meth:`_transmit`).

        Returns:
            ``sent``, or ``unconfirmed`` if the line broke inside the DATA window.
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
                    self._advance_or_stop, email.key, out.attempt, (PENDING, SENDING), SENDING
                )
                phase = "mail"
                await smtp.mail(sender)
                phase = "rcpt"
                await smtp.rcpt(out.to_address)
            except (aiosmtplib.SMTPException, OSError) as exc:
                return await self._failed(email, out, phase, exc)
            return await _despite_cancel(self._transmit(email, out, smtp), email.key)
        finally:
            smtp.close()

    async def _transmit(self, email: SendEmailInput, out: _Outgoing, smtp: aiosmtplib.SMTP) -> str:
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
        return await _despite_cancel(self._send_message(email, out, smtp), email.key)

    async def _send_message(
        self, email: SendEmailInput, out: _Outgoing, smtp: aiosmtplib.SMTP
    ) -> str:
        assert out.payload is not None
        try:
            await asyncio.to_thread(self._claim_data, email, out.attempt)
        except BaseException:
            smtp.close()  # inside DATA without the final ".": the server discards the message
            raise
        try:
            await asyncio.wait_for(
                _send_content(smtp, out.payload, self.settings.smtp_timeout),
                self.settings.smtp_timeout,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            return await self._failed(email, out, "data", exc, claimed=True)
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await smtp.quit()  # the message is accepted; a failed goodbye changes nothing
        await asyncio.to_thread(self._mark_sent, email, out)
        return SENT

    async def _failed(
        self,
        email: SendEmailInput,
        out: _Outgoing,
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
                await asyncio.to_thread(self._advance, email.key, out.attempt, (DATA,), UNCONFIRMED)
                activity.logger.warning(
                    "the connection to %s:%s broke after the message of email %s had started "
                    "(%s): the server may have it, so it is not resent; its log for "
                    "Message-ID %s says whether it went out",
                    s.smtp_host,
                    s.smtp_port,
                    email.key,
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
        self, email: SendEmailInput, out: _Outgoing, phase: str, code: int, text: str
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
                await asyncio.to_thread(self._deferred_in_data, email.key, out.attempt, answer)
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
        await asyncio.to_thread(self._mark_bounced, email, out, phase, answer, suppress)
        consequence = (
            "The address is now suppressed: delete its row from the suppressions table if the "
            "shopper fixes it"
            if suppress
            else "The message was refused, not the address: check its content with the relay"
        )
        raise _undeliverable(
            f"{where} refused the {email.step} email to {to} at {phase.upper()} "
            f"with {shown}. {consequence}"
        )

    # ---- outbox bookkeeping: every status change a compare-and-set ---------------------------

    def _advance(
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

    def _advance_or_stop(
        self, key: str, attempt: int, sources: Iterable[str], target: str, **values: Any
    ) -> None:
        if not self._advance(key, attempt, sources, target, **values):
            raise ApplicationError(
                f"attempt {attempt} of email {key} was overtaken by another attempt before "
                f"{target.upper()}, so it stops here and leaves the sending to that one",
                type=SMTP_SUPERSEDED,
            )

    def _claim_data(self, email: SendEmailInput, attempt: int) -> None:
        """Commit ``data`` for this attempt, unless another attempt has moved the row meanwhile
        or the customer has bought since the journey started (then the row is ``skipped``).

        A worker cut off from Temporal (not from SMTP) keeps sending while Temporal starts a
        new attempt elsewhere; the attempt counter lets only the newest one enter DATA, and the
        status lets only one attempt ever enter it.
        """
        with session(self.settings.resolved_database_url) as s:
            purchase = _purchase_since(s, email)
            if purchase is None:
                claimed = self._advance(email.key, attempt, (PENDING, SENDING), DATA, s, error=None)
            else:
                reason = _purchase_reason(purchase)
                claimed = self._advance(
                    email.key, attempt, (PENDING, SENDING), SKIPPED, s, error=reason
                )
                if claimed:
                    s.commit()  # the skip must outlive the error raised next
                    raise _already_purchased(email, reason, purchase)
        if not claimed:
            raise ApplicationError(
                f"attempt {attempt} of email {email.key} was overtaken by another attempt "
                "before DATA, so it stops here and leaves the sending to that one",
                type=SMTP_SUPERSEDED,
            )

    def _settle_unconfirmed(self, s: Session, row: EmailMessage) -> bool:
        """Settle a send found inside ``data`` as ``unconfirmed``: this retry answers so.

        The attempt that claimed ``data`` may still be alive (a zombie); from now on its late
        250 or 5xx still records what truly happened, but its 4xx can no longer reset the row
        for a resend behind the journey's back. False if that attempt answered first.
        """
        return self._advance(row.key, row.attempts, (DATA,), UNCONFIRMED, s)

    def _deferred_in_data(self, key: str, attempt: int, answer: str) -> None:
        with session(self.settings.resolved_database_url) as s:
            if self._advance(key, attempt, (DATA,), SENDING, s, error=answer):
                return
            # Settled as unconfirmed by a retry: keep the verdict, note that it was not sent.
            self._advance(
                key,
                attempt,
                (UNCONFIRMED,),
                UNCONFIRMED,
                s,
                error=f"DATA: {answer} (after the send was settled as unconfirmed: this "
                "attempt's message was refused, so the server holds no copy from it)",
            )

    def _skip(
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
                )
            )
            s.flush()
            return True
        return self._advance(
            email.key,
            row.attempts,
            (row.status,),
            SKIPPED,
            s,
            attempts=row.attempts + 1,
            error=reason,
        )

    def _mark_sent(self, email: SendEmailInput, out: _Outgoing) -> None:
        with session(self.settings.resolved_database_url) as s:
            if not self._advance(
                email.key, out.attempt, (DATA, UNCONFIRMED), SENT, s, sent_at=utcnow(), error=None
            ):
                activity.logger.warning(
                    "email %s was sent but its outbox row left `data` meanwhile", email.key
                )
                return
            record_touchpoint(
                s,
                customer_id=email.customer_id,
                kind="email_sent",
                key=f"{email.key}/email_sent",
                journey_id=email.journey_id,
                step=email.step,
                detail={"message_id": out.message_id, "template": email.template},
            )

    def _mark_bounced(
        self, email: SendEmailInput, out: _Outgoing, phase: str, answer: str, suppress: bool
    ) -> None:
        with session(self.settings.resolved_database_url) as s:
            bounced = self._advance(
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
                detail={"message_id": out.message_id, "phase": phase, "answer": answer},
            )


# ---- helpers ----------------------------------------------------------------------------------


def _undeliverable(message: str) -> ApplicationError:
    return ApplicationError(scrub(message), type=UNDELIVERABLE, non_retryable=True)


def _purchase_since(s: Session, email: SendEmailInput) -> Order | None:
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


def _purchase_reason(order: Order) -> str:
    when = f"{order.completed_at:%Y-%m-%d %H:%M:%S} UTC"
    return f"already purchased: order {order.order_id!r} completed {when}"


def _already_purchased(email: SendEmailInput, reason: str, order: Order | None) -> ApplicationError:
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


def _web_url(url: str | None) -> str | None:
    """``url`` if it is an http(s) URL; product data comes from events, so never trust it."""
    if url and re.match(r"^https?://[^\s\"'<>\\\x00-\x1f\x7f]+$", url, re.IGNORECASE):
        return url
    return None


def _host_of(url: str) -> str | None:
    try:
        host = urlsplit(url).hostname
    except ValueError:  # "http://[::1" and the like
        return None
    return host.rstrip(".").lower() if host else None


#: An origin: scheme, host (lower case), port (the scheme's default made explicit).
_Origin = tuple[str, str, int]
_DEFAULT_PORTS = {"http": 80, "https": 443}
# A host name as kaeru compares it: ASCII letters, digits, hyphens and inner dots only, so
# nothing a browser would decode or map (percent-escapes, IDN look-alikes, a trailing dot).
_HOST_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?$|^\[[0-9a-f:.]+\]$")


def _origin_of(url: str | None) -> _Origin | None:
    """The origin of an absolute http(s) URL without userinfo, or None for anything else."""
    url = _web_url(url)
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a bad port or bracket
        return None
    scheme = parts.scheme.lower()
    netloc = parts.netloc.lower()
    host = netloc.rsplit(":", 1)[0] if port is not None else netloc
    if "@" in netloc or not _HOST_NAME.match(host):
        return None
    return scheme, host.strip("[]"), port if port is not None else _DEFAULT_PORTS[scheme]


@dataclass(frozen=True)
class _Hosts:
    """Where a message's links and images may point.

    Links and images: only the exact origins (scheme, host and port) of ``KAERU_SHOP_URL`` and
    ``KAERU_CART_URL``, so with the default ``https://`` URLs only https on the standard port;
    no subdomain (``www.shop.example`` may be someone else's), no other port, no userinfo, no
    host a browser would read differently. Kaeru's own click redirect must never take a
    shopper elsewhere (phishing), so other product links fall back to the cart's (or the
    shop's) page, and an image from elsewhere is dropped, the product shown by name. One
    exception, for ``kaeru dev`` and its demo: when ``KAERU_PUBLIC_URL`` is itself on loopback,
    kaeru runs on a developer's machine and images on loopback (``localhost``, ``127.0.0.1``,
    ``::1``, any port: the mail catcher serves the demo's pictures) are kept too. A real
    deployment has a public ``KAERU_PUBLIC_URL``, so there a loopback image is dropped like any
    other foreign one.
    """

    origins: frozenset[_Origin]
    loopback_images: bool
    #: ``KAERU_IMAGE_ORIGINS``: where else product images may come from (a shop's CDN).
    image_origins: frozenset[_Origin] = frozenset()

    @classmethod
    def of(cls, settings: Settings) -> _Hosts:
        origins = frozenset(o for o in map(_origin_of, (settings.shop_url, settings.cart_url)) if o)
        images = frozenset(o for o in map(_origin_of, settings.image_origin_list) if o)
        return cls(origins, _host_of(settings.public_url) in _LOOPBACK, images)

    def link(self, url: str | None) -> str | None:
        return url if _origin_of(url) in self.origins else None

    def image(self, url: str | None) -> str | None:
        origin = _origin_of(url)
        if (
            origin in self.origins
            or origin in self.image_origins
            or (self.loopback_images and origin is not None and origin[1] in _LOOPBACK)
        ):
            return url
        return None


def _encodable(text: str) -> str:
    """``text`` without lone surrogates (JSON can carry them), which no encoder accepts."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _clean(text: str, limit: int) -> str:
    """One line of at most ``limit`` characters: control characters and line breaks become
    spaces, runs of space one, and a longer text ends in an ellipsis. Safe in a header."""
    chars = (
        " " if unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs") else c
        for c in _encodable(str(text))
    )
    line = " ".join("".join(chars).split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def _money(amount_minor: int | None, currency: str) -> str | None:
    return format_minor(amount_minor, _clean(currency, 8)) if amount_minor is not None else None


def _product_context(product: ProductInfo, fallback_url: str, hosts: _Hosts) -> dict[str, Any]:
    return {
        "id": product.product_id,
        "name": _clean(product.name, MAX_TEXT) or product.product_id,
        "price": _money(product.price_minor, product.currency),
        "image": hosts.image(product.image_url),
        "url": hosts.link(product.url) or fallback_url,
    }


def _with_catalogue(s: Session, email: SendEmailInput) -> SendEmailInput:
    """``email`` with each cart product's name, link and image taken from the catalogue.

    The cart comes from the shopper's events, which a browser key (public) can send for any
    customer id; the catalogue is written by trusted sources only. So a known product shows
    what the shop said of it, and only an unknown one the event's (link-stripped) text. The
    cart's price stays the one the shopper saw, unless the event had none.
    """
    ids = {line.product.product_id for line in email.cart}
    if not ids:
        return email
    known = {
        p.product_id: p
        for p in s.exec(select(Product).where(col(Product.product_id).in_(sorted(ids))))
    }
    cart = []
    for line in email.cart:
        product, trusted = line.product, known.get(line.product.product_id)
        if trusted is not None:
            priced = product.price_minor is not None
            product = replace(
                product,
                name=trusted.name,
                url=trusted.url,
                image_url=trusted.image_url,
                price_minor=product.price_minor if priced else trusted.price_minor,
                currency=product.currency if priced else trusted.currency,
            )
        cart.append(replace(line, product=product))
    return replace(email, cart=cart)


def _cart_context(email: SendEmailInput, cart_url: str, hosts: _Hosts) -> list[dict[str, Any]]:
    lines = []
    for line in email.cart:
        product = line.product
        total = None if product.price_minor is None else product.price_minor * line.quantity
        lines.append(
            {
                **_product_context(product, cart_url, hosts),
                "quantity": line.quantity,
                "total": _money(total, product.currency),
            }
        )
    return lines


def _cart_total(email: SendEmailInput) -> str | None:
    """The cart's total, if every line has a price in one currency."""
    currencies = {line.product.currency for line in email.cart}
    prices = [line.product.price_minor for line in email.cart]
    if not email.cart or len(currencies) != 1 or any(p is None for p in prices):
        return None
    total = sum(p * line.quantity for p, line in zip(prices, email.cart, strict=True) if p)
    return _money(total, currencies.pop())


def _coupon_context(coupon: CouponInfo) -> dict[str, Any]:
    return {
        "code": coupon.code,
        "value": format_minor(coupon.amount_minor, coupon.currency),
        "expires": f"{coupon.expires_at:%d %B %Y}",
    }


def _with_pixel(html: str, pixel_url: str) -> str:
    """Append the open-tracking pixel at the end of the body, whatever the template did."""
    tag = (
        f'<img src="{escape(pixel_url)}" width="1" height="1" alt="" '
        'style="display:block;border:0;width:1px;height:1px;">'
    )
    at = html.lower().rfind("</body>")
    return html + tag if at < 0 else html[:at] + tag + html[at:]


async def _despite_cancel(work: Awaitable[T], key: str) -> T:
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
                "email %s was cancelled after it claimed DATA: finishing the send first", key
            )
            current = asyncio.current_task()
            for _ in range(swallowed):
                if current is not None:
                    current.uncancel()


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
