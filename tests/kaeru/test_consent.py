"""Consent per customer and channel (kaeru/consent.py), on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid

import pytest
from sqlmodel import col, select

from kaeru.consent import (
    CONSENT_WITHDRAWN,
    EMAIL,
    SMS,
    SUBSCRIBED,
    UNKNOWN,
    UNSUBSCRIBED,
    ConsentValueError,
    consent_from_traits,
    refusal,
    set_consent,
    state_of,
)
from kaeru.db import session
from kaeru.models import ConsentChange, Event
from kaeru.settings import Settings
from starter.consent_changes import record_consent_change
from tests.conftest import make_settings


def test_traits_state_consent_per_channel() -> None:
    assert consent_from_traits({"name": "Ada"}) == {}
    assert consent_from_traits({"marketing_consent": True}) == {
        "email": True,
        "sms": True,
        "push": True,
    }
    assert consent_from_traits({"marketing_consent": "false", "marketing_consent_email": True})[
        "email"
    ]
    assert consent_from_traits({"marketing_consent": {"sms": False}}) == {"sms": False}


@pytest.mark.parametrize(
    "traits",
    [
        {"marketing_consent": "maybe"},
        {"marketing_consent_email": 2},
        {"marketing_consent": {"fax": True}},
    ],
)
def test_a_consent_trait_that_is_not_yes_or_no_is_refused_by_name(
    traits: dict[str, object],
) -> None:
    with pytest.raises(ConsentValueError, match="traits.marketing_consent"):
        consent_from_traits(traits)


def test_consent_changes_keep_their_history(database_url: str) -> None:
    customer = f"c-{uuid.uuid4().hex[:8]}"
    with session(database_url) as s:
        assert state_of(s, customer) == UNKNOWN
        assert set_consent(s, customer, EMAIL, True, "identify")
        assert set_consent(s, customer, EMAIL, True, "identify") is None  # no change, no row
        s.commit()
        assert state_of(s, customer) == SUBSCRIBED and state_of(s, customer, SMS) == UNKNOWN
        assert set_consent(s, customer, EMAIL, False, "one_click", detail="List-Unsubscribe")
        s.commit()
        assert state_of(s, customer) == UNSUBSCRIBED
        history = s.exec(
            select(ConsentChange)
            .where(col(ConsentChange.customer_id) == customer)
            .order_by(col(ConsentChange.id))
        ).all()
    assert [(h.state, h.source) for h in history] == [
        (SUBSCRIBED, "identify"),
        (UNSUBSCRIBED, "one_click"),
    ]


def test_marketing_goes_only_to_customers_who_said_yes(database_url: str) -> None:
    customer = f"c-{uuid.uuid4().hex[:8]}"
    with session(database_url) as s:
        unknown = refusal(s, customer, kind="cart-abandonment")
        assert unknown is not None and "never consented" in unknown
        assert refusal(s, customer, kind="cart-abandonment", unknown_is_yes=True) is None
        set_consent(s, customer, EMAIL, True, "api")
        assert refusal(s, customer, kind="cart-abandonment") is None
        set_consent(s, customer, EMAIL, False, "preference_page", kind="win-back")
        assert refusal(s, customer, kind="cart-abandonment") is None
        opted_out = refusal(s, customer, kind="win-back")
        assert opted_out is not None and "win-back" in opted_out
        set_consent(s, customer, EMAIL, False, "one_click")
        gone = refusal(s, customer, kind="cart-abandonment", unknown_is_yes=True)
        assert gone is not None and "unsubscribed" in gone


def test_unknown_consent_is_no_by_default() -> None:
    assert Settings(_env_file=None).unknown_consent_is_yes is False


def test_an_unsubscribe_stores_one_withdrawal_event_for_routing(database_url: str) -> None:
    settings = make_settings(database_url)
    customer = f"c-{uuid.uuid4().hex[:8]}"
    assert record_consent_change(settings, customer, EMAIL, True, "api")
    assert not record_consent_change(settings, customer, EMAIL, True, "api")
    assert record_consent_change(settings, customer, EMAIL, False, "one_click")
    assert not record_consent_change(settings, customer, EMAIL, False, "one_click")
    with session(database_url) as s:
        events = s.exec(select(Event).where(col(Event.customer_id) == customer)).all()
        assert state_of(s, customer) == UNSUBSCRIBED
    assert [(e.name, e.payload["properties"]) for e in events] == [
        (CONSENT_WITHDRAWN, {"channel": "email", "kind": None, "source": "one_click"})
    ]
    assert events[0].message_id.startswith("consent:")
