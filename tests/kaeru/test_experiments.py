"""Experiment results: the statistics against published worked examples, and results with
literal numbers from touchpoints on SQLite and PostgreSQL, and promotion recorded once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from kaeru.analytics.model import Period
from kaeru.cli import app
from kaeru.db import migrate, session
from kaeru.experiments import (
    Sample,
    experiment_results,
    promote_winners,
    t_quantile,
    t_sf,
    two_proportion,
    welch,
)
from kaeru.models import ExperimentPromotion
from kaeru.touchpoints import record_touchpoint
from tests.conftest import make_settings

KIND = "cart-abandonment"
EXPERIMENT = "cart_subject"
START = datetime(2026, 11, 2, tzinfo=UTC)
PERIOD = Period(START, START + timedelta(days=7))
DAY = timedelta(days=1)

# ---- the statistics ---------------------------------------------------------------------------


def test_welch_matches_r_on_students_sleep_data() -> None:
    """R's ``t.test(extra ~ group, data = sleep)`` (Student's 1908 data), as R documents it:
    t = -1.8608, df = 17.776, p-value = 0.07939, 95 % CI -3.3654832 to 0.2054832."""
    group1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    group2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    estimate = welch(Sample.of(group2), Sample.of(group1))
    assert estimate is not None
    assert estimate.difference == pytest.approx(-1.58)
    assert estimate.low == pytest.approx(-3.3654832, abs=1e-7)
    assert estimate.high == pytest.approx(0.2054832, abs=1e-7)
    assert estimate.p_value == pytest.approx(0.07939, abs=1e-5)


def test_welch_matches_wikipedias_first_example() -> None:
    """Wikipedia, "Welch's t-test", example 1: t = -2.46, df ≈ 24.9, p = 0.021."""
    a1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    a2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    estimate = welch(Sample.of(a2), Sample.of(a1))
    assert estimate is not None
    assert estimate.p_value == pytest.approx(0.021, abs=5e-4)
    assert estimate.low < estimate.difference < estimate.high < 0


def test_t_quantiles_match_the_printed_table() -> None:
    assert t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(0.975, 10) == pytest.approx(2.228, abs=1e-3)
    assert t_quantile(0.975, 30) == pytest.approx(2.042, abs=1e-3)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.960, abs=1e-3)
    assert t_sf(2.015, 5) == pytest.approx(0.05, abs=1e-4)  # one-sided 5 % at df 5


def test_two_proportion_z_test_on_a_worked_example() -> None:
    """140 of 200 against 255 of 340: pooled p = 0.7314815, SE = 0.03949401, z = -1.266015
    (the worked solution's numbers), two-sided p = 2 Φ(-1.266015) = 0.2055; the unpooled
    interval is -0.05 ± 1.96 × 0.0400184."""
    estimate = two_proportion(255, 340, 140, 200)
    assert estimate is not None
    assert estimate.difference == pytest.approx(-0.05)
    assert estimate.p_value == pytest.approx(0.20551, abs=1e-5)
    assert estimate.low == pytest.approx(-0.05 - 1.959964 * 0.0400184, abs=1e-6)
    assert estimate.high == pytest.approx(-0.05 + 1.959964 * 0.0400184, abs=1e-6)


def test_no_recipients_or_no_variation_gives_no_p_value() -> None:
    assert two_proportion(0, 0, 1, 10) is None
    same = two_proportion(0, 10, 0, 10)
    assert same is not None and same.p_value is None and same.difference == 0
    assert welch(Sample.of([1.0]), Sample.of([1.0, 2.0])) is None


# ---- results from touchpoints -----------------------------------------------------------------


def enter(
    s: object, customer: str, at: datetime, variant: str | None, arms: dict[str, str]
) -> None:
    record_touchpoint(
        s,  # type: ignore[arg-type]
        customer_id=customer,
        kind="journey_entered",
        key=f"{KIND}-{customer}/run/{at.timestamp()}/entered",
        journey_id=f"{KIND}-{customer}",
        journey_kind=KIND,
        variant=variant,
        occurred_at=at,
        detail={"version": "1", "arms": arms},
    )


def buy(s: Session, customer: str, at: datetime, value: int, currency: str = "USD") -> None:
    record_touchpoint(
        s,
        customer_id=customer,
        kind="purchase",
        key=f"purchase/{customer}/{at.timestamp()}",
        occurred_at=at,
        order_id=f"o-{customer}-{at.timestamp()}",
        value_minor=value,
        currency=currency,
        channel="web",
    )


def small_history(url: str) -> None:
    """4 held out (1 bought), 5 got the names_the_item subject (3 bought in the window, one
    of them in EUR, and 1 a second too late), nobody got asks_a_question."""
    at = START + DAY
    with session(url) as s:
        for n in range(1, 5):
            enter(s, f"h{n}", at, "holdout", {})
        buy(s, "h1", at + DAY, 2000)
        buy(s, "h2", at - timedelta(hours=1), 999)  # before the entry: not a conversion
        for n in range(1, 6):
            enter(s, f"n{n}", at, "names_the_item", {EXPERIMENT: "names_the_item"})
        buy(s, "n1", at + 2 * DAY, 1000)
        buy(s, "n2", at + 5 * DAY, 3000)  # the window's last moment: counted
        buy(s, "n3", at + 5 * DAY + timedelta(seconds=1), 700)  # past it
        buy(s, "n4", at + timedelta(hours=1), 500, "EUR")
        enter(s, "late", PERIOD.end, "names_the_item", {EXPERIMENT: "names_the_item"})


def test_results_with_literal_numbers(database_url: str) -> None:
    small_history(database_url)
    settings = make_settings(database_url)
    with session(database_url) as s:
        holdout, subject = experiment_results(s, settings, PERIOD)

    assert (holdout.journey_kind, holdout.experiment, holdout.control) == (
        KIND,
        "holdout",
        "holdout",
    )
    held, treated = holdout.variants
    assert (held.variant, held.recipients, held.conversions, held.conversion_rate) == (
        "holdout",
        4,
        1,
        0.25,
    )
    assert held.revenue_per_recipient == {"EUR": 0.0, "USD": 500.0}
    assert held.conversion_lift is None and held.revenue_lift == {}
    assert (treated.variant, treated.recipients, treated.conversions) == ("journey", 5, 3)
    assert treated.conversion_rate == pytest.approx(0.6)
    assert treated.revenue_per_recipient == {"EUR": 100.0, "USD": 800.0}
    # Pooled 4/9, SE = sqrt(4/9 × 5/9 × (1/4 + 1/5)) = 1/3, z = 0.35 × 3 = 1.05.
    lift = treated.conversion_lift
    assert lift is not None and lift.difference == pytest.approx(0.35)
    assert lift.p_value == pytest.approx(0.29372, abs=1e-5)
    assert set(treated.revenue_lift) == {"EUR", "USD"}
    assert treated.revenue_lift["USD"].difference == pytest.approx(300.0)
    assert holdout.verdict == "collecting"

    assert (subject.experiment, subject.control) == (EXPERIMENT, "holdout")
    assert [v.variant for v in subject.variants] == ["holdout", "names_the_item", "asks_a_question"]
    names, asks = subject.variants[1], subject.variants[2]
    assert (names.recipients, names.conversions) == (5, 3)
    assert names.conversion_lift == lift
    # A variant with zero sends: shown, with nothing to divide.
    assert (asks.recipients, asks.conversions, asks.conversion_rate) == (0, 0, None)
    assert asks.revenue_per_recipient == {} and asks.conversion_lift is None
    assert subject.verdict == "collecting"
    assert subject.promoted is None


def significant_history(
    url: str, control_buyers: int, question_buyers: int, at: datetime = START + DAY
) -> None:
    """100 customers per arm, no holdout: the first declared variant is the control."""
    with session(url) as s:
        for n in range(100):
            enter(s, f"a{n}", at, "names_the_item", {EXPERIMENT: "names_the_item"})
            enter(s, f"b{n}", at, "asks_a_question", {EXPERIMENT: "asks_a_question"})
        for n in range(control_buyers):
            buy(s, f"a{n}", at + DAY, 1000)
        for n in range(question_buyers):
            buy(s, f"b{n}", at + DAY, 1000)


def test_a_verdict_waits_for_the_minimum_sample_then_names_the_winner(database_url: str) -> None:
    significant_history(database_url, 10, 30)
    with session(database_url) as s:
        [waiting] = experiment_results(s, make_settings(database_url), PERIOD)
        [decided] = experiment_results(
            s, make_settings(database_url, experiment_min_sample=100), PERIOD
        )
    assert waiting.verdict == "collecting"  # 100 per arm, below the default 500
    assert decided.control == "names_the_item"
    question = decided.variants[1]
    # Pooled 0.2, SE = sqrt(0.2 × 0.8 × 2/100) = 0.056569, z = 0.2 / 0.056569 = 3.5355.
    assert question.conversion_lift is not None
    assert question.conversion_lift.p_value == pytest.approx(0.000407, abs=1e-6)
    assert decided.verdict == "asks_a_question wins"


def test_no_difference_when_the_arms_convert_alike(database_url: str) -> None:
    significant_history(database_url, 20, 21)
    with session(database_url) as s:
        settings = make_settings(database_url, experiment_min_sample=100)
        [result] = experiment_results(s, settings, PERIOD)
    assert result.verdict == "no difference"


def test_the_winner_is_promoted_once_with_when_and_why(database_url: str) -> None:
    significant_history(database_url, 10, 30)
    when = datetime(2026, 11, 9, 8, 0, tzinfo=UTC)
    off = make_settings(database_url, experiment_min_sample=100)
    on = make_settings(database_url, experiment_min_sample=100, experiment_auto_promote=True)
    with session(database_url) as s:
        assert promote_winners(s, off, PERIOD, now=when) == []
    with session(database_url) as s:
        [promotion] = promote_winners(s, on, PERIOD, now=when)
    with session(database_url) as s:
        assert promote_winners(s, on, PERIOD) == []  # recorded once
        [row] = s.exec(select(ExperimentPromotion)).all()
        [result] = experiment_results(s, on, PERIOD)
    assert (row.journey_kind, row.experiment, row.variant) == (KIND, EXPERIMENT, "asks_a_question")
    assert row.promoted_at == when
    assert "asks_a_question: 30/100 converted, +0.2000 vs names_the_item" in row.reason
    assert "p=0.000407" in row.reason and "names_the_item: 10/100 converted" in row.reason
    assert (result.promoted, result.promoted_at) == ("asks_a_question", when)
    assert result.promotion_reason == row.reason


def test_no_entries_no_results(database_url: str) -> None:
    with session(database_url) as s:
        assert experiment_results(s, make_settings(database_url), PERIOD) == ()


def test_kaeru_experiments_prints_the_results_and_promotes_on_request(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    migrate(url)
    significant_history(url, 10, 30, at=datetime.now(UTC) - 6 * DAY)
    env = {"KAERU_DATABASE_URL": url, "KAERU_EXPERIMENT_MIN_SAMPLE": "100", "COLUMNS": "200"}
    shown = CliRunner().invoke(app, ["experiments", "--days", "7"], env=env)
    assert shown.exit_code == 0, shown.output
    assert "cart-abandonment · cart_subject: asks_a_question wins" in shown.output
    assert "10.0%" in shown.output and "30.0%" in shown.output
    # Percentage points: 20 ± 1.96 × sqrt(0.1 × 0.9 / 100 + 0.3 × 0.7 / 100) × 100.
    assert "+20.00 [+9.26, +30.74] p=0.000407" in shown.output
    refused = CliRunner().invoke(app, ["experiments", "--promote"], env=env)
    assert refused.exit_code == 1
    assert "KAERU_EXPERIMENT_AUTO_PROMOTE=true" in refused.stderr
    env["KAERU_EXPERIMENT_AUTO_PROMOTE"] = "true"
    promoted = CliRunner().invoke(app, ["experiments", "--promote"], env=env)
    assert promoted.exit_code == 0, promoted.output
    assert "Promoted asks_a_question in cart-abandonment cart_subject now." in promoted.output
    again = CliRunner().invoke(app, ["experiments", "--promote"], env=env)
    assert "now." not in again.output and "Promoted asks_a_question on " in again.output


def test_beating_the_holdout_is_not_enough_to_win(database_url: str) -> None:
    """Both subjects far above a 2 % holdout, 11 % against 10 %: neither has been shown better
    than the other, so no winner (the holdout's own result says the journey works)."""
    at = START + DAY
    with session(database_url) as s:
        for n in range(100):
            enter(s, f"h{n}", at, "holdout", {})
            enter(s, f"a{n}", at, "names_the_item", {EXPERIMENT: "names_the_item"})
            enter(s, f"b{n}", at, "asks_a_question", {EXPERIMENT: "asks_a_question"})
        for prefix, buyers in (("h", 2), ("a", 10), ("b", 11)):
            for n in range(buyers):
                buy(s, f"{prefix}{n}", at + DAY, 1000)
        settings = make_settings(database_url, experiment_min_sample=100)
        journey, subject = experiment_results(s, settings, PERIOD)
    assert (journey.experiment, journey.verdict) == ("holdout", "journey wins")
    assert subject.control == "holdout"
    [b] = [v for v in subject.variants if v.variant == "asks_a_question"]
    assert b.conversion_lift is not None and b.conversion_lift.p_value is not None
    assert b.conversion_lift.p_value < 0.05  # above the holdout...
    assert subject.verdict == "no difference"  # ...but not above the other subject


def test_no_verdict_while_entries_are_inside_their_window(database_url: str) -> None:
    """A customer who entered two days ago has not had the five days to buy an older one had:
    the numbers show, the verdict waits until the period's last window has passed."""
    entered = datetime.now(UTC) - 2 * DAY
    significant_history(database_url, 10, 30, at=entered)
    period = Period(entered - DAY, entered + DAY)
    settings = make_settings(database_url, experiment_min_sample=100)
    with session(database_url) as s:
        [now] = experiment_results(s, settings, period)
        [later] = experiment_results(s, settings, period, now=entered + 5 * DAY)
    assert now.verdict == "collecting"
    assert [v.recipients for v in now.variants] == [100, 100]
    assert later.verdict == "asks_a_question wins"


def test_a_customer_counts_from_their_first_entry(database_url: str) -> None:
    """A held-out journey ends at once, so its customer enters again with each cart event; a
    purchase in the window of a later entry only does not make them a conversion."""
    at = START + DAY
    with session(database_url) as s:
        for day in range(3):
            enter(s, "h1", at + day * DAY, "holdout", {})
        enter(s, "t1", at, None, {})
        buy(s, "h1", at + 2 * DAY + 4 * DAY, 1000)  # 6 days after the first entry
        [result] = experiment_results(s, make_settings(database_url), PERIOD)
    [held, treated] = result.variants
    assert (held.variant, held.recipients, held.conversions) == ("holdout", 1, 0)
    assert (treated.variant, treated.recipients) == ("journey", 1)


def test_entries_given_a_promoted_winner_are_not_an_arm(database_url: str) -> None:
    """After a promotion everyone gets the winner: those entries are no experiment."""
    at = START + DAY
    with session(database_url) as s:
        record_touchpoint(
            s,
            customer_id="p1",
            kind="journey_entered",
            key="promoted/p1",
            journey_id=f"{KIND}-p1",
            journey_kind=KIND,
            variant="asks_a_question",
            occurred_at=at,
            detail={
                "version": "1",
                "arms": {EXPERIMENT: "asks_a_question"},
                "promoted": [EXPERIMENT],
            },
        )
        enter(s, "r1", at, "names_the_item", {EXPERIMENT: "names_the_item"})
        [result] = experiment_results(s, make_settings(database_url), PERIOD)
    assert [(v.variant, v.recipients) for v in result.variants] == [
        ("names_the_item", 1),
        ("asks_a_question", 0),
    ]
