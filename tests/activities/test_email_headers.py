"""List-Unsubscribe (RFC 8058) and the footer: on every marketing message, on no transactional
one; sent through a real SMTP server on loopback, read as the server received it."""

from __future__ import annotations

from email.message import EmailMessage as MimeMessage
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.email import TEMPLATES, EmailActivities
from activities.types import SendEmailInput
from kaeru.db import session
from kaeru.models import TrackingLink
from kaeru.settings import Settings
from kaeru.tracking_tokens import digest_of
from kaeru.unsubscribe_tokens import UNSUBSCRIBE, token_for
from tests.activities.factories import add_customer
from tests.activities.test_email import JOURNEY, KEY, SIGNING_KEY, parts, request
from tests.conftest import make_settings
from tests.support.smtp import SMTPTestServer

ADDRESS = "alice@example.com"
SHOP_ADDRESS = "Kaeru Shop Ltd, 1 Pond Lane, Springfield 12345, USA"
CONFIRMATION = f"{JOURNEY}/run-1/confirmation"


def order_confirmation() -> SendEmailInput:
    return SendEmailInput(
        key=CONFIRMATION,
        journey_id=JOURNEY,
        step="confirmation",
        customer_id="c1",
        template="order_confirmation",
        marketing=False,
        context={
            "order_id": "o-1",
            "currency": "USD",
            "items": [{"product_id": "mug", "name": "Frog mug", "price": 19.99, "quantity": 1}],
            "more_items": 0,
            "subtotal_minor": 1999,
            "discount_minor": None,
            "coupon_code": None,
            "shipping_minor": None,
            "tax_minor": None,
            "total_minor": 1999,
        },
    )


async def sent(
    settings: Settings, email: SendEmailInput, server: SMTPTestServer, folders: list[Path] | None
) -> MimeMessage:
    activities = EmailActivities(settings, folders or [TEMPLATES])
    await ActivityEnvironment().run(activities.send_email, email)
    return server.messages[-1].message


async def test_a_marketing_email_carries_one_click_unsubscribe_and_the_footer(
    database_url: str, smtp_server: SMTPTestServer
) -> None:
    settings = make_settings(database_url, smtp_port=smtp_server.port, shop_address=SHOP_ADDRESS)
    add_customer(database_url, "c1", ADDRESS)
    message = await sent(settings, request(), smtp_server, None)

    token = token_for(SIGNING_KEY, KEY)
    url = f"http://kaeru.test/u/{token}"
    assert message["List-Unsubscribe"] == f"<{url}>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    text, html = parts(message)
    for part in (text, html):
        assert url in part
        assert SHOP_ADDRESS in part
    assert "Unsubscribe or choose which emails you get" in text
    # The footer sits in the body, before the open pixel's end of it; the link is not tracked.
    assert html.index(url) < html.lower().rindex("</body>")
    assert f'href="{url}"' in html
    # The token names nothing readable: not the customer, not the message key.
    assert "c1" not in token and len(token) == 22
    with session(database_url) as s:
        row = s.get(TrackingLink, digest_of(token))
        assert row is not None
        assert (row.kind, row.message_key) == (UNSUBSCRIBE, KEY)


async def test_without_a_shop_address_the_footer_still_has_the_link(
    sqlite_url: str, smtp_server: SMTPTestServer
) -> None:
    settings = make_settings(sqlite_url, smtp_port=smtp_server.port)
    add_customer(sqlite_url, "c1", ADDRESS)
    text, html = parts(await sent(settings, request(), smtp_server, None))
    url = f"http://kaeru.test/u/{token_for(SIGNING_KEY, KEY)}"
    assert url in text and url in html
    assert "Kaeru Shop, " not in text


async def test_the_mailto_target_carries_the_token_in_its_subject(
    sqlite_url: str, smtp_server: SMTPTestServer
) -> None:
    settings = make_settings(
        sqlite_url, smtp_port=smtp_server.port, unsubscribe_mailto="unsubscribe@shop.example"
    )
    add_customer(sqlite_url, "c1", ADDRESS)
    message = await sent(settings, request(), smtp_server, None)
    token = token_for(SIGNING_KEY, KEY)
    assert message["List-Unsubscribe"] == (
        f"<http://kaeru.test/u/{token}>, "
        f"<mailto:unsubscribe@shop.example?subject=unsubscribe%20{token}>"
    )


async def test_an_order_confirmation_carries_neither_header_nor_link(
    database_url: str, smtp_server: SMTPTestServer
) -> None:
    settings = make_settings(database_url, smtp_port=smtp_server.port, shop_address=SHOP_ADDRESS)
    add_customer(database_url, "c1", ADDRESS)
    message = await sent(settings, order_confirmation(), smtp_server, None)
    assert "Order number: o-1" in parts(message)[0]
    assert message["List-Unsubscribe"] is None
    assert message["List-Unsubscribe-Post"] is None
    for part in parts(message):
        assert "/u/" not in part
        assert "Unsubscribe" not in part
    with session(database_url) as s:
        assert s.get(TrackingLink, digest_of(token_for(SIGNING_KEY, CONFIRMATION))) is None


async def test_a_resend_carries_the_same_unsubscribe_link(
    sqlite_url: str, smtp_server: SMTPTestServer
) -> None:
    settings = make_settings(sqlite_url, smtp_port=smtp_server.port)
    add_customer(sqlite_url, "c1", ADDRESS)
    smtp_server.reject_data(451)  # the first attempt is refused for now, and retried
    with pytest.raises(ApplicationError):
        await sent(settings, request(), smtp_server, None)
    await sent(settings, request(), smtp_server, None)
    first = smtp_server.refused_messages[0].message
    assert first["List-Unsubscribe"] == smtp_server.messages[0].message["List-Unsubscribe"]


async def test_a_shops_footer_that_drops_the_link_is_refused(
    sqlite_url: str, smtp_server: SMTPTestServer, tmp_path: Path
) -> None:
    (tmp_path / "_footer.txt.j2").write_text("Thanks for reading.\n")
    settings = make_settings(sqlite_url, smtp_port=smtp_server.port)
    add_customer(sqlite_url, "c1", ADDRESS)
    with pytest.raises(ApplicationError, match="_footer.txt.j2 does not show unsubscribe_url"):
        await sent(settings, request(), smtp_server, [tmp_path, TEMPLATES])
    assert smtp_server.messages == []


def test_a_context_may_not_replace_the_unsubscribe_link() -> None:
    from activities.email.render import RESERVED

    assert {"unsubscribe_url", "shop_address"} <= RESERVED
