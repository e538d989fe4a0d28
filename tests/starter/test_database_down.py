"""The database down: the admin API's kill-switch status and the dashboard's sign-in answer
503 with a reason, as the key check does, never a 500 (an unreachable PostgreSQL)."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI

from starter.app import create_app
from starter.dashboard import SESSION_COOKIE
from tests.conftest import make_settings
from tests.starter.conftest import OPERATOR


@pytest.fixture
def unreachable_url() -> Iterator[str]:
    """A PostgreSQL URL on a loopback port nobody listens on (held bound, never listening)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"postgresql+psycopg://kaeru@127.0.0.1:{held.getsockname()[1]}/kaeru"


def app_on(url: str, **overrides: object) -> FastAPI:
    # No lifespan: it would migrate, and the database is down from the start.
    app = create_app(make_settings(url, **overrides), run_router=False)
    app.state.signing_key = b"k" * 32
    return app


@pytest.fixture
async def client_of() -> AsyncIterator[list[httpx.AsyncClient]]:
    opened: list[httpx.AsyncClient] = []
    yield opened
    for one in opened:
        await one.aclose()


def client(app: FastAPI, opened: list[httpx.AsyncClient]) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    one = httpx.AsyncClient(transport=transport, base_url="http://kaeru.test")
    opened.append(one)
    return one


async def test_the_kill_switch_status_is_503_with_a_reason(
    unreachable_url: str, client_of: list[httpx.AsyncClient]
) -> None:
    api = client(app_on(unreachable_url, temporal_address="127.0.0.1:1"), client_of)
    answer = await api.get("/v1/admin/kill-switch", headers=OPERATOR)
    assert answer.status_code == 503, answer.text
    assert answer.json()["code"] == "unavailable"
    assert "cannot read the kill switches from the database" in answer.json()["message"]


async def test_the_dashboard_is_503_with_a_reason(
    unreachable_url: str, client_of: list[httpx.AsyncClient]
) -> None:
    # No operator token: whether anyone can sign in is in the database.
    without_token = client(app_on(unreachable_url, operator_token=None), client_of)
    for answer in (
        await without_token.get("/dashboard/login"),
        await without_token.post("/dashboard/login", data={"token": "x" * 20}),
        await without_token.get("/dashboard", follow_redirects=False),
    ):
        assert answer.status_code == 503, answer.text
        assert "cannot read the operator accounts from the database" in answer.text
    # With a token: an account's cookie names an account the database holds.
    with_token = client(app_on(unreachable_url), client_of)
    expires = int(time.time()) + 3600
    with_token.cookies.set(
        SESSION_COOKIE, f"{expires}.{'0' * 64}.carol", domain="kaeru.test", path="/dashboard"
    )
    answer = await with_token.get("/dashboard/funnels", follow_redirects=False)
    assert answer.status_code == 503, answer.text
    assert "cannot read the operator accounts from the database" in answer.text
