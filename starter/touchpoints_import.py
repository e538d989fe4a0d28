"""``kaeru touchpoints import FILE``: offline touchpoints (store purchases, visits, call-centre
contacts) from a CSV file, into the same history as the online ones.

The file has a header naming its columns (:data:`COLUMNS`; any order, ``customer_id``,
``kind``, ``occurred_at`` and ``channel`` required). ``kind`` is ``purchase``, ``visit`` or
``contact``; ``channel`` one of ``KAERU_OFFLINE_CHANNELS``; ``occurred_at`` ISO 8601 with its
time zone. A purchase also needs ``order_id``, ``value`` (in major units, as ``19.99``) and
``currency``, and may name the ``coupon_code`` it used; a visit or a contact has none of those.

Every row is checked before anything is stored: one bad row stores nothing, and each problem
names its line and the fix. Re-importing a file stores nothing twice: each row has a ``key``
(the column, else derived from the row: a purchase's from its order id, a visit's or a
contact's from its customer, kind, time and channel).

A purchase row is stored as an ``Order Completed`` event with ``context.channel`` set, through
the API's own path (:func:`starter.ingest.store_events`: the outbox, then the router): the order
and its ``purchase`` touchpoint are stored once, its coupon redeemed, and the router of the
running API delivers it to the customer's journeys, so a shopper who buys in the store leaves
their cart journey and the purchase counts as a conversion of the email they got. Visits and
contacts are touchpoints only (no journey listens to them).
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlmodel import col, select

from kaeru.commerce import MAX_ID_LENGTH, ORDER_COMPLETED
from kaeru.db import session, write_session
from kaeru.models import Order, Touchpoint, utcnow
from kaeru.money import exponent, to_minor
from kaeru.settings import Settings
from kaeru.touchpoints import record_touchpoint
from starter.events import EventError, IncomingEvent, read_event
from starter.ingest import store_events

#: The columns a file may have, in the documented order.
COLUMNS = (
    "customer_id",
    "kind",
    "occurred_at",
    "channel",
    "order_id",
    "value",
    "currency",
    "coupon_code",
    "key",
)
REQUIRED = ("customer_id", "kind", "occurred_at", "channel")
PURCHASE, VISIT, CONTACT = "purchase", "visit", "contact"
KINDS = (PURCHASE, VISIT, CONTACT)
#: What only a purchase carries.
ORDER_COLUMNS = ("order_id", "value", "currency", "coupon_code")
#: The longest ``key`` a row may give.
MAX_KEY_LENGTH = 200
#: Events stored per transaction (a big file is several; re-running finishes a cut-short one).
CHUNK = 1000
#: The messageId prefix of an imported purchase's ``Order Completed``.
MESSAGE_ID_PREFIX = "touchpoints-import:"


@dataclass(frozen=True)
class Problem:
    """A bad row: its line in the file (1 is the header) and what to fix."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class ImportFileError(ValueError):
    """The file cannot be imported; ``problems`` say where and how to fix it."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class Row:
    """One checked row."""

    line: int
    customer_id: str
    kind: str
    occurred_at: datetime
    channel: str
    key: str
    order_id: str | None = None
    #: As written (major units); the API reads it into minor units as it reads ``total``.
    value: str | None = None
    currency: str | None = None
    coupon_code: str | None = None


@dataclass(frozen=True)
class ImportResult:
    purchases: int = 0
    purchases_known: int = 0
    touches: int = 0
    touches_known: int = 0


# ---- reading ---------------------------------------------------------------------------------


def read_rows(text: str, settings: Settings, now: datetime | None = None) -> list[Row]:
    """Check every row of a CSV file's ``text``.

    Raises:
        ImportFileError: the header or any row is wrong (every problem found is listed).
    """
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey="\0extra")
    header = [name.strip() for name in reader.fieldnames or []]
    if not header:
        raise ImportFileError([Problem(1, f"the file is empty: {_header_fix()}")])
    reader.fieldnames = header
    unknown = [name for name in header if name not in COLUMNS]
    missing = [name for name in REQUIRED if name not in header]
    twice = sorted({name for name in header if header.count(name) > 1})
    if unknown or missing or twice:
        said = []
        if twice:
            said.append(f"column(s) {', '.join(twice)} named twice")
        if unknown:
            said.append(f"unknown column(s) {', '.join(map(repr, unknown))}")
        if missing:
            said.append(f"missing column(s) {', '.join(missing)}")
        raise ImportFileError([Problem(1, f"{' and '.join(said)}: {_header_fix()}")])
    received = now or utcnow()
    latest = received + timedelta(seconds=settings.max_clock_skew)
    rows: list[Row] = []
    problems: list[Problem] = []
    keys: dict[str, int] = {}
    for record in reader:
        line = reader.line_num
        if "\0extra" in record:
            problems.append(Problem(line, f"more cells than the header's {len(header)} columns"))
            continue
        cells = {name: (record.get(name) or "").strip() for name in COLUMNS}
        if not any(cells.values()):
            continue  # a blank line
        try:
            row = _row(line, cells, settings, latest)
        except ValueError as exc:
            problems.append(Problem(line, str(exc)))
            continue
        if (first := keys.get(row.key)) is not None:
            problems.append(
                Problem(
                    line,
                    f"the same touch as line {first} (key {row.key!r}): remove one, or give "
                    "each its own key",
                )
            )
            continue
        keys[row.key] = line
        rows.append(row)
    problems.extend(_orders_of_others(settings, rows))
    if problems:
        raise ImportFileError(sorted(problems, key=lambda p: p.line))
    return rows


def _orders_of_others(settings: Settings, rows: Sequence[Row]) -> list[Problem]:
    """A purchase whose order id is already another customer's order: stored, it would be
    taken for that order (one order per id) and its purchase lost to the reports."""
    wanted = {row.order_id: row for row in rows if row.kind == PURCHASE and row.order_id}
    problems = []
    ids = list(wanted)
    with session(settings.resolved_database_url) as s:
        for start in range(0, len(ids), CHUNK):
            found = s.exec(
                select(Order.order_id, Order.customer_id).where(
                    col(Order.order_id).in_(ids[start : start + CHUNK])
                )
            ).all()
            for order_id, owner in found:
                row = wanted[order_id]
                if owner != row.customer_id:
                    problems.append(
                        Problem(
                            row.line,
                            f"order_id {order_id!r} is already an order of another customer: "
                            "give the store's orders ids of their own (e.g. prefix the till's "
                            f"number: pos-{order_id})",
                        )
                    )
    return problems


def _header_fix() -> str:
    return (
        f"the first line names the columns, e.g. {','.join(COLUMNS)} (required: "
        f"{', '.join(REQUIRED)})"
    )


def _row(line: int, cells: dict[str, str], settings: Settings, latest: datetime) -> Row:
    """One row, checked; a ValueError names the problem and the fix."""
    customer_id = cells["customer_id"]
    if not customer_id or len(customer_id) > MAX_ID_LENGTH:
        raise ValueError(
            f"customer_id must be the shop's customer id (the userId of its events), 1 to "
            f"{MAX_ID_LENGTH} characters"
        )
    kind = cells["kind"].lower()
    if kind not in KINDS:
        raise ValueError(f"kind {cells['kind']!r} is not one of {', '.join(KINDS)}")
    occurred_at = _time(cells["occurred_at"])
    if occurred_at > latest:
        raise ValueError(
            f"occurred_at {cells['occurred_at']!r} is in the future: give when the touch "
            "happened, with its time zone"
        )
    channel = cells["channel"].lower()
    offline = sorted(settings.offline_channel_set)
    if channel not in offline:
        raise ValueError(
            f"channel {cells['channel']!r} is not a store channel: give one of "
            f"{', '.join(offline) or '(none)'}, or add it to KAERU_OFFLINE_CHANNELS"
        )
    given = cells["key"]
    if len(given) > MAX_KEY_LENGTH or not given.isprintable():
        raise ValueError(f"key must be printable and at most {MAX_KEY_LENGTH} characters")
    if kind != PURCHASE:
        stated = [name for name in ORDER_COLUMNS if cells[name]]
        if stated:
            raise ValueError(
                f"a {kind} has no {', '.join(stated)}: leave those cells empty, or make the "
                "row a purchase"
            )
        at = occurred_at.isoformat()
        derived = hashlib.sha256(f"{customer_id}\n{kind}\n{at}\n{channel}".encode()).hexdigest()
        return Row(line, customer_id, kind, occurred_at, channel, given or f"{kind}:{derived}")
    order_id, coupon = cells["order_id"], cells["coupon_code"] or None
    if not order_id or len(order_id) > MAX_ID_LENGTH:
        raise ValueError(
            f"a purchase needs its order_id (1 to {MAX_ID_LENGTH} characters), unique per order"
        )
    currency = cells["currency"].upper()
    if len(currency) != 3 or not currency.isalpha():
        raise ValueError(
            f"currency {cells['currency']!r} is not an ISO 4217 code: give one such as USD"
        )
    _check_value(cells["value"], currency)
    if coupon is not None and len(coupon) > MAX_ID_LENGTH:
        raise ValueError(f"coupon_code is longer than {MAX_ID_LENGTH} characters")
    return Row(
        line,
        customer_id,
        kind,
        occurred_at,
        channel,
        given or f"order:{order_id}",
        order_id=order_id,
        value=cells["value"],
        currency=currency,
        coupon_code=coupon,
    )


def _time(text: str) -> datetime:
    fix = "write it as ISO 8601 with its time zone, e.g. 2026-11-30T15:04:00+09:00 (Z for UTC)"
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"occurred_at {text!r} is not a time: {fix}") from None
    if at.tzinfo is None:
        raise ValueError(f"occurred_at {text!r} has no time zone: {fix}")
    return at.astimezone(UTC)


def _check_value(text: str, currency: str) -> None:
    fix = f"give the amount paid in {currency}, in major units with a dot, e.g. 19.99"
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"value {text!r} is not an amount: {fix}") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"value {text!r} is not an amount: {fix}")
    places = max(0, -int(amount.as_tuple().exponent))
    if places > exponent(currency):
        raise ValueError(
            f"value {text!r} has more decimals than {currency} has ({exponent(currency)}): {fix}"
        )
    to_minor(amount, currency)  # too large an amount: its ValueError says so


# ---- storing ---------------------------------------------------------------------------------


def order_event(row: Row, settings: Settings) -> IncomingEvent:
    """A purchase row as the ``Order Completed`` the API would store for it (server key)."""
    properties: dict[str, Any] = {
        "order_id": row.order_id,
        "total": row.value,
        "currency": row.currency,
    }
    if row.coupon_code:
        properties["coupon"] = row.coupon_code
    raw = {
        "type": "track",
        "event": ORDER_COMPLETED,
        "userId": row.customer_id,
        "messageId": MESSAGE_ID_PREFIX + hashlib.sha256(row.key.encode()).hexdigest()[:40],
        "timestamp": row.occurred_at.isoformat(),
        "properties": properties,
        "context": {"channel": row.channel},
    }
    try:
        return read_event(
            raw, ad_campaign=settings.ad_campaign, max_clock_skew=settings.max_clock_skew
        )
    except EventError as exc:  # read_rows checked every field the event needs
        raise ImportFileError([Problem(row.line, exc.message)]) from exc


def import_rows(settings: Settings, rows: Sequence[Row]) -> ImportResult:
    """Store checked ``rows``; what is already stored (an earlier import) is not stored again.
    Blocking: call from a thread."""
    purchases = [order_event(row, settings) for row in rows if row.kind == PURCHASE]
    stored = known = 0
    for start in range(0, len(purchases), CHUNK):
        result = store_events(settings, purchases[start : start + CHUNK])
        stored += result.stored
        known += result.duplicates
    touches, touches_known = _store_touches(settings, [r for r in rows if r.kind != PURCHASE])
    return ImportResult(stored, known, touches, touches_known)


def _store_touches(settings: Settings, rows: Iterable[Row]) -> tuple[int, int]:
    rows = list(rows)
    stored = known = 0
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start : start + CHUNK]
        with write_session(settings.resolved_database_url) as s:
            keys = [f"import/{row.key}" for row in chunk]
            there = set(s.exec(select(Touchpoint.key).where(col(Touchpoint.key).in_(keys))))
            for row, key in zip(chunk, keys, strict=True):
                if key in there:
                    known += 1
                    continue
                record_touchpoint(
                    s,
                    customer_id=row.customer_id,
                    kind=row.kind,
                    key=key,
                    channel=row.channel,
                    occurred_at=row.occurred_at,
                    detail={"source": "import", "offline": True},
                )
                stored += 1
    return stored, known
