"""Segment-compatible ingestion on SQLite and PostgreSQL: auth, limits, validation, storage."""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlmodel import col, select
from temporalio.common import TypedSearchAttributes
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from kaeru import recommendations
from kaeru.db import session, write_session
from kaeru.models import CartItem, Coupon, Customer, Event, Order, OrderLine, Product, Touchpoint
from kaeru.settings import Settings
from starter.app import create_app
from starter.events import MAX_ID_BYTES, EventError, journey_properties, read_event
from starter.router import fetch_unrouted
from tests.conftest import make_settings
from tests.starter.conftest import AUTH, BROWSER_AUTH, asgi_client, basic, count, events
from workflows.kit import Journey, purchase_from

TRACK = {"userId": "u1", "event": "Product Added", "properties": {"product_id": "p1"}}


def raw(body: str | bytes) -> dict[str, Any]:
    """Keyword arguments for posting a body byte for byte (no client-side re-encoding)."""
    content = body.encode() if isinstance(body, str) else body
    return {"content": content, "headers": {"Content-Type": "application/json"}}


# ---- auth ------------------------------------------------------------------------------------


async def test_no_auth_is_401_with_basic_challenge(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    answer = await api.post("/v1/track", json=TRACK)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Basic")
    assert answer.json()["code"] == "unauthorized"
    assert "write key" in answer.json()["message"]
    assert events(settings) == []


@pytest.mark.parametrize(
    "headers",
    [
        basic("wrong-key"),
        basic("test-write-key-but-longer"),
        {"Authorization": "Bearer test-write-key"},
        {"Authorization": "Basic !!!not-base64!!!"},
    ],
)
async def test_wrong_credentials_are_401(
    api: httpx.AsyncClient, settings: Settings, headers: dict[str, str]
) -> None:
    answer = await api.post("/v1/track", json=TRACK, headers=headers)
    assert answer.status_code == 401, answer.text
    assert answer.json()["code"] == "unauthorized"
    assert events(settings) == []


async def test_basic_auth_with_the_write_key_is_accepted(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    answer = await api.post("/v1/track", json=TRACK, auth=AUTH)
    assert answer.status_code == 200
    assert answer.json() == {"success": True}
    assert [e.name for e in events(settings)] == ["Product Added"]


async def test_write_key_in_the_body_is_accepted_and_not_stored(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    answer = await api.post("/v1/track", json={**TRACK, "writeKey": "test-write-key"})
    assert answer.status_code == 200
    (stored,) = events(settings)
    assert "writeKey" not in stored.payload
    wrong = await api.post("/v1/track", json={**TRACK, "messageId": "m2", "writeKey": "nope"})
    assert wrong.status_code == 401
    batch = await api.post(
        "/v1/batch",
        json={"batch": [{**TRACK, "type": "track"}], "writeKey": "test-write-key"},
    )
    assert (batch.status_code, batch.json()["accepted"]) == (200, 1)
    assert len(events(settings)) == 2


async def test_header_key_wins_over_body_key(api: httpx.AsyncClient) -> None:
    answer = await api.post(
        "/v1/track", json={**TRACK, "writeKey": "test-write-key"}, headers=basic("wrong")
    )
    assert answer.status_code == 401


async def test_unparseable_body_without_credentials_is_401_not_400(api: httpx.AsyncClient) -> None:
    answer = await api.post("/v1/track", **raw("{not json"))
    assert answer.status_code == 401


async def test_ingestion_refuses_to_run_without_a_write_key(database_url: str) -> None:
    settings = make_settings(database_url, write_key=None)
    async with asgi_client(create_app(settings, run_router=False)) as api:
        answer = await api.post("/v1/track", json=TRACK, auth=AUTH)
    assert answer.status_code == 503
    assert answer.json()["code"] == "not_configured"
    assert "KAERU_WRITE_KEY" in answer.json()["message"]


# ---- size limits -------------------------------------------------------------------------------


async def test_event_over_32_kb_is_413(api: httpx.AsyncClient, settings: Settings) -> None:
    big = {**TRACK, "properties": {"blob": "x" * (32 * 1024)}}
    answer = await api.post("/v1/track", json=big, auth=AUTH)
    assert answer.status_code == 413
    assert answer.json()["code"] == "payload_too_large"
    assert "32 KB" in answer.json()["message"]
    assert events(settings) == []


async def test_event_just_under_the_limit_is_accepted(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    body = json.dumps({**TRACK, "properties": {"blob": ""}})
    padding = settings.max_event_bytes - len(body)
    exact = json.dumps({**TRACK, "properties": {"blob": "x" * padding}})
    assert len(exact) == settings.max_event_bytes
    answer = await api.post("/v1/track", auth=AUTH, **raw(exact))
    assert answer.status_code == 200


async def test_body_length_is_enforced_without_content_length(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"userId": "u1", "event": "x", "properties": {"blob": "'
        for _ in range(40):
            yield b"x" * 1024
        yield b'"}}'

    answer = await api.post(
        "/v1/track", content=chunks(), auth=AUTH, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 413
    assert events(settings) == []


async def test_batch_over_500_kb_is_413(api: httpx.AsyncClient, settings: Settings) -> None:
    item = {**TRACK, "properties": {"blob": "x" * (20 * 1024)}}
    answer = await api.post("/v1/batch", json={"batch": [item] * 30}, auth=AUTH)
    assert answer.status_code == 413
    assert answer.json()["code"] == "payload_too_large"
    assert events(settings) == []


async def test_over_size_event_in_a_batch_is_rejected_alone(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    big = {**TRACK, "type": "track", "messageId": "big", "properties": {"blob": "x" * (33 * 1024)}}
    small = [{**TRACK, "type": "track", "messageId": f"m{i}"} for i in range(2)]
    answer = await api.post("/v1/batch", json={"batch": [small[0], big, small[1]]}, auth=AUTH)
    assert answer.status_code == 200
    body = answer.json()
    assert body["accepted"] == 2
    assert [(r["index"], r["code"]) for r in body["rejected"]] == [(1, "payload_too_large")]
    assert [e.message_id for e in events(settings)] == ["m0", "m1"]


async def test_gzip_batches_are_accepted_and_bombs_are_413(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    body = json.dumps({"batch": [{**TRACK, "type": "track", "messageId": "gz"}]}).encode()
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    answer = await api.post("/v1/batch", content=gzip.compress(body), headers=headers, auth=AUTH)
    assert answer.status_code == 200, answer.text
    assert answer.json()["accepted"] == 1
    bomb = gzip.compress(b'{"batch": [], "x": "' + b"0" * (2 * 1024 * 1024) + b'"}')
    assert len(bomb) < settings.max_batch_bytes
    answer = await api.post("/v1/batch", content=bomb, headers=headers, auth=AUTH)
    assert answer.status_code == 413
    broken = await api.post("/v1/batch", content=b"\x1f\x8bnot gzip", headers=headers, auth=AUTH)
    assert broken.status_code == 400
    assert [e.message_id for e in events(settings)] == ["gz"]


# ---- validation ----------------------------------------------------------------------------------


#: A track event up to its properties, which each case completes.
PROPS = '{"userId": "u1", "event": "x", "properties": '


def _nested(depth: int) -> str:
    return PROPS + '{"a": ' * depth + "1" + "}" * depth + "}"


@pytest.mark.parametrize(
    ("body", "code", "reason"),
    [
        ("{not json", "invalid_json", "not valid JSON"),
        (b'{"userId": "u1", "event": "\xff"}', "invalid_json", "UTF-8"),
        (PROPS + '{"v": NaN}}', "invalid_event", "NaN"),
        (PROPS + '{"v": -Infinity}}', "invalid_event", "NaN"),
        (PROPS + '{"v": 1e400}}', "invalid_event", "NaN"),
        (
            PROPS + '{"v": ' + "9" * 5000 + "}}",
            "invalid_json",
            "JSON",
        ),
        (_nested(40), "invalid_event", "nested deeper than 32"),
        (
            PROPS + '{"a": ' + "[" * 9000 + "]" * 9000 + "}}",
            "invalid_json",
            "nested too deeply",
        ),
        (
            PROPS + '{"n": "\\ud800"}}',
            "invalid_event",
            "surrogate",
        ),
        (
            PROPS + '{"\\udfff": 1}}',
            "invalid_event",
            "surrogate",
        ),
        ('{"userId": "u\\u0000", "event": "x"}', "invalid_event", "NUL"),
        ('["userId", "u1"]', "invalid_event", "JSON object"),
        ('"just a string"', "invalid_event", "JSON object"),
        ('{"event": "x"}', "missing_id", "userId or an anonymousId"),
        ('{"userId": "", "anonymousId": null, "event": "x"}', "missing_id", "userId"),
        ('{"userId": {"id": 1}, "event": "x"}', "invalid_field", "userId must be a string"),
        ('{"userId": ["u1"], "event": "x"}', "invalid_field", "userId must be"),
        ('{"userId": true, "event": "x"}', "invalid_field", "userId must be"),
        ('{"anonymousId": {"a": 1}, "event": "x"}', "invalid_field", "anonymousId"),
        ('{"userId": "' + "u" * 201 + '", "event": "x"}', "invalid_field", "longer than 200"),
        ('{"userId": "u1"}', "invalid_field", "event name"),
        ('{"userId": "u1", "event": {"name": "x"}}', "invalid_field", "event name"),
        ('{"userId": "u1", "event": ["Order Completed"]}', "invalid_field", "event name"),
        ('{"userId": "u1", "event": "x", "properties": [1, 2]}', "invalid_field", "properties"),
        ('{"userId": "u1", "event": "x", "context": "web"}', "invalid_field", "context"),
        ('{"userId": "u1", "event": "x", "timestamp": 1700000000}', "invalid_field", "timestamp"),
        ('{"userId": "u1", "event": "x", "timestamp": "yesterday"}', "invalid_field", "ISO 8601"),
        (
            '{"userId": "u1", "event": "x", "timestamp": "0001-01-01T00:00:00+14:00"}',
            "invalid_field",
            "ISO 8601",
        ),
        ('{"userId": "u1", "event": "x", "messageId": {"id": 1}}', "invalid_field", "messageId"),
    ],
)
async def test_invalid_single_events_are_400_with_a_reason(
    api: httpx.AsyncClient, settings: Settings, body: str | bytes, code: str, reason: str
) -> None:
    answer = await api.post("/v1/track", auth=AUTH, **raw(body))
    assert answer.status_code == 400, answer.text
    assert answer.json()["code"] == code
    assert reason in answer.json()["message"]
    assert events(settings) == []


async def test_identify_and_page_endpoints_check_their_own_fields(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    bad_traits = await api.post("/v1/identify", json={"userId": "u1", "traits": "x"}, auth=AUTH)
    assert bad_traits.status_code == 400
    assert "traits" in bad_traits.json()["message"]
    identify = await api.post("/v1/identify", json={"userId": "u1"}, auth=AUTH)
    page = await api.post("/v1/page", json={"anonymousId": 42, "name": "Home"}, auth=AUTH)
    assert (identify.status_code, page.status_code) == (200, 200)
    stored = events(settings)
    assert [(e.type, e.customer_id, e.name) for e in stored] == [
        ("identify", "u1", None),
        ("page", "42", None),
    ]


@pytest.mark.parametrize(
    "body",
    ['{"events": []}', '{"batch": {"type": "track"}}', '{"batch": "x"}', "[]", "null", "{oops"],
)
async def test_a_body_that_is_not_a_batch_is_400(
    api: httpx.AsyncClient, settings: Settings, body: str
) -> None:
    answer = await api.post("/v1/batch", auth=AUTH, **raw(body))
    assert answer.status_code == 400, answer.text
    assert answer.json()["code"] in ("not_a_batch", "invalid_json")
    assert events(settings) == []


async def test_batch_keeps_valid_events_and_lists_rejected_ones(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    batch: list[Any] = [
        {"type": "track", "userId": "a", "event": "Product Added", "messageId": "ok-0"},
        {"type": "screen", "userId": "a", "name": "Home", "messageId": "bad-1"},
        {"type": "track", "event": "Product Added", "messageId": "bad-2"},
        {"type": "identify", "userId": "b", "traits": {"email": "b@x.io"}, "messageId": "ok-3"},
        {"type": "track", "userId": {"id": "a"}, "event": "x", "messageId": "bad-4"},
        "not an object",
        {"type": {"t": 1}, "userId": "a"},
        {"type": "track", "userId": "a", "event": "x", "properties": {"v": float("nan")}},
        {"type": "page", "userId": "c", "messageId": "ok-8"},
    ]
    body = json.dumps({"batch": batch})  # json.dumps writes NaN, as Python clients do
    answer = await api.post("/v1/batch", auth=AUTH, **raw(body))
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["success"] is True
    assert result["accepted"] == 3
    assert [(r["index"], r["code"]) for r in result["rejected"]] == [
        (1, "unsupported_type"),
        (2, "missing_id"),
        (4, "invalid_field"),
        (5, "invalid_event"),
        (6, "invalid_field"),
        (7, "invalid_event"),
    ]
    assert all(r["message"] for r in result["rejected"])
    assert [e.message_id for e in events(settings)] == ["ok-0", "ok-3", "ok-8"]


async def test_batch_context_is_merged_under_each_event(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    body = {
        "context": {"library": {"name": "shop"}, "traits": {"email": "shared@x.io"}},
        "batch": [
            {"type": "track", "userId": "a", "event": "x", "context": {"ip": "1.2.3.4"}},
            {"type": "track", "userId": "b", "event": "x", "context": {"traits": {}}},
        ],
    }
    answer = await api.post("/v1/batch", json=body, auth=AUTH)
    assert answer.status_code == 200
    first, second = events(settings)
    assert first.payload["context"]["ip"] == "1.2.3.4"
    assert first.payload["context"]["library"] == {"name": "shop"}
    assert second.payload["context"]["traits"] == {}


async def test_message_id_and_timestamp_are_kept_or_made(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    await api.post(
        "/v1/track",
        json={**TRACK, "messageId": 123, "timestamp": "2024-05-01T12:30:00Z"},
        auth=AUTH,
    )
    await api.post("/v1/track", json={**TRACK, "timestamp": "2024-05-01T12:30:00"}, auth=AUTH)
    before = datetime.now(UTC)
    await api.post("/v1/track", json=TRACK, auth=AUTH)
    first, second, third = events(settings)
    assert first.message_id == "123"
    assert first.timestamp == datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    assert second.timestamp == datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    assert second.message_id.startswith("kaeru-")
    assert third.message_id != second.message_id
    assert third.timestamp >= before - timedelta(seconds=1)


# ---- dedupe --------------------------------------------------------------------------------------


async def test_a_repeated_message_id_is_accepted_and_stored_once(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    event = {**TRACK, "messageId": "same"}
    first = await api.post("/v1/track", json=event, auth=AUTH)
    again = await api.post("/v1/track", json={**event, "event": "Cart Viewed"}, auth=AUTH)
    batch = await api.post("/v1/batch", json={"batch": [{**event, "type": "track"}] * 3}, auth=AUTH)
    assert (first.status_code, again.status_code, batch.status_code) == (200, 200, 200)
    assert batch.json()["accepted"] == 3
    (stored,) = events(settings)
    assert (stored.message_id, stored.name) == ("same", "Product Added")


# ---- what events teach: profiles, products, orders, coupons --------------------------------------


async def test_identify_stores_the_profile_and_email(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    await api.post(
        "/v1/identify",
        json={"userId": "u1", "traits": {"email": " Ann@Example.COM ", "name": "Ann"}},
        auth=AUTH,
    )
    await api.post("/v1/identify", json={"userId": "u1", "traits": {"plan": "gold"}}, auth=AUTH)
    await api.post(
        "/v1/track",
        json={"anonymousId": "anon-7", "event": "x", "context": {"traits": {"email": "z@Z.io"}}},
        auth=AUTH,
    )
    await api.post("/v1/identify", json={"userId": "u2", "traits": {"email": ""}}, auth=AUTH)
    with session(settings.resolved_database_url) as s:
        ann = s.get(Customer, "u1")
        anon = s.get(Customer, "anon-7")
        u2 = s.get(Customer, "u2")
    assert ann is not None and anon is not None and u2 is not None
    assert ann.email == "Ann@example.com"
    assert ann.traits == {"email": " Ann@Example.COM ", "name": "Ann", "plan": "gold"}
    assert anon.email == "z@z.io"
    assert u2.email is None
    assert u2.traits == {"email": ""}


async def test_products_are_learnt_in_minor_units(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    await api.post(
        "/v1/track",
        json={
            "userId": "u1",
            "event": "Product Added",
            "properties": {"product_id": "p1", "name": "Mug", "price": 19.99, "currency": "eur"},
        },
        auth=AUTH,
    )
    await api.post(
        "/v1/track",
        json={
            "userId": "u1",
            "event": "Cart Viewed",
            "properties": {
                "currency": "JPY",
                "products": [
                    {"product_id": "p2", "name": "Tea", "price": "1200"},
                    {"sku": 77, "price": {"amount": 1}},
                    {"name": "no id"},
                ],
            },
        },
        auth=AUTH,
    )
    await api.post(
        "/v1/track",
        json={"userId": "u1", "event": "Product Viewed", "properties": {"product_id": "p1"}},
        auth=AUTH,
    )
    with session(settings.resolved_database_url) as s:
        products = {p.product_id: p for p in s.exec(select(Product)).all()}
    assert set(products) == {"p1", "p2", "77"}
    assert (products["p1"].name, products["p1"].price_minor, products["p1"].currency) == (
        "Mug",
        1999,
        "EUR",
    )
    assert (products["p2"].price_minor, products["p2"].currency) == (1200, "JPY")
    assert (products["77"].name, products["77"].price_minor) == ("77", None)


async def test_orders_are_stored_with_lines_and_redeem_their_coupon(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    now = datetime.now(UTC)
    with session(settings.resolved_database_url) as s:
        s.add(
            Coupon(
                code="SAVE10",
                idempotency_key="cart-abandonment-u1/run/offer_coupon",
                customer_id="u1",
                journey_id="cart-abandonment-u1",
                amount_minor=1000,
                currency="USD",
                expires_at=now + timedelta(days=7),
            )
        )
    order: dict[str, Any] = {
        "userId": "u1",
        "event": "Order Completed",
        "messageId": "order-msg-1",
        "timestamp": now.isoformat(),
        "properties": {
            "order_id": "o-1",
            "total": 42.5,
            "currency": "usd",
            "coupon": "save10",
            "products": [
                {"product_id": "p1", "quantity": 2, "price": 10},
                {"product_id": "p2"},
                {"product_id": "p1", "quantity": 1},
            ],
        },
    }
    assert (await api.post("/v1/track", json=order, auth=AUTH)).status_code == 200
    replay = {**order, "messageId": "order-msg-2", "properties": {"order_id": "o-1", "total": 1}}
    assert (await api.post("/v1/track", json=replay, auth=AUTH)).status_code == 200
    with session(settings.resolved_database_url) as s:
        stored = s.get(Order, "o-1")
        lines = s.exec(select(OrderLine).order_by(col(OrderLine.product_id))).all()
        coupon = s.get(Coupon, "SAVE10")
    assert stored is not None and coupon is not None
    assert (stored.customer_id, stored.total_minor, stored.currency, stored.coupon) == (
        "u1",
        4250,
        "USD",
        "save10",
    )
    assert [(line.product_id, line.quantity) for line in lines] == [("p1", 3), ("p2", 1)]
    assert coupon.redeemed_order_id == "o-1"
    assert count(settings, Order) == 1
    assert len(events(settings, name="Order Completed")) == 2


async def test_orders_without_id_or_journey_are_still_stored(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    body = {
        "userId": "walk-in",
        "event": "Order Completed",
        "messageId": "m-no-order-id",
        "properties": {"revenue": "12.00", "coupon": "UNKNOWN", "products": "not a list"},
    }
    assert (await api.post("/v1/track", json=body, auth=AUTH)).status_code == 200
    with session(settings.resolved_database_url) as s:
        stored = s.get(Order, "m-no-order-id")
    assert stored is not None
    assert (stored.customer_id, stored.total_minor, stored.coupon) == ("walk-in", 1200, "UNKNOWN")


async def test_unstorable_numbers_do_not_fail_the_request(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    body = {
        "userId": "u1",
        "event": "Order Completed",
        "properties": {
            "order_id": "big",
            "total": 10**30,
            "products": [{"product_id": "p", "price": 1e300, "quantity": 10**20}],
        },
    }
    answer = await api.post("/v1/track", json=body, auth=AUTH)
    assert answer.status_code == 200, answer.text
    with session(settings.resolved_database_url) as s:
        stored = s.get(Order, "big")
        product = s.get(Product, "p")
    assert stored is not None and stored.total_minor == 0
    assert product is not None and product.price_minor is None


# ---- ad clicks and what the router will see ----------------------------------------------


async def test_ad_clicks_are_normalised(api: httpx.AsyncClient, settings: Settings) -> None:
    campaign = {"name": settings.ad_campaign, "source": "facebook", "medium": "cpc"}
    await api.post(
        "/v1/page",
        json={"userId": "u1", "name": "Cart", "context": {"campaign": campaign}, "messageId": "p1"},
        auth=AUTH,
    )
    await api.post(
        "/v1/page",
        json={"userId": "u1", "context": {"campaign": {"name": "newsletter"}}, "messageId": "p2"},
        auth=AUTH,
    )
    await api.post(
        "/v1/page",
        json={"userId": "u1", "context": {"campaign": "kaeru-cart-retargeting"}, "messageId": "p3"},
        auth=AUTH,
    )
    await api.post("/v1/track", json={"userId": "u1", "event": "Ad Clicked"}, auth=AUTH)
    ad_page, newsletter, odd, ad_track = events(settings)
    assert (ad_page.type, ad_page.name) == ("page", "Ad Clicked")
    assert ad_page.payload["context"]["campaign"] == campaign
    assert ad_page.payload["name"] == "Cart"
    assert (newsletter.name, odd.name) == (None, None)
    assert (ad_track.type, ad_track.name) == ("track", "Ad Clicked")
    # Ad clicks wait for the router; a plain page view has no journey to reach.
    assert ad_page.routed_at is None and ad_track.routed_at is None
    assert newsletter.routed_at is not None


async def test_only_events_a_journey_wants_wait_for_the_router(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    batch = [
        # An identify reaches a live welcome series (its traits may start one).
        {"type": "identify", "userId": "u1", "traits": {}},
        {"type": "track", "userId": "u1", "event": "Product Added"},
        {"type": "track", "userId": "u1", "event": "Signed Up"},  # no journey wants it
        {"type": "track", "userId": "u1", "event": "Order Completed"},
        {"type": "track", "userId": "u1", "event": "Email Opened", "properties": {}},
        {
            "type": "track",
            "userId": "u1",
            "event": "Email Opened",
            "properties": {"journey_id": "cart-abandonment-someone-else"},
        },
        {
            "type": "track",
            "userId": "u1",
            "event": "Email Opened",
            "properties": {"journey_id": "cart-abandonment-u1"},
        },
    ]
    await api.post("/v1/batch", json={"batch": batch}, auth=AUTH)
    waiting = [e.routed_at is None for e in events(settings)]
    assert waiting == [True, True, False, True, False, False, True]
    seqs = [e.seq or 0 for e in events(settings)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(batch)


# ---- the rest of the surface ---------------------------------------------------------------------


async def test_healthz(api: httpx.AsyncClient) -> None:
    answer = await api.get("/healthz")
    assert (answer.status_code, answer.json()) == (200, {"ok": True})


async def test_openapi_documents_the_bodies(api: httpx.AsyncClient) -> None:
    schema = (await api.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    assert {"TrackEvent", "IdentifyEvent", "PageEvent", "BatchBody", "ErrorBody"} <= set(components)
    track = schema["paths"]["/v1/track"]["post"]
    assert track["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TrackEvent"
    }
    batch = schema["paths"]["/v1/batch"]["post"]["requestBody"]["content"]["application/json"]
    assert batch["schema"]["$ref"] == "#/components/schemas/BatchBody"
    assert "event" in components["TrackEvent"]["required"]
    assert "401" in track["responses"] and "413" in track["responses"]
    outbox = schema["paths"]["/v1/admin/outbox"]["get"]
    assert outbox["security"] == [{"operatorToken": []}]
    assert schema["components"]["securitySchemes"]["operatorToken"]["scheme"] == "bearer"


async def test_unknown_paths_answer_in_the_error_shape(api: httpx.AsyncClient) -> None:
    answer = await api.get("/v1/nothing-here")
    assert answer.status_code == 404
    assert set(answer.json()) == {"code", "message"}


async def test_short_aliases_work(api: httpx.AsyncClient, settings: Settings) -> None:
    assert (await api.post("/v1/t", json=TRACK, auth=AUTH)).status_code == 200
    assert (await api.post("/v1/i", json={"userId": "u9"}, auth=AUTH)).status_code == 200
    assert [e.type for e in events(settings)] == ["track", "identify"]
    assert count(settings, Event) == 2


async def test_concurrent_requests_with_the_same_events_store_them_once(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    batch: list[dict[str, Any]] = [
        {
            "type": "identify",
            "userId": f"c{i}",
            "traits": {"email": f"c{i}@x.io"},
            "messageId": f"i{i}",
        }
        for i in range(5)
    ] + [
        {
            "type": "track",
            "userId": f"c{i}",
            "event": "Order Completed",
            "messageId": f"o{i}",
            "properties": {"order_id": f"order-{i}", "total": 5, "products": [{"product_id": "p"}]},
        }
        for i in range(5)
    ]
    answers = await asyncio.gather(
        *(
            api.post("/v1/batch", json={"batch": batch[k:] + batch[:k]}, auth=AUTH)
            for k in range(10)
        )
    )
    assert [a.status_code for a in answers] == [200] * 10
    assert sorted(e.message_id for e in events(settings)) == sorted(e["messageId"] for e in batch)
    assert count(settings, Order) == 5
    assert count(settings, OrderLine) == 5
    assert count(settings, Customer) == 5


# ---- trust boundaries: the server key and the browser key ----------------------------------------

BROWSER = BROWSER_AUTH


def customer(settings: Settings, customer_id: str) -> Customer:
    with session(settings.resolved_database_url) as s:
        found = s.get(Customer, customer_id)
    assert found is not None
    return found


async def test_each_event_remembers_which_key_sent_it(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    campaign = {"name": settings.ad_campaign}
    assert (await api.post("/v1/track", json=TRACK, auth=AUTH)).status_code == 200
    browser = [
        {"type": "track", "userId": "u1", "event": "Product Added", "messageId": "b1"},
        {"type": "track", "userId": "u1", "event": "Product Viewed", "messageId": "b2"},
        {"type": "page", "userId": "u1", "context": {"campaign": campaign}, "messageId": "b3"},
        {"type": "identify", "userId": "u1", "traits": {"name": "Ann"}, "messageId": "b4"},
    ]
    answer = await api.post("/v1/batch", json={"batch": browser}, auth=BROWSER)
    assert (answer.status_code, answer.json()["rejected"]) == (200, [])
    body_key = await api.post(
        "/v1/track", json={**TRACK, "messageId": "b5", "writeKey": BROWSER[0]}
    )
    assert body_key.status_code == 200
    stored = events(settings)
    assert [(e.source, e.name) for e in stored] == [
        ("server", "Product Added"),
        ("browser", "Product Added"),
        ("browser", "Product Viewed"),
        ("browser", "Ad Clicked"),
        ("browser", None),
        ("browser", "Product Added"),
    ]
    assert stored[3].routed_at is None  # an ad click from the browser reaches the journey


async def test_a_browser_key_cannot_change_email_or_consent(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    traits = {"email": "ann@example.com", "unsubscribed": False, "name": "Ann"}
    await api.post("/v1/identify", json={"userId": "u1", "traits": traits}, auth=AUTH)
    forged = {
        "email": "attacker@evil.example",
        "E-Mail": "attacker@evil.example",
        "unsubscribed": True,
        "marketing_consent": "granted",
        "emailOptIn": True,
        "name": "Ann B.",
    }
    answer = await api.post(
        "/v1/identify",
        json={
            "userId": "u1",
            "traits": forged,
            "context": {"traits": {"email": "attacker@evil.example"}},
        },
        auth=BROWSER,
    )
    assert answer.status_code == 200, answer.text
    await api.post(
        "/v1/track",
        json={**TRACK, "context": {"traits": {"email": "attacker@evil.example"}}},
        auth=BROWSER,
    )
    ann = customer(settings, "u1")
    assert ann.email == "ann@example.com"
    assert ann.traits == {"email": "ann@example.com", "unsubscribed": False, "name": "Ann B."}
    identify, track = events(settings, source="browser")
    assert identify.payload["traits"] == {"name": "Ann B."}
    assert identify.payload["context"]["traits"] == {}
    assert track.payload["context"]["traits"] == {}
    assert "traits.email" in identify.payload["kaeru"]["dropped"]


async def test_a_browser_key_cannot_send_tracking_events(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    opened = {
        "userId": "u1",
        "event": "Email Opened",
        "properties": {"journey_id": "cart-abandonment-u1", "step": "cart_email"},
    }
    single = await api.post("/v1/track", json=opened, auth=BROWSER)
    assert single.status_code == 400
    assert single.json()["code"] == "not_allowed"
    assert "server write key" in single.json()["message"]
    clicked = {**opened, "type": "track", "event": "Email Link Clicked"}
    batch = await api.post(
        "/v1/batch", json={"batch": [{**TRACK, "type": "track"}, clicked]}, auth=BROWSER
    )
    assert [(r["index"], r["code"]) for r in batch.json()["rejected"]] == [(1, "not_allowed")]
    assert [e.name for e in events(settings)] == ["Product Added"]
    assert (await api.post("/v1/track", json=opened, auth=AUTH)).status_code == 200


def _coupon(settings: Settings, code: str, customer_id: str) -> None:
    with session(settings.resolved_database_url) as s:
        s.add(
            Coupon(
                code=code,
                idempotency_key=f"cart-abandonment-{customer_id}/run/{code}",
                customer_id=customer_id,
                journey_id=f"cart-abandonment-{customer_id}",
                amount_minor=1000,
                currency="USD",
                expires_at=datetime.now(UTC) + timedelta(days=7),
            )
        )


def _order(order_id: str, customer_id: str = "u1", coupon: str | None = None) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "order_id": order_id,
        "total": 90.0,
        "revenue": 90.0,
        "currency": "USD",
        "products": [{"product_id": "p9", "name": "Browser name", "price": 90.0}],
    }
    if coupon:
        properties["coupon"] = coupon
    return {"userId": customer_id, "event": "Order Completed", "properties": properties}


async def test_a_browser_order_ends_the_journey_but_counts_nothing(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    _coupon(settings, "KAERU-BROWSER1", "u1")
    answer = await api.post("/v1/track", json=_order("o-b", coupon="KAERU-BROWSER1"), auth=BROWSER)
    assert answer.status_code == 200
    (stored,) = events(settings)
    assert (stored.source, stored.routed_at) == ("browser", None)  # it reaches the journey
    seen = fetch_unrouted(settings.resolved_database_url, 10)[0].journey_event().properties
    assert seen["order_id"] == "o-b"
    assert not {"total", "revenue", "coupon"} & set(seen)
    assert all("price" not in item for item in seen["products"])
    purchase = purchase_from(fetch_unrouted(settings.resolved_database_url, 10)[0].journey_event())
    assert (purchase.order_id, purchase.value_minor, purchase.coupon) == ("o-b", 0, None)
    assert stored.payload["kaeru"]["withheld"]["total"] == 90.0
    assert count(settings, Order) == 0
    assert count(settings, Product) == 0
    with session(settings.resolved_database_url) as s:
        coupon = s.get(Coupon, "KAERU-BROWSER1")
    assert coupon is not None and coupon.redeemed_order_id is None


async def test_trusted_browser_orders_count_but_never_write_the_catalogue(
    database_url: str,
) -> None:
    settings = make_settings(database_url, trust_browser_orders=True)
    _coupon(settings, "KAERU-BROWSER2", "u1")
    async with asgi_client(create_app(settings, run_router=False)) as api:
        order = _order("o-t", coupon="KAERU-BROWSER2")
        assert (await api.post("/v1/track", json=order, auth=BROWSER)).status_code == 200
    (stored,) = events(settings)
    assert stored.payload["properties"]["total"] == 90.0
    with session(settings.resolved_database_url) as s:
        row = s.get(Order, "o-t")
        coupon = s.get(Coupon, "KAERU-BROWSER2")
    assert row is not None and row.total_minor == 9000
    assert coupon is not None and coupon.redeemed_order_id == "o-t"
    assert count(settings, OrderLine) == 1
    assert count(settings, Product) == 0


async def test_untrusted_text_never_reaches_another_customers_recommendations(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    def added(customer_id: str, product_id: str, name: str) -> dict[str, Any]:
        return {
            "userId": customer_id,
            "event": "Product Added",
            "properties": {"product_id": product_id, "name": name, "price": 10},
        }

    for product_id, name in (("mug", "Frog Mug"), ("pot", "Pond Teapot")):
        await api.post("/v1/track", json=added("shop", product_id, name), auth=AUTH)
    together = {
        "userId": "earlier",
        "event": "Order Completed",
        "properties": {
            "order_id": "o1",
            "products": [{"product_id": "mug"}, {"product_id": "pot"}],
        },
    }
    await api.post("/v1/track", json=together, auth=AUTH)
    phish = "payment failed, re-enter card at evil.example/login"
    for product_id in ("pot", "new"):
        answer = await api.post(
            "/v1/track", json=added("attacker", product_id, phish), auth=BROWSER
        )
        assert answer.status_code == 200  # stored for the attacker's own cart, not the catalogue
    with write_session(settings.resolved_database_url) as s:
        recommendations.refresh(s, min_support=1, min_confidence=0.0)
    with session(settings.resolved_database_url) as s:
        shown = recommendations.for_products(s, ["mug"], 3).products
    assert [(p.product_id, p.name) for p in shown] == [("pot", "Pond Teapot")]


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        ("Frog Mug", "Frog Mug"),
        ("Frog Mug https://evil.example/login?x=1", "Frog Mug"),
        ("re-enter card at evil.example/login now", "re-enter card at now"),
        ("Visit www.evil.com today", "Visit today"),
        ("HTTP://EVIL.EXAMPLE", "p1"),
        ("mail me: bad@evil.example", "mail me:"),
        ("Chanel No.5 Eau de Parfum", "Chanel No.5 Eau de Parfum"),
    ],
)
async def test_urls_are_stripped_from_product_names(
    api: httpx.AsyncClient, settings: Settings, name: str, stored: str
) -> None:
    event = {
        "userId": "u1",
        "event": "Product Added",
        "properties": {"product_id": "p1", "name": name},
    }
    assert (await api.post("/v1/track", json=event, auth=AUTH)).status_code == 200
    with session(settings.resolved_database_url) as s:
        product = s.get(Product, "p1")
    assert product is not None and product.name == stored


async def test_links_are_stripped_from_names_in_browser_events(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    phish = "Mug: card declined, pay at evil.example/pay"
    batch = [
        {
            "type": "track",
            "userId": "u1",
            "event": "Product Added",
            "properties": {"product_id": "p1", "name": phish},
        },
        {
            "type": "track",
            "userId": "u1",
            "event": "Cart Viewed",
            "properties": {"products": [{"product_id": "p1", "name": phish}, "odd", {"x": 1}]},
        },
    ]
    await api.post("/v1/batch", json={"batch": batch}, auth=BROWSER)
    await api.post("/v1/batch", json={"batch": batch}, auth=AUTH)
    seen = [e.journey_event().properties for e in fetch_unrouted(settings.resolved_database_url, 9)]
    clean = "Mug: card declined, pay at"
    assert seen[0]["name"] == clean
    assert seen[1]["products"] == [{"product_id": "p1", "name": clean}, "odd", {"x": 1}]
    assert seen[2]["name"] == phish  # the server's own words, as sent (the catalogue is cleaned)


async def test_import_needs_the_server_key(api: httpx.AsyncClient, settings: Settings) -> None:
    answer = await api.post(
        "/v1/import", json={"batch": [{**TRACK, "type": "track"}]}, auth=BROWSER
    )
    assert answer.status_code == 403
    assert answer.json()["code"] == "forbidden"
    assert events(settings) == []


async def test_the_browser_key_is_optional(database_url: str) -> None:
    settings = make_settings(database_url, browser_write_key=None)
    async with asgi_client(create_app(settings, run_router=False)) as api:
        refused = await api.post("/v1/track", json=TRACK, auth=BROWSER)
        accepted = await api.post("/v1/track", json=TRACK, auth=AUTH)
    assert (refused.status_code, accepted.status_code) == (401, 200)


# ---- limits at the door ------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["userId", "anonymousId"])
async def test_ids_over_the_byte_limit_are_400_with_the_reason(
    api: httpx.AsyncClient, settings: Settings, field: str
) -> None:
    emoji = "\U0001f438" * 171  # 171 characters, 684 bytes in UTF-8
    answer = await api.post("/v1/track", json={field: emoji, "event": "Product Added"}, auth=AUTH)
    assert answer.status_code == 400, answer.text
    assert answer.json()["code"] == "invalid_field"
    message = answer.json()["message"]
    assert field in message and "bytes" in message and "KaeruCustomerId" in message
    batch = [{"type": "track", field: emoji, "event": "x"}, {**TRACK, "type": "track"}]
    answer = await api.post("/v1/batch", json={"batch": batch}, auth=AUTH)
    assert [(r["index"], r["code"]) for r in answer.json()["rejected"]] == [(0, "invalid_field")]
    assert [e.customer_id for e in events(settings)] == ["u1"]


async def test_the_longest_accepted_ids_fit_temporals_limits(
    dev_server_env: WorkflowEnvironment,
) -> None:
    """The byte limit is the one that matters: Temporal takes the ids the door lets in that
    encode longest, and refuses one the door refuses (the router would fail on it for good)."""
    client = dev_server_env.client
    frog = "\U0001f438"
    accepted = [frog * (MAX_ID_BYTES // 4), frog * 104 + "\x01" * 96]
    refused = frog * 171
    for customer_id in accepted:
        assert read_event({"userId": customer_id, "event": "x", "type": "track"}, ad_campaign="x")
    with pytest.raises(EventError):
        read_event({"userId": refused, "event": "x", "type": "track"}, ad_campaign="x")
    for customer_id in [*accepted, refused]:
        start = client.start_workflow(
            "NoSuchWorkflow",
            id=f"cart-abandonment-{customer_id}",
            task_queue=f"nobody-{uuid.uuid4().hex}",
            search_attributes=TypedSearchAttributes(Journey.start_search_attributes(customer_id)),
        )
        if customer_id in accepted:
            handle = await start
            await handle.terminate()
        else:
            with pytest.raises(RPCError) as refusal:
                await start
            assert refusal.value.status == RPCStatusCode.INVALID_ARGUMENT


async def test_traits_are_capped_per_customer_merged(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    many = {f"t{i}": i for i in range(settings.max_traits + 1)}
    answer = await api.post("/v1/identify", json={"userId": "u1", "traits": many}, auth=AUTH)
    assert answer.status_code == 400
    assert answer.json()["code"] == "too_many_traits"
    assert "KAERU_MAX_TRAITS" in answer.json()["message"]
    half = settings.max_traits // 2 + 1
    first = {f"a{i}": i for i in range(half)}
    second = {f"b{i}": i for i in range(half)}
    assert (
        await api.post("/v1/identify", json={"userId": "u1", "traits": first}, auth=AUTH)
    ).status_code == 200
    merged = await api.post(
        "/v1/batch",
        json={
            "batch": [
                {"type": "identify", "userId": "u1", "traits": second, "messageId": "over"},
                {"type": "identify", "userId": "u2", "traits": second, "messageId": "fine"},
                {"type": "identify", "userId": "u1", "traits": {"a0": "again"}, "messageId": "ok"},
            ]
        },
        auth=AUTH,
    )
    assert [(r["index"], r["code"]) for r in merged.json()["rejected"]] == [(0, "too_many_traits")]
    assert customer(settings, "u1").traits == {**first, "a0": "again"}
    big = {"bio": "x" * settings.max_traits_bytes}
    answer = await api.post("/v1/identify", json={"userId": "u3", "traits": big}, auth=AUTH)
    assert answer.status_code == 400 and "KAERU_MAX_TRAITS_BYTES" in answer.json()["message"]
    assert [e.message_id for e in events(settings)][1:] == ["fine", "ok"]


@pytest.mark.parametrize(
    "address",
    ["root,victim@example.com", "a@b", "a..b@example.com", '"x y"@example.com', "a@[1.2.3.4]"],
)
async def test_an_invalid_email_is_a_clear_rejection(
    api: httpx.AsyncClient, settings: Settings, address: str
) -> None:
    answer = await api.post(
        "/v1/identify", json={"userId": "u1", "traits": {"email": address}}, auth=AUTH
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["code"] == "invalid_email"
    assert "traits.email" in answer.json()["message"]
    in_context = {**TRACK, "type": "track", "context": {"traits": {"email": address}}}
    batch = await api.post("/v1/batch", json={"batch": [in_context]}, auth=AUTH)
    assert [(r["index"], r["code"]) for r in batch.json()["rejected"]] == [(0, "invalid_email")]
    assert events(settings) == []


async def test_a_key_in_the_body_allows_only_a_small_body(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    item = {**TRACK, "type": "track", "properties": {"blob": "x" * 1000}}
    batch = {"batch": [item] * 40, "writeKey": "test-write-key"}
    assert len(json.dumps(batch)) > settings.max_event_bytes
    answer = await api.post("/v1/batch", json=batch)
    assert answer.status_code == 401
    assert "Basic auth" in answer.json()["message"]
    assert (await api.post("/v1/batch", json=batch, auth=AUTH)).status_code == 200


async def test_far_future_timestamps_are_clamped_to_receipt(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    soon = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    batch = [
        {**TRACK, "type": "track", "messageId": "future", "timestamp": "2099-01-01T00:00:00Z"},
        {**TRACK, "type": "track", "messageId": "soon", "timestamp": soon.isoformat()},
    ]
    before = datetime.now(UTC)
    await api.post("/v1/batch", json={"batch": batch}, auth=AUTH)
    after = datetime.now(UTC)
    future, near = fetch_unrouted(settings.resolved_database_url, 10)
    occurred = future.journey_event().occurred_at
    assert before - timedelta(seconds=1) <= occurred <= after
    assert future.payload["timestamp"] == "2099-01-01T00:00:00Z"
    assert future.payload["kaeru"]["timestamp_clamped"] is True
    assert near.journey_event().occurred_at == soon


async def test_import_stores_history_but_starts_no_journey(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    old = "2024-03-01T10:00:00Z"
    batch = [
        {**TRACK, "type": "track", "messageId": "cart", "timestamp": old},
        {**_order("o-old"), "type": "track", "messageId": "order", "timestamp": old},
        {"type": "identify", "userId": "u1", "traits": {"email": "u1@example.com"}},
    ]
    answer = await api.post("/v1/import", json={"batch": batch}, auth=AUTH)
    assert (answer.status_code, answer.json()["accepted"]) == (200, 3)
    stored = events(settings)
    assert all(e.routed_at is not None for e in stored)
    assert stored[0].payload["kaeru"]["imported"] is True
    assert fetch_unrouted(settings.resolved_database_url, 10) == []
    with session(settings.resolved_database_url) as s:
        order = s.get(Order, "o-old")
    assert order is not None and order.completed_at == datetime(2024, 3, 1, 10, tzinfo=UTC)
    assert customer(settings, "u1").email == "u1@example.com"


async def test_an_order_cannot_redeem_another_customers_coupon(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    _coupon(settings, "KAERU-ANNS", "ann")
    await api.post("/v1/track", json=_order("o-eve", "eve", coupon="KAERU-ANNS"), auth=AUTH)
    with session(settings.resolved_database_url) as s:
        coupon = s.get(Coupon, "KAERU-ANNS")
        refused = s.exec(select(Touchpoint).where(Touchpoint.kind == "coupon_refused")).all()
    assert coupon is not None and coupon.redeemed_order_id is None
    assert [(t.customer_id, t.order_id, t.coupon_code) for t in refused] == [
        ("eve", "o-eve", "KAERU-ANNS")
    ]
    await api.post("/v1/track", json=_order("o-ann", "ann", coupon="KAERU-ANNS"), auth=AUTH)
    with session(settings.resolved_database_url) as s:
        coupon = s.get(Coupon, "KAERU-ANNS")
    assert coupon is not None and coupon.redeemed_order_id == "o-ann"


# ---- identity and carts ------------------------------------------------------------------------


def _journey_properties(settings: Settings) -> list[dict[str, Any]]:
    """What each stored event gives journeys, in ``seq`` order (as the router builds it)."""
    return [journey_properties(e.type, e.payload) for e in events(settings)]


async def test_an_identify_tells_journeys_which_traits_it_changed_without_values(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    batch = [
        {"type": "identify", "userId": "u1", "traits": {"email": "ann@example.com", "name": "A"}},
        {"type": "identify", "userId": "u1", "traits": {"name": "A", "plan": "gold"}},
        {"type": "identify", "userId": "u1", "traits": {"email": "ann@example.com"}},
        {"type": "identify", "userId": "u1", "traits": {"email": "bob@example.com", "x": None}},
        {"type": "identify", "userId": "u1", "traits": {"x": None}},
        {"type": "identify", "userId": "u2"},
    ]
    await api.post("/v1/batch", json={"batch": batch}, auth=AUTH)
    # A later request compares with what the first one stored.
    await api.post(
        "/v1/identify",
        json={"userId": "u1", "traits": {"plan": "silver"}, "context": {}},
        auth=AUTH,
    )
    await api.post(
        "/v1/track",
        json={"userId": "u3", "event": "x", "context": {"traits": {"email": "c@example.com"}}},
        auth=AUTH,
    )
    assert _journey_properties(settings)[:7] == [
        {"changed_traits": ["email", "name"]},
        {"changed_traits": ["plan"]},
        {"changed_traits": []},
        {"changed_traits": ["email", "x"]},
        {"changed_traits": []},
        {"changed_traits": []},
        {"changed_traits": ["plan"]},
    ]
    stored = json.dumps([e.payload.get("kaeru") for e in events(settings)])
    assert "example.com" not in stored and "silver" not in stored


async def test_an_identify_first_setting_the_email_in_context_names_email(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    await api.post(
        "/v1/identify",
        json={"userId": "u1", "traits": {}, "context": {"traits": {"email": "ann@example.com"}}},
        auth=AUTH,
    )
    assert _journey_properties(settings) == [{"changed_traits": ["email"]}]


def _cart_rows(settings: Settings, customer_id: str) -> list[tuple[str, int]]:
    with session(settings.resolved_database_url) as s:
        rows = s.exec(
            select(CartItem)
            .where(CartItem.customer_id == customer_id)
            .order_by(col(CartItem.position))
        ).all()
        return [(row.product_id, row.quantity) for row in rows]


def _added(product_id: str, **props: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": "u1",
        "event": "Product Added",
        "properties": {"product_id": product_id, **props},
    }


async def test_the_cart_is_kept_across_batches_and_emptied_by_an_order(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    dress = {"name": "Dress", "price": 49.9, "currency": "EUR", "url": "https://s/d"}
    await api.post(
        "/v1/batch",
        json={"batch": [_added("dress", quantity=2, **dress), _added("belt", price="12")]},
        auth=AUTH,
    )
    await api.post(
        "/v1/batch",
        json={
            "batch": [
                {**_added("dress", quantity=1), "event": "Product Removed"},
                _added("scarf", quantity=99_999),  # over the cap: read as 1, as journeys do
                _added("belt", quantity=3),
                {"type": "track", "userId": "u1", "event": "Product Viewed", "properties": {}},
            ]
        },
        auth=AUTH,
    )
    carts = [p.get("cart") for p in _journey_properties(settings)]
    dress_line = {
        "product_id": "dress",
        "name": "Dress",
        "price": 49.9,
        "currency": "EUR",
        "quantity": 2,
        "image_url": None,
        "url": "https://s/d",
    }
    belt = {**dress_line, "product_id": "belt", "name": None, "price": 12.0, "currency": "USD"}
    belt["url"] = None
    assert carts[0] == [dress_line]
    assert carts[1] == [dress_line, {**belt, "quantity": 1}]
    assert carts[2] == [{**dress_line, "quantity": 1}, {**belt, "quantity": 1}]
    assert [p["product_id"] for p in carts[3] or []] == ["dress", "belt", "scarf"]
    assert carts[4] == [
        {**dress_line, "quantity": 1},
        # Added again: the line takes the product as this event states it (the journey's way).
        {**belt, "price": None, "quantity": 4},
        {**belt, "product_id": "scarf", "price": None, "quantity": 1},
    ]
    assert carts[5] is None  # not a cart event
    assert _cart_rows(settings, "u1") == [("dress", 1), ("belt", 4), ("scarf", 1)]

    # The order empties it; the next cart starts from nothing, not from the bought items.
    order = {"type": "track", "userId": "u1", "event": "Order Completed", "properties": {}}
    await api.post("/v1/batch", json={"batch": [order, _added("hat")]}, auth=AUTH)
    assert _journey_properties(settings)[-1]["cart"][0]["product_id"] == "hat"
    assert len(_journey_properties(settings)[-1]["cart"]) == 1
    await api.post("/v1/track", json=order, auth=AUTH)
    assert _cart_rows(settings, "u1") == []


async def test_a_cart_snapshot_replaces_the_cart_and_keeps_at_most_50_lines(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    await api.post("/v1/batch", json={"batch": [_added("old")]}, auth=AUTH)
    products = [{"product_id": f"p{i}", "quantity": 2} for i in range(60)]
    viewed = {
        "type": "track",
        "userId": "u1",
        "event": "Cart Viewed",
        "properties": {"products": products, "currency": "JPY"},
    }
    await api.post("/v1/batch", json={"batch": [viewed, _added("full")]}, auth=AUTH)
    cart = _journey_properties(settings)[1]["cart"]
    assert [p["product_id"] for p in cart] == [f"p{i}" for i in range(50)]
    assert {p["currency"] for p in cart} == {"JPY"}
    # A full cart ignores a new product, as the cart journey does.
    assert len(_journey_properties(settings)[2]["cart"]) == 50
    assert ("full", 1) not in _cart_rows(settings, "u1")
    assert len(_cart_rows(settings, "u1")) == 50


def _names(settings: Settings) -> list[tuple[str, str, str]]:
    """(customer, name or type, messageId) of each stored event, in ``seq`` order."""
    return [(e.customer_id, e.name or e.type, e.message_id) for e in events(settings)]


async def test_an_identify_merges_the_anonymous_cart_into_the_user_once(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    shoe = {"anonymousId": "a1", "event": "Product Added", "properties": {"product_id": "shoe"}}
    await api.post("/v1/track", json=shoe, auth=AUTH)
    await api.post(
        "/v1/track", json={**shoe, "userId": "u1", "properties": {"product_id": "hat"}}, auth=AUTH
    )
    identify = {"userId": "u1", "anonymousId": "a1", "messageId": "id-1", "traits": {}}
    answer = await api.post("/v1/identify", json=identify, auth=AUTH)
    assert answer.status_code == 200
    assert _names(settings)[2:] == [
        ("u1", "identify", "id-1"),
        ("a1", "Identity Merged", "merge:id-1:identity"),
        ("u1", "Cart Viewed", "merge:id-1:cart"),
    ]
    merged, cart_viewed = events(settings)[3:]
    assert journey_properties(merged.type, merged.payload) == {"into": "u1"}
    assert [p["product_id"] for p in journey_properties("track", cart_viewed.payload)["cart"]] == [
        "hat",
        "shoe",
    ]
    assert merged.routed_at is None or cart_viewed.routed_at is None  # the router runs for it
    assert _cart_rows(settings, "a1") == []
    assert _cart_rows(settings, "u1") == [("hat", 1), ("shoe", 1)]

    # Resent (same messageId) or said again (a new one): merged once.
    await api.post("/v1/identify", json=identify, auth=AUTH)
    await api.post("/v1/identify", json={**identify, "messageId": "id-2"}, auth=AUTH)
    assert [n for _, n, _ in _names(settings)].count("Identity Merged") == 1
    assert len(events(settings)) == 6

    # The anonymous id alone is the user now: their cart grows, their order empties it.
    await api.post("/v1/track", json={**shoe, "properties": {"product_id": "bag"}}, auth=AUTH)
    assert _names(settings)[-1][0] == "u1"
    assert [
        p["product_id"] for p in journey_properties("track", events(settings)[-1].payload)["cart"]
    ] == ["hat", "shoe", "bag"]
    await api.post(
        "/v1/track",
        json={"anonymousId": "a1", "event": "Order Completed", "properties": {"order_id": "o1"}},
        auth=AUTH,
    )
    assert _cart_rows(settings, "u1") == []
    with session(settings.resolved_database_url) as s:
        order = s.get(Order, "o1")
    assert order is not None and order.customer_id == "u1"


async def test_a_merge_without_an_anonymous_cart_stores_no_cart_event(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    batch = [
        {"type": "page", "anonymousId": "a1", "name": "Home"},
        {"type": "identify", "userId": "u1", "anonymousId": "a1", "messageId": "m"},
    ]
    result = await api.post("/v1/batch", json={"batch": batch}, auth=AUTH)
    assert result.json()["accepted"] == 2
    assert _names(settings) == [
        ("a1", "page", events(settings)[0].message_id),
        ("u1", "identify", "m"),
        ("a1", "Identity Merged", "merge:m:identity"),
    ]


async def test_a_browser_key_never_merges_into_a_known_address_or_moves_a_merged_id(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    await api.post(
        "/v1/batch",
        json={
            "batch": [
                {"type": "identify", "userId": "known", "traits": {"email": "k@example.com"}},
                {
                    "type": "track",
                    "anonymousId": "a1",
                    "event": "Product Added",
                    "properties": {"product_id": "shoe"},
                },
                {
                    "type": "track",
                    "anonymousId": "a2",
                    "event": "Product Added",
                    "properties": {"product_id": "hat"},
                },
            ]
        },
        auth=AUTH,
    )
    # Into a customer with an email: refused, nothing moves, the reason is kept.
    await api.post(
        "/v1/identify",
        json={"userId": "known", "anonymousId": "a1", "messageId": "b1"},
        auth=BROWSER_AUTH,
    )
    refused = events(settings, message_id="b1")[0]
    assert "already has an email address" in refused.payload["kaeru"]["merge_refused"]
    assert "Identity Merged" not in [n for _, n, _ in _names(settings)]
    assert _cart_rows(settings, "a1") == [("shoe", 1)]
    await api.post(
        "/v1/track",
        json={"anonymousId": "a1", "event": "Product Viewed", "messageId": "after"},
        auth=BROWSER_AUTH,
    )
    assert events(settings, message_id="after")[0].customer_id == "a1"

    # Into a new customer: allowed; then moving that id to someone else is refused.
    await api.post(
        "/v1/identify",
        json={"userId": "new", "anonymousId": "a2", "messageId": "b2"},
        auth=BROWSER_AUTH,
    )
    assert _cart_rows(settings, "new") == [("hat", 1)]
    await api.post(
        "/v1/identify",
        json={"userId": "other", "anonymousId": "a2", "messageId": "b3"},
        auth=BROWSER_AUTH,
    )
    assert (
        "another customer" in events(settings, message_id="b3")[0].payload["kaeru"]["merge_refused"]
    )
    assert _cart_rows(settings, "new") == [("hat", 1)] and _cart_rows(settings, "other") == []

    # The server key is the shop: its merge holds, even into a known address.
    await api.post(
        "/v1/identify", json={"userId": "known", "anonymousId": "a1", "messageId": "s1"}, auth=AUTH
    )
    assert _cart_rows(settings, "known") == [("shoe", 1)]
    assert ("a1", "Identity Merged", "merge:s1:identity") in _names(settings)


def test_ingestion_imports_no_activity_code() -> None:
    """Ingestion (the API) uses the core coupon module, not the worker's activities."""
    code = (
        "import sys, starter.ingest; "
        "print(sorted(m for m in sys.modules if m.startswith('activities.')))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "activities.coupons" not in found and "activities.email" not in found, found


@pytest.mark.parametrize(
    "event",
    [
        {"userId": "u1", "event": "Identity Merged", "properties": {"into": "thief"}},
        {"userId": "u1", "event": "Cart Viewed", "messageId": "merge:m:cart"},
    ],
)
async def test_nobody_can_send_what_a_merge_stores(
    api: httpx.AsyncClient, settings: Settings, event: dict[str, Any]
) -> None:
    for auth in (AUTH, BROWSER_AUTH):
        answer = await api.post("/v1/track", json=event, auth=auth)
        assert answer.status_code == 400
        assert answer.json()["code"] == "not_allowed"
        assert "identify" in answer.json()["message"]
    assert events(settings) == []
