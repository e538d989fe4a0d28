"""A worker killed with SIGKILL loses nothing and sends nothing twice.

The worker runs as a real ``kaeru worker`` process against the Temporal dev server; the test
kills it while journeys sleep and while an email is in flight, starts a new one, and counts
what the (real, loopback) SMTP server received.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlmodel import select
from temporalio.common import TypedSearchAttributes
from temporalio.testing import WorkflowEnvironment

from kaeru.db import migrate, session
from kaeru.models import Customer, EmailMessage
from tests.support.smtp import SMTPTestServer
from workflows.cart_abandonment import CartAbandonment, CartJourneyInput, CartJourneySettings
from workflows.kit import EVENT_SIGNAL, Journey, JourneyEvent, JourneyResult

FAST = CartJourneySettings(
    email_delay=2.0,
    open_wait=3.0,
    ad_delay=1.0,
    ad_click_wait=3.0,
    offer_delay=1.0,
    offer_wait=3.0,
    recommendations=0,
)


class WorkerProcess:
    """``kaeru worker`` in its own process, as production runs it."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env, self.cwd = env, cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kaeru", "worker", "--verbose"],
            env=self.env,
            cwd=self.cwd,
            stdout=(self.cwd / "worker.log").open("ab"),
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture
async def smtp() -> AsyncIterator[SMTPTestServer]:
    async with SMTPTestServer() as server:
        yield server


@pytest.fixture
def stack(
    dev_server_env: WorkflowEnvironment, tmp_path: Path, smtp: SMTPTestServer
) -> Iterator[tuple[WorkerProcess, str, str]]:
    database_url = f"sqlite:///{tmp_path / 'kaeru.db'}"
    migrate(database_url)
    task_queue = f"restart-{uuid.uuid4().hex[:8]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KAERU_")},
        "KAERU_TEMPORAL_ADDRESS": dev_server_env.client.service_client.config.target_host,
        "KAERU_DATABASE_URL": database_url,
        "KAERU_TASK_QUEUE": task_queue,
        "KAERU_SMTP_HOST": "127.0.0.1",
        "KAERU_SMTP_PORT": str(smtp.port),
        "KAERU_SECRET_KEY": "restart-test-0123456789abcdef-kaeru",
        "KAERU_PUBLIC_URL": "http://kaeru.test",
        "KAERU_LOG_LEVEL": "INFO",
        # Off: its default port (9464) may be taken by another test's worker on this machine.
        "KAERU_WORKER_METRICS_PORT": "0",
        # This test is about restarts, not the send gate: its shopper said nothing about
        # consent, and quiet hours would follow the wall clock (tests/conftest.make_settings).
        "KAERU_UNKNOWN_CONSENT_IS_YES": "true",
        "KAERU_QUIET_START": "00:00",
        "KAERU_QUIET_END": "00:00",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    worker = WorkerProcess(env, tmp_path)
    yield worker, database_url, task_queue
    worker.stop()


async def start_journey(
    env: WorkflowEnvironment, database_url: str, task_queue: str, settings: CartJourneySettings
) -> str:
    customer_id = f"r-{uuid.uuid4().hex[:8]}"
    with session(database_url) as s:
        s.add(Customer(customer_id=customer_id, email=f"{customer_id}@shoppers.test"))
    event = JourneyEvent(
        1,
        "Product Added",
        f"m-{uuid.uuid4()}",
        datetime.now(UTC),
        {"product_id": "p1", "name": "Mug"},
    )
    await env.client.start_workflow(
        CartAbandonment.run,
        CartJourneyInput(customer_id, settings),
        id=f"{CartAbandonment.kind}-{customer_id}",
        task_queue=task_queue,
        start_signal=EVENT_SIGNAL,
        start_signal_args=[event],
        search_attributes=TypedSearchAttributes(Journey.start_search_attributes(customer_id)),
    )
    return customer_id


async def outcome(env: WorkflowEnvironment, customer_id: str) -> str:
    handle = env.client.get_workflow_handle(
        f"{CartAbandonment.kind}-{customer_id}", result_type=JourneyResult
    )
    result = await asyncio.wait_for(handle.result(), timeout=90)
    return str(result.outcome)


async def test_killed_while_journeys_sleep(
    dev_server_env: WorkflowEnvironment, stack: tuple[WorkerProcess, str, str], smtp: SMTPTestServer
) -> None:
    worker, database_url, task_queue = stack
    settings = CartJourneySettings(**{**FAST.__dict__, "email_delay": 6.0})
    worker.start()
    customers = [
        await start_journey(dev_server_env, database_url, task_queue, settings) for _ in range(5)
    ]
    await asyncio.sleep(2)  # every journey is asleep in its quiet period
    worker.kill()
    worker.start()
    outcomes = await asyncio.gather(*(outcome(dev_server_env, c) for c in customers))
    assert outcomes == ["not_opened"] * 5
    received = sorted(m.message["To"] for m in smtp.messages)
    assert received == sorted(f"{c}@shoppers.test" for c in customers)


@pytest.mark.parametrize("stall_at", ["DATA", "RCPT"])
async def test_killed_while_sending(
    dev_server_env: WorkflowEnvironment,
    stack: tuple[WorkerProcess, str, str],
    smtp: SMTPTestServer,
    stall_at: str,
) -> None:
    """Killed mid-send, the email goes out once: before DATA it is resent, after it is not."""
    worker, database_url, task_queue = stack
    smtp.stall(stall_at)
    worker.start()
    customer_id = await start_journey(dev_server_env, database_url, task_queue, FAST)
    await asyncio.wait_for(smtp.stalled.wait(), timeout=60)
    worker.kill()
    smtp.release()
    worker.start()
    assert await outcome(dev_server_env, customer_id) == "not_opened"
    assert [m.message["To"] for m in smtp.messages] == [f"{customer_id}@shoppers.test"]
    with session(database_url) as s:
        row = s.exec(select(EmailMessage).where(EmailMessage.customer_id == customer_id)).one()
    assert row.status == ("unconfirmed" if stall_at == "DATA" else "sent")
