"""The dashboard: operator sign-in, and each page's numbers from a report whose answers are known.

The pages are rendered from :class:`~kaeru.analytics.model.Report` objects written out here
literally (the analytics that build them are tested against their own known history); the
sign-in and the customer timeline run through the real API on a real database.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

import httpx
import pytest

from kaeru.analytics.model import (
    ALL,
    KpiComparison,
    Report,
    Route,
)
from kaeru.db import write_session
from kaeru.kill_switch import GLOBAL, turn_off, turn_on
from kaeru.models import Customer
from kaeru.reports import best_and_worst_routes
from kaeru.settings import Settings
from kaeru.touchpoints import record_touchpoint
from starter import dashboard
from starter.app import create_app
from starter.codec_server import SESSION_COOKIE as CODEC_COOKIE
from starter.codec_server import session_cookie as codec_cookie
from tests.conftest import make_settings
from tests.starter.conftest import asgi_client
from tests.support.reports import PERIOD, empty_heatmap, known_report, kpis

TOKEN = "test-operator-token"


class Text(HTMLParser):
    """The text of the elements whose attribute matches, to read numbers as a browser shows."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.in_cell = False
        self.rows: list[tuple[dict[str, str | None], list[str]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append((dict(attrs), []))
        elif tag == "td" and self.rows:
            self.rows[-1][1].append("")
            self.in_cell = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self.in_cell = False

    def handle_data(self, data: str) -> None:
        if self.in_cell:
            self.rows[-1][1][-1] += data.strip()


def row(html: str, attribute: str, value: str, nth: int = 0) -> list[str]:
    """The cells of the ``nth`` table row whose ``attribute`` is ``value``."""
    found = [cells for attrs, cells in Text(html).rows if attrs.get(attribute) == value]
    assert len(found) > nth, f"no row {attribute}={value!r} in the page"
    return found[nth]


# ---- pages, from a known report ---------------------------------------------------------------


def test_overview_shows_each_kpi_against_the_period_before_and_money_per_currency() -> None:
    html = dashboard.overview_page(known_report())
    assert row(html, "data-kpi", "Entered") == ["Entered", "40", "32", "+8 (+25.0 %)"]
    assert row(html, "data-kpi", "Conversions") == ["Conversions", "8", "4", "+4 (+100.0 %)"]
    assert row(html, "data-kpi", "Conversion rate") == [
        "Conversion rate",
        "20.0 %",
        "12.5 %",
        "+7.5 pp",
    ]
    assert row(html, "data-kpi", "Human open rate") == [
        "Human open rate",
        "52.6 %",
        "n/a",
        "n/a",
    ]
    # Each currency on its own row, never summed; a currency new this period starts from 0.
    assert row(html, "data-kpi", "Revenue recovered (EUR)")[1:] == [
        "459.90 EUR",
        "200.00 EUR",
        "+259.90 EUR",
    ]
    assert row(html, "data-kpi", "Revenue recovered (JPY)")[1:] == [
        "12000 JPY",
        "0 JPY",
        "+12000 JPY",
    ]
    # Revenue credited per journey, step and variant, each currency on its own.
    assert row(html, "data-step", "cart-abandonment/offer/b") == [
        "cart-abandonment",
        "offer",
        "b",
        "3",
        "159.90 EUR, 12000 JPY",
    ]
    assert row(html, "data-step", "cart-abandonment/reminder/")[2:] == ["–", "5", "300.00 EUR"]
    assert "all journeys" in html and "2026-11-23 to 2026-11-29" in html
    assert "2026-11-16 to 2026-11-22" in html  # the period before
    assert 'src="/dashboard/static/plotly.min.js"' in html
    assert not re.search(r'src="(https?:)?//', html), "a page loads nothing from another host"


def test_best_and_worst_routes_leave_out_other_and_are_not_named_twice() -> None:
    best, worst = best_and_worst_routes(known_report(), count=2)
    assert [r.steps for r in best] == [
        ("email_sent", "email_opened", "purchase"),
        ("email_sent", "email_clicked"),
    ]
    assert [r.steps for r in worst] == [("ad_click", "purchase"), ("email_sent",)]
    # A route nobody bought from is never "best", however few routes there are.
    best, worst = best_and_worst_routes(known_report(), count=5)
    assert len(best) == 3 and [r.steps for r in worst] == [("ad_click", "purchase")]
    html = dashboard.overview_page(known_report())
    assert row(html, "class", "best") == [
        "email_sent → email_opened → purchase",
        "10",
        "6",
        "60.0 %",
        "300.00 EUR",
    ]


def test_funnel_page_shows_counts_and_dropoff_by_version_and_day() -> None:
    html = dashboard.funnels_page(known_report())
    assert row(html, "data-stage", "entered") == ["entered", "40", "–"]
    assert row(html, "data-stage", "opened") == ["opened", "18", "50.0 %"]
    assert row(html, "data-stage", "purchased") == ["purchased", "8", "11.1 %"]
    assert "By journey version" in html and "version 2" in html
    assert "By day" in html and "2026-11-24" in html


def test_routes_page_draws_a_sankey_with_the_known_links_per_kind() -> None:
    report = known_report()
    html = dashboard.routes_page(report)
    cells = [cells for attrs, cells in Text(html).rows if cells]
    assert ["email_sent", "20", "1", "5.0 %", "19.90 EUR"] in cells
    assert ["other", "3", "0", "0.0 %", "–"] in cells
    figure = dashboard.sankey([r for r in report.routes if r.journey_kind == ALL])
    trace = figure["data"][0]
    labels = trace["node"]["label"]
    links = {
        (labels[s], labels[t]): v
        for s, t, v in zip(
            trace["link"]["source"], trace["link"]["target"], trace["link"]["value"], strict=True
        )
    }
    assert links[("1. email_sent", "2. email_opened")] == 10
    assert links[("1. email_sent", "2. email_clicked")] == 5
    assert links[("3. purchase", "purchased")] == 6
    assert links[("3. purchase", "no purchase")] == 4
    assert links[("1. email_sent", "no purchase")] == 19
    assert ("2. purchase", "purchased") not in links  # 0 of the ad route bought: no link
    one_kind = dashboard.routes_page(report, "cart-abandonment")
    assert "email_sent → email_opened → purchase" in one_kind
    assert "ad_click" not in one_kind.split('id="routes"')[1]


def test_experiments_page_shows_each_arm_with_its_interval_and_the_verdict() -> None:
    html = dashboard.experiments_page(known_report())
    assert row(html, "data-variant", "b") == [
        "b",
        "640",
        "64",
        "10.0 %",
        "2.50 EUR",
        "+5.0 pp [+2.1 pp, +7.9 pp]",
        "0.001",
        "+1.50 EUR [+0.20 EUR, +2.80 EUR]",
    ]
    assert row(html, "data-variant", "holdout")[:4] == ["holdout (control)", "600", "30", "5.0 %"]
    assert '<p class="verdict">b wins</p>' in html
    assert "two-proportion z-test" in html and "Welch" in html


def test_heatmap_page_names_the_busiest_hour() -> None:
    html = dashboard.heatmap_page(known_report())
    assert re.search(r'id="opens-total">10<', html)
    assert re.search(r'id="opens-busiest">Tuesday 09:00 \(7\)<', html)
    assert re.search(r'id="clicks-total">2<', html)


def test_an_empty_report_says_no_data_yet_on_every_page() -> None:
    nothing = kpis(ALL)
    report = Report(
        period=PERIOD,
        kpis={ALL: KpiComparison(nothing, nothing)},
        funnels=(),
        attribution=(),
        routes=(),
        heatmap=empty_heatmap(),
    )
    for render in (
        dashboard.overview_page,
        dashboard.funnels_page,
        dashboard.routes_page,
        dashboard.experiments_page,
        dashboard.heatmap_page,
    ):
        assert 'id="no-data"' in render(report), render.__name__


def test_step_names_cannot_break_out_of_the_chart_script() -> None:
    report = known_report()
    evil = Route(ALL, ("</script><script>alert(1)</script>",), 1, 0, 0.0, {})
    html = dashboard.routes_page(
        Report(report.period, report.kpis, (), (), (evil,), report.heatmap)
    )
    assert "<script>alert(1)" not in html


@pytest.mark.parametrize(
    ("start", "end", "days", "expected"),
    [
        ("2026-11-01", "2026-11-30", None, (datetime(2026, 11, 1), datetime(2026, 12, 1))),
        (None, None, "30", (datetime(2026, 11, 2, 12), datetime(2026, 12, 2, 12))),
        (None, None, None, (datetime(2026, 11, 25, 12), datetime(2026, 12, 2, 12))),
    ],
)
def test_period_picker(
    start: str | None, end: str | None, days: str | None, expected: tuple[datetime, datetime]
) -> None:
    now = datetime(2026, 12, 2, 12, tzinfo=UTC)
    period = dashboard.period_of(start, end, days, now)
    assert (period.start, period.end) == tuple(d.replace(tzinfo=UTC) for d in expected)


@pytest.mark.parametrize(
    ("start", "end", "days", "says"),
    [
        ("2026-11-30", "2026-11-01", None, "swap them"),
        ("yesterday", "2026-11-01", None, "YYYY-MM-DD"),
        ("2026-11-01", None, None, "YYYY-MM-DD"),
        (None, None, "0", "whole number of days"),
        (None, None, "seven", "whole number of days"),
        ("2020-01-01", "2026-01-01", None, "at most 366 days"),
        ("9999-12-31", "9999-12-31", None, "outside what kaeru can have recorded"),
        ("0001-01-01", "0001-01-01", None, "outside what kaeru can have recorded"),
    ],
)
def test_period_picker_refuses_what_is_not_a_period(
    start: str | None, end: str | None, days: str | None, says: str
) -> None:
    with pytest.raises(dashboard.PeriodError, match=says):
        dashboard.period_of(start, end, days)


# ---- sign-in, through the API -----------------------------------------------------------------


async def sign_in(api: httpx.AsyncClient, token: str = TOKEN) -> httpx.Response:
    return await api.post(
        "/dashboard/login",
        data={"token": token, "next": "/dashboard/customers?id=c-1"},
        follow_redirects=False,
    )


async def test_without_an_operator_token_there_is_no_dashboard_only_how_to_set_one(
    sqlite_url: str,
) -> None:
    settings = make_settings(sqlite_url, operator_token=None)
    async with asgi_client(create_app(settings, run_router=False)) as api:
        for path in ("/dashboard", "/dashboard/customers", "/dashboard/login"):
            answer = await api.get(path, follow_redirects=False)
            assert answer.status_code == 503, path
            assert "KAERU_OPERATOR_TOKEN" in answer.text and "token_urlsafe" in answer.text
        assert (await sign_in(api, "")).status_code == 503


async def test_sign_in_sets_an_httponly_samesite_cookie_that_opens_the_pages(
    sqlite_url: str,
) -> None:
    settings = make_settings(sqlite_url)
    async with asgi_client(create_app(settings, run_router=False)) as api:
        away = await api.get("/dashboard/customers?id=c-1", follow_redirects=False)
        assert away.status_code == 303
        assert (
            away.headers["location"] == "/dashboard/login?next=%2Fdashboard%2Fcustomers%3Fid%3Dc-1"
        )
        form = await api.get(away.headers["location"])
        assert 'name="next" value="/dashboard/customers?id=c-1"' in form.text

        wrong = await sign_in(api, "test-write-key")  # a write key is no operator token
        assert wrong.status_code == 401 and "not the operator token" in wrong.text
        assert "set-cookie" not in wrong.headers

        signed = await sign_in(api)
        assert signed.status_code == 303
        assert signed.headers["location"] == "/dashboard/customers?id=c-1"
        cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/dashboard" in cookie
        assert TOKEN not in cookie
        page = await api.get("/dashboard/customers?id=c-1", follow_redirects=False)
        assert page.status_code == 200 and "No customer c-1" in page.text
        assert page.headers["cache-control"] == "no-store"

        out = await api.post("/dashboard/logout", follow_redirects=False)
        assert out.status_code == 303
        api.cookies.clear()
        again = await api.get("/dashboard/customers", follow_redirects=False)
        assert again.status_code == 303


async def test_only_the_operator_token_opens_the_dashboard(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url)
    async with asgi_client(create_app(settings, run_router=False)) as api:
        for headers, cookies in (
            ({"Authorization": "Bearer test-write-key"}, {}),
            ({"Authorization": "Basic dGVzdC13cml0ZS1rZXk6"}, {}),
            ({}, {dashboard.SESSION_COOKIE: codec_cookie(TOKEN)}),  # the codec's cookie
            ({}, {CODEC_COOKIE: codec_cookie(TOKEN)}),
            ({}, {dashboard.SESSION_COOKIE: "9999999999.forged"}),
        ):
            api.cookies.clear()
            for name, value in cookies.items():
                api.cookies.set(name, value)
            answer = await api.get("/dashboard/customers", headers=headers, follow_redirects=False)
            assert answer.status_code == 303, (headers, cookies)
        api.cookies.clear()
        bearer = await api.get("/dashboard/customers", headers={"Authorization": f"Bearer {TOKEN}"})
        assert bearer.status_code == 200


async def test_sign_in_never_sends_the_browser_to_another_site(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url)
    async with asgi_client(create_app(settings, run_router=False)) as api:
        for target in ("https://evil.example/dashboard", "//evil.example/dashboard", "/v1/x"):
            answer = await api.post(
                "/dashboard/login", data={"token": TOKEN, "next": target}, follow_redirects=False
            )
            assert answer.headers["location"] == "/dashboard", target


async def test_plotly_is_served_from_the_package_not_a_cdn(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url)
    async with asgi_client(create_app(settings, run_router=False)) as api:
        script = await api.get("/dashboard/static/plotly.min.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        assert "plotly.js v" in script.text[:500]
        own = await api.get("/dashboard/static/dashboard.js")
        assert "Plotly.newPlot" in own.text


async def test_a_bad_period_is_a_page_that_says_how_to_give_one(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url)
    async with asgi_client(create_app(settings, run_router=False)) as api:
        answer = await api.get(
            "/dashboard?start=2026-11-30&end=nope", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert answer.status_code == 400 and "YYYY-MM-DD" in answer.text
        for far in ("9999-12-31", "0001-01-01"):
            answer = await api.get(
                f"/dashboard?start={far}&end={far}", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            assert answer.status_code == 400 and "outside what kaeru" in answer.text


# ---- the customer page ------------------------------------------------------------------------


def seed_customer(settings: Settings) -> None:
    at = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
    with write_session(settings.resolved_database_url) as s:
        s.add(Customer(customer_id="c-1", email="ann@example.com"))
        s.add(Customer(customer_id="c-10"))
        journey = "cart-abandonment-c-1"
        for minutes, kind, extra in (
            (0, "email_sent", {"step": "reminder", "channel": "email", "variant": "b"}),
            (65, "email_opened", {"step": "reminder", "channel": "email"}),
            (
                60 * 24,
                "conversion",
                {"order_id": "o-1", "value_minor": 4599, "currency": "EUR", "channel": "pos"},
            ),
        ):
            record_touchpoint(
                s,
                customer_id="c-1",
                kind=kind,
                journey_id=journey if kind != "conversion" else None,
                journey_kind="cart-abandonment",
                occurred_at=at + timedelta(minutes=minutes),
                **extra,
            )
        s.commit()


async def test_customer_page_lists_the_timeline_with_links_to_the_temporal_ui(
    database_url: str,
) -> None:
    settings = make_settings(
        database_url, temporal_ui_url="https://ui.example/", temporal_namespace="shop ns"
    )
    seed_customer(settings)
    async with asgi_client(create_app(settings, run_router=False)) as api:
        await sign_in(api)
        page = (await api.get("/dashboard/customers", params={"id": "c-1"})).text
        timeline = [cells for attrs, cells in Text(page).rows if cells]
        assert [cells[:2] for cells in timeline] == [
            ["2026-11-24 09:00:00", "email_sent"],
            ["2026-11-24 10:05:00", "email_opened"],
            ["2026-11-25 09:00:00", "conversion"],
        ]
        assert timeline[0][2:] == ["email", "cart-abandonment-c-1", "reminder", "b", ""]
        assert timeline[2][2] == "pos" and timeline[2][-1] == "45.99 EUR"
        assert (
            'href="https://ui.example/namespaces/shop%20ns/workflows/cart-abandonment-c-1"' in page
        )
        missing = (await api.get("/dashboard/customers", params={"id": "c"})).text
        assert "No customer c has sent an event" in missing
        assert "?id=c-1" in missing and "?id=c-10" in missing
        long = await api.get("/dashboard/customers", params={"id": "x" * 201})
        assert long.status_code == 400
        # Touchpoints with no profile (a store purchase imported for a new id): shown too.
        with write_session(settings.resolved_database_url) as s:
            record_touchpoint(
                s,
                customer_id="till-only",
                kind="purchase",
                key="purchase/till-1",
                occurred_at=datetime(2026, 11, 26, 12, 0, tzinfo=UTC),
                order_id="till-1",
                value_minor=1200,
                currency="USD",
                channel="pos",
            )
        till = (await api.get("/dashboard/customers", params={"id": "till-only"})).text
        assert "No profile" in till and "has sent an event" not in till
        assert [cells[1:3] for attrs, cells in Text(till).rows if cells] == [["purchase", "pos"]]


async def test_every_page_says_when_a_kill_switch_is_on_and_why(sqlite_url: str) -> None:
    """An operator reading the numbers learns at once why messages stopped; the reason is
    text, never markup."""
    settings = make_settings(sqlite_url)
    pages = ("/dashboard", "/dashboard/funnels", "/dashboard/customers?id=c-1")
    async with asgi_client(create_app(settings, run_router=False)) as api:
        assert (await sign_in(api)).status_code == 303
        for path in pages:
            assert 'id="kill-switches"' not in (await api.get(path)).text, path

        turn_on(
            sqlite_url,
            GLOBAL,
            actor="cli:ann",
            reason="<b>wrong</b> prices",
            include_transactional=False,
        )
        turn_on(sqlite_url, "welcome", actor="api:bob", include_transactional=False)
        for path in pages:
            text = (await api.get(path)).text
            banner = text[
                text.index('id="kill-switches"') : text.index(
                    "</div>", text.index('id="kill-switches"')
                )
            ]
            assert "Kill switch on: marketing journeys" in banner, path
            assert "(cli:ann):\n  &lt;b&gt;wrong&lt;/b&gt; prices." in banner
            assert "Kill switch on: welcome journeys" in banner and "(api:bob)." in banner
            assert "<code>--kind</code>" in banner

        turn_off(sqlite_url, GLOBAL)
        turn_off(sqlite_url, "welcome")
        assert 'id="kill-switches"' not in (await api.get("/dashboard")).text
