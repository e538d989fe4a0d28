"""Reading Segment events: strict JSON, then one checked, normalised event per message.

Nothing here touches the database or the network, so every rule of the ingestion contract
can be read (and tested) in one place. Two kinds of failure:

* :class:`BodyError`: the request body as a whole is unusable (not JSON, not an object, not a
  batch). The API answers 400.
* :class:`EventError`: one event is unusable. A single-event endpoint answers 400; ``/v1/batch``
  lists it under ``rejected`` and keeps the others.
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

from kaeru.models import utcnow
from workflows.kit import AD_CLICKED

#: Event types kaeru accepts. Segment's ``screen``, ``group`` and ``alias`` are refused by name.
EVENT_TYPES = ("track", "identify", "page")
#: Containers nested deeper than this are refused before anything serialises them again
#: (``json``, the Temporal JSON converter and the database driver all recurse).
MAX_DEPTH = 32
#: Longest ``userId`` / ``anonymousId`` / ``messageId`` / event name (the database columns' size).
MAX_ID_LENGTH = 200
#: Events whose properties describe one product (Segment e-commerce spec).
PRODUCT_EVENTS = frozenset(
    {"Product Added", "Product Removed", "Product Viewed", "Product Clicked"}
)
ORDER_COMPLETED = "Order Completed"

_SURROGATE = re.compile("[\ud800-\udfff]")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


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

    @property
    def properties(self) -> dict[str, Any]:
        return _object(self.payload.get("properties"))

    @property
    def traits(self) -> dict[str, Any]:
        return _object(self.payload.get("traits"))

    @property
    def context(self) -> dict[str, Any]:
        return _object(self.payload.get("context"))


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
    return text


def _timestamp(raw: dict[str, Any], now: datetime) -> datetime:
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
    received = now or utcnow()
    timestamp = _timestamp(raw, received)
    payload = {key: value for key, value in raw.items() if key != "writeKey"}
    payload["type"] = event_type
    payload["messageId"] = message_id
    if shared_context:
        payload["context"] = {**shared_context, **_object(raw.get("context"))}
    if is_ad_click(event_type, payload, ad_campaign):
        name = AD_CLICKED
    return IncomingEvent(
        message_id=message_id,
        customer_id=customer_id,
        type=event_type,
        name=name,
        timestamp=timestamp,
        payload=payload,
    )


def encoded_size(value: Any) -> int:
    """Bytes ``value`` takes as compact UTF-8 JSON (how an event in a batch is measured)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def email_of(event: IncomingEvent) -> str | None:
    """The email address an event tells: ``traits.email`` or ``context.traits.email``."""
    for traits in (event.traits if event.type == "identify" else {}, event.context.get("traits")):
        if isinstance(traits, dict) and (email := normalise_email(traits.get("email"))):
            return email
    return None


def normalise_email(value: Any) -> str | None:
    """A plausible address with its domain in lower case, or None (a light check, no DNS)."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    if len(value) > 320 or not _EMAIL.match(value):
        return None
    local, domain = value.rsplit("@", 1)
    return f"{local}@{domain.lower()}"


def journey_properties(event_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    """What a journey receives as the event's properties.

    ``track``: its properties. ``page``: its properties plus the page name and the UTM
    campaign, so an ad click says which campaign brought the shopper back.
    """
    properties = dict(_object(payload.get("properties")))
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
