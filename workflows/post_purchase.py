"""Post-purchase follow-up: after an order, ask for a review, then suggest what goes with it.

The story: an order → after the delivery window, a review request listing what they bought →
a few days later, what the shop's other customers bought with it (a dress → its belt and
scarf), with a single-use discount for the next order. A new order starts the follow-up over
from that order: the customer never gets an older order's emails after a newer one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.types import (
        CouponInfo,
        ProductInfo,
        RecommendInput,
        RecommendResult,
        SendEmailInput,
    )
    from kaeru.commerce import (
        MAX_CART_LINES,
        ORDER_COMPLETED,
        OrderedItem,
        order_items_of,
        order_total_of,
    )
    from workflows.kit import (
        ORDER_AFTER,
        Journey,
        JourneyEvent,
        JourneyExit,
        JourneyInput,
        JourneyResult,
        purchase_from,
        setting,
    )

DAY = 86400.0


@dataclass
class PostPurchaseSettings:
    """What shapes one follow-up, fixed at its start: ``KAERU_POST_PURCHASE_<FIELD>``."""

    review_delay: float = field(
        default=7 * DAY,
        metadata=setting(
            "after an order, wait this long (the delivery window) before the review request",
            duration=True,
        ),
    )
    cross_sell_delay: float = field(
        default=3 * DAY,
        metadata=setting(
            "after the review request, wait this long before the cross-sell email", True
        ),
    )
    recommendations: int = field(
        default=3,
        metadata=setting("products bought with the order shown in the cross-sell email (1 to 12)"),
    )
    coupon_amount_minor: int = field(
        default=1000,
        metadata=setting("next-purchase discount in minor units (above 0)"),
    )
    coupon_currency: str = field(
        default="USD", metadata=setting("next-purchase discount currency (ISO 4217, e.g. USD)")
    )
    coupon_ttl: float = field(
        default=14 * DAY,
        metadata=setting(
            "how long the next-purchase coupon stays valid (the journey waits as long for the "
            "next order)",
            duration=True,
        ),
    )

    def check(self) -> None:
        """Refuse settings the journey cannot use (the settings reader names the variable)."""
        if not 1 <= self.recommendations <= 12:
            raise ValueError("recommendations must be 1 to 12, e.g. 3")
        if self.coupon_amount_minor <= 0:
            raise ValueError("coupon_amount_minor must be above 0, e.g. 1000")
        if len(self.coupon_currency) != 3 or not self.coupon_currency.isalpha():
            raise ValueError("coupon_currency must be a 3-letter ISO 4217 code, e.g. USD")


#: One item of the order, read by kaeru.commerce (the one reader of an order's items), in the
#: product shape the templates' ``products_of`` reads.
OrderItem = OrderedItem


@dataclass
class ReviewContext:
    """What ``review_request`` renders."""

    order_id: str
    items: list[OrderItem]


@dataclass
class CrossSellContext:
    """What ``cross_sell`` renders: the order, what goes with it, and the next-order coupon."""

    order_id: str
    items: list[OrderItem]
    recommendations: list[ProductInfo]
    coupon: CouponInfo


def order_items(props: dict[str, Any]) -> list[OrderItem]:
    """The order's lines from a Segment ``Order Completed`` (``products[]``), each product
    once, at most :data:`MAX_CART_LINES` (the journey's state stays small)."""
    items: dict[str, OrderItem] = {}
    for item in order_items_of(props):
        if item.product_id not in items and len(items) < MAX_CART_LINES:
            items[item.product_id] = item
    return list(items.values())


@workflow.defn(name="PostPurchase")
class PostPurchase(Journey[PostPurchaseSettings]):
    kind = "post-purchase"
    priority = 35  # the send gate's order when caps compete (lower first)
    label = "Post-purchase follow-up"
    starts_on = frozenset({ORDER_COMPLETED})
    #: The order starts it; a newer order ends it and starts it over (see :meth:`on_event`).
    ends_on_purchase = False
    settings_class = PostPurchaseSettings

    #: The order followed up, and its lines (set when the steps begin).
    order_id: str | None = None
    items: tuple[OrderItem, ...] = ()
    #: When that order happened (epoch seconds).
    ordered_at: float = 0.0

    @workflow.run
    async def run(self, start: JourneyInput) -> JourneyResult:
        return await self.run_journey(self.steps)

    async def steps(self) -> JourneyResult:
        s = self.settings
        if self.start_event is None:
            return await self.finish("no_order")  # started by hand, without an order
        order_id = self.follow_up(self.start_event)
        await self.pause(s.review_delay, "the delivery window")
        await self.send("review_email", "review_request", ReviewContext(order_id, list(self.items)))
        await self.pause(s.cross_sell_delay, "the cross-sell delay")
        related = await self.bought_with()
        coupon = await self.issue_coupon(
            "cross_sell_coupon", s.coupon_amount_minor, s.coupon_currency, s.coupon_ttl
        )
        context = CrossSellContext(order_id, list(self.items), related, coupon)
        await self.send("cross_sell_email", "cross_sell", context)
        await self.pause(s.coupon_ttl, "the next order")
        return await self.finish("completed")

    def follow_up(self, order: JourneyEvent) -> str:
        """Take the order this journey follows up; returns its id."""
        order_id = self.order_id = order_total_of(order.properties, order.message_id).order_id
        self.items = tuple(order_items(order.properties))
        self.ordered_at = order.occurred_at.timestamp()
        what = f"{len(self.items)} product{'s' if len(self.items) != 1 else ''}"
        self.tell(f"order {order_id} ({what}): a review request after the delivery window")
        return order_id

    async def send(self, step: str, template: str, context: Any) -> None:
        """Send a marketing message of this follow-up, unless the customer has ordered again:
        the email activity finds a newer order stored whose event has not reached the journey
        yet (the order that started it does not count), and the journey ends ``purchased``."""
        email = SendEmailInput(
            key=self.key(step),
            journey_id=workflow.info().workflow_id,
            step=step,
            customer_id=self.customer_id,
            template=template,
            context=dataclasses.asdict(context),
            ordered_since=self.ordered_at + ORDER_AFTER,
        )
        await self.send_email(step, email)

    def on_event(self, event: JourneyEvent) -> None:
        """A newer order ends this follow-up (a purchase after its emails is its conversion)
        and hands the order to the next generation, which follows it up from the start."""
        start = self.start_event
        if event.name != ORDER_COMPLETED or start is None or event is start:
            return
        purchase = purchase_from(event)
        if purchase.order_id == purchase_from(start).order_id:
            self.tell(f"order {purchase.order_id} came again: nothing changes")
            return
        self.purchase = purchase
        self.tell(f"a new order {purchase.order_id}: the follow-up starts over from it")
        self.held.append(event)  # the kit starts the next generation from held start events
        self.exit_with("purchased")

    async def bought_with(self) -> list[ProductInfo]:
        """What the shop's orders pair with this order's products, topped up with its
        best-sellers; never the products themselves (``recommend_products`` leaves them out)."""
        wanted = RecommendInput(
            customer_id=self.customer_id,
            product_ids=[item.product_id for item in self.items],
            limit=self.settings.recommendations,
        )
        try:
            result = await self.call(
                "recommend_products",
                wanted,
                RecommendResult,
                "cross_sell_email",
                deadline=timedelta(minutes=1),
            )
        except JourneyExit:
            if self.exit_reason is not None:
                raise
            return []  # the discount still goes out, without suggestions
        return result.products

    def details(self) -> dict[str, Any]:
        bought = ", ".join(f"{i.quantity}× {i.name or i.product_id}" for i in self.items)
        return {"order": self.order_id or "none yet", "bought": bought or "nothing listed"}
