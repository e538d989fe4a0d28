"""The dashboard in headless Chromium: sign in through the form, open every page on a history
whose numbers are known, read what the browser rendered (after plotly drew its charts, from
``plotly.min.js`` served by the API) and keep a screenshot of each page in the test's tmp dir.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from kaeru.settings import Settings
from starter.app import create_app
from tests.conftest import make_settings
from tests.starter.conftest import uvicorn_server
from tests.starter.test_dashboard import row
from tests.support.browser import Tab, chromium_or_skip, headless_chromium
from tests.support.history import seed_known_history

TOKEN = "test-operator-token"
#: The history starts on Tuesday 24 November 2026, 09:00 UTC; the week shown holds all of it.
START = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
WEEK = "start=2026-11-23&end=2026-11-29"
#: Every chart of a page has been drawn by plotly.
DRAWN = (
    "document.querySelectorAll('[data-chart]').length > 0 && "
    "[...document.querySelectorAll('[data-chart]')].every(d => d.querySelector('.main-svg'))"
)


@pytest.fixture
def browser_binary() -> str:
    return chromium_or_skip()


async def sign_in(tab: Tab, base: str) -> None:
    """As an operator does: the dashboard sends the browser to the form; type the token."""
    await tab.call("Page.navigate", url=f"{base}/dashboard?{WEEK}")
    await tab.wait_for("document.getElementById('token') !== null")
    await tab.evaluate(
        f"document.getElementById('token').value = '{TOKEN}'; "
        "document.getElementById('sign-in').click(); true"
    )
    await tab.wait_for("location.pathname === '/dashboard' && document.readyState === 'complete'")


async def test_every_page_renders_the_known_numbers_in_a_browser(
    browser_binary: str, database_url: str, tmp_path: Path
) -> None:
    settings: Settings = make_settings(database_url, temporal_ui_url="http://ui.test")
    seed_known_history(settings, START)
    async with (
        uvicorn_server(create_app(settings, run_router=False)) as base,
        headless_chromium(browser_binary, tmp_path / "profile") as tab,
    ):
        login = await tab.open(f"{base}/dashboard/login")
        assert "Operator token" in login
        await tab.screenshot(tmp_path / "login.png")
        await sign_in(tab, base)
        shots = {}

        overview = await tab.open(f"{base}/dashboard?{WEEK}", DRAWN)
        shots["overview"] = await tab.screenshot(tmp_path / "overview.png")
        assert row(overview, "data-kpi", "Entered")[:3] == ["Entered", "4", "0"]
        assert row(overview, "data-kpi", "Human opens")[1] == "2"  # the machine open is not one
        assert row(overview, "data-kpi", "Conversions")[1] == "2"
        assert row(overview, "data-kpi", "Conversion rate")[1] == "50.0 %"
        assert row(overview, "data-kpi", "Revenue recovered (EUR)")[1] == "45.99 EUR"
        assert row(overview, "data-kpi", "Revenue recovered (JPY)")[1] == "12000 JPY"
        assert "2026-11-23 to 2026-11-29" in overview
        # Both purchases followed the reminder's open or click within the window: its revenue.
        assert row(overview, "data-step", "cart-abandonment/reminder/")[3:] == [
            "2",
            "45.99 EUR, 12000 JPY",
        ]

        funnels = await tab.open(f"{base}/dashboard/funnels?{WEEK}", DRAWN)
        shots["funnels"] = await tab.screenshot(tmp_path / "funnels.png")
        assert row(funnels, "data-stage", "entered")[1] == "4"
        assert row(funnels, "data-stage", "opened")[1:] == ["2", "50.0 %"]
        assert row(funnels, "data-stage", "clicked")[1:] == ["1", "50.0 %"]
        assert row(funnels, "data-stage", "purchased")[1] == "2"

        routes = await tab.open(
            f"{base}/dashboard/routes?{WEEK}",
            DRAWN + " && document.querySelectorAll('.sankey-node').length > 0",
        )
        shots["routes"] = await tab.screenshot(tmp_path / "routes.png")
        table = routes.split('id="routes"')[1]
        assert "12000 JPY" in table and "45.99 EUR" in table

        experiments = await tab.open(f"{base}/dashboard/experiments?{WEEK}", DRAWN)
        shots["experiments"] = await tab.screenshot(tmp_path / "experiments.png")
        assert row(experiments, "data-variant", "names_the_item")[:4] == [
            "names_the_item (control)",
            "2",
            "1",
            "50.0 %",
        ]
        asks = row(experiments, "data-variant", "asks_a_question")
        assert asks[:4] == ["asks_a_question", "2", "1", "50.0 %"]
        assert asks[5:7] == ["+0.0 pp [-98.0 pp, +98.0 pp]", "1.000"]
        assert '<p class="verdict">collecting</p>' in experiments

        heatmap = await tab.open(f"{base}/dashboard/heatmap?{WEEK}", DRAWN)
        shots["heatmap"] = await tab.screenshot(tmp_path / "heatmap.png")
        assert 'id="opens-total">2<' in heatmap
        assert 'id="opens-busiest">Tuesday 10:00 (1)<' in heatmap
        assert 'id="clicks-total">1<' in heatmap

        customer = await tab.open(f"{base}/dashboard/customers?id=c-4")
        shots["customer"] = await tab.screenshot(tmp_path / "customer.png")
        kinds = await tab.evaluate(
            "[...document.querySelectorAll('#timeline tbody tr')].map(r => r.dataset.kind)"
        )
        assert kinds == ["journey_entered", "email_sent", "email_opened", "purchase"]
        assert 'href="http://ui.test/namespaces/default/workflows/cart-abandonment-c-4"' in customer
        assert "12000 JPY" in customer and "pos" in customer

        empty = await tab.open(f"{base}/dashboard?start=2025-01-01&end=2025-01-07")
        assert 'id="no-data"' in empty
    for name, shot in shots.items():
        assert shot.stat().st_size > 10_000, f"the {name} screenshot is blank"


@pytest.mark.parametrize(("ci", "outcome"), [("true", "failed"), ("", "skipped")])
def test_a_machine_without_chromium_says_so_by_name_and_how_to_install_it(
    ci: str, outcome: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no browser on it
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if outcome == "failed" else pytest.skip.Exception
    with pytest.raises(expected) as stopped:
        chromium_or_skip()
    assert "apt-get install -y chromium" in str(stopped.value)
    assert "headless Chromium is missing" in str(stopped.value)
