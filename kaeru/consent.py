"""Marketing consent per customer and channel: what the shopper said, through which source.

A customer's consent on a channel is ``subscribed``, ``unsubscribed`` or ``unknown`` (no row),
with its source and time; every change is kept in ``consent_changes``. Marketing messages go
only to subscribed customers (``KAERU_UNKNOWN_CONSENT_IS_YES`` counts unknown as yes);
transactional ones (an order confirmation) do not ask. A subscribed customer may still have
opted out of single journey kinds on the preference page (``kinds_off``).

Where consent comes from (``source``):

- ``identify``: the traits ``marketing_consent`` (every channel) and
  ``marketing_consent_<channel>`` (``marketing_consent_email``), ``true`` or ``false``;
  a trait beats the general one for its channel;
- ``shopify``: a Shopify customer's ``email_marketing_consent`` / ``sms_marketing_consent``
  (starter/shopify.py, ``POST /v1/webhooks/shopify``);
- ``preference_page`` and ``one_click`` (the unsubscribe link and ``List-Unsubscribe``);
- ``api``: ``PUT /v1/customers/{id}/consent``;
- ``complaint``: a spam complaint unsubscribes as well as suppressing the address.

No I/O but the session given; nothing here is imported by workflow code.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlmodel import Session

from kaeru.models import Consent, ConsentChange, utcnow

EMAIL = "email"
SMS = "sms"
PUSH = "push"
#: Channels consent is kept for: email today; SMS and web push are on the roadmap.
CHANNELS = (EMAIL, SMS, PUSH)

SUBSCRIBED = "subscribed"
UNSUBSCRIBED = "unsubscribed"
UNKNOWN = "unknown"

#: Sources of consent (``Consent.source``, ``ConsentChange.source``).
SOURCES = ("identify", "shopify", "preference_page", "one_click", "api", "complaint", "erase")

#: The event kaeru stores for a customer who unsubscribed (from a channel or one journey kind):
#: the router delivers it to their running journeys. Properties: ``channel``, ``kind`` (None:
#: every kind), ``source``. Reserved: a shop may not send it.
CONSENT_WITHDRAWN = "Marketing Consent Withdrawn"

#: The trait that sets every channel, and the prefix of the per-channel ones.
CONSENT_TRAIT = "marketing_consent"

_TRUE = {"true", "yes", "1", "subscribed", "opted_in"}
_FALSE = {"false", "no", "0", "unsubscribed", "opted_out"}


class ConsentValueError(ValueError):
    """A consent trait whose value is neither true nor false (the API answers 400)."""


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConsentValueError(
        f'traits.{name} must be true or false (or the strings "true"/"false"), not {value!r}'
    )


def consent_from_traits(traits: Mapping[str, Any]) -> dict[str, bool]:
    """The consent an ``identify``'s traits state, per channel (empty: they say nothing).

    ``marketing_consent`` may also be an object ``{"email": true, "sms": false}``.

    Raises:
        ConsentValueError: a consent trait that is neither true nor false, or names an
            unknown channel.
    """
    said: dict[str, bool] = {}
    general = traits.get(CONSENT_TRAIT)
    if isinstance(general, Mapping):
        for channel, value in general.items():
            if channel not in CHANNELS:
                raise ConsentValueError(
                    f"traits.{CONSENT_TRAIT} names the channel {channel!r}; channels are "
                    f"{', '.join(CHANNELS)}"
                )
            said[channel] = _as_bool(f"{CONSENT_TRAIT}.{channel}", value)
    elif general is not None:
        value = _as_bool(CONSENT_TRAIT, general)
        said = dict.fromkeys(CHANNELS, value)
    for channel in CHANNELS:
        name = f"{CONSENT_TRAIT}_{channel}"
        if traits.get(name) is not None:
            said[channel] = _as_bool(name, traits[name])
    return said


def consent_of(s: Session, customer_id: str, channel: str = EMAIL) -> Consent | None:
    """The customer's consent row on ``channel``; None: unknown."""
    return s.get(Consent, (customer_id, channel))


def state_of(s: Session, customer_id: str, channel: str = EMAIL) -> str:
    """``subscribed``, ``unsubscribed`` or ``unknown``."""
    row = consent_of(s, customer_id, channel)
    return row.state if row is not None else UNKNOWN


def set_consent(
    s: Session,
    customer_id: str,
    channel: str,
    subscribed: bool,
    source: str,
    *,
    kind: str | None = None,
    detail: str | None = None,
    at: datetime | None = None,
) -> ConsentChange | None:
    """Record that the customer subscribed to (or unsubscribed from) ``channel``, or from one
    journey ``kind`` on it; the history's new row if that changed anything, else None. The
    caller commits.

    A change for one kind never subscribes the whole channel: opting back in to one kind of a
    customer who is unsubscribed only takes it off ``kinds_off``. Subscribing the channel
    clears ``kinds_off``; unsubscribing it keeps the list (it applies again after a resubscribe
    only through the preference page).
    """
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}; channels are {', '.join(CHANNELS)}")
    if source not in SOURCES:
        raise ValueError(f"unknown consent source {source!r}; sources are {', '.join(SOURCES)}")
    when = at or utcnow()
    state = SUBSCRIBED if subscribed else UNSUBSCRIBED
    row = consent_of(s, customer_id, channel)
    if kind is not None:
        if row is None:
            if subscribed:
                return None  # nothing to opt back in to: consent for the channel is unknown
            row = Consent(customer_id=customer_id, channel=channel, state=UNKNOWN, source=source)
        off = set(row.kinds_off)
        if (kind in off) == (not subscribed):
            return None
        row.kinds_off = sorted(off - {kind}) if subscribed else sorted(off | {kind})
    else:
        if row is not None and row.state == state:
            return None
        if row is None:
            row = Consent(customer_id=customer_id, channel=channel, state=state, source=source)
        row.state = state
        if subscribed:
            row.kinds_off = []
    row.source = source
    row.changed_at = when
    s.add(row)
    change = ConsentChange(
        customer_id=customer_id,
        channel=channel,
        state=state,
        kind=kind,
        source=source,
        detail=detail[:500] if detail else None,
        changed_at=when,
    )
    s.add(change)
    return change


def refusal(
    s: Session,
    customer_id: str,
    *,
    kind: str,
    channel: str = EMAIL,
    unknown_is_yes: bool = False,
) -> str | None:
    """Why a marketing message of journey ``kind`` may not go to the customer on ``channel``;
    None if it may. Words for the message log and the journey's story (no personal data)."""
    row = consent_of(s, customer_id, channel)
    state = row.state if row is not None else UNKNOWN
    if state == UNSUBSCRIBED:
        assert row is not None
        return (
            f"the customer unsubscribed from {channel} marketing ({row.source}, "
            f"{row.changed_at:%Y-%m-%d %H:%M} UTC)"
        )
    if state == UNKNOWN and not unknown_is_yes:
        return (
            f"the customer never consented to {channel} marketing (consent unknown; send "
            f"traits.{CONSENT_TRAIT}: true, or set KAERU_UNKNOWN_CONSENT_IS_YES=true)"
        )
    if row is not None and kind in row.kinds_off:
        return f"the customer opted out of {kind} messages on the preference page"
    return None
