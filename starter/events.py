"""Reading Segment events: strict JSON, then one checked, normalised event per message.

Nothing here touches the database or the network, so every rule of the ingestion contract
can be read (and tested) in one place. Two kinds of failure:

* :class:`BodyError`: the request body as a whole is unusable (not JSON, not an object, not a
  batch). The API answers 400.
* :class:`EventError`: one event is unusable. A single-event endpoint answers 400; ``/v1/batch``
  lists it under ``rejected`` and keeps the others.

What an event may do depends on the key it came with (README, "Trust model"): an event of the
browser key (public: it ships in web pages) loses the traits that would change a customer's
email or consent, may not be an email open or click, and, as an ``Order Completed``, reaches
journeys without its money and coupon (so it ends marketing at once but counts nothing); links
are stripped from the product names it carries (they reach the customer's cart email, and a
browser key can name any customer). Whatever kaeru removes or changes is noted under the
payload's ``kaeru`` key (one the sender set is dropped).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kaeru.commerce import CART_EVENTS, MAX_ID_LENGTH, ORDER_COMPLETED, clean_product_name
from kaeru.consent import CONSENT_WITHDRAWN, ConsentValueError, consent_from_traits
from kaeru.identity import IDENTITY_MERGED, MERGE_ID_PREFIX, email_problem, normalise_email
from kaeru.models import utcnow
from starter.deps import BROWSER, SERVER, Source
from workflows.kit import AD_CLICKED, EMAIL_LINK_CLICKED, EMAIL_OPENED

#: Event types kaeru accepts. Segment's ``screen``, ``group`` and ``alias`` are refused by name.
EVENT_TYPES = ("track", "identify", "page")
#: Containers nested deeper than this are refused before anything serialises them again
#: (``json``, the Temporal JSON converter and the database driver all recurse).
MAX_DEPTH = 32
#: Longest ``userId`` / ``anonymousId`` / ``messageId`` / event name (the database columns' size)
#: is :data:`kaeru.commerce.MAX_ID_LENGTH`, the one limit of every id kaeru stores.
#: Most UTF-8 bytes of an id. A customer id becomes the workflow id ``<kind>-<id>`` (Temporal:
#: at most 1,000 bytes) and the ``KaeruCustomerId`` search attribute (at most 2,048 bytes as
#: Temporal's JSON encodes it: an emoji takes 12, ``\ud83d\udc38``, a control character 6).
#: 512 UTF-8 bytes and 200 characters keep both within limits whatever the characters (the
#: worst, 104 emoji and 96 control characters, encodes to 1,826 bytes); 171 emoji, within
#: 200 characters, would be refused by Temporal for good.
MAX_ID_BYTES = 512
#: Events whose properties describe one product (Segment e-commerce spec).
PRODUCT_EVENTS = frozenset(
    {"Product Added", "Product Removed", "Product Viewed", "Product Clicked"}
)
#: Events only kaeru's own tracking links may cause (``starter/opens_and_clicks.py`` records them).
TRACKING_EVENTS = frozenset({EMAIL_OPENED, EMAIL_LINK_CLICKED})
#: What an untrusted ``Order Completed`` loses before journeys see it: its money and coupon.
ORDER_MONEY_FIELDS = (
    "total",
    "revenue",
    "subtotal",
    "value",
    "tax",
    "shipping",
    "discount",
    "coupon",
)
#: Parts of a trait name (lower case, letters and digits only) that mark the customer's email
#: or consent: a browser key may not set them (``E-Mail``, ``unsubscribed``, ``emailOptIn``,
#: ``marketing_consent``, ``accepts_marketing``, ``do_not_email``...).
PROTECTED_TRAIT_PARTS = (
    "email",
    "consent",
    "optin",
    "optout",
    "subscri",
    "marketing",
    "donot",
    "gdpr",
    "permission",
    "suppress",
)

#: How the message ids of the withdrawal events kaeru stores begin (``consent:<change id>``,
#: :mod:`starter.consent_changes`); reserved, like the event's name.
CONSENT_ID_PREFIX = "consent:"

_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_ALNUM = re.compile(r"[^a-z0-9]")


class BodyError(Exception):
    """The request body is unusable as a whole (HTTP 400)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class EventError(Exception):
    """One event is unusable (HTTP 400 for a single event, a ``rejected`` entry in a batch)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _NonFinite:
    """Stands in for ``NaN`` / ``Infinity`` / an overflowing float until the event is checked.

    Parsing does not fail on them at once so that, in a batch, only the event holding one is
    rejected and the others are kept.
    """

    def __repr__(self) -> str:
        return "NaN"


_NON_FINITE = _NonFinite()


def _parse_constant(_name: str) -> _NonFinite:
    return _NON_FINITE


def _parse_float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NON_FINITE


def parse_json(body: bytes) -> Any:
    """Parse a request body as UTF-8 JSON.

    Raises:
        BodyError: not UTF-8, not JSON, or nested so deeply that the parser gives up.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError("invalid_json", f"the body is not UTF-8 text: {exc.reason}") from exc
    try:
        return json.loads(text, parse_constant=_parse_constant, parse_float=_parse_float)
    except RecursionError as exc:
        raise BodyError(
            "invalid_json", f"the body is nested too deeply (at most {MAX_DEPTH} levels)"
        ) from exc
    except ValueError as exc:  # JSONDecodeError, or an integer with too many digits
        raise BodyError("invalid_json", f"the body is not valid JSON: {exc}") from exc


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "a string contains a NUL character (\\u0000), which the database cannot store"
    if not text.isascii() and _SURROGATE.search(text):
        return "a string contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)"
    return None


def value_problem(value: Any, max_depth: int = MAX_DEPTH) -> str | None:
    """Why ``value`` (parsed JSON) cannot be stored and routed, or None if it can.

    Refuses ``NaN``/``Infinity``, lone surrogates, NUL characters and nesting deeper than
    ``max_depth`` containers. Iterative, so a hostile document cannot exhaust the stack.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > max_depth:
                return f"the event is nested deeper than {max_depth} levels"
            for key, child in item.items():
                if problem := _string_problem(key):
                    return problem
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            if depth > max_depth:
                return f"the event is nested deeper than {max_depth} levels"
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            if problem := _string_problem(item):
                return problem
        elif item is _NON_FINITE:
            return "NaN and Infinity are not JSON numbers: send null or a string instead"
    return None


@dataclass(frozen=True)
class IncomingEvent:
    """One checked event, ready to store.

    ``name`` is the event name for ``track``, ``Ad Clicked`` for a ``page`` call from the
    retargeting campaign, and None otherwise. ``payload`` is the event as sent (without the
    write key), so nothing the shop said is lost.
    """

    message_id: str
    customer_id: str
    type: str
    name: str | None
    timestamp: datetime
    payload: dict[str, Any]
    #: The key it came with: ``server`` (trusted) or ``browser``.
    source: Source = SERVER
    #: An ``Order Completed`` to store as an order (and redeem its coupon): every server one,
    #: a browser one only with KAERU_TRUST_BROWSER_ORDERS.
    counts_as_order: bool = True
    #: Sent to ``/v1/import`` (history): stored, never routed to journeys.
    imported: bool = False
    #: Made by kaeru at ingestion (what an identity merge stores), not sent by the shop.
    derived: bool = False

    @property
    def trusted(self) -> bool:
        """Sent with the server key: it may write the shared catalogue."""
        return self.source == SERVER

    @property
    def anonymous_id(self) -> str | None:
        """The ``anonymousId`` the event names (``customer_id`` is the ``userId`` if any)."""
        return _named_id(self.payload.get("anonymousId"))

    @property
    def user_id(self) -> str | None:
        """The ``userId`` the event names, if any."""
        return _named_id(self.payload.get("userId"))

    @property
    def properties(self) -> dict[str, Any]:
        return _object(self.payload.get("properties"))

    @property
    def traits(self) -> dict[str, Any]:
        return _object(self.payload.get("traits"))

    @property
    def context(self) -> dict[str, Any]:
        return _object(self.payload.get("context"))


def _named_id(value: Any) -> str | None:
    """An id field of a checked payload as :func:`read_event` read it (empty: absent)."""
    if value is None or isinstance(value, bool) or not str(value).strip():
        return None
    return str(value)


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _identifier(raw: dict[str, Any], field: str) -> str | None:
    """A Segment id field as a string: strings and numbers are accepted, empty means absent."""
    value = raw.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise EventError("invalid_field", f"{field} must be a string or a number")
    text = str(value)
    if not text.strip():
        return None
    if len(text) > MAX_ID_LENGTH:
        raise EventError("invalid_field", f"{field} is longer than {MAX_ID_LENGTH} characters")
    if (size := len(text.encode())) > MAX_ID_BYTES:
        raise EventError(
            "invalid_field",
            f"{field} is {size} bytes in UTF-8, over the limit of {MAX_ID_BYTES}: it names the "
            "journey's workflow id (Temporal: at most 1,000 bytes) and the KaeruCustomerId "
            "search attribute (at most 2,048 bytes as Temporal encodes it; an emoji takes 12). "
            "Use a shorter id",
        )
    return text


def _timestamp(raw: dict[str, Any], now: datetime) -> datetime:
    """The event's ``timestamp`` (UTC), or ``now`` without one."""
    value = raw.get("timestamp")
    if value is None:
        return now
    if not isinstance(value, str):
        raise EventError("invalid_field", "timestamp must be an ISO 8601 string")
    try:
        parsed = datetime.fromisoformat(value)
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise EventError(
            "invalid_field", f"timestamp {value[:40]!r} is not ISO 8601 (2024-05-01T12:00:00Z)"
        ) from exc


def is_ad_click(event_type: str, payload: dict[str, Any], ad_campaign: str) -> bool:
    """A ``page`` call whose UTM campaign (``context.campaign.name``) is the retargeting one."""
    if event_type != "page":
        return False
    campaign = _object(payload.get("context")).get("campaign")
    return isinstance(campaign, dict) and campaign.get("name") == ad_campaign


def read_event(
    raw: Any,
    *,
    ad_campaign: str,
    event_type: str | None = None,
    shared_context: dict[str, Any] | None = None,
    now: datetime | None = None,
    max_bytes: int | None = None,
    source: Source = SERVER,
    trust_browser_orders: bool = False,
    max_clock_skew: float | None = None,
    imported: bool = False,
) -> IncomingEvent:
    """Check and normalise one Segment event.

    Args:
        raw: the parsed event.
        ad_campaign: the UTM campaign name that marks a retargeting-ad click.
        event_type: the type the endpoint implies (``/v1/track``...); None in a batch, where
            each event names its own ``type``.
        shared_context: a batch's top-level ``context``, under each event's own.
        now: the time of receipt, used when the event has no ``timestamp``.
        max_bytes: the size limit of one event in a batch (a single event's limit is the
            body's, checked before parsing).
        source: the key the event came with; ``browser`` limits what it may do (module doc).
        trust_browser_orders: KAERU_TRUST_BROWSER_ORDERS: a browser ``Order Completed`` keeps
            its money and coupon and is stored as an order.
        max_clock_skew: seconds a ``timestamp`` may be ahead of ``now``; further ahead it is
            clamped to ``now`` (the original stays in the payload), so a future timestamp
            never orders an event ahead of real ones. None: no clamp.
        imported: the event comes through ``/v1/import`` (history; never routed).

    Raises:
        EventError: the event breaks the contract; the message says which field and why.
    """
    if not isinstance(raw, dict):
        raise EventError("invalid_event", "an event must be a JSON object")
    if problem := value_problem(raw):
        raise EventError("invalid_event", problem)
    if max_bytes is not None and (size := encoded_size(raw)) > max_bytes:
        raise EventError(
            "payload_too_large", f"the event is {size} bytes, over the limit of {max_bytes}"
        )
    declared = raw.get("type")
    if event_type is None:
        if not isinstance(declared, str):
            raise EventError("invalid_field", f"type must be one of {', '.join(EVENT_TYPES)}")
        if declared not in EVENT_TYPES:
            raise EventError(
                "unsupported_type",
                f"type {declared[:40]!r} is not supported: kaeru accepts {', '.join(EVENT_TYPES)}",
            )
        event_type = declared
    for field in ("properties", "traits", "context"):
        if raw.get(field) is not None and not isinstance(raw[field], dict):
            raise EventError("invalid_field", f"{field} must be a JSON object")
    customer_id = _identifier(raw, "userId") or _identifier(raw, "anonymousId")
    if customer_id is None:
        raise EventError("missing_id", "every event needs a userId or an anonymousId")
    message_id = _identifier(raw, "messageId") or f"kaeru-{uuid.uuid4()}"
    name: str | None = None
    if event_type == "track":
        event = raw.get("event")
        if not isinstance(event, str) or not event.strip():
            raise EventError("invalid_field", "a track event needs an event name (a string)")
        if len(event) > MAX_ID_LENGTH:
            raise EventError(
                "invalid_field", f"the event name is longer than {MAX_ID_LENGTH} characters"
            )
        name = event
    if source == BROWSER and name in TRACKING_EVENTS:
        raise EventError(
            "not_allowed",
            f"{name} events come from kaeru's own tracking links; the browser key cannot send "
            "them (a server write key can)",
        )
    if name == IDENTITY_MERGED or message_id.startswith(MERGE_ID_PREFIX):
        raise EventError(
            "not_allowed",
            f"{IDENTITY_MERGED} events and messageIds starting {MERGE_ID_PREFIX!r} are what "
            "kaeru stores when an identify merges an anonymousId into a userId: send that "
            "identify (userId and anonymousId) instead",
        )
    if name == CONSENT_WITHDRAWN or message_id.startswith(CONSENT_ID_PREFIX):
        raise EventError(
            "not_allowed",
            f"{CONSENT_WITHDRAWN} events and messageIds starting {CONSENT_ID_PREFIX!r} are what "
            "kaeru stores when a customer unsubscribes: send an identify with traits."
            "marketing_consent: false, or PUT /v1/customers/{id}/consent, instead",
        )
    received = now or utcnow()
    timestamp = _timestamp(raw, received)
    notes: dict[str, Any] = {}
    if max_clock_skew is not None and (timestamp - received).total_seconds() > max_clock_skew:
        timestamp = received
        notes["timestamp_clamped"] = True
    payload = {key: value for key, value in raw.items() if key not in ("writeKey", "kaeru")}
    payload["type"] = event_type
    payload["messageId"] = message_id
    if shared_context:
        payload["context"] = {**shared_context, **_object(raw.get("context"))}
    counts_as_order = True
    if source == BROWSER:
        if dropped := _drop_protected_traits(payload, event_type):
            notes["dropped"] = dropped
        if event_type == "track" and _clean_names(payload, product_event=name in PRODUCT_EVENTS):
            notes["names_cleaned"] = True
        if name == ORDER_COMPLETED and not trust_browser_orders:
            counts_as_order = False
            if withheld := _withhold_money(payload):
                notes["withheld"] = withheld
    else:
        _check_emails(payload, event_type)
        if event_type == "identify":
            _check_consent(payload)
    if imported:
        notes["imported"] = True
    if notes:
        payload["kaeru"] = notes
    if is_ad_click(event_type, payload, ad_campaign):
        name = AD_CLICKED
    return IncomingEvent(
        message_id=message_id,
        customer_id=customer_id,
        type=event_type,
        name=name,
        timestamp=timestamp,
        payload=payload,
        source=source,
        counts_as_order=counts_as_order,
        imported=imported,
    )


def is_protected_trait(key: str) -> bool:
    """A trait that names the customer's email or consent (:data:`PROTECTED_TRAIT_PARTS`)."""
    folded = _NOT_ALNUM.sub("", key.lower())
    return any(part in folded for part in PROTECTED_TRAIT_PARTS)


def _drop_protected_traits(payload: dict[str, Any], event_type: str) -> list[str]:
    """Remove email and consent traits (of an identify, and ``context.traits``); their paths."""
    dropped: list[str] = []
    places: list[tuple[str, dict[str, Any]]] = []
    if event_type == "identify" and isinstance(payload.get("traits"), dict):
        payload["traits"] = dict(payload["traits"])
        places.append(("traits", payload["traits"]))
    context = payload.get("context")
    if isinstance(context, dict) and isinstance(context.get("traits"), dict):
        payload["context"] = {**context, "traits": dict(context["traits"])}
        places.append(("context.traits", payload["context"]["traits"]))
    for where, traits in places:
        for key in [k for k in traits if is_protected_trait(k)]:
            del traits[key]
            dropped.append(f"{where}.{key}")
    return dropped


def _clean_names(payload: dict[str, Any], *, product_event: bool) -> bool:
    """Strip links from the product names of an untrusted event; True if one changed."""
    properties = dict(_object(payload.get("properties")))
    changed = False

    def cleaned(item: dict[str, Any]) -> dict[str, Any]:
        nonlocal changed
        name = item.get("name")
        if not isinstance(name, str) or (clean := clean_product_name(name)) == name:
            return item
        changed = True
        rest = {key: value for key, value in item.items() if key != "name"}
        return rest if clean is None else {**rest, "name": clean}

    if product_event:
        properties = cleaned(properties)
    items = properties.get("products")
    if isinstance(items, list):
        properties["products"] = [cleaned(i) if isinstance(i, dict) else i for i in items]
    if changed:
        payload["properties"] = properties
    return changed


def _withhold_money(payload: dict[str, Any]) -> dict[str, Any]:
    """Take an untrusted order's money and coupon out of its properties; what was taken."""
    properties = dict(_object(payload.get("properties")))
    withheld = {key: properties.pop(key) for key in ORDER_MONEY_FIELDS if key in properties}
    items = properties.get("products")
    if isinstance(items, list):
        prices = [item.get("price") if isinstance(item, dict) else None for item in items]
        properties["products"] = [
            {k: v for k, v in item.items() if k != "price"} if isinstance(item, dict) else item
            for item in items
        ]
        if any(price is not None for price in prices):
            withheld["product_prices"] = prices
    payload["properties"] = properties
    return withheld


def _check_emails(payload: dict[str, Any], event_type: str) -> None:
    """Refuse an event whose ``traits.email`` / ``context.traits.email`` is not an address."""
    places = [("context.traits.email", _object(_object(payload.get("context")).get("traits")))]
    if event_type == "identify":
        places.insert(0, ("traits.email", _object(payload.get("traits"))))
    for where, traits in places:
        value = traits.get("email")
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if (problem := email_problem(value)) is not None:
            raise EventError(
                "invalid_email",
                f"{where} is not an email address kaeru can send to ({problem}); send a "
                "single address such as ann@example.com, or leave the trait out",
            )


def _check_consent(payload: dict[str, Any]) -> None:
    """Refuse an identify whose consent traits are neither true nor false (the trait named)."""
    try:
        consent_from_traits(_object(payload.get("traits")))
    except ConsentValueError as exc:
        raise EventError("invalid_consent", str(exc)) from exc


def encoded_size(value: Any) -> int:
    """Bytes ``value`` takes as compact UTF-8 JSON (how an event in a batch is measured)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def stated_email(event: IncomingEvent) -> str | None:
    """The email address an event tells: ``traits.email`` or ``context.traits.email``."""
    for traits in (event.traits if event.type == "identify" else {}, event.context.get("traits")):
        if isinstance(traits, dict) and (email := normalise_email(traits.get("email"))):
            return email
    return None


def journey_properties(event_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    """What a journey receives as the event's properties.

    ``track``: its properties; a cart event's also ``cart``, the customer's whole cart after
    it as ingestion stored it. ``page``: its properties plus the page name and the UTM
    campaign, so an ad click says which campaign brought the shopper back. ``identify``:
    ``changed_traits``, the names (never the values) of the traits it set new or changed,
    ``email`` included when the address was first set or changed.

    ``cart`` and ``changed_traits`` come from the payload's ``kaeru`` notes, which only kaeru
    writes (a sender's ``kaeru`` key is dropped at the door).
    """
    notes = _object(payload.get("kaeru"))
    if event_type == "identify":
        changed = notes.get("changed_traits")
        return {"changed_traits": list(changed) if isinstance(changed, list) else []}
    properties = dict(_object(payload.get("properties")))
    if event_type == "track" and payload.get("event") in CART_EVENTS:
        if isinstance(cart := notes.get("cart"), list):
            properties["cart"] = cart
    if event_type == "page":
        campaign = _object(payload.get("context")).get("campaign")
        if isinstance(campaign, dict):
            properties["campaign"] = campaign
        if isinstance(payload.get("name"), str):
            properties.setdefault("page", payload["name"])
    return properties


# ---- schemas for /openapi.json (documentation; the checks above are what the API enforces) ----


class _SegmentMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    userId: str | int | None = Field(None, description="the shop's id of the customer")
    anonymousId: str | int | None = Field(None, description="used until the customer is known")
    messageId: str | None = Field(
        None, description="unique per event; a repeated messageId is accepted and stored once"
    )
    timestamp: datetime | None = Field(None, description="ISO 8601; default: time of receipt")
    context: dict[str, Any] | None = Field(
        None, description="context.traits.email names the customer; context.campaign is UTM"
    )
    writeKey: str | None = Field(None, description="alternative to HTTP Basic auth")


class TrackEvent(_SegmentMessage):
    """A Segment ``track`` call (``Product Added``, ``Order Completed``, ``Ad Clicked``...)."""

    type: Literal["track"] = "track"
    event: str = Field(max_length=MAX_ID_LENGTH)
    properties: dict[str, Any] | None = None


class IdentifyEvent(_SegmentMessage):
    """A Segment ``identify`` call; ``traits.email`` is where journeys send email."""

    type: Literal["identify"] = "identify"
    traits: dict[str, Any] | None = None


class PageEvent(_SegmentMessage):
    """A Segment ``page`` call; with the retargeting UTM campaign it counts as an ad click."""

    type: Literal["page"] = "page"
    name: str | None = None
    properties: dict[str, Any] | None = None


class BatchBody(BaseModel):
    """A Segment ``batch`` call: up to 500 KB of events, each at most 32 KB."""

    model_config = ConfigDict(extra="allow")

    batch: list[TrackEvent | IdentifyEvent | PageEvent] = Field(
        description="each event names its type: track, identify or page"
    )
    context: dict[str, Any] | None = Field(None, description="merged under each event's context")
    writeKey: str | None = None


class Accepted(BaseModel):
    success: bool = True


class Rejection(BaseModel):
    index: int = Field(description="position of the event in the batch, from 0")
    code: str
    message: str


class BatchAccepted(BaseModel):
    success: bool = True
    accepted: int = Field(description="events stored (a repeated messageId counts, stored once)")
    rejected: list[Rejection] = Field(default_factory=list)


class ErrorBody(BaseModel):
    """Every error answer (the shape ``segment-analytics-python`` reads)."""

    code: str
    message: str
