"""Open pixel and click redirect: opaque expiring tokens, stored links only, one event per first
touch, repeated hits counted."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from sqlmodel import col, select

from kaeru.db import session
from kaeru.models import EmailMessage, Touchpoint, TrackingLink, utcnow
from kaeru.settings import Settings
from kaeru.tracking_tokens import TrackingToken, digest_of, make_token, register_tokens, token_for
from starter.app import create_app
from starter.opens_and_clicks import PIXEL
from tests.conftest import make_settings
from tests.starter.conftest import asgi_client, events

KEY = b"test-secret-0123456789abcdef-kaeru"  # make_settings' secret_key
MESSAGE_KEY = "cart-abandonment-u1/run-1/cart_email"
LINKS = ["https://shop.example/cart", "https://shop.example/p/mug?utm_source=kaeru"]


@pytest.fixture(autouse=True)
def message(settings: Settings) -> EmailMessage:
    """A cart email sent just now, its tokens registered as the send registers them."""
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
        sent_at=utcnow(),
    )
    with session(settings.resolved_database_url) as s:
        s.add(row)
        register_tokens(s, KEY, MESSAGE_KEY, len(LINKS))
    return row


def opened(message_key: str = MESSAGE_KEY, key: bytes = KEY) -> str:
    return f"/t/o/{token_for(key, message_key, 'o')}"


def clicked(link: int, message_key: str = MESSAGE_KEY, key: bytes = KEY) -> str:
    return f"/t/c/{token_for(key, message_key, 'c', link)}"


def legacy_opened(message_key: str = MESSAGE_KEY, key: bytes = KEY) -> str:
    """The pixel of an email sent before tokens became opaque (base64 JSON, signed)."""
    return f"/t/o/{make_token(key, TrackingToken(message_key, 'o'))}"


def legacy_clicked(link: int, message_key: str = MESSAGE_KEY, key: bytes = KEY) -> str:
    return f"/t/c/{make_token(key, TrackingToken(message_key, 'c', link))}"


def touchpoints(settings: Settings) -> list[Touchpoint]:
    with session(settings.resolved_database_url) as s:
        return list(s.exec(select(Touchpoint).order_by(col(Touchpoint.id))).all())


def hits(settings: Settings, path: str) -> int:
    """How many hits the token of ``path`` has counted (0: it has no row)."""
    with session(settings.resolved_database_url) as s:
        row = s.get(TrackingLink, digest_of(path.rsplit("/", 1)[1]))
    return row.hits if row is not None else 0


def flag(settings: Settings) -> tuple[bool, bool]:
    with session(settings.resolved_database_url) as s:
        row = s.get(EmailMessage, MESSAGE_KEY)
    assert row is not None
    return row.first_open_routed, row.first_click_routed


def sent_ago(settings: Settings, age: timedelta) -> None:
    with session(settings.resolved_database_url) as s:
        row = s.get(EmailMessage, MESSAGE_KEY)
        assert row is not None
        row.sent_at = utcnow() - age
        s.add(row)


def first_hit_ago(settings: Settings, path: str, age: timedelta) -> None:
    """Move the first hit of ``path``'s token ``age`` into the past (its human hit too)."""
    with session(settings.resolved_database_url) as s:
        row = s.get(TrackingLink, digest_of(path.rsplit("/", 1)[1]))
        assert row is not None and row.first_hit_at is not None
        row.first_hit_at -= age
        if row.first_human_at is not None:
            row.first_human_at -= age
        s.add(row)


def altered(path: str) -> str:
    """The same old-format token with the message key in its payload changed, signature kept."""
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
    # Counted on the token's row, not stored three times.
    assert hits(settings, opened()) == 3
    assert [t.kind for t in touchpoints(settings)] == ["email_opened"]
    assert {(t.customer_id, t.journey_id, t.step) for t in touchpoints(settings)} == {
        ("u1", "cart-abandonment-u1", "cart_email")
    }
    (event,) = events(settings)
    assert (event.type, event.name, event.customer_id) == ("track", "Email Opened", "u1")
    assert event.payload["properties"] == {
        "journey_id": "cart-abandonment-u1",
        "step": "cart_email",
        "message_key": MESSAGE_KEY,
        "links": 2,
        "machine": False,
        "machine_reason": None,
        "machine_counts": False,
    }
    assert event.message_id.startswith("kaeru-open-")
    assert event.routed_at is None  # the router delivers it to the journey
    assert flag(settings) == (True, False)


@pytest.mark.parametrize(
    "path",
    [
        opened(key=b"someone-elses-key-someone-elses-key"),
        opened()[:-3] + "AAA",
        opened("cart-abandonment-u1/run-1/never_sent"),
        legacy_opened(key=b"someone-elses-key"),
        altered(legacy_opened()),
        legacy_opened()[:-3] + "AAA",
        "/t/o/not-a-token",
        "/t/o/a.b.c",
        "/t/o/" + "A" * 5000,
        clicked(0),  # a click token is not an open token
        legacy_clicked(0),
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
    answer = await api.get(legacy_opened("cart-abandonment-u1/run-1/never_sent"))
    assert answer.status_code == 404
    assert touchpoints(settings) == [] and events(settings) == []


async def test_click_redirects_to_the_stored_link_and_emits_one_event(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    for _ in range(2):
        answer = await api.get(clicked(1))
        assert answer.status_code == 302
        assert answer.headers["location"] == LINKS[1]
    first_hit_ago(settings, clicked(1), timedelta(seconds=20))  # a person, reading on
    answer = await api.get(clicked(0))
    assert answer.headers["location"] == LINKS[0]
    assert [(t.kind, t.detail["url"]) for t in touchpoints(settings)] == [
        ("email_clicked", LINKS[1]),
        ("email_clicked", LINKS[0]),
    ]
    assert (hits(settings, clicked(1)), hits(settings, clicked(0))) == (2, 1)
    (event,) = events(settings)
    assert (event.name, event.customer_id) == ("Email Link Clicked", "u1")
    assert event.payload["properties"]["journey_id"] == "cart-abandonment-u1"
    assert event.payload["properties"]["url"] == LINKS[1]
    assert flag(settings) == (False, True)
    # An open after a click is its own first open.
    await api.get(opened())
    assert [e.name for e in events(settings)] == ["Email Link Clicked", "Email Opened"]


async def test_opens_and_clicks_carry_the_messages_experiment_variant(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    with session(settings.resolved_database_url) as s:
        row = s.get(EmailMessage, MESSAGE_KEY)
        assert row is not None
        row.variant = "asks_a_question"  # as the send stored it (SendEmailInput.variant)
        s.add(row)
    await api.get(opened())
    await api.get(clicked(0))
    assert [(t.kind, t.variant) for t in touchpoints(settings)] == [
        ("email_opened", "asks_a_question"),
        ("email_clicked", "asks_a_question"),
    ]


@pytest.mark.parametrize("link", [2, 99, -1])
async def test_link_index_out_of_range_is_404(
    api: httpx.AsyncClient, settings: Settings, link: int
) -> None:
    answer = await api.get(legacy_clicked(link))  # signed, so only the index can refuse it
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
        altered(legacy_clicked(0)),
        legacy_clicked(0, key=b"attacker"),
        clicked(0, key=b"attacker-attacker-attacker-attacker"),
        opened().replace("/t/o/", "/t/c/"),
        legacy_opened().replace("/t/o/", "/t/c/"),
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


# ---- expiry, counting, links of emails sent before opaque tokens --------------------------------


@pytest.mark.parametrize("age", [timedelta(days=90), timedelta(days=400)])
async def test_an_expired_token_still_answers_but_records_nothing(
    api: httpx.AsyncClient, settings: Settings, age: timedelta
) -> None:
    sent_ago(settings, age)  # KAERU_TRACKING_TTL is 90 days by default

    for path in (opened(), legacy_opened()):
        pixel = await api.get(path)
        assert pixel.status_code == 200 and pixel.content[:6] == b"GIF89a"  # no broken image
    for path in (clicked(1), legacy_clicked(1)):
        click = await api.get(path)
        assert click.status_code == 302
        assert click.headers["location"] == settings.shop_url  # the shop, never a 404

    assert touchpoints(settings) == [] and events(settings) == []
    assert flag(settings) == (False, False)
    assert hits(settings, opened()) == hits(settings, clicked(1)) == 0
    with session(settings.resolved_database_url) as s:
        assert len(list(s.exec(select(TrackingLink)))) == 1 + len(LINKS)  # no legacy rows


async def test_a_token_records_until_its_ttl_after_the_send(database_url: str) -> None:
    settings = make_settings(database_url, tracking_ttl="3600")  # seconds, from the environment
    sent_ago(settings, timedelta(minutes=59))
    async with asgi_client(create_app(settings, run_router=False)) as api:
        assert (await api.get(opened())).status_code == 200
        assert hits(settings, opened()) == 1
        sent_ago(settings, timedelta(minutes=61))
        assert (await api.get(clicked(0))).headers["location"] == settings.shop_url
    assert [t.kind for t in touchpoints(settings)] == ["email_opened"]


async def test_links_in_emails_sent_before_keep_working_and_are_counted(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    """Old-format tokens: the same answers and events as before, hits counted on one row."""
    padded = legacy_opened() + "=="  # another spelling of the same token
    for path in (legacy_opened(), legacy_opened(), padded):
        assert (await api.get(path)).status_code == 200
    click = await api.get(legacy_clicked(1))
    assert (click.status_code, click.headers["location"]) == (302, LINKS[1])

    assert [t.kind for t in touchpoints(settings)] == ["email_opened", "email_clicked"]
    assert [e.name for e in events(settings)] == ["Email Opened", "Email Link Clicked"]
    assert hits(settings, legacy_opened()) == 3
    # The opaque token of the same pixel is another token with its own first hit, but the
    # message's first open has been routed: no second event.
    assert (await api.get(opened())).status_code == 200
    assert [e.name for e in events(settings)] == ["Email Opened", "Email Link Clicked"]


async def test_links_signed_with_a_former_short_key_work_with_the_legacy_key(
    database_url: str,
) -> None:
    old_key = "restart-test"  # what KAERU_SECRET_KEY was before 32 bytes were required
    path = legacy_opened(key=old_key.encode())
    for legacy, status in ((None, 404), (old_key, 200)):
        settings = make_settings(database_url, legacy_secret_key=legacy)
        async with asgi_client(create_app(settings, run_router=False)) as api:
            assert (await api.get(path)).status_code == status
    assert [e.name for e in events(settings)] == ["Email Opened"]


@pytest.mark.parametrize("key", ["short", "x" * 31, "é" * 15])
def test_a_signing_key_under_32_bytes_is_refused_with_the_fix(key: str) -> None:
    with pytest.raises(ValidationError) as caught:
        make_settings("sqlite://", secret_key=key)
    message = str(caught.value)
    assert "at least 32 bytes" in message and "KAERU_LEGACY_SECRET_KEY" in message
    assert make_settings("sqlite://", secret_key="é" * 16).secret_key is not None  # 32 bytes


async def test_concurrent_first_hits_make_one_touchpoint_and_one_event(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    answers = await asyncio.gather(*(api.get(opened()) for _ in range(8)))
    assert {a.status_code for a in answers} == {200}
    assert len(touchpoints(settings)) == 1 and len(events(settings)) == 1
    assert hits(settings, opened()) == 8


# ---- machine opens (kaeru/machine_opens.py) ------------------------------------------------

APPLE = "172.224.226.5"  # inside the test's Apple egress ranges
ELSEWHERE = "203.0.113.9"
SAFARI = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"
)


@pytest.fixture
def machine_settings(database_url: str, tmp_path: Path) -> Settings:
    ranges = tmp_path / "apple.csv"
    ranges.write_text("172.224.226.0/27,GB,GB-EN,London,\n2a02:26f7:b3c0:4000::/64,GB,,,\n")
    # The test client talks from 127.0.0.1: as a proxy there, it says who the client is.
    return make_settings(database_url, apple_ranges_file=ranges, trusted_proxies="127.0.0.1")


@pytest.fixture
async def tracker(machine_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(create_app(machine_settings, run_router=False)) as client:
        yield client


def fetch_from(address: str, agent: str) -> dict[str, str]:
    return {"X-Forwarded-For": address, "User-Agent": agent}


def tracked(settings: Settings) -> dict[tuple[str, int | None], TrackingLink]:
    with session(settings.resolved_database_url) as s:
        rows = s.exec(select(TrackingLink).where(TrackingLink.message_key == MESSAGE_KEY))
        return {(r.kind, r.link): r for r in rows}


def judged(settings: Settings) -> list[tuple[str, bool, str | None]]:
    """Each touchpoint's kind, whether it is machine, and why."""
    return [
        (t.kind, t.detail["machine"], t.detail.get("machine_reason")) for t in touchpoints(settings)
    ]


def told(settings: Settings) -> list[tuple[str, bool, str | None]]:
    """Each stored event's name, and whether (and why) it tells the journey of a machine."""
    return [
        (
            e.name or "",
            e.payload["properties"]["machine"],
            e.payload["properties"]["machine_reason"],
        )
        for e in events(settings)
    ]


async def test_an_mpp_open_is_recorded_as_machine_and_the_shoppers_own_is_human(
    tracker: httpx.AsyncClient, machine_settings: Settings
) -> None:
    answer = await tracker.get(opened(), headers=fetch_from(APPLE, "Mozilla/5.0"))
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/gif"
    assert tracked(machine_settings)[("o", None)].machine_reason == "apple_mpp"
    assert tracked(machine_settings)[("o", None)].first_human_at is None
    assert judged(machine_settings) == [("email_opened", True, "apple_mpp")]
    assert told(machine_settings) == [("Email Opened", True, "apple_mpp")]
    assert events(machine_settings)[0].message_id.startswith("kaeru-open-machine-")
    assert flag(machine_settings) == (False, False)  # no human open was routed yet

    # Another proxy fetch is counted, not told again; then the shopper opens it in Safari.
    await tracker.get(opened(), headers=fetch_from(APPLE, "Mozilla/5.0"))
    await tracker.get(opened(), headers=fetch_from(ELSEWHERE, SAFARI))
    assert hits(machine_settings, opened()) == 3
    assert judged(machine_settings) == [
        ("email_opened", True, "apple_mpp"),
        ("email_opened", False, None),
    ]
    assert told(machine_settings) == [
        ("Email Opened", True, "apple_mpp"),
        ("Email Opened", False, None),
    ]
    assert flag(machine_settings) == (True, False)


async def test_safari_through_private_relay_is_a_human_open(
    tracker: httpx.AsyncClient, machine_settings: Settings
) -> None:
    await tracker.get(opened(), headers=fetch_from(APPLE, SAFARI))
    assert judged(machine_settings) == [("email_opened", False, None)]
    assert told(machine_settings) == [("Email Opened", False, None)]


async def test_an_ordinary_open_one_second_after_delivery_stays_human(
    tracker: httpx.AsyncClient, machine_settings: Settings
) -> None:
    sent_ago(machine_settings, timedelta(seconds=1))
    await tracker.get(opened(), headers=fetch_from(ELSEWHERE, SAFARI))
    await tracker.get(clicked(0), headers=fetch_from(ELSEWHERE, SAFARI))
    assert judged(machine_settings) == [
        ("email_opened", False, None),
        ("email_clicked", False, None),
    ]
    assert [machine for _, machine, _ in told(machine_settings)] == [False, False]


async def test_a_scanner_click_redirects_is_machine_and_the_shoppers_click_still_counts(
    tracker: httpx.AsyncClient, machine_settings: Settings
) -> None:
    answer = await tracker.get(clicked(1), headers=fetch_from(ELSEWHERE, "Barracuda Sentinel"))
    assert answer.status_code == 302 and answer.headers["location"] == LINKS[1]
    assert told(machine_settings) == [("Email Link Clicked", True, "scanner_ua")]
    # The shopper clicks the same link later: its first human hit is told to the journey.
    await tracker.get(clicked(1), headers=fetch_from(ELSEWHERE, SAFARI))
    assert judged(machine_settings) == [
        ("email_clicked", True, "scanner_ua"),
        ("email_clicked", False, None),
    ]
    assert told(machine_settings)[1] == ("Email Link Clicked", False, None)
    assert flag(machine_settings) == (False, True)


async def test_every_link_in_one_second_makes_the_clicks_and_the_open_machine(
    tracker: httpx.AsyncClient, machine_settings: Settings
) -> None:
    """A scanner with a browser's user agent fetches the pixel and every link at once."""
    for path in (opened(), clicked(0), clicked(1)):
        await tracker.get(path, headers=fetch_from(ELSEWHERE, SAFARI))
    rows = tracked(machine_settings)
    assert {r.machine_reason for r in rows.values()} == {"all_links_same_second"}
    assert all(r.first_human_at is None for r in rows.values())
    # Judged human as they came, then corrected: the touchpoints say machine now.
    assert judged(machine_settings) == [
        ("email_opened", True, "all_links_same_second"),
        ("email_clicked", True, "all_links_same_second"),
        ("email_clicked", True, "all_links_same_second"),
    ]
    # The journey is told the verdict after the first open and click it was told of.
    assert told(machine_settings) == [
        ("Email Opened", False, None),
        ("Email Link Clicked", False, None),
        ("Email Link Clicked", True, "all_links_same_second"),
    ]
    verdict = events(machine_settings)[-1]
    assert verdict.message_id.startswith("kaeru-click-burst-")
    assert verdict.payload["properties"]["burst_open"] is True
    assert flag(machine_settings) == (False, False)

    # The scanner fetches a link again while its burst runs: still a machine.
    await tracker.get(clicked(1), headers=fetch_from(ELSEWHERE, SAFARI))
    assert len(told(machine_settings)) == 4
    assert told(machine_settings)[3] == ("Email Link Clicked", True, "all_links_same_second")
    assert flag(machine_settings) == (False, False)

    # The shopper reads it later: their open and click are told, under new message ids.
    for path in (opened(), clicked(0), clicked(1)):
        first_hit_ago(machine_settings, path, timedelta(minutes=30))
    await tracker.get(opened(), headers=fetch_from(ELSEWHERE, SAFARI))
    await tracker.get(clicked(0), headers=fetch_from(ELSEWHERE, SAFARI))
    assert told(machine_settings)[4:] == [
        ("Email Opened", False, None),
        ("Email Link Clicked", False, None),
    ]
    assert [e.message_id.split("-")[2] for e in events(machine_settings)[4:]] == ["after", "after"]
    assert judged(machine_settings)[3:] == [
        ("email_opened", False, None),
        ("email_clicked", False, None),
    ]


async def test_links_a_second_apart_are_a_person(
    tracker: httpx.AsyncClient, machine_settings: Settings
) -> None:
    await tracker.get(opened(), headers=fetch_from(ELSEWHERE, SAFARI))
    await tracker.get(clicked(0), headers=fetch_from(ELSEWHERE, SAFARI))
    first_hit_ago(machine_settings, clicked(0), timedelta(seconds=1))
    await tracker.get(clicked(1), headers=fetch_from(ELSEWHERE, SAFARI))
    assert {r.machine_reason for r in tracked(machine_settings).values()} == {None}
    assert [machine for _, machine, _ in told(machine_settings)] == [False, False]


async def test_the_setting_tells_journeys_to_count_machine_opens(
    database_url: str, tmp_path: Path
) -> None:
    ranges = tmp_path / "apple.csv"
    ranges.write_text("172.224.226.0/27,GB,GB-EN,London,\n")
    settings = make_settings(
        database_url,
        apple_ranges_file=ranges,
        trusted_proxies="127.0.0.1",
        machine_opens_count=True,
    )
    async with asgi_client(create_app(settings, run_router=False)) as client:
        await client.get(opened(), headers=fetch_from(APPLE, "Mozilla/5.0"))
    (event,) = events(settings)
    assert event.payload["properties"]["machine"] is True
    assert event.payload["properties"]["machine_counts"] is True


async def test_a_missing_ranges_file_never_breaks_the_pixel(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        database_url, apple_ranges_file=tmp_path / "nowhere.csv", trusted_proxies="127.0.0.1"
    )
    async with asgi_client(create_app(settings, run_router=False)) as client:
        answer = await client.get(opened(), headers=fetch_from(APPLE, "Mozilla/5.0"))
    assert answer.status_code == 200 and answer.content == PIXEL
    assert [machine for _, machine, _ in told(settings)] == [False]
    assert "KAERU_APPLE_RANGES_FILE" in caplog.text


async def test_a_scanner_fetching_every_link_at_once_is_caught(
    tracker: httpx.AsyncClient, machine_settings: Settings
) -> None:
    """Scanners fetch links in parallel: each hit sees the others, however they interleave."""
    keys = [f"cart-abandonment-u1/run-{n}/cart_email" for n in range(2, 10)]
    with session(machine_settings.resolved_database_url) as s:
        for key in keys:
            s.add(
                EmailMessage(
                    key=key,
                    message_id=f"<{key}@kaeru>",
                    customer_id="u1",
                    journey_id="cart-abandonment-u1",
                    step="cart_email",
                    to_address="u1@example.com",
                    subject="Your cart",
                    status="sent",
                    links=LINKS,
                    sent_at=utcnow(),
                )
            )
            register_tokens(s, KEY, key, len(LINKS))
    answers = await asyncio.gather(
        *(
            tracker.get(clicked(n, key), headers=fetch_from(ELSEWHERE, SAFARI))
            for key in keys
            for n in (0, 1)
        )
    )
    assert {a.status_code for a in answers} == {302}
    verdicts = [e for e in events(machine_settings) if "-burst-" in e.message_id]
    assert len(verdicts) == len(keys)
