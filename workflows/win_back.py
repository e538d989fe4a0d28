"""Win-back: a customer who stopped ordering gets a we-miss-you, then an offer.

A lifecycle journey that lives as long as the customer does. Their first order starts it and
every order sets its clock back; when no order came for ``AFTER``, a we-miss-you email with
products picked for them, and ``OFFER_DELAY`` later (still no order) an offer with a coupon.
Then it waits for their next order, however long: no more mail until one comes and ``AFTER``
passes again. Orders never end it; it continues as new to keep its history small, carrying
its clock, and numbers each lapse so each lapse's messages and coupon have keys of their own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.types import (
        CouponInfo,
        IssueCouponInput,
        ProductInfo,
        RecommendInput,
        RecommendResult,
        SendEmailInput,
    )
    from kaeru.commerce import id_of, order_items_of
    from workflows.kit import (
        ORDER_COMPLETED,
        Journey,
        JourneyEvent,
        JourneyExit,
        JourneyInput,
        JourneyResult,
        setting,
    )

#: Products of the newest order kept to pick recommendations from (the state stays small).
MAX_BOUGHT = 20
MAX_ORDER_ID = 200


@dataclass
class WinBackSettings:
    """What shapes one customer's win-back, fixed when it starts: ``KAERU_WINBACK_<FIELD>``."""

    after: float = field(
        default=60 * 86400.0,
        metadata=setting("no order for this long: the we-miss-you email", duration=True),
    )
    offer_delay: float = field(
        default=14 * 86400.0,
        metadata=setting(
            "after the we-miss-you email, still no order for this long: the offer", duration=True
        ),
    )
    coupon_amount_minor: int = field(
        default=1000, metadata=setting("offer coupon value in minor units (above 0)")
    )
    coupon_currency: str = field(
        default="USD", metadata=setting("offer coupon currency (ISO 4217, e.g. USD or EUR)")
    )
    coupon_ttl: float = field(
        default=14 * 86400.0,
        metadata=setting("how long the offer coupon stays valid", duration=True),
    )
    recommendations: int = field(
        default=3, metadata=setting("products picked for the customer in each email (0 to 12)")
    )
    history_limit: int = field(
        default=2000,
        metadata=setting(
            "continue as new once a journey's history holds this many events (100 or more)"
        ),
    )

    def check(self) -> None:
        """Refuse settings the journey cannot use (the settings reader names the variable)."""
        if self.coupon_amount_minor <= 0:
            raise ValueError("coupon_amount_minor must be above 0, e.g. 1000")
        if len(self.coupon_currency) != 3 or not self.coupon_currency.isalpha():
            raise ValueError("coupon_currency must be an ISO 4217 code such as USD or EUR")
        self.coupon_currency = self.coupon_currency.upper()
        if not 0 <= self.recommendations <= 12:
            raise ValueError("recommendations must be 0 to 12")
        if self.history_limit < 100:
            raise ValueError("history_limit must be 100 or more, e.g. 2000")


@dataclass
class MissYouContext:
    """The we-miss-you email's variables."""

    recommendations: list[ProductInfo]


@dataclass
class OfferContext:
    """The offer email's variables."""

    coupon: CouponInfo
    recommendations: list[ProductInfo]


def _spoken(seconds: float) -> str:
    """A wait as a person says it: "60 days", "5 hours", "30 seconds"."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} seconds"


@workflow.defn(name="WinBack")
class WinBack(Journey[WinBackSettings]):
    kind = "win-back"
    priority = 40  # the send gate's order when caps compete (lower first)
    label = "Win-back"
    starts_on = frozenset({ORDER_COMPLETED})
    ends_on_purchase = False
    settings_class = WinBackSettings
    settings_prefix = "WINBACK"

    # The journey's own state, set as orders come (class defaults are immutable, so shared
    # safely; the kit's ``@workflow.init`` is kept, which keeps its next-journey hand-over).
    #: Orders seen (this run and those before): a wait for "an order" watches it move.
    orders: int = 0
    #: When the newest order reached the journey (epoch seconds, workflow time): the clock.
    last_order_at: float | None = None
    last_order_id: str | None = None
    #: Product ids of the newest order that named any, to pick recommendations from.
    bought: tuple[str, ...] = ()
    #: Lapses so far (no order for ``after``); each one's steps have keys of their own.
    lapses: int = 0
    #: This lapse's mail is sent or under way: only an order starts the clock again.
    lapsed: bool = False
    coupon: CouponInfo | None = None

    @workflow.run
    async def run(self, start: JourneyInput) -> JourneyResult:
        return await self.run_journey(self.steps)

    # ---- continue-as-new ---------------------------------------------------------------------

    def carry(self) -> dict[str, Any]:
        return {
            "orders": self.orders,
            "last_order_at": self.last_order_at,
            "last_order_id": self.last_order_id,
            "bought": list(self.bought),
            "lapses": self.lapses,
            "lapsed": self.lapsed,
        }

    def restore(self, carried: dict[str, Any]) -> None:
        self.orders = int(carried["orders"])
        last = carried.get("last_order_at")
        self.last_order_at = None if last is None else float(last)
        self.last_order_id = carried.get("last_order_id")
        self.bought = tuple(carried.get("bought") or ())
        self.lapses = int(carried["lapses"])
        self.lapsed = bool(carried["lapsed"])

    # ---- the journey -------------------------------------------------------------------------

    async def steps(self) -> JourneyResult:
        s = self.settings
        while True:
            await self.continue_as_new_when_due(s.history_limit)
            since = self.orders
            if self.lapsed:
                # Checked again every ``after``, so a long silence still continues as new.
                await self.within(s.after, lambda: not self.lapsed, "their next order")
                continue
            if self.last_order_at is None:
                self.last_order_at = workflow.now().timestamp()
            quiet_until = self.last_order_at + s.after
            left = quiet_until - workflow.now().timestamp()
            if left > 0:
                # B023: the lambda is awaited within this iteration, so ``since`` cannot move.
                await self.within(left, lambda: self.orders != since, "an order")  # noqa: B023
                continue  # an order moved the clock, or the time is up: look again
            await self.win_back(since)

    async def win_back(self, since: int) -> None:
        """One lapse: the we-miss-you email, then (still no order) the offer; an order at any
        point stops it (the clock starts again)."""
        s = self.settings
        self.lapses += 1
        self.lapsed = True
        self.coupon = None
        self.tell(f"no order for {_spoken(s.after)}: time to say we miss them")
        picks = await self.recommendations()
        if not await self.send("winback_email", "winback_miss_you", MissYouContext(picks)):
            return
        if await self.within(s.offer_delay, lambda: self.orders != since, "an order"):
            return
        self.coupon = await self.run_step(
            "winback_coupon",
            "issue_coupon",
            IssueCouponInput(
                key=self.lapse_key("winback_coupon"),
                journey_id=workflow.info().workflow_id,
                step="winback_coupon",
                customer_id=self.customer_id,
                amount_minor=s.coupon_amount_minor,
                currency=s.coupon_currency,
                ttl_seconds=s.coupon_ttl,
            ),
            CouponInfo,
            lambda c: f"issued coupon {c.code} for the offer",
        )
        if self.orders != since:
            self.tell("they ordered while the coupon was issued: no offer this time")
            return
        offer = OfferContext(self.coupon, picks)
        if await self.send("winback_offer_email", "winback_offer", offer):
            self.tell("no more win-back mail until they order again")

    def lapse_key(self, step: str) -> str:
        """The idempotency key of ``step`` in this lapse: unique across lapses and runs."""
        return self.key(f"{step}/lapse-{self.lapses}")

    async def recommendations(self) -> list[ProductInfo]:
        """Products picked for the customer: bought with what they last bought (never those
        again), topped up with the shop's best-sellers."""
        if self.settings.recommendations <= 0:
            return []
        wanted = RecommendInput(self.customer_id, list(self.bought), self.settings.recommendations)
        try:
            result = await self.call(
                "recommend_products",
                wanted,
                RecommendResult,
                "winback_email",
                deadline=timedelta(minutes=1),
            )
        except JourneyExit:
            return []  # the email goes out without picks rather than not at all
        return result.products

    async def send(self, step: str, template: str, context: Any) -> bool:
        """Send one marketing message of this lapse. False: an order stored since the clock
        last started was found before sending, so it counts as their order and nothing went.

        Raises:
            JourneyExit: the journey must end (no address, a bounce, a merge).
        """
        email = SendEmailInput(
            key=self.lapse_key(step),
            journey_id=workflow.info().workflow_id,
            step=step,
            customer_id=self.customer_id,
            template=template,
            context=asdict(context),
        )
        try:
            await self.send_email(step, email)
        except JourneyExit as exit_:
            if exit_.outcome != "purchased":
                raise
            found, self.purchase = self.purchase, None  # an order is no end here
            when = found.occurred_at if found else workflow.now()
            self.count_order(found.order_id if found else None, when, [])
            return False
        return True

    # ---- orders ------------------------------------------------------------------------------

    def on_event(self, event: JourneyEvent) -> None:
        if event.name != ORDER_COMPLETED:
            return
        props = event.properties
        order_id = id_of(props.get("order_id")) or event.message_id
        bought = [item.product_id for item in order_items_of(props)[:MAX_BOUGHT]]
        self.count_order(order_id[:MAX_ORDER_ID], event.occurred_at, bought)

    def count_order(self, order_id: str | None, placed: datetime, bought: list[str]) -> None:
        """An order: the clock starts again now. One already counted (found before sending,
        then routed) only says so."""
        if order_id is not None and order_id == self.last_order_id:
            self.tell(f"order {order_id} arrived: already counted")
            return
        self.orders += 1
        self.lapsed = False
        self.last_order_at = workflow.now().timestamp()
        self.last_order_id = order_id
        if bought:
            self.bought = tuple(bought)
        # Orders until this one do not stop this journey's later emails (the email activity
        # refuses a message when it finds an order since the journey began).
        placed_at = placed.timestamp()
        self.orders_until = max(self.orders_until or placed_at, placed_at)
        name = f"order {order_id}" if order_id else "an order"
        again = _spoken(self.settings.after)
        self.tell(f"{name} came in: the win-back clock starts again ({again} from now)")

    def details(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"orders": self.orders, "lapses": self.lapses}
        if self.last_order_at is not None:
            last = datetime.fromtimestamp(self.last_order_at, UTC)
            facts["last order"] = f"{last:%Y-%m-%d %H:%M} UTC"
        if self.coupon is not None:
            facts["coupon"] = self.coupon.code
        return facts
