"""Keyed pseudonyms of customer ids in Temporal's visibility (kaeru/pseudonyms.py): pure."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from kaeru.pseudonyms import (
    ALWAYS,
    AUTO,
    NEVER,
    VisibleIds,
    is_pseudonym,
    journey_kind,
    looks_personal,
    visible_customer_id,
)
from kaeru.settings import Settings

KEY = b"k" * 43
OTHER_KEY = b"o" * 43


@pytest.mark.parametrize(
    "customer_id",
    [
        "ann@example.com",
        "Ann.Lee+shop@Example.co.uk",
        "ann@localhost",
        "+14155550123",
        "+44 20 7946 0958",
        "(415) 555-0123",
        "020 7946 0958",
        "07911123456",
        "p_" + "0" * 32,  # shaped like a pseudonym: never left clear (it could collide)
    ],
)
def test_auto_pseudonymises_what_looks_like_personal_data(customer_id: str) -> None:
    assert looks_personal(customer_id)
    visible = visible_customer_id(customer_id, KEY, AUTO)
    assert visible != customer_id and is_pseudonym(visible)


@pytest.mark.parametrize(
    "customer_id",
    ["c-42", "6557387178136", "207119551", "anon-7f3a", "user_12", "a@", "@b", "", "p_abc"],
)
def test_auto_keeps_ordinary_ids_clear(customer_id: str) -> None:
    assert not looks_personal(customer_id)
    assert visible_customer_id(customer_id, KEY, AUTO) == customer_id


def test_always_and_never() -> None:
    assert is_pseudonym(visible_customer_id("c-42", KEY, ALWAYS))
    assert visible_customer_id("ann@example.com", KEY, NEVER) == "ann@example.com"


def test_a_pseudonym_is_keyed_stable_and_unreadable() -> None:
    one = visible_customer_id("ann@example.com", KEY, AUTO)
    assert one == visible_customer_id("ann@example.com", KEY, ALWAYS)
    assert re.fullmatch(r"p_[0-9a-f]{32}", one)  # 128 bits
    assert one != visible_customer_id("ann@example.com", OTHER_KEY, AUTO)
    assert one != visible_customer_id("bob@example.com", KEY, AUTO)
    assert "ann" not in one and "example" not in one
    # Not erase's pseudonym of the same id (another purpose, another derivation).
    from starter.privacy import pseudonym

    assert pseudonym(KEY, "ann@example.com").removeprefix("anon-") != one.removeprefix("p_")


def test_no_clear_id_of_the_auto_rule_is_a_pseudonym() -> None:
    """Whatever stays clear under ``auto`` never has the pseudonym's shape."""
    for clear in ["c-42", "p_" + "a" * 31, "p_" + "A" * 32, "P_" + "a" * 32, "p_" + "a" * 33]:
        assert visible_customer_id(clear, KEY, AUTO) == clear
        assert not is_pseudonym(clear)


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, always or never"):
        visible_customer_id("c-42", KEY, "sometimes")


def test_workflow_ids_new_first_then_the_clear_one_of_journeys_started_before() -> None:
    ids = VisibleIds(KEY, AUTO)
    pseudo = visible_customer_id("ann@example.com", KEY, AUTO)
    assert ids.workflow_ids("cart-abandonment", "ann@example.com") == (
        f"cart-abandonment-{pseudo}",
        "cart-abandonment-ann@example.com",
    )
    assert ids.workflow_ids("cart-abandonment", "c-42") == ("cart-abandonment-c-42", None)
    assert VisibleIds(KEY, NEVER).workflow_ids("welcome", "ann@example.com") == (
        "welcome-ann@example.com",
        None,
    )
    # Whatever the mode, erase and export look under both.
    assert VisibleIds(KEY, NEVER).every_id("ann@example.com") == ["ann@example.com", pseudo]
    assert VisibleIds(KEY, NEVER).every_id("c-42") == [
        "c-42",
        visible_customer_id("c-42", KEY, ALWAYS),
    ]


@pytest.mark.parametrize(
    ("journey_id", "customer_id", "kind"),
    [
        ("cart-abandonment-c-42", "c-42", "cart-abandonment"),
        ("cart-abandonment-ann@example.com", "ann@example.com", "cart-abandonment"),
        ("cart-abandonment-p_" + "1" * 32, "ann@example.com", "cart-abandonment"),
        ("win-back-p_" + "f" * 32, "c-42", "win-back"),
        ("someone-else", "c-42", ""),
    ],
)
def test_the_kind_of_a_journey_id_under_either_id(
    journey_id: str, customer_id: str, kind: str
) -> None:
    assert journey_kind(journey_id, customer_id) == kind


def test_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).pseudonymous_ids == AUTO
    monkeypatch.setenv("KAERU_PSEUDONYMOUS_IDS", "always")
    assert Settings(_env_file=None).pseudonymous_ids == ALWAYS
    monkeypatch.setenv("KAERU_PSEUDONYMOUS_IDS", "sometimes")
    with pytest.raises(ValidationError, match="pseudonymous_ids"):
        Settings(_env_file=None)
