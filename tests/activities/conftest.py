"""Fixtures for activity tests: real loopback servers (SMTP, Graph API), nothing mocked."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.graph_api import GraphAPIServer
from tests.support.smtp import SMTPTestServer


@pytest.fixture
async def smtp_server() -> AsyncIterator[SMTPTestServer]:
    async with SMTPTestServer() as server:
        yield server


@pytest.fixture
def graph_api() -> Iterator[GraphAPIServer]:
    with GraphAPIServer() as server:
        yield server
