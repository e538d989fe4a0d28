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
