"""Ingestion throughput against the ceiling of the stack it feeds.

Baseline (measured in the same run, on the same dev server): the raw rate at which this
machine's Temporal dev server accepts signal-with-start calls that start cart journeys.
Measured: kaeru's API answering Segment ``track`` calls (single and batched) over real HTTP,
and the time until its router has delivered every stored event to its journey.

Prints ratios to the baseline, never absolute verdicts: the machines are shared and noisy.

    .venv/bin/python bench/ingest.py [--events 1000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import uvicorn
from temporalio.client import Client
from temporalio.common import TypedSearchAttributes
from temporalio.testing import WorkflowEnvironment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kaeru.settings import Settings  # noqa: E402
from starter.app import create_app  # noqa: E402
from starter.router import unrouted_count  # noqa: E402
from worker import build_worker  # noqa: E402
from workflows.cart_abandonment import CartAbandonment, CartJourneyInput  # noqa: E402
from workflows.kit import SEARCH_ATTRIBUTES, EVENT_SIGNAL, Journey, JourneyEvent  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def bounded(n: int, concurrency: int, call: object) -> float:
    """Run ``call(i)`` for i < n with ``concurrency`` in flight; return the seconds taken."""
    queue = iter(range(n))

    async def lane() -> None:
        for i in queue:
            await call(i)  # type: ignore[operator]

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return time.perf_counter() - started


async def raw_signal_with_start(client: Client, queue: str, n: int, concurrency: int) -> float:
    run = uuid.uuid4().hex[:6]

    async def start(i: int) -> None:
        customer = f"raw-{run}-{i}"
        await client.start_workflow(
            CartAbandonment.run,
            CartJourneyInput(customer),
            id=f"{CartAbandonment.kind}-{customer}",
            task_queue=queue,
            start_signal=EVENT_SIGNAL,
            start_signal_args=[
                JourneyEvent(
                    1, "Product Added", uuid.uuid4().hex, datetime.now(UTC), {"product_id": "p1"}
                )
            ],
            search_attributes=TypedSearchAttributes(Journey.start_search_attributes(customer)),
        )

    return await bounded(n, concurrency, start)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    n, concurrency = args.events, args.concurrency
    work = Path(tempfile.mkdtemp(prefix="kaeru-bench-"))
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=shutil.which("temporal", path=str(Path(sys.executable).parent)),
        search_attributes=list(SEARCH_ATTRIBUTES),
    )
    port = free_port()
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=f"sqlite:///{work / 'kaeru.db'}",
        write_key="bench",
        secret_key="bench",
        task_queue="bench",
        smtp_host="127.0.0.1",
        public_url=f"http://127.0.0.1:{port}",
        api_port=port,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, env.client), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, auth=("bench", ""), timeout=60) as http:
        async with build_worker(env.client, settings, http):
            baseline = await raw_signal_with_start(env.client, "bench", n, concurrency)

            run = uuid.uuid4().hex[:6]

            async def track(i: int) -> None:
                answer = await http.post(
                    "/v1/track",
                    json={
                        "userId": f"api-{run}-{i}",
                        "event": "Product Added",
                        "messageId": f"{run}-{i}",
                        "properties": {"product_id": "p1", "price": 9.5},
                    },
                )
                answer.raise_for_status()

            started = time.perf_counter()
            accepted = await bounded(n, concurrency, track)
            while await asyncio.to_thread(unrouted_count, settings):
                await asyncio.sleep(0.05)
            routed = time.perf_counter() - started

            run = uuid.uuid4().hex[:6]
            per_batch = 100

            async def batch(b: int) -> None:
                answer = await http.post(
                    "/v1/batch",
                    json={
                        "batch": [
                            {
                                "type": "track",
                                "userId": f"batch-{run}-{b}-{i}",
                                "event": "Product Added",
                                "messageId": f"{run}-{b}-{i}",
                                "properties": {"product_id": "p1"},
                            }
                            for i in range(per_batch)
                        ]
                    },
                )
                answer.raise_for_status()

            started = time.perf_counter()
            batch_accepted = await bounded(max(n // per_batch, 1), 4, batch)
            while await asyncio.to_thread(unrouted_count, settings):
                await asyncio.sleep(0.05)
            batch_routed = time.perf_counter() - started
    server.should_exit = True
    await serving
    await env.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    rate = n / baseline
    rows = [
        ("raw signal-with-start (baseline)", n / baseline),
        ("API /v1/track: answered", n / accepted),
        ("API /v1/track: routed to journeys", n / routed),
        (f"API /v1/batch ({per_batch}/batch): answered", n / batch_accepted),
        (f"API /v1/batch ({per_batch}/batch): routed", n / batch_routed),
    ]
    print(f"{n} events, concurrency {concurrency}, dev server in memory, SQLite")
    print(f"{'path':44} {'events/s':>10} {'× baseline':>11}")
    for name, value in rows:
        bar = "█" * max(1, round(20 * value / max(v for _, v in rows)))
        print(f"{name:44} {value:10.0f} {value / rate:10.2f}×  {bar}")


if __name__ == "__main__":
    asyncio.run(main())
