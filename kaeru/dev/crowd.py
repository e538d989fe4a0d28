"""The demo as ``kaeru dev --demo`` and ``kaeru demo`` play it (:func:`run_demo`): the demo
shopper (kaeru/dev/demo.py) and a crowd of other shoppers who leave carts beside them, so a
newcomer's dashboard has numbers to show (a funnel, revenue recovered online and in the shop,
routes, the cart subject experiment's two arms, a send-time heatmap).

Each crowd shopper is a real customer of the running stack, played over its real API while the
demo shopper's story is told: they sign up, leave a cart, and their cart email arrives in the
mail catcher; then each does what their :class:`Story` says (open the email, click through,
buy online, or buy at the shop's till: an ``Order Completed`` from the ``pos`` channel, as a
shop's point of sale sends one with the server key). Nothing is written to the database behind
the stack's back: every number on the dashboard comes from what the journeys did.
"""

from __future__ import annotations

import asyncio
import html
import re
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
from rich.console import Console
from temporalio.client import Client

from kaeru.dev.demo import CATALOGUE, DemoShopper, DemoTarget
from kaeru.money import to_minor
from kaeru.pseudonyms import read_visible_ids
from kaeru.serving import StackError
from kaeru.settings import Settings
from kaeru.variants import assign
from workflows.cart_abandonment import CartAbandonment
from workflows.kit import JourneyResult

#: The cart journey's experiment the crowd takes part in (``KAERU_CART_EXPERIMENTS``).
SUBJECT_EXPERIMENT = "cart_subject"
#: Tracked links in an email's HTML (``/t/c/<token>``): what a click through fetches.
CLICK_LINK = re.compile(r"""href=["']([^"']+/t/c/[^"']+)["']""")


@dataclass(frozen=True)
class Story:
    """What one crowd shopper does once their cart email arrives."""

    opens: bool
    clicks: bool
    #: ``web`` (online), ``pos`` (the shop's till), or None (never buys).
    buys: str | None
    cart: tuple[str, ...]

    def told(self) -> str:
        if self.buys == "pos":
            return "bought in the shop" + (" after opening the email" if self.opens else "")
        if self.buys == "web":
            return "clicked through and bought online" if self.clicks else "bought online"
        if self.clicks:
            return "clicked through and left"
        return "opened the email and left" if self.opens else "never opened the email"


#: Eight shoppers: three buy online or in the shop after the email, one buys in the shop
#: without opening it, four leave.
STORIES = (
    Story(opens=True, clicks=False, buys="web", cart=("frog-mug",)),
    Story(opens=True, clicks=True, buys="web", cart=("pond-teapot", "moss-sencha")),
    Story(opens=True, clicks=False, buys="pos", cart=("lily-coasters", "frog-mug")),
    Story(opens=False, clicks=False, buys="pos", cart=("rain-candle",)),
    Story(opens=True, clicks=False, buys=None, cart=("moss-sencha",)),
    Story(opens=True, clicks=True, buys=None, cart=("pond-teapot",)),
    Story(opens=False, clicks=False, buys=None, cart=("frog-mug", "rain-candle")),
    Story(opens=False, clicks=False, buys=None, cart=("lily-coasters",)),
)


class CrowdShopper(DemoShopper):
    """One shopper of the crowd: the demo shopper's ways of talking to the stack, their own
    customer id, address and story."""

    def __init__(
        self,
        settings: Settings,
        client: Client,
        target: DemoTarget,
        console: Console,
        http: httpx.AsyncClient,
        *,
        customer_id: str,
        story: Story,
    ) -> None:
        super().__init__(settings, client, target, console, http)
        self.customer_id = customer_id
        self.email = f"{customer_id}@example.com"
        self.story = story
        self.journey_id = self.journey_of(CartAbandonment.kind)

    def identify(self) -> dict[str, Any]:
        return self.event(
            userId=self.customer_id,
            traits={"email": self.email, "name": "Crowd Shopper", "marketing_consent": True},
        )

    async def play(self) -> str:
        """Sign up, leave the cart, wait for the cart email and do what the story says; what
        happened, in words."""
        self.ids = await asyncio.to_thread(read_visible_ids, self.settings)
        self.journey_id = self.journey_of(CartAbandonment.kind)
        await self.post("/v1/identify", self.identify())
        for product_id in self.story.cart:
            await self.post("/v1/track", self.product_added(CATALOGUE[product_id]))
        quiet = self.cart_settings.email_delay
        cart_email = await self.mail("cart_email", quiet + 60)
        if self.story.opens:
            await self.http.get(self.open_pixel(cart_email))
        if self.story.clicks:
            found = CLICK_LINK.search(cart_email.get("html") or "")
            if found is None:
                raise StackError("the cart email has no tracked link (/t/c/...) in its HTML")
            await self.http.get(html.unescape(found.group(1)))
        if self.story.buys is not None:
            await self.order(self.story.buys)
        return self.story.told()

    async def order(self, channel: str) -> None:
        total = sum(CATALOGUE[p].price for p in self.story.cart)
        fields: dict[str, Any] = {}
        if channel != "web":
            # A till's order, as a point of sale sends it with the server key.
            fields["context"] = {
                "library": {"name": "kaeru-demo", "version": "1"},
                "channel": channel,
            }
        await self.post(
            "/v1/track",
            self.event(
                userId=self.customer_id,
                event="Order Completed",
                properties={
                    "order_id": f"{self.customer_id}-order",
                    "total": float(total),
                    "revenue": float(total),
                    "currency": "USD",
                    "products": [self.product(CATALOGUE[p]) for p in self.story.cart],
                },
                **fields,
            ),
        )


def spent(story: Story) -> int:
    """What ``story``'s order comes to, in cents (0: no order)."""
    if story.buys is None:
        return 0
    return sum(to_minor(CATALOGUE[p].price, "USD") for p in story.cart)


def crowd_prefix() -> str:
    """A fresh prefix for the crowd's customer ids whose shoppers land in every arm of the
    cart subject experiment (arms come from a hash of the id: eight random ids all land in
    one arm about once in 128 runs)."""
    experiment = CartAbandonment.experiments[SUBJECT_EXPERIMENT]
    while True:
        prefix = f"crowd-{secrets.token_hex(3)}"
        arms = {
            assign(f"{prefix}-{n}", CartAbandonment.kind, SUBJECT_EXPERIMENT, experiment)
            for n in range(1, len(STORIES) + 1)
        }
        if arms == set(experiment.variants):
            return prefix


async def play_crowd(
    settings: Settings,
    client: Client,
    target: DemoTarget,
    console: Console,
    http: httpx.AsyncClient,
    *,
    prefix: str | None = None,
) -> Counter[str]:
    """Play every story of :data:`STORIES` at once; how many shoppers ended each way.

    Raises:
        StackError: a crowd shopper's cart email did not arrive, or the API refused them.
    """
    prefix = prefix or crowd_prefix()
    shoppers = [
        CrowdShopper(
            settings, client, target, console, http, customer_id=f"{prefix}-{n}", story=story
        )
        for n, story in enumerate(STORIES, start=1)
    ]
    endings = await asyncio.gather(*(shopper.play() for shopper in shoppers))
    return Counter(endings)


async def run_demo(
    settings: Settings, client: Client, target: DemoTarget, console: Console
) -> JourneyResult:
    """Play the demo shopper against the running stack and narrate it, with the crowd
    beside them; then run the operators' report once (when ``KAERU_REPORT_TO`` is set).

    Raises:
        StackError: a part of the stack did not do its step in time; the message says where.
    """
    async with httpx.AsyncClient(timeout=10.0) as http:
        shopper = DemoShopper(settings, client, target, console, http)
        crowd = asyncio.create_task(play_crowd(settings, client, target, console, http))
        try:
            result = await shopper.run()
            endings = await crowd
        finally:
            crowd.cancel()
        told = ", ".join(f"{n} {what}" for what, n in endings.most_common())
        shopper.say(
            f"meanwhile {endings.total()} other shoppers left carts: {told}. The dashboard "
            "shows what they all did (funnel, revenue recovered, routes, the cart subject "
            "experiment, send times); sign in with the admin token",
            f"{target.api_url}/dashboard",
        )
        if settings.report_recipients:
            await shopper.weekly_report()
        shopper.say(
            f"done in {time.monotonic() - shopper.started:.0f}s; another shopper: kaeru demo"
        )
        return result
