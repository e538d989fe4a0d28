"""Order confirmation: the customer bought; tell them, at once, what they bought and paid.

The story: an ``Order Completed`` starts it → one transactional email (never held back by
marketing consent or the topic rule) with the order number, each item (name, quantity, unit
price, line total), subtotal, discount and coupon, shipping, tax, total and currency.

A purchase does not end it: it is what starts it. A second order that comes while the first
is being confirmed is handed to the journey's next generation, which confirms it (each order
gets exactly one email); the same order again (a redelivered event, or the shop sending it
twice) gets none more.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.types import SendEmailInput, SendEmailResult
    from kaeru.commerce import (
        OrderedItem,
        minor_of,
        order_items_of,
        order_total_of,
    )
    from kaeru.money import format_minor
    from workflows.kit import (
        ORDER_COMPLETED,
        Journey,
        JourneyEvent,
        JourneyInput,
        JourneyResult,
        setting,
    )

STEP = "confirmation_email"
TEMPLATE = "order_confirmation"
#: Orders already confirmed that a next generation remembers (the newest ones): enough to
#: know a resent order among the few that come close together.
MAX_REMEMBERED = 20


@dataclass
class OrderConfirmationSettings:
    """What shapes one confirmation (``KAERU_ORDER_CONFIRMATION_<FIELD>``).

    The email goes at once: there is no wait to set.
    """

    max_lines: int = field(
        default=50,
        metadata=setting(
            "most order items listed in the confirmation (1 to 200); the rest are counted "
            "('and 3 more items'), the totals always cover the whole order"
        ),
    )

    def check(self) -> None:
        """Refuse settings the journey cannot use (the settings reader names the variable)."""
        if not 1 <= self.max_lines <= 200:
            raise ValueError("max_lines must be 1 to 200, e.g. 50")


#: One item of the order, read by kaeru.commerce (the one reader of an order's items), in the
#: product shape the templates' ``products_of`` reads.
OrderItem = OrderedItem


@dataclass
class OrderConfirmationContext:
    """The ``order_confirmation`` template's variables (amounts in minor units of
    ``currency``; None: the order did not say)."""

    order_id: str
    currency: str
    items: list[OrderItem]
    #: Items beyond ``KAERU_ORDER_CONFIRMATION_MAX_LINES`` (or without a product id), not listed.
    more_items: int
    subtotal_minor: int | None
    discount_minor: int | None
    coupon_code: str | None
    shipping_minor: int | None
    tax_minor: int | None
    total_minor: int | None


def _amount(props: dict[str, Any], name: str, currency: str) -> int | None:
    return minor_of(props.get(name), currency) if props.get(name) is not None else None


def read_order(event: JourneyEvent, max_lines: int) -> OrderConfirmationContext:
    """What a Segment ``Order Completed`` says, read as ingestion reads it (kaeru.commerce).

    The subtotal, when the order does not state it, is the sum of its items when each is
    priced in the order's currency; the total is ``total``, else ``revenue``.
    """
    props = event.properties
    order = order_total_of(props, event.message_id)
    currency = order.currency
    products = props.get("products")
    items = order_items_of(props)[:max_lines]
    # Counted, not listed: the items beyond max_lines and those without a product id.
    unlisted = (len(products) if isinstance(products, list) else 0) - len(items)
    subtotal = _amount(props, "subtotal", currency)
    if subtotal is None and items and not unlisted:
        priced = [i for i in items if i.price_minor is not None and i.currency == currency]
        if len(priced) == len(items):
            subtotal = sum((i.price_minor or 0) * i.quantity for i in priced)
    discount = _amount(props, "discount", currency)
    total = _amount(props, "total", currency)
    return OrderConfirmationContext(
        order_id=order.order_id,
        currency=currency,
        items=items,
        more_items=unlisted,
        subtotal_minor=subtotal,
        # Shops send a discount as a positive amount or as a negative adjustment.
        discount_minor=abs(discount) if discount else None,
        coupon_code=order.coupon,
        shipping_minor=_amount(props, "shipping", currency),
        tax_minor=_amount(props, "tax", currency),
        total_minor=total if total is not None else _amount(props, "revenue", currency),
    )


def _order_id(event: JourneyEvent) -> str:
    return order_total_of(event.properties, event.message_id).order_id


@workflow.defn(name="OrderConfirmation")
class OrderConfirmation(Journey[OrderConfirmationSettings]):
    kind = "order-confirmation"
    label = "Order confirmation"
    starts_on = frozenset({ORDER_COMPLETED})
    ends_on_purchase = False
    transactional = True
    settings_class = OrderConfirmationSettings
    #: Order ids this journey and its earlier generations confirmed (the newest ones).
    confirmed: tuple[str, ...] = ()

    @workflow.run
    async def run(self, start: JourneyInput) -> JourneyResult:
        return await self.run_journey(self.steps)

    async def steps(self) -> JourneyResult:
        if self.start_event is None:  # only an order starts it; a test may start it bare
            return await self.finish("no_order")
        order = read_order(self.start_event, self.settings.max_lines)
        if order.order_id in self.confirmed:
            self.tell(f"order {order.order_id} was already confirmed: not sent again")
            return await self.finish("already_confirmed")
        total = (
            format_minor(order.total_minor, order.currency)
            if order.total_minor is not None
            else "no total stated"
        )
        count = sum(item.quantity for item in order.items)
        self.tell(f"order {order.order_id} came in: {count} item(s), {total}")
        await self.send_confirmation(order)
        return await self.finish("confirmed")

    async def send_confirmation(self, order: OrderConfirmationContext) -> SendEmailResult:
        """Send the confirmation. Not the kit's ``send_message``: that one would refuse to
        send on finding an order placed since the journey began, and this order is one."""
        self.check_exit()
        self.enter(STEP)
        email = SendEmailInput(
            key=self.key(STEP),
            journey_id=workflow.info().workflow_id,
            step=STEP,
            customer_id=self.customer_id,
            template=TEMPLATE,
            context=dataclasses.asdict(order),
            marketing=False,
        )
        result = await self.call("send_email", email, SendEmailResult, STEP, heartbeat=True)
        self.confirmed = (*self.confirmed, order.order_id)[-MAX_REMEMBERED:]
        self.done(STEP, f"sent the confirmation of order {order.order_id} ({result.status})")
        return result

    # ---- more orders ------------------------------------------------------------------------

    def on_event(self, event: JourneyEvent) -> None:
        """Another order while this one is confirmed: the next generation confirms it (the
        kit hands held events over as this journey ends). The same order again: nothing."""
        if event.name != ORDER_COMPLETED or event is self.start_event:
            return
        order_id = _order_id(event)
        start = self.start_event
        if order_id in self.confirmed or (start is not None and order_id == _order_id(start)):
            self.tell(f"order {order_id} came again: it gets no second confirmation")
            return
        if any(_order_id(e) == order_id for e in self.held if e.name == ORDER_COMPLETED):
            return
        self.held.append(event)
        self.tell(f"another order ({order_id}) came: it gets its own confirmation next")

    def next_journey(self, events: list[JourneyEvent]) -> JourneyInput | None:
        """The kit's next generation, remembering which orders were confirmed."""
        following = super().next_journey(events)
        if not isinstance(following, JourneyInput):
            return None
        following.carried = {"confirmed": list(self.confirmed)}
        return following

    def restore(self, carried: dict[str, Any]) -> None:
        remembered = carried.get("confirmed")
        if isinstance(remembered, list):
            self.confirmed = tuple(str(order_id) for order_id in remembered)[-MAX_REMEMBERED:]

    def details(self) -> dict[str, Any]:
        start = self.start_event
        return {"order": _order_id(start)} if start is not None else {}
