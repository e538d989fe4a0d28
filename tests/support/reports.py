"""A report whose every number is known, written out literally, for the pages and the email."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime

from kaeru.analytics.model import (
    ALL,
    Attribution,
    Estimate,
    ExperimentResult,
    Funnel,
    FunnelStage,
    Heatmap,
    KpiComparison,
    Kpis,
    Period,
    Report,
    Route,
    VariantResult,
)

#: The known report's week (Monday to Sunday).
PERIOD = Period(datetime(2026, 11, 23, tzinfo=UTC), datetime(2026, 11, 30, tzinfo=UTC))


def kpis(kind: str, **numbers: object) -> Kpis:
    values: dict[str, object] = {
        "entered": 0,
        "messages_sent": 0,
        "delivered": 0,
        "human_opens": 0,
        "clicks": 0,
        "unsubscribes": 0,
        "bounces": 0,
        "conversions": 0,
        "revenue": {},
        "conversion_rate": None,
        "delivery_rate": None,
        "open_rate": None,
        "click_rate": None,
        "unsubscribe_rate": None,
        "bounce_rate": None,
    }
    values.update(numbers)
    return Kpis(journey_kind=kind, **values)  # type: ignore[arg-type]


def empty_heatmap() -> Heatmap:
    return Heatmap(opens=((0,) * 24,) * 7, clicks=((0,) * 24,) * 7)


def known_report() -> Report:
    """A week: 40 carts entered (32 the week before), 8 converted, revenue in EUR and JPY."""
    current = kpis(
        "cart-abandonment",
        entered=40,
        messages_sent=60,
        delivered=57,
        human_opens=30,
        clicks=12,
        unsubscribes=1,
        bounces=3,
        conversions=8,
        revenue={"EUR": 45_990, "JPY": 12_000},
        conversion_rate=0.2,
        delivery_rate=0.95,
        open_rate=30 / 57,
        click_rate=12 / 57,
        unsubscribe_rate=1 / 57,
        bounce_rate=0.05,
    )
    previous = kpis(
        "cart-abandonment",
        entered=32,
        messages_sent=50,
        delivered=50,
        conversions=4,
        revenue={"EUR": 20_000},
        conversion_rate=0.125,
        delivery_rate=1.0,
    )
    opens = [[0] * 24 for _ in range(7)]
    opens[1][9] = 7  # Tuesday 09:00
    opens[4][20] = 3
    clicks = [[0] * 24 for _ in range(7)]
    clicks[1][9] = 2
    stages = (
        FunnelStage("entered", 40, None),
        FunnelStage("sent: reminder", 38, 0.05),
        FunnelStage("delivered", 36, 2 / 38),
        FunnelStage("opened", 18, 0.5),
        FunnelStage("clicked", 9, 0.5),
        FunnelStage("purchased", 8, 1 / 9),
    )
    return Report(
        period=PERIOD,
        kpis={
            ALL: KpiComparison(
                replace(current, journey_kind=ALL), replace(previous, journey_kind=ALL)
            ),
            "cart-abandonment": KpiComparison(current, previous),
        },
        funnels=(
            Funnel("cart-abandonment", None, None, stages),
            Funnel("cart-abandonment", "2", None, stages),
            Funnel("cart-abandonment", None, date(2026, 11, 24), stages),
        ),
        attribution=(
            Attribution("cart-abandonment", "reminder", None, 5, {"EUR": 30_000}),
            Attribution("cart-abandonment", "offer", "b", 3, {"JPY": 12_000, "EUR": 15_990}),
        ),
        routes=(
            Route(ALL, ("email_sent", "email_opened", "purchase"), 10, 6, 0.6, {"EUR": 30_000}),
            Route(ALL, ("email_sent",), 20, 1, 0.05, {"EUR": 1_990}),
            Route(ALL, ("email_sent", "email_clicked"), 5, 1, 0.2, {"JPY": 12_000}),
            Route(ALL, ("ad_click", "purchase"), 4, 0, 0.0, {}),
            Route(ALL, ("other",), 3, 0, 0.0, {}),
            Route(
                "cart-abandonment",
                ("email_sent", "email_opened", "purchase"),
                10,
                6,
                0.6,
                {"EUR": 30_000},
            ),
        ),
        heatmap=Heatmap(
            opens=tuple(tuple(r) for r in opens), clicks=tuple(tuple(r) for r in clicks)
        ),
        experiments=(
            ExperimentResult(
                journey_kind="cart-abandonment",
                experiment="subject",
                control="holdout",
                variants=(
                    VariantResult("holdout", 600, 30, 0.05, {"EUR": 100.0}, None, {}),
                    VariantResult(
                        "b",
                        640,
                        64,
                        0.1,
                        {"EUR": 250.0},
                        Estimate(0.05, 0.021, 0.079, 0.0008),
                        {"EUR": Estimate(150.0, 20.0, 280.0, 0.02)},
                    ),
                ),
                verdict="b wins",
            ),
        ),
    )
