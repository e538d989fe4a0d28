"""A report as JSON and back (kaeru/analytics/serialise.py)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta

import pytest

from kaeru.analytics.model import Estimate, ExperimentResult, Period, VariantResult
from kaeru.analytics.report import build_report
from kaeru.analytics.serialise import report_from_json, report_to_json
from kaeru.db import session
from kaeru.dev.history import generate
from tests.conftest import make_settings

START = datetime(2026, 11, 2, tzinfo=UTC)


def test_a_report_survives_json_and_back(sqlite_url: str) -> None:
    with session(sqlite_url) as s:
        generate(s, 5, 60, START)
    with session(sqlite_url) as s:
        report = build_report(s, make_settings(sqlite_url), Period(START, START + timedelta(7)))
    arm = VariantResult(
        variant="B",
        recipients=600,
        conversions=66,
        conversion_rate=0.11,
        revenue_per_recipient={"EUR": 123.5},
        conversion_lift=Estimate(0.03, 0.001, 0.059, 0.04),
        revenue_lift={"EUR": Estimate(20.0, -3.5, 43.5, None)},
    )
    experiment = ExperimentResult(
        journey_kind="cart-abandonment",
        experiment="subject",
        control="A",
        variants=(dataclasses.replace(arm, variant="A", conversion_lift=None), arm),
        verdict="B wins",
        promoted="significant at p < 0.05 after 500 recipients per arm",
        promoted_at=START + timedelta(days=3, hours=2),
    )
    report = dataclasses.replace(report, experiments=(experiment,))

    data = json.loads(json.dumps(report_to_json(report)))

    assert data["period"]["start"] == "2026-11-02T00:00:00+00:00"
    assert data["experiments"][0]["promoted_at"] == "2026-11-05T02:00:00+00:00"
    assert any(f["day"] == "2026-11-02" for f in data["funnels"])
    assert report.routes and report.funnels and report.attribution
    assert report_from_json(data) == report


def test_what_is_not_a_report_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="not a report"):
        report_from_json({"period": {"start": "2026-11-02T00:00:00+00:00"}})
