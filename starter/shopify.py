"""Shopify in: ``POST /v1/webhooks/shopify`` turns a shop's webhooks into Segment events.

A Shopify shop connects without code: it (or its app) subscribes the topics of
:data:`TOPICS` to this URL, and each delivery is stored as the events the Segment API would
store for it, through the same checks, dedupe and store (:mod:`starter.events`,
:mod:`starter.ingest`), so every journey works for a Shopify shop unchanged:

- ``checkouts/create`` / ``checkouts/update`` → ``Checkout Started`` with the checkout's line
  items as ``products`` (the cart the cart journey starts on), the email as
  ``context.traits.email``, the recovery link as ``checkout_url``. A checkout that carries
  ``completed_at`` stores nothing: its order's webhook says it, and a cart event after the
  order would refill the cart the order emptied. Shopify does not deliver in order, so the
  newest state of each checkout and the order that completed it are kept
  (``shopify_checkouts``): a checkout webhook older than the state stored, or delivered
  after its order, stores nothing either (:func:`admit_checkout`).
- ``orders/create`` / ``orders/paid`` → ``Order Completed`` (order id, total, currency,
  products, the first discount code as ``coupon``). Its message id is the order's
  (``shopify:order:<id>``), so an order delivered under both topics is one event and one order.
- ``customers/create`` / ``customers/update`` → ``identify`` with the email and names.

Who: ``userId`` is ``KAERU_SHOPIFY_CUSTOMER_PREFIX`` + Shopify's customer id
(``shopify-207119551``): stable whatever the shopper's email becomes. A checkout or order
without a customer (a guest) is the email address as the shop gave it (domain in lower
case); one without either stores nothing.

Consent comes from every customer object (a customer's webhook, a checkout's or an order's
``customer``): ``email_marketing_consent.state`` for email (the legacy ``accepts_marketing``
boolean when it is absent), ``sms_marketing_consent.state`` for SMS; see
:func:`consent_of_customer`. A "yes" from Shopify never undoes a "no" kaeru recorded after it
(the shopper's unsubscribe link is newer than Shopify's record).

Trust: a webhook is Shopify's only when ``X-Shopify-Hmac-Sha256`` is the base64 HMAC-SHA256
of the raw body under one of the secrets of ``KAERU_SHOPIFY_WEBHOOK_SECRET`` (compared in
constant time); anything else is a 401 and stores nothing. An app's client secret signs the
webhooks of every shop the app is installed on: ``KAERU_SHOPIFY_SHOP_DOMAINS`` names the
shops this kaeru serves (another shop's webhook is a 403). Its events are server events
(trusted), as Shopify's servers send them. A repeated ``X-Shopify-Webhook-Id`` (Shopify's
retries) has one effect: it names the events' message ids. Another topic is answered 200 with
nothing stored, so Shopify does not retry it for two days and then drop the subscription.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from sqlmodel import Session

from kaeru.commerce import ORDER_COMPLETED, id_of
from kaeru.consent import EMAIL, SMS, UNSUBSCRIBED, consent_of
from kaeru.db import write_session
from kaeru.identity import email_problem, normalise_email
from kaeru.models import ShopifyCheckout, utcnow
from kaeru.settings import Settings
from starter.consent_changes import change_consent
from starter.deps import SERVER, ApiError, SettingsDep, router_of
from starter.events import (
    BodyError,
    EventError,
    IncomingEvent,
    parse_json,
    read_event,
    value_problem,
)
from starter.ingest import EventStore
from starter.outbox import insert_statement, table_of

log = logging.getLogger("kaeru.shopify")

CHECKOUT_TOPICS = frozenset({"checkouts/create", "checkouts/update"})
ORDER_TOPICS = frozenset({"orders/create", "orders/paid"})
CUSTOMER_TOPICS = frozenset({"customers/create", "customers/update"})
#: The topics kaeru reads; subscribe these.
TOPICS = CHECKOUT_TOPICS | ORDER_TOPICS | CUSTOMER_TOPICS
#: The largest body read (an order of hundreds of line items stays far below it).
MAX_BODY_BYTES = 5 * 1024 * 1024
#: How the message ids of Shopify's events begin.
MESSAGE_ID_PREFIX = "shopify:"

#: Shopify's ``email_marketing_consent.state`` / ``sms_marketing_consent.state`` and what each
#: means for kaeru: True subscribed, False unsubscribed, None no change. ``not_subscribed``
#: (never asked) and ``pending`` (double opt-in not yet confirmed) are no "yes", and no "no"
#: either; ``redacted`` (Shopify erased the customer) and ``invalid`` (the address cannot
#: receive mail) end marketing like an unsubscribe.
CONSENT_STATES: Mapping[str, bool | None] = {
    "subscribed": True,
    "unsubscribed": False,
    "redacted": False,
    "invalid": False,
    "not_subscribed": None,
    "pending": None,
}

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


class WebhookAccepted(BaseModel):
    """What kaeru did with one webhook (always 200, so Shopify does not retry it)."""

    success: bool = True
    stored: int = Field(description="events stored (0 for a repeat, another topic, ...)")
    note: str | None = Field(None, description="why nothing was stored, when nothing was")


# ---- the signature -----------------------------------------------------------------------------


def secrets_of(settings: Settings) -> list[str]:
    """The secrets of ``KAERU_SHOPIFY_WEBHOOK_SECRET`` (comma-separated, blanks dropped)."""
    value = settings.shopify_webhook_secret
    if value is None:
        return []
    return [part.strip() for part in value.get_secret_value().split(",") if part.strip()]


def _refused(reason: str) -> ApiError:
    return ApiError(401, "unauthorized", reason)


def verify(settings: Settings, body: bytes, header: str | None) -> None:
    """Check the webhook's signature against every configured secret.

    Raises:
        ApiError: 401 naming why: no secret configured, no header, or no secret matches.
    """
    secrets = secrets_of(settings)
    if not secrets:
        raise _refused(
            "Shopify webhooks are refused because KAERU_SHOPIFY_WEBHOOK_SECRET is unset: set "
            "it to your app's client secret (Shopify signs webhooks with it) and restart"
        )
    if not header:
        raise _refused("the webhook has no X-Shopify-Hmac-Sha256 header: only Shopify's are read")
    try:
        given = base64.b64decode(header.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _refused("X-Shopify-Hmac-Sha256 is not base64: only Shopify's are read") from exc
    # Every secret is tried (no early exit), so the time taken says nothing about which.
    matched = False
    for secret in secrets:
        expected = hmac.new(secret.encode(), body, hashlib.sha256).digest()
        matched |= hmac.compare_digest(given, expected)
    if not matched:
        raise _refused(
            "X-Shopify-Hmac-Sha256 does not match the body under any secret of "
            "KAERU_SHOPIFY_WEBHOOK_SECRET: the webhook is forged, altered, or signed with a "
            "secret that is not configured (add the new one, comma-separated, during a rotation)"
        )


def check_shop(settings: Settings, domain: str | None) -> None:
    """Refuse a (verified) webhook of a shop ``KAERU_SHOPIFY_SHOP_DOMAINS`` does not name.

    Raises:
        ApiError: 403 naming the shop and the setting (no list set: every shop passes).
    """
    allowed = {d.strip().lower() for d in settings.shopify_shop_domains.split(",") if d.strip()}
    shop = (domain or "").strip().lower()
    if allowed and shop not in allowed:
        raise ApiError(
            403,
            "forbidden",
            f"webhooks of the shop {shop[:100]!r} are not read here: KAERU_SHOPIFY_SHOP_DOMAINS "
            "names the shops this kaeru serves (add it there, or remove the subscription in "
            "that shop)",
        )


async def _raw_body(request: Request) -> bytes:
    """The body as sent (the signature is over these bytes), at most :data:`MAX_BODY_BYTES`."""
    declared = request.headers.get("content-length")
    too_large = ApiError(
        413, "payload_too_large", f"the webhook body is over {MAX_BODY_BYTES} bytes"
    )
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    return bytes(body)


# ---- consent -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShopifyConsent:
    """What a customer object says about one channel."""

    channel: str
    subscribed: bool
    #: Shopify's state, as it said it (``subscribed``, ``redacted``, legacy ``true``...).
    state: str
    #: When the shopper said it (``consent_updated_at``); None when Shopify gives no time.
    at: datetime | None


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def consent_of_customer(customer: Mapping[str, Any]) -> list[ShopifyConsent]:
    """The consent a Shopify customer object states, per channel (:data:`CONSENT_STATES`).

    Email: ``email_marketing_consent.state``; without that object, the legacy
    ``accepts_marketing`` boolean (``false`` counts as a "no": that API cannot tell "never
    asked" from "said no", and kaeru errs on the side that sends nothing). SMS:
    ``sms_marketing_consent.state``. A state Shopify may add later changes nothing.
    """
    said: list[ShopifyConsent] = []
    for channel, field in ((EMAIL, "email_marketing_consent"), (SMS, "sms_marketing_consent")):
        stated = customer.get(field)
        if isinstance(stated, Mapping):
            state = stated.get("state")
            meaning = CONSENT_STATES.get(state) if isinstance(state, str) else None
            if meaning is not None:
                at = _time(stated.get("consent_updated_at"))
                said.append(ShopifyConsent(channel, meaning, str(state), at))
        elif channel == EMAIL and isinstance(legacy := customer.get("accepts_marketing"), bool):
            at = _time(customer.get("accepts_marketing_updated_at"))
            said.append(ShopifyConsent(EMAIL, legacy, str(legacy).lower(), at))
    return said


def apply_consent(
    settings: Settings, customer_id: str, said: list[ShopifyConsent], detail: str
) -> bool:
    """Record what Shopify says (source ``shopify``) in one transaction; True if a channel was
    unsubscribed (its withdrawal event waits for the router). Blocking: call from a thread.

    A "no" always counts. A "yes" counts unless kaeru holds a "no" (to the channel, or to
    journey kinds on the preference page, which a subscribe clears) that is newer than
    Shopify's time for the yes, or Shopify gives no time: a ``customers/update`` for a new
    address still carries the ``subscribed`` the shopper withdrew through kaeru's link since.
    """
    withdrew = False
    with write_session(settings.resolved_database_url) as s:
        for consent in said:
            row = consent_of(s, customer_id, consent.channel)
            said_no = row is not None and (row.state == UNSUBSCRIBED or bool(row.kinds_off))
            if consent.subscribed and row is not None and said_no:
                if consent.at is None or consent.at <= row.changed_at:
                    continue
            change = change_consent(
                s,
                customer_id,
                consent.channel,
                consent.subscribed,
                "shopify",
                detail=f"{detail}: {consent.state}",
                at=consent.at,
            )
            withdrew = withdrew or (change is not None and not consent.subscribed)
    return withdrew


# ---- topics → Segment events ------------------------------------------------------------------


@dataclass(frozen=True)
class Translation:
    """What one webhook becomes: Segment events (raw, for :func:`read_event`), and the
    customer's consent; ``note`` says why there is nothing."""

    events: list[dict[str, Any]]
    customer_id: str | None = None
    consent: tuple[ShopifyConsent, ...] = ()
    note: str | None = None
    #: The checkout a checkout's or an order's webhook is about (:class:`ShopifyCheckout`).
    checkout_id: str | None = None
    #: A checkout's ``updated_at``: which state of it this is.
    checkout_updated_at: datetime | None = None
    #: An order's id: it completes ``checkout_id``.
    order_id: str | None = None


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _usable_email(value: Any) -> str | None:
    """The address as Shopify gave it, when it is one kaeru can send to."""
    return value.strip() if isinstance(value, str) and email_problem(value) is None else None


def customer_id_of(customer: Mapping[str, Any], email: str | None, prefix: str) -> str | None:
    """``<prefix><Shopify customer id>``; a guest's normalised email; None for nobody."""
    if (shopify_id := id_of(customer.get("id"))) is not None:
        return f"{prefix}{shopify_id}"
    return normalise_email(email) if email else None


def _products(items: Any, currency: str) -> list[dict[str, Any]]:
    """Line items as Segment ``products`` (a product id, else the SKU, else the variant)."""
    products: list[dict[str, Any]] = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        product_id = id_of(item.get("product_id")) or id_of(item.get("sku"))
        product_id = product_id or id_of(item.get("variant_id"))
        if product_id is None:
            continue
        product: dict[str, Any] = {
            "product_id": product_id,
            "sku": _text(item.get("sku")),
            "variant": _text(item.get("variant_title")),
            "name": _text(item.get("title")) or _text(item.get("name")),
            "price": item.get("price"),
            "quantity": item.get("quantity"),
            "currency": currency,
        }
        if image := _text(item.get("image_url")):
            # Checkouts give protocol-relative placeholders (``//cdn.shopify.com/...``).
            product["image_url"] = f"https:{image}" if image.startswith("//") else image
        products.append({key: value for key, value in product.items() if value is not None})
    return products


def _discount_codes(payload: Mapping[str, Any]) -> list[str]:
    codes: list[str] = []
    for entry in payload.get("discount_codes") or []:
        code = entry.get("code") if isinstance(entry, dict) else entry
        if (text := id_of(code)) is not None:
            codes.append(text)
    return codes


def _names(customer: Mapping[str, Any]) -> dict[str, str]:
    first, last = _text(customer.get("first_name")), _text(customer.get("last_name"))
    names = {key: value for key, value in (("first_name", first), ("last_name", last)) if value}
    if full := " ".join(part for part in (first, last) if part):
        names["name"] = full
    return names


def translate(
    topic: str, payload: dict[str, Any], message_id: str, settings: Settings
) -> Translation:
    """The Segment events of one webhook of a topic in :data:`TOPICS`."""
    prefix = settings.shopify_customer_prefix
    if topic in CUSTOMER_TOPICS:
        customer, email = payload, _usable_email(payload.get("email"))
    else:
        customer = _object(payload.get("customer"))
        email = _usable_email(payload.get("email")) or _usable_email(customer.get("email"))
    # Checkouts of older API versions name their customer by ``customer_id`` alone.
    known = customer if "id" in customer else {"id": payload.get("customer_id")}
    customer_id = customer_id_of(known, email, prefix)
    if customer_id is None:
        return Translation(
            [], note="no customer: the webhook names neither a Shopify customer nor an email"
        )
    consent = tuple(consent_of_customer(customer)) if customer else ()
    traits = {"email": email} if email else {}
    context: dict[str, Any] = {
        "library": {"name": "kaeru-shopify"},
        "shopify": {"topic": topic},
    }
    base = {"userId": customer_id, "messageId": message_id, "context": context}
    if topic in CUSTOMER_TOPICS:
        identify = {
            **base,
            "type": "identify",
            "timestamp": _text(payload.get("updated_at")) or _text(payload.get("created_at")),
            "traits": {**traits, **_names(customer)},
        }
        return Translation([identify], customer_id, consent)
    context["traits"] = {**traits, **_names(customer)}
    currency = _text(payload.get("currency")) or "USD"
    products = _products(payload.get("line_items"), currency)
    codes = _discount_codes(payload)
    if topic in CHECKOUT_TOPICS:
        if payload.get("completed_at"):
            return Translation(
                [],
                customer_id,
                consent,
                note="a completed checkout: its order's webhook (orders/create) stores the order",
            )
        properties: dict[str, Any] = {
            "checkout_id": id_of(payload.get("id")) or id_of(payload.get("token")),
            "checkout_url": _text(payload.get("abandoned_checkout_url")),
            "value": payload.get("total_price"),
            "currency": currency,
            "coupon": codes[0] if codes else None,
            "products": products,
        }
        track = {
            **base,
            "type": "track",
            "event": "Checkout Started",
            "timestamp": _text(payload.get("updated_at")) or _text(payload.get("created_at")),
            "properties": {k: v for k, v in properties.items() if v is not None},
        }
        return Translation(
            [track],
            customer_id,
            consent,
            checkout_id=properties["checkout_id"],
            checkout_updated_at=_time(payload.get("updated_at")),
        )
    order_id = id_of(payload.get("id"))
    if order_id is None:
        return Translation([], customer_id, consent, note="the order has no id")
    properties = {
        "order_id": order_id,
        "order_name": _text(payload.get("name")),
        "checkout_id": id_of(payload.get("checkout_id")),
        "total": payload.get("total_price"),
        "revenue": payload.get("subtotal_price"),
        "tax": payload.get("total_tax"),
        "discount": payload.get("total_discounts"),
        "coupon": codes[0] if codes else None,
        "discount_codes": codes or None,
        "currency": currency,
        "products": products,
    }
    track = {
        **base,
        # One order, whichever topic (orders/create, orders/paid) or retry brings it.
        "messageId": f"{MESSAGE_ID_PREFIX}order:{order_id}",
        "type": "track",
        "event": ORDER_COMPLETED,
        "timestamp": _text(payload.get("processed_at")) or _text(payload.get("created_at")),
        "properties": {k: v for k, v in properties.items() if v is not None},
    }
    checkout_id = id_of(payload.get("checkout_id")) or id_of(payload.get("checkout_token"))
    return Translation([track], customer_id, consent, checkout_id=checkout_id, order_id=order_id)


def message_id_of(webhook_id: str | None, body: bytes) -> str:
    """``shopify:<X-Shopify-Webhook-Id>``; without the header (Shopify always sends it), the
    body's digest, so the same delivery twice is still one."""
    if webhook_id and webhook_id.strip():
        return f"{MESSAGE_ID_PREFIX}{webhook_id.strip()[:150]}"
    return f"{MESSAGE_ID_PREFIX}sha256:{hashlib.sha256(body).hexdigest()[:40]}"


# ---- checkouts delivered out of order ---------------------------------------------------------


def _checkout_row(s: Session, checkout_id: str) -> ShopifyCheckout:
    """The checkout's row, locked for this transaction (made if it is new)."""
    s.execute(
        insert_statement(s, table_of(ShopifyCheckout)).on_conflict_do_nothing(
            index_elements=["checkout_id"]
        ),
        {"checkout_id": checkout_id, "updated_at": None, "order_id": None, "seen_at": utcnow()},
    )
    row = s.get(ShopifyCheckout, checkout_id, with_for_update=True)
    assert row is not None  # inserted above, or already there
    return row


def admit_checkout(settings: Settings, translation: Translation) -> str | None:
    """Why a checkout's webhook must not be stored, or None (and its state is recorded).

    Refused: a checkout its order already completed, and a state older than the one stored
    (by Shopify's ``updated_at``; the same state again passes, and its message id dedupes).
    An order's webhook records that it completed its checkout. Blocking: call from a thread.
    """
    checkout_id = translation.checkout_id
    if checkout_id is None:
        return None
    with write_session(settings.resolved_database_url) as s:
        row = _checkout_row(s, checkout_id)
        row.seen_at = utcnow()
        if translation.order_id is not None:
            row.order_id = row.order_id or translation.order_id
        elif row.order_id is not None:
            return (
                f"the checkout was completed by order {row.order_id}: a checkout webhook "
                "delivered after its order is not stored"
            )
        else:
            stated, stored = translation.checkout_updated_at, row.updated_at
            if stated is not None and stored is not None and stated < stored:
                return (
                    f"an older state of the checkout (updated_at {stated:%Y-%m-%d %H:%M:%S} "
                    f"UTC) than the one stored ({stored:%Y-%m-%d %H:%M:%S} UTC): not stored"
                )
            if stated is not None:
                row.updated_at = stated
        s.add(row)
    return None


# ---- the endpoint -----------------------------------------------------------------------------


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "signed, but the body is not a JSON object kaeru can read"},
    401: {"description": "unsigned, forged, or KAERU_SHOPIFY_WEBHOOK_SECRET is unset"},
    403: {"description": "a shop KAERU_SHOPIFY_SHOP_DOMAINS does not name"},
    413: {"description": f"the body is over {MAX_BODY_BYTES} bytes"},
}


@router.post(
    "/shopify",
    response_model=WebhookAccepted,
    responses=_ERRORS,
    summary="Shopify webhooks: checkouts, orders and customers become Segment events",
    openapi_extra={
        "security": [],
        "parameters": [
            {
                "name": "X-Shopify-Hmac-Sha256",
                "in": "header",
                "required": True,
                "schema": {"type": "string"},
                "description": "base64 HMAC-SHA256 of the raw body (KAERU_SHOPIFY_WEBHOOK_SECRET)",
            },
            {
                "name": "X-Shopify-Topic",
                "in": "header",
                "required": True,
                "schema": {"type": "string", "enum": sorted(TOPICS)},
                "description": "another topic is answered 200 and stores nothing",
            },
            {
                "name": "X-Shopify-Webhook-Id",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "a repeated id has one effect",
            },
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
    },
)
async def shopify_webhook(request: Request, settings: SettingsDep) -> WebhookAccepted:
    body = await _raw_body(request)
    verify(settings, body, request.headers.get("x-shopify-hmac-sha256"))
    check_shop(settings, request.headers.get("x-shopify-shop-domain"))
    topic = (request.headers.get("x-shopify-topic") or "").strip()
    webhook_id = request.headers.get("x-shopify-webhook-id")
    if topic not in TOPICS:
        log.info("Shopify webhook of topic %r ignored: kaeru does not read it", topic[:60])
        return WebhookAccepted(
            stored=0,
            note=f"topic {topic[:60]!r} is not one kaeru reads ({', '.join(sorted(TOPICS))}): "
            "nothing stored; unsubscribe it in Shopify",
        )
    try:
        payload = parse_json(body)
    except BodyError as exc:
        raise ApiError(400, exc.code, exc.message) from exc
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_body", f"a {topic} webhook body must be a JSON object")
    if problem := value_problem(payload):
        raise ApiError(400, "invalid_event", f"{topic} webhook: {problem}")
    message_id = message_id_of(webhook_id, body)
    translation = translate(topic, payload, message_id, settings)
    try:
        events = [
            read_event(
                raw,
                ad_campaign=settings.ad_campaign,
                source=SERVER,
                max_clock_skew=settings.max_clock_skew,
            )
            for raw in translation.events
        ]
    except EventError as exc:
        raise ApiError(400, exc.code, f"{topic} webhook: {exc.message}") from exc
    note = translation.note
    if events and (refusal := await asyncio.to_thread(admit_checkout, settings, translation)):
        note, events = refusal, []
    stored = await _store(request, events)
    if translation.customer_id is not None and translation.consent:
        withdrew = await asyncio.to_thread(
            apply_consent,
            settings,
            translation.customer_id,
            list(translation.consent),
            f"{topic} {message_id}",
        )
        if withdrew:
            router_of(request).wake()
    if note is None and stored == 0 and events:
        note = "a repeat of a webhook (or an order) already stored: nothing new"
    return WebhookAccepted(stored=stored, note=note)


async def _store(request: Request, events: list[IncomingEvent]) -> int:
    if not events:
        return 0
    store: EventStore = request.app.state.event_store
    result = await store.store(events)
    if result.to_route:
        router_of(request).wake()
    for _, refused in result.rejected:
        raise ApiError(400, refused.code, refused.message)
    return result.stored
