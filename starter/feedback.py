"""Complaints and bounces: spam complaints (ARF feedback-loop reports, a provider's webhook)
and hard bounces reported after the SMTP conversation, so kaeru never mails those addresses
again.

``POST /v1/feedback/arf`` takes an ARF report (RFC 5965): ``multipart/report;
report-type=feedback-report`` whose ``message/feedback-report`` part says ``Feedback-Type:
abuse`` and whose third part is the original message (``message/rfc822``) or its headers
(``text/rfc822-headers``). The body is the report itself (the HTTP ``Content-Type`` then gives
its boundary) or the whole email that carried it. Mailbox providers send these reports to an
address of the shop's mail system, which forwards them here: it authenticates as every server
of the shop does, with the server write key as the HTTP Basic user name.

``POST /v1/feedback/webhook`` takes Amazon SES notifications (``notificationType`` ``Bounce``
or ``Complaint``), as SNS delivers them to an HTTPS subscription (the SNS envelope, its
``Message`` the notification) or raw: subscribe it as
``https://<KAERU_WRITE_KEY>:@<host>/v1/feedback/webhook``. A ``Permanent`` bounce suppresses
the bounced addresses (``hard_bounce``); other bounces are ignored (the next send will tell).
A ``Delivery`` notification is the message's ``email_delivered`` touchpoint (once per message,
however often SNS delivers it); it changes nothing else.

A complaint suppresses the address (``complaint``) and unsubscribes the customer (consent
source ``complaint``), which ends their running marketing journeys. The kaeru message is found
by its ``Message-ID`` (``email_messages.message_id``) or its ``X-Kaeru-Journey`` /
``X-Kaeru-Step`` headers. Every report is kept by its id (``feedback_reports``), so the same
report twice (a provider retrying) has one effect.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage as Mime
from email.message import Message
from email.parser import BytesParser, HeaderParser
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from activities.email.addresses import normalise_address
from activities.email.gate import suppression_of
from kaeru.db import write_session
from kaeru.models import Customer, EmailMessage, FeedbackReport, Suppression, Touchpoint, utcnow
from kaeru.settings import Settings
from kaeru.touchpoints import EMAIL, record_touchpoint
from starter.consent_api import ServerKey
from starter.consent_changes import change_consent
from starter.deps import ApiError, SettingsDep, router_of
from starter.events import ErrorBody
from starter.outbox import insert_statement, table_of

COMPLAINT = "complaint"
HARD_BOUNCE = "hard_bounce"
#: A provider delivered the message (``Feedback.kind``): a touchpoint, nothing to suppress.
DELIVERED = "delivered"
#: Largest report accepted: providers send the original message, attachments cut.
MAX_REPORT_BYTES = 1_000_000

router = APIRouter(
    prefix="/v1/feedback",
    tags=["feedback"],
    dependencies=[ServerKey],
    responses={
        400: {"model": ErrorBody, "description": "not a report kaeru can read"},
        401: {"model": ErrorBody, "description": "missing or wrong write key"},
        403: {"model": ErrorBody, "description": "the browser write key may not do this"},
        413: {"model": ErrorBody, "description": "over 1 MB"},
    },
)

#: The bodies, for /openapi.json (the endpoints read them by hand).
_ARF_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/report": {"schema": {"type": "string", "format": "binary"}},
            "message/rfc822": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_SES_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "text/plain": {
                "schema": {
                    "type": "object",
                    "description": "an SNS notification whose Message is an SES one",
                }
            },
            "application/json": {"schema": {"type": "object"}},
        },
    }
}


class FeedbackError(Exception):
    """A report kaeru cannot read (HTTP 400); the message says what is wrong."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Feedback:
    """One report, read: what it says about which message and addresses."""

    report_id: str
    kind: str
    #: ``arf`` or ``ses`` (``suppressions.source``).
    source: str
    message_id: str | None = None
    journey_id: str | None = None
    step: str | None = None
    #: The addresses the report names (a webhook's recipients); the message's own is added.
    addresses: tuple[str, ...] = ()
    #: When the provider says it happened (a delivery's ``timestamp``).
    at: datetime | None = None


class FeedbackResult(BaseModel):
    """What kaeru did with a report."""

    kind: str | None = Field(
        description="complaint, hard_bounce, delivered (recorded as the message's "
        "email_delivered touchpoint), or null: nothing to act on"
    )
    repeated: bool = Field(False, description="a report seen before: nothing done again")
    matched: bool = Field(False, description="the kaeru message it is about was found")
    suppressed: int = Field(0, description="addresses put on the suppression list")
    unsubscribed: int = Field(0, description="customers unsubscribed from email marketing")
    note: str | None = None


# ---- reading ARF ------------------------------------------------------------------------------


def _headers_of(part: Message) -> Message | None:
    """The headers a ``message/*`` or ``text/rfc822-headers`` part carries."""
    payload = part.get_payload()
    if isinstance(payload, list):
        first = payload[0] if payload else None
        return first if isinstance(first, Message) else None
    if isinstance(payload, str):
        return HeaderParser(policy=policy.default).parsestr(payload)
    return None


def _one_line(value: object) -> str | None:
    text = " ".join(str(value).split()) if value is not None else ""
    return text[:400] or None


def read_arf(body: bytes, content_type: str | None) -> Feedback:
    """Read an ARF report: the ``multipart/report`` itself (``content_type`` its HTTP header)
    or the email that carries it.

    Raises:
        FeedbackError: not an ARF report, or one that names no message.
    """
    raw = body
    if content_type and content_type.strip().lower().startswith("multipart/report"):
        raw = b"MIME-Version: 1.0\r\nContent-Type: " + content_type.encode() + b"\r\n\r\n" + body
    report = BytesParser(policy=policy.default).parsebytes(raw)
    if isinstance(report, Mime) and report.get_content_type() == "message/rfc822":
        inner = _headers_of(report)
        report = inner if isinstance(inner, Mime) else report
    if (
        report.get_content_type() != "multipart/report"
        or str(report.get_param("report-type", "")).lower() != "feedback-report"
    ):
        raise FeedbackError(
            "not_arf",
            "the body is not an ARF report: send the multipart/report; report-type="
            "feedback-report (RFC 5965) with its Content-Type, or the whole email carrying it",
        )
    parts = list(report.iter_parts()) if isinstance(report, Mime) else []
    feedback = next((p for p in parts if p.get_content_type() == "message/feedback-report"), None)
    fields = _headers_of(feedback) if feedback is not None else None
    if fields is None:
        raise FeedbackError(
            "not_arf", "the report has no message/feedback-report part (RFC 5965, section 3)"
        )
    feedback_type = str(fields.get("Feedback-Type", "")).strip().lower()
    original = next(
        (
            _headers_of(p)
            for p in parts
            if p.get_content_type() in ("message/rfc822", "text/rfc822-headers")
        ),
        None,
    )
    if original is None:
        raise FeedbackError(
            "no_original",
            "the report does not include the original message or its headers (its third "
            "part, message/rfc822 or text/rfc822-headers): kaeru cannot tell which message "
            "it is about",
        )
    digest = hashlib.sha256(raw).hexdigest()
    return Feedback(
        report_id=f"arf:{digest}",
        kind=COMPLAINT if feedback_type == "abuse" else f"arf-{feedback_type or 'unknown'}",
        source="arf",
        message_id=_one_line(original.get("Message-ID")),
        journey_id=_one_line(original.get("X-Kaeru-Journey")),
        step=_one_line(original.get("X-Kaeru-Step")),
    )


# ---- reading Amazon SES notifications ---------------------------------------------------------


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _recipients(items: Any) -> tuple[str, ...]:
    found = []
    for item in items if isinstance(items, list) else []:
        address = _object(item).get("emailAddress")
        if isinstance(address, str) and "@" in address:
            found.append(address.strip()[:320])
    return tuple(found)


def read_ses(data: Any) -> Feedback | None:
    """Read an Amazon SES notification, in its SNS envelope or raw; None: nothing to act on
    (a transient bounce, an SNS subscription confirmation, a notification of another kind).

    Raises:
        FeedbackError: not an SES notification.
    """
    envelope = _object(data)
    if envelope.get("Type") == "SubscriptionConfirmation":
        return None
    if isinstance(envelope.get("Message"), str):  # the SNS envelope
        try:
            envelope = _object(json.loads(envelope["Message"]))
        except ValueError as exc:
            raise FeedbackError(
                "not_ses", "the SNS Message is not JSON: send SES notifications"
            ) from exc
    kind = envelope.get("notificationType") or envelope.get("eventType")
    if kind not in ("Bounce", "Complaint", "Delivery", "Send", "Reject", "Open", "Click"):
        raise FeedbackError(
            "not_ses",
            "the body is not an Amazon SES notification (notificationType Bounce or "
            "Complaint, as SNS delivers it): kaeru's feedback webhook speaks SES",
        )
    mail = _object(envelope.get("mail"))
    headers = {
        str(h.get("name", "")).lower(): h.get("value")
        for h in mail.get("headers", [])
        if isinstance(h, dict)
    }
    common = _object(mail.get("commonHeaders"))
    message_id = _one_line(common.get("messageId") or headers.get("message-id"))
    if kind == "Delivery":
        return _delivery(envelope, mail, headers, message_id)
    detail = _object(envelope.get("bounce" if kind == "Bounce" else "complaint"))
    if kind == "Bounce" and detail.get("bounceType") == "Permanent":
        feedback_kind, addresses = HARD_BOUNCE, _recipients(detail.get("bouncedRecipients"))
    elif kind == "Complaint":
        feedback_kind, addresses = COMPLAINT, _recipients(detail.get("complainedRecipients"))
    else:
        return None
    # SES's feedbackId names the report: SNS delivering it again has the same one.
    feedback_id = detail.get("feedbackId") or mail.get("messageId") or ""
    if not isinstance(feedback_id, str) or not feedback_id:
        raise FeedbackError("not_ses", f"the {kind} notification has no feedbackId")
    return Feedback(
        report_id=f"ses:{feedback_kind}:{feedback_id[:150]}",
        kind=feedback_kind,
        source="ses",
        message_id=message_id,
        journey_id=_one_line(headers.get("x-kaeru-journey")),
        step=_one_line(headers.get("x-kaeru-step")),
        addresses=addresses,
    )


def _delivery(
    envelope: dict[str, Any], mail: dict[str, Any], headers: dict[str, Any], message_id: str | None
) -> Feedback:
    """A ``Delivery`` notification, named by SES's own message id (SNS redelivers it alike)."""
    ses_id = mail.get("messageId")
    if not isinstance(ses_id, str) or not ses_id:
        raise FeedbackError("not_ses", "the Delivery notification has no mail.messageId")
    return Feedback(
        report_id=f"ses:{DELIVERED}:{ses_id[:150]}",
        kind=DELIVERED,
        source="ses",
        message_id=message_id,
        journey_id=_one_line(headers.get("x-kaeru-journey")),
        step=_one_line(headers.get("x-kaeru-step")),
        at=_timestamp(_object(envelope.get("delivery")).get("timestamp")),
    )


def _timestamp(value: Any) -> datetime | None:
    """An SES timestamp (``2026-12-01T10:00:01.184Z``); None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


# ---- acting on a report -----------------------------------------------------------------------


def _bare(message_id: str) -> str:
    return message_id.strip().strip("<>")


def find_message(s: Session, feedback: Feedback) -> EmailMessage | None:
    """The kaeru message a report is about: by ``Message-ID``, else by journey and step."""
    if feedback.message_id:
        bare = _bare(feedback.message_id)
        found = s.exec(
            select(EmailMessage).where(col(EmailMessage.message_id).in_([bare, f"<{bare}>"]))
        ).first()
        if found is not None:
            return found
    if feedback.journey_id:
        query = select(EmailMessage).where(EmailMessage.journey_id == feedback.journey_id)
        if feedback.step:
            query = query.where(EmailMessage.step == feedback.step)
        return s.exec(
            query.where(col(EmailMessage.to_address) != "").order_by(
                col(EmailMessage.created_at).desc()
            )
        ).first()
    return None


def _customers_of(s: Session, addresses: Iterable[str]) -> set[str]:
    wanted = sorted({normalise_address(a) for a in addresses})
    if not wanted:
        return set()
    rows = s.exec(select(Customer.customer_id).where(func.lower(Customer.email).in_(wanted)))
    return set(rows)


def suppress(s: Session, address: str, reason: str, source: str, detail: str | None) -> bool:
    """Put ``address`` on the suppression list (True), unless it already is (False)."""
    if suppression_of(s, address) is not None:
        return False
    s.add(
        Suppression(
            email=normalise_address(address),
            reason=reason,
            detail=detail[:500] if detail else None,
            source=source,
        )
    )
    s.flush()
    return True


def apply_feedback(settings: Settings, feedback: Feedback) -> FeedbackResult:
    """Suppress the report's addresses and, for a complaint, unsubscribe its customers; once
    per report id. Blocking: call from a thread (and wake the router after an unsubscribe)."""
    with write_session(settings.resolved_database_url) as s:
        message = find_message(s, feedback)
        addresses = set(feedback.addresses)
        if message is not None and message.to_address:
            addresses.add(message.to_address)
        if not addresses:
            return FeedbackResult(
                kind=feedback.kind,
                note="no kaeru message matches the report's Message-ID or X-Kaeru-Journey, and "
                "it names no address: nothing to suppress",
            )
        kept = s.execute(
            insert_statement(s, table_of(FeedbackReport))
            .values(
                report_id=feedback.report_id,
                kind=feedback.kind,
                message_id=message.message_id if message else None,
                customer_id=message.customer_id if message else None,
                received_at=utcnow(),
            )
            .on_conflict_do_nothing(index_elements=["report_id"])
            .returning(table_of(FeedbackReport).c.report_id)
        ).first()
        if kept is None:  # the same report came before (or concurrently, and won)
            return FeedbackResult(kind=feedback.kind, repeated=True, matched=message is not None)
        about = f"message {message.message_id}" if message else "a message kaeru did not find"
        detail = f"{feedback.source} {feedback.kind} report about {about}"
        suppressed = sum(
            suppress(s, address, feedback.kind, feedback.source, detail)
            for address in sorted(addresses)
        )
        unsubscribed = 0
        if feedback.kind == COMPLAINT:
            customers = {message.customer_id} if message else _customers_of(s, addresses)
            for customer_id in sorted(customers):
                change = change_consent(s, customer_id, "email", False, "complaint", detail=detail)
                unsubscribed += change is not None
        return FeedbackResult(
            kind=feedback.kind,
            matched=message is not None,
            suppressed=suppressed,
            unsubscribed=unsubscribed,
            note=None
            if message
            else f"no kaeru message matched; suppressed {len(addresses)} "
            "address(es) the report names",
        )


def apply_delivery(settings: Settings, feedback: Feedback) -> FeedbackResult:
    """Record the delivered message's ``email_delivered`` touchpoint, once per message (its
    key is the message's). Blocking: call from a thread."""
    try:
        return _record_delivery(settings, feedback)
    except IntegrityError:  # the same delivery, recorded concurrently (SNS sent it twice)
        return FeedbackResult(kind=DELIVERED, repeated=True, matched=True)


def _record_delivery(settings: Settings, feedback: Feedback) -> FeedbackResult:
    with write_session(settings.resolved_database_url) as s:
        message = find_message(s, feedback)
        if message is None:
            return FeedbackResult(
                kind=DELIVERED,
                note="no kaeru message matches the delivery's Message-ID or X-Kaeru-Journey: "
                "nothing recorded",
            )
        key = f"{message.key}/email_delivered"
        known = s.exec(select(Touchpoint.id).where(Touchpoint.key == key)).first()
        if known is None:
            record_touchpoint(
                s,
                customer_id=message.customer_id,
                kind="email_delivered",
                key=key,
                journey_id=message.journey_id,
                step=message.step,
                channel=EMAIL,
                occurred_at=feedback.at or utcnow(),
                detail={"message_key": message.key, "provider": feedback.source},
            )
        return FeedbackResult(kind=DELIVERED, repeated=known is not None, matched=True)


# ---- the endpoints ------------------------------------------------------------------------------


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (413 past it, never buffering more)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(
                413,
                "payload_too_large",
                f"the report is over {limit} bytes: cut attachments from the original message "
                "(its headers are enough)",
            )
    return bytes(body)


async def _act(request: Request, settings: Settings, feedback: Feedback) -> FeedbackResult:
    result = await asyncio.to_thread(apply_feedback, settings, feedback)
    if result.unsubscribed:
        router_of(request).wake()
    return result


@router.post(
    "/arf",
    response_model=FeedbackResult,
    openapi_extra=_ARF_BODY,
    responses={404: {"model": ErrorBody, "description": "no message kaeru sent matches"}},
)
async def arf_report(request: Request, settings: SettingsDep) -> FeedbackResult:
    """An ARF feedback-loop report (RFC 5965): an ``abuse`` report suppresses the address and
    unsubscribes the customer; other feedback types are acknowledged and ignored."""
    body = await read_limited(request, MAX_REPORT_BYTES)
    try:
        feedback = read_arf(body, request.headers.get("content-type"))
    except FeedbackError as exc:
        raise ApiError(400, exc.code, exc.message) from exc
    if feedback.kind != COMPLAINT:
        return FeedbackResult(
            kind=None, note=f"feedback type {feedback.kind[4:]!r} is not a complaint: ignored"
        )
    if not feedback.message_id and not feedback.journey_id:
        raise ApiError(
            400,
            "no_message_id",
            "the original message in the report has neither Message-ID nor X-Kaeru-Journey: "
            "kaeru cannot tell which message it is about",
        )
    result = await _act(request, settings, feedback)
    if not result.matched and not result.repeated:
        raise ApiError(
            404,
            "message_not_found",
            f"no message kaeru sent has Message-ID {feedback.message_id!r} (nor the journey "
            "header): the report is about mail kaeru did not send, so nothing was changed",
        )
    return result


@router.post("/webhook", response_model=FeedbackResult, openapi_extra=_SES_BODY)
async def provider_webhook(request: Request, settings: SettingsDep) -> FeedbackResult:
    """Amazon SES bounce, complaint and delivery notifications (through SNS, or raw)."""
    body = await read_limited(request, MAX_REPORT_BYTES)
    try:
        data = json.loads(body)
        feedback = read_ses(data)
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"the body is not JSON: {exc}") from exc
    except FeedbackError as exc:
        raise ApiError(400, exc.code, exc.message) from exc
    if feedback is None:
        if _object(data).get("Type") == "SubscriptionConfirmation":
            return FeedbackResult(
                kind=None,
                note="an SNS subscription confirmation: kaeru fetches no URL it is sent; "
                "open the SubscribeURL of this message (SNS console or its log) to confirm",
            )
        return FeedbackResult(
            kind=None, note="neither a complaint, a permanent bounce nor a delivery"
        )
    if feedback.kind == DELIVERED:
        return await asyncio.to_thread(apply_delivery, settings, feedback)
    result = await _act(request, settings, feedback)
    return result
