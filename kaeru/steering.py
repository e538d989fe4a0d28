"""Steering journeys: the kill switch, and pause, resume or cancel of one journey.

What ``kaeru kill-switch`` and ``kaeru journeys pause|resume|cancel`` (kaeru/cli_hold.py) and
the admin API (starter/steering.py) both do: each check, change and audit entry is here once,
and each refusal is a :class:`SteeringError` that the CLI prints and the API answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from temporalio.client import Client, WorkflowExecutionDescription, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from kaeru import audit
from kaeru.holds import (
    GLOBAL,
    KILL_SWITCH,
    PAUSE_SIGNAL,
    PAUSED,
    RELEASE_JOURNEY,
    RELEASE_KILL_SWITCH,
    RESUME_SIGNAL,
    PauseJourney,
    ResumeJourney,
)
from kaeru.journeys import load_registry
from kaeru.kill_switch import JourneyKind, covering, switches, turn_off, turn_on
from kaeru.models import KillSwitch
from kaeru.search_attributes import HELD, OUTCOME
from kaeru.settings import Settings
from kaeru.temporal import missing_search_attributes

#: How long a cancel waits to see the journey end before it says it was asked.
CANCEL_WAIT = 10.0
HELD_BY_SWITCH = f'{HELD.name} = "{KILL_SWITCH}" AND ExecutionStatus = "Running"'
PAUSED_NOW = f'{HELD.name} = "{PAUSED}" AND ExecutionStatus = "Running"'


class SteeringError(Exception):
    """A refusal: ``code`` for the API (:data:`STATUS_OF` gives its HTTP status), the problem
    and the lines of its fix for people."""

    def __init__(self, code: str, problem: str, *fix: str) -> None:
        super().__init__(problem)
        self.code = code
        self.problem = problem
        self.fix = fix

    @property
    def message(self) -> str:
        return " ".join((self.problem + ".", *self.fix)) if self.fix else self.problem


#: The HTTP status of each :class:`SteeringError` code.
STATUS_OF = {
    "unknown_kind": 422,
    "bad_request": 422,
    "not_found": 404,
    "not_a_journey": 404,
    "ended": 409,
    "not_on": 409,
    "not_held": 409,
    "no_held_attribute": 409,
}

#: What to say when the namespace lacks ``KaeruHeld``: a held journey's upsert of it would fail
#: its workflow task on every try (it sends nothing, and goes on once the attribute exists).
NO_HELD_ATTRIBUTE = (
    f"the Temporal namespace has no {HELD.name} search attribute: a held journey cannot show "
    "it and stops until it is added",
    f"Run `kaeru setup` (on Temporal Cloud, add {HELD.name} as a Keyword in the namespace).",
)


async def held_attribute_missing(client: Client, namespace: str) -> bool:
    try:
        return HELD.name in await missing_search_attributes(client, namespace)
    except RPCError:
        return False  # cannot tell (a server or an API key that does not list them)


def journeys_of(settings: Settings) -> dict[str, JourneyKind]:
    """Workflow type → kind, for every journey this deployment knows."""
    return {
        route.workflow_name: JourneyKind(route.kind, route.journey.transactional)
        for route in load_registry(settings).routes
    }


def scope_of(kind: str | None, journeys: dict[str, JourneyKind]) -> str:
    """The switch's scope: :data:`GLOBAL` without a kind, else the kind, which must exist."""
    if kind is None:
        return GLOBAL
    kinds = sorted(j.kind for j in journeys.values())
    if kind not in kinds:
        raise SteeringError(
            "unknown_kind",
            f"there is no journey kind {kind!r}",
            f"Give one of: {', '.join(kinds)}.",
        )
    return kind


def named(scope: str) -> str:
    return "the global kill switch" if scope == GLOBAL else f"the {scope} kill switch"


def covers(switch: KillSwitch) -> str:
    if switch.scope != GLOBAL:
        return f"{switch.scope} journeys"
    return "every journey" if switch.include_transactional else "marketing journeys"


# ---- the kill switch ------------------------------------------------------------------------


def switch_on(
    url: str,
    journeys: dict[str, JourneyKind],
    kind: str | None,
    *,
    actor: str,
    reason: str,
    include_transactional: bool,
) -> tuple[KillSwitch, bool]:
    """Turn a switch on (audited when it changed). Returns the switch and whether this call
    turned it on (False: it already was, left as it was)."""
    scope = scope_of(kind, journeys)
    if include_transactional and scope != GLOBAL:
        raise SteeringError(
            "bad_request",
            "--all is for the global switch: a kind's switch holds that kind, transactional or not",
            f"Run `kaeru kill-switch on --kind {scope}` without --all.",
        )
    switch, changed = turn_on(
        url, scope, actor=actor, reason=reason, include_transactional=include_transactional
    )
    if changed:
        audit.record(
            url,
            actor,
            "kill_switch.on",
            scope,
            {"reason": reason, "include_transactional": include_transactional},
        )
    return switch, changed


def switch_off(
    url: str, journeys: dict[str, JourneyKind], kind: str | None, *, actor: str
) -> tuple[KillSwitch, list[KillSwitch]]:
    """Turn a switch off (audited). Returns the switch it was and the switches still on,
    for :func:`held_by`."""
    scope = scope_of(kind, journeys)
    switch = turn_off(url, scope)
    if switch is None:
        raise SteeringError(
            "not_on",
            f"{named(scope)} is not on: nothing was changed",
            "See what is on with `kaeru kill-switch status`.",
        )
    audit.record(
        url,
        actor,
        "kill_switch.off",
        scope,
        {"on_since": switch.since.isoformat(), "turned_on_by": switch.actor},
    )
    return switch, switches(url)


async def held_by(
    client: Client,
    journeys: dict[str, JourneyKind],
    scope: str,
    still_on: Sequence[KillSwitch],
) -> list[str]:
    """Ids of the journeys held by the ``scope`` switch (that went off) and by no other."""
    query = HELD_BY_SWITCH
    if scope != GLOBAL:
        names = [name for name, j in journeys.items() if j.kind == scope]
        query += f' AND WorkflowType = "{names[0]}"'
    todo = []
    async for execution in client.list_workflows(query):
        journey = journeys.get(execution.workflow_type)
        if journey is not None and covering(still_on, journey.kind, journey.transactional):
            continue  # another switch still holds it
        todo.append(execution.id)
    return todo


async def release(
    client: Client, ids: Sequence[str], actor: str, advance: Callable[[], None] | None = None
) -> tuple[int, int]:
    """Signal ``resume`` to each held journey: (released, failed to signal)."""
    released = failed = 0
    for workflow_id in ids:
        try:
            await client.get_workflow_handle(workflow_id).signal(
                RESUME_SIGNAL, ResumeJourney(scope=RELEASE_KILL_SWITCH, actor=actor)
            )
            released += 1
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:  # ended meanwhile: nothing to release
                failed += 1
        if advance is not None:
            advance()
    return released, failed


async def held_counts(
    client: Client, journeys: dict[str, JourneyKind], on: Sequence[KillSwitch]
) -> tuple[dict[str, int], int]:
    """Held journeys per switch that is on, and journeys paused by an operator."""
    counts: dict[str, int] = {}
    for switch in on:
        if switch.scope != GLOBAL:
            names = [n for n, j in journeys.items() if j.kind == switch.scope]
            query = f'{HELD_BY_SWITCH} AND WorkflowType = "{names[0]}"' if names else None
            counts[switch.scope] = (await client.count_workflows(query)).count if query else 0
    if any(s.scope == GLOBAL for s in on):
        total = (await client.count_workflows(HELD_BY_SWITCH)).count
        counts[GLOBAL] = total - sum(counts.values())
    paused = (await client.count_workflows(PAUSED_NOW)).count
    return counts, paused


# ---- one journey ----------------------------------------------------------------------------


async def running(
    client: Client, workflow_id: str, journeys: dict[str, JourneyKind]
) -> WorkflowExecutionDescription:
    """The description of a running journey.

    Raises:
        SteeringError: no such workflow, not a journey, or it has ended.
    """
    try:
        description = await client.get_workflow_handle(workflow_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise SteeringError(
                "not_found",
                f"there is no journey with id {workflow_id!r}",
                "Journey ids are <kind>-<customer id>: find it in the Temporal UI "
                "(search KaeruCustomerId).",
            ) from err
        raise
    if description.workflow_type not in journeys:
        raise SteeringError(
            "not_a_journey",
            f"{workflow_id!r} is a {description.workflow_type} workflow, not a journey",
        )
    if description.status != WorkflowExecutionStatus.RUNNING:
        status = description.status.name.lower() if description.status else "ended"
        outcome = description.typed_search_attributes.get(OUTCOME)
        said = f", outcome {outcome}" if outcome else ""
        raise SteeringError(
            "ended",
            f"journey {workflow_id!r} has already ended ({status}{said}): nothing was changed",
        )
    return description


async def pause(
    client: Client,
    settings: Settings,
    journeys: dict[str, JourneyKind],
    workflow_id: str,
    *,
    reason: str,
    actor: str,
) -> bool:
    """Pause a running journey (audited); False when it already was paused."""
    description = await running(client, workflow_id, journeys)
    if description.typed_search_attributes.get(HELD) == PAUSED:
        return False
    if await held_attribute_missing(client, settings.temporal_namespace):
        raise SteeringError("no_held_attribute", *NO_HELD_ATTRIBUTE)
    await client.get_workflow_handle(workflow_id).signal(
        PAUSE_SIGNAL, PauseJourney(reason=reason, actor=actor)
    )
    await asyncio.to_thread(
        audit.record,
        settings.resolved_database_url,
        actor,
        "journey.pause",
        workflow_id,
        {"reason": reason},
    )
    return True


@dataclass(frozen=True)
class Resumed:
    """What a resume released (``KaeruHeld`` as it was) and the switch that still covers the
    journey, if any: it is held again at its next outside step."""

    was: str
    still_held_by: KillSwitch | None


async def resume(
    client: Client,
    settings: Settings,
    journeys: dict[str, JourneyKind],
    workflow_id: str,
    *,
    actor: str,
    reason: str = "",
) -> Resumed:
    """Resume a paused or held journey (audited, with ``reason``, which its story tells too).

    Raises:
        SteeringError: as :func:`running`, or the journey is neither paused nor held.
    """
    description = await running(client, workflow_id, journeys)
    held = description.typed_search_attributes.get(HELD)
    if held is None:
        raise SteeringError(
            "not_held",
            f"journey {workflow_id!r} is neither paused nor held: nothing was changed",
            f"Pause it with `kaeru journeys pause {workflow_id}`.",
        )
    await client.get_workflow_handle(workflow_id).signal(
        RESUME_SIGNAL, ResumeJourney(scope=RELEASE_JOURNEY, actor=actor, reason=reason)
    )
    url = settings.resolved_database_url
    detail = {"was": held, "reason": reason}
    await asyncio.to_thread(audit.record, url, actor, "journey.resume", workflow_id, detail)
    on = await asyncio.to_thread(switches, url)
    journey = journeys[description.workflow_type]
    return Resumed(held, covering(on, journey.kind, journey.transactional))


async def cancel(
    client: Client,
    settings: Settings,
    journeys: dict[str, JourneyKind],
    workflow_id: str,
    *,
    reason: str,
    actor: str,
    wait: float = CANCEL_WAIT,
) -> bool:
    """Cancel a running journey (audited); True when it ended within ``wait`` seconds (else
    it ends as soon as a worker takes it)."""
    await running(client, workflow_id, journeys)
    handle = client.get_workflow_handle(workflow_id)
    await handle.cancel(reason=reason or f"cancelled by {actor}")
    await asyncio.to_thread(
        audit.record,
        settings.resolved_database_url,
        actor,
        "journey.cancel",
        workflow_id,
        {"reason": reason},
    )
    for _ in range(int(wait * 10)):
        if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
            return True
        await asyncio.sleep(0.1)
    return False
