"""The mail catcher: kaeru's local SMTP server and web inbox for ``kaeru dev``.

Every message sent to it is kept as an ``.eml`` file under ``.kaeru/mail/`` (so the inbox
survives restarts) and shown at http://localhost:8025: a list, newest first, and each
message with its headers, its HTML part in a sandboxed iframe (no scripts; links open in a
new tab), its plain-text part and its raw source. ``GET /api/messages`` and
``GET /api/messages/{id}`` give the same as JSON, for the demo shopper and for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesHeaderParser, BytesParser
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import jinja2
from aiosmtpd.smtp import SMTP, Envelope, Session
from fastapi import APIRouter, FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, PlainTextResponse

from kaeru.serving import AppServer
from starter.limits import LOOPBACK_HOSTS, AllowedHosts

log = logging.getLogger("kaeru.mailcatcher")

#: A stored message's id: its arrival time in nanoseconds and a random suffix. Nothing else
#: is ever joined to the mail directory, so no id can name a file outside it.
MESSAGE_ID = re.compile(r"^[0-9]{20}-[0-9a-f]{8}$")

#: Headers shown on a message's page, besides every ``X-Kaeru-*`` one.
SHOWN_HEADERS = ("From", "To", "Cc", "Reply-To", "Date", "Message-ID")

#: What the HTML part may do when it is shown: no scripts, no plugins, no navigating the
#: inbox; links open in a new tab outside the sandbox.
HTML_PART_POLICY = (
    "sandbox allow-popups allow-popups-to-escape-sandbox; script-src 'none'; object-src 'none'"
)
INBOX_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src * data:; frame-src 'self'; "
    "form-action 'none'; base-uri 'none'"
)

_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates" / "mailcatcher"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


@dataclass(frozen=True)
class MailSummary:
    """One message as the inbox lists it."""

    id: str
    received: datetime
    sender: str
    to: str
    subject: str
    date: datetime | None
    message_id: str
    journey: str | None
    step: str | None
    size: int

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["from"] = data.pop("sender")
        data["received"] = self.received.isoformat()
        data["date"] = self.date.isoformat() if self.date else None
        return data


def _received_at(message_id: str) -> datetime:
    return datetime.fromtimestamp(int(message_id[:20]) / 1e9, tz=UTC)


def _header_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class MailStore:
    """Messages as ``<id>.eml`` files in one directory; files never change once written."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._summaries: dict[str, MailSummary] = {}

    def _path(self, message_id: str) -> Path | None:
        if not MESSAGE_ID.fullmatch(message_id):
            return None
        return self.directory / f"{message_id}.eml"

    def save(self, raw: bytes) -> str:
        """Store one message and return its id."""
        self.directory.mkdir(parents=True, exist_ok=True)
        message_id = f"{time.time_ns():020d}-{secrets.token_hex(4)}"
        path = self.directory / f"{message_id}.eml"
        partial = path.with_suffix(".part")
        partial.write_bytes(raw)
        os.replace(partial, path)  # readers never see half a message
        return message_id

    def ids(self, limit: int | None = None) -> list[str]:
        """Stored ids, newest first."""
        if not self.directory.is_dir():
            return []
        found = sorted(
            (p.stem for p in self.directory.glob("*.eml") if MESSAGE_ID.fullmatch(p.stem)),
            reverse=True,
        )
        return found[:limit] if limit is not None else found

    def raw(self, message_id: str) -> bytes | None:
        path = self._path(message_id)
        if path is None:
            return None
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def message(self, message_id: str) -> EmailMessage | None:
        raw = self.raw(message_id)
        if raw is None:
            return None
        parsed = BytesParser(policy=email.policy.default).parsebytes(raw)
        assert isinstance(parsed, EmailMessage)
        return parsed

    def summary(self, message_id: str) -> MailSummary | None:
        cached = self._summaries.get(message_id)
        if cached is not None:
            return cached
        raw = self.raw(message_id)
        if raw is None:
            return None
        headers = BytesHeaderParser(policy=email.policy.default).parsebytes(raw)
        found = MailSummary(
            id=message_id,
            received=_received_at(message_id),
            sender=str(headers.get("From", "")),
            to=str(headers.get("To", "")),
            subject=str(headers.get("Subject", "")),
            date=_header_date(headers.get("Date")),
            message_id=str(headers.get("Message-ID", "")),
            journey=headers.get("X-Kaeru-Journey"),
            step=headers.get("X-Kaeru-Step"),
            size=len(raw),
        )
        self._summaries[message_id] = found
        return found

    def summaries(self, limit: int | None = None) -> list[MailSummary]:
        """The newest ``limit`` messages, newest first."""
        return [s for i in self.ids(limit) if (s := self.summary(i)) is not None]


def body_of(message: EmailMessage, subtype: str) -> str | None:
    """The message's ``text/<subtype>`` body, decoded; None if it has none."""
    part = message.get_body(preferencelist=(subtype,))
    if part is None or part.get_content_subtype() != subtype:
        return None
    try:
        content = part.get_content()
    except (LookupError, ValueError):  # an unknown charset or a broken encoding
        payload = part.get_payload(decode=True)
        content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else None
    return content if isinstance(content, str) else None


def _links_in_new_tab(html: str) -> str:
    """Make links in an email open a new tab instead of navigating the small frame."""
    tag = '<base target="_blank">'
    head = re.search(r"<head\b[^>]*>", html, re.IGNORECASE)
    return html[: head.end()] + tag + html[head.end() :] if head else tag + html


def _headers_to_show(message: EmailMessage) -> list[tuple[str, str]]:
    shown = [(name, str(message[name])) for name in SHOWN_HEADERS if message[name] is not None]
    shown += [(k, str(v)) for k, v in message.items() if k.lower().startswith("x-kaeru-")]
    return shown


class _Catch:
    """aiosmtpd handler: every message is accepted and stored."""

    def __init__(self, store: MailStore) -> None:
        self.store = store

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        data = raw.encode() if isinstance(raw, str) else bytes(raw)
        message_id = self.store.save(data)
        # The count, not the addresses: the inbox shows them; a log is no place for them.
        log.info("caught %s for %d recipient(s)", message_id, len(envelope.rcpt_tos))
        return "250 2.0.0 Message accepted"


def create_inbox_app(
    store: MailStore,
    smtp_address: str,
    extra: Sequence[APIRouter] = (),
    hosts: Sequence[str] = LOOPBACK_HOSTS,
) -> FastAPI:
    """The inbox web app (HTML pages and the JSON API) over ``store``, plus ``extra`` routes.

    It answers only for ``hosts`` (421 otherwise): a web page whose name resolves to 127.0.0.1
    (DNS rebinding) must not read the inbox.
    """
    app = FastAPI(title="kaeru mail catcher", summary="Every email kaeru sent in development.")
    app.add_middleware(
        AllowedHosts,
        hosts=hosts,
        fix="open the inbox at http://localhost:<port>, or add the name to KAERU_ALLOWED_HOSTS",
    )
    for router in extra:
        app.include_router(router)

    def page(template: str, **context: Any) -> HTMLResponse:
        html = _TEMPLATES.get_template(template).render(**context)
        return HTMLResponse(html, headers={"Content-Security-Policy": INBOX_POLICY})

    def found(message_id: str) -> tuple[MailSummary, EmailMessage]:
        summary = store.summary(message_id)
        message = store.message(message_id)
        if summary is None or message is None:
            raise HTTPException(404, f"no message {message_id!r} in this inbox")
        return summary, message

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def inbox() -> HTMLResponse:
        return page("inbox.html", messages=store.summaries(500), smtp_address=smtp_address)

    @app.get("/m/{message_id}", response_class=HTMLResponse, include_in_schema=False)
    def message_page(message_id: str, view: str | None = None) -> HTMLResponse:
        summary, message = found(message_id)
        html, text = body_of(message, "html"), body_of(message, "plain")
        views = [v for v, present in (("html", html), ("text", text)) if present is not None]
        views.append("source")
        chosen = view if view in views else views[0]
        raw = store.raw(message_id) or b""
        return page(
            "message.html",
            m=summary,
            headers=_headers_to_show(message),
            views=views,
            view=chosen,
            text=text,
            source=raw.decode("utf-8", "replace"),
        )

    @app.get("/m/{message_id}/html", response_class=HTMLResponse, include_in_schema=False)
    def html_part(message_id: str) -> HTMLResponse:
        _, message = found(message_id)
        html = body_of(message, "html")
        if html is None:
            raise HTTPException(404, "this message has no HTML part")
        return HTMLResponse(
            _links_in_new_tab(html),
            headers={
                "Content-Security-Policy": HTML_PART_POLICY,
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )

    @app.get("/m/{message_id}/raw", response_class=PlainTextResponse, include_in_schema=False)
    def raw_source(message_id: str) -> PlainTextResponse:
        raw = store.raw(message_id)
        if raw is None:
            raise HTTPException(404, f"no message {message_id!r} in this inbox")
        return PlainTextResponse(
            raw.decode("utf-8", "replace"), headers={"X-Content-Type-Options": "nosniff"}
        )

    @app.get("/api/messages")
    def list_messages(limit: int = Query(100, ge=1, le=1000)) -> list[dict[str, Any]]:
        """Messages, newest first: id, received, from, to, subject, date, message_id, ..."""
        return [s.as_json() for s in store.summaries(limit)]

    @app.get("/api/messages/{message_id}")
    def get_message(message_id: str) -> dict[str, Any]:
        """One message: its summary, every header, and its ``html`` and ``text`` parts."""
        summary, message = found(message_id)
        return {
            **summary.as_json(),
            "headers": [[k, str(v)] for k, v in message.items()],
            "html": body_of(message, "html"),
            "text": body_of(message, "plain"),
        }

    return app


class MailCatcher:
    """SMTP server plus web inbox in the running event loop, on sockets already listening."""

    def __init__(
        self,
        directory: Path,
        extra: Sequence[APIRouter] = (),
        hosts: Sequence[str] = LOOPBACK_HOSTS,
    ) -> None:
        self.store = MailStore(directory)
        self.extra = extra
        self.hosts = hosts
        self._smtp: asyncio.Server | None = None
        self._web: AppServer | None = None

    @property
    def task(self) -> asyncio.Task[None]:
        """The web inbox's task: it ends only if the inbox fails."""
        if self._web is None:
            raise RuntimeError("the mail catcher was not started")
        return self._web.task

    async def start(self, smtp_sock: socket.socket, http_sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        handler = _Catch(self.store)
        host, port = smtp_sock.getsockname()[:2]
        self._smtp = await loop.create_server(
            lambda: SMTP(handler, hostname="kaeru-mail-catcher", enable_SMTPUTF8=True),
            sock=smtp_sock,
        )
        self._web = AppServer(
            create_inbox_app(self.store, f"{host}:{port}", self.extra, self.hosts),
            http_sock,
            what="the mail inbox",
            lifespan="off",
        )
        await self._web.start()

    async def stop(self) -> None:
        if self._web is not None:
            await self._web.stop()
        if self._smtp is not None:
            self._smtp.close()
            # A client that keeps its connection open must not hold up the shutdown.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._smtp.wait_closed(), 2)
