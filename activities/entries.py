"""Journey entries: the kit's claim that enforces each journey kind's re-entry rule.

A journey with a re-entry rule (``Journey.reentry``) claims its entry as its first step; a
refused claim ends it at once with outcome ``not_reentered``. Journeys of one kind and customer
share a workflow id, so they never claim at the same time; the claim's key (workflow id,
first run id, generation) makes a retried or replayed claim answer as the first did.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from temporalio import activity

from activities.types import EntryClaim, EntryClaimResult
from kaeru.db import session
from kaeru.models import JourneyEntry
from kaeru.settings import Settings


class EntryActivities:
    """The ``claim_journey_entry`` activity, with its settings injected."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @activity.defn(name="claim_journey_entry")
    async def claim_journey_entry(self, claim: EntryClaim) -> EntryClaimResult:
        """Grant ``claim`` unless the customer entered the kind within its rule."""
        return await asyncio.to_thread(self._claim, claim)

    def _claim(self, claim: EntryClaim) -> EntryClaimResult:
        now = datetime.fromtimestamp(claim.at, UTC)
        with session(self.settings.resolved_database_url) as s:
            if s.get(JourneyEntry, claim.key) is not None:
                return EntryClaimResult(granted=True)
            query = select(JourneyEntry).where(
                JourneyEntry.kind == claim.kind, JourneyEntry.customer_id == claim.customer_id
            )
            if claim.every_seconds is not None:
                since = now - timedelta(seconds=claim.every_seconds)
                query = query.where(col(JourneyEntry.started_at) > since)
            earlier = s.exec(query.order_by(col(JourneyEntry.started_at).desc())).first()
            if earlier is not None:
                return EntryClaimResult(granted=False, previous_at=earlier.started_at.timestamp())
            s.add(
                JourneyEntry(
                    key=claim.key, kind=claim.kind, customer_id=claim.customer_id, started_at=now
                )
            )
            try:
                s.commit()
            except IntegrityError:  # a retry of this claim stored it first
                s.rollback()
        return EntryClaimResult(granted=True)
