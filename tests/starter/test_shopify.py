"""``POST /v1/webhooks/shopify``: Shopify's webhooks, signed as Shopify signs them, become the
events the Segment API stores, so every journey works for a Shopify shop unchanged.

The payloads are shaped like Shopify's documented examples (REST Admin API webhook bodies:
big integer ids, money as strings, ``email_marketing_consent`` objects).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import col, select
from temporalio.testing import WorkflowEnvironment

from kaeru.consent import CONSENT_WITHDRAWN, EMAIL, SMS, state_of
from kaeru.db import session, write_session
from kaeru.models import CartItem, Consent, Customer, Event, Order, OrderLine
from kaeru.settings import Settings
from starter.app import create_app
from starter.consent_changes import change_consent
from tests.conftest import make_settings
from tests.e2e.test_journey import eventually, free_port, parts, serve
from tests.starter.conftest import asgi_client, count, events
from tests.support.smtp import SMTPTestServer
from worker import build_worker

SECRET = "shpss_0123456789abcdef0123456789abcdef"
OLD_SECRET = "shpss_old_fedcba9876543210fedcba98765432"
PATH = "/v1/webhooks/shopify"
CUSTOMER_ID = 706405506930370084  # over 2**53: Shopify's ids are 64-bit


def sign(body: bytes, secret: str = SECRET) -> str:
    """What Shopify puts in ``X-Shopify-Hmac-Sha256``: base64 of HMAC-SHA256 over the raw body."""
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def headers(
    topic: str, body: bytes, webhook_id: str, secret: str | None = SECRET
) -> dict[str, str]:
    found = {
        "Content-Type": "application/json",
        "X-Shopify-Topic": topic,
        "X-Shopify-Shop-Domain": "tea-house.myshopify.com",
        "X-Shopify-API-Version": "2024-10",
        "X-Shopify-Webhook-Id": webhook_id,
        "X-Shopify-Triggered-At": "2026-12-02T05:00:00.000000000Z",
    }
    if secret is not None:
        found["X-Shopify-Hmac-Sha256"] = sign(body, secret)
    return found


def consent(state: str | None, at: str | None = "2026-11-30T10:00:00-05:00") -> dict[str, Any]:
    return {"state": state, "opt_in_level": "single_opt_in", "consent_updated_at": at}


def customer(**changes: Any) -> dict[str, Any]:
    """A ``customers/create`` / ``customers/update`` body (and a checkout's ``customer``)."""
    body: dict[str, Any] = {
        "id": CUSTOMER_ID,
        "email": "Bob.Norman@Mail.Example.com",
        "created_at": "2026-11-30T09:58:00-05:00",
        "updated_at": "2026-11-30T10:00:00-05:00",
        "first_name": "Bob",
        "last_name": "Norman",
        "orders_count": 0,
        "state": "disabled",
        "total_spent": "0.00",
        "last_order_id": None,
        "note": None,
        "verified_email": True,
        "multipass_identifier": None,
        "tax_exempt": False,
        "tags": "",
        "last_order_name": None,
        "currency": "USD",
        "phone": "+16136120707",
        "addresses": [],
        "tax_exemptions": [],
        "email_marketing_consent": consent("not_subscribed", None),
        "sms_marketing_consent": None,
        "admin_graphql_api_id": f"gid://shopify/Customer/{CUSTOMER_ID}",
        "default_address": None,
    }
    body.update(changes)
    return body


def line_item(product_id: int, title: str, price: str, quantity: int) -> dict[str, Any]:
    return {
        "id": f"line-{product_id}",
        "key": f"line-{product_id}",
        "product_id": product_id,
        "variant_id": product_id * 10 + 1,
        "sku": f"SKU-{product_id}",
        "vendor": "Tea House",
        "title": title,
        "variant_title": "Default",
        "image_url": f"https://cdn.shopify.com/s/files/1/0005/products/{product_id}.png",
        "taxable": True,
        "requires_shipping": True,
        "gift_card": False,
        "price": price,
        "compare_at_price": None,
        "line_price": f"{float(price) * quantity:.2f}",
        "properties": {},
        "quantity": quantity,
        "grams": 567,
        "fulfillment_service": "manual",
        "applied_discounts": [],
        "discount_allocations": [],
        "tax_lines": [],
    }


MUG = line_item(632910392, "Stoneware Mug", "18.00", 2)
POT = line_item(921728736, "Tea Pot", "42.50", 1)


def checkout(**changes: Any) -> dict[str, Any]:
    """A ``checkouts/create`` / ``checkouts/update`` body."""
    body: dict[str, Any] = {
        "id": 981820079255243537,
        "token": "07764317703d958b59f681b7fa09f30e",
        "cart_token": "68778783ad298f1c80c3bafcddeea02f",
        "email": "Bob.Norman@Mail.Example.com",
        "gateway": None,
        "buyer_accepts_marketing": False,
        "created_at": "2026-12-02T04:58:00-05:00",
        "updated_at": "2026-12-02T05:00:00-05:00",
        "landing_site": None,
        "note": None,
        "note_attributes": [],
        "referring_site": None,
        "shipping_lines": [],
        "taxes_included": False,
        "total_weight": 1701,
        "currency": "USD",
        "completed_at": None,
        "closed_at": None,
        "user_id": None,
        "location_id": None,
        "source_identifier": None,
        "source_url": None,
        "device_id": None,
        "phone": None,
        "customer_locale": "en",
        "line_items": [MUG, POT],
        "name": "#981820079255243537",
        "source": None,
        "abandoned_checkout_url": "https://tea-house.myshopify.com/548380009/checkouts/"
        "07764317703d958b59f681b7fa09f30e/recover?key=example",
        "discount_codes": [],
        "tax_lines": [],
        "source_name": "web",
        "presentment_currency": "USD",
        "buyer_accepts_sms": False,
        "sms_marketing_phone": None,
        "total_discounts": "0.00",
        "total_line_items_price": "78.50",
        "total_price": "78.50",
        "total_tax": "0.00",
        "subtotal_price": "78.50",
        "total_duties": None,
        "billing_address": None,
        "shipping_address": None,
        "customer": customer(),
    }
    body.update(changes)
    return body


def order(**changes: Any) -> dict[str, Any]:
    """An ``orders/create`` / ``orders/paid`` body."""
    body: dict[str, Any] = {
        "id": 820982911946154508,
        "admin_graphql_api_id": "gid://shopify/Order/820982911946154508",
        "app_id": None,
        "browser_ip": None,
        "buyer_accepts_marketing": True,
        "cancel_reason": None,
        "cancelled_at": None,
        "cart_token": "68778783ad298f1c80c3bafcddeea02f",
        "checkout_id": 981820079255243537,
        "checkout_token": "07764317703d958b59f681b7fa09f30e",
        "confirmed": True,
        "contact_email": "Bob.Norman@Mail.Example.com",
        "created_at": "2026-12-02T05:10:00-05:00",
        "currency": "USD",
        "current_total_price": "68.50",
        "customer_locale": "en",
        "discount_codes": [{"code": "KAERU-SPRING10", "amount": "10.00", "type": "fixed_amount"}],
        "email": "Bob.Norman@Mail.Example.com",
        "financial_status": "paid",
        "fulfillment_status": None,
        "name": "#1001",
        "number": 1,
        "order_number": 1001,
        "presentment_currency": "USD",
        "processed_at": "2026-12-02T05:10:00-05:00",
        "subtotal_price": "68.50",
        "test": False,
        "total_discounts": "10.00",
        "total_line_items_price": "78.50",
        "total_price": "68.50",
        "total_tax": "0.00",
        "updated_at": "2026-12-02T05:10:01-05:00",
        "billing_address": None,
        "shipping_address": None,
        "customer": customer(),
        "line_items": [
            {
                "id": 866550311766439020,
                "admin_graphql_api_id": "gid://shopify/LineItem/866550311766439020",
                "name": "Stoneware Mug - Default",
                "price": "18.00",
                "product_exists": True,
                "product_id": 632910392,
                "quantity": 2,
                "sku": "SKU-632910392",
                "title": "Stoneware Mug",
                "variant_id": 6329103921,
                "variant_title": "Default",
                "vendor": "Tea House",
            },
            {
                "id": 141249953214522974,
                "admin_graphql_api_id": "gid://shopify/LineItem/141249953214522974",
                "name": "Tea Pot - Default",
                "price": "42.50",
                "product_exists": True,
                "product_id": 921728736,
                "quantity": 1,
                "sku": "SKU-921728736",
                "title": "Tea Pot",
                "variant_id": 9217287361,
                "variant_title": "Default",
                "vendor": "Tea House",
            },
        ],
    }
    body.update(changes)
    return body


def encoded(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


async def deliver(
    api: httpx.AsyncClient,
    topic: str,
    payload: dict[str, Any],
    webhook_id: str,
    secret: str | None = SECRET,
) -> httpx.Response:
    body = encoded(payload)
    return await api.post(PATH, content=body, headers=headers(topic, body, webhook_id, secret))


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url, shopify_webhook_secret=SECRET)


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(create_app(settings, run_router=False)) as client:
        yield client


SHOPPER = f"shopify-{CUSTOMER_ID}"


# ---- signatures ---------------------------------------------------------------------------


async def test_a_signed_webhook_is_accepted(api: httpx.AsyncClient, settings: Settings) -> None:
    answer = await deliver(api, "customers/create", customer(), "wh-1")
    assert answer.status_code == 200, answer.text
    assert answer.json()["stored"] == 1
    assert [e.customer_id for e in events(settings)] == [SHOPPER]


@pytest.mark.parametrize(
    ("why", "signature"),
    [
        ("forged", sign(b"another body")),
        ("wrong secret", sign(encoded(customer()), "not-the-secret")),
        ("not base64", "%%%not-base64%%%"),
        ("empty", ""),
        ("unsigned", None),
    ],
)
async def test_a_forged_or_unsigned_webhook_is_refused_and_nothing_is_stored(
    api: httpx.AsyncClient, settings: Settings, why: str, signature: str | None
) -> None:
    body = encoded(customer())
    sent = headers("customers/create", body, "wh-forged", secret=None)
    if signature is not None:
        sent["X-Shopify-Hmac-Sha256"] = signature
    answer = await api.post(PATH, content=body, headers=sent)
    assert answer.status_code == 401, (why, answer.text)
    assert answer.json()["code"] == "unauthorized"
    assert "X-Shopify-Hmac-Sha256" in answer.json()["message"]
    assert count(settings, Event) == 0 and count(settings, Customer) == 0


async def test_without_a_configured_secret_every_webhook_is_refused(database_url: str) -> None:
    settings = make_settings(database_url)
    async with asgi_client(create_app(settings, run_router=False)) as api:
        answer = await deliver(api, "customers/create", customer(), "wh-1")
    assert answer.status_code == 401
    assert "KAERU_SHOPIFY_WEBHOOK_SECRET" in answer.json()["message"]
    assert count(settings, Event) == 0


async def test_during_a_rotation_both_secrets_verify(database_url: str) -> None:
    settings = make_settings(database_url, shopify_webhook_secret=f"{SECRET}, {OLD_SECRET}")
    async with asgi_client(create_app(settings, run_router=False)) as api:
        new = await deliver(api, "customers/create", customer(), "wh-new")
        old = await deliver(
            api, "customers/update", customer(first_name="Robert"), "wh-old", OLD_SECRET
        )
        other = await deliver(api, "customers/update", customer(), "wh-x", "retired-secret")
    assert (new.status_code, old.status_code, other.status_code) == (200, 200, 401)
    assert len(events(settings)) == 2


async def test_only_the_shops_named_are_read(database_url: str) -> None:
    """One app secret signs every shop the app is installed on."""
    settings = make_settings(
        database_url,
        shopify_webhook_secret=SECRET,
        shopify_shop_domains="other.myshopify.com, Tea-House.myshopify.com",
    )
    async with asgi_client(create_app(settings, run_router=False)) as api:
        ours = await deliver(api, "customers/create", customer(), "wh-ours")
        body = encoded(customer(id=1))
        theirs = headers("customers/create", body, "wh-theirs")
        theirs["X-Shopify-Shop-Domain"] = "someone-else.myshopify.com"
        refused = await api.post(PATH, content=body, headers=theirs)
    assert ours.status_code == 200
    assert refused.status_code == 403 and "KAERU_SHOPIFY_SHOP_DOMAINS" in refused.json()["message"]
    assert [e.customer_id for e in events(settings)] == [SHOPPER]


async def test_the_signature_is_over_the_raw_body_as_sent(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    """Shopify signs its bytes; the same JSON re-serialised differently does not verify."""
    body = json.dumps(customer(), indent=2).encode()
    signed = headers("customers/create", body, "wh-raw")
    assert (await api.post(PATH, content=body, headers=signed)).status_code == 200
    compact = json.dumps(customer(), separators=(",", ":")).encode()
    assert (await api.post(PATH, content=compact, headers=signed)).status_code == 401


# ---- topics → events -------------------------------------------------------------------------


async def test_a_checkout_becomes_the_cart_event_the_cart_journey_starts_on(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    answer = await deliver(api, "checkouts/create", checkout(), "wh-checkout")
    assert answer.status_code == 200, answer.text
    [event] = events(settings)
    assert (event.customer_id, event.type, event.name) == (SHOPPER, "track", "Checkout Started")
    assert event.message_id == "shopify:wh-checkout"
    props = event.payload["properties"]
    assert props["checkout_id"] == "981820079255243537"
    assert props["checkout_url"].endswith("/recover?key=example")
    assert props["currency"] == "USD" and props["value"] == "78.50"
    assert [
        (p["product_id"], p["name"], p["price"], p["quantity"], p["currency"])
        for p in props["products"]
    ] == [
        ("632910392", "Stoneware Mug", "18.00", 2, "USD"),
        ("921728736", "Tea Pot", "42.50", 1, "USD"),
    ]
    assert props["products"][0]["image_url"].startswith("https://cdn.shopify.com/")
    assert event.timestamp == datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    # The cart as the journeys will see it, and the address they send to.
    assert [c["product_id"] for c in event.payload["kaeru"]["cart"]] == ["632910392", "921728736"]
    with session(settings.resolved_database_url) as s:
        cart = s.exec(select(CartItem).order_by(col(CartItem.position))).all()
        profile = s.get(Customer, SHOPPER)
    assert [(c.product_id, c.quantity, c.price_minor) for c in cart] == [
        ("632910392", 2, 1800),
        ("921728736", 1, 4250),
    ]
    assert profile is not None and profile.email == "Bob.Norman@mail.example.com"


async def test_a_checkout_update_restates_the_cart(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    await deliver(api, "checkouts/create", checkout(), "wh-c1")
    later = checkout(line_items=[POT], updated_at="2026-12-02T05:05:00-05:00")
    assert (await deliver(api, "checkouts/update", later, "wh-c2")).status_code == 200
    with session(settings.resolved_database_url) as s:
        cart = s.exec(select(CartItem)).all()
    assert [c.product_id for c in cart] == ["921728736"]


async def test_a_completed_checkout_stores_nothing_its_order_does(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    """A checkout update that carries ``completed_at`` would refill the cart the order empties
    (and start a cart journey after the purchase): the order's own webhook says it."""
    done = checkout(completed_at="2026-12-02T05:10:00-05:00")
    answer = await deliver(api, "checkouts/update", done, "wh-done")
    assert answer.status_code == 200
    assert answer.json()["stored"] == 0 and "completed" in answer.json()["note"]
    assert count(settings, Event) == 0


async def test_a_checkout_update_delivered_after_its_order_stores_nothing(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    """Shopify does not deliver in order: an update sent before the purchase but delivered
    after the order must not refill the cart and start a cart journey for a buyer."""
    await deliver(api, "checkouts/create", checkout(), "wh-c1")
    await deliver(api, "orders/create", order(), "wh-order")
    late = checkout(updated_at="2026-12-02T05:09:00-05:00")
    answer = await deliver(api, "checkouts/update", late, "wh-late")
    assert answer.status_code == 200
    assert answer.json()["stored"] == 0 and "820982911946154508" in answer.json()["note"]
    assert [e.name for e in events(settings)] == ["Checkout Started", "Order Completed"]
    assert count(settings, CartItem) == 0


async def test_an_older_checkout_state_delivered_late_does_not_undo_a_newer_one(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    newer = checkout(line_items=[POT], updated_at="2026-12-02T05:05:00-05:00")
    await deliver(api, "checkouts/update", newer, "wh-new")
    answer = await deliver(api, "checkouts/create", checkout(), "wh-old")
    assert answer.json()["stored"] == 0 and "older" in answer.json()["note"]
    with session(settings.resolved_database_url) as s:
        assert [c.product_id for c in s.exec(select(CartItem)).all()] == ["921728736"]
    # The same state again (Shopify's retry) is no older: it passes, and its id dedupes it.
    again = await deliver(api, "checkouts/update", newer, "wh-new")
    assert again.json()["stored"] == 0 and "repeat" in again.json()["note"]


async def test_a_guest_checkout_is_the_email_and_one_without_anybody_stores_nothing(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    guest = checkout(customer=None, email="Guest@Example.com")
    assert (await deliver(api, "checkouts/create", guest, "wh-guest")).status_code == 200
    assert [e.customer_id for e in events(settings)] == ["Guest@example.com"]
    by_id = checkout(customer=None, customer_id=207119551, email="Bob@Example.com")
    assert (await deliver(api, "checkouts/create", by_id, "wh-by-id")).status_code == 200
    assert [e.customer_id for e in events(settings)] == ["Guest@example.com", "shopify-207119551"]
    nobody = checkout(customer=None, email=None)
    answer = await deliver(api, "checkouts/create", nobody, "wh-nobody")
    assert answer.status_code == 200 and answer.json()["stored"] == 0
    assert "no customer" in answer.json()["note"]
    assert len(events(settings)) == 2


async def test_an_order_becomes_order_completed_and_empties_the_cart(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    await deliver(api, "checkouts/create", checkout(), "wh-c1")
    answer = await deliver(api, "orders/create", order(), "wh-order")
    assert answer.status_code == 200, answer.text
    event = events(settings, name="Order Completed")[0]
    assert event.customer_id == SHOPPER
    props = event.payload["properties"]
    assert (props["order_id"], props["total"], props["currency"]) == (
        "820982911946154508",
        "68.50",
        "USD",
    )
    assert props["coupon"] == "KAERU-SPRING10" and props["discount"] == "10.00"
    assert props["order_name"] == "#1001" and props["checkout_id"] == "981820079255243537"
    assert [(p["product_id"], p["quantity"], p["price"]) for p in props["products"]] == [
        ("632910392", 2, "18.00"),
        ("921728736", 1, "42.50"),
    ]
    with session(settings.resolved_database_url) as s:
        stored = s.get(Order, "820982911946154508")
        lines = s.exec(select(OrderLine)).all()
        cart = s.exec(select(CartItem)).all()
    assert stored is not None and stored.customer_id == SHOPPER
    assert (stored.total_minor, stored.currency, stored.coupon) == (6850, "USD", "KAERU-SPRING10")
    assert sorted((line.product_id, line.quantity) for line in lines) == [
        ("632910392", 2),
        ("921728736", 1),
    ]
    assert cart == []


async def test_orders_create_and_orders_paid_are_one_order(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    first = await deliver(api, "orders/create", order(), "wh-create")
    second = await deliver(api, "orders/paid", order(), "wh-paid")
    assert first.json()["stored"] == 1 and second.json()["stored"] == 0
    assert len(events(settings, name="Order Completed")) == 1
    assert count(settings, Order) == 1 and count(settings, OrderLine) == 2


async def test_a_customer_becomes_identify_with_email_and_names(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    await deliver(api, "customers/create", customer(), "wh-c")
    [event] = events(settings)
    assert (event.type, event.customer_id) == ("identify", SHOPPER)
    traits = event.payload["traits"]
    assert traits["email"] == "Bob.Norman@Mail.Example.com"
    assert (traits["first_name"], traits["last_name"], traits["name"]) == (
        "Bob",
        "Norman",
        "Bob Norman",
    )
    assert "phone" not in traits and "addresses" not in traits
    with session(settings.resolved_database_url) as s:
        profile = s.get(Customer, SHOPPER)
    assert profile is not None and profile.email == "Bob.Norman@mail.example.com"
    assert profile.traits["first_name"] == "Bob"


async def test_the_customer_id_prefix_is_a_setting(database_url: str) -> None:
    settings = make_settings(
        database_url, shopify_webhook_secret=SECRET, shopify_customer_prefix=""
    )
    async with asgi_client(create_app(settings, run_router=False)) as api:
        await deliver(api, "customers/create", customer(), "wh-c")
    assert [e.customer_id for e in events(settings)] == [str(CUSTOMER_ID)]


async def test_a_repeated_webhook_id_has_one_effect(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    unsubscribed = customer(email_marketing_consent=consent("unsubscribed"))
    for _ in range(3):
        answer = await deliver(api, "customers/update", unsubscribed, "wh-same")
        assert answer.status_code == 200
    cart = [await deliver(api, "checkouts/create", checkout(), "wh-cart") for _ in range(2)]
    assert [a.json()["stored"] for a in cart] == [1, 0]
    names = [e.name for e in events(settings)]
    assert names == [None, CONSENT_WITHDRAWN, "Checkout Started"]


async def test_another_topic_is_answered_200_and_nothing_is_stored(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    answer = await deliver(api, "products/update", {"id": 1, "title": "Mug"}, "wh-p")
    assert answer.status_code == 200
    assert answer.json()["stored"] == 0 and "products/update" in answer.json()["note"]
    assert count(settings, Event) == 0


async def test_a_signed_body_that_is_not_a_json_object_is_a_400(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    for body in (b"[1, 2]", b"{not json", b'{"id": NaN}'):
        answer = await api.post(PATH, content=body, headers=headers("customers/update", body, "w"))
        assert answer.status_code == 400, answer.text
        assert answer.json()["code"] in ("invalid_body", "invalid_json", "invalid_event")
    assert count(settings, Event) == 0


# ---- consent ------------------------------------------------------------------------------


def states(settings: Settings, customer_id: str = SHOPPER) -> tuple[str, str]:
    with session(settings.resolved_database_url) as s:
        return state_of(s, customer_id, EMAIL), state_of(s, customer_id, SMS)


@pytest.mark.parametrize(
    ("shopify_state", "kaeru_state"),
    [
        ("subscribed", "subscribed"),
        ("unsubscribed", "unsubscribed"),
        ("redacted", "unsubscribed"),
        ("invalid", "unsubscribed"),
        ("not_subscribed", "unknown"),
        ("pending", "unknown"),
    ],
)
async def test_email_marketing_consent_states(
    api: httpx.AsyncClient, settings: Settings, shopify_state: str, kaeru_state: str
) -> None:
    said = customer(email_marketing_consent=consent(shopify_state))
    assert (await deliver(api, "customers/update", said, "wh-consent")).status_code == 200
    assert states(settings) == (kaeru_state, "unknown")
    with session(settings.resolved_database_url) as s:
        row = s.get(Consent, (SHOPPER, EMAIL))
    if kaeru_state != "unknown":
        assert row is not None and row.source == "shopify"
        assert row.changed_at == datetime(2026, 11, 30, 15, 0, tzinfo=UTC)


async def test_an_unsubscribe_reaches_running_journeys_as_a_withdrawal(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    await deliver(
        api, "customers/update", customer(email_marketing_consent=consent("subscribed")), "a"
    )
    later = consent("unsubscribed", "2026-12-01T10:00:00-05:00")
    answer = await deliver(api, "customers/update", customer(email_marketing_consent=later), "b")
    assert answer.status_code == 200
    [withdrawn] = events(settings, name=CONSENT_WITHDRAWN)
    assert withdrawn.customer_id == SHOPPER and withdrawn.routed_at is None
    assert withdrawn.payload["properties"] == {
        "channel": "email",
        "kind": None,
        "source": "shopify",
    }


async def test_sms_marketing_consent_is_the_sms_channel(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    said = customer(
        email_marketing_consent=consent("subscribed"),
        sms_marketing_consent={**consent("unsubscribed"), "consent_collected_from": "SHOPIFY"},
    )
    await deliver(api, "customers/update", said, "wh-sms")
    assert states(settings) == ("subscribed", "unsubscribed")


@pytest.mark.parametrize(("accepts", "expected"), [(True, "subscribed"), (False, "unsubscribed")])
async def test_the_legacy_accepts_marketing_boolean(
    api: httpx.AsyncClient, settings: Settings, accepts: bool, expected: str
) -> None:
    legacy = customer(
        accepts_marketing=accepts, accepts_marketing_updated_at="2026-11-30T10:00:00-05:00"
    )
    del legacy["email_marketing_consent"]
    await deliver(api, "customers/update", legacy, "wh-legacy")
    assert states(settings)[0] == expected


async def test_email_marketing_consent_wins_over_the_legacy_boolean(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    both = customer(accepts_marketing=True, email_marketing_consent=consent("unsubscribed"))
    await deliver(api, "customers/update", both, "wh-both")
    assert states(settings)[0] == "unsubscribed"


async def test_a_shopify_yes_never_undoes_a_later_no(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    """The shopper unsubscribed through kaeru's link after Shopify last recorded their yes:
    the next customers/update (an address change) still says ``subscribed`` with the old time,
    and must not subscribe them again. A yes given in Shopify after the no does."""
    await deliver(api, "customers/create", customer(), "wh-0")
    with write_session(settings.resolved_database_url) as s:
        change_consent(
            s, SHOPPER, EMAIL, False, "one_click", at=datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
        )
    stale = customer(email_marketing_consent=consent("subscribed", "2026-11-30T10:00:00-05:00"))
    await deliver(api, "customers/update", stale, "wh-1")
    assert states(settings)[0] == "unsubscribed"
    undated = customer(email_marketing_consent=consent("subscribed", None))
    await deliver(api, "customers/update", undated, "wh-2")
    assert states(settings)[0] == "unsubscribed"
    again = customer(email_marketing_consent=consent("subscribed", "2026-12-01T09:00:00-05:00"))
    await deliver(api, "customers/update", again, "wh-3")
    assert states(settings)[0] == "subscribed"


async def test_a_shopify_yes_keeps_a_later_opt_out_of_one_journey_kind(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    """On the preference page the shopper left one kind only; Shopify's older yes, repeated
    with every customers/update, must not subscribe them to it again."""
    with write_session(settings.resolved_database_url) as s:
        at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
        change_consent(s, SHOPPER, EMAIL, False, "preference_page", kind="win-back", at=at)
    stale = customer(email_marketing_consent=consent("subscribed", "2026-11-30T10:00:00-05:00"))
    await deliver(api, "customers/update", stale, "wh-1")
    with session(settings.resolved_database_url) as s:
        row = s.get(Consent, (SHOPPER, EMAIL))
    assert row is not None and row.kinds_off == ["win-back"]


async def test_a_checkouts_customer_consent_counts_too(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    said = checkout(customer=customer(email_marketing_consent=consent("subscribed")))
    await deliver(api, "checkouts/create", said, "wh-c")
    assert states(settings)[0] == "subscribed"


# ---- end to end ------------------------------------------------------------------------------


async def test_a_shopify_checkout_drives_a_cart_journey_to_its_email(
    dev_server_env: WorkflowEnvironment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dev server, real worker, real API on loopback, real SMTP: Shopify's checkouts/create,
    signed, becomes the cart email; a forged one is refused and starts nothing."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with SMTPTestServer() as smtp:
        settings = make_settings(
            f"sqlite:///{tmp_path / 'kaeru.db'}",
            smtp_port=smtp.port,
            public_url=base,
            api_port=port,
            shop_url="https://tea-house.example",
            shopify_webhook_secret=f"{SECRET},{OLD_SECRET}",
        )
        monkeypatch.setenv("KAERU_CART_EMAIL_DELAY", "2")
        monkeypatch.setenv("KAERU_CART_OPEN_WAIT", "60")
        client = dev_server_env.client
        app = create_app(settings, client)
        async with (
            httpx.AsyncClient(base_url=base) as http,
            build_worker(client, settings, http),
            serve(app, port),
        ):
            forged_body = encoded(checkout(customer=customer(id=1, email="eve@example.com")))
            forged = headers("checkouts/create", forged_body, "wh-forged", secret=None)
            forged["X-Shopify-Hmac-Sha256"] = sign(forged_body, "guessed-secret")
            refused = await http.post(PATH, content=forged_body, headers=forged)
            assert refused.status_code == 401

            body = encoded(checkout())
            answer = await http.post(
                PATH, content=body, headers=headers("checkouts/create", body, "wh-1")
            )
            assert answer.status_code == 200, answer.text

            await eventually(lambda: smtp.messages, "the cart email", timeout=90)
            [email] = smtp.messages
            assert email.rcpt_tos == ["Bob.Norman@mail.example.com"]
            _, text = parts(email.message)
            assert "Stoneware Mug" in text and "Tea Pot" in text
            # The journey now waits for an open; end it so nothing outlives the test.
            await client.get_workflow_handle(f"cart-abandonment-{SHOPPER}").terminate("test over")
    with session(settings.resolved_database_url) as s:
        stored = s.exec(select(Event)).all()
    assert {e.customer_id for e in stored} == {SHOPPER}, "the forged webhook stored nothing"
    assert datetime.now(UTC) - timedelta(minutes=5) < stored[0].received_at


async def test_the_webhook_is_documented_without_the_write_key(api: httpx.AsyncClient) -> None:
    schema = (await api.get("/openapi.json")).json()
    operation = schema["paths"][PATH]["post"]
    assert operation["security"] == []
    headers_documented = {p["name"] for p in operation["parameters"]}
    assert {
        "X-Shopify-Hmac-Sha256",
        "X-Shopify-Topic",
        "X-Shopify-Webhook-Id",
    } <= headers_documented
