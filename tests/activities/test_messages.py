"""Generic messages: any template family with a journey's context, the topic rule, and the
legacy cart inputs that replayed journeys still send. Real SMTP on loopback, SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, update
from temporalio.converter import DataConverter
from temporalio.testing import ActivityEnvironment

from activities.email import SENT, SKIPPED, TEMPLATES, EmailActivities
from activities.types import CartLine, CouponInfo, ProductInfo, SendEmailInput, SendEmailResult
from kaeru.db import MIGRATIONS, get_engine, migrate, session
from kaeru.models import EmailMessage
from kaeru.settings import Settings
from tests.activities.factories import add_customer, add_products
from tests.activities.test_email import (
    ADDRESS,
    COUPON,
    JOURNEY,
    click_target,
    links_of,
    logged,
    parts,
    request,
    wait_for_status,
)
from tests.conftest import make_settings
from tests.support.smtp import SMTPTestServer

LEGACY = Path(__file__).parent / "legacy"

# ---- legacy cart inputs: exactly what the code before generic messages rendered ----------------


@pytest.mark.parametrize(
    ("case", "email"),
    [
        ("cart_reminder", request()),
        ("cart_offer", request(f"{JOURNEY}/run-1/offer_email", "cart_offer", COUPON)),
        ("cart_reminder_one", replace(request(), cart=request().cart[:1], recommendations=[])),
    ],
)
async def test_legacy_cart_input_renders_byte_for_byte_as_before(
    database_url: str, smtp_server: SMTPTestServer, case: str, email: SendEmailInput
) -> None:
    """The files in tests/activities/legacy were rendered by activities/email.py before it
    became a package (commit 2143f8f): replayed cart journeys send these inputs."""
    add_customer(database_url, "c1", ADDRESS)
    settings = make_settings(database_url, smtp_port=smtp_server.port)

    await ActivityEnvironment().run(EmailActivities(settings).send_email, email)

    [received] = smtp_server.messages
    text, html = without_footer(*parts(received.message))
    expected = json.loads((LEGACY / f"{case}.json").read_text())
    assert {"subject": received.message["Subject"], "text": text, "html": html} == expected


def without_footer(text: str, html: str) -> tuple[str, str]:
    """The parts without the footer every marketing email has had since (the unsubscribe link
    and the shop's address, activities/templates/_footer.*.j2), which must be there."""
    text, _, text_footer = text.partition("\r\nUnsubscribe or choose which emails you get: ")
    assert text_footer.startswith("http://kaeru.test/u/")
    start = html.rindex('<table role="presentation" width="100%"')  # the footer's, after the card
    end = html.index('<img src="http://kaeru.test/t/o/')  # the pixel comes last
    assert 'href="http://kaeru.test/u/' in html[start:end]
    return text, html[:start] + html[end:]


# ---- a new template family with a typed context -----------------------------------------------


@dataclass
class OrderContext:
    """What an order confirmation journey would build: typed, then sent as a dict."""

    order_id: str
    lines: list[dict[str, object]]
    total_minor: int
    currency: str
    recommendations: list[str] = field(default_factory=list)
    coupon: CouponInfo | None = None


FAMILY = {
    "order_thanks.subject.j2": "Your order {{ order_id }} at {{ shop.name }}",
    "order_thanks.txt.j2": (
        "Thanks for order {{ order_id }}.\n"
        "{% with lines = lines_of(lines, total_minor, currency) %}"
        '{% include "_lines.txt.j2" %}{% endwith %}'
        "{% with items = products_of(recommendations), heading = 'Goes well with' %}"
        '{% include "_products.txt.j2" %}{% endwith %}'
        '{% with coupon = coupon_of(coupon) %}{% include "_coupon.txt.j2" %}{% endwith %}\n'
        "Paid: {{ total_minor|money(currency) }} ({{ money(250, 'JPY') }})\n"
    ),
    "order_thanks.html.j2": (
        '{% extends "_layout.html.j2" %}{% block content %}'
        "<p>Thanks for order {{ order_id }}.</p>"
        "{% with lines = lines_of(lines, total_minor, currency) %}"
        '{% include "_lines.html.j2" %}{% endwith %}'
        "{% with items = products_of(recommendations), heading = 'Goes well with' %}"
        '{% include "_products.html.j2" %}{% endwith %}'
        '{% with coupon = coupon_of(coupon) %}{% include "_coupon.html.j2" %}{% endwith %}'
        '<a href="{{ link(lines[0].url) }}">again</a>'
        '<img src="{{ image(lines[0].image_url) or "" }}" alt="">'
        "{% endblock %}"
    ),
}


def family_folder(tmp_path: Path, files: dict[str, str]) -> Path:
    folder = tmp_path / "templates"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def through_history(email: SendEmailInput) -> SendEmailInput:
    """``email`` as the activity receives it: encoded into a history and decoded again."""
    converter = DataConverter.default.payload_converter
    [decoded] = converter.from_payloads(converter.to_payloads([email]), [SendEmailInput])
    assert isinstance(decoded, SendEmailInput)
    return decoded


def order_email(key: str = "order-confirmation-c1/o-1/confirmation") -> SendEmailInput:
    context = OrderContext(
        order_id="o-1",
        lines=[
            # Product data from the shop's events: price as the shop sends it, a link elsewhere.
            {
                "product_id": "dress",
                "name": 'Dress <i>"red"</i>',
                "price": 49.5,
                "currency": "EUR",
                "quantity": 2,
                "url": "https://evil.example/phish",
                "image_url": "https://evil.example/x.jpg",
            },
            {"product_id": "belt", "quantity": 1},  # named only by id: the catalogue says
        ],
        total_minor=11900,
        currency="EUR",
        recommendations=["scarf", "ghost"],
        coupon=CouponInfo("KAERU-NEXT", 500, "EUR", datetime(2031, 3, 4, 12, tzinfo=UTC)),
    )
    return SendEmailInput(
        key=key,
        journey_id="order-confirmation-c1",
        step="confirmation",
        customer_id="c1",
        template="order_thanks",
        context=asdict(context),
        marketing=False,
    )


async def test_a_new_family_renders_a_typed_context_with_the_helpers_and_partials(
    database_url: str, smtp_server: SMTPTestServer, tmp_path: Path
) -> None:
    add_customer(database_url, "c1", ADDRESS)
    add_products(database_url, "belt", "scarf", name="Leather belt", price_minor=2000)
    settings = make_settings(
        database_url, smtp_port=smtp_server.port, image_origins="https://cdn.shop.example"
    )
    activities = EmailActivities(settings, (family_folder(tmp_path, FAMILY), TEMPLATES))

    result = await ActivityEnvironment().run(activities.send_email, through_history(order_email()))

    assert result.status == "sent"
    [received] = smtp_server.messages
    assert received.message["Subject"] == "Your order o-1 at Kaeru Shop"
    text, html = parts(received.message)
    for fragment in (
        "Thanks for order o-1.",
        '- Dress <i>"red"</i>: 2 x 49.50 EUR = 99.00 EUR',
        "- Leather belt: 1 x 20.00 USD = 20.00 USD",  # the catalogue's name, price, currency
        "Total: 119.00 EUR",  # the order's total as the journey gave it
        "Goes well with:",
        "- Leather belt (20.00 USD)",  # the recommended scarf, named by the catalogue
        "- See it in the shop:",  # an unknown id shows no id
        "KAERU-NEXT",
        "5.00 EUR off, single use, valid until 04 March 2031.",
        "Paid: 119.00 EUR (250 JPY)",
    ):
        assert fragment in text, fragment
    assert "ghost" not in text + html
    assert "Dress &lt;i&gt;&#34;red&#34;&lt;/i&gt;" in html  # autoescaped
    assert "<i>" not in html
    found = links_of(html)
    assert "https://evil.example/x.jpg" not in found.images  # image() dropped it
    assert "https://cdn.shop.example/belt.jpg" in found.images  # the catalogue's image
    row = logged(database_url, order_email().key)
    assert row is not None and row.marketing is False
    targets = {click_target(href, row, database_url) for href in found.hrefs}
    assert "https://evil.example/phish" not in targets and "https://evil.example/phish" not in (
        row.links
    )
    assert settings.shop_url in targets  # link() sent the foreign link to the shop
    assert "https://shop.example/p/belt" in targets
    assert all(h.startswith("http://kaeru.test/t/c/") for h in found.hrefs)
    assert re.search(r'<img src="http://kaeru\.test/t/o/[^"]+" width="1"', html)  # the pixel


async def test_a_context_may_not_hide_what_every_message_has(
    sqlite_url: str, smtp_server: SMTPTestServer, tmp_path: Path
) -> None:
    add_customer(sqlite_url, "c1", ADDRESS)
    settings = make_settings(sqlite_url, smtp_port=smtp_server.port)
    activities = EmailActivities(settings, (family_folder(tmp_path, FAMILY), TEMPLATES))
    email = replace(order_email(), context={**order_email().context, "shop": {"name": "Evil"}})

    with pytest.raises(Exception) as caught:
        await ActivityEnvironment().run(activities.send_email, email)

    assert "reserved names ['shop']" in str(caught.value)
    assert smtp_server.connections == 0


async def test_a_family_missing_one_part_names_the_part_and_the_folders(
    sqlite_url: str, smtp_server: SMTPTestServer, tmp_path: Path
) -> None:
    add_customer(sqlite_url, "c1", ADDRESS)
    settings = make_settings(sqlite_url, smtp_port=smtp_server.port)
    partial = {k: v for k, v in FAMILY.items() if not k.endswith(".html.j2")}
    folder = family_folder(tmp_path, partial)
    activities = EmailActivities(settings, (folder, TEMPLATES))

    with pytest.raises(Exception) as caught:
        await ActivityEnvironment().run(activities.send_email, order_email())

    message = str(caught.value)
    assert "order_thanks.html.j2 not found in" in message
    assert str(folder) in message and str(TEMPLATES) in message
    assert "subject.j2" not in message.split("not found")[0]  # only the missing part
    assert smtp_server.connections == 0


# ---- a product without a name -------------------------------------------------------------------


async def test_a_nameless_product_never_shows_its_id_in_the_subject(
    sqlite_url: str, smtp_server: SMTPTestServer
) -> None:
    add_customer(sqlite_url, "c1", ADDRESS)
    settings = make_settings(sqlite_url, smtp_port=smtp_server.port)
    teapot = CartLine(ProductInfo("pond-teapot", ""), 1)
    base = replace(request(), cart=[teapot], recommendations=[])

    await send(settings, base)
    add_products(sqlite_url, "pond-teapot", name="Pond teapot")
    await send(settings, replace(base, key=f"{JOURNEY}/run-2/cart_email"))

    first, second = (m.message for m in smtp_server.messages)
    assert first["Subject"] == "You left an item in your cart"
    assert "pond-teapot" not in "".join(parts(first))
    assert second["Subject"] == "Still thinking about Pond teapot?"  # the catalogue's name


# ---- the topic rule: one marketing message per cart ---------------------------------------------

TOPIC = "cart:f1ngerpr1nt"


async def send(settings: Settings, email: SendEmailInput) -> SendEmailResult:
    result: SendEmailResult = await ActivityEnvironment().run(
        EmailActivities(settings).send_email, email
    )
    return result


def topical(journey: str, step: str = "cart_email", marketing: bool = True) -> SendEmailInput:
    email = request(f"{journey}/run-1/{step}")
    return replace(email, journey_id=journey, topic=TOPIC, marketing=marketing)


async def test_a_second_marketing_message_on_a_topic_is_skipped_across_journeys(
    database_url: str, smtp_server: SMTPTestServer
) -> None:
    add_customer(database_url, "c1", ADDRESS)
    settings = make_settings(database_url, smtp_port=smtp_server.port)
    cart, browse = topical("cart-abandonment-c1"), topical("browse-abandonment-c1", "browse")

    assert (await send(settings, cart)).status == "sent"
    skipped = await send(settings, browse)
    assert skipped.status == SKIPPED
    assert (await send(settings, browse)).status == SKIPPED  # its retry: still skipped
    assert (await send(settings, cart)).status == "already_sent"  # the same message: sent
    other_topic = replace(topical("browse-abandonment-c1", "other"), topic="cart:another")
    assert (await send(settings, other_topic)).status == "sent"

    assert len(smtp_server.messages) == 2
    row = logged(database_url, browse.key)
    assert row is not None and row.status == SKIPPED and row.topic == TOPIC
    assert row.error is not None and "alice" not in row.error
    sent = logged(database_url, cart.key)
    assert sent is not None and (sent.topic, sent.marketing) == (TOPIC, True)


async def test_the_topic_rule_holds_only_within_the_window(
    database_url: str, smtp_server: SMTPTestServer
) -> None:
    add_customer(database_url, "c1", ADDRESS)
    settings = make_settings(database_url, smtp_port=smtp_server.port, topic_window="P7D")
    cart = topical("cart-abandonment-c1")
    assert (await send(settings, cart)).status == "sent"
    with session(database_url) as s:  # the first message went out eight days ago
        s.exec(
            update(EmailMessage)
            .where(EmailMessage.key == cart.key)  # type: ignore[arg-type]
            .values(created_at=datetime.now(UTC) - timedelta(days=8))
        )

    assert (await send(settings, topical("browse-abandonment-c1", "browse"))).status == "sent"
    assert len(smtp_server.messages) == 2


async def test_transactional_messages_ignore_the_topic_rule(
    database_url: str, smtp_server: SMTPTestServer
) -> None:
    add_customer(database_url, "c1", ADDRESS)
    settings = make_settings(database_url, smtp_port=smtp_server.port)
    cart = topical("cart-abandonment-c1")
    await send(settings, cart)

    receipt = topical("order-confirmation-c1", "confirmation", marketing=False)
    assert (await send(settings, receipt)).status == "sent"
    # A transactional message on the topic does not use it up for marketing either.
    with session(database_url) as s:
        s.exec(
            update(EmailMessage)
            .where(EmailMessage.key == cart.key)  # type: ignore[arg-type]
            .values(created_at=datetime.now(UTC) - timedelta(days=30))
        )
    assert (await send(settings, topical("cart-abandonment-c1", "later"))).status == "sent"
    assert len(smtp_server.messages) == 3


async def test_a_message_on_the_topic_sent_during_the_smtp_conversation_stops_the_next_one(
    database_url: str, smtp_server: SMTPTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B passed its checks while A was still pending; A goes out first: B's claim of DATA
    sees it and B is skipped, its connection dropped before the message."""
    add_customer(database_url, "c1", ADDRESS)
    settings = make_settings(database_url, smtp_port=smtp_server.port)
    cart, browse = topical("cart-abandonment-c1"), topical("browse-abandonment-c1", "browse")
    smtp_server.stall("RCPT")
    first = asyncio.create_task(send(settings, cart))
    await asyncio.wait_for(smtp_server.stalled.wait(), timeout=10)

    later = EmailActivities(settings)
    claim = later.log.claim_data

    def claim_after_the_first_is_sent(email: SendEmailInput, attempt: int) -> bool:
        wait_for_status(database_url, SENT, cart.key)
        return claim(email, attempt)

    monkeypatch.setattr(later.log, "claim_data", claim_after_the_first_is_sent)
    second = asyncio.create_task(ActivityEnvironment().run(later.send_email, browse))
    while smtp_server.holding < 2:
        await asyncio.sleep(0.01)
    smtp_server.release()

    assert (await asyncio.wait_for(first, timeout=10)).status == "sent"
    assert (await asyncio.wait_for(second, timeout=10)).status == SKIPPED
    assert [m.message["X-Kaeru-Journey"] for m in smtp_server.messages] == [cart.journey_id]
    row = logged(database_url, browse.key)
    assert row is not None and row.status == SKIPPED
    assert (await send(settings, browse)).status == SKIPPED  # and so it stays


# ---- the schema: messages logged before topics ---------------------------------------------------


def test_messages_logged_before_topics_read_as_marketing_without_a_topic(
    database_url: str,
) -> None:
    with session(database_url) as s:
        s.add(
            EmailMessage(
                key="old/run-1/cart_email",
                message_id="<m@kaeru.localhost>",
                customer_id="c1",
                journey_id="old",
                step="cart_email",
                to_address=ADDRESS,
                subject="s",
                status=SENT,
                marketing=False,
                topic=TOPIC,
            )
        )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = get_engine(database_url)

    command.downgrade(config, "0007")
    columns = {c["name"] for c in inspect(get_engine(database_url)).get_columns("email_messages")}
    assert not {"marketing", "topic"} & columns
    migrate(database_url)

    row = logged(database_url, "old/run-1/cart_email")
    assert row is not None and (row.marketing, row.topic) == (True, None)
