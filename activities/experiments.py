"""The ``promote_experiment_winners`` activity: the experiment promoter's one step."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from temporalio import activity

from activities.types import PromoteInput, PromoteResult
from kaeru.analytics.model import Period
from kaeru.db import session
from kaeru.experiments import promote_winners
from kaeru.settings import Settings


class ExperimentActivities:
    """The experiment promoter's activity, with its settings injected."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @activity.defn(name="promote_experiment_winners")
    async def promote_experiment_winners(self, wanted: PromoteInput) -> PromoteResult:
        """Record each significant winner among journeys entered in the last ``wanted.days``
        days (nothing when ``KAERU_EXPERIMENT_AUTO_PROMOTE`` is off)."""
        return await asyncio.to_thread(self._promote, wanted)

    def _promote(self, wanted: PromoteInput) -> PromoteResult:
        now = datetime.now(UTC)
        # Entries whose attribution window has passed: a later entry has no verdict yet.
        settled = now - self.settings.attribution_window
        period = Period(settled - timedelta(days=wanted.days), settled)
        with session(self.settings.resolved_database_url) as s:
            promoted = promote_winners(s, self.settings, period, now=now)
            names = [f"{p.journey_kind} {p.experiment}: {p.variant}" for p in promoted]
        for name in names:
            activity.logger.info("promoted the winner of %s", name)
        return PromoteResult(promoted=names)
