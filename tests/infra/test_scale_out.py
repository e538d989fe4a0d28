"""kaeru as infra/compose.yaml runs it, for real: migrate and setup once, 2 workers, 2 APIs.

The processes are ``kaeru migrate``, ``kaeru setup``, ``kaeru worker`` and ``kaeru api`` as
compose's services run them, with compose's environment, against the Temporal dev server and a
real PostgreSQL (pgserver). Only what a container would get from its network changes here: the
addresses of Temporal, PostgreSQL and SMTP, and a port of its own for each process on one
host. An order posted to each API starts its journey and its email reaches a real SMTP server;
a worker killed with SIGKILL leaves the other to carry on.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from kaeru.journeys import discover, prefix_of
from tests.e2e.test_journey import eventually
from tests.infra.test_files import environment_of
from tests.support.smtp import SMTPTestServer

ROOT = Path(__file__).resolve().parents[2]
KAERU = Path(sys.executable).parent / "kaeru"
WRITE_KEY = "scale-out-write-key-0123456789"
pytestmark = pytest.mark.journeys("order-confirmation")


def compose_service(name: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment of one of infra/compose.yaml's services."""
    service = yaml.safe_load((ROOT / "infra" / "compose.yaml").read_text())["services"][name]
    return list(service["command"]), environment_of(service)


def unused_port() -> int:
    """A loopback port nobody listens on now (the process binds it itself a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Process:
    """One kaeru process of a compose service, on this machine."""

    service: str
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        command, _ = compose_service(self.service)
        assert command[0] == "kaeru"
        self.popen = subprocess.Popen(
            [str(KAERU), *command[1:], "--verbose"],
            env=self.env,
            cwd=self.log.parent,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        """What the process printed so far; fails the test with it if the process died."""
        text = self.log.read_text(errors="replace")
        if self.popen is not None and self.popen.poll() is not None:
            raise AssertionError(f"{self.log.name}: exited {self.popen.returncode}:\n{text}")
        return text

    def kill(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def terminate(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


@dataclass
class Stack:
    workers: list[Process]
    apis: list[Process]
    env: dict[str, str]
    smtp: SMTPTestServer


def run_once(services: list[str], env: dict[str, str], cwd: Path) -> list[str]:
    """One-shot services (``migrate``, ``setup``) to the end, side by side as compose runs them
    before the rest; their output, one line each."""
    running = [
        subprocess.Popen(
            [str(KAERU), *compose_service(name)[0][1:]],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in services
    ]
    outputs = []
    for process in running:
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output
        outputs.append(" ".join(output.split()))  # rich wraps lines at the terminal's width
    return outputs


@pytest.fixture
def database(postgres_server: Any) -> Iterator[str]:
    """An empty PostgreSQL database: `kaeru migrate` must make its schema."""
    name = f"scale_{uuid.uuid4().hex[:10]}"
    postgres_server.psql(f"CREATE DATABASE {name};")
    yield postgres_server.get_uri(name).replace("postgresql://", "postgresql+psycopg://", 1)
    postgres_server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE);")


@pytest.fixture
async def stack(
    dev_server_env: WorkflowEnvironment, database: str, tmp_path: Path
) -> AsyncIterator[Stack]:
    async with SMTPTestServer() as smtp:
        _, compose_env = compose_service("worker")
        # Compose's wiring, minus what only a container network has: the collector (no OTLP
        # receiver here) and the addresses, which point at this machine's servers instead.
        wiring = {
            k: v
            for k, v in compose_env.items()
            if k.startswith("KAERU_") and not k.startswith("KAERU_WORKER_METRICS")
        }
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("KAERU_", "OTEL_"))},
            **wiring,
            "KAERU_TEMPORAL_ADDRESS": dev_server_env.client.service_client.config.target_host,
            "KAERU_DATABASE_URL": database,
            "KAERU_TASK_QUEUE": f"scale-{uuid.uuid4().hex[:8]}",
            "KAERU_WRITE_KEY": WRITE_KEY,
            "KAERU_OPERATOR_TOKEN": "scale-out-operator-token-0123456789",
            "KAERU_SECRET_KEY": "scale-out-secret-key-0123456789abcdef",
            "KAERU_METRICS_TOKEN": "scale-out-metrics-token-0123456789",
            "KAERU_SMTP_HOST": "127.0.0.1",
            "KAERU_SMTP_PORT": str(smtp.port),
            "KAERU_SMTP_STARTTLS": "false",
            "KAERU_PUBLIC_URL": "http://kaeru.test",
            # Only the order confirmation: one email per order, at once.
            **{
                f"KAERU_{prefix_of(j)}_ENABLED": "false"
                for j in discover()
                if j.kind != "order-confirmation"
            },
            "PYTHONPATH": str(ROOT),
        }
        assert env["KAERU_MAX_CONCURRENT_ACTIVITIES"] == "100"  # compose's, read through
        migrated, registered = run_once(["migrate", "setup"], env, tmp_path)
        assert "schema is up to date" in migrated
        assert "are registered in namespace" in registered
        workers = [
            # Each its own metrics port: on one host two cannot share 9464.
            Process("worker", {**env, "KAERU_WORKER_METRICS_PORT": str(unused_port())}, log)
            for log in (tmp_path / "worker-1.log", tmp_path / "worker-2.log")
        ]
        _, api_env = compose_service("api")
        apis = [
            Process(
                "api",
                {**env, "KAERU_API_HOST": "127.0.0.1", "KAERU_API_PORT": str(unused_port())},
                log,
            )
            for log in (tmp_path / "api-1.log", tmp_path / "api-2.log")
        ]
        assert api_env["KAERU_API_HOST"] == "0.0.0.0"  # in a container; loopback here
        processes = [*workers, *apis]
        try:
            try:
                await start(processes, workers, apis)
            except AssertionError as exc:
                logs = "\n".join(
                    f"--- {p.log.name}\n{p.log.read_text()[-3000:]}" for p in processes
                )
                raise AssertionError(f"{exc}\n{logs}") from exc
            yield Stack(workers, apis, env, smtp)
        finally:
            for process in processes:
                process.terminate()  # all at once: each takes a moment to shut down
            for process in processes:
                process.stop()


async def start(processes: list[Process], workers: list[Process], apis: list[Process]) -> None:
    """Start every process and wait until the workers poll and the APIs answer."""
    for process in processes:
        process.start()
    await eventually(
        lambda: all("worker polling task queue" in w.output() for w in workers),
        "both workers polling",
        timeout=60,
    )
    async with httpx.AsyncClient(timeout=2) as http:
        for api in apis:

            async def healthy(api: Process = api) -> bool:
                api.output()  # still running
                try:
                    answer = await http.get(f"{base(api)}/healthz")
                except httpx.HTTPError:
                    return False
                return answer.status_code == 200

            await eventually(healthy, f"{api.log.name} healthy", timeout=60)


def base(api: Process) -> str:
    return f"http://127.0.0.1:{api.env['KAERU_API_PORT']}"


async def order(http: httpx.AsyncClient, api: Process, customer: str, order_id: str) -> None:
    """The shop's server tells one API process of a customer and their order."""
    batch = {
        "batch": [
            {
                "type": "identify",
                "userId": customer,
                "traits": {"email": f"{customer}@example.com"},
                "messageId": f"id-{order_id}",
            },
            {
                "type": "track",
                "userId": customer,
                "event": "Order Completed",
                "properties": {
                    "order_id": order_id,
                    "total": 18.0,
                    "currency": "USD",
                    "products": [{"product_id": "mug", "name": "Mug", "price": 18.0}],
                },
                "messageId": f"oc-{order_id}",
            },
        ]
    }
    answer = await http.post(f"{base(api)}/v1/batch", json=batch, auth=(WRITE_KEY, ""))
    assert answer.status_code == 200, answer.text
    assert answer.json().get("rejected", []) == [], answer.text


async def journey_started(env: WorkflowEnvironment, customer: str) -> bool:
    handle = env.client.get_workflow_handle(f"order-confirmation-{customer}")
    try:
        description = await handle.describe()
    except Exception:  # not started yet (NOT_FOUND)
        return False
    return description.status in (
        WorkflowExecutionStatus.RUNNING,
        WorkflowExecutionStatus.COMPLETED,
    )


def delivered_to(smtp: SMTPTestServer) -> list[str]:
    return sorted(str(m.message["To"]) for m in smtp.messages)


async def test_two_workers_and_two_apis_share_the_work(
    dev_server_env: WorkflowEnvironment, stack: Stack
) -> None:
    customers = [f"s-{uuid.uuid4().hex[:8]}" for _ in stack.apis]
    async with httpx.AsyncClient(timeout=10) as http:
        for api, customer in zip(stack.apis, customers, strict=True):
            await order(http, api, customer, f"T-{customer}")
        for customer in customers:
            await eventually(
                partial(journey_started, dev_server_env, customer), f"journey of {customer}"
            )
        expected = sorted(f"{c}@example.com" for c in customers)
        await eventually(lambda: delivered_to(stack.smtp) == expected, "both emails", timeout=30)

        # One worker dies for good; the other carries on with what comes next.
        stack.workers[0].kill()
        later = f"s-{uuid.uuid4().hex[:8]}"
        await order(http, stack.apis[1], later, f"T-{later}")
        expected = sorted([*expected, f"{later}@example.com"])
        await eventually(
            lambda: delivered_to(stack.smtp) == expected, "the email after the kill", timeout=30
        )
    assert stack.workers[1].popen is not None and stack.workers[1].popen.poll() is None
    await asyncio.sleep(0.5)  # nothing more may come: each order, one email
    assert delivered_to(stack.smtp) == expected
