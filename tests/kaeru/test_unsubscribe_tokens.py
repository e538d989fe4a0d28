"""Unsubscribe tokens on their own: what they carry, which keys verify them, which kind they
name (the API's use of them: tests/starter/test_unsubscribe.py)."""

from __future__ import annotations

import base64

from pydantic import SecretStr
from sqlmodel import Session

from kaeru.db import session
from kaeru.models import EmailMessage
from kaeru.tracking_tokens import OPEN
from kaeru.tracking_tokens import token_for as tracking_token
from kaeru.unsubscribe_tokens import (
    find,
    journey_kind,
    register,
    token_for,
    unsubscribe_url,
    verifying_keys,
    well_formed,
)

KEY = b"k" * 32
OLD = "o" * 32
MESSAGE_KEY = "cart-abandonment-alice@example.com/run-1/cart_email"


def logged(s: Session) -> None:
    s.add(
        EmailMessage(
            key=MESSAGE_KEY,
            message_id="<m@shop.example>",
            customer_id="alice@example.com",
            journey_id="cart-abandonment-alice@example.com",
            step="cart_email",
            to_address="alice@example.com",
            subject="s",
            status="sent",
        )
    )


def test_a_token_is_short_url_safe_and_carries_nothing_readable() -> None:
    token = token_for(KEY, MESSAGE_KEY)
    assert well_formed(token) and len(token) == 22
    decoded = base64.urlsafe_b64decode(token + "==")
    assert b"alice" not in decoded and b"cart" not in decoded
    assert token == token_for(KEY, MESSAGE_KEY)  # the same at every attempt
    assert token != tracking_token(KEY, MESSAGE_KEY, OPEN)  # never a tracking token
    assert unsubscribe_url("https://kaeru.shop.example/", KEY, MESSAGE_KEY) == (
        f"https://kaeru.shop.example/u/{token}"
    )


def test_the_keys_that_verify_are_the_current_then_the_previous_never_an_empty_one() -> None:
    assert verifying_keys(KEY, None) == [KEY]
    assert verifying_keys(KEY, SecretStr(OLD)) == [KEY, OLD.encode()]
    assert verifying_keys(KEY, SecretStr("")) == [KEY]
    assert verifying_keys(KEY, SecretStr(KEY.decode())) == [KEY]


def test_find_needs_the_row_and_a_key_that_signed_it(database_url: str) -> None:
    old_key = OLD.encode()
    with session(database_url) as s:
        logged(s)
        register(s, old_key, MESSAGE_KEY)
        register(s, old_key, MESSAGE_KEY)  # a retried send: idempotent
    token = token_for(old_key, MESSAGE_KEY)
    with session(database_url) as s:
        found = find(s, [KEY, old_key], token)
        assert found is not None and found.customer_id == "alice@example.com"
        assert find(s, [KEY], token) is None  # the previous key is gone: refused
        assert find(s, [KEY, old_key], token_for(KEY, MESSAGE_KEY)) is None  # never registered
        assert find(s, [KEY, old_key], token[:-1] + ("A" if token[-1] != "A" else "B")) is None
        assert find(s, [KEY, old_key], token + "=") is None


def test_the_kind_is_the_longest_known_prefix_of_the_journey_id() -> None:
    kinds = ["welcome", "welcome-back", "cart-abandonment"]
    assert journey_kind("welcome-back-c-1", kinds) == "welcome-back"
    assert journey_kind("welcome-c-1", kinds) == "welcome"
    assert journey_kind("cart-abandonment-a@b.c", kinds) == "cart-abandonment"
    assert journey_kind("retired-kind-c-1", kinds) is None
