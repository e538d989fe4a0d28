"""Fixtures for the API: the real app on a real database, spoken to over ASGI or real HTTP."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import func
from sqlmodel import col, select

from kaeru.db import session
from kaeru.models import Event
from kaeru.settings import Settings
from starter.app import create_app
from tests.conftest import make_settings

WRITE_KEY = "test-write-key"
AUTH = ("test-write-key", "")
#: The browser write key of ``make_settings`` (public, limited).
BROWSER_AUTH = ("test-browser-key", "")
#: The operator token of ``make_settings``, as the admin API wants it.
OPERATOR = {"Authorization": "Bearer test-operator-token"}


def basic(user: str, password: str = "") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@asynccontextmanager
async def asgi_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, reached in-process."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kaeru.test") as client:
            yield client


@asynccontextmanager
async def uvicorn_server(app: FastAPI) -> AsyncIterator[str]:
    """The app served by a real uvicorn on a free loopback port; yields its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API without a router (storage tests): events stay in the outbox."""
    async with asgi_client(create_app(settings, run_router=False)) as client:
        yield client


def events(settings: Settings, **where: Any) -> list[Event]:
    """Stored events, in ``seq`` order."""
    with session(settings.resolved_database_url) as s:
        query = select(Event)
        for name, value in where.items():
            query = query.where(getattr(Event, name) == value)
        return list(s.exec(query.order_by(col(Event.seq))).all())


def count(settings: Settings, model: Any) -> int:
    with session(settings.resolved_database_url) as s:
        return int(s.exec(select(func.count()).select_from(model)).one())
