"""Assignment of experiment arms and holdouts (pure code the workflows run), and the
per-journey settings that say which run."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest

from activities.types import EntryPlan
from kaeru.journeys import JourneyError, read_entry, registry, setting_infos
from kaeru.variants import Experiment, Variant, assign, held_out
from tests.conftest import make_settings
from workflows.cart_abandonment import CartAbandonment
from workflows.kit import Journey
from workflows.order_confirmation import OrderConfirmation

IDS = [f"c-{n}" for n in range(20_000)]
SPLIT = Experiment(step="cart_email", variants={"a": Variant(weight=1), "b": Variant(weight=3)})


def test_the_same_customer_always_gets_the_same_arm() -> None:
    arms = [assign("c-42", "cart-abandonment", "subject", SPLIT) for _ in range(5)]
    assert len(set(arms)) == 1
    # A literal: the hash is part of the contract (a change would move running customers).
    assert assign("c-1", "cart-abandonment", "subject", SPLIT) == "b"
    assert assign("c-3", "cart-abandonment", "subject", SPLIT) == "a"


def test_weights_are_respected_over_many_customers() -> None:
    counts = Counter(assign(c, "cart-abandonment", "subject", SPLIT) for c in IDS)
    assert counts["a"] / len(IDS) == pytest.approx(0.25, abs=0.015)
    assert counts["b"] / len(IDS) == pytest.approx(0.75, abs=0.015)


def test_experiments_and_kinds_split_customers_independently() -> None:
    even = Experiment(step="x", variants={"a": Variant(), "b": Variant()})
    first = [assign(c, "cart-abandonment", "one", even) for c in IDS]
    second = [assign(c, "cart-abandonment", "two", even) for c in IDS]
    other_kind = [assign(c, "win-back", "one", even) for c in IDS]
    same = sum(x == y for x, y in zip(first, second, strict=True)) / len(IDS)
    assert same == pytest.approx(0.5, abs=0.02)
    assert sum(x == y for x, y in zip(first, other_kind, strict=True)) / len(IDS) == (
        pytest.approx(0.5, abs=0.02)
    )


def test_holdout_takes_its_percentage_deterministically() -> None:
    held = [c for c in IDS if held_out(c, "cart-abandonment", 10)]
    assert len(held) / len(IDS) == pytest.approx(0.10, abs=0.01)
    assert held == [c for c in IDS if held_out(c, "cart-abandonment", 10)]
    assert not any(held_out(c, "cart-abandonment", 0) for c in IDS[:1000])
    assert all(held_out(c, "cart-abandonment", 100) for c in IDS[:1000])
    # A larger holdout keeps everyone a smaller one held out.
    assert set(held) <= {c for c in IDS if held_out(c, "cart-abandonment", 20)}


@pytest.mark.parametrize(
    ("variants", "problem"),
    [
        ({"a": Variant()}, "at least two variants"),
        ({"a": Variant(), "holdout": Variant()}, "cannot name a variant"),
        ({"a": Variant(), "b": Variant(weight=0)}, "weight of 1 or more"),
    ],
)
def test_an_experiment_no_journey_can_run_is_refused(
    variants: dict[str, Variant], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        Experiment(step="cart_email", variants=variants).check("subject")


def test_an_experiment_named_holdout_is_refused() -> None:
    """``holdout`` names a journey kind's holdout result: an experiment of that name would be
    read as it (and never promoted)."""
    with pytest.raises(ValueError, match="cannot be named 'holdout'"):
        Experiment(step="cart_email", variants={"a": Variant(), "b": Variant()}).check("holdout")


def test_two_experiments_on_one_step_are_refused_when_the_class_is_defined() -> None:
    even = {"a": Variant(), "b": Variant()}
    with pytest.raises(TypeError, match="one experiment per message step"):

        class Twice(Journey[Any]):
            kind = "twice"
            experiments = {
                "one": Experiment(step="email", variants=even),
                "two": Experiment(step="email", variants=even),
            }


# ---- the settings -----------------------------------------------------------------------------


def test_holdout_and_experiments_are_read_per_journey(monkeypatch: pytest.MonkeyPatch) -> None:
    assert read_entry(CartAbandonment) == EntryPlan(0.0, [])  # the example is off by default
    monkeypatch.setenv("KAERU_CART_HOLDOUT_PERCENT", "12.5")
    monkeypatch.setenv("KAERU_CART_EXPERIMENTS", "cart_subject")
    assert read_entry(CartAbandonment) == EntryPlan(12.5, ["cart_subject"])
    registry.cache_clear()
    try:
        route = registry().route("cart-abandonment")
        start = route.make_input(f"c-{uuid.uuid4().hex[:6]}", make_settings("sqlite://"))
        assert start.entry == EntryPlan(12.5, ["cart_subject"])
        assert start.entry is not route.entry  # each journey its own copy
    finally:
        registry.cache_clear()
    variables = {i.variable for i in setting_infos(CartAbandonment)}
    assert {"KAERU_CART_HOLDOUT_PERCENT", "KAERU_CART_EXPERIMENTS"} <= variables
    assert "KAERU_ORDER_CONFIRMATION_HOLDOUT_PERCENT" not in {
        i.variable for i in setting_infos(OrderConfirmation)
    }


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("KAERU_CART_HOLDOUT_PERCENT", "150", "KAERU_CART_HOLDOUT_PERCENT='150' is not valid"),
        ("KAERU_CART_HOLDOUT_PERCENT", "ten", "a percentage from 0 to 100"),
        ("KAERU_CART_EXPERIMENTS", "subject", "it declares: cart_subject"),
    ],
)
def test_wrong_values_name_the_variable_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, problem: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(JourneyError, match=problem):
        read_entry(CartAbandonment)


def test_a_transactional_journey_never_holds_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAERU_ORDER_CONFIRMATION_HOLDOUT_PERCENT", "10")
    with pytest.raises(JourneyError, match="transactional and never holds a customer out"):
        read_entry(OrderConfirmation)


class Delayed(CartAbandonment):
    """The cart journey with an experiment on a wait and on the whole template."""

    experiments = {
        "offer_timing": Experiment(
            step="offer_email",
            variants={"a_day": Variant(), "an_hour": Variant(delay=3600, template="cart_offer")},
        )
    }


def test_a_journey_reads_its_arm_and_the_arms_delay() -> None:
    journey = object.__new__(Delayed)  # no workflow needed: arm and delay read its arms only
    journey.arms = None  # a journey that began before entries: every experiment's default
    assert journey.arm("offer_email") is None
    assert journey.delay("offer_email", 86400.0) == 86400.0
    journey.arms = {"offer_timing": "an_hour"}
    timing = Delayed.experiments["offer_timing"]
    assert journey.arm("offer_email") == ("offer_timing", "an_hour", timing)
    assert journey.arm("cart_email") is None
    assert journey.delay("offer_email", 86400.0) == 3600.0
    journey.arms = {"offer_timing": "a_day"}
    assert journey.delay("offer_email", 86400.0) == 86400.0
    journey.arms = {"offer_timing": "since_removed"}  # a carried arm the class no longer has
    assert journey.arm("offer_email") is None
