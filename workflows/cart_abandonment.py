"""Cart abandonment: a shopper leaves a full cart; bring them back.

The story: the cart goes quiet for a while → email with the cart and related products →
if opened, a while later the shopper joins a retargeting ad audience → if they click the ad,
a while later an email with a single-use coupon. A purchase at any moment ends it at once,
and the shopper leaves every audience the journey put them in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.types import (
        CartLine,
        CouponInfo,
        EntryPlan,
        ProductInfo,
        RecommendInput,
        RecommendResult,
        SendEmailInput,
    )
    from kaeru.commerce import CART_EVENTS as CART_EVENTS
    from kaeru.commerce import (
        MAX_CART_LINES,
        MAX_URL_LENGTH,
        cart_topic,
        currency_of,
        minor_of,
        product_id_of,
        quantity_of,
    )
    from kaeru.variants import Experiment, Variant
    from workflows.kit import (
        AD_CLICKED,
        Journey,
        JourneyEvent,
        JourneyExit,
        JourneyResult,
        counted,
        setting,
    )
    from workflows.kit import SKIPPED as SKIPPED

#: ``workflow.patched`` id: an emptied cart waits ``empty_grace`` for a purchase (or a refill)
#: before the journey ends, and is judged as it is then.
CART_EMPTY_GRACE = "cart-empty-grace"
#: ``workflow.patched`` id: a cart event's ``cart`` property (the customer's whole cart after
#: it, as ingestion stored it) is the cart, so a journey that starts after an earlier one
#: ended sees the whole cart, not only the newest item.
CART_FROM_DATABASE = "cart-from-database"

#: Caps that keep a journey's state (and so every workflow task) small whatever the shop
#: sends: Temporal refuses payloads of a few MB, and a refused task would wedge the journey.
#: (Cart lines and quantities have one cap each, in kaeru/commerce.py, shared with ingestion.)
MAX_TEXT = 200


@dataclass
class CartJourneySettings:
    """What shapes one journey, fixed at its start (a later deploy does not change it).

    Each field with :func:`setting` metadata is ``KAERU_CART_<FIELD>`` (``cart_url`` is
    ``KAERU_CART_URL``, as it always was).
    """

    email_delay: float = field(
        default=86400.0,
        metadata=setting("how long the cart stays untouched before the cart email", duration=True),
    )
    open_wait: float = field(
        default=86400.0,
        metadata=setting(
            "how long the cart email may stay unopened before the journey ends", duration=True
        ),
    )
    ad_delay: float = field(
        default=86400.0,
        metadata=setting("after the open, wait before joining the retargeting audience", True),
    )
    ad_click_wait: float = field(
        default=3 * 86400.0,
        metadata=setting("how long to wait for an ad click before the journey ends", True),
    )
    offer_delay: float = field(
        default=86400.0,
        metadata=setting("after the ad click, wait before the coupon email", duration=True),
    )
    offer_wait: float = field(
        default=3 * 86400.0,
        metadata=setting("how long to wait for a purchase after the coupon email", True),
    )
    coupon_ttl: float = field(
        default=7 * 86400.0, metadata=setting("how long a coupon stays valid", duration=True)
    )
    coupon_amount_minor: int = field(
        default=1000, metadata=setting("coupon value in minor units (above 0)")
    )
    coupon_currency: str = field(
        default="USD", metadata=setting("coupon currency (ISO 4217, e.g. USD or EUR)")
    )
    cart_url: str = field(
        default="https://shop.example/cart", metadata=setting("link back to the cart", name="URL")
    )
    audience: str = "cart-retargeting"
    recommendations: int = field(
        default=3, metadata=setting("related products in the cart email (0 to 12)")
    )
    #: Continue-as-new once the history holds this many events while the cart keeps changing.
    history_limit: int = 2000
    #: After the cart empties, wait this long for the order (checkout empties the cart just
    #: before the order arrives) or a refill before ending ``cart_emptied``.
    empty_grace: float = field(
        default=600.0,
        metadata=setting(
            "after the cart empties, wait this long for the order (checkout empties the cart "
            "first) or a refill before the journey ends",
            duration=True,
        ),
    )

    def check(self) -> None:
        """Refuse settings the journey cannot use (the settings reader calls it and names the
        variable); not ``__post_init__``, which would run on every decoded history too."""
        if self.coupon_amount_minor <= 0:
            raise ValueError("coupon_amount_minor must be above 0, e.g. 1000")
        if len(self.coupon_currency) != 3 or not self.coupon_currency.isalpha():
            raise ValueError("coupon_currency must be an ISO 4217 code such as USD or EUR")
        self.coupon_currency = self.coupon_currency.upper()
        if not 0 <= self.recommendations <= 12:
            raise ValueError("recommendations must be 0 to 12")


@dataclass
class CartCarryOver:
    """State handed to the next run when a busy cart continues as new."""

    cart: list[CartLine]
    last_seq: int
    #: When the cart last changed, in seconds since the epoch. (A ``datetime`` field in a
    #: dataclass defined in a sandboxed module fails to decode: the sandbox proxies datetime.)
    last_change: float
    story: list[str] = field(default_factory=list)
    #: When the journey's first event happened (epoch seconds); see ``Journey.started_at``.
    started_at: float | None = None
    #: When the newest order an earlier generation converted happened (epoch seconds); see
    #: ``Journey.orders_until``.
    orders_until: float | None = None
    #: The experiments' arms the journey entered with (``Journey.arms``).
    arms: dict[str, str] | None = None


@dataclass
class CartJourneyInput:
    customer_id: str
    settings: CartJourneySettings = field(default_factory=CartJourneySettings)
    carried: CartCarryOver | None = None
    #: 0 for a journey the router started; n + 1 for the journey that generation n handed
    #: the events that came as it ended (``pending``) to.
    generation: int = 0
    pending: list[JourneyEvent] = field(default_factory=list)
    #: The send priority when the router started it (``KAERU_CART_PRIORITY``); None: the
    #: class's ``priority``.
    priority: int | None = None
    #: How the journey enters (holdout, experiments): see ``JourneyInput.entry``.
    entry: EntryPlan | None = None


def _product(props: dict[str, Any], currency: str = "USD") -> ProductInfo | None:
    """A product from Segment e-commerce properties; None without an id.

    Its own ``currency`` wins, else ``currency`` (the event's, for a product list).
    """
    product_id = product_id_of(props)
    if product_id is None:
        return None
    currency = currency_of(props.get("currency"), currency)
    name = props.get("name")
    return ProductInfo(
        product_id=product_id,
        name=(name if isinstance(name, str) and name else product_id)[:MAX_TEXT],
        price_minor=minor_of(props.get("price"), currency),
        currency=currency,
        image_url=_url(props.get("image_url")),
        url=_url(props.get("url")),
    )


def _url(value: Any) -> str | None:
    return value if isinstance(value, str) and len(value) <= MAX_URL_LENGTH else None


_quantity = quantity_of


def _lines(items: list[Any], currency: str) -> list[CartLine]:
    """Cart lines from a product list (a ``Cart Viewed``'s ``products``, a stored ``cart``)."""
    return [
        CartLine(product=product, quantity=_quantity(item))
        for item in items[:MAX_CART_LINES]
        if isinstance(item, dict) and (product := _product(item, currency)) is not None
    ]


def _snapshot(run: list[JourneyEvent]) -> JourneyEvent:
    """One ``Cart Viewed`` listing what ``run`` (cart events, oldest first) leaves in an empty
    cart, each line with the product properties it was last added with (its currency
    written out, as the snapshot names none)."""
    lines: dict[str, tuple[dict[str, Any], int]] = {}
    for event in run:
        props = event.properties
        if event.name in ("Product Added", "Product Removed"):
            product = _product(props)
            if product is None:
                continue
            had = lines.get(product.product_id)
            if event.name == "Product Added":
                quantity = (had[1] if had else 0) + _quantity(props)
                lines[product.product_id] = ({**props, "currency": product.currency}, quantity)
            elif had is not None:
                left = had[1] - _quantity(props, default=had[1])
                if left > 0:
                    lines[product.product_id] = (had[0], left)
                else:
                    del lines[product.product_id]
        elif isinstance(props.get("products"), list):
            currency = currency_of(props.get("currency"))
            lines = {}
            for item in props["products"]:
                if isinstance(item, dict) and (product := _product(item, currency)) is not None:
                    item_props = {**item, "currency": product.currency}
                    lines[product.product_id] = (item_props, _quantity(item))
    products = [{**props, "quantity": quantity} for props, quantity in lines.values()]
    first, last = run[0], run[-1]
    if isinstance(last.properties.get("cart"), list):
        products = list(last.properties["cart"])  # the stored cart after the run: the truth
    return JourneyEvent(
        seq=last.seq,
        name="Cart Viewed",
        message_id=last.message_id,
        occurred_at=first.occurred_at,  # the journey began when the run's first event happened
        properties={"products": products},
    )


@workflow.defn(name="CartAbandonment")
class CartAbandonment(Journey[CartJourneySettings]):
    kind = "cart-abandonment"
    label = "Cart abandonment"
    starts_on = CART_EVENTS
    listens_to = frozenset({AD_CLICKED})
    settings_class = CartJourneySettings
    settings_prefix = "CART"
    priority = 10  # the send gate's order when caps compete (lower first)
    #: The demo's experiment (off unless ``KAERU_CART_EXPERIMENTS=cart_subject``): the cart
    #: email's subject names the product, or asks a question (cart_reminder.subject.j2).
    experiments = {
        "cart_subject": Experiment(
            step="cart_email",
            variants={"names_the_item": Variant(), "asks_a_question": Variant()},
            enabled_by_default=False,
        )
    }

    @workflow.init
    def __init__(self, start: CartJourneyInput) -> None:
        carried = start.carried
        self._begin(
            start.customer_id,
            carried.last_seq if carried else 0,
            carried.story if carried else None,
            generation=start.generation,
            started_at=carried.started_at if carried else None,
            pending=start.pending,
            orders_until=carried.orders_until if carried else None,
            priority=start.priority,
            entry=start.entry,
            arms=carried.arms if carried else None,
            continued=carried is not None,
        )
        self.settings = start.settings
        self.cart: list[CartLine] = list(carried.cart) if carried else []
        self.cart_version = 0
        self.last_change = carried.last_change if carried else workflow.now().timestamp()
        self.coupon: CouponInfo | None = None
        #: While an emptied cart waits for a purchase: when the grace ends (epoch seconds).
        self.empty_until: float | None = None

    @workflow.run
    async def run(self, start: CartJourneyInput) -> JourneyResult:
        return await self.run_journey(self.steps)

    async def steps(self) -> JourneyResult:
        s = self.settings
        await self.wait_until_cart_is_quiet()
        related = await self.related_products()
        reminder = self.email("cart_email", "cart_reminder", related)
        # One reminder per cart: a cart journey that starts again on the same cart (a shopper
        # who looks at it after the last journey ended) does not send a second one.
        reminder.topic = cart_topic([line.product.product_id for line in self.cart])
        sent = await self.send_email("cart_email", reminder)
        if sent.status == SKIPPED:
            return await self.finish("already_reminded")
        if not await self.within(s.open_wait, lambda: "cart_email" in self.engaged, "an open"):
            return await self.finish("not_opened")
        await self.pause(s.ad_delay, "the ad delay")
        await self.join_audience("ad_audience", s.audience)
        if not await self.within(s.ad_click_wait, lambda: self.ad_clicks > 0, "an ad click"):
            return await self.finish("ad_not_clicked")
        await self.pause(s.offer_delay, "the offer delay")
        self.coupon = await self.issue_coupon(
            "offer_coupon", s.coupon_amount_minor, s.coupon_currency, s.coupon_ttl
        )
        await self.send_email("offer_email", self.email("offer_email", "cart_offer", []))
        await self.pause(s.offer_wait, "a purchase with the coupon")
        return await self.finish("offer_ignored")

    @classmethod
    def start_input(cls, customer_id: str, settings: Any) -> CartJourneyInput:
        """Its own input, as journeys always started with (histories depend on its shape)."""
        return CartJourneyInput(customer_id=customer_id, settings=settings)

    def next_journey(self, events: list[JourneyEvent]) -> CartJourneyInput:
        return CartJourneyInput(
            customer_id=self.customer_id,
            settings=self.settings,
            carried=CartCarryOver(
                [],
                self.last_seq,
                workflow.now().timestamp(),
                self.story,
                orders_until=self.converted_until(),
            ),
            generation=self.generation + 1,
            pending=events,
            priority=self.send_priority,
            entry=self.entry_plan,
        )

    # ---- the cart ---------------------------------------------------------------------------

    def collapse_held(self, held: list[JourneyEvent]) -> list[JourneyEvent]:
        """Fold each run of held cart events (between orders) into one ``Cart Viewed`` that
        lists what the run leaves in the cart: the next journey takes each run on an empty
        cart (a run after an order starts yet another journey), so the cart comes out the same.
        """
        collapsed: list[JourneyEvent] = []
        run: list[JourneyEvent] = []
        for event in [*held, None]:
            if event is not None and event.name in CART_EVENTS:
                run.append(event)
                continue
            if run:
                collapsed.append(_snapshot(run))
                run = []
            if event is not None:
                collapsed.append(event)
        return collapsed

    def on_event(self, event: JourneyEvent) -> None:
        if event.name not in CART_EVENTS:
            return
        if self.apply_cart_change(event) and not self.cart:
            if workflow.patched(CART_EMPTY_GRACE):
                grace = self.settings.empty_grace
                self.empty_until = workflow.now().timestamp() + grace
                self.tell(f"the cart is empty: waiting {grace:.0f}s for an order or a refill")
                self.exit_unless_undone("cart_emptied", grace, lambda: not self.cart)
            else:
                self.exit_with("cart_emptied")
        if self.step in ("started", "cart_quiet"):
            # Every cart event restarts the quiet period: the shopper is still shopping.
            self.cart_version += 1
            self.last_change = workflow.now().timestamp()

    def apply_cart_change(self, event: JourneyEvent) -> bool:
        """Update the cart from one cart event. True if the event said what the cart holds."""
        props = event.properties
        stored = props.get("cart")
        if isinstance(stored, list) and workflow.patched(CART_FROM_DATABASE):
            self.cart = _lines(stored, currency_of(props.get("currency")))
            self.tell(f"{event.name}: {counted(len(self.cart), 'item')} in the cart")
            return True
        if event.name in ("Product Added", "Product Removed"):
            product = _product(props)
            if product is None:
                return False
            line = next((x for x in self.cart if x.product.product_id == product.product_id), None)
            if event.name == "Product Added":
                if line is None and len(self.cart) >= MAX_CART_LINES:
                    self.tell(f"the cart is full ({MAX_CART_LINES} lines): ignored {product.name}")
                elif line is None:
                    self.cart.append(CartLine(product=product, quantity=_quantity(props)))
                else:
                    line.product, line.quantity = product, line.quantity + _quantity(props)
                self.tell(f"added {product.name} to the cart")
            elif line is not None:
                line.quantity -= _quantity(props, default=line.quantity)
                self.cart = [x for x in self.cart if x.quantity > 0]
                self.tell(f"removed {product.name} from the cart")
            return True
        if not isinstance(props.get("products"), list):
            return False
        self.cart = _lines(props["products"], currency_of(props.get("currency")))
        self.tell(f"{event.name}: {counted(len(self.cart), 'item')} in the cart")
        return True

    async def wait_until_cart_is_quiet(self) -> None:
        """Wait until the cart has not changed for ``email_delay``; each change restarts it.

        A cart still empty then waits out its grace (an order or a refill may yet come).
        """
        self.enter("cart_quiet")
        await self._wait_for_quiet()
        while not self.cart:
            left = (self.empty_until or 0.0) - workflow.now().timestamp()
            if left <= 0:
                raise JourneyExit("cart_emptied")
            await self.within(left, lambda: bool(self.cart), "an order after the emptied cart")
            if not self.cart:
                raise JourneyExit("cart_emptied")
            await self._wait_for_quiet()  # refilled: the shopper is shopping again
        self.done("cart_quiet", f"the cart went quiet with {counted(len(self.cart), 'item')}")

    async def _wait_for_quiet(self) -> None:
        while True:
            version = self.cart_version
            quiet_until = self.last_change + self.settings.email_delay
            remaining = quiet_until - workflow.now().timestamp()
            if remaining <= 0:
                break
            # B023: the lambda is awaited within this iteration, so ``version`` cannot move.
            changed = await self.within(
                remaining,
                lambda: self.cart_version != version,  # noqa: B023
                "a quiet cart",
            )
            if not changed:
                break
            info = workflow.info()
            if (
                info.is_continue_as_new_suggested()
                or info.get_current_history_length() > self.settings.history_limit
            ):
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(
                    CartJourneyInput(
                        customer_id=self.customer_id,
                        settings=self.settings,
                        carried=CartCarryOver(
                            self.cart,
                            self.last_seq,
                            self.last_change,
                            self.story,
                            self.started_at,
                            self.orders_until,
                            self.arms,
                        ),
                        generation=self.generation,
                        priority=self.send_priority,
                    )
                )

    # ---- the steps ------------------------------------------------------------------------

    async def related_products(self) -> list[ProductInfo]:
        if self.settings.recommendations <= 0:
            return []
        wanted = RecommendInput(
            customer_id=self.customer_id,
            product_ids=[line.product.product_id for line in self.cart],
            limit=self.settings.recommendations,
        )
        try:
            result = await self.call(
                "recommend_products",
                wanted,
                RecommendResult,
                "cart_email",
                deadline=timedelta(minutes=1),
            )
        except JourneyExit:
            return []  # the email goes out without related products rather than not at all
        return result.products

    def email(self, step: str, template: str, related: list[ProductInfo]) -> SendEmailInput:
        return SendEmailInput(
            key=self.key(step),
            journey_id=workflow.info().workflow_id,
            step=step,
            customer_id=self.customer_id,
            template=template,
            cart=list(self.cart),
            cart_url=self.settings.cart_url,
            recommendations=related,
            coupon=self.coupon,
        )

    def details(self) -> dict[str, Any]:
        items = ", ".join(f"{line.quantity}× {line.product.name}" for line in self.cart)
        facts: dict[str, Any] = {"cart": items or "empty"}
        if self.audiences:
            facts["audiences"] = ", ".join(self.audiences)
        if self.coupon:
            facts["coupon"] = self.coupon.code
        return facts
