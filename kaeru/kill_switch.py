"""The kill switch: journeys wait before their next outside step instead of acting.

A switch that is on is one row of ``kill_switches``: ``*`` for every marketing journey (and
the transactional ones too when the operator said ``--all``), or one journey kind. The worker
reads the rows as an outside activity starts (:class:`KillSwitchGate`, cached for
``KAERU_KILL_SWITCH_CACHE``) and, when one covers the journey, fails the activity with
``KillSwitchHeld`` before it acts; the kit waits for a ``resume`` and tries the same step
again (kaeru/holds.py). ``kaeru kill-switch off`` deletes the row and signals the journeys it
held, so they go on at once: the cache only ever lets a step act, a hold is always decided on
a read of the switches made after the step started (:meth:`SwitchReader.since`), so a step
tried again after the release is not held by what a worker read before it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlmodel import col, select
from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
)

from kaeru.db import session, write_session
from kaeru.holds import GLOBAL, HELD_BY_KILL_SWITCH, HOLDS_HEADER, OUTSIDE_ACTIVITIES, KnowsHolds
from kaeru.models import KillSwitch

__all__ = ["GLOBAL", "KillSwitchGate", "SwitchReader", "covering", "switches"]


@dataclass(frozen=True)
class JourneyKind:
    """What the gate needs to know of a journey's workflow type."""

    kind: str
    transactional: bool


def switches(database_url: str) -> list[KillSwitch]:
    """Every switch that is on, the global one first."""
    with session(database_url) as s:
        rows = list(s.exec(select(KillSwitch).order_by(col(KillSwitch.scope))).all())
    return sorted(rows, key=lambda r: r.scope != GLOBAL)


def turn_on(
    database_url: str, scope: str, *, actor: str, reason: str = "", include_transactional: bool
) -> tuple[KillSwitch, bool]:
    """Turn the ``scope`` switch on. Returns the switch and whether this call turned it on
    (False: it already was, and is left as it was: since when, by whom)."""
    with write_session(database_url) as s:
        row = s.get(KillSwitch, scope)
        if row is not None:
            return row, False
        row = KillSwitch(
            scope=scope,
            include_transactional=include_transactional,
            reason=reason[:400],
            actor=actor,
        )
        s.add(row)
    return row, True


def turn_off(database_url: str, scope: str) -> KillSwitch | None:
    """Turn the ``scope`` switch off; the switch it was, or None when it was not on."""
    with write_session(database_url) as s:
        row = s.get(KillSwitch, scope)
        if row is not None:
            s.delete(row)
    return row


def covering(on: Sequence[KillSwitch], kind: str, transactional: bool) -> KillSwitch | None:
    """The switch among ``on`` that holds a journey of ``kind``: its kind's own, else the
    global one (which holds a transactional journey, an order confirmation, only when it was
    turned on ``--all``: a bad campaign is no reason to stop receipts)."""
    by_scope = {s.scope: s for s in on}
    if kind in by_scope:
        return by_scope[kind]
    every = by_scope.get(GLOBAL)
    if every is not None and (every.include_transactional or not transactional):
        return every
    return None


class SwitchReader:
    """The switches that are on, read at most once per ``ttl`` seconds (0: on every call).

    One read at a time: the activities starting meanwhile wait for it rather than each
    asking the database.
    """

    def __init__(self, database_url: str, ttl: float) -> None:
        self._url = database_url
        self._ttl = ttl
        #: When the latest read started (``time.monotonic()``): it saw every change before.
        self._read_at = float("-inf")
        self._on: list[KillSwitch] = []
        self._lock = asyncio.Lock()

    async def current(self) -> list[KillSwitch]:
        """The switches, as read at most ``ttl`` seconds ago."""
        async with self._lock:
            if time.monotonic() - self._read_at >= self._ttl:
                await self._read()
            return self._on

    async def since(self, moment: float) -> list[KillSwitch]:
        """The switches, as read after ``moment`` (``time.monotonic()``): a read that
        started after it serves every activity that asks meanwhile, so a burst of held steps
        costs one read, not one each."""
        async with self._lock:
            if self._read_at < moment:
                await self._read()
            return self._on

    async def _read(self) -> None:
        started = time.monotonic()
        self._on = await asyncio.to_thread(switches, self._url)
        self._read_at = started


class KillSwitchGate(Interceptor):
    """A worker interceptor: an outside activity of a journey a switch covers fails with
    ``KillSwitchHeld`` (non-retryable) before it acts, when the workflow code that started
    it knows holds (its :data:`~kaeru.holds.HOLDS_HEADER`, which this interceptor's workflow
    side adds).

    Args:
        reader: the switches.
        journeys: workflow type name → the journey's kind; other workflows (the report, the
            sweeper) are never held.
    """

    def __init__(self, reader: SwitchReader, journeys: Mapping[str, JourneyKind]) -> None:
        self.reader = reader
        self.journeys = dict(journeys)

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Gate(next, self)

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        return KnowsHolds


class _Gate(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, gate: KillSwitchGate) -> None:
        super().__init__(next)
        self.gate = gate

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        journey = self.gate.journeys.get(info.workflow_type or "")
        if (
            journey is not None
            and info.activity_type in OUTSIDE_ACTIVITIES
            and HOLDS_HEADER in input.headers
        ):
            asked = time.monotonic()
            reader, kind = self.gate.reader, journey.kind
            switch = covering(await reader.current(), kind, journey.transactional)
            if switch is not None:
                # Held by what may be an old read (a switch turned off since, and this the
                # step its release tries again): a hold is decided on a read from now.
                switch = covering(await reader.since(asked), kind, journey.transactional)
            if switch is not None:
                which = (
                    "the global kill switch"
                    if switch.scope == GLOBAL
                    else (f"the {switch.scope} kill switch")
                )
                reason = f": {switch.reason}" if switch.reason else ""
                raise ApplicationError(
                    f"held by {which}{reason}",
                    {"scope": switch.scope, "reason": switch.reason},
                    type=HELD_BY_KILL_SWITCH,
                    non_retryable=True,
                )
        return await super().execute_activity(input)
