"""The report against generated histories whose right answers are known (kaeru/dev/history.py),
for several seeds, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from kaeru.analytics.model import ALL, Kpis, Report
from kaeru.analytics.report import build_report, rate
from kaeru.db import migrate, session
from kaeru.dev.history import PeriodTruth, generate
from tests.conftest import make_settings

START = datetime(2026, 11, 2, tzinfo=UTC)
CUSTOMERS = 120


def expected_kpis(truth: PeriodTruth, kind: str) -> tuple[object, ...]:
    n = truth.counts.get(kind)
    assert n is not None, f"the truth has no {kind}"
    return (
        n["entered"],
        n["sent"],
        n["delivered"],
        n["opens"],
        n["clicks"],
        n["unsubscribes"],
        n["bounces"],
        n["conversions"],
        dict(truth.revenue.get(kind, {})),
        rate(n["conversions"], n["delivered"]),
        rate(n["delivered"], n["sent"]),
        rate(n["opens"], n["delivered"]),
        rate(n["clicks"], n["delivered"]),
        rate(n["unsubscribes"], n["delivered"]),
        rate(n["bounces"], n["sent"]),
    )


def reported_kpis(k: Kpis) -> tuple[object, ...]:
    return (
        k.entered,
        k.messages_sent,
        k.delivered,
        k.human_opens,
        k.clicks,
        k.unsubscribes,
        k.bounces,
        k.conversions,
        k.revenue,
        k.conversion_rate,
        k.delivery_rate,
        k.open_rate,
        k.click_rate,
        k.unsubscribe_rate,
        k.bounce_rate,
    )


def assert_matches(report: Report, truth: PeriodTruth, previous: PeriodTruth) -> None:
    # KPIs, in the period and the one before.
    assert set(report.kpis) == set(truth.counts) | set(previous.counts)
    for kind, compared in report.kpis.items():
        assert reported_kpis(compared.current) == expected_kpis(truth, kind), kind
        assert reported_kpis(compared.previous) == expected_kpis(previous, kind), kind
    # Attribution.
    assert {
        (a.journey_kind, a.step, a.variant): (a.orders, a.revenue) for a in report.attribution
    } == {key: (orders, dict(truth.credited[key])) for key, orders in truth.orders.items()}
    # Funnels of the whole period, of all versions and of each.
    funnels = {(f.journey_kind, f.version): f for f in report.funnels if f.day is None}
    assert set(funnels) == set(truth.funnel)
    for key, funnel in funnels.items():
        counts = {stage.name: stage.count for stage in funnel.stages}
        reached = {name: len(customers) for name, customers in truth.funnel[key].items()}
        assert {name: n for name, n in counts.items() if n} == reached, key
    # Routes (all of them: no "other" group), and their revenue across journeys.
    steps = 5
    routes: dict[str, dict[tuple[tuple[str, ...], bool], int]] = {}
    for route in report.routes:
        assert route.steps != ("other",)
        taken = routes.setdefault(route.journey_kind, {})
        if route.converted:
            taken[(route.steps, True)] = route.converted
        if route.customers - route.converted:
            taken[(route.steps, False)] = route.customers - route.converted
    assert routes == {kind: dict(taken) for kind, taken in truth.routes(steps).items()}
    assert {r.steps: r.revenue for r in report.routes if r.journey_kind == ALL} == {
        s: dict(money) for s, money in truth.route_revenue(steps).items()
    }
    # The heatmap.
    assert report.heatmap.opens == tuple(map(tuple, truth.opens))
    assert report.heatmap.clicks == tuple(map(tuple, truth.clicks))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_report_matches_the_generated_truth(database_url: str, seed: int) -> None:
    settings = make_settings(database_url, route_top=10_000, route_steps=5)
    with session(database_url) as s:
        truth = generate(s, seed, CUSTOMERS, START)

    with session(database_url) as s:
        current = build_report(s, settings, truth.current.period)
        before = build_report(s, settings, truth.previous.period)

    everyone = truth.current.counts[ALL]
    assert everyone["conversions"] > 0 and everyone["bounces"] > 0 and everyone["entered"] > 0
    assert_matches(current, truth.current, truth.previous)
    assert current.kpis[ALL].previous == before.kpis[ALL].current


def test_the_history_is_the_same_for_the_same_seed(sqlite_url: str, tmp_path: Path) -> None:
    other = f"sqlite:///{tmp_path / 'other.db'}"
    migrate(other)
    with session(sqlite_url) as s:
        one = generate(s, 7, 40, START)
    with session(other) as s:
        two = generate(s, 7, 40, START)
    with session(other) as s:
        three = generate(s, 8, 40, START)

    assert one == two
    assert one != three
    assert one.current.counts[ALL]["sent"] > 0
