"""The demo shopper: a sign-up, a browse, a cart and a purchase, in about half a minute.

``kaeru dev --demo`` shortens the cart journey's waits (unless you set them) and, once the
stack is up, plays a shopper against the real API over HTTP: a few past orders of other
shoppers (so "bought together" has data), an identify (the welcome series starts: its welcome
email arrives), a ``Product Viewed`` (the browse journey starts, and gives way to the cart
journey at the first ``Product Added``), two ``Product Added``; then it waits for the cart
email in the mail catcher, opens it (fetches its pixel, as a mail client would), waits to
join the ad audience, clicks the ad (a ``page`` call with the retargeting UTM campaign),
waits for the coupon email and buys with the coupon: the order confirmation arrives, and the
post-purchase and win-back journeys start waiting (days, by their settings). Every step is
narrated with the link to look at. Meanwhile a crowd of other shoppers (kaeru/dev/crowd.py)
leaves the history the dashboard shows. ``kaeru demo`` runs the same shopper against a
``kaeru dev --demo`` already running.
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any, TypeVar
from xml.sax.saxutils import escape as xml_escape

import httpx
from dotenv import dotenv_values
from fastapi import APIRouter, HTTPException, Response
from rich.console import Console
from rich.text import Text
from sqlmodel import col, select
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError

from kaeru.db import session as db_session
from kaeru.dev.plan import DevPlan, workflow_url
from kaeru.journeys import prefix_of, registry
from kaeru.models import AudienceMember, Touchpoint
from kaeru.money import format_minor, to_minor
from kaeru.pseudonyms import VisibleIds, read_visible_ids
from kaeru.serving import DEV_WRITE_KEY, StackError
from kaeru.settings import Settings
from workflows.browse_abandonment import BrowseAbandonment
from workflows.cart_abandonment import CartAbandonment, CartJourneySettings
from workflows.kit import MACHINE_VERDICT_WAIT, Journey, JourneyResult, JourneyStatus
from workflows.order_confirmation import OrderConfirmation
from workflows.post_purchase import PostPurchase, PostPurchaseSettings
from workflows.report import REPORT_SCHEDULE_ID
from workflows.welcome import Welcome
from workflows.win_back import WinBack, WinBackSettings

T = TypeVar("T")

#: The cart journey's waits during the demo (seconds), unless the person set them; and its
#: subject experiment, so a newcomer's dashboard shows a running one.
DEMO_WAITS: dict[str, str] = {
    "KAERU_CART_EMAIL_DELAY": "10",
    "KAERU_CART_OPEN_WAIT": "60",
    "KAERU_CART_AD_DELAY": "5",
    "KAERU_CART_AD_CLICK_WAIT": "60",
    "KAERU_CART_OFFER_DELAY": "5",
    "KAERU_CART_OFFER_WAIT": "120",
    "KAERU_CART_EXPERIMENTS": "cart_subject",
}
#: Global settings for a demo of minutes: one shopper gets seven journeys' emails within a
#: minute, at whatever hour the demo runs, so the send gate has no caps and no quiet hours;
#: and the operators' report has somebody to go to.
DEMO_GATE: dict[str, int | str] = {
    "KAERU_CAP_PER_DAY": 100,
    "KAERU_CAP_PER_WEEK": 100,
    "KAERU_QUIET_START": "00:00",
    "KAERU_QUIET_END": "00:00",
    # The operators' weekly report goes to the mail catcher; the demo runs it once at its end.
    "KAERU_REPORT_TO": "operators@kaeru-shop.example",
}

SHOPPER_EMAIL = "demo-shopper@example.com"
SHOPPER_NAME = "Demo Shopper"
#: The whole demo gives up after this; with the demo waits it takes about half a minute.
DEADLINE = 115.0
#: The product the shopper looks at before the cart (the browse journey's start).
BROWSED = "frog-mug"
COUPON_CODE = re.compile(r"\bKAERU-[A-Z0-9]{4,}\b")
OPEN_PIXEL = re.compile(r"""src=["']([^"']+/t/o/[^"']+)["']""")


def with_demo_waits(settings: Settings) -> Settings:
    """Give the cart journey the demo's short waits, and the send gate no caps and no quiet
    hours, wherever the person did not set them in the environment or ``.env`` (journey
    settings are read from there: kaeru/journeys.py); returns the settings with the gate's."""
    in_file = {name.upper() for name in dotenv_values(".env")}
    for variable, value in DEMO_WAITS.items():
        if variable not in in_file:
            os.environ.setdefault(variable, value)
    registry.cache_clear()
    gate = {
        variable.removeprefix("KAERU_").lower(): value
        for variable, value in DEMO_GATE.items()
        if variable not in in_file and variable not in os.environ
    }
    # A copy, not a new validation: what was set stays told apart from defaults (plan_dev
    # fills in what was not set, such as the public URL).
    return settings.model_copy(update=gate)


def in_words(seconds: float) -> str:
    """A wait as a person says it: ``7 days``, ``4 hours``, ``90 seconds``."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = round(seconds / size)
            return f"{count} {unit}{'' if count == 1 else 's'}"
    count = round(seconds)
    return f"{count} second{'' if count == 1 else 's'}"


# ---- the demo shop's catalogue -------------------------------------------------------------


@dataclass(frozen=True)
class DemoProduct:
    product_id: str
    name: str
    price: Decimal
    colour: str

    def image_svg(self) -> str:
        """A small picture of the product, so the demo needs no internet."""
        label = xml_escape(self.name.split(",")[0])
        return (
            '<svg xmlns="http://www.w3.org/2000/svg" width="160" height="160" '
            'viewBox="0 0 160 160">'
            f'<rect width="160" height="160" rx="18" fill="{self.colour}"/>'
            '<circle cx="80" cy="66" r="34" fill="#ffffff" fill-opacity=".85"/>'
            '<circle cx="68" cy="58" r="5" fill="#1d2a22"/><circle cx="92" cy="58" r="5" '
            'fill="#1d2a22"/>'
            '<path d="M64 78 q16 12 32 0" stroke="#1d2a22" stroke-width="4" fill="none" '
            'stroke-linecap="round"/>'
            '<text x="80" y="134" font-family="sans-serif" font-size="13" text-anchor="middle" '
            f'fill="#1d2a22">{label}</text></svg>'
        )


CATALOGUE = {
    p.product_id: p
    for p in (
        DemoProduct("frog-mug", "Kaeru Frog Mug", Decimal("18.00"), "#9fd8a8"),
        DemoProduct("pond-teapot", "Pond Glass Teapot", Decimal("34.00"), "#a8cfe6"),
        DemoProduct("moss-sencha", "Moss Sencha, 100 g", Decimal("9.50"), "#c6dc8c"),
        DemoProduct("lily-coasters", "Lily Pad Coasters", Decimal("12.00"), "#e6c8a8"),
        DemoProduct("rain-candle", "Rainy Day Candle", Decimal("16.00"), "#c8b8e6"),
    )
}
CART = ("frog-mug", "pond-teapot")
#: Orders of other shoppers: the mug and the teapot are often bought with sencha.
PAST_ORDERS = (
    ("frog-mug", "moss-sencha"),
    ("pond-teapot", "moss-sencha", "lily-coasters"),
    ("frog-mug", "lily-coasters"),
    ("frog-mug", "pond-teapot", "moss-sencha"),
    ("rain-candle", "frog-mug"),
)


def assets_router() -> APIRouter:
    """Serves the demo products' pictures (mounted on the mail inbox's server)."""
    router = APIRouter(include_in_schema=False)

    @router.get("/demo/products/{product_id}.svg")
    def product_image(product_id: str) -> Response:
        product = CATALOGUE.get(product_id)
        if product is None:
            raise HTTPException(404, "no such demo product")
        return Response(product.image_svg(), media_type="image/svg+xml")

    return router


# ---- where the demo talks to -----------------------------------------------------------------


@dataclass(frozen=True)
class DemoTarget:
    """The running stack's addresses, as a person on this machine reaches them."""

    api_url: str
    write_key: str
    inbox_url: str
    #: The admin API's token; None: read the audience from the database instead.
    operator_token: str | None
    temporal_ui_url: str | None
    namespace: str

    @classmethod
    def for_plan(cls, plan: DevPlan, *, same_process: bool = True) -> DemoTarget:
        """Where ``plan``'s stack is. ``same_process``: the demo runs in the ``kaeru dev``
        process, so a token it made for this run is the API's (another process has its own)."""
        s = plan.settings
        assert plan.inbox_url is not None
        token = s.operator_token.get_secret_value() if s.operator_token else None
        return cls(
            api_url=plan.api_url,
            write_key=s.write_key.get_secret_value() if s.write_key else DEV_WRITE_KEY,
            operator_token=token if same_process or not plan.dev_operator_token else None,
            inbox_url=plan.inbox_url,
            temporal_ui_url=plan.temporal_ui_url,
            namespace=s.temporal_namespace,
        )


# ---- the shopper -----------------------------------------------------------------------------


class DemoShopper:
    """One shopper. Each run is a new customer id, so new journeys."""

    def __init__(
        self,
        settings: Settings,
        client: Client,
        target: DemoTarget,
        console: Console,
        http: httpx.AsyncClient,
    ) -> None:
        self.settings = settings
        self.client = client
        self.target = target
        self.console = console
        self.http = http
        self.customer_id = f"demo-{secrets.token_hex(3)}"
        #: How the router shows the shopper's id (read as the demo starts; None: in clear).
        self.ids: VisibleIds | None = None
        self.journey_id = self.journey_of(CartAbandonment.kind)
        self.cart_settings: CartJourneySettings = (
            registry().route(CartAbandonment.kind).journey_settings
        )
        self.audience = self.cart_settings.audience
        self.started = time.monotonic()
        self.deadline = self.started + DEADLINE

    # ---- narration ----------------------------------------------------------------------------

    def say(self, line: str, link: str | None = None) -> None:
        elapsed = time.monotonic() - self.started
        text = Text.assemble(
            (f"{datetime.now():%H:%M:%S} ", "dim"),
            (f"+{elapsed:4.1f}s ", "dim"),
            ("demo ", "magenta"),
            line,
        )
        if link:
            text.append(f"\n{' ' * 21}{link}", style="cyan")
        self.console.print(text, soft_wrap=True)

    # ---- the story ----------------------------------------------------------------------------

    async def run(self) -> JourneyResult:
        s = self.cart_settings
        waits = {
            "KAERU_CART_EMAIL_DELAY": s.email_delay,
            "KAERU_CART_AD_DELAY": s.ad_delay,
            "KAERU_CART_OFFER_DELAY": s.offer_delay,
        }
        if sum(waits.values()) > DEADLINE / 2:
            raise StackError(
                f"the demo finishes within {DEADLINE:.0f}s, and {', '.join(waits)} add up to "
                "more than half of that: unset them (`kaeru dev --demo` makes them seconds)"
            )
        self.ids = await asyncio.to_thread(read_visible_ids, self.settings)
        self.journey_id = self.journey_of(CartAbandonment.kind)
        self.say(
            f"a shopper comes by ({SHOPPER_EMAIL}, customer {self.customer_id}); their cart "
            f"journey is the workflow {self.journey_id}"
        )
        await self.post("/v1/batch", {"batch": self.past_orders()})
        self.say(
            f"{len(PAST_ORDERS)} orders of other shoppers are in, so the email can suggest what "
            "is often bought together"
        )
        await self.post("/v1/identify", self.identify())
        if self.is_on(Welcome):
            self.say("signed up with their email address: the welcome series begins")
            welcome = await self.mail("welcome_email", 45, self.journey_of(Welcome.kind))
            self.say(f"welcome email: {welcome['subject']!r}", self.inbox_link(welcome))
        else:
            self.say("signed up with their email address")

        browsing = self.is_on(BrowseAbandonment)
        if browsing:
            browsed = CATALOGUE[BROWSED]
            await self.post("/v1/track", self.product_viewed(browsed))
            self.say(
                f"looked at the {browsed.name}: the browse journey starts, to remind them of it "
                "if they leave without a cart"
            )
        for product_id in CART:
            await self.post("/v1/track", self.product_added(CATALOGUE[product_id]))
        names = " and ".join(CATALOGUE[p].name for p in CART)
        self.say(f"added {names} to the cart, then left")
        if browsing:
            await self.browse_gave_way()

        quiet = s.email_delay
        self.say(f"waiting for the cart email (sent once the cart is quiet for {quiet:.0f}s)")
        cart_email = await self.mail("cart_email", quiet + 45)
        self.say(f"cart email: {cart_email['subject']!r}", self.inbox_link(cart_email))

        pixel = self.open_pixel(cart_email)
        answer = await self.http.get(pixel)
        self.say(f"opened the email (its open pixel answered {answer.status_code})")

        ad_delay = s.ad_delay
        verdict = MACHINE_VERDICT_WAIT.total_seconds()
        self.say(
            f"waiting to join the {self.audience!r} ad audience (after {ad_delay:.0f}s, once the "
            f"open counts as a person's: {verdict:.0f}s, the time a link scanner is given away)"
        )
        await self.until(self.in_audience, ad_delay + 45, "join the ad audience")
        self.say(f"is in the {self.audience!r} audience: the retargeting ad can show")
        await self.post("/v1/page", self.ad_click())
        self.say(
            f"clicked the retargeting ad (a page view from campaign {self.settings.ad_campaign})"
        )

        offer_delay = s.offer_delay
        self.say(f"waiting for the coupon email (after {offer_delay:.0f}s)")
        offer_email = await self.mail("offer_email", offer_delay + 45)
        coupon = self.coupon_code(offer_email)
        self.say(f"coupon email with {coupon}", self.inbox_link(offer_email))

        order = await self.buy(coupon)
        self.say(f"bought the cart with {coupon}: order {order}")
        if self.is_on(OrderConfirmation):
            confirmation = await self.mail(
                "confirmation_email", 45, self.journey_of(OrderConfirmation.kind)
            )
            self.say(
                f"order confirmation for order {self.order_id}: {confirmation['subject']!r}",
                self.inbox_link(confirmation),
            )
        result = await self.outcome()
        await self.after_the_order()
        return result

    def is_on(self, journey: type[Journey[Any]]) -> bool:
        """Whether ``journey`` is switched on; if not, say how to switch it on."""
        if registry().route(journey.kind).enabled:
            return True
        self.say(
            f"({journey.label} is off: KAERU_{prefix_of(journey)}_ENABLED=true switches it on)"
        )
        return False

    async def browse_gave_way(self) -> None:
        """The browse journey ends ``carted`` once the cart journey starts: no browse email."""
        browse = await self.ended(BrowseAbandonment.kind, 30)
        link = self.journey_link(None, self.journey_of(BrowseAbandonment.kind))
        if browse.outcome != "carted":
            raise StackError(
                f"the browse journey ended {browse.outcome!r}, not 'carted', when the shopper "
                f"added to the cart; see {link}"
            )
        self.say(
            "the cart journey took over: the browse journey ended without an email (no "
            "reminder about products already in the cart)",
            link,
        )

    async def after_the_order(self) -> None:
        """Say what the first order ended (the welcome series) and what it started that takes
        days: the post-purchase and win-back journeys (each checked running), with when their
        first email comes."""
        if registry().route(Welcome.kind).enabled:
            welcome = await self.ended(Welcome.kind, 30)
            link = self.journey_link(None, self.journey_of(Welcome.kind))
            if welcome.outcome != "purchased":
                raise StackError(
                    f"the first order did not end the welcome series (it ended "
                    f"{welcome.outcome!r}); see {link}"
                )
            self.say(
                "the first order ended the welcome series: no best-sellers email or "
                "first-purchase coupon will follow",
                link,
            )
        post: PostPurchaseSettings = registry().route(PostPurchase.kind).journey_settings
        back: WinBackSettings = registry().route(WinBack.kind).journey_settings
        waiting: tuple[tuple[type[Journey[Any]], str], ...] = (
            (
                PostPurchase,
                f"asks for a review in {in_words(post.review_delay)} "
                f"(KAERU_{prefix_of(PostPurchase)}_REVIEW_DELAY)",
            ),
            (
                WinBack,
                f"sends a we-miss-you email if no order comes in {in_words(back.after)} "
                f"(KAERU_{prefix_of(WinBack)}_AFTER)",
            ),
        )
        for journey, first in waiting:
            if not self.is_on(journey):
                continue
            workflow_id = self.journey_of(journey.kind)
            name = journey.label[0].lower() + journey.label[1:]
            await self.until(partial(self.running, workflow_id), 30, f"start the {name}")
            self.say(
                f"the order started the {name} journey: it {first}",
                self.journey_link(None, workflow_id),
            )

    async def weekly_report(self) -> None:
        """Run the operators' report schedule now (its period: the week up to this moment)
        and show its email, the same numbers as the dashboard."""
        to = self.settings.report_recipients[0]
        # What the report reads is written by the journeys' own activities, a moment after
        # the narration saw them start (on a loaded machine, seconds): wait until the
        # shopper's cart conversion and each journey's entry are in, or the report would
        # miss them.
        await self.until(self._recorded, 30, "have their journeys recorded for the report")
        # A run's period ends at its TemporalScheduledStartTime, which is whole seconds: the
        # trigger must come in a later second than the last touch, or the period stops short
        # of the shopper's own order.
        await asyncio.sleep(1.1)
        asked = datetime.now(UTC)
        try:
            await self.client.get_schedule_handle(REPORT_SCHEDULE_ID).trigger()
        except RPCError as exc:
            raise StackError(
                f"cannot run the report's schedule {REPORT_SCHEDULE_ID!r} ({exc.message}): the "
                "worker creates it at start when KAERU_REPORT_TO is set"
            ) from exc

        async def arrived() -> dict[str, Any] | None:
            listed = await self.http.get(f"{self.target.inbox_url}/api/messages")
            for m in listed.json():
                received = datetime.fromisoformat(m["received"])
                if to in m.get("to", "") and received >= asked - timedelta(seconds=1):
                    found: dict[str, Any] = m
                    return found
            return None

        report = await self.until(arrived, 45, "get the operators' report")
        self.say(
            f"the operators' weekly report (KAERU_REPORT_TO, a Temporal Schedule; run now): "
            f"{report['subject']!r}",
            self.inbox_link(report),
        )

    # ---- events, as a shop backend sends them -------------------------------------------------

    def event(self, **fields: Any) -> dict[str, Any]:
        return {
            "messageId": f"demo-{uuid.uuid4()}",
            "context": {"library": {"name": "kaeru-demo", "version": "1"}},
            **fields,
        }

    def product(self, p: DemoProduct, quantity: int = 1) -> dict[str, Any]:
        return {
            "product_id": p.product_id,
            "sku": p.product_id.upper(),
            "name": p.name,
            "price": float(p.price),
            "currency": "USD",
            "quantity": quantity,
            "image_url": f"{self.target.inbox_url}/demo/products/{p.product_id}.svg",
            "url": f"{self.settings.shop_url.rstrip('/')}/products/{p.product_id}",
        }

    def past_orders(self) -> list[dict[str, Any]]:
        now = datetime.now(UTC)
        batch = []
        for n, items in enumerate(PAST_ORDERS, start=1):
            products = [self.product(CATALOGUE[p]) for p in items]
            total = sum(CATALOGUE[p].price for p in items)
            batch.append(
                self.event(
                    type="track",
                    userId=f"{self.customer_id}-neighbour-{n}",
                    event="Order Completed",
                    timestamp=(now - timedelta(days=n)).isoformat(),
                    properties={
                        "order_id": f"{self.customer_id}-past-{n}",
                        "total": float(total),
                        "revenue": float(total),
                        "currency": "USD",
                        "products": products,
                    },
                )
            )
        return batch

    def identify(self) -> dict[str, Any]:
        return self.event(
            userId=self.customer_id,
            # Marketing goes only to customers who said yes (KAERU_UNKNOWN_CONSENT_IS_YES).
            traits={"email": SHOPPER_EMAIL, "name": SHOPPER_NAME, "marketing_consent": True},
        )

    def product_viewed(self, p: DemoProduct) -> dict[str, Any]:
        return self.event(
            userId=self.customer_id, event="Product Viewed", properties=self.product(p)
        )

    def product_added(self, p: DemoProduct) -> dict[str, Any]:
        return self.event(
            userId=self.customer_id, event="Product Added", properties=self.product(p)
        )

    def ad_click(self) -> dict[str, Any]:
        campaign = self.settings.ad_campaign
        url = (
            f"{self.settings.cart_url}?utm_source=facebook&utm_medium=paid_social"
            f"&utm_campaign={campaign}"
        )
        return self.event(
            userId=self.customer_id,
            name="Cart",
            properties={"url": url, "title": "Your cart"},
            context={
                "campaign": {"name": campaign, "source": "facebook", "medium": "paid_social"},
                "page": {"url": url},
            },
        )

    async def buy(self, coupon: str) -> str:
        subtotal = sum(to_minor(CATALOGUE[p].price, "USD") for p in CART)
        discount = min(self.cart_settings.coupon_amount_minor, subtotal)
        total = Decimal(subtotal - discount) / 100
        order_id = self.order_id
        await self.post(
            "/v1/track",
            self.event(
                userId=self.customer_id,
                event="Order Completed",
                properties={
                    "order_id": order_id,
                    "total": float(total),
                    "revenue": float(total),
                    "discount": float(Decimal(discount) / 100),
                    "coupon": coupon,
                    "currency": "USD",
                    "products": [self.product(CATALOGUE[p]) for p in CART],
                },
            ),
        )
        return f"{order_id}, {format_minor(subtotal - discount, 'USD')}"

    @property
    def order_id(self) -> str:
        return f"{self.customer_id}-order"

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.target.api_url}{path}"
        try:
            answer = await self.http.post(url, json=body, auth=(self.target.write_key, ""))
        except httpx.HTTPError as exc:
            raise StackError(
                f"cannot reach the API at {self.target.api_url} ({exc}): is `kaeru dev` running?"
            ) from exc
        if answer.status_code == 401:
            raise StackError(
                f"the API refused write key {self.target.write_key!r}: set KAERU_WRITE_KEY to "
                "the key `kaeru dev` printed"
            )
        if answer.status_code >= 300:
            raise StackError(f"the API answered {answer.status_code} to {path}: {answer.text}")
        data: dict[str, Any] = answer.json() if answer.content else {}
        rejected = data.get("rejected") if isinstance(data, dict) else None
        if rejected:
            raise StackError(f"the API rejected demo events: {rejected}")
        return data

    # ---- watching what the journey does ------------------------------------------------------

    async def until(self, check: Callable[[], Awaitable[T | None]], timeout: float, what: str) -> T:
        """Poll ``check`` until it returns something, or fail saying where to look."""
        began = time.monotonic()
        give_up = min(began + timeout, self.deadline)
        while True:
            found = await check()
            if found is not None:
                return found
            if time.monotonic() > give_up:
                raise StackError(
                    f"the shopper did not {what} within {give_up - began:.0f}s. Is `kaeru dev "
                    "--demo` running (plain `kaeru dev` keeps the day-long waits)? "
                    f"The journey: {self.journey_link(None)}"
                )
            await asyncio.sleep(0.5)

    def journey_of(self, kind: str) -> str:
        """The workflow id of this shopper's journey of ``kind``."""
        workflow_id, _ = registry().route(kind).workflow_ids(self.customer_id, self.ids)
        return workflow_id

    async def mail(self, step: str, timeout: float, journey: str | None = None) -> dict[str, Any]:
        """The email of ``step`` from ``journey`` (default: the cart journey), from the mail
        catcher's JSON API."""
        journey_id = journey or self.journey_id

        async def arrived() -> dict[str, Any] | None:
            try:
                listed = await self.http.get(f"{self.target.inbox_url}/api/messages")
            except httpx.HTTPError as exc:
                raise StackError(
                    f"cannot reach the mail catcher at {self.target.inbox_url} ({exc}): "
                    "the demo reads mail there, so KAERU_SMTP_HOST must be unset"
                ) from exc
            for m in listed.json():
                if m.get("journey") == journey_id and m.get("step") == step:
                    detail = await self.http.get(f"{self.target.inbox_url}/api/messages/{m['id']}")
                    message: dict[str, Any] = detail.json()
                    return message
            return None

        what = step.removesuffix("_email").replace("_", " ")
        return await self.until(arrived, timeout, f"get the {what} email")

    def inbox_link(self, message: dict[str, Any]) -> str:
        return f"{self.target.inbox_url}/m/{message['id']}"

    @staticmethod
    def open_pixel(message: dict[str, Any]) -> str:
        found = OPEN_PIXEL.search(message.get("html") or "")
        if found is None:
            raise StackError("the cart email has no open pixel (/t/o/...) in its HTML part")
        return html.unescape(found.group(1))

    @staticmethod
    def coupon_code(message: dict[str, Any]) -> str:
        found = COUPON_CODE.search(message.get("text") or "") or COUPON_CODE.search(
            message.get("html") or ""
        )
        if found is None:
            raise StackError("the offer email carries no KAERU-… coupon code")
        return found.group(0)

    async def in_audience(self) -> bool | None:
        """True once the shopper is in the local ad audience (the API, else the database)."""
        if self.target.operator_token is None:
            return await asyncio.to_thread(self._in_audience_table) or None
        answer = await self.http.get(
            f"{self.target.api_url}/v1/audiences/{self.audience}",
            headers={"Authorization": f"Bearer {self.target.operator_token}"},
        )
        if answer.status_code == 200:
            members = answer.json().get("members", [])
            if any(m.get("customer_id") == self.customer_id for m in members):
                return True
            return None
        return await asyncio.to_thread(self._in_audience_table) or None

    async def _recorded(self) -> bool | None:
        journeys = [self.journey_of(j.kind) for j in (PostPurchase, WinBack) if self.is_on(j)]

        def look() -> bool:
            with db_session(self.settings.resolved_database_url) as s:
                touches = s.exec(
                    select(Touchpoint.journey_id, Touchpoint.kind).where(
                        col(Touchpoint.journey_id).in_([self.journey_id, *journeys])
                    )
                ).all()
            have = set(touches)
            return (self.journey_id, "conversion") in have and all(
                (j, "journey_entered") in have for j in journeys
            )

        return await asyncio.to_thread(look) or None

    def _in_audience_table(self) -> bool:
        with db_session(self.settings.resolved_database_url) as s:
            row = s.exec(
                select(AudienceMember).where(
                    AudienceMember.audience == self.audience,
                    AudienceMember.customer_id == self.customer_id,
                )
            ).first()
        return row is not None

    async def outcome(self) -> JourneyResult:
        handle = self.client.get_workflow_handle(self.journey_id, result_type=JourneyResult)
        remaining = max(self.deadline - time.monotonic(), 5.0)
        try:
            result: JourneyResult = await asyncio.wait_for(handle.result(), remaining)
        except TimeoutError:
            raise StackError(
                f"the journey did not end after the purchase; see {self.journey_link(None)}"
            ) from None
        description = await handle.describe()
        status = await handle.query("status", result_type=JourneyStatus)
        with_coupon = f", with coupon {result.coupon_code}" if result.coupon_code else ""
        self.say(
            f"the cart journey ended: {result.outcome}{with_coupon}",
            self.journey_link(description.run_id),
        )
        for line in status.story:
            self.console.print(Text(f"{' ' * 21}{line}", style="dim"), soft_wrap=True)
        return result

    async def ended(self, kind: str, timeout: float) -> JourneyResult:
        """The result of this shopper's journey of ``kind``, once it ends."""
        workflow_id = self.journey_of(kind)

        async def result() -> JourneyResult | None:
            handle = self.client.get_workflow_handle(workflow_id, result_type=JourneyResult)
            try:
                description = await handle.describe()
            except RPCError:
                return None  # not started yet: the router is on its way
            if description.status == WorkflowExecutionStatus.RUNNING:
                return None
            ended: JourneyResult = await handle.result()
            return ended

        return await self.until(result, timeout, f"end the {kind} journey")

    async def running(self, workflow_id: str) -> bool | None:
        """True once the workflow ``workflow_id`` runs."""
        try:
            description = await self.client.get_workflow_handle(workflow_id).describe()
        except RPCError:
            return None
        return description.status == WorkflowExecutionStatus.RUNNING or None

    def journey_link(self, run_id: str | None, workflow_id: str | None = None) -> str:
        wid = workflow_id or self.journey_id
        ui = self.target.temporal_ui_url
        if ui is None:
            return f"workflow {wid} in your Temporal UI"
        return workflow_url(ui, self.target.namespace, wid, run_id)
