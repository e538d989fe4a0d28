"""A journey whose kind (``test``) prefixes the kinds of tests/journeys/hello.py: the workflow
id ``test-hello-u1`` is a ``test-hello`` journey, not a ``test`` one of customer ``hello-u1``
(tests/starter/test_touchpoints.py)."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from workflows.kit import Journey, JourneyInput, JourneyResult


@workflow.defn(name="TestShortKind")
class ShortKind(Journey[None]):
    kind = "test"
    starts_on = frozenset({"Short Kind Tested"})

    @workflow.run
    async def run(self, start: JourneyInput) -> JourneyResult:
        return await self.run_journey(self.steps)

    async def steps(self) -> JourneyResult:
        return await self.finish("done")
