"""A report as people read it: the rows of the dashboard's overview and of the weekly email.

Both show the same :class:`~kaeru.analytics.model.Report` (built by
``kaeru.analytics.report.build_report``), so both read it through these helpers: a KPI with its
change against the period before, money per currency (never summed across currencies), the best
and worst routes, the experiments' verdicts. The stored form (table ``reports``) is
:func:`kaeru.analytics.serialise.report_to_json`, as ``kaeru report --json`` prints it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, time, timedelta

from kaeru.analytics.model import (
    ALL,
    Estimate,
    ExperimentResult,
    KpiComparison,
    Kpis,
    Period,
    Report,
    Route,
)
from kaeru.analytics.report import build_report
from kaeru.db import session as db_session
from kaeru.experiments import experiment_results
from kaeru.money import format_minor
from kaeru.settings import Settings

#: How many routes the email and the overview name as best and as worst.
ROUTES_NAMED = 3


def report_period(end: datetime, every: timedelta) -> Period:
    """The period a scheduled report covers: the ``every`` just before ``end``."""
    return Period(end - every, end)


def period_label(period: Period) -> str:
    """``2026-11-01 to 2026-11-07``: the last day included, with times when not midnight."""

    def at(moment: datetime) -> str:
        if moment.time() == time():
            return moment.strftime("%Y-%m-%d")
        return moment.strftime("%Y-%m-%d %H:%M UTC")

    last = period.end - timedelta(days=1) if period.end.time() == time() else period.end
    return f"{at(period.start)} to {at(last)}"


def picker_dates(period: Period) -> tuple[str, str]:
    """The dashboard's ``start`` and ``end`` (both days included) of ``period``."""
    last = period.end - timedelta(days=1) if period.end.time() == time() else period.end
    return period.start.date().isoformat(), last.date().isoformat()


def money(revenue: Mapping[str, int]) -> list[str]:
    """Each currency's amount on its own (``["19.99 EUR", "500 JPY"]``), never summed."""
    return [format_minor(amount, currency) for currency, amount in sorted(revenue.items())]


def percent(rate: float | None) -> str:
    """A rate as a percentage with one decimal, or ``n/a`` when nobody was there to count."""
    return "n/a" if rate is None else f"{rate * 100:.1f} %"


def _signed(value: int) -> str:
    return f"+{value}" if value > 0 else str(value)


def count_change(current: int, previous: int) -> str:
    """``+3 (+25.0 %)``; ``+3`` when the period before had none (no percentage of zero)."""
    if previous == 0:
        return _signed(current - previous)
    return f"{_signed(current - previous)} ({(current - previous) / previous * 100:+.1f} %)"


def rate_change(current: float | None, previous: float | None) -> str:
    """The change of a rate in percentage points (``+1.5 pp``), ``n/a`` without both."""
    if current is None or previous is None:
        return "n/a"
    return f"{(current - previous) * 100:+.1f} pp"


def money_change(currency: str, current: int, previous: int) -> str:
    """The change of one currency's amount (``+10.00 EUR``)."""
    difference = format_minor(current - previous, currency)
    return difference if current < previous else f"+{difference}"


@dataclass(frozen=True)
class KpiRow:
    """One line of the KPI table: what, this period, the period before, the change."""

    name: str
    current: str
    previous: str
    change: str


_COUNTS = (
    ("Entered", "entered"),
    ("Messages sent", "messages_sent"),
    ("Delivered", "delivered"),
    ("Human opens", "human_opens"),
    ("Clicks", "clicks"),
    ("Conversions", "conversions"),
    ("Unsubscribes", "unsubscribes"),
    ("Bounces", "bounces"),
)
_RATES = (
    ("Conversion rate", "conversion_rate"),
    ("Delivery rate", "delivery_rate"),
    ("Human open rate", "open_rate"),
    ("Click rate", "click_rate"),
    ("Unsubscribe rate", "unsubscribe_rate"),
    ("Bounce rate", "bounce_rate"),
)


def kpi_rows(comparison: KpiComparison) -> list[KpiRow]:
    """The KPI table of one journey kind: revenue per currency first, then counts and rates."""
    current, previous = comparison.current, comparison.previous
    rows = [
        KpiRow(
            f"Revenue recovered ({currency})",
            format_minor(current.revenue.get(currency, 0), currency),
            format_minor(previous.revenue.get(currency, 0), currency),
            money_change(
                currency, current.revenue.get(currency, 0), previous.revenue.get(currency, 0)
            ),
        )
        for currency in sorted(set(current.revenue) | set(previous.revenue))
    ]
    for name, field in _COUNTS:
        now, before = getattr(current, field), getattr(previous, field)
        rows.append(KpiRow(name, str(now), str(before), count_change(now, before)))
    for name, field in _RATES:
        now_rate, before_rate = getattr(current, field), getattr(previous, field)
        rows.append(
            KpiRow(
                name, percent(now_rate), percent(before_rate), rate_change(now_rate, before_rate)
            )
        )
    return rows


def kinds_of(report: Report) -> list[str]:
    """The journey kinds of the report's KPIs: every journey together (:data:`ALL`) first."""
    return sorted(report.kpis, key=lambda kind: (kind != ALL, kind))


def kind_label(kind: str) -> str:
    """How a journey kind is named on a page (:data:`ALL` reads "all journeys")."""
    return "all journeys" if kind == ALL else kind


def route_label(route: Route) -> str:
    """``email_sent → email_opened → purchase``."""
    return " → ".join(route.steps)


def best_and_worst_routes(
    report: Report, count: int = ROUTES_NAMED
) -> tuple[list[Route], list[Route]]:
    """The routes across journeys with the highest and the lowest conversion rate.

    "other" (the grouped tail) is no route of its own, and a route nobody took has no rate:
    both are left out. Only a route that led to a purchase is named best; ties go to the route
    more customers took. A route named best is not named worst too.
    """
    ranked = sorted(
        (
            r
            for r in report.routes
            if r.journey_kind == ALL and r.steps != ("other",) and r.conversion_rate is not None
        ),
        key=lambda r: (-(r.conversion_rate or 0.0), -r.customers, r.steps),
    )
    best = [r for r in ranked if r.converted][:count]
    rest = [r for r in ranked if r not in best]
    worst = sorted(rest, key=lambda r: (r.conversion_rate or 0.0, -r.customers, r.steps))[:count]
    return best, worst


def overall(report: Report) -> Kpis | None:
    """The KPIs of every journey together in the period, if the report has them."""
    comparison = report.kpis.get(ALL)
    return comparison.current if comparison is not None else None


def is_empty(report: Report) -> bool:
    """True when nothing happened in the period: no journey entered, no message, no order."""
    return not report.routes and all(
        c.current.entered == 0 and c.current.messages_sent == 0 and c.current.conversions == 0
        for c in report.kpis.values()
    )


def _estimate(estimate: Estimate | None, scale: Callable[[float], str]) -> str:
    if estimate is None:
        return "–"
    return f"{scale(estimate.difference)} [{scale(estimate.low)}, {scale(estimate.high)}]"


def _pp(value: float) -> str:
    return f"{value * 100:+.1f} pp"


def _minor(currency: str) -> Callable[[float], str]:
    def scale(value: float) -> str:
        text = format_minor(round(value), currency)
        return text if value < 0 else f"+{text}"

    return scale


@dataclass(frozen=True)
class ArmRow:
    """One arm of an experiment as shown: lifts as ``difference [low, high]`` (95 % CI)."""

    name: str
    control: bool
    recipients: int
    conversions: int
    rate: str
    #: Per currency, rounded to the currency's minor unit.
    revenue_per_recipient: list[str]
    lift: str
    p: str
    revenue_lift: list[str]


def arm_rows(experiment: ExperimentResult) -> list[ArmRow]:
    """The arms of ``experiment``, its control first as the experiment lists it."""
    return [
        ArmRow(
            name=v.variant,
            control=v.variant == experiment.control,
            recipients=v.recipients,
            conversions=v.conversions,
            rate=percent(v.conversion_rate),
            revenue_per_recipient=[
                format_minor(round(amount), currency)
                for currency, amount in sorted(v.revenue_per_recipient.items())
            ],
            lift=_estimate(v.conversion_lift, _pp),
            p="–"
            if v.conversion_lift is None or v.conversion_lift.p_value is None
            else f"{v.conversion_lift.p_value:.3f}",
            revenue_lift=[  # each amount names its currency
                _estimate(e, _minor(currency)) for currency, e in sorted(v.revenue_lift.items())
            ],
        )
        for v in experiment.variants
    ]


def experiment_title(experiment: ExperimentResult) -> str:
    """``cart-abandonment: subject``."""
    return f"{kind_label(experiment.journey_kind)}: {experiment.experiment}"


def promoted_note(experiment: ExperimentResult) -> str | None:
    """Which variant a promotion rule made the winner, when, and why, if one did."""
    if not experiment.promoted:
        return None
    note = experiment.promoted
    if experiment.promoted_at is not None:
        note += f" on {experiment.promoted_at:%Y-%m-%d %H:%M UTC}"
    if experiment.promotion_reason:
        note += f": {experiment.promotion_reason}"
    return note


def load_report(settings: Settings, period: Period) -> Report:
    """The report of ``period`` from the database: the analytics' numbers
    (:func:`kaeru.analytics.report.build_report`) and the experiments' results
    (:func:`kaeru.experiments.experiment_results`), read in one transaction."""
    with db_session(settings.resolved_database_url) as s:
        report = build_report(s, settings, period)
        return dataclasses.replace(
            report, experiments=report.experiments or experiment_results(s, settings, period)
        )
