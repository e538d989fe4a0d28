"""The touchpoints of a time window, read once and classified, for every part of a report.

What a row *means* is decided here, once, so the KPIs, funnels, attribution, routes and the
heatmap agree:

- its **journey kind**: the row's ``journey_kind``, else (rows older than the column) the
  longest journey kind of the registry that prefixes its ``journey_id`` as ``<kind>-``;
- its **message**: the email activity's idempotency key (``detail["message_key"]`` of an open
  or click, the row's ``key`` without its ``/<kind>`` suffix for a send or a bounce), else
  ``(journey_id, step)``;
- whether an open or click is a **person's**: ``detail["machine"]`` false, or
  ``KAERU_MACHINE_OPENS_COUNT`` set (then machine ones count like a person's);
- a **purchase**: a ``purchase`` row (every order), or a journey's ``conversion`` row for an
  order that has no ``purchase`` row (histories older than purchase rows), one per customer
  and order id;
- the **time zone** of a customer: ``customers.timezone``, else ``KAERU_SHOP_TIMEZONE``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, TypeVar, cast
from zoneinfo import ZoneInfo

from sqlmodel import Session, col, select

from kaeru.journeys import discover
from kaeru.models import ConsentChange, Customer, EmailMessage, Touchpoint
from kaeru.settings import Settings, known_timezone
from kaeru.unsubscribe_tokens import journey_kind

SENT = "email_sent"
DELIVERED = "email_delivered"
BOUNCED = "email_bounced"
OPENED = "email_opened"
CLICKED = "email_clicked"
AUDIENCE_JOINED = "audience_joined"
AD_CLICKED = "ad_clicked"
COUPON_ISSUED = "coupon_issued"
PURCHASE = "purchase"
CONVERSION = "conversion"
ENTERED = "journey_entered"

#: ``consent_changes.detail`` of an unsubscribe through a message's link names the message
#: (starter/unsubscribe.py), which names its journey.
UNSUBSCRIBE_LINK_PREFIX = "unsubscribe link of message "

T = TypeVar("T")


#: The columns of ``touchpoints`` the analytics read, in :class:`Touch`'s order of reading.
_COLUMNS = (
    "id",
    "customer_id",
    "kind",
    "occurred_at",
    "journey_id",
    "journey_kind",
    "step",
    "variant",
    "channel",
    "order_id",
    "value_minor",
    "currency",
    "coupon_code",
    "detail",
    "key",
)


@dataclass(frozen=True)
class Touch:
    """One touchpoint row, as the analytics read it."""

    id: int
    customer_id: str
    kind: str
    at: datetime
    journey_id: str | None
    #: Resolved: the row's, or its journey id's (see the module docstring); None outside one.
    journey_kind: str | None
    step: str | None
    variant: str | None
    channel: str | None
    order_id: str | None
    value_minor: int | None
    currency: str | None
    coupon_code: str | None
    detail: Mapping[str, Any]
    key: str | None

    @cached_property
    def message(self) -> str:
        """The message this touch belongs to (its email's idempotency key)."""
        stated = self.detail.get("message_key")
        if isinstance(stated, str) and stated:
            return stated
        suffix = f"/{self.kind}"
        if self.key is not None and self.key.endswith(suffix):
            return self.key.removesuffix(suffix)
        return f"{self.journey_id}|{self.step}"


@dataclass
class Message:
    """One email of one journey step, from all its touchpoints."""

    key: str
    customer_id: str
    journey_kind: str | None
    journey_id: str | None
    step: str | None
    variant: str | None = None
    #: When it was handed to the mail server (its send or, refused there, its bounce).
    attempted_at: datetime | None = None
    sent_at: datetime | None = None
    bounced_at: datetime | None = None
    delivered_at: datetime | None = None
    opened_at: datetime | None = None
    clicked_at: datetime | None = None

    @property
    def delivered(self) -> bool:
        """Reported delivered by the provider, or else sent and not bounced."""
        return self.delivered_at is not None or (
            self.sent_at is not None and self.bounced_at is None
        )

    @property
    def delivery_at(self) -> datetime | None:
        """When it was delivered (the provider's report, else its send), if it was."""
        if self.delivered_at is not None:
            return self.delivered_at
        return self.sent_at if self.delivered else None


@dataclass(frozen=True)
class Unsubscribe:
    """One email unsubscribe of ``consent_changes``, with the journey kind it came from."""

    customer_id: str
    at: datetime
    #: The kind opted out of, or the kind of the message whose link was used; None: unknown.
    journey_kind: str | None


@dataclass
class History:
    """Every touchpoint with ``start <= occurred_at < end``, in time order."""

    settings: Settings
    start: datetime
    end: datetime
    touches: list[Touch]
    unsubscribes: list[Unsubscribe]
    timezones: dict[str, ZoneInfo]
    shop_zone: ZoneInfo
    by_customer: dict[str, list[Touch]] = field(init=False)
    #: What the parts of a report computed from these rows, kept for the next part.
    memo: dict[Hashable, Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.by_customer = defaultdict(list)
        for touch in self.touches:
            self.by_customer[touch.customer_id].append(touch)

    @classmethod
    def load(cls, session: Session, settings: Settings, start: datetime, end: datetime) -> History:
        """Read the touchpoints, unsubscribes and customers' time zones of ``[start, end)``."""
        kinds = [journey.kind for journey in discover(settings.journey_modules)]
        columns = [col(getattr(Touchpoint, name)) for name in _COLUMNS]
        rows = session.exec(
            select(*columns)
            .where(col(Touchpoint.occurred_at) >= start, col(Touchpoint.occurred_at) < end)
            .order_by(col(Touchpoint.occurred_at), col(Touchpoint.id))
        ).all()
        touches = [
            Touch(
                id=row[0] or 0,
                customer_id=row[1],
                kind=row[2],
                at=row[3],
                journey_id=row[4],
                journey_kind=row[5] or (journey_kind(row[4], kinds) if row[4] else None),
                step=row[6],
                variant=row[7],
                channel=row[8],
                order_id=row[9],
                value_minor=row[10],
                currency=row[11],
                coupon_code=row[12],
                detail=row[13] or {},
                key=row[14],
            )
            for row in rows
        ]
        shop_zone = known_timezone(settings.shop_timezone) or ZoneInfo("UTC")
        zones = session.exec(
            select(Customer.customer_id, Customer.timezone).where(
                col(Customer.timezone).is_not(None)
            )
        ).all()
        timezones = {cid: zone for cid, name in zones if (zone := known_timezone(name or ""))}
        return cls(
            settings=settings,
            start=start,
            end=end,
            touches=touches,
            unsubscribes=_unsubscribes(session, kinds, start, end),
            timezones=timezones,
            shop_zone=shop_zone,
        )

    def zone_of(self, customer_id: str) -> ZoneInfo:
        """The customer's own time zone, else the shop's."""
        return self.timezones.get(customer_id, self.shop_zone)

    def human(self, touch: Touch) -> bool:
        """Whether an open or click counts as a person's."""
        return self.settings.machine_opens_count or not touch.detail.get("machine")

    def remembered(self, key: Hashable, compute: Callable[[], T]) -> T:
        """``compute()``, once per ``key`` for these rows."""
        if key not in self.memo:
            self.memo[key] = compute()
        return cast(T, self.memo[key])

    def messages(self, until: datetime) -> dict[str, Message]:
        """Every message, from its touchpoints before ``until`` (read-only: shared)."""
        return self.remembered(("messages", until), lambda: self._messages(until))

    def _messages(self, until: datetime) -> dict[str, Message]:
        found: dict[str, Message] = {}
        for touch in self.touches:
            if touch.at >= until:
                break
            if touch.kind not in (SENT, DELIVERED, BOUNCED, OPENED, CLICKED):
                continue
            message = found.get(touch.message)
            if message is None:
                message = found[touch.message] = Message(
                    key=touch.message,
                    customer_id=touch.customer_id,
                    journey_kind=touch.journey_kind,
                    journey_id=touch.journey_id,
                    step=touch.step,
                )
            message.variant = message.variant or touch.variant
            if touch.kind == SENT:
                message.sent_at = message.sent_at or touch.at
                message.attempted_at = min(message.attempted_at or touch.at, touch.at)
            elif touch.kind == BOUNCED:
                message.bounced_at = message.bounced_at or touch.at
                message.attempted_at = min(message.attempted_at or touch.at, touch.at)
            elif touch.kind == DELIVERED:
                message.delivered_at = message.delivered_at or touch.at
            elif self.human(touch):
                if touch.kind == OPENED:
                    message.opened_at = message.opened_at or touch.at
                else:
                    message.clicked_at = message.clicked_at or touch.at
        return found

    def purchases(self) -> list[Touch]:
        """Every purchase, once per customer and order id (see the module docstring)."""
        return self.remembered("purchases", self._purchases)

    def _purchases(self) -> list[Touch]:
        chosen: dict[tuple[str, str], Touch] = {}
        loose: list[Touch] = []
        for touch in self.touches:
            if touch.kind not in (PURCHASE, CONVERSION):
                continue
            if touch.order_id is None:
                loose.append(touch)
                continue
            key = (touch.customer_id, touch.order_id)
            held = chosen.get(key)
            if held is None or (held.kind == CONVERSION and touch.kind == PURCHASE):
                chosen[key] = touch
        return sorted([*chosen.values(), *loose], key=lambda t: (t.at, t.id))


def _unsubscribes(
    session: Session, kinds: list[str], start: datetime, end: datetime
) -> list[Unsubscribe]:
    c = ConsentChange
    rows = session.exec(
        select(c.customer_id, c.changed_at, c.kind, c.detail)
        .where(
            c.channel == "email",
            c.state == "unsubscribed",
            col(c.changed_at) >= start,
            col(c.changed_at) < end,
        )
        .order_by(col(c.changed_at))
    ).all()
    message_ids = {
        detail.removeprefix(UNSUBSCRIBE_LINK_PREFIX)
        for *_, detail in rows
        if detail and detail.startswith(UNSUBSCRIBE_LINK_PREFIX)
    }
    journeys = dict(_journeys_of(session, message_ids))
    found = []
    for customer_id, at, kind, detail in rows:
        if kind is None and detail and detail.startswith(UNSUBSCRIBE_LINK_PREFIX):
            journey_id = journeys.get(detail.removeprefix(UNSUBSCRIBE_LINK_PREFIX))
            kind = journey_kind(journey_id, kinds) if journey_id else None
        found.append(Unsubscribe(customer_id=customer_id, at=at, journey_kind=kind))
    return found


def _journeys_of(session: Session, message_ids: Iterable[str]) -> Iterable[tuple[str, str]]:
    wanted = sorted(message_ids)
    if not wanted:
        return []
    return session.exec(
        select(EmailMessage.message_id, EmailMessage.journey_id).where(
            col(EmailMessage.message_id).in_(wanted)
        )
    ).all()
