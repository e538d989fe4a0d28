"""``kaeru kill-switch`` and ``kaeru journeys pause|resume|cancel``: stop and steer journeys.

The kill switch is in the database (kaeru/kill_switch.py); a switch that goes off releases the
journeys it held by a ``resume`` signal to each, found through visibility (``KaeruHeld``).
Every change is recorded in the audit log with the CLI's actor. The checks and changes are
kaeru/steering.py's; with ``KAERU_API_URL`` set, each command asks that deployment's admin API
(starter/steering.py) to do the same, with ``KAERU_OPERATOR_TOKEN`` instead of database and
Temporal credentials.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, NoReturn

import typer
from rich.progress import Progress
from rich.table import Table
from rich.text import Text
from temporalio.service import RPCError

from kaeru import audit, steering
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
from kaeru.holds import GLOBAL
from kaeru.kill_switch import JourneyKind, switches
from kaeru.models import KillSwitch
from kaeru.remote import RemoteError, admin_call, journey_path
from kaeru.serving import StackError
from kaeru.settings import Settings
from kaeru.steering import CANCEL_WAIT, NO_HELD_ATTRIBUTE, SteeringError, named
from workflows.kit import HOLD_RECHECK_MAX

__all__ = ["CANCEL_WAIT", "journeys_app", "kill_switch_app"]


def say(text: str) -> None:
    """Print a line unwrapped (a command in it stays copyable) and as it is: no rich markup,
    since reasons, ids and kinds in it are people's text (``stop [/] now``)."""
    console.print(text, soft_wrap=True, markup=False)


def refused(err: SteeringError) -> NoReturn:
    fail(err.problem, *err.fix)


def remote(settings: Settings, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """An admin API call to ``KAERU_API_URL``; its refusal printed with exit status 1."""
    try:
        return admin_call(settings, method, path, body)
    except RemoteError as exc:
        fail(str(exc))


@contextmanager
def refusals() -> Iterator[None]:
    try:
        yield
    except SteeringError as err:
        refused(err)


@dataclass(frozen=True)
class SwitchView:
    """A switch as the CLI shows it, read from the database or from the admin API."""

    scope: str
    covers: str
    since: datetime
    by: str
    reason: str
    held: int | None = None

    @classmethod
    def of(cls, switch: KillSwitch, held: int | None = None) -> SwitchView:
        return cls(
            switch.scope,
            steering.covers(switch),
            switch.since,
            switch.actor,
            switch.reason,
            held,
        )

    @classmethod
    def read(cls, answer: dict[str, Any]) -> SwitchView:
        return cls(
            answer["scope"],
            answer["covers"],
            datetime.fromisoformat(answer["since"]),
            answer["by"],
            answer["reason"],
            answer.get("held"),
        )


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
    if settings.api_url:
        answer = remote(
            settings,
            "POST",
            "/v1/admin/kill-switch/on",
            {"kind": kind, "all": include_transactional, "reason": reason},
        )
        view, changed = SwitchView.read(answer["switch"]), bool(answer["changed"])
        cache = float(answer["workers_see_it_within_seconds"])
    else:
        journeys = steering.journeys_of(settings)
        url, label = database_url_checked(settings)
        with refusals(), database_problems(label):
            switch, changed = steering.switch_on(
                url,
                journeys,
                kind,
                actor=audit.cli_actor(),
                reason=reason,
                include_transactional=include_transactional,
            )
        view, cache = SwitchView.of(switch), settings.kill_switch_cache.total_seconds()
    scope = view.scope
    if not changed:
        say(
            f"{named(scope).capitalize()} was already on (since {view.since:%Y-%m-%d %H:%M:%S}"
            f" UTC, by {view.by}): nothing was changed."
        )
        return
    off = "kaeru kill-switch off" + ("" if scope == GLOBAL else f" --kind {scope}")
    say(
        f"{named(scope).capitalize()} is on: {view.covers} wait before their next email, "
        f"coupon or audience join (workers see it within {int(cache)} s). Release them with "
        f"`{off}`."
    )
    if scope == GLOBAL and not include_transactional:
        say("Transactional messages (order confirmations) still go out: --all holds them.")


def kill_switch_off(kind: KindOption = None) -> None:
    """Turn a kill switch off and release the journeys it held: each sends what it held, once."""
    settings = load_settings()
    problem: str | None = None
    if settings.api_url:
        answer = remote(settings, "POST", "/v1/admin/kill-switch/off", {"kind": kind})
        scope = SwitchView.read(answer["switch"]).scope
        released, failed = int(answer["released"]), int(answer["failed"])
        problem = answer.get("release_problem")
    else:
        journeys = steering.journeys_of(settings)
        url, label = database_url_checked(settings)
        actor = audit.cli_actor()
        with refusals(), database_problems(label):
            switch, still_on = steering.switch_off(url, journeys, kind, actor=actor)
        scope = switch.scope
        try:
            released, failed = asyncio.run(_release(settings, journeys, scope, still_on, actor))
        except (StackError, RPCError) as exc:
            problem = exc.message if isinstance(exc, RPCError) else str(exc)
    on_their_own = f"they try again on their own within {_spoken(HOLD_RECHECK_MAX)}"
    if problem is not None:
        fail(
            f"{named(scope)} is off, but the journeys it held could not be released ({problem})",
            f"Without a release {on_their_own}.",
        )
    say(
        f"{named(scope).capitalize()} is off: released {released} held journey(s); they go on "
        "at once, a held email through the send gate again (quiet hours, caps, stale limit)."
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
    still_on: list[KillSwitch],
    actor: str,
) -> tuple[int, int]:
    """Signal ``resume`` to every journey held by the switch that went off and by no other."""
    client = await connected(settings)
    todo = await steering.held_by(client, journeys, scope, still_on)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("releasing held journeys", total=len(todo))
        return await steering.release(client, todo, actor, lambda: progress.advance(task))


def kill_switch_status() -> None:
    """What is on, since when, by whom, and how many journeys each holds now."""
    settings = load_settings()
    if settings.api_url:
        answer = remote(settings, "GET", "/v1/admin/kill-switch")
        views = [SwitchView.read(s) for s in answer["on"]]
        paused, problem = answer["paused"], answer.get("temporal_problem")
        if paused is None:
            problem = None  # said below
    else:
        journeys = steering.journeys_of(settings)
        url, label = database_url_checked(settings)
        with database_problems(label):
            on = switches(url)
        counts, paused, problem = run(_held_counts(settings, journeys, on))
        views = [SwitchView.of(s, counts.get(s.scope)) for s in on]
    if not views:
        say("No kill switch is on.")
    else:
        table = Table(box=None, header_style="bold")
        for column in ("switch", "holds", "since (UTC)", "by", "reason", "held now"):
            table.add_column(column)
        for view in views:
            cells = (
                "global" if view.scope == GLOBAL else view.scope,
                view.covers,
                f"{view.since:%Y-%m-%d %H:%M:%S}",
                view.by,
                view.reason or "-",
                "?" if view.held is None else str(view.held),
            )
            table.add_row(*(Text(cell) for cell in cells))  # plain text, never markup
        console.print(table)
    if problem:
        errors.print(Text(problem), soft_wrap=True)
    if paused is None:
        where = "KAERU_API_URL's deployment" if settings.api_url else "KAERU_TEMPORAL_ADDRESS"
        say(f"Held journeys not counted: Temporal could not be asked (check {where}).")
    elif paused:
        say(f"{paused} journey(s) paused by an operator (`kaeru journeys resume <id>`).")


async def _held_counts(
    settings: Settings, journeys: dict[str, JourneyKind], on: list[KillSwitch]
) -> tuple[dict[str, int], int | None, str | None]:
    """Held journeys per switch, paused ones, and a warning; ``({}, None, None)`` when Temporal
    cannot answer (the switches are shown whatever Temporal says)."""
    try:
        client = await connected(settings)
        counts, paused = await steering.held_counts(client, journeys, on)
        missing = await steering.held_attribute_missing(client, settings.temporal_namespace)
    except (StackError, RPCError):
        return {}, None, None
    return counts, paused, " ".join(NO_HELD_ATTRIBUTE) if missing else None


kill_switch_app.command("on")(kill_switch_on)
kill_switch_app.command("off")(kill_switch_off)
kill_switch_app.command("status")(kill_switch_status)


# ---- kaeru journeys pause | resume | cancel ---------------------------------------------------

journeys_app = typer.Typer(
    help="Journeys: list them, show one, pause, resume or cancel one, and the impact of a change.",
    no_args_is_help=True,
)

JourneyIdArg = Annotated[
    str, typer.Argument(help="The journey's workflow id, e.g. cart-abandonment-c-42.")
]


def _steer(settings: Settings, act: Any) -> Any:
    """Connect and run ``act(client, journeys)``, turning a refusal or a Temporal failure
    into one line with the fix."""

    async def steer() -> Any:
        return await act(await connected(settings), steering.journeys_of(settings))

    try:
        with refusals():
            return run(steer())
    except RPCError as err:
        fail(f"Temporal refused: {err.message}", "Check KAERU_TEMPORAL_ADDRESS and try again.")


def _local(settings: Settings) -> None:
    """Check the database before steering: every change is audited there."""
    database_url_checked(settings)


def _steer_journey(
    settings: Settings, action: Callable[..., Awaitable[Any]], workflow_id: str, reason: str
) -> Any:
    """``steering.pause``, ``resume`` or ``cancel`` of one journey here, as the CLI's user."""
    _local(settings)
    actor = audit.cli_actor()
    return _steer(
        settings,
        lambda client, journeys: action(
            client, settings, journeys, workflow_id, reason=reason, actor=actor
        ),
    )


def journeys_pause(
    workflow_id: JourneyIdArg,
    reason: Annotated[str, typer.Option(help="Why, for the journey's story.")] = "",
) -> None:
    """Pause one journey: it waits before its next email, coupon or audience join until
    `kaeru journeys resume`. Its waits go on, and a purchase still ends it."""
    settings = load_settings()
    if settings.api_url:
        answer = remote(settings, "POST", journey_path(workflow_id, "pause"), {"reason": reason})
        changed = bool(answer["changed"])
    else:
        changed = _steer_journey(settings, steering.pause, workflow_id, reason)
    if not changed:
        say(f"Journey {workflow_id} already is paused: nothing was changed.")
        return
    say(
        f"Paused {workflow_id}: it waits before its next email, coupon or audience join. "
        f"Resume it with `kaeru journeys resume {workflow_id}`."
    )


def journeys_resume(
    workflow_id: JourneyIdArg,
    reason: Annotated[
        str, typer.Option(help="Why, for the journey's story and the audit log.")
    ] = "",
) -> None:
    """Resume a paused or held journey: what it held goes out once (its email through the
    send gate again: quiet hours, caps, stale limit)."""
    settings = load_settings()
    if settings.api_url:
        answer = remote(settings, "POST", journey_path(workflow_id, "resume"), {"reason": reason})
        still: str | None = answer.get("still_held_by")
    else:
        resumed = _steer_journey(settings, steering.resume, workflow_id, reason)
        still = resumed.still_held_by.scope if resumed.still_held_by else None
    say(f"Resumed {workflow_id}: it goes on with the step it held.")
    if still is not None:
        say(
            f"{named(still).capitalize()} is still on: the journey is held again at its "
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
    if settings.api_url:
        answer = remote(settings, "POST", journey_path(workflow_id, "cancel"), {"reason": reason})
        ended = bool(answer["changed"])
    else:
        ended = _steer_journey(settings, steering.cancel, workflow_id, reason)
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
