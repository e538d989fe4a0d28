"""Journey entries: the kit's claim that enforces each journey kind's re-entry rule.

A journey with a re-entry rule (``Journey.reentry``) claims its entry as its first step; a
refused claim ends it at once with outcome ``not_reentered``. Journeys of one kind and customer
share a workflow id, so they never claim at the same time; the claim's key (workflow id,
first run id, generation) makes a retried or replayed claim answer as the first did.

Every journey the router starts also records its entry (``enter_journey``): one
``journey_entered`` touchpoint with its version and arm (an experiment's variant, or
``holdout``), the arms being the hash's unless an experiment's winner was promoted since.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from temporalio import activity

from activities.types import EntryClaim, EntryClaimResult, JourneyEntryInput, JourneyEntryResult
from kaeru.db import session
from kaeru.models import ExperimentPromotion, JourneyEntry, Touchpoint
from kaeru.settings import Settings
from kaeru.touchpoints import record_touchpoint
from kaeru.variants import HOLDOUT

JOURNEY_ENTERED = "journey_entered"


class EntryActivities:
    """The ``claim_journey_entry`` and ``enter_journey`` activities, with their settings."""

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

    @activity.defn(name="enter_journey")
    async def enter_journey(self, entry: JourneyEntryInput) -> JourneyEntryResult:
        """Record ``entry`` as a ``journey_entered`` touchpoint and answer its arms: a promoted
        winner replaces the hash's arm. A retry answers what the first recorded."""
        return await asyncio.to_thread(self._enter, entry)

    def _enter(self, entry: JourneyEntryInput) -> JourneyEntryResult:
        with session(self.settings.resolved_database_url) as s:
            recorded = s.exec(select(Touchpoint).where(Touchpoint.key == entry.key)).first()
            if recorded is not None:
                arms = recorded.detail.get("arms")
                return JourneyEntryResult(
                    arms=dict(arms) if isinstance(arms, dict) else {}, variant=recorded.variant
                )
            arms = dict(entry.arms)
            #: Experiments whose arm is a promoted winner, not the hash's: no longer randomised,
            #: so their results leave this entry out.
            given: list[str] = []
            if arms:
                promoted = s.exec(
                    select(ExperimentPromotion).where(
                        ExperimentPromotion.journey_kind == entry.kind,
                        col(ExperimentPromotion.experiment).in_(list(arms)),
                    )
                ).all()
                for promotion in promoted:
                    if promotion.variant in entry.variants.get(promotion.experiment, []):
                        arms[promotion.experiment] = promotion.variant
                        given.append(promotion.experiment)
            variant = HOLDOUT if entry.held_out else None
            if variant is None and len(arms) == 1:
                variant = next(iter(arms.values()))
            try:
                record_touchpoint(
                    s,
                    customer_id=entry.customer_id,
                    kind=JOURNEY_ENTERED,
                    key=entry.key,
                    journey_id=entry.journey_id,
                    journey_kind=entry.kind,
                    variant=variant,
                    occurred_at=datetime.fromtimestamp(entry.at, UTC),
                    detail={"version": entry.version, "arms": arms}
                    | ({"promoted": given} if given else {}),
                )
                s.commit()
            except IntegrityError:  # a retry of this entry stored it first: answer as it did
                s.rollback()
                return self._enter(entry)
        return JourneyEntryResult(arms=arms, variant=variant)
