"""What operators read: ``kaeru journeys list|show``, ``kaeru customers show``,
``kaeru audiences show`` and ``kaeru audit``.

Journeys are found in Temporal's visibility (its search attributes, kaeru/search_attributes.py);
the rest is read from kaeru's database. Nothing here changes anything. Visibility lags a moment
behind a journey's start or step: a journey that just started may take a second to be listed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import sqlalchemy
import typer
from rich.table import Table
from rich.text import Text
from sqlalchemy import func
from sqlmodel import Session, col, select
from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.client import (
    Client,
    WorkflowExecution,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
)
from temporalio.service import RPCError, RPCStatusCode

from activities.email.addresses import mask_address
from kaeru import audit
from kaeru.cli import (
    connected,
    console,
    database_problems,
    database_url_checked,
    fail,
    load_settings,
    run,
)
from kaeru.consent import CHANNELS, consent_of
from kaeru.db import session as db_session
from kaeru.journeys import load_registry
from kaeru.models import (
    AudienceChangeRow,
    AudienceJoin,
    Customer,
    EmailMessage,
    Event,
    Order,
    Touchpoint,
)
from kaeru.pseudonyms import VisibleIds, journey_kind, pseudonym_key, read_visible_ids
from kaeru.search_attributes import CUSTOMER_ID, HELD, OUTCOME, STEP
from kaeru.serving import StackError
from kaeru.settings import Settings
from starter.dashboard import journey_url
from starter.privacy import ids_of

#: ``--status`` words → Temporal's ``ExecutionStatus`` values.
STATUSES = {
    "running": "Running",
    "completed": "Completed",
    "failed": "Failed",
    "canceled": "Canceled",
    "cancelled": "Canceled",
    "terminated": "Terminated",
    "continued-as-new": "ContinuedAsNew",
    "timed-out": "TimedOut",
}
#: How long ``journeys show`` waits for a worker to answer the ``status`` query.
QUERY_TIMEOUT = timedelta(seconds=5)
#: Rows of each part of ``customers show``.
RECENT = 10
TEMPORAL_DOWN = "check KAERU_TEMPORAL_ADDRESS (and KAERU_TEMPORAL_NAMESPACE)"


class UnsearchableValue(ValueError):
    """A value that cannot be put in a visibility query safely."""


def literal(value: str) -> str:
    """``value`` as a visibility query's string literal: between single quotes, a quote in it
    doubled, so no input can end the literal and add to the query.

    Raises:
        UnsearchableValue: ``value`` holds a double quote, a backslash or a control character,
            which Temporal's visibility store does not match reliably (a double quote matches
            nothing, a backslash may start an escape); kaeru's kinds, steps, outcomes and
            pseudonyms never hold one.
    """
    if '"' in value or "\\" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise UnsearchableValue(value)
    return "'" + value.replace("'", "''") + "'"


def _literal_of(option: str, value: str) -> str:
    try:
        return literal(value)
    except UnsearchableValue:
        fail(
            f"{option} {value!r} cannot be searched: Temporal's visibility does not match a "
            "double quote, a backslash or a control character",
            "Check the value: kaeru's journey kinds, steps and outcomes never contain one.",
        )


def journey_types(settings: Settings) -> dict[str, str]:
    """Workflow type → journey kind, for every journey this deployment knows (on or off)."""
    return {route.workflow_name: route.journey.kind for route in load_registry(settings).routes}


def customer_values(visible: VisibleIds, customer_ids: Iterable[str]) -> list[str]:
    """Every ``KaeruCustomerId`` the customers' journeys may show (clear id and pseudonym,
    whatever ``KAERU_PSEUDONYMOUS_IDS`` was when each started), those that can be searched."""
    values: list[str] = []
    for customer_id in customer_ids:
        for shown in visible.every_id(customer_id):
            try:
                literal(shown)
            except UnsearchableValue:
                continue  # its pseudonym (hex) always can
            if shown not in values:
                values.append(shown)
    return values


def journeys_query(
    types: Sequence[str],
    *,
    step: str | None = None,
    outcome: str | None = None,
    customers: Sequence[str] = (),
    status: str | None = None,
) -> str:
    """The visibility query of journeys of ``types`` with the given filters (all escaped)."""
    parts = [f"WorkflowType IN ({', '.join(literal(t) for t in types)})"]
    if step is not None:
        parts.append(f"{STEP.name} = {literal(step)}")
    if outcome is not None:
        parts.append(f"{OUTCOME.name} = {literal(outcome)}")
    if customers:
        parts.append(f"{CUSTOMER_ID.name} IN ({', '.join(literal(c) for c in customers)})")
    if status is not None:
        parts.append(f"ExecutionStatus = {literal(status)}")
    return " AND ".join(parts)


def _temporal_problem(exc: StackError | RPCError) -> str:
    return exc.message if isinstance(exc, RPCError) else str(exc)


def _read(coro: Any) -> Any:
    """Run a read of Temporal: a refusal or an unreachable server is one line with the fix."""
    try:
        return run(coro)
    except RPCError as exc:
        if exc.status == RPCStatusCode.INVALID_ARGUMENT:
            fail(
                f"Temporal refused the query: {exc.message}",
                "If it names a Kaeru* search attribute, run `kaeru setup` (on Temporal Cloud, "
                "add it as a Keyword in the namespace).",
            )
        fail(f"Temporal refused: {exc.message}", f"Then try again: {TEMPORAL_DOWN}.")


def _when(at: datetime | None) -> str:
    return "-" if at is None else f"{at.astimezone(UTC):%Y-%m-%d %H:%M:%S}"


def _status_word(status: WorkflowExecutionStatus | None) -> str:
    return status.name.lower().replace("_", "-") if status is not None else "?"


def say(text: str) -> None:
    """Print a line as it is (no markup: ids, steps and subjects are the shop's text),
    unwrapped, so a command or an id in it stays copyable."""
    console.print(text, soft_wrap=True, markup=False)


def heading(text: str) -> None:
    console.print(Text(text, style="bold"), soft_wrap=True)


def _table(*columns: str) -> Table:
    table = Table(box=None, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _row(table: Table, *cells: str) -> None:
    """Add a row whose cells are plain text, never rich markup."""
    table.add_row(*(Text(cell) for cell in cells))


def _journeys_table(found: Sequence[WorkflowExecution], types: dict[str, str]) -> Table:
    table = _table("id", "kind", "step", "status / outcome", "started (UTC)", "held")
    for execution in found:
        attributes = execution.typed_search_attributes
        ended = _status_word(execution.status)
        result = attributes.get(OUTCOME)
        _row(
            table,
            execution.id,
            types.get(execution.workflow_type, execution.workflow_type),
            attributes.get(STEP) or "-",
            f"{ended} / {result}" if result else ended,
            _when(execution.start_time),
            attributes.get(HELD) or "-",
        )
    return table


# ---- kaeru journeys list ---------------------------------------------------------------------


def journeys_list(
    kind: Annotated[
        str | None, typer.Option(help="One journey kind, e.g. cart-abandonment.")
    ] = None,
    step: Annotated[
        str | None,
        typer.Option(help="The journey's current step (KaeruStep), e.g. cart_email or ended."),
    ] = None,
    outcome: Annotated[
        str | None, typer.Option(help="How it ended (KaeruOutcome), e.g. purchased.")
    ] = None,
    customer: Annotated[
        str | None,
        typer.Option(help="A customer id, as the shop sends it (pseudonymised as journeys are)."),
    ] = None,
    status: Annotated[
        str | None, typer.Option(help=f"Temporal's status: {', '.join(sorted(set(STATUSES)))}.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many journeys.")] = 50,
) -> None:
    """List journeys from Temporal's visibility (running ones first), filtered by kind, step,
    outcome, customer or status."""
    settings = load_settings()
    types = journey_types(settings)
    if kind is not None:
        kinds = sorted(types.values())
        if kind not in kinds:
            fail(f"there is no journey kind {kind!r}", f"Give one of: {', '.join(kinds)}.")
        wanted = [name for name, k in types.items() if k == kind]
    else:
        wanted = sorted(types)
    if status is not None and status.lower() not in STATUSES:
        fail(
            f"--status {status!r} is not a status",
            f"Give one of: {', '.join(sorted(set(STATUSES)))}.",
        )
    for option, value in (("--step", step), ("--outcome", outcome)):
        if value is not None:
            _literal_of(option, value)
    customers: list[str] = []
    if customer is not None:
        _, label = database_url_checked(settings)
        with database_problems(label):  # the pseudonym key is in the database
            customers = customer_values(read_visible_ids(settings), [customer])
    query = journeys_query(
        wanted,
        step=step,
        outcome=outcome,
        customers=customers,
        status=STATUSES[status.lower()] if status is not None else None,
    )

    async def listed() -> list[WorkflowExecution]:
        client = await connected(settings)
        with console.status("asking Temporal's visibility…"):
            return [w async for w in client.list_workflows(query, limit=limit)]

    found = _read(listed())
    if not found:
        say("No journey matches (visibility lags a second behind a journey's start or step).")
        return
    console.print(_journeys_table(found, types))
    if len(found) == limit:
        say(f"Showing the first {limit}: narrow the filters or raise --limit.")


# ---- kaeru journeys show ---------------------------------------------------------------------


def _history_summary(events: Sequence[Any]) -> list[str]:
    """Events count, timers still waiting and the last activity, from a workflow history."""
    timers: dict[str, datetime] = {}
    last_activity: tuple[str, datetime] | None = None
    for event in events:
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_TIMER_STARTED:
            attrs = event.timer_started_event_attributes
            fires = (
                event.event_time.ToDatetime(tzinfo=UTC) + attrs.start_to_fire_timeout.ToTimedelta()
            )
            timers[attrs.timer_id] = fires
        elif kind == EventType.EVENT_TYPE_TIMER_FIRED:
            timers.pop(event.timer_fired_event_attributes.timer_id, None)
        elif kind == EventType.EVENT_TYPE_TIMER_CANCELED:
            timers.pop(event.timer_canceled_event_attributes.timer_id, None)
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            last_activity = (name, event.event_time.ToDatetime(tzinfo=UTC))
    lines = [f"events: {len(events)}"]
    if timers:
        soonest = min(timers.values())
        lines.append(f"timers waiting: {len(timers)} (next fires {_when(soonest)} UTC)")
    else:
        lines.append("timers waiting: 0")
    if last_activity is not None:
        lines.append(f"last activity: {last_activity[0]} (scheduled {_when(last_activity[1])} UTC)")
    else:
        lines.append("last activity: none yet")
    return lines


def _pending_activities(description: WorkflowExecutionDescription) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for pending in description.raw_description.pending_activities:
        failure = pending.last_failure.message if pending.HasField("last_failure") else ""
        state = pending.state
        rows.append(
            (
                pending.activity_type.name,
                _state_word(state),
                str(pending.attempt),
                " ".join(failure.split())[:300] or "-",
            )
        )
    return rows


def _state_word(state: Any) -> str:
    name = PendingActivityState.Name(state)
    return name.removeprefix("PENDING_ACTIVITY_STATE_").lower()


async def _status_of(client: Client, workflow_id: str) -> dict[str, Any] | str:
    """The journey's ``status`` query as a dict, or why it was not answered."""
    try:
        answer = await client.get_workflow_handle(workflow_id).query(
            "status", rpc_timeout=QUERY_TIMEOUT
        )
    except (WorkflowQueryFailedError, WorkflowQueryRejectedError) as exc:
        return f"the journey did not answer its status query ({exc})"
    except RPCError as exc:
        return (
            f"no worker answered its status query ({exc.message}): is `kaeru worker` running "
            "on its task queue?"
        )
    return answer if isinstance(answer, dict) else {"answer": answer}


def journeys_show(
    workflow_id: Annotated[
        str, typer.Argument(help="The journey's workflow id, e.g. cart-abandonment-c-42.")
    ],
) -> None:
    """Show one journey: its status and story (from its `status` query), a summary of its
    history, pending activities, search attributes and its page in the Temporal UI."""
    settings = load_settings()
    types = journey_types(settings)

    async def gather() -> tuple[WorkflowExecutionDescription, list[Any], dict[str, Any] | str]:
        client = await connected(settings)
        handle = client.get_workflow_handle(workflow_id)
        with console.status(f"reading {workflow_id} from Temporal…"):
            try:
                description = await handle.describe()
            except RPCError as exc:
                if exc.status == RPCStatusCode.NOT_FOUND and "namespace" in exc.message.lower():
                    fail(
                        f"Temporal refused: {exc.message}",
                        "Check KAERU_TEMPORAL_NAMESPACE (`kaeru dev` uses `default`).",
                    )
                if exc.status == RPCStatusCode.NOT_FOUND:
                    fail(
                        f"there is no journey with id {workflow_id!r}",
                        "Find it with `kaeru journeys list --customer <id>` (ids are "
                        "<kind>-<customer id or its pseudonym>).",
                    )
                raise
            history = await handle.fetch_history()
            status = await _status_of(client, workflow_id)
        return description, list(history.events), status

    description, events, status = _read(gather())
    attributes = description.typed_search_attributes
    kind = types.get(description.workflow_type)
    heading(
        f"{workflow_id}  {description.workflow_type}"
        + (f" ({kind})" if kind else " (not a journey this deployment knows)")
    )
    ended = _status_word(description.status)
    result = attributes.get(OUTCOME)
    say(f"temporal status: {ended}" + (f", outcome {result}" if result else ""))
    say(f"started: {_when(description.start_time)} UTC   closed: {_when(description.close_time)}")
    say(f"run: {description.run_id}   task queue: {description.task_queue}")
    if isinstance(status, str):
        say(f"status: not available: {status}")
    else:
        heading("Status (its status query)")
        say(
            f"  step: {status.get('step')}"
            + (f" → {status['outcome']}" if status.get("outcome") else "")
        )
        if status.get("waiting_for"):
            until = status.get("waiting_until")
            shown = _when(datetime.fromisoformat(until)) + " UTC" if until else "?"
            say(f"  waiting for {status['waiting_for']} until {shown}")
        if status.get("held"):
            say(f"  held ({status['held']}) before its next outside step")
        for name, value in (status.get("details") or {}).items():
            say(f"  {name}: {value}")
        story = status.get("story") or []
        heading("Story")
        for line in story:
            say(f"  {line}")
        if not story:
            say("  (nothing yet)")
    heading("History")
    for line in _history_summary(events):
        say(f"  {line}")
    pending = _pending_activities(description)
    if pending:
        table = _table("pending activity", "state", "attempt", "last failure")
        for row in pending:
            _row(table, *row)
        console.print(table)
    heading("Search attributes")
    for key, value in sorted((pair.key.name, pair.value) for pair in attributes):
        say(f"  {key}: {value}")
    say(f"Temporal UI: {journey_url(settings, workflow_id)}")


# ---- kaeru customers show --------------------------------------------------------------------


def _customer_parts(s: Session, ids: list[str]) -> dict[str, Any]:
    def recent(model: Any, order: Any) -> list[Any]:
        query = select(model).where(col(model.customer_id).in_(ids)).order_by(order.desc())
        return list(s.exec(query.limit(RECENT)))

    return {
        "messages": recent(EmailMessage, col(EmailMessage.created_at)),
        "touchpoints": recent(Touchpoint, col(Touchpoint.occurred_at)),
        "audiences": list(
            s.exec(
                select(AudienceJoin)
                .where(col(AudienceJoin.customer_id).in_(ids))
                .order_by(col(AudienceJoin.joined_at).desc())
            )
        ),
        "consent": {channel: consent_of(s, ids[0], channel) for channel in CHANNELS},
        "events": s.exec(
            select(func.count()).select_from(Event).where(col(Event.customer_id).in_(ids))
        ).one(),
        "orders": s.exec(
            select(func.count()).select_from(Order).where(col(Order.customer_id).in_(ids))
        ).one(),
    }


async def _journeys_of(
    settings: Settings, values: list[str], types: dict[str, str]
) -> list[WorkflowExecution] | str:
    """The customer's journeys in visibility, or why Temporal could not say."""
    if not values:
        return []
    try:
        client = await connected(settings)
        query = journeys_query(sorted(types), customers=values)
        return [w async for w in client.list_workflows(query, limit=50)]
    except (StackError, RPCError) as exc:
        return _temporal_problem(exc)


def customers_show(
    customer_id: Annotated[str, typer.Argument(help="the customer's id (userId or anonymousId)")],
) -> None:
    """Show a customer: profile, consent per channel, journeys, recent messages and
    touchpoints, and ad audiences. Addresses are masked; `customers export` has everything."""
    settings = load_settings()
    types = journey_types(settings)
    url, label = database_url_checked(settings)
    with database_problems(label), db_session(url) as s:
        ids = ids_of(s, customer_id)
        profile = s.get(Customer, customer_id)
        parts = _customer_parts(s, ids)
        visible = VisibleIds(pseudonym_key(s), settings.pseudonymous_ids)
    consent = parts["consent"]
    known = profile is not None or any(
        parts[p] for p in ("messages", "touchpoints", "audiences", "events", "orders")
    )
    if not known and not any(consent.values()):
        fail(
            f"nothing is stored about customer {customer_id!r} in {label}",
            "Give the id the shop sends (userId or anonymousId); check KAERU_DATABASE_URL.",
        )
    with console.status("asking Temporal for the customer's journeys…"):
        journeys = run(_journeys_of(settings, customer_values(visible, ids), types))

    heading(f"Customer {customer_id}")
    if len(ids) > 1:
        say(f"  merged anonymous ids: {len(ids) - 1}")
    if profile is None:
        say("  no profile (no identify yet)")
    else:
        say(f"  email: {mask_address(profile.email) if profile.email else '-'}")
        say(f"  timezone: {profile.timezone or '-'}")
        say(f"  traits: {', '.join(sorted(profile.traits)) or '-'}")
        say(
            f"  first seen {_when(profile.created_at)} UTC, updated {_when(profile.updated_at)} UTC"
        )
    say(f"  events: {parts['events']}, orders: {parts['orders']}")
    say(f"  in Temporal as: {visible.visible(customer_id)}")

    table = _table("consent", "state", "source", "since (UTC)", "kinds off")
    for channel, row in consent.items():
        if row is None:
            _row(table, channel, "unknown", "-", "-", "-")
        else:
            _row(
                table,
                channel,
                row.state,
                row.source,
                _when(row.changed_at),
                ", ".join(row.kinds_off) or "-",
            )
    console.print(table)

    if isinstance(journeys, str):
        say(f"Journeys not listed: {journeys}; {TEMPORAL_DOWN}.")
    elif not journeys:
        say("No journeys in Temporal's visibility.")
    else:
        console.print(_journeys_table(journeys, types))

    messages: list[EmailMessage] = parts["messages"]
    if messages:
        table = _table("message (UTC)", "journey", "step", "subject", "status", "sent (UTC)")
        for m in messages:
            _row(
                table,
                _when(m.created_at),
                m.journey_id,
                m.step,
                m.subject,
                m.status,
                _when(m.sent_at),
            )
        console.print(table)
    else:
        say("No messages.")
    touchpoints: list[Touchpoint] = parts["touchpoints"]
    if touchpoints:
        table = _table("touchpoint (UTC)", "kind", "journey kind", "step", "channel")
        for t in touchpoints:
            _row(
                table,
                _when(t.occurred_at),
                t.kind,
                t.journey_kind or "-",
                t.step or "-",
                t.channel or "-",
            )
        console.print(table)
    else:
        say("No touchpoints.")
    joins: list[AudienceJoin] = parts["audiences"]
    if joins:
        table = _table("audience", "platform", "joined (UTC)", "left (UTC)", "journey")
        for j in joins:
            left = (
                _when(j.left_at) if j.left_at else ("removal failing" if j.removal_error else "-")
            )
            _row(table, j.audience, j.provider, _when(j.joined_at), left, j.journey_id)
        console.print(table)
    else:
        say("In no ad audience.")


# ---- kaeru audiences show --------------------------------------------------------------------

audiences_app: typer.Typer = typer.Typer(
    help="Ad audiences: who journeys put in them, per platform, and changes still queued.",
    no_args_is_help=True,
)


def _audience_counts(s: Session, name: str | None) -> dict[tuple[str, str], dict[str, int]]:
    """Per (audience, platform): members, left, failing removals, pending joins and leaves."""
    counts: dict[tuple[str, str], dict[str, int]] = {}

    def bump(audience: str, provider: str, what: str, n: int) -> None:
        row = counts.setdefault(
            (audience, provider),
            dict.fromkeys(
                ("members", "left", "removal failing", "joins queued", "leaves queued"), 0
            ),
        )
        row[what] += n

    joins = sqlalchemy.select(
        col(AudienceJoin.audience),
        col(AudienceJoin.provider),
        col(AudienceJoin.left_at).is_(None),
        col(AudienceJoin.removal_error).is_not(None),
        func.count(),
    ).group_by(
        col(AudienceJoin.audience),
        col(AudienceJoin.provider),
        col(AudienceJoin.left_at).is_(None),
        col(AudienceJoin.removal_error).is_not(None),
    )
    pending = (
        select(
            col(AudienceChangeRow.audience),
            col(AudienceChangeRow.provider),
            col(AudienceChangeRow.joining),
            func.count(),
        )
        .where(col(AudienceChangeRow.applied_at).is_(None))
        .group_by(
            col(AudienceChangeRow.audience),
            col(AudienceChangeRow.provider),
            col(AudienceChangeRow.joining),
        )
    )
    if name is not None:
        joins = joins.where(col(AudienceJoin.audience) == name)
        pending = pending.where(col(AudienceChangeRow.audience) == name)
    for audience, provider, current, failing, n in s.execute(joins).all():
        if current:
            bump(audience, provider, "members", n)
            if failing:
                bump(audience, provider, "removal failing", n)
        else:
            bump(audience, provider, "left", n)
    for audience, provider, joining, n in s.execute(pending).all():
        bump(audience, provider, "joins queued" if joining else "leaves queued", n)
    return counts


def audiences_show(
    name: Annotated[
        str | None, typer.Argument(help="One audience; without it, every audience.")
    ] = None,
    limit: Annotated[int, typer.Option(min=0, help="Members of NAME to list.")] = 20,
) -> None:
    """Show the ad audiences journeys put customers in: members per platform, those who left,
    removals that keep failing and changes still queued for the flush. With NAME, its members
    by the id Temporal shows (a pseudonym when the id is personal data) and its queued changes.
    No email address or hash is printed."""
    settings = load_settings()
    url, label = database_url_checked(settings)
    with database_problems(label), db_session(url) as s:
        counts = _audience_counts(s, name)
        members: list[AudienceJoin] = []
        queued: list[AudienceChangeRow] = []
        if name is not None:
            members = list(
                s.exec(
                    select(AudienceJoin)
                    .where(AudienceJoin.audience == name, col(AudienceJoin.left_at).is_(None))
                    .order_by(col(AudienceJoin.joined_at).desc())
                    .limit(limit)
                )
            )
            queued = list(
                s.exec(
                    select(AudienceChangeRow)
                    .where(
                        AudienceChangeRow.audience == name,
                        col(AudienceChangeRow.applied_at).is_(None),
                    )
                    .order_by(col(AudienceChangeRow.queued_at))
                    .limit(limit)
                )
            )
        visible = VisibleIds(pseudonym_key(s), settings.pseudonymous_ids)
    if not counts:
        say(
            "No journey has put anyone in an ad audience yet."
            if name is None
            else f"No one is or was in {name!r}."
        )
        return
    columns = ("members", "left", "removal failing", "joins queued", "leaves queued")
    table = _table("audience", "platform", *columns)
    for (audience, provider), row in sorted(counts.items()):
        _row(table, audience, provider, *(str(row[c]) for c in columns))
    console.print(table)
    if name is None:
        return
    total = sum(row["members"] for row in counts.values())
    say(f"{name}: {total} member(s) on {len(counts)} platform(s).")
    if members:
        # The journey's kind, not its id: a journey started before its customer's id was
        # pseudonymised has the clear id (an address, maybe) in its workflow id.
        table = _table("member (as Temporal shows it)", "platform", "joined (UTC)", "journey kind")
        for m in members:
            kind = journey_kind(m.journey_id, m.customer_id) or "-"
            _row(table, visible.visible(m.customer_id), m.provider, _when(m.joined_at), kind)
        console.print(table)
    if queued:
        table = _table("queued (UTC)", "change", "member", "platform", "in a batch")
        for c in queued:
            _row(
                table,
                _when(c.queued_at),
                "join" if c.joining else "leave",
                visible.visible(c.customer_id),
                c.provider,
                "yes" if c.batch_id is not None else "no",
            )
        console.print(table)


# ---- kaeru audit -----------------------------------------------------------------------------


def audit_log(
    limit: Annotated[int, typer.Option(min=1, help="At most this many entries.")] = 50,
    actor: Annotated[str | None, typer.Option(help="One actor, e.g. cli:alice.")] = None,
    action: Annotated[
        str | None,
        typer.Option(help="One action (kill_switch.on), or a prefix ending in a dot (journey.)."),
    ] = None,
) -> None:
    """The audit log of operator actions, newest first: who did what to which target."""
    settings = load_settings()
    url, label = database_url_checked(settings)
    with database_problems(label):
        found = audit.entries(url, action=action, actor=actor, limit=limit)
    if not found:
        say("No audit entries" + (" match." if action or actor else " yet."))
        return
    table = _table("at (UTC)", "actor", "action", "target", "detail")
    for entry in found:
        detail = (
            json.dumps(entry.detail, ensure_ascii=False, sort_keys=True) if entry.detail else "-"
        )
        _row(table, _when(entry.at), entry.actor, entry.action, entry.target, detail)
    console.print(table)
