"""Consent in: identify traits (server key only), the consent API, reserved names."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlmodel import col, select

from kaeru.consent import CONSENT_WITHDRAWN, state_of
from kaeru.db import session
from kaeru.models import ConsentChange, Customer
from kaeru.settings import Settings
from tests.starter.conftest import AUTH, BROWSER_AUTH, events


def consent(settings: Settings, customer_id: str, channel: str = "email") -> str:
    with session(settings.resolved_database_url) as s:
        return state_of(s, customer_id, channel)


def history(settings: Settings, customer_id: str) -> list[tuple[str, str, str]]:
    with session(settings.resolved_database_url) as s:
        rows = s.exec(
            select(ConsentChange)
            .where(ConsentChange.customer_id == customer_id)
            .order_by(col(ConsentChange.id))
        ).all()
        return [(r.channel, r.state, r.source) for r in rows]


async def identify(api: httpx.AsyncClient, traits: dict[str, Any], **extra: Any) -> httpx.Response:
    body = {"userId": "u1", "traits": traits, **extra}
    return await api.post("/v1/identify", json=body, auth=extra.pop("auth", AUTH))


# ---- consent from identify --------------------------------------------------------------------


async def test_identify_true_subscribes_every_channel(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    answer = await identify(api, {"email": "ann@example.com", "marketing_consent": True})
    assert answer.status_code == 200, answer.text
    assert [consent(settings, "u1", c) for c in ("email", "sms", "push")] == ["subscribed"] * 3
    assert {source for _, _, source in history(settings, "u1")} == {"identify"}
    assert [e.name for e in events(settings)] == [None]  # no withdrawal for a yes


async def test_identify_false_unsubscribes_and_stores_the_withdrawal_after_it(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    await identify(api, {"marketing_consent": "true"})
    answer = await identify(api, {"marketing_consent_email": False})
    assert answer.status_code == 200, answer.text
    assert consent(settings, "u1", "email") == "unsubscribed"
    assert consent(settings, "u1", "sms") == "subscribed"  # the per-channel trait: email only
    stored = events(settings)
    assert [e.type for e in stored] == ["identify", "identify", "track"]
    withdrawal = stored[-1]
    assert withdrawal.name == CONSENT_WITHDRAWN
    assert withdrawal.message_id.startswith("consent:")
    assert withdrawal.payload["properties"] == {
        "channel": "email",
        "kind": None,
        "source": "identify",
    }
    assert withdrawal.routed_at is None  # the router delivers it to running journeys

    again = await identify(api, {"marketing_consent_email": False})
    assert again.status_code == 200
    assert len(events(settings, name=CONSENT_WITHDRAWN)) == 1  # nothing changed, no event


async def test_a_per_channel_trait_beats_the_general_one(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    await identify(api, {"marketing_consent": {"email": True, "sms": False}})
    assert (consent(settings, "u1", "email"), consent(settings, "u1", "sms")) == (
        "subscribed",
        "unsubscribed",
    )
    assert consent(settings, "u1", "push") == "unknown"
    await identify(api, {"marketing_consent": True, "marketing_consent_sms": False})
    assert consent(settings, "u1", "push") == "subscribed"
    assert consent(settings, "u1", "sms") == "unsubscribed"


async def test_a_bad_consent_value_is_a_400_naming_the_trait(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    answer = await identify(api, {"marketing_consent_email": "maybe"})
    assert answer.status_code == 400
    assert answer.json()["code"] == "invalid_consent"
    assert "traits.marketing_consent_email" in answer.json()["message"]
    batch = await api.post(
        "/v1/batch",
        json={
            "batch": [
                {"type": "identify", "userId": "u2", "traits": {"marketing_consent": {"fax": 1}}},
                {"type": "identify", "userId": "u3", "traits": {"marketing_consent": True}},
            ]
        },
        auth=AUTH,
    )
    assert batch.status_code == 200
    [rejected] = batch.json()["rejected"]
    assert (rejected["index"], rejected["code"]) == (0, "invalid_consent")
    assert consent(settings, "u3") == "subscribed"
    assert events(settings, customer_id="u1") == []


async def test_the_browser_key_cannot_set_consent(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    await identify(api, {"marketing_consent": True})
    answer = await api.post(
        "/v1/identify",
        json={"userId": "u1", "traits": {"marketing_consent": False, "marketing_consent_email": 0}},
        auth=BROWSER_AUTH,
    )
    assert answer.status_code == 200
    assert consent(settings, "u1") == "subscribed"
    assert events(settings, name=CONSENT_WITHDRAWN) == []
    assert events(settings, source="browser")[0].payload["kaeru"]["dropped"] == [
        "traits.marketing_consent",
        "traits.marketing_consent_email",
    ]


async def test_the_time_zone_comes_from_traits_or_context_and_a_bad_one_is_ignored(
    api: httpx.AsyncClient, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    def zone() -> str | None:
        with session(settings.resolved_database_url) as s:
            customer = s.get(Customer, "u1")
            return customer.timezone if customer else None

    await identify(api, {"timezone": "Asia/Tokyo"}, context={"timezone": "Europe/Paris"})
    assert zone() == "Asia/Tokyo"
    track = {"userId": "u1", "event": "Cart Viewed", "context": {"timezone": "America/New_York"}}
    assert (await api.post("/v1/track", json=track, auth=AUTH)).status_code == 200
    assert zone() == "America/New_York"
    for bad in ("Mars/Olympus_Mons", "../../etc/passwd", 7):
        answer = await identify(api, {"timezone": bad})
        assert answer.status_code == 200  # ignored, not refused
    assert zone() == "America/New_York"
    assert "names a time zone zoneinfo does not know" in caplog.text
    assert "Mars" not in caplog.text


# ---- reserved names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        {"event": CONSENT_WITHDRAWN, "properties": {"channel": "email"}},
        {"event": "Product Added", "messageId": "consent:1"},
    ],
)
async def test_a_shop_may_not_send_what_kaeru_stores_for_consent(
    api: httpx.AsyncClient, settings: Settings, event: dict[str, Any]
) -> None:
    answer = await api.post("/v1/track", json={"userId": "u1", **event}, auth=AUTH)
    assert answer.status_code == 400
    assert answer.json()["code"] == "not_allowed"
    assert "marketing_consent: false" in answer.json()["message"]
    assert events(settings) == []


# ---- the consent API ------------------------------------------------------------------------


async def test_put_unsubscribes_with_source_api_and_get_answers_state_and_history(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    await identify(api, {"marketing_consent": True})
    put = await api.put(
        "/v1/customers/u1/consent", json={"channel": "email", "subscribed": False}, auth=AUTH
    )
    assert put.status_code == 200, put.text
    assert put.json()["changed"] is True
    assert put.json()["consent"]["state"] == "unsubscribed"
    assert put.json()["consent"]["source"] == "api"
    [withdrawal] = events(settings, name=CONSENT_WITHDRAWN)
    assert withdrawal.payload["properties"]["source"] == "api"

    again = await api.put("/v1/customers/u1/consent", json={"subscribed": False}, auth=AUTH)
    assert again.json()["changed"] is False

    kind = await api.put(
        "/v1/customers/u1/consent",
        json={"channel": "sms", "subscribed": False, "kind": "cart-abandonment"},
        auth=AUTH,
    )
    assert kind.status_code == 200, kind.text
    assert kind.json()["consent"]["kinds_off"] == ["cart-abandonment"]

    got = await api.get("/v1/customers/u1/consent", auth=AUTH)
    assert got.status_code == 200
    body = got.json()
    states = {c["channel"]: c["state"] for c in body["channels"]}
    assert states == {"email": "unsubscribed", "sms": "subscribed", "push": "subscribed"}
    assert [(h["channel"], h["state"], h["source"]) for h in body["history"]] == [
        ("email", "subscribed", "identify"),
        ("sms", "subscribed", "identify"),
        ("push", "subscribed", "identify"),
        ("email", "unsubscribed", "api"),
        ("sms", "unsubscribed", "api"),
    ]
    assert body["history"][-1]["kind"] == "cart-abandonment"

    unknown = await api.get("/v1/customers/nobody/consent", auth=AUTH)
    assert {c["state"] for c in unknown.json()["channels"]} == {"unknown"}


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"channel": "fax", "subscribed": False}, "channel"),
        ({"subscribed": "no"}, "subscribed"),
        ({"channel": "email"}, "subscribed"),
        ({"subscribed": False, "kind": "no-such-journey"}, "no-such-journey"),
        ({"subscribed": False, "extra": 1}, "extra"),
    ],
)
async def test_a_bad_consent_body_is_a_400_naming_the_field(
    api: httpx.AsyncClient, settings: Settings, body: dict[str, Any], where: str
) -> None:
    answer = await api.put("/v1/customers/u1/consent", json=body, auth=AUTH)
    assert answer.status_code == 400, answer.text
    assert set(answer.json()) == {"code", "message"}
    assert where in answer.json()["message"]
    assert history(settings, "u1") == []


async def test_the_consent_api_needs_the_server_key(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    body = {"subscribed": True}
    assert (await api.put("/v1/customers/u1/consent", json=body)).status_code == 401
    wrong = await api.put("/v1/customers/u1/consent", json=body, auth=("nope", ""))
    assert wrong.status_code == 401
    browser = await api.put("/v1/customers/u1/consent", json=body, auth=BROWSER_AUTH)
    assert browser.status_code == 403
    assert (await api.get("/v1/customers/u1/consent", auth=BROWSER_AUTH)).status_code == 403
    assert history(settings, "u1") == []
