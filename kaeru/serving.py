"""Serving kaeru's parts in one process: the API's ASGI server, listening sockets, one-line errors.

Production commands (``kaeru api``, ``kaeru migrate``) and the dev stack (``kaeru.dev``) both use
these; this module imports nothing from ``kaeru.dev``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Iterator
from typing import Any, Literal

import uvicorn
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from uvicorn.protocols.http.h11_impl import H11Protocol

from kaeru.db import migrate

#: The write key ``kaeru dev`` uses when ``KAERU_WRITE_KEY`` is unset. Never for production.
DEV_WRITE_KEY = "dev-write-key"


#: Seconds a connection's request line and headers may take to arrive (see AppServer).
HEADER_TIMEOUT = 10.0


class StackError(Exception):
    """An expected problem, told on one line: what is wrong and how to fix it."""


def listening_socket(host: str, port: int, *, what: str, fix: str) -> socket.socket:
    """A socket already listening on ``host:port``, or a :class:`StackError` saying ``fix``.

    Binding before anything starts turns "port in use" into one clear line instead of a
    half-started stack, and handing the socket to the server leaves no race in between.
    """
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise StackError(f"{what} cannot listen on {host}:{port} ({exc}): {fix}") from exc
    family, kind, proto, _, address = found[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        reason = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise StackError(f"{what} cannot listen on {host}:{port} ({reason}): {fix}") from exc
    sock.setblocking(False)
    return sock


def safe_url(url: str) -> str:
    """A database URL fit to print (password masked), or a :class:`StackError` if it is none.

    Raises:
        StackError: ``url`` is not a URL SQLAlchemy can use; the message says what to set.
    """
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except ArgumentError as exc:
        shown = url if "@" not in url else "(hidden: it holds a password)"
        raise StackError(
            f"KAERU_DATABASE_URL={shown} is not a database URL kaeru can use ({exc}): use "
            "postgresql://user:password@host/db, or unset it for SQLite in .kaeru/"
        ) from exc
    return parsed.render_as_string(hide_password=True)


def migrate_database(url: str) -> None:
    """Bring the schema up to date, or a :class:`StackError` naming ``KAERU_DATABASE_URL``."""
    label = safe_url(url)
    try:
        migrate(url)
    except OperationalError as exc:
        reason = " ".join(str(exc.orig).split())
        raise StackError(
            f"cannot open the database at {label} ({reason}): check KAERU_DATABASE_URL and "
            "that the database server is up"
        ) from exc


# ---- the Temporal dev server -----------------------------------------------------------------


class _UvicornWithoutSignals(uvicorn.Server):
    """uvicorn leaves signals alone: the stack stops each part itself, in order.

    (Stock uvicorn installs its own SIGINT/SIGTERM handlers and re-raises the signal after
    its graceful shutdown, so code after ``serve()`` may never run.)
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _HeadersByDeadline(H11Protocol):
    """uvicorn's HTTP/1.1, closing a connection whose request does not start in time.

    uvicorn waits for a request line and headers forever: a client that opens connections and
    dribbles header bytes (slowloris) holds each one until the process runs out of file
    descriptors. Here the request line and headers must arrive within ``header_timeout``
    seconds of the connection (or of the previous answer on it); request bodies have their
    own deadline (``KAERU_BODY_TIMEOUT``, :mod:`starter.limits`).
    """

    header_timeout: float = HEADER_TIMEOUT
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.header_timeout, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        answering = self.cycle is not None and not self.cycle.response_complete
        if not answering and not self.transport.is_closing():
            self.transport.close()


class AppServer:
    """One ASGI app served by uvicorn on an already-listening socket, as a task of this loop.

    A connection's request line and headers must arrive within ``header_timeout`` seconds.
    """

    def __init__(
        self,
        app: Any,
        sock: socket.socket,
        *,
        what: str,
        lifespan: Literal["on", "off"] = "on",
        header_timeout: float = HEADER_TIMEOUT,
    ) -> None:
        self.what = what
        self.sock = sock

        class Protocol(_HeadersByDeadline):
            pass

        Protocol.header_timeout = header_timeout
        config = uvicorn.Config(
            app,
            http=Protocol,
            lifespan=lifespan,
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
            # The client address is the connection's, or X-Forwarded-For's when
            # KAERU_TRUSTED_PROXIES names the proxy (starter.limits); uvicorn's own rule
            # would trust any process on 127.0.0.1.
            proxy_headers=False,
        )
        self._server = _UvicornWithoutSignals(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def task(self) -> asyncio.Task[None]:
        if self._task is None:
            raise RuntimeError(f"{self.what} was not started")
        return self._task

    async def start(self) -> None:
        """Serve, and return once the app's startup has finished and requests are answered."""
        self._task = asyncio.create_task(self._serve(), name=self.what)
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise StackError(f"{self.what} stopped while starting; see the log above")
            await asyncio.sleep(0.02)

    async def _serve(self) -> None:
        try:
            await self._server.serve(sockets=[self.sock])
        except SystemExit as exc:  # uvicorn exits when the app's startup (lifespan) fails
            raise StackError(
                f"{self.what} failed to start (code {exc.code}); the error is logged above"
            ) from None

    async def stop(self, timeout: float = 10.0) -> None:
        if self._task is None:
            self.sock.close()
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._server.force_exit = True
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        except Exception:
            pass  # its failure was already reported while it ran
        finally:
            self.sock.close()


# ---- the plan: what `kaeru dev` starts and how the rest is pointed at it -----------------------


def local_url(host: str, port: int) -> str:
    """The URL a person on this machine types to reach a server listening on ``host``."""
    if host in ("127.0.0.1", "0.0.0.0", "::", "::1", ""):
        host = "localhost"
    return f"http://{host}:{port}"
