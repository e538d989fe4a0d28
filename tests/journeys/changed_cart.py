"""A candidate change to the cart journey, for tests/kaeru/test_deploy_check.py: the same
workflow name (``CartAbandonment``) with one more step before the cart's quiet wait: it asks
for related products (an activity) as soon as the journey starts.

:class:`UnpatchedCart` adds the step as is, which a journey already asleep in that wait cannot
replay; :class:`PatchedCart` adds it under ``workflow.patched()``, which it can. ``kaeru
deploy-check --workflows tests.journeys.changed_cart:unpatched`` replays against the worker's
workflows with the cart journey swapped for one of them.

Not a module for ``KAERU_JOURNEY_MODULES``: both classes have the cart journey's kind.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from workflows.cart_abandonment import CartAbandonment, CartJourneyInput
    from workflows.kit import JourneyResult

#: The ``workflow.patched`` id of the change.
EXTRA_STEP = "test-cart-extra-step"


@workflow.defn(name="CartAbandonment")
class UnpatchedCart(CartAbandonment):
    """The change without a patch: every journey that started before it breaks."""

    @workflow.run
    async def run(self, start: CartJourneyInput) -> JourneyResult:
        return await self.run_journey(self.steps)

    async def steps(self) -> JourneyResult:
        self.enter("warming_up")
        await self.related_products()
        return await super().steps()


@workflow.defn(name="CartAbandonment")
class PatchedCart(CartAbandonment):
    """The same change under ``workflow.patched()``: journeys that started before it keep
    their path, new ones take the extra step."""

    @workflow.run
    async def run(self, start: CartJourneyInput) -> JourneyResult:
        return await self.run_journey(self.steps)

    async def steps(self) -> JourneyResult:
        if workflow.patched(EXTRA_STEP):
            self.enter("warming_up")
            await self.related_products()
        return await super().steps()


def _with(cart: type) -> list[type]:
    from worker import workflows  # not at the top: the sandbox imports this module

    return [cart if w is CartAbandonment else w for w in workflows()]


def unpatched() -> list[type]:
    """The worker's workflows, with the cart journey changed without a patch."""
    return _with(UnpatchedCart)


def patched() -> list[type]:
    """The worker's workflows, with the cart journey changed under ``workflow.patched()``."""
    return _with(PatchedCart)


def without_cart() -> list[type]:
    """The worker's workflows without the cart journey (a kind removed while journeys run)."""
    return [w for w in _with(CartAbandonment) if w is not CartAbandonment]
