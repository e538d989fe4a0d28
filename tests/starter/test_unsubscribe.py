"""The unsubscribe link ``/u/<token>``: RFC 8058 one-click, the preference page, forged links.

Each test sends a real marketing email (the activity, to a loopback SMTP server), takes the
link from its ``List-Unsubscribe`` header, and speaks to the real API about it, on SQLite and
PostgreSQL.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlmodel import select
from temporalio.testing import ActivityEnvironment

from activities.email import EmailActivities
from kaeru.consent import CONSENT_WITHDRAWN, SUBSCRIBED, UNSUBSCRIBED, consent_of
from kaeru.db import session
from kaeru.models import Consent, ConsentChange, Event
from kaeru.settings import Settings
from kaeru.tracking_tokens import OPEN
from kaeru.tracking_tokens import token_for as tracking_token
from starter.app import create_app
from starter.consent_changes import record_consent_change
from tests.activities.factories import add_customer
from tests.activities.test_email import KEY, SIGNING_KEY, request
from tests.conftest import make_settings
from tests.starter.conftest import asgi_client
from tests.support.smtp import SMTPTestServer

ADDRESS = "alice@example.com"
ONE_CLICK = {"List-Unsubscribe": "One-Click"}
KIND = "cart-abandonment"  # the journey of tests.activities.test_email.JOURNEY
OTHER_KEY = "test-other-secret-0123456789abcdef-kaeru"


@pytest.fixture
async def smtp_server() -> AsyncIterator[SMTPTestServer]:
    async with SMTPTestServer() as server:
        yield server


async def emailed_link(settings: Settings, smtp_server: SMTPTestServer) -> str:
    """Send the cart email to a subscribed customer c1; the path of its unsubscribe link."""
    add_customer(settings.resolved_database_url, "c1", ADDRESS)
    record_consent_change(settings, "c1", "email", True, "identify")
    sending = make_settings(settings.resolved_database_url, smtp_port=smtp_server.port)
    sending = sending.model_copy(update={"secret_key": settings.secret_key})
    await ActivityEnvironment().run(EmailActivities(sending).send_email, request())
    header = smtp_server.messages[-1].message["List-Unsubscribe"]
    found = re.fullmatch(r"<http://kaeru\.test(/u/[A-Za-z0-9_-]{22})>", header)
    assert found is not None, header
    return found.group(1)


def consent(settings: Settings) -> Consent | None:
    with session(settings.resolved_database_url) as s:
        return consent_of(s, "c1")


def withdrawals(settings: Settings) -> list[Event]:
    with session(settings.resolved_database_url) as s:
        return list(s.exec(select(Event).where(Event.name == CONSENT_WITHDRAWN)))


def changes(settings: Settings) -> list[ConsentChange]:
    with session(settings.resolved_database_url) as s:
        return list(s.exec(select(ConsentChange).order_by(ConsentChange.id)))  # type: ignore[arg-type]


def assert_no_redirect_no_cookie(response: httpx.Response) -> None:
    assert not response.is_redirect
    assert "set-cookie" not in response.headers


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url, unknown_consent_is_yes=False, shop_address="1 Pond Lane")


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(create_app(settings, run_router=False)) as client:
        yield client


async def test_one_click_urlencoded_unsubscribes_at_once_and_only_once(
    settings: Settings, api: httpx.AsyncClient, smtp_server: SMTPTestServer
) -> None:
    link = await emailed_link(settings, smtp_server)
    assert consent(settings) is not None and consent(settings).state == SUBSCRIBED  # type: ignore[union-attr]

    answer = await api.post(link, data=ONE_CLICK)  # urlencoded, as Gmail posts it
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert "unsubscribed" in answer.text
    assert_no_redirect_no_cookie(answer)
    row = consent(settings)
    assert row is not None and (row.state, row.source) == (UNSUBSCRIBED, "one_click")
    [event] = withdrawals(settings)
    assert event.customer_id == "c1"
    assert event.payload["properties"] == {"channel": "email", "kind": None, "source": "one_click"}
    [*_, change] = changes(settings)
    assert change.detail is not None and "c1" not in change.detail  # names the message only

    again = await api.post(link, data=ONE_CLICK)
    assert again.status_code == 200
    assert len(withdrawals(settings)) == 1  # idempotent: one change, one event
    assert len(changes(settings)) == 2  # the subscribe, the unsubscribe


async def test_one_click_multipart_unsubscribes(
    settings: Settings, api: httpx.AsyncClient, smtp_server: SMTPTestServer
) -> None:
    link = await emailed_link(settings, smtp_server)
    answer = await api.post(link, files={"List-Unsubscribe": (None, "One-Click")})
    assert answer.status_code == 200, answer.text
    assert answer.request.headers["content-type"].startswith("multipart/form-data")
    assert_no_redirect_no_cookie(answer)
    row = consent(settings)
    assert row is not None and row.state == UNSUBSCRIBED
    assert len(withdrawals(settings)) == 1


async def test_the_preference_page_changes_nothing_by_itself(
    settings: Settings, api: httpx.AsyncClient, smtp_server: SMTPTestServer
) -> None:
    link = await emailed_link(settings, smtp_server)
    page = await api.get(link)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    html = page.text
    assert "Email preferences" in html and "Kaeru Shop" in html and "1 Pond Lane" in html
    assert "a***@example.com" in html and ADDRESS not in html
    assert 'name="choice" value="all"' in html
    assert 'name="choice" value="kind"' in html
    assert "Only stop emails like this one (Cart abandonment)" in html
    assert 'value="resubscribe"' not in html  # subscribed: nothing to take back
    assert "<script" not in html
    row = consent(settings)
    assert row is not None and row.state == SUBSCRIBED
    assert withdrawals(settings) == []


async def test_the_page_opts_out_of_one_kind_and_back_in(
    settings: Settings, api: httpx.AsyncClient, smtp_server: SMTPTestServer
) -> None:
    link = await emailed_link(settings, smtp_server)
    page = await api.post(link, data={"choice": "kind"})
    assert page.status_code == 200
    assert "no more “Cart abandonment” emails" in page.text
    assert 'value="resubscribe"' in page.text
    row = consent(settings)
    assert row is not None and (row.state, row.kinds_off) == (SUBSCRIBED, [KIND])
    [event] = withdrawals(settings)
    assert event.payload["properties"] == {
        "channel": "email",
        "kind": KIND,
        "source": "preference_page",
    }

    page = await api.post(link, data={"choice": "resubscribe"})
    assert page.status_code == 200
    row = consent(settings)
    assert row is not None and (row.state, row.kinds_off) == (SUBSCRIBED, [])


async def test_the_page_unsubscribes_from_all_and_resubscribes(
    settings: Settings, api: httpx.AsyncClient, smtp_server: SMTPTestServer
) -> None:
    link = await emailed_link(settings, smtp_server)
    page = await api.post(link, data={"choice": "all"})
    assert page.status_code == 200 and "no more marketing email" in page.text
    row = consent(settings)
    assert row is not None and (row.state, row.source) == (UNSUBSCRIBED, "preference_page")
    assert len(withdrawals(settings)) == 1

    page = await api.post(link, data={"choice": "resubscribe"})
    assert page.status_code == 200 and "Welcome back" in page.text
    row = consent(settings)
    assert row is not None and row.state == SUBSCRIBED


async def test_a_post_without_a_choice_is_a_clear_400(
    settings: Settings, api: httpx.AsyncClient, smtp_server: SMTPTestServer
) -> None:
    link = await emailed_link(settings, smtp_server)
    for body in ({}, {"choice": "everything"}, {"List-Unsubscribe": "Yes"}):
        answer = await api.post(link, data=body)
        assert answer.status_code == 400
        assert "choose one of the buttons" in answer.text
    too_big = await api.post(link, content=b"x" * 10_000)
    assert too_big.status_code == 400 and "List-Unsubscribe=One-Click" in too_big.text
    row = consent(settings)
    assert row is not None and row.state == SUBSCRIBED


async def test_a_forged_or_altered_token_is_refused_with_a_page(
    settings: Settings, api: httpx.AsyncClient, smtp_server: SMTPTestServer
) -> None:
    link = await emailed_link(settings, smtp_server)
    last = link[-1]
    altered = link[:-1] + ("A" if last != "A" else "B")
    pixel = f"/u/{tracking_token(SIGNING_KEY, KEY, OPEN)}"  # a real token of another kind
    for path in (altered, pixel, "/u/short", "/u/" + "x" * 5000, link[:-1], link + "A"):
        page = await api.get(path)
        assert page.status_code == 400, path
        assert "This unsubscribe link is not valid" in page.text
        assert page.headers["content-type"].startswith("text/html")
        refused = await api.post(path, data=ONE_CLICK)
        assert refused.status_code == 400
        assert "not valid" in refused.text
    row = consent(settings)
    assert row is not None and row.state == SUBSCRIBED
    assert withdrawals(settings) == []


async def test_a_link_signed_with_the_previous_key_works_during_the_rotation(
    settings: Settings, smtp_server: SMTPTestServer
) -> None:
    link = await emailed_link(settings, smtp_server)  # signed with make_settings' key
    rotated = make_settings(settings.resolved_database_url, secret_key=OTHER_KEY)
    async with asgi_client(create_app(rotated, run_router=False)) as api:
        assert (await api.get(link)).status_code == 400  # the old key is gone: refused
    during = make_settings(
        settings.resolved_database_url,
        secret_key=OTHER_KEY,
        secret_key_previous=settings.secret_key,
        unknown_consent_is_yes=False,
    )
    async with asgi_client(create_app(during, run_router=False)) as api:
        assert (await api.get(link)).status_code == 200
        assert (await api.post(link, data=ONE_CLICK)).status_code == 200
    row = consent(settings)
    assert row is not None and row.state == UNSUBSCRIBED


async def test_the_link_is_rate_limited_per_client_like_tracking_links(
    sqlite_url: str, smtp_server: SMTPTestServer
) -> None:
    settings = make_settings(sqlite_url, tracking_limit_burst=2, tracking_limit_per_second=0.01)
    link = await emailed_link(settings, smtp_server)
    async with asgi_client(create_app(settings, run_router=False)) as api:
        assert [(await api.get(link)).status_code for _ in range(3)] == [200, 200, 429]


async def test_the_page_loads_nothing_from_elsewhere(
    sqlite_url: str, smtp_server: SMTPTestServer
) -> None:
    """One form posting back to the link; no file from another site (the token is in the
    page's address: a third party must not see it), only the link back to the shop."""
    settings = make_settings(sqlite_url)
    link = await emailed_link(settings, smtp_server)
    async with asgi_client(create_app(settings, run_router=False)) as api:
        html = (await api.get(link)).text
    assert re.search(r'<form method="post">', html)
    assert not re.search(r'(src|href)="https?://(?!shop\.example)', html)
