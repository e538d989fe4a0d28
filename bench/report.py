"""The report's time against reading its rows.

Baseline (measured in the same run, on the same database): a plain ``SELECT`` of the rows the
report reads (every touchpoint column it uses, from the start of the period before less one
attribution window to the period's end, in time order), fetched into Python. Measured:
:func:`kaeru.analytics.report.build_report` of the week, which reads those rows once and
computes the KPIs of both weeks, the funnels, attribution, routes and heatmap from them.

The history is :func:`kaeru.dev.history.generate`'s (two weeks, one story per customer).
Prints ratios to the baseline, never absolute verdicts: the machines are shared and noisy;
``--rounds 3`` repeats the timings and prints the medians. ``--database-url`` runs it on
PostgreSQL (an empty, migrated database) instead of a temporary SQLite file.

    .venv/bin/python bench/report.py [--customers 10000] [--rounds 3] [--database-url URL]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlmodel import col, select  # noqa: E402

from kaeru.analytics.history import _COLUMNS  # noqa: E402
from kaeru.analytics.model import Period  # noqa: E402
from kaeru.analytics.report import build_report  # noqa: E402
from kaeru.db import migrate, session  # noqa: E402
from kaeru.dev.history import generate  # noqa: E402
from kaeru.models import Touchpoint  # noqa: E402
from kaeru.settings import Settings  # noqa: E402

START = datetime(2026, 11, 2, tzinfo=UTC)


def plain_select(url: str, settings: Settings, period: Period) -> int:
    """The baseline: the report's rows, fetched and nothing else; how many."""
    since = period.previous().start - settings.attribution_window
    columns = [col(getattr(Touchpoint, name)) for name in _COLUMNS]
    with session(url) as s:
        rows = s.exec(
            select(*columns)
            .where(col(Touchpoint.occurred_at) >= since, col(Touchpoint.occurred_at) < period.end)
            .order_by(col(Touchpoint.occurred_at), col(Touchpoint.id))
        ).all()
    return len(rows)


def report(url: str, settings: Settings, period: Period) -> None:
    with session(url) as s:
        build_report(s, settings, period)


def timed(call: object, *args: object) -> float:
    started = time.perf_counter()
    call(*args)  # type: ignore[operator]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        migrate(url)
        settings = Settings(_env_file=None, database_url=url)
        print(f"writing {args.customers} customers' stories ...", flush=True)
        with session(url) as s:
            generate(s, 1, args.customers, START)
        period = Period(START, START + timedelta(days=7))
        rows = plain_select(url, settings, period)
        print(f"{rows} touchpoints in the rows the report reads", flush=True)
        baseline, measured = [], []
        for _ in range(args.rounds):
            baseline.append(timed(plain_select, url, settings, period))
            measured.append(timed(report, url, settings, period))
        base, took = statistics.median(baseline), statistics.median(measured)
        print(f"plain SELECT of those rows: {base:.3f} s (median of {args.rounds})")
        print(f"build_report:              {took:.3f} s, {took / base:.1f}x the plain SELECT")


if __name__ == "__main__":
    main()
