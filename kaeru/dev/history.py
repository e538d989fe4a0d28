"""A seeded, plausible touchpoint history whose right answers are known.

:func:`generate` writes, for each customer, one story in one of two weeks (the week from
``start``, or the one before): they enter one or two journeys (a variant, sometimes the
holdout), get emails (some bounce, some have a provider's delivery report, some are opened by
a machine, by a person, clicked), join an ad audience and click an ad, get a coupon,
unsubscribe from a journey, visit a store, and buy online or in the store, in euros or yen,
soon after an email, exactly one attribution window after it, or just too late.

As it decides each story it counts what the report must say (:class:`Truth`): its own
bookkeeping, written beside the decisions, never read back from the database. The reports'
tests compare :func:`kaeru.analytics.report.build_report` with it for several seeds
(default settings: last-touch attribution over 5 days).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlmodel import Session

from kaeru.analytics.model import ALL, Period
from kaeru.consent import set_consent
from kaeru.models import Customer
from kaeru.touchpoints import record_touchpoint

#: Journey kinds of the history and their message steps; the last one offers a coupon
#: when it is ``offer``.
STEPS = {
    "cart-abandonment": ("reminder", "offer"),
    "win-back": ("come_back",),
    "welcome": ("hello", "tips"),
}
ZONES = (None, "Asia/Tokyo", "Europe/Berlin", "America/New_York")
#: The attribution window the truth assumes (``KAERU_ATTRIBUTION_WINDOW``'s default).
WINDOW = timedelta(days=5)
WEEK = timedelta(days=7)
# The kinds as the email activity, the tracking links and the kit write them.
SENT = "email_sent"
BOUNCED = "email_bounced"
DELIVERED = "email_delivered"
OPENED = "email_opened"
CLICKED = "email_clicked"
ENTERED = "journey_entered"


@dataclass
class PeriodTruth:
    """What the report of one week must say."""

    period: Period
    #: Per journey kind and :data:`ALL`: entered, sent, delivered, opens, clicks, bounces,
    #: unsubscribes, conversions.
    counts: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    revenue: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    #: Per (journey kind, step, variant): credited orders and their revenue.
    orders: Counter[tuple[str, str, str | None]] = field(default_factory=Counter)
    credited: dict[tuple[str, str, str | None], Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter)
    )
    #: Per (journey kind, version or None): stage name -> the customers who reached it.
    funnel: dict[tuple[str, str | None], dict[str, set[str]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(set))
    )
    #: Per customer: their route's steps as (journey kind or None, label), whether it ended
    #: in a purchase, and its revenue.
    walks: list[tuple[list[tuple[str | None, str]], bool, dict[str, int]]] = field(
        default_factory=list
    )
    opens: list[list[int]] = field(default_factory=lambda: [[0] * 24 for _ in range(7)])
    clicks: list[list[int]] = field(default_factory=lambda: [[0] * 24 for _ in range(7)])

    def count(self, kind: str, what: str) -> None:
        self.counts[kind][what] += 1
        self.counts[ALL][what] += 1

    def routes(self, steps: int) -> dict[str, Counter[tuple[tuple[str, ...], bool]]]:
        """Per journey kind and :data:`ALL`: how many customers took each route (cut after
        ``steps`` steps) with each outcome."""
        found: dict[str, Counter[tuple[tuple[str, ...], bool]]] = defaultdict(Counter)
        for labels, converted, _ in self.walks:
            if not labels:
                continue  # a holdout who did not buy: no touch, no route
            everyone = [f"{kind}: {label}" if kind else label for kind, label in labels]
            found[ALL][(_merged(everyone)[:steps], converted)] += 1
            for kind in {k for k, _ in labels if k is not None}:
                first = next(i for i, (k, _) in enumerate(labels) if k == kind)
                mine = [label for k, label in labels[first:] if k in (kind, None)]
                found[kind][(_merged(mine)[:steps], converted)] += 1
        return found

    def route_revenue(self, steps: int) -> dict[tuple[str, ...], Counter[str]]:
        """Revenue per route across journeys (:data:`ALL`), cut after ``steps`` steps."""
        found: dict[tuple[str, ...], Counter[str]] = defaultdict(Counter)
        for labels, _, revenue in self.walks:
            if not labels:
                continue
            everyone = [f"{kind}: {label}" if kind else label for kind, label in labels]
            found[_merged(everyone)[:steps]].update(revenue)
        return found


def _merged(labels: list[str]) -> tuple[str, ...]:
    merged: list[str] = []
    for label in labels:
        if not merged or merged[-1] != label:
            merged.append(label)
    return tuple(merged)


@dataclass
class Truth:
    """The right answers for the week from ``start`` and the week before it."""

    current: PeriodTruth
    previous: PeriodTruth


def generate(
    session: Session,
    seed: int,
    customers: int,
    start: datetime,
    *,
    shop_timezone: str = "UTC",
) -> Truth:
    """Write ``customers`` stories around ``start`` (a datetime, aware) and return the truth.

    The caller commits. ``shop_timezone``: the ``KAERU_SHOP_TIMEZONE`` of the report, the
    zone of customers who have none.
    """
    rng = random.Random(seed)
    truth = Truth(
        current=PeriodTruth(Period(start, start + WEEK)),
        previous=PeriodTruth(Period(start - WEEK, start)),
    )
    shop = ZoneInfo(shop_timezone)
    for n in range(customers):
        week = truth.previous if n % 2 == 0 else truth.current
        customer = f"h{seed}-{n:05d}"
        zone_name = rng.choice(ZONES)
        session.add(Customer(customer_id=customer, timezone=zone_name))
        _Story(session, rng, customer, week, ZoneInfo(zone_name) if zone_name else shop).tell()
    session.flush()
    return truth


class _Story:
    """One customer's story, written in time order, counted as it is decided."""

    def __init__(
        self,
        s: Session,
        rng: random.Random,
        customer: str,
        truth: PeriodTruth,
        zone: ZoneInfo,
    ) -> None:
        self.s, self.rng, self.customer, self.truth, self.zone = s, rng, customer, truth, zone
        # Stories begin in the first 6 hours of their week and their journeys last at most
        # about 30 hours, so every purchase (at most a window and a second after a person's
        # open or click, or two days after the last touch) stays in the week.
        self.clock = truth.period.start + timedelta(minutes=rng.randrange(1, 6 * 60))
        self.labels: list[tuple[str | None, str]] = []
        #: The last person's open or click: when, and what it credits.
        self.last_human: tuple[datetime, str, str, str | None, str | None] | None = None
        self.coupon: str | None = None
        self.unsubscribed = False

    def later(self, low: float, high: float) -> datetime:
        """Move the clock on by ``low`` to ``high`` minutes."""
        self.clock += timedelta(minutes=self.rng.uniform(low, high))
        return self.clock

    def touch(self, kind: str, at: datetime, **fields: Any) -> None:
        record_touchpoint(self.s, customer_id=self.customer, kind=kind, occurred_at=at, **fields)

    def reach(self, kind: str, version: str | None, stage: str) -> None:
        self.truth.funnel[(kind, None)][stage].add(self.customer)
        if version is not None:
            self.truth.funnel[(kind, version)][stage].add(self.customer)

    def tell(self) -> None:
        kinds = list(STEPS)
        self.rng.shuffle(kinds)
        for kind in kinds[: 2 if self.rng.random() < 0.25 else 1]:
            self.journey(kind)
            self.later(30, 120)
        if self.rng.random() < 0.45:
            self.purchase()
        else:
            self.truth.walks.append((self.labels, False, {}))

    def journey(self, kind: str) -> None:
        journey_id = f"{kind}-{self.customer}"
        version = self.rng.choice(("1", "2"))
        roll = self.rng.random()
        variant = "holdout" if roll < 0.1 else "A" if roll < 0.55 else "B"
        ids = {"journey_id": journey_id, "journey_kind": kind}
        self.touch(ENTERED, self.later(0, 5), variant=variant, detail={"version": version}, **ids)
        self.truth.count(kind, "entered")
        self.reach(kind, version, "entered")
        if variant == "holdout":
            return  # recorded, and sent nothing
        for step in STEPS[kind]:
            self.message(kind, version, variant, step, ids)
            if step == "offer":
                self.touch(
                    "coupon_issued",
                    self.later(0, 1),
                    step=step,
                    coupon_code=(code := f"C{self.customer}"),
                    value_minor=1000,
                    currency="EUR",
                    **ids,
                )
                self.coupon = code
                self.reach(kind, version, "offer")
                self.labels.append((kind, "coupon issued"))
        if self.rng.random() < 0.3:
            self.touch("audience_joined", self.later(1, 30), channel="ads", **ids)
            self.reach(kind, version, "audience")
            self.labels.append((kind, "ad audience"))
            if self.rng.random() < 0.4:
                self.touch("ad_clicked", self.later(10, 120), channel="ads", **ids)
                self.reach(kind, version, "ad click")
                self.labels.append((kind, "ad clicked"))
        if not self.unsubscribed and self.rng.random() < 0.05:
            at = self.later(1, 30)
            set_consent(self.s, self.customer, "email", False, "preference_page", kind=kind, at=at)
            self.unsubscribed = True
            self.truth.count(kind, "unsubscribes")

    def message(
        self, kind: str, version: str, variant: str, step: str, ids: dict[str, str]
    ) -> None:
        key = f"{ids['journey_id']}/run-1/{step}"
        fields = {"step": step, "channel": "email", **ids}
        sent = self.later(1, 60)
        self.truth.count(kind, "sent")
        self.reach(kind, version, f"sent: {step}")
        if self.rng.random() < 0.06:
            self.touch(BOUNCED, sent, key=f"{key}/{BOUNCED}", variant=variant, **fields)
            self.truth.count(kind, "bounces")
            return
        self.touch(SENT, sent, key=f"{key}/{SENT}", variant=variant, **fields)
        self.labels.append((kind, "email sent"))
        self.truth.count(kind, "delivered")
        self.reach(kind, version, "delivered")
        if self.rng.random() < 0.5:  # a provider that reports deliveries
            self.touch(DELIVERED, self.later(0, 1), key=f"{key}/{DELIVERED}", **fields)
        hit = {"message_key": key}
        if self.rng.random() < 0.2:  # Apple Mail Privacy Protection fetches the pixel
            machine = {**hit, "machine": True, "machine_reason": "apple_mpp"}
            self.touch(OPENED, self.later(0, 0.1), detail=machine, **fields)
        opened = self.rng.random() < 0.5
        if opened:
            self.human(kind, version, variant, OPENED, step, hit, fields)
            if self.rng.random() < 0.2:  # opened again: one open of the message, two hits
                self.human(kind, version, variant, OPENED, step, hit, fields, again=True)
        if self.rng.random() < (0.5 if opened else 0.05):
            self.human(kind, version, variant, CLICKED, step, hit, fields)

    def human(
        self,
        kind: str,
        version: str,
        variant: str,
        what: str,
        step: str,
        hit: dict[str, str],
        fields: dict[str, str],
        *,
        again: bool = False,
    ) -> None:
        at = self.later(5, 90)
        self.touch(what, at, detail={**hit, "machine": False}, **fields)
        local = at.astimezone(self.zone)
        grid = self.truth.opens if what == OPENED else self.truth.clicks
        grid[local.weekday()][local.hour] += 1
        self.labels.append((kind, "email opened" if what == OPENED else "email clicked"))
        self.last_human = (at, kind, step, variant, version)
        if not again:
            self.truth.count(kind, "opens" if what == OPENED else "clicks")
            self.reach(kind, version, "opened" if what == OPENED else "clicked")

    def purchase(self) -> None:
        credit = None
        roll = self.rng.random()
        if self.last_human is not None and roll < 0.15:
            at = self.last_human[0] + WINDOW  # exactly at the window's edge: credited
            credit = self.last_human
        elif self.last_human is not None and roll < 0.3:
            at = self.last_human[0] + WINDOW + timedelta(seconds=1)  # just too late
        else:
            at = self.clock + timedelta(minutes=self.rng.uniform(1, 2 * 24 * 60))
            credit = self.last_human  # at most a day and two later: within the window
        channel = "pos" if self.rng.random() < 0.3 else "web"
        if self.rng.random() < 0.2:
            self.touch("visit", self.clock + (at - self.clock) / 2, channel="pos")
            self.labels.append((None, "visit (pos)"))
        currency = "EUR" if self.rng.random() < 0.7 else "JPY"
        value = self.rng.randrange(500, 20000)
        order = f"o-{self.customer}"
        coupon = self.coupon if self.coupon and self.rng.random() < 0.6 else None
        self.touch(
            "purchase",
            at,
            key=f"purchase/{order}",
            order_id=order,
            value_minor=value,
            currency=currency,
            channel=channel,
            coupon_code=coupon,
        )
        if coupon is not None:
            self.touch("coupon_redeemed", at, coupon_code=coupon, order_id=order)
        self.labels.append((None, f"purchase ({channel})"))
        self.truth.walks.append((self.labels, True, {currency: value}))
        if credit is None:
            return
        _, kind, step, variant, version = credit
        if self.rng.random() < 0.5:  # the journey's own record of the same order
            self.touch(
                "conversion",
                at,
                journey_id=f"{kind}-{self.customer}",
                journey_kind=kind,
                step=step,
                order_id=order,
                value_minor=value,
                currency=currency,
            )
        self.truth.count(kind, "conversions")
        self.truth.revenue[kind][currency] += value
        self.truth.revenue[ALL][currency] += value
        self.truth.orders[(kind, step, variant)] += 1
        self.truth.credited[(kind, step, variant)][currency] += value
        self.reach(kind, version, "purchased")
