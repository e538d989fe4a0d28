"""Batched audience sync: journeys queue joins and leaves, a flush sends them in batches.

A journey's join (``queue_audience_join``) writes one row per configured provider to
``audience_changes`` (Meta and Google Customer Match, or the local store when neither is set)
and learns from ``confirm_audience_change`` when the flush applied it. The audience flusher's
Temporal Schedule (``workflows/audience_flusher.py``) runs ``flush_audience_changes`` every
``KAERU_AUDIENCE_FLUSH_INTERVAL``: N members joining one audience within a flush take
⌈N / batch size⌉ requests (Meta takes 10,000 a request), and Temporal retries the activity
(after the ``Retry-After`` a 429 asked for).

Exactly once: a flush keeps, per member, only the newest queued change (a leave queued after
a join in the same window wins; the join is ``superseded``), and claims the changes of a
batch (``audience_batches``) before sending it. A flush that crashed between sending and
marking finds the batch unfinished and sends it again before anything newer: Meta's add and
remove are set operations, and a Google job that already ran is not run again. The local
store has no platform to batch for: its changes are applied when queued.

Traces: a flush runs in the flusher's own trace, not the events'. With tracing on, each queued
change keeps the W3C ``traceparent`` of the journey step's activity that queued it
(``audience_changes.traceparent``; null with tracing off), and the ``ad audience batch`` span
around a batch's call to the platform links to the spans of its changes (at most
:data:`kaeru.telemetry.MAX_LINKS`, the oldest first), so a backend leads from an event's
trace to the Graph API call that applied its journey's change, and back.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import httpx
from opentelemetry.trace import NoOpTracer, SpanKind, Tracer
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.ads import LOCAL, META, AudienceActivities, email_sha256, set_local_member
from activities.google_ads import GOOGLE, RAN, GoogleCustomerMatch, configured, google_email_sha256
from activities.types import (
    AUDIENCE_PENDING,
    AUDIENCE_REJECTED,
    AudienceChange,
    AudienceResult,
    AudienceTargets,
    FlushInput,
    FlushResult,
)
from kaeru.db import session
from kaeru.models import AudienceBatch, AudienceChangeRow, AudienceJoin, utcnow
from kaeru.settings import Settings
from kaeru.telemetry import MAX_LINKS, current_traceparent, links_to
from kaeru.touchpoints import ADS, record_touchpoint

APPLIED = "applied"
SUPERSEDED = "superseded"
REJECTED = "rejected"
#: How long one attempt of ``confirm_audience_change`` watches for the flush before it asks
#: Temporal to try again (a heartbeat every poll, so a dead worker is noticed).
CONFIRM_WATCH = timedelta(seconds=60)
CONFIRM_POLL = 0.2
#: The span around one batch's call to an ad platform (attributes: the platform, the size).
BATCH_SPAN = "ad audience batch"


class AudienceSyncActivities:
    """The queue, confirm and flush activities, with settings and HTTP client injected
    (``tracer``: the ``ad audience batch`` span's)."""

    def __init__(
        self,
        settings: Settings,
        http: httpx.AsyncClient,
        confirm_watch: timedelta = CONFIRM_WATCH,
        tracer: Tracer | None = None,
    ) -> None:
        self.settings = settings
        self.http = http
        self.confirm_watch = confirm_watch
        self.tracer = tracer or NoOpTracer()
        self.ads = AudienceActivities(settings, http)
        self.google = GoogleCustomerMatch(settings, http)

    def targets(self, audience: str) -> list[AudienceResult]:
        """Every provider ``audience`` lives on with today's settings."""
        s = self.settings
        found = []
        if s.meta_access_token and s.meta_audience_id:
            found.append(AudienceResult(META, s.meta_audience_id))
        if configured(s):
            assert s.google_ads_user_list_id is not None
            found.append(AudienceResult(GOOGLE, s.google_ads_user_list_id))
        return found or [AudienceResult(LOCAL, audience)]

    @activity.defn(name="queue_audience_join")
    async def queue_audience_join(self, change: AudienceChange) -> AudienceTargets:
        """Queue the customer's join of ``change.audience`` on every provider (idempotent).

        Raises:
            ApplicationError: ``NoEmailAddress`` or ``NotConsented`` (non-retryable), as
                ``add_to_audience``: nothing is queued then.
        """
        address = await asyncio.to_thread(self.ads._consented_email, change)
        traceparent = current_traceparent()
        rows = [
            _row(change, target, _hash(target.provider, address), traceparent, joining=True)
            for target in self.targets(change.audience)
        ]
        return await asyncio.to_thread(self._queue, change, rows)

    @activity.defn(name="queue_audience_leave")
    async def queue_audience_leave(self, change: AudienceChange) -> AudienceTargets:
        """Queue the removal of exactly what the join ``change.joined_key`` queued."""
        return await asyncio.to_thread(self._queue_leave, change, current_traceparent())

    @activity.defn(name="confirm_audience_change")
    async def confirm_audience_change(self, change: AudienceChange) -> AudienceTargets:
        """Return once every target of the change ``change.key`` is applied.

        Raises:
            ApplicationError: ``AudiencePending`` (retryable) while a flush has not applied
                it; ``AudienceRejected`` (non-retryable) when the platform refused its batch.
        """
        deadline = time.monotonic() + self.confirm_watch.total_seconds()
        while True:
            rows = await asyncio.to_thread(self._rows_of, change.key)
            if not rows:
                raise ApplicationError(
                    f"no audience change {change.key} was queued; queue it first",
                    type=AUDIENCE_REJECTED,
                    non_retryable=True,
                )
            refused = [r for r in rows if (r.outcome or "").startswith(REJECTED)]
            if refused:
                raise ApplicationError(
                    f"the {refused[0].provider} audience refused the change: {refused[0].outcome}",
                    type=AUDIENCE_REJECTED,
                    non_retryable=True,
                )
            if all(r.applied_at is not None for r in rows):
                return AudienceTargets([AudienceResult(r.provider, r.audience_id) for r in rows])
            activity.heartbeat()
            if time.monotonic() > deadline:
                raise ApplicationError(
                    f"the change to the {change.audience} audience waits for the next flush "
                    "(KAERU_AUDIENCE_FLUSH_INTERVAL); if it never comes, check that the "
                    "audience flusher's schedule runs",
                    type=AUDIENCE_PENDING,
                    next_retry_delay=self.settings.audience_flush_interval / 2,
                )
            await asyncio.sleep(CONFIRM_POLL)

    @activity.defn(name="flush_audience_changes")
    async def flush_audience_changes(self, flush: FlushInput) -> FlushResult:
        """Send every queued change, batch by batch; an unfinished batch goes first.

        Raises:
            ApplicationError: retryable when a platform is busy or unreachable (after its
                ``Retry-After``); the batches sent before stay applied.
        """
        result = FlushResult()
        while True:
            claimed = await asyncio.to_thread(self._next_batch, flush.limit, result)
            if claimed is None:
                return result
            batch, hashes = claimed
            activity.heartbeat(result.batches)
            try:
                await self._send_traced(batch, hashes)
            except ApplicationError as err:
                if not err.non_retryable:
                    raise
                # Counts and the audience only: the members are personal data.
                activity.logger.warning(
                    "%s refused a batch of %d %s audience %s; the changes are marked rejected "
                    "(audience_changes.outcome) and the journeys waiting for them told: %s",
                    batch.provider,
                    len(hashes),
                    "addition(s) to" if batch.joining else "removal(s) from",
                    batch.audience_id,
                    err.message,
                )
                await asyncio.to_thread(self._mark, batch, f"{REJECTED}: {err.message}")
                result.rejected += len(hashes)
                continue
            await asyncio.to_thread(self._mark, batch, APPLIED)
            result.batches += 1
            result.applied += len(hashes)

    # ---- sending ---------------------------------------------------------------------------

    async def _send_traced(self, batch: AudienceBatch, hashes: list[str]) -> None:
        """:meth:`_send` in an ``ad audience batch`` span linked to the queued changes' spans."""
        traceparents = await asyncio.to_thread(self._traceparents_of, batch)
        with self.tracer.start_as_current_span(
            BATCH_SPAN,
            kind=SpanKind.INTERNAL,
            links=links_to(traceparents),
            attributes={
                "kaeru.audience.platform": batch.provider,
                "kaeru.audience.batch_size": len(hashes),
            },
        ):
            await self._send(batch, hashes)

    async def _send(self, batch: AudienceBatch, hashes: list[str]) -> None:
        if batch.provider == META:
            await self.ads.meta(hashes, batch.audience_id, joining=batch.joining)
            return
        if batch.job is not None:
            status = await self.google.status(batch.job)
            if status in RAN:
                return  # ran before the crash that kept it from being marked
            if status == "PENDING":
                await self.google.add_and_run(batch.job, hashes, joining=batch.joining)
                return
        job = await self.google.create_job(batch.audience_id)
        await asyncio.to_thread(self._keep_job, batch, job)
        await self.google.add_and_run(job, hashes, joining=batch.joining)

    # ---- the database ----------------------------------------------------------------------

    def _queue(self, change: AudienceChange, rows: list[AudienceChangeRow]) -> AudienceTargets:
        """Insert the rows not queued yet; apply local ones at once."""
        with session(self.settings.resolved_database_url) as s:
            for row in rows:
                _insert_new(s, row)
        pending = any(row.provider != LOCAL for row in rows)
        return AudienceTargets([AudienceResult(r.provider, r.audience_id) for r in rows], pending)

    def _queue_leave(self, change: AudienceChange, traceparent: str | None) -> AudienceTargets:
        """One leave per target of the join ``change.joined_key``, with the hash it sent."""
        with session(self.settings.resolved_database_url) as s:
            query = select(AudienceChangeRow).where(
                AudienceChangeRow.change_key == (change.joined_key or "")
            )
            targets = []
            for join in list(s.exec(query)):
                target = AudienceResult(join.provider, join.audience_id)
                _insert_new(s, _row(change, target, join.email_sha256, traceparent, joining=False))
                targets.append(target)
        return AudienceTargets(targets, any(t.provider != LOCAL for t in targets))

    def _rows_of(self, change_key: str) -> list[AudienceChangeRow]:
        with session(self.settings.resolved_database_url) as s:
            query = select(AudienceChangeRow).where(AudienceChangeRow.change_key == change_key)
            return list(s.exec(query))

    def _next_batch(
        self, limit: int, result: FlushResult
    ) -> tuple[AudienceBatch, list[str]] | None:
        """The oldest unfinished batch, else a new one claimed from the queue, in one go."""
        with session(self.settings.resolved_database_url) as s:
            batch = s.exec(
                select(AudienceBatch)
                .where(col(AudienceBatch.done_at).is_(None))
                .order_by(col(AudienceBatch.id))
                .limit(1)
            ).first()
            if batch is None:
                batch = self._claim(s, limit, result)
                if batch is None:
                    return None
            query = select(AudienceChangeRow.email_sha256).where(
                AudienceChangeRow.batch_id == batch.id
            )
            hashes = sorted(set(s.exec(query)))
            s.expunge(batch)
            return batch, hashes

    def _claim(self, s: Session, limit: int, result: FlushResult) -> AudienceBatch | None:
        """Claim one batch: the newest change of each member wins, older ones are superseded."""
        pending = list(
            s.exec(
                select(AudienceChangeRow)
                .where(col(AudienceChangeRow.applied_at).is_(None))
                .where(col(AudienceChangeRow.batch_id).is_(None))
                .order_by(col(AudienceChangeRow.id))
                .limit(limit)
            )
        )
        newest: dict[tuple[str, str, str], AudienceChangeRow] = {}
        for row in pending:
            member = (row.provider, row.audience_id, row.email_sha256)
            older = newest.get(member)
            if older is not None:
                _apply(s, older, f"{SUPERSEDED} by {row.key}")
                result.superseded += 1
            newest[member] = row
        if not newest:
            return None
        first = min(newest.values(), key=lambda r: r.id or 0)
        size = (
            self.settings.meta_batch_size
            if first.provider == META
            else self.settings.google_ads_batch_size
        )
        rows = [
            r
            for r in sorted(newest.values(), key=lambda r: r.id or 0)
            if (r.provider, r.audience_id, r.joining)
            == (first.provider, first.audience_id, first.joining)
        ][:size]
        batch = AudienceBatch(
            provider=first.provider, audience_id=first.audience_id, joining=first.joining
        )
        s.add(batch)
        s.flush()
        for r in rows:
            r.batch_id = batch.id
            s.add(r)
        s.flush()
        return batch

    def _traceparents_of(self, batch: AudienceBatch) -> list[str]:
        """The stored trace contexts of the batch's changes, the oldest first (bounded)."""
        with session(self.settings.resolved_database_url) as s:
            query = (
                select(AudienceChangeRow.traceparent)
                .where(AudienceChangeRow.batch_id == batch.id)
                .where(col(AudienceChangeRow.traceparent).is_not(None))
                .order_by(col(AudienceChangeRow.id))
                .limit(MAX_LINKS)
            )
            return [t for t in s.exec(query) if t]

    def _keep_job(self, batch: AudienceBatch, job: str) -> None:
        with session(self.settings.resolved_database_url) as s:
            row = s.get(AudienceBatch, batch.id)
            assert row is not None
            row.job = batch.job = job
            s.add(row)

    def _mark(self, batch: AudienceBatch, outcome: str) -> None:
        """Mark the batch and every change in it, with their touchpoints, in one go."""
        with session(self.settings.resolved_database_url) as s:
            row = s.get(AudienceBatch, batch.id)
            assert row is not None
            row.done_at = utcnow()
            if outcome != APPLIED:
                row.error = outcome[:2000]
            s.add(row)
            changes = s.exec(
                select(AudienceChangeRow).where(AudienceChangeRow.batch_id == batch.id)
            )
            for change in changes:
                _apply(s, change, outcome[:2000])


def _insert_new(s: Session, row: AudienceChangeRow) -> None:
    """Queue ``row`` unless a retried step queued it already; a local change applies now."""
    if (
        s.exec(select(AudienceChangeRow.id).where(AudienceChangeRow.key == row.key)).first()
        is not None
    ):
        return
    s.add(row)
    if row.provider == LOCAL:
        _apply(s, row, APPLIED)


def _hash(provider: str, address: str) -> str:
    return google_email_sha256(address) if provider == GOOGLE else email_sha256(address)


def _row(
    change: AudienceChange,
    target: AudienceResult,
    hashed: str,
    traceparent: str | None,
    *,
    joining: bool,
) -> AudienceChangeRow:
    return AudienceChangeRow(
        key=f"{change.key}/{target.provider}",
        change_key=change.key,
        journey_id=change.journey_id,
        step=change.step,
        customer_id=change.customer_id,
        audience=change.audience,
        provider=target.provider,
        audience_id=target.audience_id,
        email_sha256=hashed,
        joining=joining,
        traceparent=traceparent,
    )


def _apply(s: Session, row: AudienceChangeRow, outcome: str) -> None:
    """Mark ``row`` done; when applied, keep the membership (``audience_joins``, the local
    store) and the touchpoint, as the one-member path does (erase and the sweeper read them)."""
    row.applied_at, row.outcome = utcnow(), outcome
    s.add(row)
    if outcome != APPLIED:
        return
    if row.provider == LOCAL:
        set_local_member(
            s, row.audience, row.customer_id, row.email_sha256, row.journey_id, row.joining
        )
    join = s.get(AudienceJoin, row.key)
    if row.joining and join is None:
        s.add(
            AudienceJoin(
                key=row.key,
                journey_id=row.journey_id,
                customer_id=row.customer_id,
                audience=row.audience,
                provider=row.provider,
                audience_id=row.audience_id,
                email_sha256=row.email_sha256,
            )
        )
    elif not row.joining:
        for open_join in s.exec(
            select(AudienceJoin)
            .where(AudienceJoin.journey_id == row.journey_id)
            .where(AudienceJoin.provider == row.provider)
            .where(AudienceJoin.audience == row.audience)
            .where(col(AudienceJoin.left_at).is_(None))
        ):
            open_join.left_at, open_join.removal_error, open_join.retry_at = utcnow(), None, None
            s.add(open_join)
    record_touchpoint(
        s,
        customer_id=row.customer_id,
        kind="audience_joined" if row.joining else "audience_left",
        key=row.key,
        journey_id=row.journey_id,
        step=row.step,
        channel=ADS,
        detail={"audience": row.audience, "provider": row.provider, "audience_id": row.audience_id},
    )
