"""The admin API: audiences, customers, the outbox, parked events; behind the operator token."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from kaeru.db import session
from kaeru.models import AudienceMember, CustomerRouting, Event
from kaeru.settings import Settings
from kaeru.touchpoints import record_touchpoint
from starter.app import create_app
from tests.conftest import make_settings
from tests.starter.conftest import AUTH, OPERATOR, asgi_client, basic, events

PATHS = ["/v1/audiences/cart-retargeting", "/v1/customers/u1", "/v1/admin/outbox"]


@pytest.mark.parametrize("path", PATHS)
async def test_admin_needs_the_operator_token_not_a_write_key(
    api: httpx.AsyncClient, path: str
) -> None:
    for headers in (
        {},
        basic("test-write-key"),
        basic("test-browser-key"),
        {"Authorization": "Bearer test-write-key"},
        {"Authorization": "Bearer test-operator-token-but-longer"},
        {"Authorization": "Basic test-operator-token"},
    ):
        answer = await api.get(path, headers=headers)
        assert answer.status_code == 401, (headers, answer.text)
        assert answer.json()["code"] == "unauthorized"
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await api.get(path, headers=OPERATOR)).status_code in (200, 404)


async def test_admin_without_an_operator_token_says_how_to_set_one(database_url: str) -> None:
    settings = make_settings(database_url, operator_token=None)
    async with asgi_client(create_app(settings, run_router=False)) as api:
        answer = await api.get("/v1/admin/outbox", headers=OPERATOR)
    assert answer.status_code == 503
    assert answer.json()["code"] == "not_configured"
    assert "KAERU_OPERATOR_TOKEN" in answer.json()["message"]


async def test_audience_members_oldest_first(api: httpx.AsyncClient, settings: Settings) -> None:
    start = datetime(2024, 5, 1, tzinfo=UTC)
    with session(settings.resolved_database_url) as s:
        for i, customer_id in enumerate(["b", "a", "c"]):
            s.add(
                AudienceMember(
                    audience="cart-retargeting",
                    customer_id=customer_id,
                    email_sha256="0" * 64,
                    journey_id=f"cart-abandonment-{customer_id}",
                    added_at=start + timedelta(minutes=i),
                )
            )
        s.add(
            AudienceMember(audience="other", customer_id="z", email_sha256="0" * 64, journey_id="j")
        )
    answer = await api.get("/v1/audiences/cart-retargeting", headers=OPERATOR)
    assert answer.status_code == 200
    body = answer.json()
    assert body["count"] == 3
    assert [(m["customer_id"], m["journey_id"]) for m in body["members"]] == [
        ("b", "cart-abandonment-b"),
        ("a", "cart-abandonment-a"),
        ("c", "cart-abandonment-c"),
    ]
    assert datetime.fromisoformat(body["members"][0]["added_at"]) == start
    empty = (await api.get("/v1/audiences/nobody", headers=OPERATOR)).json()
    assert (empty["count"], empty["members"]) == (0, [])


async def test_customer_profile_with_orders_and_touchpoints(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    await api.post("/v1/identify", json={"userId": "u/1", "traits": {"email": "u@x.io"}}, auth=AUTH)
    await api.post(
        "/v1/track",
        json={"userId": "u/1", "event": "Order Completed", "properties": {"order_id": "o9"}},
        auth=AUTH,
    )
    with session(settings.resolved_database_url) as s:
        record_touchpoint(s, customer_id="u/1", kind="email_opened", step="cart_email")
    answer = await api.get("/v1/customers/u/1", headers=OPERATOR)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["customer_id"], body["email"], body["traits"]) == (
        "u/1",
        "u@x.io",
        {"email": "u@x.io"},
    )
    assert [o["order_id"] for o in body["orders"]] == ["o9"]
    assert [(t["kind"], t["step"]) for t in body["touchpoints"]] == [
        ("email_opened", "cart_email"),
        ("purchase", None),  # every stored order is a purchase touch
    ]
    missing = await api.get("/v1/customers/nobody", headers=OPERATOR)
    assert missing.status_code == 404
    assert missing.json()["code"] == "not_found"


async def test_outbox_counts_what_waits(api: httpx.AsyncClient) -> None:
    await api.post("/v1/track", json={"userId": "u1", "event": "Product Added"}, auth=AUTH)
    await api.post("/v1/track", json={"userId": "u1", "event": "Signed Up"}, auth=AUTH)
    body = (await api.get("/v1/admin/outbox", headers=OPERATOR)).json()
    assert body["unrouted"] == 1  # a sign-up has no journey to reach
    assert body["oldest_unrouted_age_seconds"] >= 0
    assert (body["failing"], body["oldest_failure"], body["holds_lease"]) == (0, None, False)


# ---- parked events -------------------------------------------------------------------------------


def park(settings: Settings, customer_id: str, message_id: str) -> int:
    """Store an event as the router leaves one it gave up on; its seq."""
    with session(settings.resolved_database_url) as s:
        event = Event(
            message_id=message_id,
            customer_id=customer_id,
            type="track",
            name="Product Added",
            payload={},
            route_attempts=10,
            route_error="RuntimeError: refused",
            parked_at=datetime.now(UTC) - timedelta(minutes=5),
            park_reason="RuntimeError: refused",
        )
        s.add(event)
        s.flush()
        assert event.seq is not None
        return event.seq


@pytest.mark.parametrize("action", ["retry", "drop"])
async def test_parked_actions_need_the_operator_token(api: httpx.AsyncClient, action: str) -> None:
    assert (await api.get("/v1/admin/parked")).status_code == 401
    assert (await api.post(f"/v1/admin/parked/1/{action}")).status_code == 401
    assert (await api.get("/v1/admin/parked", auth=AUTH)).status_code == 401
    assert (await api.post(f"/v1/admin/parked/1/{action}", auth=AUTH)).status_code == 401


async def test_parked_events_are_listed_retried_and_dropped(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    first = park(settings, "u1", "m-1")
    second = park(settings, "u2", "m-2")
    with session(settings.resolved_database_url) as s:
        s.add(CustomerRouting(customer_id="u1", failures=3, retry_at=datetime.now(UTC)))
    body = (await api.get("/v1/admin/parked", headers=OPERATOR)).json()
    assert body["count"] == 2
    assert [(p["seq"], p["customer_id"], p["event"], p["message_id"]) for p in body["parked"]] == [
        (first, "u1", "Product Added", "m-1"),
        (second, "u2", "Product Added", "m-2"),
    ]
    assert body["parked"][0]["attempts"] == 10 and body["parked"][0]["reason"]
    outbox = (await api.get("/v1/admin/outbox", headers=OPERATOR)).json()
    assert (outbox["unrouted"], outbox["parked"]) == (0, 2)
    assert outbox["oldest_parked_age_seconds"] >= 300

    retried = await api.post(f"/v1/admin/parked/{first}/retry", headers=OPERATOR)
    assert retried.json() == {"seq": first, "status": "retrying"}
    dropped = await api.post(f"/v1/admin/parked/{second}/drop", headers=OPERATOR)
    assert dropped.json() == {"seq": second, "status": "dropped"}

    assert (await api.get("/v1/admin/parked", headers=OPERATOR)).json() == {
        "count": 0,
        "parked": [],
    }
    outbox = (await api.get("/v1/admin/outbox", headers=OPERATOR)).json()
    assert (outbox["unrouted"], outbox["parked"]) == (1, 0)  # the retried one waits again
    (again,) = events(settings, customer_id="u1")
    assert (again.parked_at, again.route_attempts, again.routed_at) == (None, 0, None)
    with session(settings.resolved_database_url) as s:
        state = s.get(CustomerRouting, "u1")
    assert state is not None and (state.failures, state.retry_at) == (0, None)
    (kept,) = events(settings, customer_id="u2")
    assert kept.dropped_at is not None and kept.routed_at is None


@pytest.mark.parametrize("action", ["retry", "drop"])
async def test_an_unknown_or_settled_parked_seq_is_a_clear_404(
    api: httpx.AsyncClient, settings: Settings, action: str
) -> None:
    seq = park(settings, "u1", "m-1")
    assert (await api.post(f"/v1/admin/parked/{seq}/drop", headers=OPERATOR)).status_code == 200
    for unknown in (seq, 999):
        answer = await api.post(f"/v1/admin/parked/{unknown}/{action}", headers=OPERATOR)
        assert answer.status_code == 404
        body = answer.json()
        assert body["code"] == "not_parked"
        assert f"seq {unknown}" in body["message"] and "GET /v1/admin/parked" in body["message"]
    answer = await api.post(f"/v1/admin/parked/abc/{action}", headers=OPERATOR)
    assert answer.status_code == 400 and "code" in answer.json()
