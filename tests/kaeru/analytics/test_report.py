"""The report's numbers on hand-written histories with literal expected answers, on SQLite and
PostgreSQL: the attribution window's edge, a customer in two journeys, an order with a
coupon, a store purchase after an email, a variant with zero sends, a machine open."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlmodel import Session

from kaeru.analytics.model import ALL, FunnelStage, Period, Route
from kaeru.analytics.report import attribution, build_report, funnels, heatmap, kpis, routes
from kaeru.consent import set_consent
from kaeru.db import session
from kaeru.models import Customer, EmailMessage, Touchpoint
from kaeru.settings import Settings
from kaeru.touchpoints import record_touchpoint
from tests.conftest import make_settings

#: A Monday, 00:00 UTC.
MONDAY = datetime(2026, 11, 2, tzinfo=UTC)
WEEK = Period(MONDAY, MONDAY + timedelta(days=7))
CART = "cart-abandonment"
WIN_BACK = "win-back"


class Shop:
    """Writes touchpoints as the journeys, the tracking links and ingestion do."""

    def __init__(self, s: Session) -> None:
        self.s = s

    def touch(self, customer: str, kind: str, at: datetime, **fields: Any) -> Touchpoint:
        return record_touchpoint(self.s, customer_id=customer, kind=kind, occurred_at=at, **fields)

    def email(
        self,
        customer: str,
        journey: str,
        step: str,
        at: datetime,
        *,
        variant: str | None = None,
        bounced: bool = False,
    ) -> str:
        """A message sent (or refused and bounced) at ``at``; its key."""
        key = f"{journey}-{customer}/run-1/{step}"
        kind = "email_bounced" if bounced else "email_sent"
        self.touch(
            customer,
            kind,
            at,
            key=f"{key}/{kind}",
            journey_id=f"{journey}-{customer}",
            journey_kind=journey,
            step=step,
            variant=variant,
            channel="email",
        )
        return key

    def hit(
        self, customer: str, message: str, kind: str, at: datetime, *, machine: bool = False
    ) -> None:
        """An open or click (``kind``) of ``message`` (a key from :meth:`email`)."""
        journey, _, rest = message.partition("/")
        step = rest.split("/")[-1]
        self.touch(
            customer,
            f"email_{kind}",
            at,
            journey_id=journey,
            journey_kind=journey.removesuffix(f"-{customer}"),
            step=step,
            channel="email",
            detail={"message_key": message, "machine": machine},
        )

    def buy(
        self,
        customer: str,
        order: str,
        at: datetime,
        value: int,
        currency: str = "EUR",
        *,
        channel: str = "web",
        coupon: str | None = None,
    ) -> None:
        self.touch(
            customer,
            "purchase",
            at,
            key=f"purchase/{order}",
            order_id=order,
            value_minor=value,
            currency=currency,
            channel=channel,
            coupon_code=coupon,
        )


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture
def shop(database_url: str) -> Iterator[Shop]:
    with session(database_url) as s:
        yield Shop(s)


def report_of(settings: Settings, period: Period = WEEK, **overrides: Any) -> Any:
    with session(settings.resolved_database_url) as s:
        return build_report(s, settings.model_copy(update=overrides), period)


def test_a_purchase_exactly_one_window_after_the_open_is_credited_a_second_later_is_not(
    settings: Settings, shop: Shop
) -> None:
    opened = MONDAY + timedelta(hours=1)
    for customer in ("in", "out"):
        message = shop.email(customer, CART, "reminder", MONDAY)
        shop.hit(customer, message, "opened", opened)
    shop.buy("in", "o-in", opened + timedelta(days=5), 1000)
    shop.buy("out", "o-out", opened + timedelta(days=5, seconds=1), 2000)
    shop.s.commit()

    report = report_of(settings)

    [credited] = report.attribution
    assert (credited.journey_kind, credited.step, credited.orders, credited.revenue) == (
        CART,
        "reminder",
        1,
        {"EUR": 1000},
    )
    cart = report.kpis[CART].current
    assert (cart.messages_sent, cart.delivered, cart.human_opens, cart.conversions) == (2, 2, 2, 1)
    assert (cart.conversion_rate, cart.open_rate, cart.revenue) == (0.5, 1.0, {"EUR": 1000})
    # One day shorter a window, and neither is credited.
    assert report_of(settings, attribution_window=timedelta(days=4)).attribution == ()


def test_a_customer_in_two_journeys_is_credited_once_to_the_last_or_first_touch(
    settings: Settings, shop: Shop
) -> None:
    cart = shop.email("c1", CART, "reminder", MONDAY)
    shop.hit("c1", cart, "opened", MONDAY + timedelta(hours=1))
    win_back = shop.email("c1", WIN_BACK, "come_back", MONDAY + timedelta(hours=2))
    shop.hit("c1", win_back, "clicked", MONDAY + timedelta(hours=3))
    shop.buy("c1", "o1", MONDAY + timedelta(hours=4), 5000)
    shop.s.commit()

    last = report_of(settings)
    first = report_of(settings, attribution_model="first-touch")

    assert [(a.journey_kind, a.step, a.orders) for a in last.attribution] == [
        (WIN_BACK, "come_back", 1)
    ]
    assert [(a.journey_kind, a.step, a.orders) for a in first.attribution] == [
        (CART, "reminder", 1)
    ]
    assert last.kpis[ALL].current.conversions == first.kpis[ALL].current.conversions == 1
    assert last.kpis[ALL].current.revenue == {"EUR": 5000}
    assert (last.kpis[CART].current.conversions, last.kpis[WIN_BACK].current.conversions) == (0, 1)
    assert (last.kpis[CART].current.clicks, last.kpis[WIN_BACK].current.clicks) == (0, 1)
    assert last.kpis[ALL].current.messages_sent == 2


def test_an_order_with_a_coupon_counts_once_at_its_paid_value(
    settings: Settings, shop: Shop
) -> None:
    message = shop.email("c1", CART, "offer", MONDAY, variant="ten-off")
    shop.hit("c1", message, "clicked", MONDAY + timedelta(minutes=5))
    shop.touch(
        "c1",
        "coupon_issued",
        MONDAY,
        journey_id=f"{CART}-c1",
        journey_kind=CART,
        step="offer",
        coupon_code="SAVE10",
        value_minor=1000,
        currency="EUR",
    )
    shop.buy("c1", "o1", MONDAY + timedelta(hours=1), 9000, coupon="SAVE10")
    shop.touch(
        "c1",
        "coupon_redeemed",
        MONDAY + timedelta(hours=1),
        coupon_code="SAVE10",
        order_id="o1",
    )
    # The journey's own conversion row of the same order is the same purchase.
    shop.touch(
        "c1",
        "conversion",
        MONDAY + timedelta(hours=1),
        journey_id=f"{CART}-c1",
        journey_kind=CART,
        order_id="o1",
        value_minor=9000,
        currency="EUR",
    )
    shop.s.commit()

    report = report_of(settings)

    [credited] = report.attribution
    assert (credited.variant, credited.orders, credited.revenue) == ("ten-off", 1, {"EUR": 9000})
    [funnel] = [f for f in report.funnels if f.version is None and f.day is None]
    assert [(stage.name, stage.count) for stage in funnel.stages] == [
        ("entered", 0),
        ("sent: offer", 1),
        ("delivered", 1),
        ("opened", 0),
        ("clicked", 1),
        ("audience", 0),
        ("ad click", 0),
        ("offer", 1),
        ("purchased", 1),
    ]
    [route] = [r for r in report.routes if r.journey_kind == ALL]
    assert route.steps == (
        f"{CART}: email sent",
        f"{CART}: coupon issued",
        f"{CART}: email clicked",
        "purchase (web)",
    )
    assert (route.customers, route.converted, route.revenue) == (1, 1, {"EUR": 9000})


def test_a_store_purchase_after_an_email_is_a_conversion_of_the_email(
    settings: Settings, shop: Shop
) -> None:
    message = shop.email("c1", CART, "reminder", MONDAY)
    shop.hit("c1", message, "opened", MONDAY + timedelta(hours=2))
    shop.touch("c1", "visit", MONDAY + timedelta(days=1), channel="pos")
    shop.buy("c1", "pos-1", MONDAY + timedelta(days=1, hours=1), 4200, channel="pos")
    shop.s.commit()

    report = report_of(settings)

    assert [(a.journey_kind, a.orders, a.revenue) for a in report.attribution] == [
        (CART, 1, {"EUR": 4200})
    ]
    assert (
        Route(
            journey_kind=CART,
            steps=("email sent", "email opened", "visit (pos)", "purchase (pos)"),
            customers=1,
            converted=1,
            conversion_rate=1.0,
            revenue={"EUR": 4200},
        )
        in report.routes
    )


def test_a_variant_with_zero_sends_reads_n_a_not_zero(settings: Settings, shop: Shop) -> None:
    for customer in ("c1", "c2"):
        shop.touch(
            customer,
            "journey_entered",
            MONDAY,
            journey_id=f"{WIN_BACK}-{customer}",
            journey_kind=WIN_BACK,
            variant="B",
            detail={"version": "2"},
        )
    shop.s.commit()

    report = report_of(settings)

    win_back = report.kpis[WIN_BACK].current
    assert (win_back.entered, win_back.messages_sent, win_back.delivered) == (2, 0, 0)
    assert (win_back.open_rate, win_back.delivery_rate, win_back.conversion_rate) == (
        None,
        None,
        None,
    )
    assert report.attribution == ()
    versions = [f for f in report.funnels if f.version == "2"]
    assert [f.stages[:2] for f in versions] == [
        (FunnelStage("entered", 2, None), FunnelStage("delivered", 0, 1.0))
    ]


def test_a_machine_open_never_counts_unless_the_setting_says_so(
    settings: Settings, shop: Shop
) -> None:
    message = shop.email("c1", CART, "reminder", MONDAY)
    shop.hit("c1", message, "opened", MONDAY + timedelta(seconds=3), machine=True)
    shop.buy("c1", "o1", MONDAY + timedelta(hours=5), 3000)
    shop.s.commit()

    report = report_of(settings)

    cart = report.kpis[CART].current
    assert (cart.human_opens, cart.open_rate, cart.conversions) == (0, 0.0, 0)
    assert report.attribution == ()
    assert sum(map(sum, report.heatmap.opens)) == 0
    counted = report_of(settings, machine_opens_count=True)
    assert counted.kpis[CART].current.human_opens == 1
    assert [a.orders for a in counted.attribution] == [1]


def test_money_is_never_summed_across_currencies(settings: Settings, shop: Shop) -> None:
    for customer, currency, value in (("c1", "EUR", 1999), ("c2", "JPY", 3000), ("c3", "EUR", 1)):
        message = shop.email(customer, CART, "reminder", MONDAY)
        shop.hit(customer, message, "clicked", MONDAY + timedelta(hours=1))
        shop.buy(customer, f"o-{customer}", MONDAY + timedelta(hours=2), value, currency)
    shop.s.commit()

    report = report_of(settings)

    assert report.kpis[ALL].current.revenue == {"EUR": 2000, "JPY": 3000}
    assert [a.revenue for a in report.attribution] == [{"EUR": 2000, "JPY": 3000}]


def test_the_delivery_model_credits_a_delivered_message_nobody_opened(
    settings: Settings, shop: Shop
) -> None:
    message = shop.email("c1", CART, "reminder", MONDAY)
    shop.touch(
        "c1",
        "email_delivered",
        MONDAY + timedelta(minutes=1),
        key=f"{message}/email_delivered",
        journey_id=f"{CART}-c1",
        journey_kind=CART,
        step="reminder",
    )
    shop.email("c2", CART, "reminder", MONDAY, bounced=True)
    shop.buy("c1", "o1", MONDAY + timedelta(days=5, minutes=1), 700)
    shop.buy("c2", "o2", MONDAY + timedelta(days=1), 800)
    shop.s.commit()

    assert report_of(settings).attribution == ()
    delivery = report_of(settings, attribution_model="delivery")
    assert [(a.orders, a.revenue) for a in delivery.attribution] == [(1, {"EUR": 700})]
    cart = delivery.kpis[CART].current
    assert (cart.messages_sent, cart.delivered, cart.bounces) == (2, 1, 1)
    assert (cart.delivery_rate, cart.bounce_rate) == (0.5, 0.5)


def test_kpis_compare_with_the_period_before(settings: Settings, shop: Shop) -> None:
    before = MONDAY - timedelta(days=3)
    shop.email("c1", CART, "reminder", before)
    shop.email("c2", CART, "reminder", before)
    message = shop.email("c3", CART, "reminder", MONDAY + timedelta(days=1))
    shop.hit("c3", message, "opened", MONDAY + timedelta(days=1, hours=1))
    shop.s.commit()

    with session(settings.resolved_database_url) as s:
        compared = kpis(s, settings, WEEK)

    assert list(compared) == [ALL, CART]
    assert (compared[CART].current.messages_sent, compared[CART].previous.messages_sent) == (1, 2)
    assert (compared[CART].current.open_rate, compared[CART].previous.open_rate) == (1.0, 0.0)
    assert compared[ALL].previous.journey_kind == ALL


def test_an_open_of_a_message_sent_before_the_period_credits_a_purchase_in_it(
    settings: Settings, shop: Shop
) -> None:
    message = shop.email("c1", CART, "reminder", MONDAY - timedelta(days=3))
    shop.hit("c1", message, "opened", MONDAY - timedelta(days=2))  # before the day before
    shop.buy("c1", "o1", MONDAY + timedelta(hours=12), 100)
    shop.s.commit()

    with session(settings.resolved_database_url) as s:
        credited = attribution(s, settings, Period(MONDAY, MONDAY + timedelta(days=1)))

    assert [(a.journey_kind, a.orders) for a in credited] == [(CART, 1)]


def test_rows_older_than_the_journey_kind_column_take_the_kind_from_the_journey_id(
    settings: Settings, shop: Shop
) -> None:
    row = shop.touch("c1", "email_sent", MONDAY, journey_id=f"{CART}-c1", step="reminder")
    row.journey_kind = None
    shop.s.add(row)
    shop.s.commit()

    assert report_of(settings).kpis[CART].current.messages_sent == 1


def test_unsubscribes_count_for_the_kind_opted_out_of_or_whose_link_was_used(
    settings: Settings, shop: Shop
) -> None:
    shop.s.add(
        EmailMessage(
            key=f"{WIN_BACK}-c2/run-1/come_back",
            message_id="<m2@kaeru>",
            customer_id="c2",
            journey_id=f"{WIN_BACK}-c2",
            step="come_back",
            to_address="c2@example.com",
            subject="We miss you",
            status="sent",
        )
    )
    shop.email("c1", CART, "reminder", MONDAY)
    shop.email("c2", WIN_BACK, "come_back", MONDAY)
    shop.email("c3", WIN_BACK, "come_back", MONDAY)
    at = MONDAY + timedelta(hours=1)
    set_consent(shop.s, "c1", "email", False, "preference_page", kind=CART, at=at)
    set_consent(
        shop.s,
        "c2",
        "email",
        False,
        "one_click",
        detail="unsubscribe link of message <m2@kaeru>",
        at=at,
    )
    set_consent(shop.s, "c3", "email", False, "api", at=at)
    shop.s.commit()

    report = report_of(settings)

    assert report.kpis[ALL].current.unsubscribes == 3
    assert report.kpis[CART].current.unsubscribes == 1
    assert report.kpis[WIN_BACK].current.unsubscribes == 1
    assert report.kpis[WIN_BACK].current.unsubscribe_rate == 0.5


def test_funnel_counts_distinct_customers_per_stage_with_dropoff_by_version_and_day(
    settings: Settings, shop: Shop
) -> None:
    for n, customer in enumerate(("c1", "c2", "c3", "c4")):
        version = "1" if n < 2 else "2"
        shop.touch(
            customer,
            "journey_entered",
            MONDAY,
            journey_id=f"{CART}-{customer}",
            journey_kind=CART,
            detail={"version": version},
        )
        day = MONDAY + timedelta(days=n % 2)
        reminder = shop.email(customer, CART, "reminder", day + timedelta(hours=1))
        if n < 3:
            shop.hit(customer, reminder, "opened", day + timedelta(hours=2))
            shop.hit(customer, reminder, "opened", day + timedelta(hours=3))  # not twice
        if n < 2:
            shop.email(customer, CART, "offer", day + timedelta(hours=4))
    shop.touch(
        "c4",
        "audience_joined",
        MONDAY + timedelta(days=2),
        journey_id=f"{CART}-c4",
        journey_kind=CART,
    )
    shop.s.commit()

    with session(settings.resolved_database_url) as s:
        found = funnels(s, settings, WEEK)

    whole = {(f.version, f.day): f.stages for f in found}
    assert [(st.name, st.count, st.dropoff) for st in whole[(None, None)]] == [
        ("entered", 4, None),
        ("sent: reminder", 4, 0.0),
        ("sent: offer", 2, 0.5),
        ("delivered", 4, 0.0),
        ("opened", 3, 0.25),
        ("clicked", 0, 1.0),
        ("audience", 1, None),
        ("ad click", 0, 1.0),
        ("offer", 0, None),
        ("purchased", 0, None),
    ]
    assert [st.count for st in whole[("1", None)]][:5] == [2, 2, 2, 2, 2]
    assert [st.count for st in whole[("2", None)]][:5] == [2, 2, 0, 2, 1]
    tuesday = (MONDAY + timedelta(days=1)).date()
    assert [st.count for st in whole[(None, tuesday)]][:5] == [0, 2, 1, 2, 1]
    assert set(whole) == {
        (None, None),
        ("1", None),
        ("2", None),
        (None, MONDAY.date()),
        (None, tuesday),
        (None, (MONDAY + timedelta(days=2)).date()),
    }


def test_routes_merge_repeats_cut_at_the_step_limit_and_group_the_rest(
    settings: Settings, shop: Shop
) -> None:
    at = MONDAY
    # Three customers take one route; each of four more takes a route of their own.
    for customer in ("a1", "a2", "a3"):
        message = shop.email(customer, CART, "reminder", at)
        shop.hit(customer, message, "opened", at + timedelta(minutes=1))
        shop.hit(customer, message, "clicked", at + timedelta(minutes=2))
        shop.hit(customer, message, "clicked", at + timedelta(minutes=3))  # merged
        shop.buy(customer, f"o-{customer}", at + timedelta(hours=1), 100)
    for n, customer in enumerate(("b1", "b2", "b3", "b4")):
        for step in range(n + 1):
            shop.email(customer, CART, f"step{step}", at + timedelta(hours=step))
            shop.touch(customer, "ad_clicked", at + timedelta(hours=step, minutes=1))
    # After a purchase, a new route begins.
    shop.buy("a1", "o-a1-again", at + timedelta(days=1), 50, "USD")
    shop.s.commit()

    with session(settings.resolved_database_url) as s:
        found = routes(s, settings.model_copy(update={"route_steps": 5, "route_top": 3}), WEEK)

    cart = [r for r in found if r.journey_kind == CART]
    cut = ("email sent", "ad clicked", "email sent", "ad clicked", "email sent")
    assert [(r.steps, r.customers, r.converted, r.revenue) for r in cart] == [
        (("email sent", "email opened", "email clicked", "purchase (web)"), 3, 3, {"EUR": 300}),
        (cut, 2, 0, {}),  # b3's and b4's, cut at 5 steps
        (("email sent", "ad clicked"), 1, 0, {}),
        (("other",), 1, 0, {}),  # b2's
    ]
    everyone = [r for r in found if r.journey_kind == ALL]
    sent, opened, clicked = (f"{CART}: email {what}" for what in ("sent", "opened", "clicked"))
    assert [(r.steps, r.customers, r.converted, r.revenue) for r in everyone] == [
        ((sent, opened, clicked, "purchase (web)"), 3, 3, {"EUR": 300}),
        ((sent, "ad clicked", sent, "ad clicked", sent), 2, 0, {}),
        (("purchase (web)",), 1, 1, {"USD": 50}),  # a1's second purchase: a route of its own
        (("other",), 2, 0, {}),
    ]
    assert [r.conversion_rate for r in everyone] == [1.0, 0.0, 1.0, 0.0]


def test_the_heatmap_reads_each_customers_own_time_zone(settings: Settings, shop: Shop) -> None:
    shop.s.add(Customer(customer_id="tokyo", timezone="Asia/Tokyo"))
    shop.s.add(Customer(customer_id="nowhere", timezone=None))
    for customer in ("tokyo", "nowhere"):
        message = shop.email(customer, CART, "reminder", MONDAY)
        shop.hit(customer, message, "opened", MONDAY + timedelta(minutes=30))
        shop.hit(customer, message, "clicked", MONDAY + timedelta(minutes=31))
    shop.s.commit()

    with session(settings.resolved_database_url) as s:
        grid = heatmap(s, settings.model_copy(update={"shop_timezone": "America/New_York"}), WEEK)

    assert grid.opens[0][9] == 1  # Monday 09:30 in Tokyo
    assert grid.opens[6][19] == 1  # Sunday 19:30 in New York, the shop's zone
    assert grid.clicks[0][9] == grid.clicks[6][19] == 1
    assert sum(map(sum, grid.opens)) == sum(map(sum, grid.clicks)) == 2


def test_a_period_without_touchpoints_reports_zeros_and_n_a(settings: Settings) -> None:
    report = report_of(settings)

    assert list(report.kpis) == [ALL]
    everyone = report.kpis[ALL].current
    assert (everyone.messages_sent, everyone.conversions, everyone.revenue) == (0, 0, {})
    assert (everyone.open_rate, everyone.conversion_rate, everyone.bounce_rate) == (
        None,
        None,
        None,
    )
    assert (report.funnels, report.attribution, report.routes, report.experiments) == (
        (),
        (),
        (),
        (),
    )
    assert report.heatmap.opens == tuple((0,) * 24 for _ in range(7))
