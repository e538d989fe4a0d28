"""DNS rebinding: the dev stack's servers answer only for loopback names and the public URL.

A page on evil.example can make its name resolve to 127.0.0.1; the browser then sends
``Host: evil.example`` to the mail catcher or the API on this machine. Each test speaks real
HTTP on loopback with a forged ``Host`` header.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from kaeru.dev.mailcatcher import MailCatcher
from kaeru.dev.plan import plan_dev
from kaeru.serving import AppServer, listening_socket
from kaeru.settings import Settings
from starter.app import create_app
from tests.conftest import make_settings

FOREIGN = ("evil.example", "evil.example:8025", "localhost.evil.example", "127.0.0.1.nip.io")


async def status(url: str, path: str, host: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url) as http:
        return await http.get(path, headers={"Host": host})


@contextlib.asynccontextmanager
async def inbox(directory: Path, settings: Settings | None = None) -> AsyncIterator[str]:
    """The mail catcher's web inbox, with the hosts ``kaeru dev`` gives it for ``settings``."""
    smtp = listening_socket("127.0.0.1", 0, what="test SMTP", fix="-")
    http = listening_socket("127.0.0.1", 0, what="test inbox", fix="-")
    if settings is None:
        catcher = MailCatcher(directory)
    else:
        hosts = plan_dev(settings).settings.allowed_hosts.split(",")
        catcher = MailCatcher(directory, hosts=hosts)
    await catcher.start(smtp, http)
    try:
        yield f"http://127.0.0.1:{http.getsockname()[1]}"
    finally:
        await catcher.stop()


@contextlib.asynccontextmanager
async def api(settings: Settings) -> AsyncIterator[str]:
    sock = listening_socket("127.0.0.1", 0, what="test API", fix="-")
    server = AppServer(create_app(settings, run_router=False), sock, what="test API")
    await server.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await server.stop()


@pytest.mark.parametrize("host", FOREIGN)
async def test_the_mail_inbox_refuses_a_foreign_host(tmp_path: Path, host: str) -> None:
    async with inbox(tmp_path / "mail") as url:
        for path in ("/", "/api/messages"):
            answer = await status(url, path, host)
            assert answer.status_code == 421
            assert answer.json()["code"] == "host_not_allowed"
            assert "KAERU_ALLOWED_HOSTS" in answer.json()["message"]


async def test_the_mail_inbox_answers_loopback_names(tmp_path: Path) -> None:
    async with inbox(tmp_path / "mail") as url:
        port = url.rsplit(":", 1)[1]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert (await status(url, "/api/messages", host)).status_code == 200, host


async def test_kaeru_dev_gives_the_inbox_the_public_urls_host(
    tmp_path: Path, sqlite_url: str
) -> None:
    settings = make_settings(sqlite_url, public_url="https://tunnel.example:8443")
    async with inbox(tmp_path / "mail", settings) as url:
        assert (await status(url, "/api/messages", "tunnel.example")).status_code == 200
        assert (await status(url, "/api/messages", "evil.example")).status_code == 421


@pytest.mark.parametrize("host", FOREIGN)
async def test_the_dev_api_refuses_a_foreign_host(sqlite_url: str, host: str) -> None:
    plan = plan_dev(make_settings(sqlite_url, public_url="http://kaeru.test"))
    async with api(plan.settings) as url:
        for path in ("/openapi.json", "/v1/customers/u1", "/t/o/token"):
            answer = await status(url, path, host)
            assert answer.status_code == 421, path
            assert "KAERU_ALLOWED_HOSTS" in answer.json()["message"]
        assert (await status(url, "/healthz", host)).status_code == 200


async def test_the_dev_api_answers_loopback_and_the_public_urls_host(sqlite_url: str) -> None:
    plan = plan_dev(make_settings(sqlite_url, public_url="http://kaeru.test"))
    async with api(plan.settings) as url:
        port = url.rsplit(":", 1)[1]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "kaeru.test"):
            assert (await status(url, "/openapi.json", host)).status_code == 200, host


async def test_the_production_api_answers_any_host_unless_allowed_hosts_is_set(
    sqlite_url: str,
) -> None:
    async with api(make_settings(sqlite_url)) as url:
        assert (await status(url, "/openapi.json", "evil.example")).status_code == 200
    limited = make_settings(sqlite_url, allowed_hosts="api.shop.example, kaeru.shop.example")
    async with api(limited) as url:
        assert (await status(url, "/openapi.json", "evil.example")).status_code == 421
        assert (await status(url, "/openapi.json", "localhost")).status_code == 421
        assert (await status(url, "/openapi.json", "API.shop.example:443")).status_code == 200
        assert (await status(url, "/openapi.json", "kaeru.shop.example")).status_code == 200
        assert (await status(url, "/healthz", "10.0.0.7:8000")).status_code == 200


def test_kaeru_dev_adds_loopback_and_the_public_host_to_allowed_hosts(sqlite_url: str) -> None:
    settings = make_settings(
        sqlite_url, public_url="https://tunnel.example", allowed_hosts="lan.example"
    )
    hosts = plan_dev(settings).settings.allowed_hosts.split(",")
    assert hosts == ["localhost", "127.0.0.1", "[::1]", "tunnel.example", "lan.example"]
