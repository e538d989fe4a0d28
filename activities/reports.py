"""The scheduled report: build the report of the period just ended, store it, email operators.

Operators are not shoppers: the email goes straight to ``KAERU_REPORT_TO`` through the SMTP
settings of every email (``KAERU_SMTP_*``, DKIM-signed when DKIM is set), not through the
marketing gate (consent, caps, quiet hours do not apply; there is no unsubscribe link). It
holds only counts and money, no shopper's data.

Idempotent by the run's key (the schedule's action time): the first attempt stores the report
and its rendered email in ``reports``; every later attempt, or a second run for the same time,
finds the row and sends what it holds, or nothing once ``emailed_at`` is set. An attempt cut off
after the relay accepted the message and before ``emailed_at`` was written sends it again, with
the same ``Message-ID`` (derived from the key), which mail clients show once.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiosmtplib
import jinja2
from sqlalchemy.exc import IntegrityError
from sqlmodel import select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.email.signature import Signer
from kaeru.analytics.model import Period, Report
from kaeru.analytics.serialise import report_to_json
from kaeru.db import session as db_session
from kaeru.db import write_session
from kaeru.models import StoredReport, utcnow
from kaeru.reports import (
    arm_rows,
    best_and_worst_routes,
    experiment_title,
    kind_label,
    kinds_of,
    kpi_rows,
    load_report,
    money,
    percent,
    period_label,
    picker_dates,
    route_label,
)
from kaeru.settings import Settings

#: ApplicationError type of a send the relay refused or could not take (retried).
REPORT_NOT_SENT = "ReportNotSent"

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).resolve().parent / "report_templates"),
    autoescape=jinja2.select_autoescape(["html.j2"]),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_templates.globals.update(money=money, percent=percent, route_label=route_label)


@dataclass
class ReportScheduleInput:
    """What the schedule starts each report run with (set when the worker starts)."""

    #: The length of the period each report covers, in seconds (``KAERU_REPORT_EVERY``).
    every_seconds: float
    #: The operators' addresses (``KAERU_REPORT_TO``).
    to: list[str] = field(default_factory=list)


@dataclass
class SendReportInput:
    """One report: its idempotency key, its period (ISO 8601, UTC) and who gets it."""

    key: str
    period_start: str
    period_end: str
    to: list[str] = field(default_factory=list)


@dataclass
class SendReportResult:
    report_id: int
    #: False when an earlier attempt or run had already emailed it.
    emailed: bool
    recipients: int


def render_email(settings: Settings, report: Report) -> tuple[str, str, str]:
    """The report as an email: subject, text and HTML."""
    period = report.period
    label = period_label(period)
    overall = report.kpis.get("*")
    headline = ""
    if overall is not None:
        current = overall.current
        recovered = ", ".join(money(current.revenue)) or "no revenue"
        headline = f": {current.conversions} conversions, {recovered} recovered"
    best, worst = best_and_worst_routes(report)
    context: dict[str, Any] = {
        "subject": f"{settings.shop_name} report {label}{headline}",
        "shop": settings.shop_name,
        "period": label,
        "previous": period_label(period.previous()),
        "kinds": [
            {"label": kind_label(kind), "rows": kpi_rows(report.kpis[kind])}
            for kind in kinds_of(report)
        ],
        "best": best,
        "worst": worst,
        "experiments": [
            {"title": experiment_title(e), "verdict": e.verdict, "arms": arm_rows(e)}
            for e in report.experiments
        ],
        "dashboard_url": f"{settings.public_url.rstrip('/')}/dashboard?"
        + urlencode(dict(zip(("start", "end"), picker_dates(period), strict=True))),
    }
    text = _templates.get_template("report.txt.j2").render(context)
    html = _templates.get_template("report.html.j2").render(context)
    return context["subject"], text, html


def message_id(settings: Settings, key: str) -> str:
    """The email's Message-ID, the same for every attempt of one report."""
    domain = parseaddr(settings.mail_from)[1].rpartition("@")[2] or "kaeru.localhost"
    return f"<report-{hashlib.sha256(key.encode()).hexdigest()[:32]}@{domain}>"


class ReportActivities:
    """The report activity, with its settings injected once (``worker.py``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.signer = Signer.of(settings)

    def _stored(self, request: SendReportInput) -> StoredReport:
        """The row of ``request.key``: found, or built, rendered and stored now."""
        url = self.settings.resolved_database_url
        with db_session(url) as s:
            found = s.exec(select(StoredReport).where(StoredReport.key == request.key)).first()
        if found is not None:
            return found
        period = Period(
            datetime.fromisoformat(request.period_start), datetime.fromisoformat(request.period_end)
        )
        report = load_report(self.settings, period)
        subject, text, html = render_email(self.settings, report)
        row = StoredReport(
            key=request.key,
            period_start=period.start,
            period_end=period.end,
            report=report_to_json(report),
            subject=subject,
            text=text,
            html=html,
        )
        try:
            with write_session(url) as s:
                s.add(row)
                s.commit()
                s.refresh(row)
        except IntegrityError:  # a concurrent attempt stored it first: send that one
            with db_session(url) as s:
                return s.exec(select(StoredReport).where(StoredReport.key == request.key)).one()
        return row

    def _mark_emailed(self, report_id: int) -> None:
        with write_session(self.settings.resolved_database_url) as s:
            row = s.get(StoredReport, report_id)
            if row is not None and row.emailed_at is None:
                row.emailed_at = utcnow()
                s.add(row)
                s.commit()

    def _compose(self, row: StoredReport, to: list[str]) -> bytes:
        message = EmailMessage(policy=SMTP_POLICY)
        message["From"] = self.settings.mail_from
        message["To"] = ", ".join(to)
        message["Subject"] = row.subject
        message["Date"] = format_datetime(utcnow())
        message["Message-ID"] = message_id(self.settings, row.key)
        # Not marketing: auto-responders and list software should leave it alone.
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(row.text)
        message.add_alternative(row.html, subtype="html")
        payload = message.as_bytes()
        return self.signer.sign(payload) if self.signer is not None else payload

    async def _send(self, payload: bytes, to: list[str]) -> None:
        s = self.settings
        if not s.smtp_host:
            raise ApplicationError(
                "KAERU_SMTP_HOST is not set, so the report cannot be emailed: set it (and "
                "KAERU_SMTP_PORT) to your SMTP relay; the report is stored and retried until then",
                type=REPORT_NOT_SENT,
            )
        sender = parseaddr(s.mail_from)[1] or s.mail_from.strip()
        try:
            await aiosmtplib.send(
                payload,
                sender=sender,
                recipients=to,
                hostname=s.smtp_host,
                port=s.smtp_port,
                username=s.smtp_username,
                password=s.smtp_password.get_secret_value() if s.smtp_password else None,
                use_tls=s.smtp_tls,
                start_tls=s.smtp_starttls,
                timeout=s.smtp_timeout,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise ApplicationError(
                f"the SMTP relay {s.smtp_host}:{s.smtp_port} did not take the report "
                f"({type(exc).__name__}: {exc}); retried",
                type=REPORT_NOT_SENT,
            ) from exc

    @activity.defn(name="send_report")
    async def send_report(self, request: SendReportInput) -> SendReportResult:
        """Build (once), store and email the report of ``request``'s period."""
        if not request.to:
            raise ApplicationError(
                "the report has no recipients: set KAERU_REPORT_TO to operator addresses",
                type="NoRecipients",
                non_retryable=True,
            )
        row = await asyncio.to_thread(self._stored, request)
        assert row.id is not None
        if row.emailed_at is not None:
            return SendReportResult(report_id=row.id, emailed=False, recipients=len(request.to))
        await self._send(self._compose(row, request.to), request.to)
        await asyncio.to_thread(self._mark_emailed, row.id)
        return SendReportResult(report_id=row.id, emailed=True, recipients=len(request.to))
