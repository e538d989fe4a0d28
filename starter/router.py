"""The event router: reads the outbox (``events``) in ``seq`` order and signals the journeys.

Ingestion stores first and answers; this task delivers a moment later. The rules:

* One router routes at a time per deployment: it holds the ``router`` lease, renews it every
  few seconds, and another API process takes over when it lapses. Expiry is judged by the
  database's clock, never by comparing two hosts' clocks. Every takeover increases the lease's
  fencing token, and every write of the router (marks, failures, parking) checks its token in
  the same transaction: a router that lost the lease (paused, partitioned) has its next write
  refused and stops delivering.
* Each customer's events go out strictly in ``seq`` order. If one fails (a bad start), that
  customer waits with backoff, kept in ``customer_routing`` so the fetch skips the customer in
  SQL however many customers wait; its later events wait too, because an ``Order Completed``
  that overtook its ``Product Added`` would find no journey. Customers are routed concurrently.
* An event that fails ``KAERU_ROUTE_MAX_ATTEMPTS`` times, or that Temporal refuses in a way no
  retry can fix (``INVALID_ARGUMENT``), is parked: it leaves the ordered stream, the customer's
  later events flow, and an operator retries or drops it (admin API, ``kaeru events``).
* Temporal unreachable or rate limiting the namespace pauses all routing, and counts against
  no event.
* Each event is marked routed right after its own signal, in one write with the customer's
  ``last_routed_seq`` (marks of concurrent customers share a transaction). A crash or a lost
  lease re-sends at most the one signal per customer that was in flight, which a live journey
  ignores (it keeps the last ``seq`` it saw).
* A journey is never started by a cart event the customer's stored orders already answer (an
  order completed at or after it) nor by one older than ``KAERU_MAX_START_EVENT_AGE``; such an
  event still reaches a live journey and is marked with the reason (``route_note``).
* No database transaction is held across a Temporal call.
* New journeys show the customer's visible id (``KAERU_PSEUDONYMOUS_IDS``, kaeru/pseudonyms.py)
  in their workflow id, search attributes, memo and summary; their input keeps the clear id.
  A customer whose id is pseudonymised may still have a journey that started under the clear
  id: an event that starts a journey goes to that one if a describe finds it running (else
  it starts one under the pseudonym), and an event for a live journey tries the new id, then
  (one describe) the clear one. Ids that stay clear cost nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from opentelemetry.trace import SpanKind
from sqlalchemy import bindparam, case, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import TypedSearchAttributes, WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from kaeru.db import session as db_session
from kaeru.db import write_session
from kaeru.journeys import Delivery, deliveries
from kaeru.models import CustomerRouting, Event, Lease, Order, utcnow
from kaeru.pseudonyms import VisibleIds, read_visible_ids
from kaeru.settings import Settings
from kaeru.telemetry import NO_TELEMETRY, Telemetry, context_of
from kaeru.temporal import connect
from starter.events import journey_properties
from starter.metrics import ApiMetrics
from starter.outbox import TRACE_NOTE
from workflows.kit import EVENT_SIGNAL, Journey, JourneyEvent

log = logging.getLogger("kaeru.router")

LEASE_NAME = "router"
_EVENTS = Event.__table__  # type: ignore[attr-defined]
_LEASES = Lease.__table__  # type: ignore[attr-defined]
_ROUTING = CustomerRouting.__table__  # type: ignore[attr-defined]
_ORDERS = Order.__table__  # type: ignore[attr-defined]

#: Refusals that retrying the same event can never fix: the event is parked at once.
PERMANENT = frozenset({RPCStatusCode.INVALID_ARGUMENT})
#: Temporal itself is down, too slow or rate limiting the namespace (not a problem of one
#: journey): all routing pauses, and no event's attempts are counted.
TEMPORAL_BUSY = frozenset(
    {
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.RESOURCE_EXHAUSTED,
    }
)


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    customer_id: str
    type: str
    name: str | None
    message_id: str
    timestamp: datetime
    payload: dict[str, Any]
    route_attempts: int
    #: An operator sent it back from the parking lot (it may be older than routed events).
    retried: bool = False
    #: The customer's failed deliveries in a row (the backoff).
    customer_failures: int = 0
    #: The newest ``seq`` delivered to this customer's journeys.
    last_routed_seq: int = 0
    #: When the customer's newest stored order completed (None: no order).
    ordered_at: datetime | None = None
    #: When ingestion stored it (the routing lag is measured from here).
    received_at: datetime | None = None

    def journey_event(self) -> JourneyEvent:
        return JourneyEvent(
            seq=self.seq,
            name=self.name or self.type,
            message_id=self.message_id,
            occurred_at=self.timestamp,
            properties=journey_properties(self.type, self.payload),
        )


@dataclass(frozen=True)
class Fence:
    """Who writes, and with which fencing token of the router lease."""

    holder: str
    token: int


class FencedOut(Exception):
    """The router lease changed hands: this router's write was refused."""


@dataclass(frozen=True)
class Mark:
    """One delivered event to mark routed (``note``: why it was not a plain delivery)."""

    seq: int
    customer_id: str
    note: str | None = None


# ---- the outbox, in the database (blocking: call from a thread) ------------------------------

_ROUTABLE = (_EVENTS.c.routed_at.is_(None), _EVENTS.c.parked_at.is_(None))
_PARKED = (_EVENTS.c.parked_at.is_not(None), _EVENTS.c.dropped_at.is_(None))
_NEWEST_ORDERS = (
    select(_ORDERS.c.customer_id, func.max(_ORDERS.c.completed_at))
    .where(_ORDERS.c.customer_id.in_(bindparam("ids", expanding=True)))
    .group_by(_ORDERS.c.customer_id)
)


def fetch_unrouted(url: str, limit: int, now: datetime | None = None) -> list[StoredEvent]:
    """The oldest routable events, in ``seq`` order.

    Parked events and the events of customers in backoff (``customer_routing.retry_at`` after
    ``now``) are skipped in SQL, so a full batch is always one the router can work on.
    """
    now = now or utcnow()
    routing = _ROUTING.c
    query = (
        select(
            _EVENTS.c.seq,
            _EVENTS.c.customer_id,
            _EVENTS.c.type,
            _EVENTS.c.name,
            _EVENTS.c.message_id,
            _EVENTS.c.timestamp,
            _EVENTS.c.payload,
            _EVENTS.c.route_attempts,
            _EVENTS.c.retried_at,
            func.coalesce(routing.failures, 0),
            func.coalesce(routing.last_routed_seq, 0),
            _EVENTS.c.received_at,
        )
        .select_from(_EVENTS.outerjoin(_ROUTING, routing.customer_id == _EVENTS.c.customer_id))
        .where(*_ROUTABLE)
        .where(or_(routing.retry_at.is_(None), routing.retry_at <= now))
        .order_by(_EVENTS.c.seq)
        .limit(limit)
    )
    with db_session(url) as s:
        rows = s.execute(query).all()
        customers = sorted({row[1] for row in rows})
        ordered: dict[str, datetime] = {}
        for start in range(0, len(customers), 500):
            chunk = customers[start : start + 500]
            ordered.update(
                (c, at) for c, at in s.execute(_NEWEST_ORDERS, {"ids": chunk}) if at is not None
            )
    return [
        StoredEvent(
            seq=row[0],
            customer_id=row[1],
            type=row[2],
            name=row[3],
            message_id=row[4],
            timestamp=row[5],
            payload=row[6],
            route_attempts=row[7],
            retried=row[8] is not None,
            customer_failures=int(row[9]),
            last_routed_seq=int(row[10]),
            ordered_at=ordered.get(row[1]),
            received_at=row[11],
        )
        for row in rows
    ]


def _check_fence(session: Session, fence: Fence) -> None:
    """Refuse the transaction unless ``fence`` still holds the lease.

    On PostgreSQL the lease row stays locked until the commit, so a takeover waits for this
    write and every write after the takeover sees the new token. SQLite has one writer.
    """
    row = session.execute(
        select(_LEASES.c.token)
        .where(_LEASES.c.name == LEASE_NAME, _LEASES.c.holder == fence.holder)
        .with_for_update()
    ).first()
    if row is None or int(row[0]) != fence.token:
        raise FencedOut(
            f"router {fence.holder} no longer holds the lease (token {fence.token}); "
            "another router took over"
        )


def _upsert(session: Session) -> Any:
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(_ROUTING)


_MARK_EVENT = (
    update(_EVENTS)
    .where(_EVENTS.c.seq == bindparam("b_seq"), _EVENTS.c.routed_at.is_(None))
    .values(routed_at=bindparam("b_now"), route_note=bindparam("b_note"))
)


def mark_routed(url: str, fence: Fence, marks: Sequence[Mark]) -> None:
    """Mark ``marks`` routed and advance their customers' ``last_routed_seq``, in one write.

    Raises:
        FencedOut: ``fence`` lost the lease; nothing was written.
    """
    if not marks:
        return
    now = utcnow()
    newest: dict[str, int] = {}
    for mark in marks:
        newest[mark.customer_id] = max(newest.get(mark.customer_id, 0), mark.seq)
    with write_session(url) as s:
        _check_fence(s, fence)
        s.execute(
            _MARK_EVENT,
            [{"b_seq": m.seq, "b_now": now, "b_note": m.note} for m in marks],
        )
        upsert = _upsert(s)
        statement = upsert.on_conflict_do_update(
            index_elements=["customer_id"],
            set_={
                "last_routed_seq": case(
                    (
                        upsert.excluded.last_routed_seq > _ROUTING.c.last_routed_seq,
                        upsert.excluded.last_routed_seq,
                    ),
                    else_=_ROUTING.c.last_routed_seq,
                ),
                "failures": 0,
                "retry_at": None,
            },
        )
        s.execute(
            statement,
            [
                {"customer_id": c, "last_routed_seq": seq, "failures": 0, "retry_at": None}
                for c, seq in sorted(newest.items())
            ],
        )


def record_failure(
    url: str,
    fence: Fence,
    event: StoredEvent,
    error: str,
    *,
    park: bool,
    retry_at: datetime | None,
) -> None:
    """Count a failed delivery of ``event``; park it, or put its customer in backoff.

    Raises:
        FencedOut: ``fence`` lost the lease; nothing was written.
    """
    now = utcnow()
    values: dict[str, Any] = {
        "route_attempts": event.route_attempts + 1,
        "route_error": error[:2000],
    }
    if park:
        values.update(parked_at=now, park_reason=error[:2000])
    with write_session(url) as s:
        _check_fence(s, fence)
        s.execute(update(_EVENTS).where(_EVENTS.c.seq == event.seq, *_ROUTABLE).values(**values))
        failures = 0 if park else event.customer_failures + 1
        upsert = _upsert(s)
        s.execute(
            upsert.values(
                customer_id=event.customer_id,
                last_routed_seq=0,
                failures=failures,
                retry_at=None if park else retry_at,
            ).on_conflict_do_update(
                index_elements=["customer_id"],
                set_={"failures": upsert.excluded.failures, "retry_at": upsert.excluded.retry_at},
            )
        )


def unrouted_count(settings: Settings) -> int:
    """How many stored events still wait for the router (parked ones do not)."""
    with db_session(settings.resolved_database_url) as s:
        return int(
            s.execute(select(func.count()).select_from(_EVENTS).where(*_ROUTABLE)).scalar_one()
        )


@dataclass(frozen=True)
class OutboxStats:
    unrouted: int
    oldest_unrouted_age_seconds: float | None
    failing: int
    oldest_failure: dict[str, Any] | None
    parked: int = 0
    oldest_parked_age_seconds: float | None = None


def outbox_stats(settings: Settings) -> OutboxStats:
    """What an operator needs to see whether routing keeps up, and why it does not."""
    with db_session(settings.resolved_database_url) as s:
        count, oldest = s.execute(
            select(func.count(), func.min(_EVENTS.c.received_at)).where(*_ROUTABLE)
        ).one()
        failing = s.execute(
            select(func.count()).where(*_ROUTABLE, _EVENTS.c.route_error.is_not(None))
        ).scalar_one()
        failure = s.execute(
            select(
                _EVENTS.c.seq,
                _EVENTS.c.customer_id,
                _EVENTS.c.name,
                _EVENTS.c.route_attempts,
                _EVENTS.c.route_error,
            )
            .where(*_ROUTABLE, _EVENTS.c.route_error.is_not(None))
            .order_by(_EVENTS.c.seq)
            .limit(1)
        ).first()
        parked, oldest_parked = s.execute(
            select(func.count(), func.min(_EVENTS.c.parked_at)).where(*_PARKED)
        ).one()
    now = utcnow()
    return OutboxStats(
        unrouted=int(count),
        oldest_unrouted_age_seconds=(now - oldest).total_seconds() if oldest else None,
        failing=int(failing),
        oldest_failure=dict(failure._mapping) if failure is not None else None,
        parked=int(parked),
        oldest_parked_age_seconds=(now - oldest_parked).total_seconds() if oldest_parked else None,
    )


# ---- the lease ---------------------------------------------------------------------------------


def _database_now(session: Session) -> datetime:
    """The database's clock, so hosts whose clocks disagree still agree on expiry.

    SQLite has no server: every process using the file runs on one host, with one clock.
    """
    if session.get_bind().dialect.name == "postgresql":
        now: datetime = session.execute(text("SELECT clock_timestamp()")).scalar_one()
        return now.astimezone(UTC)
    return utcnow()


def acquire_lease(url: str, holder: str, ttl: float, name: str = LEASE_NAME) -> int | None:
    """Take or renew the lease ``name`` for ``ttl`` seconds of the database's clock.

    Returns:
        The fencing token (increased whenever the holder changes), or None if someone else
        holds the lease.
    """
    with write_session(url) as s:
        now = _database_now(s)
        expires = now + timedelta(seconds=ttl)
        taken = s.execute(
            update(_LEASES)
            .where(_LEASES.c.name == name)
            .where((_LEASES.c.holder == holder) | (_LEASES.c.expires_at < now))
            .values(
                holder=holder,
                expires_at=expires,
                token=case(
                    (_LEASES.c.holder == holder, _LEASES.c.token), else_=_LEASES.c.token + 1
                ),
            )
            .returning(_LEASES.c.token)
        ).first()
        if taken is not None:
            return int(taken[0])
        if s.execute(select(_LEASES.c.name).where(_LEASES.c.name == name)).first() is not None:
            return None
    try:  # first use: nobody has ever held it
        with write_session(url) as s:
            expires = _database_now(s) + timedelta(seconds=ttl)
            s.add(Lease(name=name, holder=holder, expires_at=expires, token=1))
    except IntegrityError:
        return None
    return 1


def release_lease(url: str, holder: str, name: str = LEASE_NAME) -> None:
    """Give the lease up at once (on shutdown), so another process need not wait for expiry."""
    with write_session(url) as s:
        s.execute(
            update(_LEASES)
            .where(_LEASES.c.name == name, _LEASES.c.holder == holder)
            .values(expires_at=_database_now(s) - timedelta(seconds=1))
        )


def lease_holder(url: str, name: str = LEASE_NAME) -> tuple[str, datetime] | None:
    with db_session(url) as s:
        row = s.execute(
            select(_LEASES.c.holder, _LEASES.c.expires_at).where(_LEASES.c.name == name)
        ).first()
    return (row[0], row[1]) if row is not None else None


# ---- the router --------------------------------------------------------------------------------


class _Stopped(Exception):
    """This router may not deliver now (lease lost, fenced out, or routing paused)."""


def _status(exc: BaseException) -> RPCStatusCode | None:
    return exc.status if isinstance(exc, RPCError) else None


class _Marks:
    """Marks delivered events routed, the marks of concurrent customers in one transaction.

    Each customer waits for its mark before its next signal, so no more than the one signal in
    flight per customer is ever unmarked.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._pending: list[tuple[Mark, Fence, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def mark(self, mark: Mark, fence: Fence) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((mark, fence, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="kaeru-router-marks")
        await future

    async def _write(self) -> None:
        while self._pending:
            fence = self._pending[0][1]
            group = [p for p in self._pending if p[1] == fence]
            self._pending = [p for p in self._pending if p[1] != fence]
            try:
                await asyncio.to_thread(mark_routed, self._url, fence, [m for m, _, _ in group])
            except BaseException as exc:
                for _, _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                for _, _, future in group:
                    if not future.done():
                        future.set_result(None)


class Router:
    """Routes the outbox to Temporal while it holds the lease. One per API process.

    Args:
        settings: the deployment's settings (database, task queue, journey settings).
        client: a connected Temporal client; None connects with :func:`kaeru.temporal.connect`
            in the background (retrying), so the API stores events while Temporal is down.
        lease_ttl: seconds a lease lasts without renewal (a crashed router's takeover time).
        poll_interval: seconds between looks at the outbox when nothing wakes the router.
        batch_size: events read per round.
        concurrency: customers routed at once.
        rpc_timeout: seconds one Temporal call may take.
        retry_base / retry_max: backoff of a failing customer (and of a pause of all routing),
            doubling from base up to max.
    """

    def __init__(
        self,
        settings: Settings,
        client: Client | None = None,
        *,
        lease_ttl: float = 15.0,
        poll_interval: float = 0.5,
        batch_size: int = 500,
        concurrency: int = 32,
        rpc_timeout: float = 10.0,
        retry_base: float = 0.5,
        retry_max: float = 30.0,
        telemetry: Telemetry = NO_TELEMETRY,
        metrics: ApiMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry
        #: The API process's metrics (deliveries, failures, parked, the routing lag).
        self.metrics = metrics or ApiMetrics()
        self.client = telemetry.traced_client(client) if client is not None else None
        self.lease_ttl = lease_ttl
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.rpc_timeout = timedelta(seconds=rpc_timeout)
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        #: The newest routing problem (None after a clean round): shown by /v1/admin/outbox.
        self.last_error: str | None = None
        self.routed_total = 0
        self._url = settings.resolved_database_url
        self._wake = asyncio.Event()
        self._lease_until = 0.0
        self._fence: Fence | None = None
        self._pause_until = 0.0
        self._pauses = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._lease_call: asyncio.Future[int | None] | None = None
        self._marks = _Marks(self._url)
        self._ids: VisibleIds | None = None

    # ---- control ----

    @property
    def running(self) -> bool:
        return any(not task.done() for task in self._tasks)

    @property
    def holds_lease(self) -> bool:
        """True while this router's lease is safely unexpired (with a margin for clock drift)."""
        return (
            self._fence is not None
            and asyncio.get_running_loop().time() < self._lease_until - self.lease_ttl * 0.2
        )

    @property
    def paused(self) -> bool:
        """True while all routing waits (Temporal down or rate limiting)."""
        return asyncio.get_running_loop().time() < self._pause_until

    def wake(self) -> None:
        """Look at the outbox now (ingestion calls this after storing an event)."""
        self._wake.set()

    async def start(self) -> None:
        if self.running:
            return
        self._tasks = [
            asyncio.create_task(self._keep_lease(), name="kaeru-router-lease"),
            asyncio.create_task(self._run(), name="kaeru-router"),
        ]

    async def stop(self) -> None:
        """Stop routing and give up the lease. Events not yet routed stay in the outbox."""
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._lease_call is not None:
            # A renewal still running in its thread would take the lease back after release.
            await asyncio.gather(self._lease_call, return_exceptions=True)
        self._lease_until, self._fence = 0.0, None
        try:
            await asyncio.to_thread(release_lease, self._url, self.holder)
        except Exception as exc:  # the lease will simply expire
            log.warning("could not release the router lease (it will expire): %s", exc)

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until the outbox is empty (every stored event routed or parked).

        Raises:
            RuntimeError: this router is not running.
            TimeoutError: events are still unrouted after ``timeout`` seconds; the message
                gives the count and the last routing error.
        """
        if not self.running:
            raise RuntimeError("the router is not running: start it (create_app starts it)")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self.wake()
            left = await asyncio.to_thread(unrouted_count, self.settings)
            if left == 0:
                return
            if loop.time() > deadline:
                raise TimeoutError(
                    f"{left} event(s) still unrouted after {timeout}s; "
                    f"last routing error: {self.last_error or 'none'}"
                )
            await asyncio.sleep(0.05)

    async def acquire_lease(self) -> bool:
        """Take or renew the lease once (the background task does this every few seconds)."""
        loop = asyncio.get_running_loop()
        asked_at = loop.time()
        self._lease_call = asyncio.ensure_future(
            asyncio.to_thread(acquire_lease, self._url, self.holder, self.lease_ttl)
        )
        token = await asyncio.shield(self._lease_call)
        was_held = self.holds_lease
        if token is None:
            self._lease_until, self._fence = 0.0, None
        else:
            # asked_at is before the database read its clock: this router's view of the lease
            # ends before the database's does.
            self._lease_until = asked_at + self.lease_ttl
            self._fence = Fence(self.holder, token)
        if self.holds_lease and not was_held:
            log.info("router %s holds the lease (token %s) and routes events", self.holder, token)
            self.wake()
        elif was_held and not self.holds_lease:
            log.warning("router %s lost the lease; another process routes now", self.holder)
        return token is not None

    def _fenced_out(self, exc: FencedOut) -> None:
        if self._fence is not None:
            log.warning("%s: this router stops delivering", exc)
        self._lease_until, self._fence = 0.0, None
        self.last_error = str(exc)

    # ---- the loops ----

    async def _keep_lease(self) -> None:
        while True:
            try:
                await self.acquire_lease()
            except Exception as exc:
                log.warning("could not renew the router lease (database unreachable?): %s", exc)
            await asyncio.sleep(self.lease_ttl / 3)

    async def _run(self) -> None:
        more = False
        while True:
            if not more:
                await self._wait_for_wake()
            self._wake.clear()
            more = False
            if not self.holds_lease or self.paused:
                continue
            try:
                more = await self.route_once()
            except Exception as exc:  # the database is down, or a bug: show it, retry later
                if self._pauses == 0:
                    log.exception("routing round failed")
                self._pause(f"routing round failed: {type(exc).__name__}: {exc}")

    async def _wait_for_wake(self) -> None:
        """Sleep until woken or ``poll_interval`` passes.

        Not ``asyncio.wait_for``: on Python 3.11 it can swallow a cancellation that arrives as
        the wake-up does, and ``stop()`` would then wait for a loop that never ends.
        """
        waiter = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({waiter}, timeout=self.poll_interval)
        finally:
            waiter.cancel()

    async def _connected(self) -> Client | None:
        if self.client is None:
            try:
                self.client = self.telemetry.traced_client(await connect(self.settings))
            except RuntimeError as exc:
                self._pause(f"{exc}")
                return None
            log.info("router connected to Temporal")
            self._pauses, self.last_error = 0, None
        return self.client

    def _pause(self, reason: str) -> None:
        """Stop every route for a while: Temporal (or its connection) is down or busy."""
        self._pauses += 1
        delay = min(self.retry_base * 2 ** (self._pauses - 1), self.retry_max)
        self._pause_until = asyncio.get_running_loop().time() + delay
        self.last_error = reason
        log.warning("routing paused for %.1fs: %s", delay, reason)

    def _fence_now(self) -> Fence:
        """The fence to deliver under, or :class:`_Stopped` if this router may not deliver."""
        if not self.holds_lease or self.paused or self._fence is None:
            raise _Stopped
        return self._fence

    async def route_once(self) -> bool:
        """One round: route what the outbox holds, each customer in order.

        Returns:
            True if the round read a full batch (more may be waiting).
        """
        if not self.holds_lease or self.paused:
            return False
        client = await self._connected()
        if client is None:
            return False
        events = await asyncio.to_thread(fetch_unrouted, self._url, self.batch_size)
        by_customer: dict[str, list[StoredEvent]] = {}
        for event in events:
            by_customer.setdefault(event.customer_id, []).append(event)
        pauses = self._pauses
        routed = failed = 0
        limit = asyncio.Semaphore(self.concurrency)

        async def route_customer(queue: list[StoredEvent]) -> None:
            nonlocal routed, failed
            async with limit:
                for event in queue:
                    try:
                        fence = self._fence_now()
                        try:
                            with self._routing_span(event):
                                note = await self._deliver(client, event)
                                log.debug("routed event seq %d (%s)", event.seq, event.type)
                        except _Stopped:
                            raise
                        except Exception as exc:
                            failed += 1
                            await self._failed(event, exc, fence)
                            return
                        await self._marks.mark(Mark(event.seq, event.customer_id, note), fence)
                    except _Stopped:
                        return
                    except FencedOut as exc:
                        self._fenced_out(exc)
                        return
                    routed += 1
                    self.metrics.delivered(event.received_at)

        results = await asyncio.gather(
            *(route_customer(queue) for queue in by_customer.values()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                failed += 1
                log.error("routing a customer failed unexpectedly: %r", result)
                self.last_error = f"routing a customer failed: {result!r}"
        self.routed_total += routed
        if routed and self._pauses == pauses:
            self._pauses = 0
            if not failed and self.holds_lease:
                self.last_error = None
        return len(events) == self.batch_size

    @contextlib.contextmanager
    def _routing_span(self, event: StoredEvent) -> Iterator[None]:
        """A span ``route event``, child of the request that stored the event (the trace
        context ingestion kept under ``payload.kaeru.trace``): its signal-with-start and the
        journey's spans join the request's trace."""
        notes = event.payload.get("kaeru")
        parent = context_of(notes.get(TRACE_NOTE)) if isinstance(notes, dict) else None
        with self.telemetry.tracer.start_as_current_span(
            "route event",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes={
                "kaeru.event.seq": event.seq,
                "kaeru.event.type": event.type,
                "kaeru.event.name": event.name or event.type,
            },
        ):
            yield

    async def _failed(self, event: StoredEvent, exc: Exception, fence: Fence) -> None:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        # Seq and messageId find the event (and so the customer) in the outbox; the customer's
        # id itself stays out of this text, which goes to logs and /v1/admin/outbox.
        what = f"event seq {event.seq} ({event.name or event.type}, messageId {event.message_id})"
        status = _status(exc)
        failure = status.name.lower() if status is not None else "error"
        self.metrics.router_failures.labels(
            "temporal_busy" if status in TEMPORAL_BUSY else failure
        ).inc()
        if status in TEMPORAL_BUSY:
            if not self.paused:  # one pause for all the customers a busy Temporal refused
                self._pause(f"Temporal answered {status.name} routing {what}: {reason}")
            return
        attempts = event.route_attempts + 1
        park = status in PERMANENT or attempts >= self.settings.route_max_attempts
        failures = event.customer_failures + 1
        delay = min(self.retry_base * 2 ** (failures - 1), self.retry_max)
        await asyncio.to_thread(
            record_failure,
            self._url,
            fence,
            event,
            reason,
            park=park,
            retry_at=utcnow() + timedelta(seconds=delay),
        )
        if park:
            self.metrics.router_parked.labels(
                "refused" if status in PERMANENT else "max_attempts"
            ).inc()
            why = "a refusal no retry can fix" if status in PERMANENT else f"attempt {attempts}"
            self.last_error = f"parked {what} after {why}: {reason}"
            log.error(
                "%s; the customer's later events flow on. Retry it with `kaeru events retry "
                "%d` (or POST /v1/admin/parked/%d/retry) once fixed, or drop it",
                self.last_error,
                event.seq,
                event.seq,
            )
            return
        self.last_error = f"could not route {what}: {reason}"
        log.warning(
            "%s (attempt %d of %d; this customer's later events wait, retrying in %.1fs)",
            self.last_error,
            attempts,
            self.settings.route_max_attempts,
            delay,
        )

    def _no_start(self, event: StoredEvent, ends_on_purchase: bool = True) -> str | None:
        """Why ``event`` must not start a journey, or None if it may.

        A stored order at or after the event refuses only journeys a purchase ends: one an
        order starts (a confirmation) is started by that very order.
        """
        if (
            ends_on_purchase
            and event.ordered_at is not None
            and event.ordered_at >= event.timestamp
        ):
            return (
                f"no journey started: the customer completed an order at "
                f"{event.ordered_at:%Y-%m-%d %H:%M:%S} UTC, at or after this event "
                f"({event.timestamp:%Y-%m-%d %H:%M:%S} UTC)"
            )
        limit = self.settings.max_start_event_age
        if utcnow() - event.timestamp > limit:
            return (
                f"no journey started: the event happened at {event.timestamp:%Y-%m-%d %H:%M:%S} "
                f"UTC, longer ago than KAERU_MAX_START_EVENT_AGE ({limit})"
            )
        return None

    async def visible_ids(self) -> VisibleIds:
        """The pseudonym key (read once from the database) and ``KAERU_PSEUDONYMOUS_IDS``."""
        if self._ids is None:
            self._ids = await asyncio.to_thread(read_visible_ids, self.settings)
        return self._ids

    async def _deliver(self, client: Client, event: StoredEvent) -> str | None:
        """Send ``event`` to its journeys; returns the note to store with its mark."""
        if event.seq <= event.last_routed_seq and not event.retried:
            return f"not sent again: seq {event.last_routed_seq} was already routed"
        journey_event = event.journey_event()
        notes: list[str] = []
        ids = await self.visible_ids()
        # By the name journeys see it by (``identify`` for an identify), as ingestion asked.
        for target in deliveries(
            journey_event.name, event.customer_id, journey_event.properties, ids
        ):
            self._fence_now()
            journey = target.route.journey
            refused = self._no_start(event, journey.ends_on_purchase) if target.start else None
            if target.start and refused is None:
                # A journey started under the clear id before it was pseudonymised goes on.
                if not await self._signal_before(client, target, journey_event):
                    await self._signal_with_start(client, target, event, journey_event)
            elif not await self._signal(client, target.workflow_id, journey_event):
                await self._signal_before(client, target, journey_event)
            if refused is not None:
                notes.append(refused)
        return "; ".join(notes)[:500] if notes else None

    async def _signal_with_start(
        self, client: Client, target: Delivery, event: StoredEvent, journey_event: JourneyEvent
    ) -> None:
        route = target.route
        # What Temporal shows: the visible id (workflow ids are ``<kind>-<visible id>``); the
        # input keeps the clear id, which the codec encrypts when it is on.
        shown = target.workflow_id.removeprefix(f"{route.kind}-")
        await client.start_workflow(
            route.workflow_name,
            route.make_input(event.customer_id, self.settings),
            id=target.workflow_id,
            task_queue=self.settings.task_queue,
            # A journey that ended (purchase, no open...) may start again on a new cart.
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            search_attributes=TypedSearchAttributes(Journey.start_search_attributes(shown)),
            memo={"customer_id": shown, "journey": route.label},
            static_summary=f"{route.label} for {shown}",
            static_details=(
                f"{route.label} journey of customer `{shown}`, started by the event "
                f"router on `{event.name}` (seq {event.seq}, messageId `{event.message_id}`)."
            ),
            start_signal=EVENT_SIGNAL,
            start_signal_args=[journey_event],
            rpc_timeout=self.rpc_timeout,
        )

    async def _signal_before(
        self, client: Client, target: Delivery, journey_event: JourneyEvent
    ) -> bool:
        """Signal the journey running under ``target.before`` (the clear id of a customer
        whose id is now pseudonymised); False if there is none. One describe first: a signal
        would carry the event (encoded under the clear id's data key) for nothing."""
        if target.before is None:
            return False
        try:
            described = await client.get_workflow_handle(target.before).describe(
                rpc_timeout=self.rpc_timeout
            )
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            return False
        if described.status != WorkflowExecutionStatus.RUNNING:
            return False
        return await self._signal(client, target.before, journey_event)

    async def _signal(self, client: Client, workflow_id: str, journey_event: JourneyEvent) -> bool:
        """Signal the journey ``workflow_id``; False if none is running there."""
        handle = client.get_workflow_handle(workflow_id)
        try:
            await handle.signal(EVENT_SIGNAL, journey_event, rpc_timeout=self.rpc_timeout)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            # No live journey: an order or a late open after the journey ended is normal.
            log.debug("no live journey for event seq %d", journey_event.seq)
            return False
        return True
