"""Price-drop alert: a shopper viewed a product; tell them when its price falls.

The story: each ``Product Viewed`` (with the price the shopper saw) puts the product on a
watch for a while → every so often the journey reads the catalogue's current prices → when a
watched product costs at least a few percent less than the shopper saw, one email with the
old and the new price. Any purchase ends it; so does the end of the watch.

This file is the worked example of docs/writing-a-journey.md, which shows it whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.types import LookUpProducts, RecommendResult
    from kaeru.commerce import currency_of, minor_of, product_id_of
    from kaeru.money import format_minor
    from workflows.kit import Journey, JourneyEvent, JourneyInput, JourneyResult, setting

#: Products watched at once; a view past it replaces the watch that ends soonest, so the
#: journey's state (and every workflow task) stays small whatever the shopper views.
MAX_WATCHED = 20


@dataclass
class PriceDropSettings:
    """What shapes one journey, fixed at its start: ``KAERU_PRICE_DROP_<FIELD>``."""

    watch: float = field(
        default=14 * 86400.0,
        metadata=setting("how long a viewed product's price is watched", duration=True),
    )
    check_every: float = field(
        default=86400.0,
        metadata=setting("how often the watched products' prices are checked", duration=True),
    )
    min_drop_percent: float = field(
        default=5.0,
        metadata=setting("how far (percent) a price must fall below what the shopper saw"),
    )

    def check(self) -> None:
        """Refuse settings the journey cannot use (the settings reader names the variable)."""
        if self.watch <= 0:
            raise ValueError("watch must be above 0, e.g. P14D")
        if self.check_every <= 0:
            raise ValueError("check_every must be above 0, e.g. P1D")
        if not 0 < self.min_drop_percent < 100:
            raise ValueError("min_drop_percent must be above 0 and below 100, e.g. 5")


@dataclass
class Watched:
    """A product on watch: the price the shopper saw, and when the watch ends."""

    seen_minor: int
    currency: str
    until: float  # epoch seconds


@dataclass
class PriceDrop:
    """One product whose price fell: ``price_minor`` now, ``was_minor`` when viewed."""

    product_id: str
    price_minor: int
    was_minor: int
    currency: str
    percent_off: int


@dataclass
class PriceDropContext:
    """What the ``price_drop`` templates render."""

    drops: list[PriceDrop]


def drops_in(
    watched: dict[str, Watched], now: RecommendResult, min_percent: float
) -> list[PriceDrop]:
    """The watched products whose catalogue price is ``min_percent`` or more below the price
    the shopper saw (same currency only: a price in another currency says nothing)."""
    found = []
    for product in now.products:
        seen = watched.get(product.product_id)
        if seen is None or product.price_minor is None or product.currency != seen.currency:
            continue
        fall = seen.seen_minor - product.price_minor
        if fall > 0 and fall * 100 >= min_percent * seen.seen_minor:
            percent = fall * 100 // seen.seen_minor
            found.append(
                PriceDrop(
                    product.product_id, product.price_minor, seen.seen_minor, seen.currency, percent
                )
            )
    return found


@workflow.defn(name="PriceDrop")
class PriceDropAlert(Journey[PriceDropSettings]):
    """Watches what the shopper viewed and sends one email when a price falls far enough."""

    kind = "price-drop"  # workflow id price-drop-<customer id>; settings KAERU_PRICE_DROP_*
    priority = 25  # the send gate's order when caps compete (lower first)
    label = "Price-drop alert"
    starts_on = frozenset({"Product Viewed"})  # later views reach the live journey too
    settings_class = PriceDropSettings

    @workflow.run
    async def run(self, start: JourneyInput) -> JourneyResult:
        return await self.run_journey(self.steps)

    async def steps(self) -> JourneyResult:
        if not self.watched:
            self.tell("the shopper's view named no product and price to watch")
            return await self.finish("nothing_to_watch")
        while (left := self.watch_left()) > 0:
            await self.pause(min(self.settings.check_every, left), "the next price check")
            drops = await self.check_prices()
            if drops:
                await self.send_message("price_drop_email", "price_drop", PriceDropContext(drops))
                return await self.finish("alerted")
        return await self.finish("no_price_drop")

    @property
    def watched(self) -> dict[str, Watched]:
        # The kit's @workflow.init sets up only the kit's state, and the start event reaches
        # on_event before steps() runs: the journey's own state is made on first use.
        if not hasattr(self, "_watched"):
            self._watched: dict[str, Watched] = {}
        return self._watched

    def on_event(self, event: JourneyEvent) -> None:
        """A ``Product Viewed`` (the one that started the journey too) watches its product
        at the price the shopper saw, from now for ``watch``; a view without both is ignored."""
        if event.name != "Product Viewed":
            return
        product_id = product_id_of(event.properties)
        currency = currency_of(event.properties.get("currency"))
        seen = minor_of(event.properties.get("price"), currency)
        if product_id is None or seen is None or seen <= 0:
            return
        until = workflow.now().timestamp() + self.settings.watch
        self.watched[product_id] = Watched(seen, currency, until)
        if len(self.watched) > MAX_WATCHED:
            soonest = min(self.watched, key=lambda i: self.watched[i].until)
            del self.watched[soonest]
        self.tell(f"watching the price of {product_id}: {format_minor(seen, currency)} when viewed")

    def watch_left(self) -> float:
        """Seconds until the last watch ends, after forgetting the watches that have ended."""
        now = workflow.now().timestamp()
        for product_id in [i for i, w in self.watched.items() if w.until < now]:
            del self.watched[product_id]
        return max((w.until - now for w in self.watched.values()), default=0.0)

    async def check_prices(self) -> list[PriceDrop]:
        """Read the catalogue's current prices of the watched products (``look_up_products``
        only reads, so it needs no idempotency key) and return those that fell far enough."""
        asked = LookUpProducts(product_ids=sorted(self.watched))
        now = await self.run_step(
            "price_check", "look_up_products", asked, RecommendResult, told=self.told
        )
        return drops_in(self.watched, now, self.settings.min_drop_percent)

    def told(self, now: RecommendResult) -> str:
        """The story's line for one price check."""
        drops = drops_in(self.watched, now, self.settings.min_drop_percent)
        if not drops:
            count = len(self.watched)
            what = "price" if count == 1 else f"{count} prices"
            return f"checked the watched {what}: none fell enough"
        return "; ".join(
            f"{d.product_id} fell from {format_minor(d.was_minor, d.currency)} to "
            f"{format_minor(d.price_minor, d.currency)} ({d.percent_off}% off)"
            for d in drops
        )

    def details(self) -> dict[str, object]:
        """What the status query and the Temporal UI show besides the story."""
        return {"watching": ", ".join(sorted(self.watched)) or "nothing"}
