"""Ingestion throughput against the ceiling of the stack it feeds.

Baseline (measured in the same run, on the same dev server, with the same worker running):
the raw rate at which this machine's Temporal dev server accepts signal-with-start calls that
start cart journeys. Measured: kaeru's API answering Segment ``track`` calls (single and
batched) over real HTTP, and the time until its router has delivered every stored event to
its journey.

As in production, the worker (``python -m kaeru worker``) and the API with its router
(``python -m kaeru api``) run in their own processes, configured by ``KAERU_*`` variables;
this process only drives the load, with a lean HTTP client (:class:`Poster`). In one process
with httpx, the API shared one GIL with the load generator (about 3 ms of CPU per request)
and the worker (a sandboxed import per new journey), and the bench measured those. Before
each phase the bench waits until the worker has caught up with the journeys started so far,
so no phase pays for the previous one's.

Prints ratios to the baseline, never absolute verdicts: the machines are shared and noisy;
``--rounds 3`` repeats everything and prints the median ratio (each to its round's baseline).

    .venv/bin/python bench/ingest.py [--events 1000] [--concurrency 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
from temporalio.client import Client
from temporalio.common import TypedSearchAttributes
from temporalio.testing import WorkflowEnvironment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kaeru.db import migrate  # noqa: E402
from kaeru.settings import Settings  # noqa: E402
from starter.router import unrouted_count  # noqa: E402
from workflows.cart_abandonment import CartAbandonment, CartJourneyInput  # noqa: E402
from workflows.kit import EVENT_SIGNAL, SEARCH_ATTRIBUTES, Journey, JourneyEvent  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def bounded(n: int, concurrency: int, call: Callable[[int], Awaitable[None]]) -> float:
    """Run ``call(i)`` for i < n with ``concurrency`` in flight; return the seconds taken."""
    queue = iter(range(n))

    async def lane() -> None:
        for i in queue:
            await call(i)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return time.perf_counter() - started


class Poster:
    """POSTs JSON over a pool of keep-alive HTTP/1.1 connections, at little CPU cost.

    The load generator shares the machine's cores with what it measures. httpx spends about
    3 ms of CPU per request (as much as the API it calls); this spends a tenth of that, so the
    API is not starved by its own client while the baseline's client is cheap (the Temporal
    SDK's core is Rust).
    """

    def __init__(self, port: int, auth: str) -> None:
        self.port = port
        token = base64.b64encode(f"{auth}:".encode()).decode()
        self.head = (
            f"Host: 127.0.0.1:{port}\r\nAuthorization: Basic {token}\r\n"
            "Content-Type: application/json\r\n"
        )
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.all: list[asyncio.StreamWriter] = []

    async def post(self, path: str, body: object) -> None:
        """POST ``body`` as JSON; raises unless the answer is 200."""
        data = json.dumps(body).encode()
        request = (
            f"POST {path} HTTP/1.1\r\n{self.head}Content-Length: {len(data)}\r\n\r\n"
        ).encode() + data
        # uvicorn closes a connection idle for 5 s: never reuse one idle for long.
        while self.idle and self.idle[-1][2] < time.monotonic() - 2:
            self.idle.pop()[1].close()
        if self.idle:
            reader, writer, _ = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.all.append(writer)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        answer = await reader.readexactly(length)
        self.idle.append((reader, writer, time.monotonic()))
        if status != 200:
            raise RuntimeError(f"POST {path}: HTTP {status}: {answer[:200]!r}")

    async def close(self) -> None:
        for writer in self.all:
            writer.close()
        self.idle.clear()


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


@contextmanager
def kaeru_process(
    command: str, env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m kaeru <command>`` with ``env``; stopped (SIGTERM, then SIGKILL) on exit."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "kaeru", command],
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            cwd=log.parent,  # no stray .env from the caller's directory
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def wait_until_serving(http: httpx.AsyncClient, process: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if process.poll() is not None:
            raise RuntimeError(f"the API exited with status {process.returncode}; see its log")
        try:
            if (await http.get("/healthz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError("the API did not answer /healthz within 30s")


def cpu_seconds(pid: int) -> float | None:
    """CPU time ``pid`` has used so far (Linux ``/proc``); None where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def settle(worker: subprocess.Popen[bytes], limit: float = 120.0) -> None:
    """Wait until the worker has caught up with the journeys started so far (its CPU is idle).

    A journey's first workflow task runs after its signal-with-start returned: without this,
    one phase's journeys would be executed (on the same two cores) during the next phase.
    """
    deadline = time.monotonic() + limit
    quiet = 0
    used = cpu_seconds(worker.pid)
    while used is not None and quiet < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = cpu_seconds(worker.pid)
        if now is None:
            return
        quiet = quiet + 1 if now - used < 0.05 else 0  # under 10% of a core for 1.5 s
        used = now


async def drained(settings: Settings) -> None:
    while await asyncio.to_thread(unrouted_count, settings):
        await asyncio.sleep(0.02)


#: ``kaeru api`` refuses write keys shorter than 16 characters.
BENCH_KEY = "bench-write-key-0123456789"

PER_BATCH = 100
ROWS = (
    "raw signal-with-start (baseline)",
    "API /v1/track: answered",
    "API /v1/track: routed to journeys",
    f"API /v1/batch ({PER_BATCH}/batch): answered",
    f"API /v1/batch ({PER_BATCH}/batch): routed",
)


async def one_round(
    client: Client,
    poster: Poster,
    settings: Settings,
    worker: subprocess.Popen[bytes],
    n: int,
    concurrency: int,
) -> list[float]:
    """The baseline, then single events, then batches; events per second of each row."""
    await settle(worker)
    baseline = await raw_signal_with_start(client, "bench", n, concurrency)
    await settle(worker)

    run = uuid.uuid4().hex[:6]

    async def track(i: int) -> None:
        await poster.post(
            "/v1/track",
            {
                "userId": f"api-{run}-{i}",
                "event": "Product Added",
                "messageId": f"{run}-{i}",
                "properties": {"product_id": "p1", "price": 9.5},
            },
        )

    started = time.perf_counter()
    accepted = await bounded(n, concurrency, track)
    await drained(settings)
    routed = time.perf_counter() - started
    await settle(worker)

    async def batch(b: int) -> None:
        await poster.post(
            "/v1/batch",
            {
                "batch": [
                    {
                        "type": "track",
                        "userId": f"batch-{run}-{b}-{i}",
                        "event": "Product Added",
                        "messageId": f"{run}-{b}-{i}",
                        "properties": {"product_id": "p1"},
                    }
                    for i in range(PER_BATCH)
                ]
            },
        )

    started = time.perf_counter()
    batches = max(n // PER_BATCH, 1)
    batch_accepted = await bounded(batches, 4, batch)
    await drained(settings)
    batch_routed = time.perf_counter() - started
    sent = batches * PER_BATCH
    return [n / baseline, n / accepted, n / routed, sent / batch_accepted, sent / batch_routed]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat baseline and API runs; print medians"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = parser.parse_args()
    n, concurrency = args.events, args.concurrency
    work = Path(tempfile.mkdtemp(prefix="kaeru-bench-"))
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=shutil.which("temporal", path=str(Path(sys.executable).parent)),
        search_attributes=list(SEARCH_ATTRIBUTES),
    )
    port = free_port()
    database_url = f"sqlite:///{work / 'kaeru.db'}"
    kaeru_env = {
        "KAERU_TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
        "KAERU_DATABASE_URL": database_url,
        "KAERU_WRITE_KEY": BENCH_KEY,
        "KAERU_SECRET_KEY": "bench-0123456789abcdef-0123456789abcdef",
        "KAERU_TASK_QUEUE": "bench",
        "KAERU_SMTP_HOST": "127.0.0.1",
        "KAERU_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "KAERU_API_HOST": "127.0.0.1",
        "KAERU_API_PORT": str(port),
        # The bench measures the stack's ceiling, not the front door's rate limits.
        "KAERU_RATE_LIMIT_KEY_PER_SECOND": "0",
        "KAERU_RATE_LIMIT_CLIENT_PER_SECOND": "0",
    }
    settings = Settings(_env_file=None, database_url=database_url)
    migrate(database_url)  # before two processes race to do it
    poster = Poster(port, BENCH_KEY)
    rounds: list[list[float]] = []
    try:
        with (
            kaeru_process("worker", kaeru_env, work / "worker.log") as worker,
            kaeru_process("api", kaeru_env, work / "api.log") as api,
        ):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                await wait_until_serving(http, api)
            for _ in range(args.rounds):
                rounds.append(await one_round(env.client, poster, settings, worker, n, concurrency))
    finally:
        await poster.close()
        await env.shutdown()
        if args.keep:
            print(f"work directory (database, logs): {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    # Each round's rows against that round's baseline; the median round of each row.
    rates = [statistics.median(r[i] for r in rounds) for i in range(len(ROWS))]
    ratios = [statistics.median(r[i] / r[0] for r in rounds) for i in range(len(ROWS))]
    spread = args.rounds > 1
    print(f"{n} events, concurrency {concurrency}, dev server in memory, SQLite")
    print("worker, API (with its router) and load generator in separate processes")
    if spread:
        print(f"median of {args.rounds} rounds; each ratio is to its own round's baseline")
    print(f"{'path':44} {'events/s':>10} {'× baseline':>11}" + ("  (min–max)" if spread else ""))
    for name, value, ratio, i in zip(ROWS, rates, ratios, range(len(ROWS)), strict=True):
        bar = "█" * max(1, round(20 * value / max(rates)))
        low = min(r[i] / r[0] for r in rounds)
        high = max(r[i] / r[0] for r in rounds)
        extra = f"  ({low:.2f}–{high:.2f})" if spread else ""
        print(f"{name:44} {value:10.0f} {ratio:10.2f}×{extra}  {bar}")


if __name__ == "__main__":
    asyncio.run(main())
