"""Welcome series: a new subscriber gets to know the shop, and a reason to place a first order.

The story: an ``identify`` gives a customer an email address for the first time (its
``changed_traits`` holds ``email``) → a welcome at once → on day 3 the shop's best-sellers
(what its own orders hold most often) → on day 7 a single-use first-purchase coupon, unless
they have ordered. Their first order ends it at once (``purchased``, a conversion), whichever
step it comes at. A customer enters it once ever: a later change of address starts nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
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
    from workflows.kit import Journey, JourneyExit, JourneyInput, JourneyResult, Reentry, setting

DAY = 86400.0


@dataclass
class WelcomeSettings:
    """What shapes one welcome series, fixed at its start: ``KAERU_WELCOME_<FIELD>``.

    Both delays count from the sign-up, so changing one does not move the other.
    """

    bestsellers_delay: float = field(
        default=3 * DAY,
        metadata=setting("after the sign-up, wait this long before the best-sellers email", True),
    )
    offer_delay: float = field(
        default=7 * DAY,
        metadata=setting(
            "after the sign-up, wait this long before the first-purchase coupon email (at "
            "least the best-sellers delay)",
            duration=True,
        ),
    )
    offer_wait: float = field(
        default=14 * DAY,
        metadata=setting(
            "after the coupon email, how long a first order still counts as the welcome's "
            "conversion before the journey ends (the coupon's validity, by default)",
            duration=True,
        ),
    )
    bestseller_count: int = field(
        default=4, metadata=setting("how many best-sellers the day-3 email shows (1 to 12)")
    )
    coupon_amount_minor: int = field(
        default=1000, metadata=setting("first-purchase coupon value in minor units (above 0)")
    )
    coupon_currency: str = field(
        default="USD", metadata=setting("first-purchase coupon currency (ISO 4217, e.g. USD)")
    )
    coupon_ttl: float = field(
        default=14 * DAY,
        metadata=setting("how long the first-purchase coupon stays valid", duration=True),
    )

    def check(self) -> None:
        """Refuse settings the journey cannot use (the settings reader names the variable)."""
        if self.offer_delay < self.bestsellers_delay:
            raise ValueError(
                "offer_delay must be at least the best-sellers delay "
                "(KAERU_WELCOME_BESTSELLERS_DELAY): both count from the sign-up"
            )
        if not 1 <= self.bestseller_count <= 12:
            raise ValueError("bestseller_count must be 1 to 12")
        if self.coupon_amount_minor <= 0:
            raise ValueError("coupon_amount_minor must be above 0, e.g. 1000")
        if len(self.coupon_currency) != 3 or not self.coupon_currency.isalpha():
            raise ValueError("coupon_currency must be an ISO 4217 code such as USD or EUR")
        self.coupon_currency = self.coupon_currency.upper()


@dataclass
class WelcomeContext:
    """The welcome email's variables: it says what the subscriber will hear about, and when."""

    bestsellers_in_days: int
    offer_in_days: int


@dataclass
class BestsellersContext:
    """The day-3 email's variables: the shop's most-ordered products."""

    bestsellers: list[ProductInfo]


@dataclass
class OfferContext:
    """The day-7 email's variables: the single-use first-purchase coupon."""

    coupon: CouponInfo


def _days(seconds: float) -> int:
    """Whole days, at least 1 (the welcome says "in 3 days", never "in 0 days")."""
    return max(1, round(seconds / DAY))


@workflow.defn(name="Welcome")
class Welcome(Journey[WelcomeSettings]):
    kind = "welcome"
    priority = 30  # the send gate's order when caps compete (lower first)
    label = "Welcome series"
    starts_on_traits = frozenset({"email"})
    settings_class = WelcomeSettings
    reentry = Reentry()  # once per customer, ever

    #: The first-purchase coupon, once issued (the status query shows its code).
    coupon: CouponInfo | None = None

    @workflow.run
    async def run(self, start: JourneyInput) -> JourneyResult:
        return await self.run_journey(self.steps)

    async def steps(self) -> JourneyResult:
        s = self.settings
        self.signed_up = workflow.now()
        welcome = WelcomeContext(_days(s.bestsellers_delay), _days(s.offer_delay))
        await self.send_message("welcome_email", "welcome", welcome)
        await self.pause(self.left_until(s.bestsellers_delay), "the day of the best-sellers email")
        await self.send_bestsellers()
        await self.pause(self.left_until(s.offer_delay), "the day of the first-purchase offer")
        self.coupon = await self.issue_coupon(
            "first_purchase_coupon", s.coupon_amount_minor, s.coupon_currency, s.coupon_ttl
        )
        try:
            await self.send_offer(self.coupon)
        except JourneyExit as exit_:
            if exit_.outcome == "purchased" and self.ordered_before_signing_up():
                # Not a conversion: that order came before the welcome began.
                self.purchase = None
                self.tell(
                    "did not send the first-purchase offer: the shopper had already ordered "
                    "before signing up"
                )
                return await self.finish("already_customer")
            raise
        await self.pause(s.offer_wait, "a first order with the coupon")
        return await self.finish("offer_ignored")

    def left_until(self, since_sign_up: float) -> float:
        """Seconds from now until ``since_sign_up`` seconds after the sign-up (0 if past)."""
        elapsed = (workflow.now() - self.signed_up).total_seconds()
        return max(0.0, since_sign_up - elapsed)

    async def send_bestsellers(self) -> None:
        """The day-3 email with the shop's best-sellers; none to show (a shop without orders
        yet, or the recommendations failing): no email, rather than an empty one."""
        self.check_exit()
        wanted = RecommendInput(
            customer_id=self.customer_id, product_ids=[], limit=self.settings.bestseller_count
        )
        try:
            found = await self.call(
                "recommend_products",
                wanted,
                RecommendResult,
                "bestsellers_email",
                deadline=timedelta(minutes=1),
            )
        except JourneyExit:
            self.check_exit()  # a purchase meanwhile still ends the journey
            self.tell("could not find the shop's best-sellers: skipped the best-sellers email")
            return
        if not found.products:
            self.tell("the shop has no best-sellers yet: skipped the best-sellers email")
            return
        context = BestsellersContext(found.products)
        await self.send_message("bestsellers_email", "welcome_bestsellers", context)

    async def send_offer(self, coupon: CouponInfo) -> None:
        """The day-7 email with the coupon, only for a customer who has never ordered: the
        message path refuses it if any order of theirs is stored (``ordered_since`` 0)."""
        email = self.message_input("offer_email", "welcome_offer", OfferContext(coupon))
        email.ordered_since = 0.0
        await self.send_email("offer_email", email)

    def message_input(self, step: str, template: str, context: Any) -> SendEmailInput:
        """The ``SendEmailInput`` :meth:`send_message` would send, to set ``ordered_since``
        (which ``send_message`` does not take)."""
        return SendEmailInput(
            key=self.key(step),
            journey_id=workflow.info().workflow_id,
            step=step,
            customer_id=self.customer_id,
            template=template,
            context=asdict(context),
        )

    def ordered_before_signing_up(self) -> bool:
        """Whether the order the offer was refused on came before the journey's first event."""
        if self.purchase is None or self.started_at is None:
            return False
        ordered: datetime = self.purchase.occurred_at
        return ordered.timestamp() < self.started_at

    def details(self) -> dict[str, Any]:
        return {"coupon": self.coupon.code} if self.coupon is not None else {}
