"""Complaints and bounces in: ARF reports built as a mailbox provider builds them, Amazon SES
notifications as SNS delivers them, and the suppressions CLI; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import uuid
from email.message import EmailMessage as Mail
from email.mime.base import MIMEBase
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

import httpx
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect
from sqlmodel import select
from typer.testing import CliRunner

from kaeru.cli import app as cli
from kaeru.consent import CONSENT_WITHDRAWN, set_consent, state_of
from kaeru.db import MIGRATIONS, get_engine, migrate, session
from kaeru.models import Customer, EmailMessage, Suppression
from kaeru.settings import Settings
from tests.starter.conftest import AUTH, BROWSER_AUTH, events

ADDRESS = "ann@example.com"
MESSAGE_ID = "<0123456789abcdef@shop.example>"
JOURNEY = "cart-abandonment-u1"


@pytest.fixture(autouse=True)
def sent(settings: Settings) -> None:
    """Customer u1, subscribed, who got kaeru's cart email."""
    with session(settings.resolved_database_url) as s:
        s.add(Customer(customer_id="u1", email=ADDRESS))
        set_consent(s, "u1", "email", True, "identify")
        s.add(
            EmailMessage(
                key=f"{JOURNEY}/run/cart_email",
                message_id=MESSAGE_ID,
                customer_id="u1",
                journey_id=JOURNEY,
                step="cart_email",
                to_address=ADDRESS,
                subject="Your cart",
                status="sent",
            )
        )


def original(message_id: str | None = MESSAGE_ID) -> Mail:
    mail = Mail()
    mail["From"] = "Shop <shop@shop.example>"
    mail["To"] = ADDRESS
    mail["Subject"] = "Your cart"
    if message_id:
        mail["Message-ID"] = message_id
    mail["X-Kaeru-Journey"] = JOURNEY
    mail["X-Kaeru-Step"] = "cart_email"
    mail.set_content("Your cart misses you")
    return mail


def arf(
    feedback_type: str = "abuse", *, headers_only: bool = False, message_id: str | None = MESSAGE_ID
) -> MIMEMultipart:
    """An ARF report (RFC 5965) as a mailbox provider's feedback loop sends it."""
    report = MIMEMultipart("report", report_type="feedback-report")
    report.attach(MIMEText("This is an email abuse report for an email message received."))
    fields = MIMEBase("message", "feedback-report")
    fields.set_payload(
        f"Feedback-Type: {feedback_type}\r\nUser-Agent: SomeMailbox/1.0\r\nVersion: 1\r\n"
        f"Original-Rcpt-To: <{ADDRESS}>\r\nArrival-Date: Thu, 8 Mar 2026 14:00:00 EDT\r\n"
    )
    report.attach(fields)
    if headers_only:
        headers = "".join(f"{k}: {v}\r\n" for k, v in original(message_id).items())
        report.attach(MIMEText(headers, "rfc822-headers"))
    else:
        report.attach(MIMEMessage(original(message_id)))
    return report


def carried(report: MIMEMultipart) -> bytes:
    """The whole email carrying ``report``, as the shop's mail system receives it."""
    report["From"] = "feedback@mailbox.example"
    report["To"] = "abuse@shop.example"
    report["Subject"] = "Abuse report"
    report["Message-ID"] = f"<{uuid.uuid4()}@mailbox.example>"
    return report.as_bytes()


async def post_arf(
    api: httpx.AsyncClient, body: bytes, content_type: str = "message/rfc822", **kw: Any
) -> httpx.Response:
    kw.setdefault("auth", AUTH)
    return await api.post(
        "/v1/feedback/arf", content=body, headers={"Content-Type": content_type}, **kw
    )


def suppressions(settings: Settings) -> list[tuple[str, str, str | None]]:
    with session(settings.resolved_database_url) as s:
        return [(r.email, r.reason, r.source) for r in s.exec(select(Suppression)).all()]


def consent(settings: Settings, customer_id: str = "u1") -> str:
    with session(settings.resolved_database_url) as s:
        return state_of(s, customer_id)


# ---- ARF -----------------------------------------------------------------------------------------


async def test_an_arf_complaint_suppresses_and_unsubscribes_once(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    body = carried(arf())
    answer = await post_arf(api, body)
    assert answer.status_code == 200, answer.text
    assert answer.json() | {"note": None} == {
        "kind": "complaint",
        "repeated": False,
        "matched": True,
        "suppressed": 1,
        "unsubscribed": 1,
        "note": None,
    }
    assert suppressions(settings) == [(ADDRESS, "complaint", "arf")]
    assert consent(settings) == "unsubscribed"
    [withdrawal] = events(settings, name=CONSENT_WITHDRAWN)
    assert withdrawal.payload["properties"]["source"] == "complaint"

    again = await post_arf(api, body)  # the mail system forwards it twice
    assert again.status_code == 200
    assert again.json()["repeated"] is True
    assert len(events(settings, name=CONSENT_WITHDRAWN)) == 1
    assert suppressions(settings) == [(ADDRESS, "complaint", "arf")]


async def test_the_report_itself_with_its_content_type_and_headers_only(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    """No Message-ID in the original's headers: the journey headers find the message."""
    report = arf(headers_only=True, message_id=None)
    raw = report.as_bytes()
    head, _, body = raw.partition(b"\n\n")
    answer = await post_arf(api, body, content_type=report["Content-Type"].replace("\n", ""))
    assert answer.status_code == 200, answer.text
    assert answer.json()["matched"] is True
    assert suppressions(settings) == [(ADDRESS, "complaint", "arf")]
    assert consent(settings) == "unsubscribed"


async def test_arf_that_is_not_a_complaint_or_not_ours_changes_nothing(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    other = await post_arf(api, carried(arf("not-spam")))
    assert other.status_code == 200
    assert other.json()["kind"] is None and "not a complaint" in other.json()["note"]

    unknown = await post_arf(api, carried(arf(message_id="<elsewhere@other.example>")))
    # The journey headers still name kaeru's message: a forged Message-ID alone is not enough
    # to miss it, so give a report with neither.
    assert unknown.status_code == 200
    report = arf(message_id="<elsewhere@other.example>")
    stripped = carried(report).replace(b"X-Kaeru-Journey", b"X-Other-Header")
    missing = await post_arf(api, stripped)
    assert missing.status_code == 404
    assert missing.json()["code"] == "message_not_found"

    garbage = await post_arf(api, b"hello", content_type="text/plain")
    assert garbage.status_code == 400
    assert garbage.json()["code"] == "not_arf"
    assert "RFC 5965" in garbage.json()["message"]


async def test_openapi_documents_the_feedback_and_consent_routes(api: httpx.AsyncClient) -> None:
    paths = (await api.get("/openapi.json")).json()["paths"]
    arf_body = paths["/v1/feedback/arf"]["post"]["requestBody"]["content"]
    assert {"multipart/report", "message/rfc822"} <= set(arf_body)
    assert "404" in paths["/v1/feedback/arf"]["post"]["responses"]
    assert "/v1/feedback/webhook" in paths
    consent_put = paths["/v1/customers/{customer_id}/consent"]["put"]
    assert "ConsentUpdate" in str(consent_put["requestBody"])


async def test_feedback_needs_the_server_key(api: httpx.AsyncClient, settings: Settings) -> None:
    body = carried(arf())
    assert (await post_arf(api, body, auth=None)).status_code == 401
    assert (await post_arf(api, body, auth=BROWSER_AUTH)).status_code == 403
    webhook = await api.post("/v1/feedback/webhook", json={}, auth=BROWSER_AUTH)
    assert webhook.status_code == 403
    assert suppressions(settings) == []
    assert consent(settings) == "subscribed"


# ---- Amazon SES through SNS ----------------------------------------------------------------------


def ses(kind: str, feedback_id: str = "fb-1", **detail: Any) -> dict[str, Any]:
    """An SNS notification carrying an SES one (the shapes of the SES developer guide)."""
    recipients = [{"emailAddress": ADDRESS}]
    body: dict[str, Any] = {
        "notificationType": kind,
        "mail": {
            "timestamp": "2026-12-01T10:00:00.000Z",
            "messageId": "0100018c-ses-own-id",
            "source": "shop@shop.example",
            "destination": [ADDRESS],
            "headersTruncated": False,
            "headers": [
                {"name": "Message-ID", "value": MESSAGE_ID},
                {"name": "X-Kaeru-Journey", "value": JOURNEY},
            ],
            "commonHeaders": {"messageId": MESSAGE_ID, "subject": "Your cart"},
        },
    }
    if kind == "Bounce":
        body["bounce"] = {
            "bounceType": detail.get("bounceType", "Permanent"),
            "bounceSubType": "General",
            "bouncedRecipients": recipients,
            "timestamp": "2026-12-01T10:00:01.000Z",
            "feedbackId": feedback_id,
        }
    else:
        body["complaint"] = {
            "complainedRecipients": recipients,
            "timestamp": "2026-12-01T10:00:01.000Z",
            "feedbackId": feedback_id,
            "complaintFeedbackType": "abuse",
        }
    return {
        "Type": "Notification",
        "MessageId": str(uuid.uuid4()),
        "TopicArn": "arn:aws:sns:eu-west-1:123456789012:ses-feedback",
        "Message": json.dumps(body),
        "Timestamp": "2026-12-01T10:00:02.000Z",
    }


async def hook(api: httpx.AsyncClient, body: Any) -> httpx.Response:
    # SNS posts JSON as text/plain.
    return await api.post(
        "/v1/feedback/webhook",
        content=json.dumps(body).encode(),
        headers={"Content-Type": "text/plain; charset=UTF-8", "x-amz-sns-message-type": "x"},
        auth=AUTH,
    )


async def test_a_permanent_bounce_suppresses_hard_bounce_and_keeps_consent(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    transient = await hook(api, ses("Bounce", bounceType="Transient"))
    assert transient.status_code == 200 and transient.json()["kind"] is None
    assert suppressions(settings) == []

    answer = await hook(api, ses("Bounce"))
    assert answer.status_code == 200, answer.text
    assert (answer.json()["kind"], answer.json()["suppressed"]) == ("hard_bounce", 1)
    assert suppressions(settings) == [(ADDRESS, "hard_bounce", "ses")]
    assert consent(settings) == "subscribed"
    assert events(settings, name=CONSENT_WITHDRAWN) == []


async def test_a_complaint_suppresses_and_unsubscribes_and_twice_is_once(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    first = ses("Complaint", feedback_id="fb-complaint")
    answer = await hook(api, first)
    assert answer.status_code == 200, answer.text
    assert answer.json()["unsubscribed"] == 1
    assert suppressions(settings) == [(ADDRESS, "complaint", "ses")]
    assert consent(settings) == "unsubscribed"

    # The customer subscribes again; SNS then redelivers the same notification (new envelope
    # id, same SES feedbackId): it must not unsubscribe them a second time.
    with session(settings.resolved_database_url) as s:
        set_consent(s, "u1", "email", True, "api")
    again = await hook(api, first | {"MessageId": str(uuid.uuid4())})
    assert again.json()["repeated"] is True
    assert consent(settings) == "subscribed"
    assert len(events(settings, name=CONSENT_WITHDRAWN)) == 1


async def test_a_complaint_about_a_message_kaeru_does_not_know_finds_the_customer_by_address(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    body = ses("Complaint", feedback_id="fb-2")
    inner = json.loads(body["Message"])
    inner["mail"]["headers"] = []
    inner["mail"]["commonHeaders"] = {}
    body["Message"] = json.dumps(inner)
    answer = await hook(api, body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["matched"] is False
    assert answer.json()["unsubscribed"] == 1
    assert consent(settings) == "unsubscribed"


async def test_the_webhook_refuses_what_is_not_ses_and_acknowledges_a_subscription(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    bad = await hook(api, {"event": "bounce", "email": ADDRESS})  # SendGrid's shape
    assert bad.status_code == 400
    assert bad.json()["code"] == "not_ses"
    broken = await api.post("/v1/feedback/webhook", content=b"{nope", auth=AUTH)
    assert broken.status_code == 400 and broken.json()["code"] == "invalid_json"
    confirm = await hook(
        api,
        {
            "Type": "SubscriptionConfirmation",
            "SubscribeURL": "https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription",
        },
    )
    assert confirm.status_code == 200
    assert "SubscribeURL" in confirm.json()["note"]
    assert suppressions(settings) == []


# ---- kaeru suppressions --------------------------------------------------------------------------


def test_suppressions_add_list_remove(settings: Settings) -> None:
    runner = CliRunner()
    env = {"KAERU_DATABASE_URL": settings.resolved_database_url}

    added = runner.invoke(cli, ["suppressions", "add", " Bob@Example.com "], env=env)
    assert added.exit_code == 0, added.output
    assert "Suppressed b***@example.com (manual)" in added.output
    twice = runner.invoke(cli, ["suppressions", "add", "bob@example.com"], env=env)
    assert "already" in twice.output

    listed = runner.invoke(cli, ["suppressions", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert (
        "b***@example.com" in listed.output and "manual" in listed.output and "cli" in listed.output
    )
    assert "bob@" not in listed.output

    bad = runner.invoke(cli, ["suppressions", "add", "bob@example.com", "--reason", "x"], env=env)
    assert bad.exit_code == 1 and "--reason" in bad.output
    wrong = runner.invoke(cli, ["suppressions", "add", "not-an-address"], env=env)
    assert wrong.exit_code == 1 and "not an email address" in wrong.output

    removed = runner.invoke(cli, ["suppressions", "remove", "bob@example.com"], env=env)
    assert removed.exit_code == 0, removed.output
    assert suppressions(settings) == []
    gone = runner.invoke(cli, ["suppressions", "remove", "bob@example.com"], env=env)
    assert gone.exit_code == 1 and "not on the suppression list" in gone.output


def test_the_feedback_migration_downgrades_and_upgrades_again(settings: Settings) -> None:
    url = settings.resolved_database_url
    with session(url) as s:
        s.add(Suppression(email="old@example.com", reason="bounce"))
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = get_engine(url)

    command.downgrade(config, "0010")
    found = inspect(get_engine(url))
    assert "feedback_reports" not in found.get_table_names()
    assert "source" not in {c["name"] for c in found.get_columns("suppressions")}
    migrate(url)
    assert "feedback_reports" in inspect(get_engine(url)).get_table_names()
    assert suppressions(settings) == [("old@example.com", "bounce", None)]
