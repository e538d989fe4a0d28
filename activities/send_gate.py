"""The send gate: may this marketing message go now, later or never?

Every marketing message of every journey asks :meth:`SendGateActivities.reserve_send` before
``send_email`` (the kit does it). The answer is one of:

- ``refused``: the customer's consent says no (:func:`kaeru.consent.refusal`) or the address is
  suppressed: never sent, the journey ends;
- ``send``: the message has its slot (a ``granted`` row in ``send_slots``, which the caps
  count);
- ``wait``: ask again at ``until``, the next moment that is under both frequency caps
  (``KAERU_CAP_PER_DAY``, ``KAERU_CAP_PER_WEEK``: rolling 24 hours and 7 days, across every
  journey), outside quiet hours in the customer's time zone (``KAERU_QUIET_START`` to
  ``KAERU_QUIET_END``), and after every waiting message of a higher priority has had its turn;
- ``drop``: that moment is past the message's stale limit: never sent, the journey goes on.

Counting is atomic across workers and processes: one customer's reservations are decided one
at a time, in a transaction that holds a lock on the customer (SQLite: ``BEGIN IMMEDIATE``,
the database's one writer; PostgreSQL: a transaction advisory lock on a hash of the customer
id). The message's key is the row's key, so a retry or the journey waking finds its own row:
a granted slot stays granted, a dropped message stays dropped.

Time is the journey's clock (``ReserveSendInput.asked_at``), so the caps and quiet hours read
the same on a time-skipping test server and in a replay as in production.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, tzinfo

from sqlalchemy import text
from sqlmodel import Session, col, select
from temporalio import activity

from activities.email.addresses import mask_address, recipient_address
from activities.email.gate import suppression_of
from activities.types import DROP, REFUSED, SEND, WAIT, ReserveSendInput, ReserveSendResult
from kaeru.consent import refusal
from kaeru.db import write_session
from kaeru.models import Customer, SendSlot, utcnow
from kaeru.settings import Settings, clock_time, known_timezone

#: How a journey ends when the gate refuses its message (``ReserveSendResult.outcome``).
UNSUBSCRIBED = "unsubscribed"
UNDELIVERABLE_OUTCOME = "undeliverable"

WAITING = "waiting"
GRANTED = "granted"
DROPPED = "dropped"

DAY = timedelta(days=1)
WEEK = timedelta(days=7)
#: A waiting message whose ``until`` passed this long ago without its journey asking again is
#: taken as gone (the journey ended during its wait: a purchase, an unsubscribe): it no
#: longer keeps lower-priority messages waiting. A journey asks again within seconds of its
#: ``until``; an hour covers a worker that was down meanwhile.
ABANDONED_AFTER = timedelta(hours=1)


@dataclass(frozen=True)
class QuietHours:
    """No marketing message from ``start`` to ``end`` local time (``end`` may be the next
    day: 21:00 to 08:00); equal times: never quiet."""

    start: time
    end: time

    def quiet_at(self, local: datetime) -> bool:
        now = local.time()
        if self.start == self.end:
            return False
        if self.start < self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end

    def opens_after(self, moment: datetime, zone: tzinfo) -> datetime:
        """The first moment after ``moment`` at which the window ends (``end`` local time),
        in UTC. Wall-clock arithmetic in ``zone``, so a DST change in between is honoured."""
        local = moment.astimezone(zone)
        opens = datetime.combine(local.date(), self.end, tzinfo=zone)
        if opens <= local:
            opens = datetime.combine(local.date() + DAY, self.end, tzinfo=zone)
        return opens.astimezone(UTC)


@dataclass(frozen=True)
class Caps:
    """At most ``per_day`` messages in any 24 hours and ``per_week`` in any 7 days."""

    per_day: int
    per_week: int

    def frees_at(
        self, moment: datetime, granted: Sequence[datetime]
    ) -> tuple[datetime, str] | None:
        """When the caps let one more message go, if they are full at ``moment``, and which
        cap; None: not full. A grant counts until a whole window has passed since it."""
        latest: tuple[datetime, str] | None = None
        for limit, window, name in (
            (self.per_day, DAY, f"KAERU_CAP_PER_DAY ({self.per_day} in 24 hours)"),
            (self.per_week, WEEK, f"KAERU_CAP_PER_WEEK ({self.per_week} in 7 days)"),
        ):
            inside = sorted(g for g in granted if g > moment - window)
            if len(inside) >= limit:
                # The oldest ones must leave the window until one place is free.
                frees = inside[len(inside) - limit] + window
                if latest is None or frees > latest[0]:
                    latest = (frees, name)
        return latest


@dataclass(frozen=True)
class Slot:
    """The next free slot and why it is not now (empty: it is now)."""

    at: datetime
    because: tuple[str, ...] = ()


def next_free(
    moment: datetime, granted: Sequence[datetime], caps: Caps, quiet: QuietHours, zone: tzinfo
) -> Slot:
    """The first moment at or after ``moment`` that is under both caps and not quiet.

    Capped or quiet, it moves on to when that ends; the caps only free up as time passes (no
    grant is added here), so it ends after at most one step per grant and per quiet window.
    """
    at = moment
    because: list[str] = []
    for _ in range(2 * len(granted) + 8):
        capped = caps.frees_at(at, granted)
        if capped is not None:
            at = capped[0]
            because.append(capped[1])
            continue
        if quiet.quiet_at(at.astimezone(zone)):
            at = quiet.opens_after(at, zone)
            because.append(f"quiet hours ({quiet.start:%H:%M} to {quiet.end:%H:%M} {zone})")
            continue
        return Slot(at, tuple(dict.fromkeys(because)))
    raise AssertionError("next_free did not settle: caps or quiet hours are inconsistent")


def advisory_key(customer_id: str) -> int:
    """A signed 64-bit key for PostgreSQL's advisory lock on one customer's send slots."""
    digest = hashlib.blake2b(f"kaeru:send-slots:{customer_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class SendGateActivities:
    """The ``reserve_send`` activity, with its settings (caps, quiet hours) injected."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.caps = Caps(settings.cap_per_day, settings.cap_per_week)
        self.quiet = QuietHours(clock_time(settings.quiet_start), clock_time(settings.quiet_end))
        self.shop_zone = known_timezone(settings.shop_timezone) or UTC

    @activity.defn(name="reserve_send")
    async def reserve_send(self, wanted: ReserveSendInput) -> ReserveSendResult:
        """Decide whether the marketing message ``wanted.key`` goes now, later or never, and
        keep the decision in its ``send_slots`` row (see the module's docstring)."""
        return await asyncio.to_thread(self.reserve, wanted)

    def reserve(self, wanted: ReserveSendInput) -> ReserveSendResult:
        """:meth:`reserve_send` in this thread (one transaction, the customer locked)."""
        now = wanted.asked_at or utcnow()
        with write_session(self.settings.resolved_database_url) as s:
            if s.get_bind().dialect.name == "postgresql":
                s.connection().execute(
                    text("SELECT pg_advisory_xact_lock(:key)"),
                    {"key": advisory_key(wanted.customer_id)},
                )
            row = s.get(SendSlot, wanted.key)
            refused = self._refusal(s, wanted)
            if refused is not None:
                outcome, why = refused
                if row is not None and row.state == WAITING:
                    self._settle(row, DROPPED, now, f"refused: {why}")
                    s.add(row)
                return ReserveSendResult(REFUSED, None, why, outcome)
            if row is not None and row.state == GRANTED and self._granted_before_hold(row, wanted):
                if row.stale_at is not None and now > row.stale_at:
                    reason = (
                        f"held past the message's stale limit ({row.stale_at:%Y-%m-%d %H:%M} "
                        "UTC) after its send slot was granted"
                    )
                    self._settle(row, DROPPED, now, reason)
                    row.granted_at = None
                    s.add(row)
                    return ReserveSendResult(DROP, None, reason)
                row.granted_at = None  # it was not used: the caps no longer count it
                result = self._decide(s, row, now)
                s.add(row)
                return result
            if row is not None and row.state == GRANTED:
                return ReserveSendResult(SEND, None, "the slot was granted earlier")
            if row is not None and row.state == DROPPED:
                return ReserveSendResult(DROP, None, row.reason or "dropped earlier")
            if row is None:
                row = SendSlot(
                    key=wanted.key,
                    customer_id=wanted.customer_id,
                    kind=wanted.kind,
                    step=wanted.step,
                    priority=wanted.priority,
                    channel=wanted.channel,
                    state=WAITING,
                    wanted_at=wanted.wanted_at,
                    stale_at=(
                        wanted.wanted_at + timedelta(seconds=wanted.stale_after_seconds)
                        if wanted.stale_after_seconds is not None
                        else None
                    ),
                )
            result = self._decide(s, row, now)
            s.add(row)
        return result

    @staticmethod
    def _granted_before_hold(row: SendSlot, wanted: ReserveSendInput) -> bool:
        """Whether ``row``'s grant came before the hold ``wanted`` says the message had."""
        held_until = wanted.held_until
        if held_until is None or row.granted_at is None:
            return False
        granted = row.granted_at
        if granted.tzinfo is None:  # SQLite gives it back naive (UTC)
            granted = granted.replace(tzinfo=UTC)
        return granted < held_until

    def _refusal(self, s: Session, wanted: ReserveSendInput) -> tuple[str, str] | None:
        """How the journey ends and why, when the message may not go at all; else None."""
        said_no = refusal(
            s,
            wanted.customer_id,
            kind=wanted.kind,
            channel=wanted.channel,
            unknown_is_yes=self.settings.unknown_consent_is_yes,
        )
        if said_no is not None:
            return UNSUBSCRIBED, said_no
        address = recipient_address(s, wanted.customer_id)
        suppressed = suppression_of(s, address) if address else None
        if suppressed is not None:
            return UNDELIVERABLE_OUTCOME, (
                f"{mask_address(address)} is on the suppression list (reason: {suppressed.reason})"
            )
        return None

    def _decide(self, s: Session, row: SendSlot, now: datetime) -> ReserveSendResult:
        zone = self._zone_of(s, row.customer_id)
        granted = list(
            s.exec(
                select(SendSlot.granted_at).where(
                    col(SendSlot.customer_id) == row.customer_id,
                    col(SendSlot.channel) == row.channel,
                    col(SendSlot.state) == GRANTED,
                    col(SendSlot.key) != row.key,
                    col(SendSlot.granted_at) > now - WEEK,
                )
            ).all()
        )
        times = [g for g in granted if g is not None]
        alone = next_free(now, times, self.caps, self.quiet, zone)
        # Every waiting message of a higher priority takes its next slot first, in turn.
        ahead = []
        for other in self._waiting_ahead(s, row, now):
            theirs = next_free(now, times, self.caps, self.quiet, zone)
            if other.stale_at is not None and theirs.at > other.stale_at:
                continue  # it will be dropped when it asks: it takes no slot
            times.append(theirs.at)
            ahead.append(other.kind)
        slot = next_free(now, times, self.caps, self.quiet, zone)
        because = list(slot.because)
        if slot.at > alone.at:
            kinds = ", ".join(dict.fromkeys(ahead))
            because.insert(0, f"a message of higher priority ({kinds}) goes first")
        if slot.at <= now:
            self._settle(row, GRANTED, now, None)
            row.granted_at = now
            return ReserveSendResult(SEND, None, "a send slot was free")
        if row.stale_at is not None and slot.at > row.stale_at:
            reason = (
                f"the next free send slot ({slot.at:%Y-%m-%d %H:%M} UTC: {'; '.join(because)}) "
                f"is past the message's stale limit ({row.stale_at:%Y-%m-%d %H:%M} UTC)"
            )
            self._settle(row, DROPPED, now, reason)
            return ReserveSendResult(DROP, None, reason)
        reason = "; ".join(because)
        self._settle(row, WAITING, now, reason)
        row.until = slot.at
        return ReserveSendResult(WAIT, slot.at, reason)

    def _waiting_ahead(self, s: Session, row: SendSlot, now: datetime) -> list[SendSlot]:
        """Messages of the customer with a higher priority that wait for a slot now (wanted
        by now, not stale, their journey still asking), highest and oldest first."""
        found = s.exec(
            select(SendSlot)
            .where(
                col(SendSlot.customer_id) == row.customer_id,
                col(SendSlot.channel) == row.channel,
                col(SendSlot.state) == WAITING,
                col(SendSlot.key) != row.key,
                col(SendSlot.priority) < row.priority,
                col(SendSlot.wanted_at) <= now,
            )
            .order_by(col(SendSlot.priority), col(SendSlot.wanted_at))
        ).all()
        return [
            other
            for other in found
            if (other.stale_at is None or other.stale_at > now)
            and (other.until is None or other.until > now - ABANDONED_AFTER)
        ]

    def _zone_of(self, s: Session, customer_id: str) -> tzinfo:
        """The customer's own time zone, else the shop's (``KAERU_SHOP_TIMEZONE``)."""
        customer = s.get(Customer, customer_id)
        own = known_timezone(customer.timezone) if customer and customer.timezone else None
        return own or self.shop_zone

    @staticmethod
    def _settle(row: SendSlot, state: str, now: datetime, reason: str | None) -> None:
        row.state = state
        row.reason = reason[:500] if reason else None
        row.updated_at = now
