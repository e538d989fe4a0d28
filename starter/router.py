"""The event router: reads the outbox (``events``) in ``seq`` order and signals the journeys.

Ingestion stores first and answers; this task delivers a moment later. The rules:

* One router routes at a time per deployment: it holds the ``router`` lease, renews it every
  few seconds, and another API process takes over when it lapses.
* Each customer's events go out strictly in ``seq`` order. If one fails (Temporal down, a bad
  start), that customer stops for this round and is retried with backoff; later events wait,
  because an ``Order Completed`` that overtook its ``Product Added`` would find no journey.
  Customers are routed concurrently.
* An event is marked routed after its signal succeeded. A crash in between re-sends the same
  ``seq``, which the journey ignores (it keeps the last ``seq`` it saw).
* No database transaction is held across a Temporal call.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from temporalio.client import Client
from temporalio.common import TypedSearchAttributes, WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from kaeru.db import session as db_session
from kaeru.db import write_session
from kaeru.models import Event, Lease, utcnow
from kaeru.settings import Settings
from kaeru.temporal import connect
from starter.events import journey_properties
from starter.routing import Delivery, deliveries
from workflows.kit import EVENT_SIGNAL, Journey, JourneyEvent

log = logging.getLogger("kaeru.router")

LEASE_NAME = "router"
_EVENTS = Event.__table__  # type: ignore[attr-defined]
_LEASES = Lease.__table__  # type: ignore[attr-defined]


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

    def journey_event(self) -> JourneyEvent:
        return JourneyEvent(
            seq=self.seq,
            name=self.name or self.type,
            message_id=self.message_id,
            occurred_at=self.timestamp,
            properties=journey_properties(self.type, self.payload),
        )


# ---- the outbox, in the database (blocking: call from a thread) ------------------------------


def fetch_unrouted(url: str, limit: int, exclude: Sequence[str] = ()) -> list[StoredEvent]:
    """The oldest unrouted events, in ``seq`` order, skipping customers in ``exclude``."""
    query = select(
        _EVENTS.c.seq,
        _EVENTS.c.customer_id,
        _EVENTS.c.type,
        _EVENTS.c.name,
        _EVENTS.c.message_id,
        _EVENTS.c.timestamp,
        _EVENTS.c.payload,
        _EVENTS.c.route_attempts,
    ).where(_EVENTS.c.routed_at.is_(None))
    if exclude:
        query = query.where(_EVENTS.c.customer_id.not_in(list(exclude)))
    with db_session(url) as s:
        rows = s.execute(query.order_by(_EVENTS.c.seq).limit(limit)).all()
    return [StoredEvent(*row) for row in rows]


def mark_routed(url: str, seqs: Sequence[int]) -> None:
    now = utcnow()
    with write_session(url) as s:
        for start in range(0, len(seqs), 500):
            s.execute(
                update(_EVENTS)
                .where(_EVENTS.c.seq.in_(list(seqs[start : start + 500])))
                .where(_EVENTS.c.routed_at.is_(None))
                .values(routed_at=now)
            )


def record_failure(url: str, seq: int, error: str) -> None:
    with write_session(url) as s:
        s.execute(
            update(_EVENTS)
            .where(_EVENTS.c.seq == seq)
            .values(route_attempts=_EVENTS.c.route_attempts + 1, route_error=error[:2000])
        )


def unrouted_count(settings: Settings) -> int:
    """How many stored events still wait for the router."""
    with db_session(settings.resolved_database_url) as s:
        return int(
            s.execute(
                select(func.count()).select_from(_EVENTS).where(_EVENTS.c.routed_at.is_(None))
            ).scalar_one()
        )


@dataclass(frozen=True)
class OutboxStats:
    unrouted: int
    oldest_unrouted_age_seconds: float | None
    failing: int
    oldest_failure: dict[str, Any] | None


def outbox_stats(settings: Settings) -> OutboxStats:
    """What an operator needs to see whether routing keeps up, and why it does not."""
    unrouted = _EVENTS.c.routed_at.is_(None)
    with db_session(settings.resolved_database_url) as s:
        count, oldest = s.execute(
            select(func.count(), func.min(_EVENTS.c.received_at)).where(unrouted)
        ).one()
        failing = s.execute(
            select(func.count()).where(unrouted, _EVENTS.c.route_error.is_not(None))
        ).scalar_one()
        failure = s.execute(
            select(
                _EVENTS.c.seq,
                _EVENTS.c.customer_id,
                _EVENTS.c.name,
                _EVENTS.c.route_attempts,
                _EVENTS.c.route_error,
            )
            .where(unrouted, _EVENTS.c.route_error.is_not(None))
            .order_by(_EVENTS.c.seq)
            .limit(1)
        ).first()
    age = (utcnow() - oldest).total_seconds() if oldest is not None else None
    return OutboxStats(
        unrouted=int(count),
        oldest_unrouted_age_seconds=age,
        failing=int(failing),
        oldest_failure=dict(failure._mapping) if failure is not None else None,
    )


# ---- the lease ---------------------------------------------------------------------------------


def acquire_lease(url: str, holder: str, ttl: float, name: str = LEASE_NAME) -> bool:
    """Take or renew the lease ``name`` for ``ttl`` seconds. False if someone else holds it."""
    now = utcnow()
    expires = now + timedelta(seconds=ttl)
    with write_session(url) as s:
        taken = s.execute(
            update(_LEASES)
            .where(_LEASES.c.name == name)
            .where((_LEASES.c.holder == holder) | (_LEASES.c.expires_at < now))
            .values(holder=holder, expires_at=expires)
        )
        if taken.rowcount == 1:  # type: ignore[attr-defined]
            return True
        if s.execute(select(_LEASES.c.name).where(_LEASES.c.name == name)).first() is not None:
            return False
    try:  # first use: nobody has ever held it
        with write_session(url) as s:
            s.add(Lease(name=name, holder=holder, expires_at=expires))
    except IntegrityError:
        return False
    return True


def release_lease(url: str, holder: str, name: str = LEASE_NAME) -> None:
    """Give the lease up at once (on shutdown), so another process need not wait for expiry."""
    with write_session(url) as s:
        s.execute(
            update(_LEASES)
            .where(_LEASES.c.name == name, _LEASES.c.holder == holder)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )


def lease_holder(url: str, name: str = LEASE_NAME) -> tuple[str, datetime] | None:
    with db_session(url) as s:
        row = s.execute(
            select(_LEASES.c.holder, _LEASES.c.expires_at).where(_LEASES.c.name == name)
        ).first()
    return (row[0], row[1]) if row is not None else None


# ---- the router --------------------------------------------------------------------------------


class _LeaseLost(Exception):
    pass


def _temporal_unreachable(exc: BaseException) -> bool:
    """Temporal itself is down or too slow (not a problem of one journey): pause all routing."""
    return isinstance(exc, RPCError) and exc.status in (
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
    )


@dataclass
class _Backoff:
    retry_at: float
    failures: int


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
        retry_base / retry_max: backoff of a failing customer, doubling from base up to max.
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
    ) -> None:
        self.settings = settings
        self.client = client
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
        self._backoff: dict[str, _Backoff] = {}
        self._pause_until = 0.0
        self._pauses = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._lease_call: asyncio.Future[bool] | None = None

    # ---- control ----

    @property
    def running(self) -> bool:
        return any(not task.done() for task in self._tasks)

    @property
    def holds_lease(self) -> bool:
        """True while this router's lease is safely unexpired (with a margin for clock skew)."""
        return asyncio.get_running_loop().time() < self._lease_until - self.lease_ttl * 0.2

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
        self._lease_until = 0.0
        try:
            await asyncio.to_thread(release_lease, self._url, self.holder)
        except Exception as exc:  # the lease will simply expire
            log.warning("could not release the router lease (it will expire): %s", exc)

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until the outbox is empty (every stored event routed).

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
        held = await asyncio.shield(self._lease_call)
        was_held = self.holds_lease
        self._lease_until = asked_at + self.lease_ttl if held else 0.0
        if held and not was_held:
            log.info("router %s holds the lease and routes events", self.holder)
            self.wake()
        elif was_held and not held:
            log.warning("router %s lost the lease; another process routes now", self.holder)
        return held

    # ---- the loops ----

    async def _keep_lease(self) -> None:
        while True:
            try:
                await self.acquire_lease()
            except Exception as exc:
                log.warning("could not renew the router lease (database unreachable?): %s", exc)
            await asyncio.sleep(self.lease_ttl / 3)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        more = False
        while True:
            if not more:
                await self._wait_for_wake()
            self._wake.clear()
            more = False
            if not self.holds_lease or loop.time() < self._pause_until:
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
                self.client = await connect(self.settings)
            except RuntimeError as exc:
                self._pause(f"{exc}")
                return None
            log.info("router connected to Temporal")
            self._pauses, self.last_error = 0, None
        return self.client

    def _pause(self, reason: str) -> None:
        """Stop every route for a while: Temporal (or its connection) is down."""
        self._pauses += 1
        delay = min(self.retry_base * 2 ** (self._pauses - 1), self.retry_max)
        self._pause_until = asyncio.get_running_loop().time() + delay
        self.last_error = reason
        log.warning("routing paused for %.1fs: %s", delay, reason)

    async def route_once(self) -> bool:
        """One round: route what the outbox holds, each customer in order.

        Returns:
            True if the round read a full batch (more may be waiting).
        """
        if not self.holds_lease:
            return False
        client = await self._connected()
        if client is None:
            return False
        loop = asyncio.get_running_loop()
        now = loop.time()
        waiting = {c for c, b in self._backoff.items() if b.retry_at > now}
        events = await asyncio.to_thread(
            fetch_unrouted, self._url, self.batch_size, sorted(waiting)[:1000]
        )
        by_customer: dict[str, list[StoredEvent]] = {}
        for event in events:
            if event.customer_id not in waiting:
                by_customer.setdefault(event.customer_id, []).append(event)
        routed: list[int] = []
        unreachable: list[str] = []
        limit = asyncio.Semaphore(self.concurrency)

        async def route_customer(customer_id: str, queue: list[StoredEvent]) -> None:
            async with limit:
                for event in queue:
                    try:
                        await self._deliver(client, event)
                    except _LeaseLost:
                        return
                    except Exception as exc:
                        message = await self._failed(event, exc)
                        if _temporal_unreachable(exc):
                            unreachable.append(message)
                        return
                    routed.append(event.seq)
                self._backoff.pop(customer_id, None)

        results = await asyncio.gather(
            *(route_customer(c, queue) for c, queue in by_customer.items()),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                log.error("routing a customer failed unexpectedly: %r", result)
        if routed:
            await asyncio.to_thread(mark_routed, self._url, routed)
            self.routed_total += len(routed)
        if unreachable and not routed:
            self._pause(unreachable[-1])
        elif routed:
            self._pauses = 0
        if routed and len(self._backoff) == 0:
            self.last_error = None
        return len(events) == self.batch_size

    async def _failed(self, event: StoredEvent, exc: Exception) -> str:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        state = self._backoff.get(event.customer_id) or _Backoff(0.0, 0)
        state.failures += 1
        delay = min(self.retry_base * 2 ** (state.failures - 1), self.retry_max)
        state.retry_at = asyncio.get_running_loop().time() + delay
        self._backoff[event.customer_id] = state
        message = (
            f"could not route event seq {event.seq} ({event.name or event.type}, "
            f"messageId {event.message_id}) of customer {event.customer_id!r}: {reason}"
        )
        self.last_error = message
        log.warning(
            "%s (attempt %d; this customer's later events wait, retrying in %.1fs)",
            message,
            event.route_attempts + 1,
            delay,
        )
        await asyncio.to_thread(record_failure, self._url, event.seq, reason)
        return message

    async def _deliver(self, client: Client, event: StoredEvent) -> None:
        journey_event = event.journey_event()
        for target in deliveries(event.name, event.customer_id, journey_event.properties):
            if not self.holds_lease:
                raise _LeaseLost
            if target.start:
                await self._signal_with_start(client, target, event, journey_event)
            else:
                await self._signal(client, target, journey_event)

    async def _signal_with_start(
        self, client: Client, target: Delivery, event: StoredEvent, journey_event: JourneyEvent
    ) -> None:
        route, customer_id = target.route, event.customer_id
        await client.start_workflow(
            route.workflow_name,
            route.make_input(customer_id, self.settings),
            id=target.workflow_id,
            task_queue=self.settings.task_queue,
            # A journey that ended (purchase, no open...) may start again on a new cart.
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            search_attributes=TypedSearchAttributes(Journey.start_search_attributes(customer_id)),
            memo={"customer_id": customer_id, "journey": route.label},
            static_summary=f"{route.label} for {customer_id}",
            static_details=(
                f"{route.label} journey of customer `{customer_id}`, started by the event "
                f"router on `{event.name}` (seq {event.seq}, messageId `{event.message_id}`)."
            ),
            start_signal=EVENT_SIGNAL,
            start_signal_args=[journey_event],
            rpc_timeout=self.rpc_timeout,
        )

    async def _signal(self, client: Client, target: Delivery, journey_event: JourneyEvent) -> None:
        handle = client.get_workflow_handle(target.workflow_id)
        try:
            await handle.signal(EVENT_SIGNAL, journey_event, rpc_timeout=self.rpc_timeout)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            # No live journey: an order or a late open after the journey ended is normal.
            log.debug("no live %s for event seq %d", target.workflow_id, journey_event.seq)
