"""Email: render a journey's message from Jinja2 templates and send it over SMTP, at most once.

The outbox row (:class:`kaeru.models.EmailMessage`, keyed by the step's idempotency key) is
what makes a retried send safe. Its ``status`` moves:

- ``pending``: rendered and stored, the SMTP server not reached yet;
- ``sending``: connected and logged in, the envelope (MAIL, RCPT) under way;
- ``data``: committed right before the DATA command, so the server may hold the message;
- ``sent``: the server answered 250 to the message; ``bounced``: it refused it for good.

A retry resends from ``pending`` or ``sending`` (the server holds nothing), returns
``already_sent`` from ``sent``, and never resends from ``data``: a worker that died, or a
connection that broke, between DATA and the server's final answer leaves the message's fate
unknown, and SMTP offers no way to ask. That window is the only ambiguous one in the protocol,
so inside it kaeru is at most once and reports the send as ``unconfirmed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage as MimeMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import Any, NoReturn

import aiosmtplib
import jinja2
from aiosmtplib.email import quote_address
from markupsafe import escape
from sqlalchemy import func, update
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.types import (
    NO_EMAIL_ADDRESS,
    UNDELIVERABLE,
    CouponInfo,
    ProductInfo,
    SendEmailInput,
    SendEmailResult,
)
from kaeru.db import session
from kaeru.journal import email_of, record_touchpoint
from kaeru.models import EmailMessage, Suppression, utcnow
from kaeru.money import format_minor
from kaeru.settings import Settings
from kaeru.tracking import click_url, open_url, signing_key

TEMPLATES = Path(__file__).parent / "templates"

PENDING = "pending"
SENDING = "sending"
DATA = "data"
SENT = "sent"
BOUNCED = "bounced"

#: ApplicationError types of retryable failures, so operators can tell them apart in the UI.
SMTP_DEFERRED = "SmtpDeferred"  # a 4xx answer: the server asks us to come back later
SMTP_UNREACHABLE = "SmtpUnreachable"  # no connection, a timeout, a dropped line
SMTP_MISCONFIGURED = "SmtpMisconfigured"  # our settings are wrong; a retry after a fix works
TEMPLATE_FAILED = "TemplateFailed"
SMTP_SUPERSEDED = "SmtpSuperseded"  # a newer attempt of the same send took over

_FAMILY = re.compile(r"^[a-z0-9_]+$")
# RFC 3463 enhanced status codes: "5.1.1" (bad mailbox) or "5.7.1" (policy) after the code.
_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")


def normalise_address(address: str) -> str:
    """The form of an address that suppressions are keyed and looked up by."""
    return address.strip().lower()


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
            ``sent``; ``already_sent`` when an earlier attempt sent it; ``unconfirmed`` when an
            earlier attempt died inside the DATA window (see the module docstring).

        Raises:
            ApplicationError: ``NoEmailAddress`` or ``Undeliverable`` (suppressed address, hard
                bounce), both non-retryable; retryable ones for 4xx answers, connection
                trouble and settings to fix.
        """
        async with _heartbeating():
            outgoing = await asyncio.to_thread(self._prepare, email)
            if outgoing.payload is None:
                return SendEmailResult(outgoing.message_id, outgoing.to_address, outgoing.status)
            status = await self._deliver(email, outgoing)
            if status == SENT:
                await asyncio.to_thread(self._mark_sent, email, outgoing)
        return SendEmailResult(outgoing.message_id, outgoing.to_address, status)

    # ---- before SMTP: the outbox row and the rendered message ------------------------------

    def _prepare(self, email: SendEmailInput) -> _Outgoing:
        with session(self.settings.resolved_database_url) as s:
            link_key = signing_key(s, self.settings.secret_key)  # may commit: call it first
            row = s.get(EmailMessage, email.key)
            if row is not None and row.status == SENT:
                return _Outgoing(row.message_id, row.to_address, status="already_sent")
            if row is not None and row.status == DATA:
                activity.logger.warning(
                    "email %s may have been delivered already: an earlier attempt died after "
                    "DATA, before the SMTP server answered. Not resending it (at most once); "
                    "the server's log for Message-ID %s says whether it went out.",
                    email.key,
                    row.message_id,
                )
                return _Outgoing(row.message_id, row.to_address, status="unconfirmed")
            if row is not None and row.status == BOUNCED:
                raise _undeliverable(f"{row.to_address} bounced earlier: {row.error}")

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
                    f"{address} is on the suppression list (reason: {suppressed.reason}), so "
                    f"the {email.step} email is not sent; delete its row from the suppressions "
                    "table only if the shopper asked for email again or the address works again"
                )
            try:
                if not address.isascii():
                    raise ValueError("non-ASCII addresses need SMTPUTF8, which kaeru lacks")
                quote_address(address)
            except ValueError as exc:
                raise _undeliverable(
                    f"customer {email.customer_id!r} has an unusable email address "
                    f"{address!r} ({exc}); send an identify call with a correct traits.email"
                ) from exc

            # The first attempt's id, even if KAERU_MAIL_FROM changed since: one message, one id.
            mail_from = self.settings.mail_from
            message_id = row.message_id if row else message_id_for(email.key, mail_from)
            rendered = self._render(email, link_key)
            if row is None:
                row = EmailMessage(
                    key=email.key,
                    message_id=message_id,
                    customer_id=email.customer_id,
                    journey_id=email.journey_id,
                    step=email.step,
                    to_address=address,
                    subject=rendered.subject,
                    status=PENDING,
                )
            row.to_address, row.subject, row.links = address, rendered.subject, rendered.links
            row.attempts += 1
            s.add(row)
            payload = self._compose(email, address, message_id, rendered)
        return _Outgoing(message_id, address, payload, attempt=row.attempts)

    def _render(self, email: SendEmailInput, link_key: bytes) -> _Rendered:
        s = self.settings
        family = email.template
        links: list[str] = []

        def track(url: str) -> str:
            """The click-tracking link to ``url``, registering it in the message's links."""
            if _web_url(url) is None:
                raise ValueError(f"only http(s) links can be tracked, not {url!r}")
            if url not in links:
                links.append(url)
            return click_url(s.public_url, link_key, email.key, links.index(url))

        cart_url = _web_url(email.cart_url) or s.cart_url
        context: dict[str, Any] = {
            "track": track,
            "shop": {"name": s.shop_name, "url": s.shop_url},
            "cart_url": cart_url,
            "cart": _cart_context(email, cart_url),
            "cart_total": _cart_total(email),
            "related": [_product_context(p, s.shop_url) for p in email.recommendations],
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
                f"cannot render the {family} email: {exc}. Fix activities/templates/"
                f"{family}.{{subject,html,txt}}.j2 and deploy; the send is retried meanwhile",
                type=TEMPLATE_FAILED,
            ) from exc
        pixel = open_url(s.public_url, link_key, email.key)
        return _Rendered(" ".join(subject.split()), text, _with_pixel(html, pixel), links)

    def _compose(
        self, email: SendEmailInput, address: str, message_id: str, rendered: _Rendered
    ) -> bytes:
        message = MimeMessage()
        message["From"] = self.settings.mail_from
        message["To"] = address
        message["Subject"] = rendered.subject
        message["Date"] = format_datetime(utcnow())
        message["Message-ID"] = message_id
        message["X-Kaeru-Journey"] = email.journey_id
        message["X-Kaeru-Step"] = email.step
        message.set_content(rendered.text)
        message.add_alternative(rendered.html, subtype="html")
        return message.as_bytes(policy=SMTP_POLICY)

    # ---- the SMTP conversation -------------------------------------------------------------

    async def _deliver(self, email: SendEmailInput, out: _Outgoing) -> str:
        """Run the SMTP conversation step by step, to commit ``data`` right before DATA.

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
        assert out.payload is not None
        smtp = aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            timeout=s.smtp_timeout,
            use_tls=s.smtp_tls,
            start_tls=False,  # STARTTLS only when configured: never a silent downgrade/upgrade
        )
        phase = "connect"
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
                await smtp.login(s.smtp_username, s.smtp_password or "")
            await asyncio.to_thread(self._set_status, email.key, SENDING)
            phase = "mail"
            await smtp.mail(sender)
            phase = "rcpt"
            await smtp.rcpt(out.to_address)
            await asyncio.to_thread(self._claim_data, email.key, out.attempt)
            phase = "data"
            await smtp.data(out.payload)
        except aiosmtplib.SMTPResponseException as exc:
            await self._refused(email, out, phase, exc.code, exc.message)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            if phase == "data":
                activity.logger.warning(
                    "the connection to %s:%s broke after DATA for email %s (%s): the server "
                    "may have the message, so it is not resent; its log for Message-ID %s "
                    "says whether it went out",
                    s.smtp_host,
                    s.smtp_port,
                    email.key,
                    exc,
                    out.message_id,
                )
                return "unconfirmed"
            raise ApplicationError(
                f"cannot talk to the SMTP server at {s.smtp_host}:{s.smtp_port} during "
                f"{phase.upper()}: {exc or type(exc).__name__}. Check that it runs and that "
                "KAERU_SMTP_HOST, KAERU_SMTP_PORT, KAERU_SMTP_TLS and KAERU_SMTP_STARTTLS "
                "match it; the send is retried with backoff",
                type=SMTP_UNREACHABLE,
            ) from exc
        except aiosmtplib.SMTPException as exc:
            # No reply code: the server lacks what our settings require (AUTH, STARTTLS).
            raise ApplicationError(
                f"the SMTP server at {s.smtp_host}:{s.smtp_port} cannot do what kaeru's "
                f"settings ask at {phase.upper()}: {exc}. Check KAERU_SMTP_STARTTLS, "
                "KAERU_SMTP_TLS, KAERU_SMTP_USERNAME and KAERU_SMTP_PASSWORD against the "
                "relay; the send is retried with backoff",
                type=SMTP_MISCONFIGURED,
            ) from exc
        else:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await smtp.quit()  # the message is accepted; a failed goodbye changes nothing
            return SENT
        finally:
            smtp.close()

    async def _refused(
        self, email: SendEmailInput, out: _Outgoing, phase: str, code: int, text: str
    ) -> NoReturn:
        """Turn an SMTP refusal into the right error (and, if permanent, a bounce record)."""
        s = self.settings
        kind = _Refusal.classify(phase, code, text)
        answer = f"{code} {text}".strip()
        where = f"the SMTP server at {s.smtp_host}:{s.smtp_port}"
        if kind == _Refusal.TEMPORARY:
            if phase == "data":
                # The server refused the message outright, so it holds nothing: resend.
                await asyncio.to_thread(self._set_status, email.key, SENDING, answer)
            raise ApplicationError(
                f"{where} deferred the {email.step} email to {out.to_address} at "
                f"{phase.upper()} with {answer}; the send is retried with backoff",
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
                f"{where} refused kaeru at {phase.upper()} with {answer}: {fix}. The send is "
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
            f"{where} refused the {email.step} email to {out.to_address} at {phase.upper()} "
            f"with {answer}. {consequence}"
        )

    # ---- outbox bookkeeping ----------------------------------------------------------------

    def _claim_data(self, key: str, attempt: int) -> None:
        """Commit ``data`` for this attempt, unless a newer attempt has started meanwhile.

        A worker cut off from Temporal (not from SMTP) keeps sending while Temporal starts a
        new attempt elsewhere; the attempt counter lets only the newest one enter DATA.
        """
        with session(self.settings.resolved_database_url) as s:
            claimed = s.exec(
                update(EmailMessage)
                .where(
                    col(EmailMessage.key) == key,
                    col(EmailMessage.attempts) == attempt,
                    col(EmailMessage.status).in_((PENDING, SENDING)),
                )
                .values(status=DATA, error=None)
            )
            if claimed.rowcount != 1:
                raise ApplicationError(
                    f"attempt {attempt} of email {key} was overtaken by a newer attempt before "
                    "DATA, so it stops here and leaves the sending to that one",
                    type=SMTP_SUPERSEDED,
                )

    def _set_status(self, key: str, status: str, error: str | None = None) -> None:
        with session(self.settings.resolved_database_url) as s:
            row = s.get(EmailMessage, key)
            if row is None:
                raise RuntimeError(f"email outbox row {key!r} vanished during the send")
            row.status, row.error = status, error
            s.add(row)

    def _mark_sent(self, email: SendEmailInput, out: _Outgoing) -> None:
        with session(self.settings.resolved_database_url) as s:
            row = s.get(EmailMessage, email.key)
            assert row is not None
            row.status, row.sent_at, row.error = SENT, utcnow(), None
            s.add(row)
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
            row = s.get(EmailMessage, email.key)
            assert row is not None
            row.status, row.error = BOUNCED, f"{phase.upper()}: {answer}"
            s.add(row)
            if suppress and suppression_of(s, out.to_address) is None:
                s.add(
                    Suppression(
                        email=normalise_address(out.to_address),
                        reason="bounce",
                        detail=answer,
                    )
                )
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
    return ApplicationError(message, type=UNDELIVERABLE, non_retryable=True)


def _web_url(url: str | None) -> str | None:
    """``url`` if it is an http(s) URL; product data comes from events, so never trust it."""
    if url and re.match(r"^https?://[^\s\"'<>]+$", url, re.IGNORECASE):
        return url
    return None


def _money(amount_minor: int | None, currency: str) -> str | None:
    return format_minor(amount_minor, currency) if amount_minor is not None else None


def _product_context(product: ProductInfo, fallback_url: str) -> dict[str, Any]:
    return {
        "id": product.product_id,
        "name": product.name,
        "price": _money(product.price_minor, product.currency),
        "image": _web_url(product.image_url),
        "url": _web_url(product.url) or fallback_url,
    }


def _cart_context(email: SendEmailInput, cart_url: str) -> list[dict[str, Any]]:
    lines = []
    for line in email.cart:
        product = line.product
        total = None if product.price_minor is None else product.price_minor * line.quantity
        lines.append(
            {
                **_product_context(product, cart_url),
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
    return format_minor(total, currencies.pop())


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
