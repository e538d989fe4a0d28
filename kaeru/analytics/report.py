"""The report of a period: KPIs, funnels, attribution, routes and the send-time heatmap.

Every part is a function of a :class:`~sqlmodel.Session`, the settings and a
:class:`~kaeru.analytics.model.Period` (``kpis``, ``funnels``, ``attribution``, ``routes``,
``heatmap``), and :func:`build_report` computes them all from one read of the touchpoints.
The rows are read once (:class:`~kaeru.analytics.history.History`, which also says what each
row means) and counted in Python: the rules (which message a purchase is credited to, where a
route ends) read plainly there and are the same on SQLite and PostgreSQL.

A period is half-open, ``[start, end)``; a number of a period is what was known at its end
(rows after it do not change it), so last week's report reads the same next month.
Experiments are not computed here (``Report.experiments`` stays empty).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime

from sqlmodel import Session

from kaeru.analytics.history import (
    AD_CLICKED,
    AUDIENCE_JOINED,
    BOUNCED,
    CLICKED,
    CONVERSION,
    COUPON_ISSUED,
    DELIVERED,
    ENTERED,
    OPENED,
    PURCHASE,
    SENT,
    History,
    Message,
    Touch,
)
from kaeru.analytics.model import (
    ALL,
    Attribution,
    Funnel,
    FunnelStage,
    Heatmap,
    KpiComparison,
    Kpis,
    Period,
    Report,
    Route,
)
from kaeru.settings import Settings

#: A route's group of every route beyond the top ones.
OTHER = ("other",)


def build_report(session: Session, settings: Settings, period: Period) -> Report:
    """The whole report of ``period`` (its KPIs also of the period before); experiments ``()``."""
    history = load(session, settings, period)
    return Report(
        period=period,
        kpis=kpis_of(history, period),
        funnels=funnels_of(history, period),
        attribution=attribution_of(credits(history, period)),
        routes=routes_of(history, period),
        heatmap=heatmap_of(history, period),
    )


def load(session: Session, settings: Settings, period: Period) -> History:
    """The rows every part of ``period``'s report needs: from the start of the period before,
    less one attribution window (an open just before a period credits a purchase in it)."""
    start = period.previous().start - settings.attribution_window
    return History.load(session, settings, start, period.end)


# ---- the parts, each on its own ---------------------------------------------------------------


def kpis(session: Session, settings: Settings, period: Period) -> dict[str, KpiComparison]:
    """The KPIs of every journey kind and of :data:`ALL`, against the period before."""
    return kpis_of(load(session, settings, period), period)


def funnels(session: Session, settings: Settings, period: Period) -> tuple[Funnel, ...]:
    """The funnel of every journey kind: whole, per journey version and per day."""
    return funnels_of(load(session, settings, period), period)


def attribution(session: Session, settings: Settings, period: Period) -> tuple[Attribution, ...]:
    """The orders and revenue of ``period`` credited to each journey kind, step and variant."""
    history = load(session, settings, period)
    return attribution_of(credits(history, period))


def routes(session: Session, settings: Settings, period: Period) -> tuple[Route, ...]:
    """The top routes of ``period``, across journeys and per journey kind."""
    return routes_of(load(session, settings, period), period)


def heatmap(session: Session, settings: Settings, period: Period) -> Heatmap:
    """Human opens and clicks of ``period`` by weekday and hour, in each customer's zone."""
    return heatmap_of(load(session, settings, period), period)


# ---- attribution ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credit:
    """A purchase and the message touch it is credited to (``touch`` None: not credited)."""

    purchase: Touch
    touch: Touch | None
    journey_kind: str | None
    step: str | None
    variant: str | None


def credits(history: History, period: Period) -> list[Credit]:
    """Every purchase of ``period`` and what it is credited to (``KAERU_ATTRIBUTION_MODEL``).

    ``last-touch`` (the default): the customer's last human open or click of a journey's
    message at most ``KAERU_ATTRIBUTION_WINDOW`` before the purchase (``0 <= purchase - touch
    <= window``: a purchase exactly one window after the open is credited, one second later
    it is not); ``first-touch``: the first such open or click; ``delivery``: the last message
    delivered within the window, opened or not (Braze's window counted from delivery). Each
    purchase is credited at most once, whatever its channel (a store purchase after an email
    counts), and carries the journey kind, step and variant of the message.
    """
    return history.remembered(("credits", period), lambda: _credits(history, period))


def _credits(history: History, period: Period) -> list[Credit]:
    settings = history.settings
    window = settings.attribution_window
    messages = history.messages(period.end)
    touches: dict[str, list[tuple[datetime, int, Touch, Message]]] = defaultdict(list)
    if settings.attribution_model == "delivery":
        by_key = {touch.message: touch for touch in history.touches if touch.kind in (SENT,)}
        for message in messages.values():
            at = message.delivery_at
            sent = by_key.get(message.key)
            if at is not None and sent is not None and message.journey_kind is not None:
                touches[message.customer_id].append((at, sent.id, sent, message))
    else:
        for touch in history.touches:
            if (
                touch.kind in (OPENED, CLICKED)
                and touch.journey_kind is not None
                and history.human(touch)
            ):
                message = messages.get(touch.message) or _loose(touch)
                touches[touch.customer_id].append((touch.at, touch.id, touch, message))
    first = settings.attribution_model == "first-touch"
    found = []
    for purchase in history.purchases():
        if not period.start <= purchase.at < period.end:
            continue
        fitting = [
            entry
            for entry in touches.get(purchase.customer_id, ())
            if entry[0] <= purchase.at and purchase.at - entry[0] <= window
        ]
        if not fitting:
            found.append(Credit(purchase, None, None, None, None))
            continue
        at, _, touch, message = min(fitting) if first else max(fitting)
        found.append(
            Credit(
                purchase=purchase,
                touch=touch,
                journey_kind=touch.journey_kind,
                step=touch.step,
                variant=touch.variant or message.variant,
            )
        )
    return found


def _loose(touch: Touch) -> Message:
    return Message(
        key=touch.message,
        customer_id=touch.customer_id,
        journey_kind=touch.journey_kind,
        journey_id=touch.journey_id,
        step=touch.step,
        variant=touch.variant,
    )


def attribution_of(credit: Iterable[Credit]) -> tuple[Attribution, ...]:
    """Credited orders and revenue per journey kind, step and variant (revenue per currency)."""
    orders: Counter[tuple[str, str, str | None]] = Counter()
    revenue: dict[tuple[str, str, str | None], Counter[str]] = defaultdict(Counter)
    for c in credit:
        if c.journey_kind is None:
            continue
        key = (c.journey_kind, c.step or "", c.variant)
        orders[key] += 1
        _add_money(revenue[key], c.purchase)
    return tuple(
        Attribution(
            journey_kind=kind,
            step=step,
            variant=variant,
            orders=orders[(kind, step, variant)],
            revenue=dict(sorted(revenue[(kind, step, variant)].items())),
        )
        for kind, step, variant in sorted(orders, key=lambda k: (k[0], k[1], k[2] or ""))
    )


def _add_money(total: Counter[str], purchase: Touch) -> None:
    # An order without a currency has a value nobody can add to any other: it counts as an
    # order, with no revenue.
    if purchase.value_minor is not None and purchase.currency:
        total[purchase.currency] += purchase.value_minor


# ---- KPIs -------------------------------------------------------------------------------------


def kpis_of(history: History, period: Period) -> dict[str, KpiComparison]:
    """Each kind's :func:`kpis_in` in ``period`` and the period before (kinds seen in either)."""
    before = period.previous()
    now, then = kpis_in(history, period), kpis_in(history, before)
    kinds = sorted((set(now) | set(then)) - {ALL})
    return {
        kind: KpiComparison(
            current=now.get(kind) or _empty(kind), previous=then.get(kind) or _empty(kind)
        )
        for kind in [ALL, *kinds]
    }


def kpis_in(history: History, period: Period) -> dict[str, Kpis]:
    """The KPIs of one period, per journey kind and :data:`ALL`.

    Counts:

    - ``entered``: ``journey_entered`` rows in the period (journeys started before those rows
      existed are not counted: 0 says "not recorded", never a guess);
    - ``messages_sent``: messages handed to the mail server in the period (sent, or refused
      by it and so bounced at once);
    - ``delivered``: of those, the ones with an ``email_delivered`` row where a provider
      reports delivery, else the ones sent and not bounced;
    - ``human_opens`` / ``clicks``: of those, the messages a person opened / clicked (once
      per message, however often; machine opens never, unless ``KAERU_MACHINE_OPENS_COUNT``);
    - ``bounces``: of those, the messages bounced;
    - ``unsubscribes``: email unsubscribes in the period, for the kind opted out of or whose
      message's link was used (:data:`ALL`: every one);
    - ``conversions`` / ``revenue``: purchases of the period credited to the kind
      (:func:`credits`), revenue per currency.

    Rates (``None`` when the denominator is 0): ``delivery_rate`` = delivered / sent,
    ``bounce_rate`` = bounces / sent, ``open_rate`` = human opens / delivered,
    ``click_rate`` = clicks / delivered, ``unsubscribe_rate`` = unsubscribes / delivered,
    ``conversion_rate`` = conversions / delivered (Klaviyo's placed-order rate).
    """
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    revenue: dict[str, Counter[str]] = defaultdict(Counter)

    def count(kind: str | None, what: str) -> None:
        counts[ALL][what] += 1
        if kind is not None:
            counts[kind][what] += 1

    for touch in history.touches:
        if touch.kind == ENTERED and period.start <= touch.at < period.end:
            count(touch.journey_kind, "entered")
    for message in history.messages(period.end).values():
        if message.attempted_at is None or message.attempted_at < period.start:
            continue
        count(message.journey_kind, "sent")
        if message.delivered:
            count(message.journey_kind, "delivered")
        if message.bounced_at is not None:
            count(message.journey_kind, "bounces")
        if message.opened_at is not None:
            count(message.journey_kind, "opens")
        if message.clicked_at is not None:
            count(message.journey_kind, "clicks")
    for unsubscribe in history.unsubscribes:
        if period.start <= unsubscribe.at < period.end:
            count(unsubscribe.journey_kind, "unsubscribes")
    for c in credits(history, period):
        if c.journey_kind is not None:
            count(c.journey_kind, "conversions")
            _add_money(revenue[ALL], c.purchase)
            _add_money(revenue[c.journey_kind], c.purchase)
    counts.setdefault(ALL, Counter())
    return {kind: _kpis(kind, n, revenue[kind]) for kind, n in counts.items()}


def _kpis(kind: str, n: Counter[str], revenue: Counter[str]) -> Kpis:
    return Kpis(
        journey_kind=kind,
        entered=n["entered"],
        messages_sent=n["sent"],
        delivered=n["delivered"],
        human_opens=n["opens"],
        clicks=n["clicks"],
        unsubscribes=n["unsubscribes"],
        bounces=n["bounces"],
        conversions=n["conversions"],
        revenue=dict(sorted(revenue.items())),
        conversion_rate=rate(n["conversions"], n["delivered"]),
        delivery_rate=rate(n["delivered"], n["sent"]),
        open_rate=rate(n["opens"], n["delivered"]),
        click_rate=rate(n["clicks"], n["delivered"]),
        unsubscribe_rate=rate(n["unsubscribes"], n["delivered"]),
        bounce_rate=rate(n["bounces"], n["sent"]),
    )


def _empty(kind: str) -> Kpis:
    return _kpis(kind, Counter(), Counter())


def rate(numerator: int, denominator: int) -> float | None:
    """``numerator / denominator``; None when nobody reached the denominator."""
    return numerator / denominator if denominator else None


# ---- funnels ----------------------------------------------------------------------------------

#: The stages after the sends, in order (before them: entered, then one per message step).
LATER_STAGES = ("delivered", "opened", "clicked", "audience", "ad click", "offer", "purchased")


def funnels_of(history: History, period: Period) -> tuple[Funnel, ...]:
    """Each journey kind's funnel: customers who reached each stage in the period.

    Stages: ``entered`` (``journey_entered``), ``sent: <step>`` for each message step (in the
    order the kind first sent them; handed to the mail server, as ``messages_sent`` counts),
    ``delivered`` (see :func:`kpis_in`), ``opened`` and ``clicked`` (a person's),
    ``audience`` (joined an ad audience), ``ad click``, ``offer`` (a coupon issued),
    ``purchased`` (a purchase credited to the kind, :func:`credits`). A stage counts
    distinct customers whose touch of that stage happened in the period (for ``day``: on
    that day in the shop's time zone); its ``dropoff`` is the share of the stage before's
    customers who did not reach it. A journey's version is the ``detail["version"]``
    of its ``journey_entered`` row; touches of a journey with none count in no version's
    funnel (only in the one of all versions).
    """
    stages: dict[tuple[str, str | None, date | None, str], set[str]] = defaultdict(set)
    first_sent: dict[tuple[str, str], datetime] = {}
    versions = _versions(history)
    zone = history.shop_zone

    def reach(kind: str, journey_id: str | None, at: datetime, stage: str, customer: str) -> None:
        version = versions.get(journey_id) if journey_id else None
        day = at.astimezone(zone).date()
        for v, d in ((None, None), (None, day), *(((version, None),) if version else ())):
            stages[(kind, v, d, stage)].add(customer)

    messages = history.messages(period.end)
    for touch in history.touches:
        kind = touch.journey_kind
        if kind is None or not period.start <= touch.at < period.end:
            continue
        if touch.kind in (SENT, DELIVERED):
            # Delivered when the provider reported it, else when it was sent (not bounced).
            message = messages.get(touch.message)
            if message is not None and message.delivery_at == touch.at:
                reach(kind, touch.journey_id, touch.at, "delivered", touch.customer_id)
        if touch.kind in (SENT, BOUNCED):
            first_sent.setdefault((kind, touch.step or ""), touch.at)
        stage = _stage_of(touch, history)
        if stage is not None:
            reach(kind, touch.journey_id, touch.at, stage, touch.customer_id)
    for c in credits(history, period):
        if c.journey_kind is not None and c.touch is not None:
            reach(
                c.journey_kind,
                c.touch.journey_id,
                c.purchase.at,
                "purchased",
                c.purchase.customer_id,
            )
    kinds = sorted({key[0] for key in stages})
    found = []
    for kind in kinds:
        steps = sorted((at, step) for (k, step), at in first_sent.items() if k == kind)
        names = ["entered", *(f"sent: {step}" for _, step in steps), *LATER_STAGES]
        keys = sorted(
            {(v, d) for (k, v, d, _) in stages if k == kind},
            key=lambda vd: (vd[0] is not None, vd[0] or "", vd[1] is not None, vd[1] or date.min),
        )
        for version, day in keys:
            found.append(
                Funnel(
                    journey_kind=kind,
                    version=version,
                    day=day,
                    stages=_stages(
                        [stages.get((kind, version, day, n), set()) for n in names], names
                    ),
                )
            )
    return tuple(found)


def _stage_of(touch: Touch, history: History) -> str | None:
    if touch.kind == ENTERED:
        return "entered"
    if touch.kind in (SENT, BOUNCED):
        return f"sent: {touch.step or ''}"
    if touch.kind in (OPENED, CLICKED):
        if not history.human(touch):
            return None
        return "opened" if touch.kind == OPENED else "clicked"
    return {AUDIENCE_JOINED: "audience", AD_CLICKED: "ad click", COUPON_ISSUED: "offer"}.get(
        touch.kind
    )


def _stages(reached_by_stage: list[set[str]], names: list[str]) -> tuple[FunnelStage, ...]:
    found = []
    before: set[str] | None = None
    for name, reached in zip(names, reached_by_stage, strict=True):
        dropoff = None
        if before is not None:
            dropoff = rate(len(before - reached), len(before)) if before else None
        found.append(FunnelStage(name=name, count=len(reached), dropoff=dropoff))
        before = reached
    return tuple(found)


def _versions(history: History) -> dict[str, str]:
    found = {}
    for touch in history.touches:
        version = touch.detail.get("version") if touch.kind == ENTERED else None
        if touch.journey_id is not None and version is not None:
            found[touch.journey_id] = str(version)
    return found


# ---- routes -----------------------------------------------------------------------------------

_LABELS = {
    SENT: "email sent",
    OPENED: "email opened",
    CLICKED: "email clicked",
    AUDIENCE_JOINED: "ad audience",
    AD_CLICKED: "ad clicked",
    COUPON_ISSUED: "coupon issued",
}
#: Touches that are no step of a shopper's route: bookkeeping around the steps (a delivery
#: report, leaving an audience, the entry itself, a refused coupon, the redemption beside
#: its purchase) or a message that never reached them.
_NOT_STEPS = frozenset(
    {DELIVERED, BOUNCED, "audience_left", ENTERED, "coupon_refused", "coupon_redeemed"}
)


def routes_of(history: History, period: Period) -> tuple[Route, ...]:
    """The routes of ``period`` across journeys (:data:`ALL`) and per journey kind.

    A customer's route is their touches of the period in time order as steps (``cart: email
    sent``, ``ad clicked``, ``purchase (pos)``; across journeys a step names its journey
    kind, in one kind's routes it does not, and touches outside any journey, such as
    purchases and store visits, belong to every kind's), consecutive equal steps merged. A
    purchase ends a route (converted, with the purchase's revenue); the next touch starts a
    new one; the period's end ends the rest. One kind's route starts at the customer's first
    touch of that kind. Routes are cut after ``KAERU_ROUTE_STEPS`` steps (keeping their
    outcome); the ``KAERU_ROUTE_TOP`` most taken are kept, the rest summed as ``("other",)``.
    ``customers`` counts routes taken: a customer who bought twice took two routes.
    """
    purchases = {p.id for p in history.purchases()}
    walks: dict[str, list[tuple[tuple[str, ...], Touch | None]]] = defaultdict(list)
    for touches in history.by_customer.values():
        inside = [
            t
            for t in touches
            if period.start <= t.at < period.end and _is_step(t, purchases, history)
        ]
        kinds = {t.journey_kind for t in inside if t.journey_kind is not None}
        walks[ALL].extend(_walk(inside, None, history.settings.route_steps))
        for kind in kinds:
            mine = [t for t in inside if t.journey_kind in (kind, None)]
            walks[kind].extend(_walk(mine, kind, history.settings.route_steps))
    found: list[Route] = []
    for kind in [ALL, *sorted(set(walks) - {ALL})]:
        found.extend(_top(kind, walks[kind], history.settings.route_top))
    return tuple(found)


def _is_step(touch: Touch, purchases: set[int], history: History) -> bool:
    if touch.kind in (PURCHASE, CONVERSION):
        return touch.id in purchases
    if touch.kind in (OPENED, CLICKED):
        return history.human(touch)
    return touch.kind not in _NOT_STEPS


def _label(touch: Touch, kind: str | None) -> str:
    if touch.kind in (PURCHASE, CONVERSION):
        what = "purchase"
    else:
        what = _LABELS.get(touch.kind, touch.kind.replace("_", " "))
    if touch.kind not in _LABELS and touch.channel:
        what = f"{what} ({touch.channel})"
    if kind is None and touch.journey_kind is not None:
        return f"{touch.journey_kind}: {what}"
    return what


def _walk(
    touches: list[Touch], kind: str | None, limit: int
) -> Iterable[tuple[tuple[str, ...], Touch | None]]:
    """Each route in ``touches`` (steps, and its purchase if it converted); ``kind``: one
    kind's routes, which start at a touch of that kind."""
    steps: list[str] = []
    for touch in touches:
        if not steps and kind is not None and touch.journey_kind != kind:
            continue
        label = _label(touch, kind)
        if not steps or steps[-1] != label:
            steps.append(label)
        if touch.kind in (PURCHASE, CONVERSION):
            yield tuple(steps[:limit]), touch
            steps = []
    if steps:
        yield tuple(steps[:limit]), None


def _top(kind: str, walks: list[tuple[tuple[str, ...], Touch | None]], top: int) -> list[Route]:
    taken: Counter[tuple[str, ...]] = Counter()
    converted: Counter[tuple[str, ...]] = Counter()
    revenue: dict[tuple[str, ...], Counter[str]] = defaultdict(Counter)
    for steps, purchase in walks:
        taken[steps] += 1
        if purchase is not None:
            converted[steps] += 1
            _add_money(revenue[steps], purchase)
    ranked = sorted(taken, key=lambda s: (-taken[s], -converted[s], s))
    kept, rest = ranked[:top], ranked[top:]
    found = [_route(kind, s, taken[s], converted[s], revenue[s]) for s in kept]
    if rest:
        money: Counter[str] = Counter()
        for s in rest:
            money.update(revenue[s])
        found.append(
            _route(
                kind,
                OTHER,
                sum(taken[s] for s in rest),
                sum(converted[s] for s in rest),
                money,
            )
        )
    return found


def _route(
    kind: str, steps: tuple[str, ...], customers: int, converted: int, revenue: Counter[str]
) -> Route:
    return Route(
        journey_kind=kind,
        steps=steps,
        customers=customers,
        converted=converted,
        conversion_rate=rate(converted, customers),
        revenue=dict(sorted(revenue.items())),
    )


# ---- heatmap ----------------------------------------------------------------------------------


def heatmap_of(history: History, period: Period) -> Heatmap:
    """A person's opens and clicks of ``period`` by weekday (0 = Monday) × hour in the
    customer's own time zone (else ``KAERU_SHOP_TIMEZONE``)."""
    grids = {OPENED: [[0] * 24 for _ in range(7)], CLICKED: [[0] * 24 for _ in range(7)]}
    for touch in history.touches:
        if touch.kind in grids and period.start <= touch.at < period.end and history.human(touch):
            local = touch.at.astimezone(history.zone_of(touch.customer_id))
            grids[touch.kind][local.weekday()][local.hour] += 1
    return Heatmap(
        opens=tuple(tuple(row) for row in grids[OPENED]),
        clicks=tuple(tuple(row) for row in grids[CLICKED]),
    )
