"""A journey outside the ``workflows`` package, reached only through KAERU_JOURNEY_MODULES:
proof that a new journey needs no edit anywhere else (tests/starter/test_registry.py and
tests/workflows/test_kit.py run it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from workflows.kit import Journey, JourneyInput, JourneyResult, Reentry, setting


@dataclass
class HelloSettings:
    delay: float = field(
        default=3600.0, metadata=setting("wait after the sign-up before the hello", True)
    )
    template: str = field(default="cart_reminder", metadata=setting("the hello's template"))


@dataclass
class HelloContext:
    greeting: str


@workflow.defn(name="TestHello")
class Hello(Journey[HelloSettings]):
    kind = "test-hello"
    label = "Test hello"
    starts_on_traits = frozenset({"email"})
    listens_to = frozenset({"Product Viewed"})
    settings_class = HelloSettings
    enabled_by_default = False
    reentry = Reentry(every=7 * 86400)

    @workflow.run
    async def run(self, start: JourneyInput) -> JourneyResult:
        return await self.run_journey(self.steps)

    async def steps(self) -> JourneyResult:
        viewed = await self.wait_for({"Product Viewed"}, self.settings.delay)
        greeting = "you looked around" if viewed else "welcome"
        await self.send_message("hello", self.settings.template, HelloContext(greeting))
        return await self.finish("greeted")


@dataclass
class ReceiptContext:
    order_id: str


@workflow.defn(name="TestReceipt")
class Receipt(Journey[None]):
    """Started by a purchase, so a purchase does not end it; its message is transactional."""

    kind = "test-receipt"
    starts_on = frozenset({"Order Completed"})
    ends_on_purchase = False

    @workflow.run
    async def run(self, start: JourneyInput) -> JourneyResult:
        return await self.run_journey(self.steps)

    async def steps(self) -> JourneyResult:
        order = self.start_event
        order_id = str(order.properties.get("order_id")) if order else "?"
        await self.send_message(
            "receipt", "cart_reminder", ReceiptContext(order_id), marketing=False
        )
        return await self.finish("sent")


@workflow.defn(name="TestBrowse")
class Browse(Journey[None]):
    """Gives way to a cart: a ``Product Added`` ends it ``carted``."""

    kind = "test-browse"
    starts_on = frozenset({"Product Viewed"})
    exits_on = {"Product Added": "carted"}

    @workflow.run
    async def run(self, start: JourneyInput) -> JourneyResult:
        return await self.run_journey(self.steps)

    async def steps(self) -> JourneyResult:
        await self.pause(4 * 3600, "a cart or an order")
        return await self.finish("browsed")


@dataclass
class LifeContext:
    turn: int


@workflow.defn(name="TestLifecycle")
class Lifecycle(Journey[None]):
    """Lives for ever: a turn a day, continuing as new to keep its history small."""

    kind = "test-lifecycle"
    starts_on = frozenset({"Signed Up"})

    @workflow.run
    async def run(self, start: JourneyInput) -> JourneyResult:
        return await self.run_journey(self.steps)

    def carry(self) -> dict[str, int]:
        return {"turns": self.turns}

    def restore(self, carried: dict[str, int]) -> None:
        self.turns = carried["turns"]

    async def steps(self) -> JourneyResult:
        self.turns = getattr(self, "turns", 0)
        while self.turns < 12:
            await self.pause(86400, "the next turn")
            self.turns += 1
            await self.continue_as_new_when_due(history_limit=20)
        return await self.finish(f"turns:{self.turns}")
