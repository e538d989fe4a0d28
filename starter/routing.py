"""The routing table: which stored events reach which journeys, and how.

A journey kind appears here once. Events in ``starts_on`` start the customer's journey if none
is live (signal-with-start, so a repeated event never starts a second one); events in
``listens_to`` only reach a live journey (none live is normal: nothing to do). Email opens and
clicks go to exactly the journey that sent the message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kaeru.settings import Settings
from workflows.cart_abandonment import (
    CartAbandonment,
    CartJourneyInput,
    CartJourneySettings,
)
from workflows.kit import (
    AD_CLICKED,
    EMAIL_LINK_CLICKED,
    EMAIL_OPENED,
    ORDER_COMPLETED,
    Journey,
)

#: Events that carry ``properties.journey_id`` and go to that one journey.
TRACKING_EVENTS = frozenset({EMAIL_OPENED, EMAIL_LINK_CLICKED})


@dataclass(frozen=True)
class JourneyRoute:
    """How one journey kind is fed."""

    journey: type[Journey]
    workflow_name: str
    label: str
    starts_on: frozenset[str]
    listens_to: frozenset[str]
    make_input: Callable[[str, Settings], Any]

    @property
    def kind(self) -> str:
        return self.journey.kind

    def workflow_id(self, customer_id: str) -> str:
        return f"{self.kind}-{customer_id}"


def cart_journey_input(customer_id: str, settings: Settings) -> CartJourneyInput:
    """The cart journey's input: every setting that shapes it, fixed at its start."""
    return CartJourneyInput(
        customer_id=customer_id,
        settings=CartJourneySettings(
            email_delay=settings.cart_email_delay.total_seconds(),
            open_wait=settings.cart_open_wait.total_seconds(),
            ad_delay=settings.cart_ad_delay.total_seconds(),
            ad_click_wait=settings.cart_ad_click_wait.total_seconds(),
            offer_delay=settings.cart_offer_delay.total_seconds(),
            offer_wait=settings.cart_offer_wait.total_seconds(),
            coupon_ttl=settings.cart_coupon_ttl.total_seconds(),
            coupon_amount_minor=settings.cart_coupon_amount_minor,
            coupon_currency=settings.cart_coupon_currency,
            cart_url=settings.cart_url,
            recommendations=settings.cart_recommendations,
            empty_grace=settings.cart_empty_grace.total_seconds(),
        ),
    )


#: Every journey kind. A new journey is one entry here and one class in worker.WORKFLOWS.
ROUTES: tuple[JourneyRoute, ...] = (
    JourneyRoute(
        journey=CartAbandonment,
        workflow_name="CartAbandonment",
        label="Cart abandonment",
        starts_on=CartAbandonment.starts_on,
        listens_to=frozenset({ORDER_COMPLETED, AD_CLICKED}),
        make_input=cart_journey_input,
    ),
)


@dataclass(frozen=True)
class Delivery:
    """One signal to send: to ``workflow_id``, starting ``route``'s journey if ``start``."""

    route: JourneyRoute
    workflow_id: str
    start: bool


def deliveries(name: str | None, customer_id: str, properties: dict[str, Any]) -> list[Delivery]:
    """Where an event goes, in order. Empty: no journey cares about it.

    An open or click goes only to a journey of the same customer: a ``journey_id`` naming
    someone else's journey (a forged or mistaken event) is not delivered.
    """
    if name is None:
        return []
    if name in TRACKING_EVENTS:
        journey_id = properties.get("journey_id")
        return [
            Delivery(route, journey_id, start=False)
            for route in ROUTES
            if isinstance(journey_id, str) and journey_id == route.workflow_id(customer_id)
        ]
    found: list[Delivery] = []
    for route in ROUTES:
        if name in route.starts_on:
            found.append(Delivery(route, route.workflow_id(customer_id), start=True))
        elif name in route.listens_to:
            found.append(Delivery(route, route.workflow_id(customer_id), start=False))
    return found
