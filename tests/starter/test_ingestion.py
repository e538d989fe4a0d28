"""Segment-compatible ingestion on SQLite and PostgreSQL: auth, limits, validation, storage."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlmodel import col, select

from kaeru.db import session
from kaeru.models import Coupon, Customer, Event, Order, OrderLine, Product
from kaeru.settings import Settings
from starter.app import create_app
from tests.conftest import make_settings
from tests.starter.conftest import AUTH, asgi_client, basic, count, events

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
        admin = await api.get("/v1/admin/outbox", auth=AUTH)
    assert answer.status_code == 503
    assert answer.json()["code"] == "not_configured"
    assert "KAERU_WRITE_KEY" in answer.json()["message"]
    assert admin.status_code == 503


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
    await api.post(
        "/v1/identify", json={"userId": "u2", "traits": {"email": "not an address"}}, auth=AUTH
    )
    with session(settings.resolved_database_url) as s:
        ann = s.get(Customer, "u1")
        anon = s.get(Customer, "anon-7")
        u2 = s.get(Customer, "u2")
    assert ann is not None and anon is not None and u2 is not None
    assert ann.email == "Ann@example.com"
    assert ann.traits == {"email": " Ann@Example.COM ", "name": "Ann", "plan": "gold"}
    assert anon.email == "z@z.io"
    assert u2.email is None
    assert u2.traits == {"email": "not an address"}


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
        {"type": "identify", "userId": "u1", "traits": {}},
        {"type": "track", "userId": "u1", "event": "Product Added"},
        {"type": "track", "userId": "u1", "event": "Product Viewed"},
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
    assert waiting == [False, True, False, True, False, False, True]
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
