"""Open pixel and click redirect: signed tokens, stored links only, one event per first touch."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
from sqlmodel import col, select

from kaeru.db import session
from kaeru.models import EmailMessage, Touchpoint
from kaeru.settings import Settings
from kaeru.tracking import TrackingToken, make_token
from tests.starter.conftest import events

KEY = b"test-secret"  # make_settings' secret_key
MESSAGE_KEY = "cart-abandonment-u1/run-1/cart_email"
LINKS = ["https://shop.example/cart", "https://shop.example/p/mug?utm_source=kaeru"]


@pytest.fixture(autouse=True)
def message(settings: Settings) -> EmailMessage:
    row = EmailMessage(
        key=MESSAGE_KEY,
        message_id="<cart-email@kaeru>",
        customer_id="u1",
        journey_id="cart-abandonment-u1",
        step="cart_email",
        to_address="u1@example.com",
        subject="Your cart",
        status="sent",
        links=LINKS,
    )
    with session(settings.resolved_database_url) as s:
        s.add(row)
    return row


def opened(message_key: str = MESSAGE_KEY, key: bytes = KEY) -> str:
    return f"/t/o/{make_token(key, TrackingToken(message_key, 'o'))}"


def clicked(link: int, message_key: str = MESSAGE_KEY, key: bytes = KEY) -> str:
    return f"/t/c/{make_token(key, TrackingToken(message_key, 'c', link))}"


def touchpoints(settings: Settings) -> list[Touchpoint]:
    with session(settings.resolved_database_url) as s:
        return list(s.exec(select(Touchpoint).order_by(col(Touchpoint.id))).all())


def flag(settings: Settings) -> tuple[bool, bool]:
    with session(settings.resolved_database_url) as s:
        row = s.get(EmailMessage, MESSAGE_KEY)
    assert row is not None
    return row.first_open_routed, row.first_click_routed


def altered(path: str) -> str:
    """The same token with the message key in its payload changed, signature kept."""
    prefix, token = path.rsplit("/", 1)
    payload, signature = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body[0] = body[0].replace("u1", "u2")
    forged = base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode())
    return f"{prefix}/{forged.rstrip(b'=').decode()}.{signature}"


async def test_pixel_is_a_transparent_gif_and_one_open_event(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    for _ in range(3):
        answer = await api.get(opened())
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "image/gif"
        gif = answer.content
        assert gif[:6] == b"GIF89a" and gif[6:10] == b"\x01\x00\x01\x00"  # 1×1
        assert b"\x21\xf9\x04\x01" in gif  # graphic control extension: transparent
        assert gif.endswith(b";")
        assert "no-store" in answer.headers["cache-control"]
        assert "no-cache" in answer.headers["cache-control"]
    assert [t.kind for t in touchpoints(settings)] == ["email_opened"] * 3
    assert {(t.customer_id, t.journey_id, t.step) for t in touchpoints(settings)} == {
        ("u1", "cart-abandonment-u1", "cart_email")
    }
    (event,) = events(settings)
    assert (event.type, event.name, event.customer_id) == ("track", "Email Opened", "u1")
    assert event.payload["properties"] == {
        "journey_id": "cart-abandonment-u1",
        "step": "cart_email",
        "message_key": MESSAGE_KEY,
    }
    assert event.message_id.startswith("kaeru-open-")
    assert event.routed_at is None  # the router delivers it to the journey
    assert flag(settings) == (True, False)


@pytest.mark.parametrize(
    "path",
    [
        opened(key=b"someone-elses-key"),
        altered(opened()),
        opened()[:-3] + "AAA",
        "/t/o/not-a-token",
        "/t/o/a.b.c",
        "/t/o/" + "A" * 5000,
        clicked(0),  # a click token is not an open token
    ],
)
async def test_forged_altered_or_malformed_pixel_is_404_and_records_nothing(
    api: httpx.AsyncClient, settings: Settings, path: str
) -> None:
    path = path.replace("/t/c/", "/t/o/")
    answer = await api.get(path)
    assert answer.status_code == 404
    assert answer.json()["code"] == "not_found"
    assert touchpoints(settings) == []
    assert events(settings) == []
    assert flag(settings) == (False, False)


async def test_pixel_for_an_unknown_message_is_404(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    answer = await api.get(opened("cart-abandonment-u1/run-1/never_sent"))
    assert answer.status_code == 404
    assert touchpoints(settings) == [] and events(settings) == []


async def test_click_redirects_to_the_stored_link_and_emits_one_event(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    for _ in range(2):
        answer = await api.get(clicked(1))
        assert answer.status_code == 302
        assert answer.headers["location"] == LINKS[1]
    answer = await api.get(clicked(0))
    assert answer.headers["location"] == LINKS[0]
    assert [(t.kind, t.detail["url"]) for t in touchpoints(settings)] == [
        ("email_clicked", LINKS[1]),
        ("email_clicked", LINKS[1]),
        ("email_clicked", LINKS[0]),
    ]
    (event,) = events(settings)
    assert (event.name, event.customer_id) == ("Email Link Clicked", "u1")
    assert event.payload["properties"]["journey_id"] == "cart-abandonment-u1"
    assert event.payload["properties"]["url"] == LINKS[1]
    assert flag(settings) == (False, True)
    # An open after a click is its own first open.
    await api.get(opened())
    assert [e.name for e in events(settings)] == ["Email Link Clicked", "Email Opened"]


@pytest.mark.parametrize("link", [2, 99, -1])
async def test_link_index_out_of_range_is_404(
    api: httpx.AsyncClient, settings: Settings, link: int
) -> None:
    answer = await api.get(clicked(link))
    assert answer.status_code == 404
    assert "location" not in answer.headers
    assert touchpoints(settings) == [] and events(settings) == []


@pytest.mark.parametrize(
    "path",
    [
        clicked(0) + "?url=https://evil.example/&next=https://evil.example/",
        clicked(0) + "/https://evil.example/",
    ],
)
async def test_the_request_never_chooses_the_target(api: httpx.AsyncClient, path: str) -> None:
    answer = await api.get(path)
    if answer.status_code == 302:
        assert answer.headers["location"] == LINKS[0]
    else:
        assert answer.status_code == 404
    assert "evil" not in answer.headers.get("location", "")


@pytest.mark.parametrize(
    "path",
    [
        altered(clicked(0)),
        clicked(0, key=b"attacker"),
        opened().replace("/t/o/", "/t/c/"),
        "/t/c/" + base64.urlsafe_b64encode(b'["x","c",0,"https://evil.example"]').decode() + ".AA",
    ],
)
async def test_forged_click_is_404_without_redirect_or_event(
    api: httpx.AsyncClient, settings: Settings, path: str
) -> None:
    answer = await api.get(path)
    assert answer.status_code == 404
    assert "location" not in answer.headers
    assert touchpoints(settings) == [] and events(settings) == []
    assert flag(settings) == (False, False)
