"""The mail catcher, over real SMTP and real HTTP: what is sent is listed, shown and kept."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import httpx
import pytest

from kaeru.dev.mailcatcher import MailCatcher, MailStore
from kaeru.serving import listening_socket


@dataclass
class Running:
    catcher: MailCatcher
    smtp_port: int
    url: str


async def start_catcher(directory: Path) -> Running:
    smtp = listening_socket("127.0.0.1", 0, what="test SMTP", fix="-")
    http = listening_socket("127.0.0.1", 0, what="test inbox", fix="-")
    catcher = MailCatcher(directory)
    await catcher.start(smtp, http)
    return Running(catcher, smtp.getsockname()[1], f"http://127.0.0.1:{http.getsockname()[1]}")


@pytest.fixture
async def inbox(tmp_path: Path) -> AsyncIterator[Running]:
    running = await start_catcher(tmp_path / "mail")
    yield running
    await running.catcher.stop()


def email(subject: str, marker: str = "hello") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Kaeru Shop <shop@kaeru.localhost>"
    message["To"] = "shopper@example.com"
    message["Subject"] = subject
    message["Message-ID"] = f"<{marker}@kaeru.localhost>"
    message["X-Kaeru-Journey"] = "cart-abandonment-alice"
    message["X-Kaeru-Step"] = "cart_email"
    message.set_content(f"plain {marker}")
    message.add_alternative(
        f"<html><head><title>t</title></head><body><p>html {marker}</p>"
        "<script>alert(1)</script></body></html>",
        subtype="html",
    )
    return message


async def send(running: Running, message: EmailMessage) -> None:
    await aiosmtplib.send(message, hostname="127.0.0.1", port=running.smtp_port)


async def listed(running: Running) -> list[dict[str, object]]:
    async with httpx.AsyncClient(base_url=running.url) as http:
        answer = await http.get("/api/messages")
    assert answer.status_code == 200
    messages: list[dict[str, object]] = answer.json()
    return messages


async def test_a_sent_message_is_listed_with_its_parts(inbox: Running) -> None:
    await send(inbox, email("Your cart misses you", "m1"))

    [summary] = await listed(inbox)
    assert summary["to"] == "shopper@example.com"
    assert summary["subject"] == "Your cart misses you"
    assert summary["message_id"] == "<m1@kaeru.localhost>"
    assert summary["journey"] == "cart-abandonment-alice"
    assert summary["step"] == "cart_email"
    async with httpx.AsyncClient(base_url=inbox.url) as http:
        detail = (await http.get(f"/api/messages/{summary['id']}")).json()
    assert "html m1" in detail["html"]
    assert detail["text"].strip() == "plain m1"


async def test_messages_are_listed_newest_first(inbox: Running) -> None:
    await send(inbox, email("first", "a"))
    await send(inbox, email("second", "b"))

    assert [m["subject"] for m in await listed(inbox)] == ["second", "first"]
    async with httpx.AsyncClient(base_url=inbox.url) as http:
        page = (await http.get("/")).text
    assert page.index("second") < page.index("first")


async def test_the_html_part_is_shown_in_a_sandbox_without_scripts(inbox: Running) -> None:
    await send(inbox, email("Sandboxed", "s1"))
    [summary] = await listed(inbox)

    async with httpx.AsyncClient(base_url=inbox.url) as http:
        page = await http.get(f"/m/{summary['id']}")
        part = await http.get(f"/m/{summary['id']}/html")
        text = await http.get(f"/m/{summary['id']}", params={"view": "text"})
        source = await http.get(f"/m/{summary['id']}", params={"view": "source"})

    assert page.status_code == 200
    assert f'<iframe src="/m/{summary["id"]}/html" sandbox="' in page.text
    assert "allow-scripts" not in page.text
    assert "X-Kaeru-Step" in page.text and "cart_email" in page.text
    assert part.headers["content-type"].startswith("text/html")
    policy = part.headers["content-security-policy"]
    assert policy.startswith("sandbox") and "allow-scripts" not in policy
    assert "script-src 'none'" in policy
    assert '<base target="_blank">' in part.text and "html s1" in part.text
    assert "plain s1" in text.text and "<iframe" not in text.text
    assert "Subject: Sandboxed" in source.text


@pytest.mark.parametrize(
    "path",
    [
        "/api/messages/..%2Fsecret",
        "/api/messages/%2E%2E%2F%2E%2E%2Fsecret",
        "/m/..%2Fsecret",
        "/m/..%2Fsecret/raw",
        "/m/..%2Fsecret/html",
        "/m/....%2F%2Fsecret/raw",
        "/api/messages/secret",
    ],
)
async def test_message_ids_cannot_reach_outside_the_mail_directory(
    inbox: Running, tmp_path: Path, path: str
) -> None:
    (tmp_path / "secret.eml").write_text("Subject: secret\n\nTOP SECRET")
    (tmp_path / "mail").mkdir(exist_ok=True)

    async with httpx.AsyncClient(base_url=inbox.url) as http:
        answer = await http.get(path)

    assert answer.status_code == 404
    assert "TOP SECRET" not in answer.text
    assert MailStore(tmp_path / "mail").raw("../secret") is None


async def test_the_inbox_survives_a_restart(tmp_path: Path) -> None:
    first = await start_catcher(tmp_path / "mail")
    try:
        await send(first, email("Kept", "k1"))
    finally:
        await first.catcher.stop()

    second = await start_catcher(tmp_path / "mail")
    try:
        [summary] = await listed(second)
        assert summary["subject"] == "Kept"
        async with httpx.AsyncClient(base_url=second.url) as http:
            assert "Kept" in (await http.get("/")).text
    finally:
        await second.catcher.stop()


async def test_an_empty_inbox_says_where_mail_goes(inbox: Running) -> None:
    async with httpx.AsyncClient(base_url=inbox.url) as http:
        page = (await http.get("/")).text

    assert "No mail yet" in page
    assert f"127.0.0.1:{inbox.smtp_port}" in page
