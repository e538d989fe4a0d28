"""Browse abandonment: a shopper looked at products but put nothing in the cart; remind them.

The story: the shopper views products (``Product Viewed``); each view adds the product to
what they looked at and starts the quiet wait again. When they have browsed nothing for
``KAERU_BROWSE_DELAY`` (4 hours), one email shows what they looked at and similar products
(bought together with those in the shop's own orders). A cart event ends it with no email:
the cart journey takes over from there; so does an order (``purchased``).

At most one browse email per customer per ``KAERU_BROWSE_REENTRY`` (7 days): the journey
claims its entry just before it sends, so a browse that ended in a cart does not use up the
week. The email's topic names the products it shows, so a customer never gets a second
marketing email about the same products (from any journey using the topic) within
``KAERU_TOPIC_WINDOW``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.types import (
        EntryClaim,
        EntryClaimResult,
        ProductInfo,
        RecommendInput,
        RecommendResult,
    )
    from kaeru.commerce import cart_topic, currency_of, id_of, minor_of
    from workflows.cart_abandonment import CART_EVENTS
    from workflows.kit import (
        Journey,
        JourneyEvent,
        JourneyExit,
        JourneyInput,
        JourneyResult,
        setting,
    )

PRODUCT_VIEWED = "Product Viewed"
#: The most recently viewed products the journey keeps (and the email shows): the newest
#: views win, so state stays small however long the shopper browses.
MAX_VIEWED = 4
MAX_TEXT = 200
MAX_URL = 2000


@dataclass
class BrowseSettings:
    """What shapes one browse journey, fixed at its start: ``KAERU_BROWSE_<FIELD>``."""

    delay: float = field(
        default=4 * 3600.0,
        metadata=setting(
            "how long the shopper browses nothing (no view, no cart, no order) before the "
            "browse email; each view starts the wait again",
            duration=True,
        ),
    )
    reentry: float = field(
        default=7 * 86400.0,
        metadata=setting("a customer gets at most one browse email within this", duration=True),
    )
    recommendations: int = field(
        default=3, metadata=setting("similar products in the browse email (0 to 12)")
    )
    #: Continue-as-new once the history holds this many events while the shopper browses on.
    history_limit: int = 2000

    def check(self) -> None:
        """Refuse settings the journey cannot use (the settings reader names the variable)."""
        if self.delay <= 0:
            raise ValueError("delay must be above 0, e.g. 14400 (4 hours)")
        if self.reentry < 0:
            raise ValueError("reentry must be 0 or more, e.g. 604800 (7 days)")
        if not 0 <= self.recommendations <= 12:
            raise ValueError("recommendations must be 0 to 12")


@dataclass
class BrowseContext:
    """The ``browse_reminder`` template's variables."""

    #: What the shopper looked at, the most recent first.
    viewed: list[ProductInfo]
    #: Similar products: bought together with the viewed ones, topped up with popular ones.
    similar: list[ProductInfo]


def products_topic(product_ids: list[str]) -> str:
    """The topic of a marketing message about ``product_ids``: the cart journey's
    (:func:`kaeru.commerce.cart_topic`), so a browse email and a cart reminder about the same
    products are one topic, and the shopper gets only the first."""
    return cart_topic(product_ids)


def viewed_product(props: dict[str, Any]) -> ProductInfo | None:
    """The product of a Segment ``Product Viewed`` event; None without a usable id."""
    product_id = id_of(props.get("product_id") or props.get("sku") or props.get("id"))
    if product_id is None:
        return None
    currency = currency_of(props.get("currency"))
    name = props.get("name")
    return ProductInfo(
        product_id=product_id,
        name=name[:MAX_TEXT] if isinstance(name, str) else "",
        price_minor=minor_of(props.get("price"), currency),
        currency=currency,
        image_url=_url(props.get("image_url")),
        url=_url(props.get("url")),
    )


def _span(seconds: float) -> str:
    """``seconds`` as a person says it: ``7 days``, ``4 hours``, ``90 seconds``."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            amount = seconds / size
            return f"{amount:g} {unit}" + ("" if amount == 1 else "s")
    return f"{seconds:g} seconds"


def _url(value: Any) -> str | None:
    return value if isinstance(value, str) and len(value) <= MAX_URL else None


@workflow.defn(name="BrowseAbandonment")
class BrowseAbandonment(Journey[BrowseSettings]):
    kind = "browse-abandonment"
    priority = 20  # the send gate's order when caps compete (lower first)
    label = "Browse abandonment"
    starts_on = frozenset({PRODUCT_VIEWED})
    exits_on = dict.fromkeys(CART_EVENTS, "carted")
    settings_class = BrowseSettings
    settings_prefix = "BROWSE"

    # The journey's own state. Immutable class defaults, always replaced, never mutated:
    # the kit's ``@workflow.init`` gives a journey no hook to set up its own attributes.
    #: What the shopper viewed, the most recent first (at most ``MAX_VIEWED``).
    viewed: tuple[ProductInfo, ...] = ()
    #: Views so far (each restarts the quiet wait).
    views: int = 0
    #: When the shopper last viewed a product (epoch seconds, the workflow's clock).
    last_view: float | None = None

    @workflow.run
    async def run(self, start: JourneyInput) -> JourneyResult:
        return await self.run_journey(self.steps)

    async def steps(self) -> JourneyResult:
        await self.wait_until_browsing_stops()
        if not self.viewed:
            self.tell("the shopper viewed no product the shop could name: nothing to remind of")
            return await self.finish("nothing_viewed")
        similar = await self.similar_products()
        if not await self.claim_the_week():
            return await self.finish("not_reentered")
        viewed = list(self.viewed)
        result = await self.send_message(
            "browse_email",
            "browse_reminder",
            BrowseContext(viewed=viewed, similar=similar),
            topic=products_topic([p.product_id for p in viewed]),
        )
        if result.status == "skipped":
            return await self.finish("skipped")
        return await self.finish("emailed")

    # ---- the views --------------------------------------------------------------------------

    def on_event(self, event: JourneyEvent) -> None:
        if event.name != PRODUCT_VIEWED:
            return
        self.views += 1
        self.last_view = workflow.now().timestamp()
        product = viewed_product(event.properties)
        if product is None:
            self.tell("the shopper viewed a product without an id")
            return
        others = tuple(p for p in self.viewed if p.product_id != product.product_id)
        self.viewed = (product, *others)[:MAX_VIEWED]
        self.tell(f"the shopper viewed {product.name or product.product_id}")

    async def wait_until_browsing_stops(self) -> None:
        """Wait until no product was viewed for ``delay``; each view starts it again."""
        self.enter("browsing")
        if self.last_view is None:  # every start is a view, but never wait for ever
            self.last_view = workflow.now().timestamp()
        while True:
            views = self.views
            remaining = self.last_view + self.settings.delay - workflow.now().timestamp()
            if remaining <= 0:
                break
            # B023: the lambda is awaited within this iteration, so ``views`` cannot move.
            viewed_more = await self.within(
                remaining,
                lambda: self.views != views,  # noqa: B023
                "a cart, an order or the shopper to stop browsing",
            )
            if not viewed_more:
                break
            await self.continue_as_new_when_due(self.settings.history_limit)
        self.done("browsing", f"the shopper stopped browsing, {len(self.viewed)} product(s) seen")

    def carry(self) -> dict[str, Any]:
        return {
            "viewed": [asdict(p) for p in self.viewed],
            "views": self.views,
            "last_view": self.last_view,
        }

    def restore(self, carried: dict[str, Any]) -> None:
        self.viewed = tuple(ProductInfo(**p) for p in carried["viewed"])
        self.views = int(carried["views"])
        self.last_view = carried["last_view"]

    # ---- the steps ------------------------------------------------------------------------

    async def similar_products(self) -> list[ProductInfo]:
        """Products bought together with the viewed ones (the viewed ones excluded)."""
        if self.settings.recommendations <= 0:
            return []
        wanted = RecommendInput(
            customer_id=self.customer_id,
            product_ids=[p.product_id for p in self.viewed],
            limit=self.settings.recommendations,
        )
        try:
            found = await self.call(
                "recommend_products",
                wanted,
                RecommendResult,
                "browse_email",
                deadline=timedelta(minutes=1),
            )
        except JourneyExit:
            return []  # the email goes out without similar products rather than not at all
        return found.products

    async def claim_the_week(self) -> bool:
        """Claim this customer's browse email under ``reentry``; False: one went out within it.

        The kit's ``Reentry`` is a class constant claimed at the start; the period here is a
        setting, and claiming as the email goes out keeps a browse that ended in a cart from
        using up the week.
        """
        claim = EntryClaim(
            key=self.key("entry"),
            kind=self.kind,
            customer_id=self.customer_id,
            every_seconds=self.settings.reentry,
            at=workflow.now().timestamp(),
        )
        self.check_exit()
        result = await self.call("claim_journey_entry", claim, EntryClaimResult, "entry")
        if not result.granted:
            when = (
                f" on {datetime.fromtimestamp(result.previous_at, UTC):%Y-%m-%d}"
                if result.previous_at is not None
                else ""
            )
            every = _span(self.settings.reentry)
            self.tell(
                f"no browse email: the shopper got one{when}, and gets one at most every {every}"
            )
        return result.granted

    def details(self) -> dict[str, Any]:
        names = ", ".join(p.name or p.product_id for p in self.viewed)
        return {"viewed": names or "nothing yet"}
