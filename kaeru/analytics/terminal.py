"""`kaeru report` in a terminal and in spreadsheets: the period from ``--since``/``--until``,
a report as rich tables, and as one CSV file per section."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from datetime import datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from rich.console import Console
from rich.table import Table

from kaeru.analytics.model import ALL, Estimate, ExperimentResult, Kpis, Period, Report
from kaeru.money import format_minor

_AGO = re.compile(r"^\s*(\d+)\s*([hdw])\s*$", re.IGNORECASE)
_UNITS = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


class PeriodError(ValueError):
    """``--since`` or ``--until`` cannot be read; the message says how to write them."""


#: The earliest moment a period may start: kaeru has no touchpoints before it, and the period
#: before a period (``Period.previous``) minus a window must stay a datetime.
EARLIEST = datetime(2000, 1, 1, tzinfo=ZoneInfo("UTC"))
#: How far past now a period may end.
AHEAD = timedelta(days=366)


def moment(text: str, option: str, now: datetime, zone: ZoneInfo) -> datetime:
    """``text`` as an aware datetime: ``7d``/``2w``/``12h`` before ``now``, an ISO date
    (midnight in ``zone``, the shop's time zone) or an ISO date and time (``zone`` if it
    names none).

    Raises:
        PeriodError: ``text`` is none of these.
    """
    ago = _AGO.match(text)
    if ago is not None:
        try:
            return now - int(ago.group(1)) * _UNITS[ago.group(2).lower()]
        except OverflowError:
            raise PeriodError(
                f"{option} {text!r} reaches back before year 1: give an age of years, not "
                f"millennia (e.g. 365d), or a date from {EARLIEST.date()}"
            ) from None
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text.strip()):
            day = datetime.fromisoformat(text.strip()).date()
            return datetime.combine(day, time(0), zone)
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise PeriodError(
            f"{option} {text!r} is not a time: give an age (7d, 30d, 2w, 12h) or an ISO date "
            "or time (2026-11-01, 2026-11-01T08:00, 2026-11-01T08:00+09:00)"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=zone)


def period_of(since: str, until: str | None, now: datetime, zone: ZoneInfo) -> Period:
    """The period ``[since, until)``; an age in ``since`` counts back from ``until``.

    Raises:
        PeriodError: either cannot be read, or the period is empty.
    """
    end = moment(until, "--until", now, zone) if until else now
    start = moment(since, "--since", end, zone)
    if start < EARLIEST or end > now + AHEAD:
        raise PeriodError(
            f"the period from {start.isoformat()} to {end.isoformat()} is outside what kaeru can "
            f"have recorded: give times from {EARLIEST.date()} to a year from now"
        )
    if start >= end:
        raise PeriodError(
            f"the period from {start.isoformat()} to {end.isoformat()} is empty: --since must be "
            "before --until (e.g. --since 2026-11-01 --until 2026-11-08)"
        )
    return Period(start.astimezone(ZoneInfo("UTC")), end.astimezone(ZoneInfo("UTC")))


# ---- cells ------------------------------------------------------------------------------------


def percent(value: float | None) -> str:
    """A rate as a percentage; ``n/a`` when nobody reached its denominator."""
    return "n/a" if value is None else f"{value * 100:.1f}%"


def money(amounts: dict[str, int]) -> str:
    """Each currency on its own (never summed together); ``-`` for none."""
    return ", ".join(format_minor(v, c) for c, v in sorted(amounts.items())) or "-"


def _kind(kind: str) -> str:
    return "all journeys" if kind == ALL else kind


# ---- sections as rows (the tables and the CSV files share them) -------------------------------

KPI_COLUMNS = (
    "journey",
    "period",
    "entered",
    "sent",
    "delivered",
    "delivery rate",
    "human opens",
    "open rate",
    "clicks",
    "click rate",
    "unsubscribes",
    "unsubscribe rate",
    "bounces",
    "bounce rate",
    "conversions",
    "conversion rate",
    "revenue",
)


def kpi_rows(report: Report, *, raw: bool = False) -> list[list[str]]:
    """A row per journey kind and period (this one, the one before)."""
    rows = []
    for kind, compared in report.kpis.items():
        for label, k in (("this", compared.current), ("before", compared.previous)):
            rows.append([kind if raw else _kind(kind), label, *_kpi_cells(k, raw)])
    return rows


def _kpi_cells(k: Kpis, raw: bool) -> list[str]:
    def r(value: float | None) -> str:
        return ("" if value is None else repr(value)) if raw else percent(value)

    return [
        str(k.entered),
        str(k.messages_sent),
        str(k.delivered),
        r(k.delivery_rate),
        str(k.human_opens),
        r(k.open_rate),
        str(k.clicks),
        r(k.click_rate),
        str(k.unsubscribes),
        r(k.unsubscribe_rate),
        str(k.bounces),
        r(k.bounce_rate),
        str(k.conversions),
        r(k.conversion_rate),
        _money(k.revenue, raw),
    ]


def _money(amounts: dict[str, int], raw: bool) -> str:
    # In a CSV, minor units as the database holds them (``EUR:1999``), for exact sums.
    return " ".join(f"{c}:{v}" for c, v in sorted(amounts.items())) if raw else money(amounts)


FUNNEL_COLUMNS = ("journey", "version", "day", "stage", "customers", "dropoff")


def funnel_rows(report: Report, *, raw: bool = False) -> list[list[str]]:
    """A row per stage of each funnel (a terminal shows the whole period's only)."""
    rows = []
    for funnel in report.funnels:
        if not raw and (funnel.version is not None or funnel.day is not None):
            continue
        for stage in funnel.stages:
            dropoff = stage.dropoff
            rows.append(
                [
                    funnel.journey_kind,
                    funnel.version or ("" if raw else "all"),
                    funnel.day.isoformat() if funnel.day else ("" if raw else "all"),
                    stage.name,
                    str(stage.count),
                    ("" if dropoff is None else repr(dropoff)) if raw else percent(dropoff),
                ]
            )
    return rows


ATTRIBUTION_COLUMNS = ("journey", "step", "variant", "orders", "revenue")


def attribution_rows(report: Report, *, raw: bool = False) -> list[list[str]]:
    return [
        [a.journey_kind, a.step, a.variant or "", str(a.orders), _money(a.revenue, raw)]
        for a in report.attribution
    ]


ROUTE_COLUMNS = ("journey", "route", "customers", "converted", "conversion rate", "revenue")


def route_rows(report: Report, *, raw: bool = False) -> list[list[str]]:
    return [
        [
            r.journey_kind if raw else _kind(r.journey_kind),
            " → ".join(r.steps),
            str(r.customers),
            str(r.converted),
            ("" if r.conversion_rate is None else repr(r.conversion_rate))
            if raw
            else percent(r.conversion_rate),
            _money(r.revenue, raw),
        ]
        for r in report.routes
    ]


HEATMAP_COLUMNS = ("what", "weekday", *(f"{hour:02d}" for hour in range(24)))


def heatmap_rows(report: Report) -> list[list[str]]:
    rows = []
    for what, grid in (("opens", report.heatmap.opens), ("clicks", report.heatmap.clicks)):
        for day, hours in zip(WEEKDAYS, grid, strict=True):
            rows.append([what, day, *(str(n) for n in hours)])
    return rows


# ---- output -----------------------------------------------------------------------------------


def _table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold", box=None)
    for name in columns:
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    return table


EXPERIMENT_COLUMNS = (
    "journey",
    "experiment",
    "verdict",
    "arm",
    "recipients",
    "conversions",
    "rate",
    "revenue / recipient",
    "conversion vs control (pts, 95% CI)",
)


def _estimate(estimate: Estimate | None, scale: float = 1.0) -> str:
    if estimate is None:
        return "-"
    p = f"p={estimate.p_value:.3g}" if estimate.p_value is not None else "p=n/a"
    return (
        f"{estimate.difference * scale:+.2f} "
        f"[{estimate.low * scale:+.2f}, {estimate.high * scale:+.2f}] {p}"
    )


def experiment_rows(results: Sequence[ExperimentResult], *, raw: bool = False) -> list[list[str]]:
    """One row per arm of every experiment: its numbers and its difference with the control
    (percentage points, the 95 % interval and the p-value)."""
    rows = []
    for result in results:
        for arm in result.variants:
            if raw:
                revenue = " ".join(
                    f"{c}:{v:.2f}" for c, v in sorted(arm.revenue_per_recipient.items())
                )
            else:
                revenue = ", ".join(
                    format_minor(round(v), c) for c, v in sorted(arm.revenue_per_recipient.items())
                )
            rate = arm.conversion_rate
            rows.append(
                [
                    result.journey_kind,
                    result.experiment,
                    result.verdict,
                    arm.variant,
                    str(arm.recipients),
                    str(arm.conversions),
                    str(rate) if raw and rate is not None else percent(rate),
                    revenue or "-",
                    _estimate(arm.conversion_lift, 100.0),
                ]
            )
    return rows


def render_experiments(results: Sequence[ExperimentResult], console: Console) -> None:
    """Print each experiment (and holdout) as a table with its verdict and any promotion."""
    for result in results:
        title = f"{_kind(result.journey_kind)} · {result.experiment}: {result.verdict}"
        mine = [row[3:] for row in experiment_rows([result])]
        columns = list(EXPERIMENT_COLUMNS[3:])
        columns[-1] = f"conversion vs {result.control} (pts, 95% CI)"
        console.print(_table(title, columns, mine))
        if result.promoted is not None and result.promoted_at is not None:
            console.print(
                f"Promoted {result.promoted} on {result.promoted_at:%Y-%m-%d %H:%M} UTC: "
                f"{result.promotion_reason}",
                soft_wrap=True,
            )


def render(report: Report, console: Console) -> None:
    """Print ``report`` as tables."""
    period = report.period
    console.print(
        f"[bold]kaeru report[/bold] {period.start:%Y-%m-%d %H:%M} to {period.end:%Y-%m-%d %H:%M} "
        "UTC (against the period of the same length before)"
    )
    for kind, compared in report.kpis.items():
        now = _kpi_cells(compared.current, raw=False)
        then = _kpi_cells(compared.previous, raw=False)
        rows = [[name, a, b] for name, a, b in zip(KPI_COLUMNS[2:], now, then, strict=True)]
        console.print(_table(f"KPIs: {_kind(kind)}", ("", "this period", "before"), rows))
    funnels = funnel_rows(report)
    if funnels:
        columns = ("journey", "stage", "customers", "dropoff")
        console.print(_table("Funnels", columns, [[r[0], r[3], r[4], r[5]] for r in funnels]))
    else:
        console.print("Funnels: no journey touched anyone in this period.")
    attributed = attribution_rows(report)
    if attributed:
        console.print(_table("Revenue recovered (attribution)", ATTRIBUTION_COLUMNS, attributed))
    else:
        console.print("Revenue recovered: no purchase is credited to a journey in this period.")
    if not report.routes:
        console.print("Routes: no touchpoints in this period.")
    for kind in dict.fromkeys(r.journey_kind for r in report.routes):
        rows = [row[1:] for row, r in zip(route_rows(report), report.routes, strict=True)]
        mine = [row for row, r in zip(rows, report.routes, strict=True) if r.journey_kind == kind]
        table = _table(f"Routes: {_kind(kind)}", ROUTE_COLUMNS[1:], mine)
        table.columns[0].ratio = 1  # the route takes the width the numbers leave
        for column in table.columns[1:]:
            column.no_wrap = True
        console.print(table)
    if report.experiments:
        render_experiments(report.experiments, console)
    else:
        console.print("Experiments: none ran in this period.")
    console.print(
        "[bold]Send time[/bold]: a person's opens and clicks by weekday and hour (each "
        "customer's time zone)"
    )
    for what, grid in (("opens", report.heatmap.opens), ("clicks", report.heatmap.clicks)):
        console.print(shades(what, grid))


#: Darker for more: a cell's share of the busiest hour, in quarters (blank: none).
SHADES = "░▒▓█"


def shades(what: str, grid: tuple[tuple[int, ...], ...]) -> str:
    """``grid`` as a block of shades that fits 80 columns, and its busiest hour (the exact
    numbers are in ``--json`` and ``--csv``)."""
    busiest = max(
        ((n, day, hour) for day, hours in enumerate(grid) for hour, n in enumerate(hours)),
        key=lambda cell: (cell[0], -cell[1], -cell[2]),  # the earliest of equals
    )
    if busiest[0] == 0:
        return f"{what}: none"
    lines = [f"{what:<7}" + "".join(f"{hour:<3}" for hour in range(0, 24, 3))]
    for name, hours in zip(WEEKDAYS, grid, strict=True):
        cells = (SHADES[min(3, (4 * n - 1) // busiest[0])] if n else "·" for n in hours)
        lines.append(f"{name:<7}" + "".join(cells) + f"  {sum(hours)}")
    n, day, hour = busiest
    lines.append(f"busiest: {WEEKDAYS[day]} {hour:02d}:00, {n} {what}")
    return "\n".join(lines)


def write_csv(report: Report, directory: Path) -> list[Path]:
    """One CSV file per section in ``directory`` (created if missing); the paths written.
    Rates are fractions, money ``CUR:minor units`` per currency (``EUR:1999 JPY:300``)."""
    directory.mkdir(parents=True, exist_ok=True)
    sections = {
        "kpis.csv": (KPI_COLUMNS, kpi_rows(report, raw=True)),
        "funnels.csv": (FUNNEL_COLUMNS, funnel_rows(report, raw=True)),
        "attribution.csv": (ATTRIBUTION_COLUMNS, attribution_rows(report, raw=True)),
        "routes.csv": (ROUTE_COLUMNS, route_rows(report, raw=True)),
        "heatmap.csv": (HEATMAP_COLUMNS, heatmap_rows(report)),
        "experiments.csv": (EXPERIMENT_COLUMNS, experiment_rows(report.experiments, raw=True)),
    }
    written = []
    for name, (columns, rows) in sections.items():
        path = directory / name
        with path.open("w", newline="", encoding="utf-8") as out:
            writer = csv.writer(out)
            writer.writerow(columns)
            writer.writerows(rows)
        written.append(path)
    return written
