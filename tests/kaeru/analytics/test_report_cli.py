"""`kaeru report`: tables, ``--json``, ``--csv DIR``, and a clear message for a bad period."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from typer.testing import CliRunner, Result

from kaeru.analytics.model import ALL, Period
from kaeru.analytics.report import build_report
from kaeru.analytics.serialise import report_to_json
from kaeru.analytics.terminal import PeriodError, period_of, shades
from kaeru.cli import app
from kaeru.db import migrate, session
from kaeru.dev.history import Truth, generate
from kaeru.experiments import experiment_results
from kaeru.money import format_minor
from tests.conftest import make_settings

START = datetime(2026, 11, 2, tzinfo=UTC)
UNTIL = "2026-11-09"  # START + 7 days, midnight UTC (the shop's zone by default)
runner = CliRunner()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No KAERU_ variable or .env of the developer's leaks in."""
    for name in list(os.environ):
        if name.startswith("KAERU_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def history(tmp_path: Path) -> tuple[str, Truth]:
    url = f"sqlite:///{tmp_path / 'report.db'}"
    migrate(url)
    with session(url) as s:
        truth = generate(s, 11, 80, START)
    return url, truth


def kaeru(url: str, *args: str) -> Result:
    # A wide terminal, so no route is wrapped across lines.
    return runner.invoke(app, ["report", *args], env={"KAERU_DATABASE_URL": url, "COLUMNS": "200"})


def test_report_prints_tables_with_the_weeks_numbers(history: tuple[str, Truth]) -> None:
    url, truth = history

    result = kaeru(url, "--since", "7d", "--until", UNTIL)

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "2026-11-02 00:00 to 2026-11-09 00:00 UTC" in out
    titles = ("KPIs: all journeys", "Funnels", "Revenue recovered", "Routes: all journeys")
    for title in (*titles, "Routes: cart-abandonment", "Send time"):
        assert title in out
    revenue = truth.current.revenue[ALL]
    assert revenue, "the history has credited purchases"
    shown = ", ".join(format_minor(v, c) for c, v in sorted(revenue.items()))
    assert shown in out  # each currency on its own
    assert "cart-abandonment: email sent → " in out


def test_report_json_is_the_report_as_the_dashboard_reads_it(history: tuple[str, Truth]) -> None:
    url, truth = history

    result = kaeru(url, "--since", "2026-11-02", "--until", UNTIL, "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["period"] == {
        "start": "2026-11-02T00:00:00+00:00",
        "end": "2026-11-09T00:00:00+00:00",
    }
    current = data["kpis"][ALL]["current"]
    assert current["messages_sent"] == truth.current.counts[ALL]["sent"]
    assert current["revenue"] == dict(truth.current.revenue[ALL])
    assert data["kpis"][ALL]["previous"]["messages_sent"] == truth.previous.counts[ALL]["sent"]
    assert data["experiments"], "the history's holdouts and arms are experiments"
    assert len(data["heatmap"]["opens"]) == 7 and len(data["heatmap"]["opens"][0]) == 24
    settings = make_settings(url)
    with session(url) as s:
        period = Period(START, START + timedelta(days=7))
        built = build_report(s, settings, period)
        built = dataclasses.replace(built, experiments=experiment_results(s, settings, period))
    assert data == json.loads(json.dumps(report_to_json(built)))


def test_report_csv_writes_one_file_per_section(history: tuple[str, Truth], tmp_path: Path) -> None:
    url, truth = history
    out = tmp_path / "sheets"

    result = kaeru(url, "--since", "7d", "--until", UNTIL, "--csv", str(out))

    assert result.exit_code == 0, result.output
    names = [
        "attribution.csv",
        "experiments.csv",
        "funnels.csv",
        "heatmap.csv",
        "kpis.csv",
        "routes.csv",
    ]
    assert sorted(p.name for p in out.iterdir()) == names
    with (out / "kpis.csv").open() as f:
        rows = list(csv.DictReader(f))
    [everyone] = [r for r in rows if r["journey"] == ALL and r["period"] == "this"]
    assert int(everyone["sent"]) == truth.current.counts[ALL]["sent"]
    assert int(everyone["conversions"]) == truth.current.counts[ALL]["conversions"]
    assert everyone["revenue"] == " ".join(
        f"{c}:{v}" for c, v in sorted(truth.current.revenue[ALL].items())
    )
    with (out / "attribution.csv").open() as f:
        orders = sum(int(r["orders"]) for r in csv.DictReader(f))
    assert orders == truth.current.counts[ALL]["conversions"]
    with (out / "heatmap.csv").open() as f:
        grid = list(csv.reader(f))
    assert len(grid) == 1 + 14 and len(grid[0]) == 26
    with (out / "experiments.csv").open() as f:
        arms = list(csv.DictReader(f))
    with session(url) as s:
        week = Period(START, START + timedelta(days=7))
        results = experiment_results(s, make_settings(url), week)
    assert [(a["experiment"], a["arm"], int(a["recipients"])) for a in arms] == [
        (r.experiment, v.variant, v.recipients) for r in results for v in r.variants
    ]
    assert any(a["arm"] == "holdout" for a in arms)


@pytest.mark.parametrize(
    ("args", "phrases"),
    [
        (["--since", "7x"], ["--since '7x' is not a time", "7d", "2026-11-01"]),
        (["--since", "7d", "--until", "yesterday"], ["--until 'yesterday' is not a time"]),
        (["--since", "2026-11-09", "--until", "2026-11-02"], ["is empty", "before --until"]),
        (["--since", "999999999d"], ["reaches back before year 1"]),
        (["--since", "0001-01-01"], ["outside what kaeru can have recorded"]),
        (["--since", "7d", "--until", "9999-12-31"], ["outside what kaeru can have recorded"]),
    ],
)
def test_a_bad_period_says_how_to_write_one(
    history: tuple[str, Truth], args: list[str], phrases: list[str]
) -> None:
    url, _ = history

    result = kaeru(url, *args)

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.stderr


def test_report_without_a_database_says_to_migrate(tmp_path: Path) -> None:
    result = kaeru(f"sqlite:///{tmp_path / 'none.db'}", "--since", "7d")

    assert result.exit_code == 1
    assert "kaeru migrate" in result.stderr


def test_periods_read_ages_dates_and_times() -> None:
    now = datetime(2026, 11, 9, 12, 0, tzinfo=UTC)
    tokyo = ZoneInfo("Asia/Tokyo")

    assert period_of("30d", None, now, tokyo) == Period(now - timedelta(days=30), now)
    assert period_of("12h", "1d", now, tokyo) == Period(
        now - timedelta(days=1, hours=12), now - timedelta(days=1)
    )
    assert period_of("2w", None, now, tokyo).start == now - timedelta(weeks=2)
    # A date is midnight in the shop's zone; a time without a zone is the shop's too.
    assert period_of("2026-11-02", "2026-11-03T09:00", now, tokyo) == Period(
        datetime(2026, 11, 1, 15, 0, tzinfo=UTC), datetime(2026, 11, 3, 0, 0, tzinfo=UTC)
    )
    assert period_of("2026-11-02T00:00+00:00", None, now, tokyo).start == datetime(
        2026, 11, 2, tzinfo=UTC
    )
    with pytest.raises(PeriodError, match="--since '-3d'"):
        period_of("-3d", None, now, tokyo)


def test_an_unknown_attribution_model_names_the_ones_there_are(history: tuple[str, Truth]) -> None:
    url, _ = history

    result = runner.invoke(
        app,
        ["report"],
        env={"KAERU_DATABASE_URL": url, "KAERU_ATTRIBUTION_MODEL": "linear"},
    )

    assert result.exit_code == 1, result.output
    assert "KAERU_ATTRIBUTION_MODEL='linear' is not valid" in result.stderr
    assert "'last-touch', 'first-touch' or 'delivery'" in result.stderr


def test_the_heatmap_prints_as_shades_that_fit_a_terminal() -> None:
    grid = [[0] * 24 for _ in range(7)]
    grid[0][9], grid[0][10], grid[6][23] = 4, 1, 4

    lines = shades("opens", tuple(map(tuple, grid))).splitlines()

    assert lines[1] == "Mon    " + "·" * 9 + "█░" + "·" * 13 + "  5"
    assert lines[7] == "Sun    " + "·" * 23 + "█  4"
    assert lines[-1] == "busiest: Mon 09:00, 4 opens"
    assert max(map(len, lines)) <= 80
    assert shades("clicks", tuple((0,) * 24 for _ in range(7))) == "clicks: none"
