"""``kaeru kill-switch`` and ``kaeru journeys pause|resume|cancel``: stop and steer journeys.

The kill switch is in the database (kaeru/kill_switch.py); a switch that goes off releases the
journeys it held by a ``resume`` signal to each, found through visibility (``KaeruHeld``).
Every change is recorded in the audit log with the CLI's actor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from typing import Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table
from temporalio.client import Client, WorkflowExecutionDescription, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from kaeru import audit
from kaeru.cli import (
    connected,
    console,
    database_problems,
    database_url_checked,
    errors,
    fail,
    load_settings,
    run,
)
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
from kaeru.serving import StackError
from kaeru.settings import Settings
from kaeru.temporal import missing_search_attributes
from workflows.kit import HOLD_RECHECK_MAX

#: How long ``journeys cancel`` waits to see the journey end before it says it was asked.
CANCEL_WAIT = 10.0
HELD_BY_SWITCH = f'{HELD.name} = "{KILL_SWITCH}" AND ExecutionStatus = "Running"'


def say(text: str) -> None:
    """Print a line unwrapped: a command in it stays copyable."""
    console.print(text, soft_wrap=True)


#: What to say when the namespace lacks ``KaeruHeld``: a held journey's upsert of it would fail
#: its workflow task on every try (it sends nothing, and goes on once the attribute exists).
NO_HELD_ATTRIBUTE = (
    f"the Temporal namespace has no {HELD.name} search attribute: a held journey cannot show "
    "it and stops until it is added",
    f"Run `kaeru setup` (on Temporal Cloud, add {HELD.name} as a Keyword in the namespace).",
)


async def _held_attribute_missing(client: Client, namespace: str) -> bool:
    try:
        return HELD.name in await missing_search_attributes(client, namespace)
    except RPCError:
        return False  # cannot tell (a server or an API key that does not list them)


def _journeys(settings: Settings) -> dict[str, JourneyKind]:
    """Workflow type → kind, for every journey this deployment knows."""
    return {
        route.workflow_name: JourneyKind(route.kind, route.journey.transactional)
        for route in load_registry(settings).routes
    }


def _scope_of(kind: str | None, journeys: dict[str, JourneyKind]) -> str:
    if kind is None:
        return GLOBAL
    kinds = sorted(j.kind for j in journeys.values())
    if kind not in kinds:
        fail(f"there is no journey kind {kind!r}", f"Give one of: {', '.join(kinds)}.")
    return kind


def _named(scope: str) -> str:
    return "the global kill switch" if scope == GLOBAL else f"the {scope} kill switch"


def _covers(switch: KillSwitch) -> str:
    if switch.scope != GLOBAL:
        return f"{switch.scope} journeys"
    return "every journey" if switch.include_transactional else "marketing journeys"


# ---- kaeru kill-switch ----------------------------------------------------------------------

kill_switch_app = typer.Typer(
    help="The kill switch: journeys wait before their next email, coupon or ad audience join "
    "instead of acting, until it goes off.",
    no_args_is_help=True,
)

KindOption = Annotated[
    str | None,
    typer.Option(
        "--kind", help="One journey kind (e.g. cart-abandonment); without it, the global switch."
    ),
]


def kill_switch_on(
    kind: KindOption = None,
    reason: Annotated[str, typer.Option(help="Why, for the story and the status.")] = "",
    include_transactional: Annotated[
        bool,
        typer.Option(
            "--all",
            help="The global switch holds transactional journeys (order confirmations) too.",
        ),
    ] = False,
) -> None:
    """Turn a kill switch on: the journeys it covers (and those that start while it is on)
    wait before their next outside step."""
    settings = load_settings()
    journeys = _journeys(settings)
    scope = _scope_of(kind, journeys)
    if include_transactional and scope != GLOBAL:
        fail(
            "--all is for the global switch: a kind's switch holds that kind, transactional or not",
            f"Run `kaeru kill-switch on --kind {scope}` without --all.",
        )
    url, label = database_url_checked(settings)
    actor = audit.cli_actor()
    with database_problems(label):
        switch, changed = turn_on(
            url, scope, actor=actor, reason=reason, include_transactional=include_transactional
        )
    if not changed:
        say(
            f"{_named(scope).capitalize()} was already on (since {switch.since:%Y-%m-%d %H:%M:%S}"
            f" UTC, by {switch.actor}): nothing was changed."
        )
        return
    audit.record(
        url,
        actor,
        "kill_switch.on",
        scope,
        {"reason": reason, "include_transactional": include_transactional},
    )
    cache = int(settings.kill_switch_cache.total_seconds())
    off = "kaeru kill-switch off" + ("" if scope == GLOBAL else f" --kind {scope}")
    say(
        f"{_named(scope).capitalize()} is on: {_covers(switch)} wait before their next email, "
        f"coupon or audience join (workers see it within {cache} s). Release them with `{off}`."
    )
    if scope == GLOBAL and not include_transactional:
        say("Transactional messages (order confirmations) still go out: --all holds them.")


def kill_switch_off(kind: KindOption = None) -> None:
    """Turn a kill switch off and release the journeys it held: each sends what it held, once."""
    settings = load_settings()
    journeys = _journeys(settings)
    scope = _scope_of(kind, journeys)
    url, label = database_url_checked(settings)
    with database_problems(label):
        switch = turn_off(url, scope)
        still_on = switches(url)
    if switch is None:
        fail(
            f"{_named(scope)} is not on: nothing was changed",
            "See what is on with `kaeru kill-switch status`.",
        )
    actor = audit.cli_actor()
    audit.record(
        url,
        actor,
        "kill_switch.off",
        scope,
        {"on_since": switch.since.isoformat(), "turned_on_by": switch.actor},
    )
    on_their_own = f"they try again on their own within {_spoken(HOLD_RECHECK_MAX)}"
    try:
        released, failed = asyncio.run(_release(settings, journeys, scope, still_on, actor))
    except (StackError, RPCError) as exc:
        problem = exc.message if isinstance(exc, RPCError) else str(exc)
        fail(
            f"{_named(scope)} is off, but the journeys it held could not be released ({problem})",
            f"Without a release {on_their_own}.",
        )
    say(
        f"{_named(scope).capitalize()} is off: released {released} held journey(s); they go on "
        "at once."
    )
    if failed:
        fail(f"{failed} held journey(s) could not be signalled: {on_their_own}")


def _spoken(wait: timedelta) -> str:
    seconds = wait.total_seconds()
    return f"{seconds / 3600:g} hour(s)" if seconds >= 3600 else f"{seconds / 60:g} minute(s)"


async def _release(
    settings: Settings,
    journeys: dict[str, JourneyKind],
    scope: str,
    still_on: Sequence[KillSwitch],
    actor: str,
) -> tuple[int, int]:
    """Signal ``resume`` to every journey held by the switch that went off and by no other."""
    client = await connected(settings)
    query = HELD_BY_SWITCH
    if scope != GLOBAL:
        names = [name for name, j in journeys.items() if j.kind == scope]
        query += f' AND WorkflowType = "{names[0]}"'
    held = [w async for w in client.list_workflows(query)]
    todo = []
    for execution in held:
        journey = journeys.get(execution.workflow_type)
        if journey is not None and covering(still_on, journey.kind, journey.transactional):
            continue  # another switch still holds it
        todo.append(execution.id)
    released = failed = 0
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("releasing held journeys", total=len(todo))
        for workflow_id in todo:
            try:
                await client.get_workflow_handle(workflow_id).signal(
                    RESUME_SIGNAL, ResumeJourney(scope=RELEASE_KILL_SWITCH, actor=actor)
                )
                released += 1
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:  # ended meanwhile: nothing to release
                    failed += 1
            progress.advance(task)
    return released, failed


def kill_switch_status() -> None:
    """What is on, since when, by whom, and how many journeys each holds now."""
    settings = load_settings()
    journeys = _journeys(settings)
    url, label = database_url_checked(settings)
    with database_problems(label):
        on = switches(url)
    counts, paused = run(_held_counts(settings, journeys, on))
    if not on:
        say("No kill switch is on.")
    else:
        table = Table(box=None, header_style="bold")
        for column in ("switch", "holds", "since (UTC)", "by", "reason", "held now"):
            table.add_column(column)
        for switch in on:
            held = counts.get(switch.scope)
            table.add_row(
                "global" if switch.scope == GLOBAL else switch.scope,
                _covers(switch),
                f"{switch.since:%Y-%m-%d %H:%M:%S}",
                switch.actor,
                switch.reason or "-",
                "?" if held is None else str(held),
            )
        console.print(table)
    if paused is None:
        say(
            "Held journeys not counted: Temporal could not be asked (check KAERU_TEMPORAL_ADDRESS)."
        )
    elif paused:
        say(f"{paused} journey(s) paused by an operator (`kaeru journeys resume <id>`).")


async def _held_counts(
    settings: Settings, journeys: dict[str, JourneyKind], on: Sequence[KillSwitch]
) -> tuple[dict[str, int], int | None]:
    """Held journeys per switch, and paused ones; ``({}, None)`` when Temporal cannot answer."""
    try:
        client = await connected(settings)
        counts: dict[str, int] = {}
        for switch in on:
            if switch.scope != GLOBAL:
                names = [n for n, j in journeys.items() if j.kind == switch.scope]
                query = f'{HELD_BY_SWITCH} AND WorkflowType = "{names[0]}"' if names else None
                counts[switch.scope] = (await client.count_workflows(query)).count if query else 0
        if any(s.scope == GLOBAL for s in on):
            total = (await client.count_workflows(HELD_BY_SWITCH)).count
            counts[GLOBAL] = total - sum(counts.values())
        paused_query = f'{HELD.name} = "{PAUSED}" AND ExecutionStatus = "Running"'
        paused = (await client.count_workflows(paused_query)).count
        if await _held_attribute_missing(client, settings.temporal_namespace):
            errors.print(" ".join(NO_HELD_ATTRIBUTE), soft_wrap=True)
    except (StackError, RPCError):  # the switches are shown whatever Temporal says
        return {}, None
    return counts, paused


kill_switch_app.command("on")(kill_switch_on)
kill_switch_app.command("off")(kill_switch_off)
kill_switch_app.command("status")(kill_switch_status)


# ---- kaeru journeys pause | resume | cancel ---------------------------------------------------

journeys_app = typer.Typer(
    help="Journeys: list them, show one, pause, resume or cancel one.", no_args_is_help=True
)

JourneyIdArg = Annotated[
    str, typer.Argument(help="The journey's workflow id, e.g. cart-abandonment-c-42.")
]


async def _running(
    client: Client, workflow_id: str, journeys: dict[str, JourneyKind]
) -> WorkflowExecutionDescription:
    """The description of a running journey, or a clear failure."""
    try:
        description = await client.get_workflow_handle(workflow_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            fail(
                f"there is no journey with id {workflow_id!r}",
                "Journey ids are <kind>-<customer id>: find it in the Temporal UI "
                "(search KaeruCustomerId).",
            )
        raise
    if description.workflow_type not in journeys:
        fail(f"{workflow_id!r} is a {description.workflow_type} workflow, not a journey")
    if description.status != WorkflowExecutionStatus.RUNNING:
        status = description.status.name.lower() if description.status else "ended"
        outcome = description.typed_search_attributes.get(OUTCOME)
        said = f", outcome {outcome}" if outcome else ""
        fail(f"journey {workflow_id!r} has already ended ({status}{said}): nothing was changed")
    return description


def _steer(coro_of: Any) -> Any:
    """Run a journey command, turning a Temporal failure into one line with the fix."""
    try:
        return run(coro_of)
    except RPCError as err:
        fail(f"Temporal refused: {err.message}", "Check KAERU_TEMPORAL_ADDRESS and try again.")


def journeys_pause(
    workflow_id: JourneyIdArg,
    reason: Annotated[str, typer.Option(help="Why, for the journey's story.")] = "",
) -> None:
    """Pause one journey: it waits before its next email, coupon or audience join until
    `kaeru journeys resume`. Its waits go on, and a purchase still ends it."""
    settings = load_settings()
    journeys = _journeys(settings)
    url, _ = database_url_checked(settings)
    actor = audit.cli_actor()

    async def pause() -> bool:
        client = await connected(settings)
        description = await _running(client, workflow_id, journeys)
        if description.typed_search_attributes.get(HELD) == PAUSED:
            return False
        if await _held_attribute_missing(client, settings.temporal_namespace):
            fail(*NO_HELD_ATTRIBUTE)
        await client.get_workflow_handle(workflow_id).signal(
            PAUSE_SIGNAL, PauseJourney(reason=reason, actor=actor)
        )
        return True

    if not _steer(pause()):
        say(f"Journey {workflow_id} already is paused: nothing was changed.")
        return
    audit.record(url, actor, "journey.pause", workflow_id, {"reason": reason})
    say(
        f"Paused {workflow_id}: it waits before its next email, coupon or audience join. "
        f"Resume it with `kaeru journeys resume {workflow_id}`."
    )


def journeys_resume(workflow_id: JourneyIdArg) -> None:
    """Resume a paused or held journey: what it held goes out once."""
    settings = load_settings()
    journeys = _journeys(settings)
    url, label = database_url_checked(settings)
    actor = audit.cli_actor()

    async def resume() -> tuple[str | None, str]:
        client = await connected(settings)
        description = await _running(client, workflow_id, journeys)
        held = description.typed_search_attributes.get(HELD)
        if held is not None:
            await client.get_workflow_handle(workflow_id).signal(
                RESUME_SIGNAL, ResumeJourney(scope=RELEASE_JOURNEY, actor=actor)
            )
        return held, description.workflow_type

    held, workflow_type = _steer(resume())
    if held is None:
        fail(
            f"journey {workflow_id!r} is neither paused nor held: nothing was changed",
            f"Pause it with `kaeru journeys pause {workflow_id}`.",
        )
    audit.record(url, actor, "journey.resume", workflow_id, {"was": held})
    say(f"Resumed {workflow_id}: it goes on with the step it held.")
    with database_problems(label):
        on = switches(url)
    journey = journeys[workflow_type]
    switch = covering(on, journey.kind, journey.transactional)
    if switch is not None:
        say(
            f"{_named(switch.scope).capitalize()} is still on: the journey is held again at its "
            "next email, coupon or audience join."
        )


def journeys_cancel(
    workflow_id: JourneyIdArg,
    reason: Annotated[
        str, typer.Option(help="Why, recorded in its history and the audit log.")
    ] = "",
) -> None:
    """Cancel one journey: it ends at once with outcome `cancelled`, taking the shopper out of
    the ad audiences it put them in; nothing else is sent."""
    settings = load_settings()
    journeys = _journeys(settings)
    url, _ = database_url_checked(settings)
    actor = audit.cli_actor()

    async def cancel() -> bool:
        client = await connected(settings)
        await _running(client, workflow_id, journeys)
        handle = client.get_workflow_handle(workflow_id)
        await handle.cancel(reason=reason or f"cancelled by {actor}")
        for _ in range(int(CANCEL_WAIT * 10)):
            if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
                return True
            await asyncio.sleep(0.1)
        return False

    ended = _steer(cancel())
    audit.record(url, actor, "journey.cancel", workflow_id, {"reason": reason})
    if ended:
        say(f"Cancelled {workflow_id}: it ended cancelled and left its ad audiences.")
    else:
        say(
            f"Cancel of {workflow_id} requested: it ends as soon as a worker takes it (none did "
            f"within {CANCEL_WAIT:.0f} s: is `kaeru worker` running?)."
        )


journeys_app.command("pause")(journeys_pause)
journeys_app.command("resume")(journeys_resume)
journeys_app.command("cancel")(journeys_cancel)
