"""Holds: a journey waits before its next outside step instead of acting.

Two things hold a journey. The kill switch (kaeru/kill_switch.py, ``kaeru kill-switch``) is
read by the worker as an outside activity starts: when a switch covers the journey's kind, the
activity fails with :data:`HELD_BY_KILL_SWITCH` without acting, and the kit
(``Journey.call``) waits for a ``resume`` signal, then calls it again with the same input and
idempotency key. A pause (``kaeru journeys pause``) is a signal that makes the kit wait the
same way before its next outside step, without asking the activity. A held marketing email
asks the send gate again when released (its slot was granted before the hold): it may wait
for quiet hours or a cap, or be dropped past its stale limit.

Pure: the workflow sandbox passes this module through. Every name here is a contract with
running journeys and saved queries: never rename one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from temporalio.api.common.v1 import Payload
from temporalio.worker import (
    StartActivityInput,
    WorkflowInboundInterceptor,
    WorkflowOutboundInterceptor,
)
from temporalio.workflow import ActivityHandle

#: The header on an outside activity whose workflow code knows holds: the kill switch holds
#: only those. During a rolling deploy a workflow task on a worker of the previous version
#: starts its activities without it, so its journey acts as it always did (a hold there
#: would end it ``failed``) instead of being held.
HOLDS_HEADER = "kaeru-holds"
#: The ``ApplicationError`` type of an outside activity the kill switch held (it did not act).
HELD_BY_KILL_SWITCH = "KillSwitchHeld"
#: The scope of the global kill switch (a switch's scope is else a journey kind).
GLOBAL = "*"
#: Signals: hold before the next outside step / go on.
PAUSE_SIGNAL = "pause"
RESUME_SIGNAL = "resume"
#: ``KaeruHeld`` values: what holds the journey.
KILL_SWITCH = "kill-switch"
PAUSED = "paused"
#: ``ResumeJourney.scope``: what a resume releases. ``kill-switch`` (sent when a switch goes
#: off) only lets a held outside step try again; ``journey`` (``kaeru journeys resume``) also
#: ends an operator's pause.
RELEASE_KILL_SWITCH = KILL_SWITCH
RELEASE_JOURNEY = "journey"

#: The activities that act on the world for a journey (mail out, a coupon that can be spent,
#: an ad audience join): the steps the kill switch and a pause hold. Not held: reads (product
#: look-ups, recommendations), kaeru's own bookkeeping (entries, conversions, the send gate's
#: reservation) and removals from audiences, which only undo what a journey did and run as a
#: journey ends (a purchase or a cancel must still take the shopper out).
OUTSIDE_ACTIVITIES = frozenset(
    {"send_email", "issue_coupon", "add_to_audience", "queue_audience_join"}
)


@dataclass
class PauseJourney:
    """The ``pause`` signal: hold before the next outside step until a ``resume``."""

    reason: str = ""
    #: Who asked (``cli:<os user>``, an operator account): for the story.
    actor: str = ""


@dataclass
class ResumeJourney:
    """The ``resume`` signal: let a held outside step try again (see :data:`RELEASE_JOURNEY`)."""

    scope: str = RELEASE_JOURNEY
    actor: str = ""
    #: Why (``kaeru journeys resume --reason``): for the story.
    reason: str = ""


class KnowsHolds(WorkflowInboundInterceptor):
    """The workflow side of the kill switch: marks each outside activity with
    :data:`HOLDS_HEADER` (kaeru/kill_switch.py installs it on the worker)."""

    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(_MarkOutsideActivities(outbound))


class _MarkOutsideActivities(WorkflowOutboundInterceptor):
    def start_activity(self, input: StartActivityInput) -> ActivityHandle[Any]:
        if input.activity in OUTSIDE_ACTIVITIES:
            input.headers = {**input.headers, HOLDS_HEADER: Payload(data=b"1")}
        return super().start_activity(input)
